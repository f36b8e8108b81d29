"""The pod collector: reads the kernel maps when Prometheus scrapes, keeps no copy.

Each scrape builds fresh metric families from the maps and the current
identity snapshot. A probe whose maps cannot be read this time (an fd gone
bad, a kernel error) costs that probe's families for this scrape, not the
scrape: the failure is logged and counted (in ProbeReadings, which the
monitor's own collector, monitor/monitormetrics.py, exposes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

from monitor import log
from monitor.exposition import CounterFamily, Family, GaugeFamily
from monitor.identity import OVERFLOW, IdentityIndex
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import MapReader
from monitor.probes.base import Probe, Scrape
from monitor.settings import prometheus_label
from monitor.state import MonitorState
from monitor.unseen import Baseline

POD_INFO_LABELS = ["namespace", "pod", "uid", "netns", "interface", "node", "workload",
                   "workload_kind"]


class ProbeReadings:
    """What reading the probes' maps found, for the monitor's own families: how many
    reads failed (podnet_monitor_collect_errors), and the events each probe could not
    count as read in this scrape (podnet_monitor_lost_events). The latter is kept per
    thread: the registry collects its collectors one after the other in the scrape's
    thread, and scrapes run side by side in the HTTP workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors = 0
        self._scrape = threading.local()

    def start(self) -> None:
        """A scrape begins: a probe that cannot be read in it has no lost events in it."""
        self._scrape.lost = {}

    def count_error(self) -> None:
        with self._lock:
            self._errors += 1

    def errors(self) -> int:
        with self._lock:
            return self._errors

    def add_lost(self, lost: Mapping[str, int]) -> None:
        mine: dict[str, int] = getattr(self._scrape, "lost", {})
        for source, n in lost.items():
            mine[source] = mine.get(source, 0) + n
        self._scrape.lost = mine

    def lost(self) -> dict[str, int]:
        """This thread's last scrape's, by source."""
        return dict(getattr(self._scrape, "lost", {}))


class PodCollector:
    """Per-pod families: every enabled probe's, what veths carried past our programs
    (before the attach, redirected past the host veth) and podnet_pod_info.

    An exposition.Collector: register it with an exposition.Registry, before the
    monitor's own collector (which reads `readings` after it in the same scrape).
    """

    def __init__(self, *, probes: Sequence[Probe], maps: MapReader, state: MonitorState,
                 node: str, kernel: KernelInfo, node_slot: int, pod_labels: Sequence[str] = (),
                 redirected: Callable[[], Mapping[tuple[str, str], Sequence[int]]] | None = None,
                 before_attach: Callable[[IdentityIndex], Mapping[tuple[str, str], Baseline]]
                 | None = None,
                 readings: ProbeReadings | None = None) -> None:
        self._probes, self._maps, self._state, self._node = list(probes), maps, state, node
        self._kernel, self._node_slot = kernel, node_slot
        self._pod_labels = list(pod_labels)
        self._label_names = [prometheus_label(k) for k in self._pod_labels]
        self._redirected = redirected  # pod -> [packets, bytes] delivered past its host veth
        self._before_attach = before_attach  # pod -> what its veths carried before the attach
        self.readings = readings or ProbeReadings()
        self._log = log.get("collector")

    def describe(self) -> Iterator[Family]:
        """Names and types only: registering the collector reads no kernel map."""
        for probe in self._probes:
            yield from probe.describe()
        yield from self._unseen(None, describe=True)
        yield from self._redirected_families(describe=True)
        yield from self._pod_info(describe=True)

    def collect(self) -> Iterator[Family]:
        # One identity snapshot for the whole scrape: the reconciler swaps in a new one at
        # any moment, and a pod's counters read under one and its pod_info under the next
        # showed a name's new pod with its gone namesake's counts (issue 14).
        index = self._state.snapshot.index
        scrape = Scrape(self._maps, index, self._kernel, self._node,
                        self._node_slot)
        self.readings.start()
        for probe in self._probes:
            try:
                families = list(probe.collect(scrape))
                lost = probe.lost(scrape) if probe.lost else {}
            except OSError as exc:
                self.readings.count_error()
                self._log.error("probe maps unreadable", probe=probe.name, error=str(exc))
                continue
            self.readings.add_lost(lost)
            yield from families
        yield from self._unseen(index)
        yield from self._redirected_families()
        yield from self._pod_info(index=index)

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

    def _redirected_families(self, describe: bool = False) -> Iterator[Family]:
        if not describe and self._redirected is None:
            return
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
