"""The collector: reads the kernel maps when Prometheus scrapes, keeps no copy.

Each scrape builds fresh metric families from the maps and the current
identity snapshot. A probe whose maps cannot be read this time (an fd gone
bad, a kernel error) costs that probe's families for this scrape, not the
scrape: the failure is logged and counted.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping, Sequence

from monitor import __version__, log
from monitor.exposition import CounterFamily, Family, GaugeFamily
from monitor.identity import OVERFLOW, IdentityIndex
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import MapReader
from monitor.kernel.records import ProgramStats
from monitor.probes.base import Probe, Scrape
from monitor.settings import prometheus_label
from monitor.state import MonitorState
from monitor.unseen import Baseline

POD_INFO_LABELS = ["namespace", "pod", "uid", "netns", "interface", "node", "workload",
                   "workload_kind"]


class PodCollector:
    """Per-pod families from every enabled probe, podnet_pod_info and podnet_monitor_*.

    An exposition.Collector: register it with an exposition.Registry.
    """

    def __init__(self, *, probes: Sequence[Probe], maps: MapReader, state: MonitorState,
                 node: str, kernel: KernelInfo, node_slot: int,
                 probe_states: Mapping[str, str] | None = None,
                 program_stats: Callable[[], Sequence[ProgramStats]] | None = None,
                 bcc_version: str = "", pod_labels: Sequence[str] = (),
                 api_stats: Callable[[], Mapping[str, float]] | None = None,
                 bypassed: Callable[[], Mapping[tuple[str, str], str]] | None = None,
                 redirected: Callable[[], Mapping[tuple[str, str], Sequence[int]]] | None = None,
                 before_attach: Callable[[IdentityIndex], Mapping[tuple[str, str], Baseline]]
                 | None = None,
                 scrape_stats: Callable[[], tuple[int, float]] | None = None) -> None:
        self._probes, self._maps, self._state, self._node = list(probes), maps, state, node
        self._kernel, self._node_slot = kernel, node_slot
        self._probe_states = dict(probe_states or {p.name: "loaded" for p in probes})
        self._program_stats, self._bcc_version = program_stats, bcc_version
        self._pod_labels = list(pod_labels)
        self._label_names = [prometheus_label(k) for k in self._pod_labels]
        self._api_stats = api_stats
        self._bypassed = bypassed  # pod -> why its traffic bypasses ours, "" if it does not
        self._redirected = redirected  # pod -> [packets, bytes] delivered past its host veth
        self._before_attach = before_attach  # pod -> what its veths carried before the attach
        self._scrape_stats = scrape_stats  # the registry's: scrapes done, seconds spent
        self._log = log.get("collector")
        self._probe_errors = 0

    def describe(self) -> Iterator[Family]:
        """Names and types only: registering the collector reads no kernel map."""
        for probe in self._probes:
            yield from probe.describe()
        yield from self._unseen(None, describe=True)
        yield from self._pod_info(describe=True)
        yield from self._monitor(describe=True)
        yield self._lost_family({}, describe=True)

    def collect(self) -> Iterator[Family]:
        # One identity snapshot for the whole scrape: the reconciler swaps in a new one at
        # any moment, and a pod's counters read under one and its pod_info under the next
        # showed a name's new pod with its gone namesake's counts (issue 14).
        index = self._state.snapshot.index
        scrape = Scrape(self._maps, index, self._kernel, self._node,
                        self._node_slot)
        lost: dict[str, float] = dict(self._state.lost_events())
        for probe in self._probes:
            try:
                families = list(probe.collect(scrape))
                for source, n in (probe.lost(scrape) if probe.lost else {}).items():
                    lost[source] = lost.get(source, 0) + n
            except OSError as exc:
                self._probe_errors += 1
                self._log.error("probe maps unreadable", probe=probe.name, error=str(exc))
                continue
            yield from families
        yield from self._unseen(index)
        yield from self._pod_info(index=index)
        yield from self._monitor()
        yield self._lost_family(lost)

    def _unseen(self, index: IdentityIndex | None, describe: bool = False) -> Iterator[Family]:
        if self._before_attach is None and not describe:
            return
        labels = ["namespace", "pod", "direction"]
        packets = CounterFamily(
            "podnet_packets_before_attach", "Packets the pod's host veth carried before the "
            "monitor's programs were on it (its own statistics at the attach, less what the "
            "programs counted since): with podnet_packets_total, every packet the veth "
            "counted. Not by protocol.", labels)
        byte_count = CounterFamily(
            "podnet_bytes_before_attach", "Bytes of those packets, as the veth counts them.",
            labels)
        if self._before_attach is not None and index is not None:
            for (namespace, pod), base in sorted(self._before_attach(index).items()):
                for direction, n, b in (("egress", base.egress_packets, base.egress_bytes),
                                        ("ingress", base.ingress_packets, base.ingress_bytes)):
                    packets.add((namespace, pod, direction), n)
                    byte_count.add((namespace, pod, direction), b)
        yield packets
        yield byte_count

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

    def _pod_info(self, describe: bool = False, index: IdentityIndex | None = None
                  ) -> Iterator[Family]:
        info = GaugeFamily("podnet_pod_info", "A monitored pod: always 1; its labels "
                           "join pod names to netns, interface and workload.",
                           POD_INFO_LABELS + self._label_names)
        if not describe:
            overflow = False
            for pod in (index or self._state.snapshot.index).pods():
                if pod.namespace == OVERFLOW:
                    overflow = True  # one info series for all of them, not one each
                    continue
                labels = dict(pod.meta.labels)
                info.add((
                    pod.namespace, pod.name, pod.uid, str(pod.netns_inode),
                    ",".join(v.name for v in pod.interfaces), self._node,
                    pod.meta.workload, pod.meta.workload_kind,
                    *(labels.get(k, "") for k in self._pod_labels)), 1)
            if overflow:
                info.add((OVERFLOW, OVERFLOW, "", "", "", self._node, "", "",
                          *("" for _ in self._pod_labels)), 1)
        yield info

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
            probe_errors.add((), self._probe_errors)
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
        if describe or self._redirected is not None:
            red_packets = CounterFamily(
                "podnet_redirected_packets", "Packets delivered into the pod past its host veth "
                "(bpf_redirect_peer: Cilium's host routing, netkit), which no program of ours "
                "sees: from the pod-side device's statistics, since the daemon started; not "
                "in podnet_packets_total.", ["namespace", "pod"])
            red_bytes = CounterFamily(
                "podnet_redirected_bytes", "Bytes of those packets, as the pod-side device "
                "counts them (the frame, Ethernet header included, as podnet_bytes_total).",
                ["namespace", "pod"])
            for (namespace, pod), (n, b) in sorted((self._redirected() if self._redirected and
                                                    not describe else {}).items()):
                red_packets.add((namespace, pod), n)
                red_bytes.add((namespace, pod), b)
            yield red_packets
            yield red_bytes
        if describe or self._program_stats:
            yield run_seconds
            yield runs
        if describe or self._scrape_stats is not None:
            yield scrapes
            yield scrape_seconds
