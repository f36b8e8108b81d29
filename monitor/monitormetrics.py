"""The monitor's own collector: podnet_monitor_*, the daemon's health and cost.

Beside the pod collector (monitor/collector.py) in one registry, after it: what
the pod collector's reading of the probes found in a scrape (unreadable maps,
events a probe could not count) is in ProbeReadings, which this one exposes.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping, Sequence

from monitor import __version__
from monitor.collector import ProbeReadings
from monitor.exposition import CounterFamily, Family, GaugeFamily
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.records import ProgramStats
from monitor.probes.base import Probe
from monitor.state import MonitorState


class MonitorCollector:
    """podnet_monitor_*: attach and reconcile counts, build, probe states, maps, the
    API watch, bypasses, BPF run statistics, scrapes and lost events.

    An exposition.Collector: register it with an exposition.Registry.
    """

    def __init__(self, *, state: MonitorState, kernel: KernelInfo, readings: ProbeReadings,
                 probe_states: Mapping[str, str],
                 program_stats: Callable[[], Sequence[ProgramStats]] | None = None,
                 bcc_version: str = "",
                 api_stats: Callable[[], Mapping[str, float]] | None = None,
                 bypassed: Callable[[], Mapping[tuple[str, str], str]] | None = None,
                 scrape_stats: Callable[[], tuple[int, float]] | None = None) -> None:
        self._state, self._kernel, self._readings = state, kernel, readings
        self._probe_states = dict(probe_states)
        self._program_stats, self._bcc_version = program_stats, bcc_version
        self._api_stats = api_stats
        self._bypassed = bypassed  # pod -> why its traffic bypasses ours, "" if it does not
        self._scrape_stats = scrape_stats  # the registry's: scrapes done, seconds spent

    def describe(self) -> Iterator[Family]:
        """Names and types only."""
        yield from self._monitor(describe=True)
        yield self._lost_family({}, describe=True)

    def collect(self) -> Iterator[Family]:
        lost: dict[str, float] = dict(self._state.lost_events())
        for source, n in self._readings.lost().items():
            lost[source] = lost.get(source, 0) + n
        yield from self._monitor()
        yield self._lost_family(lost)

    def _monitor(self, describe: bool = False) -> Iterator[Family]:
        state = self._state
        attached = GaugeFamily("podnet_monitor_attached_pods",
                               "Pods whose host veths carry our programs.")
        errors = CounterFamily("podnet_monitor_attach_errors",
                               "Failed attempts to attach to a pod's interface.")
        reconciles = CounterFamily("podnet_monitor_reconciles",
                                   "Discovery and attach passes run.")
        reconcile_seconds = CounterFamily("podnet_monitor_reconcile_seconds",
                                          "Time spent in discovery and attach passes.")
        probe_errors = CounterFamily("podnet_monitor_collect_errors",
                                     "Scrapes in which a probe's maps could not be read.")
        build = GaugeFamily("podnet_monitor_build_info", "podnetmon's build: always 1.",
                            ["version", "bcc_version", "kernel"])
        dropped = CounterFamily(
            "podnet_monitor_series_dropped", "Pods counted under namespace=pod=_overflow "
            "because max_pods pods had series of their own already.")
        api = GaugeFamily(
            "podnet_monitor_api_synced", "1 once the Kubernetes pod list has been read "
            "(absent without the API).")
        api_calls = CounterFamily(
            "podnet_monitor_api_requests", "Kubernetes API requests: list, watch, and failed "
            "ones (error).", ["kind"])
        offsets = GaugeFamily(
            "podnet_monitor_kernel_offsets", "Where kernel struct offsets came from: btf, or "
            "none (then drops count under the node only; retransmits and RTT are off).",
            ["source"])
        probe_states = GaugeFamily(
            "podnet_monitor_probe_state", "Each probe's state on this kernel: loaded, degraded "
            "(it runs but attributes less) or off; the log says why.", ["probe", "state"])
        run_seconds = CounterFamily(
            "podnet_monitor_bpf_run_seconds", "Time the kernel spent running each of our BPF "
            "programs (only while the kernel keeps BPF statistics).", ["program"])
        runs = CounterFamily("podnet_monitor_bpf_runs", "Runs of each of our BPF "
                             "programs (only while the kernel keeps BPF statistics).",
                             ["program"])
        maps = GaugeFamily(
            "podnet_monitor_maps", "Where this daemon's counters started, by owner of maps "
            "(maps=core: the slot table; each probe's name): adopted (the pinned maps of the "
            "daemon before it: counters continue), fresh (nothing was pinned), reset (pinned "
            "maps of another layout were found and left: that probe's counters restarted) or "
            "unpinned (no bpffs: counters restart with every daemon).", ["maps", "state"])
        overflows = CounterFamily(
            "podnet_monitor_netlink_overflows", "Times the kernel dropped link events for the "
            "monitor (its netlink socket overflowed); each is answered by a full rescan.")
        reattaches = CounterFamily(
            "podnet_monitor_reattaches", "Interfaces attached again because ours was not what "
            "it should be: filter gone, link gone (someone removed it), or a filter runs "
            "before ours (moved to tcx).", ["reason"])
        scrapes = CounterFamily("podnet_monitor_scrapes", "Scrapes of /metrics answered.")
        scrape_seconds = CounterFamily(
            "podnet_monitor_scrape_seconds", "Time spent producing /metrics: reading the "
            "maps and writing the exposition (a scrape counts once it is done).")
        if not describe:
            attached.add((), state.attached_pods())
            errors.add((), state.attach_errors)
            reconciles.add((), state.reconciles)
            reconcile_seconds.add((), state.reconcile_seconds)
            probe_errors.add((), self._readings.errors())
            build.add((__version__, self._bcc_version, platform.release()), 1)
            offsets.add((self._kernel.offsets_source,), 1)
            dropped.add((), state.series_dropped)
            for owner, where in sorted(state.maps_states.items()):
                maps.add((owner, where), 1)
            overflows.add((), state.netlink_overflows)
            for reason, n in sorted(state.reattaches().items()):
                reattaches.add((reason,), n)
            if self._api_stats is not None:
                stats = self._api_stats()
                api.add((), stats.get("synced", 0))
                for kind in ("list", "watch", "error"):
                    api_calls.add((kind,), stats.get(kind, 0))
            for name, probe_state in sorted(self._probe_states.items()):
                probe_states.add((name, probe_state), 1)
            for stat in self._program_stats() if self._program_stats else ():
                run_seconds.add((stat.name,), stat.run_time_ns / 1e9)
                runs.add((stat.name,), stat.run_cnt)
            if self._scrape_stats is not None:
                done, seconds = self._scrape_stats()
                scrapes.add((), done)
                scrape_seconds.add((), seconds)
        yield from (attached, errors, reconciles, reconcile_seconds, probe_errors, build, offsets,
                    probe_states, dropped, maps, overflows, reattaches)
        if describe or self._api_stats is not None:
            yield api
            yield api_calls
        if describe or self._bypassed is not None:
            bypassed = GaugeFamily(
                "podnet_monitor_bypassed", "1 while a pod's traffic bypasses our programs, "
                "with why: tc_filter_first, tcx_program_first (another program ends their "
                "TC processing before ours), redirect_peer (delivered into the pod past its "
                "host veth), unknown; reason=\"\" and 0 while it does not.",
                ["namespace", "pod", "reason"])
            for (namespace, pod), reason in sorted((self._bypassed() if self._bypassed and
                                                    not describe else {}).items()):
                bypassed.add((namespace, pod, reason), 1 if reason else 0)
            yield bypassed
        if describe or self._program_stats:
            yield run_seconds
            yield runs
        if describe or self._scrape_stats is not None:
            yield scrapes
            yield scrape_seconds

    def _lost_family(self, lost: Mapping[str, float], describe: bool = False) -> CounterFamily:
        family = CounterFamily(
            "podnet_monitor_lost_events", "Events the monitor could not count or deliver: "
            "drops (the drop map was full), capture and drop_events (a trace's perf buffer "
            "overran).", ["source"])
        if not describe:
            # capture and drop_events are the daemon's own counts, always there; a probe's
            # source is left out of a scrape that could not read it (never shown as 0,
            # which Prometheus would take for a counter reset)
            for source in sorted({"capture", "drop_events", *lost}):
                family.add((source,), lost.get(source, 0))
        return family


def probe_states(wanted: Sequence[Probe], notes: Mapping[str, str]) -> dict[str, str]:
    """loaded, degraded or off, for podnet_monitor_probe_state."""
    states = {}
    for probe in wanted:
        note = notes.get(probe.name, "")
        states[probe.name] = ("off" if note.startswith("not loaded") else
                              "degraded" if note else "loaded")
    return states
