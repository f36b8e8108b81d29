"""The scrape-time collectors (the pods', the monitor's own) over fake kernel maps, and the
per-CPU folding helpers."""

from __future__ import annotations

import ctypes
import dataclasses
import platform
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import monitor
from monitor.collector import PodCollector, ProbeReadings
from monitor.exposition import DuplicateSeriesError, Family, Registry
from monitor.identity import OVERFLOW, HostVeth, IdentityIndex, Pod, PodMeta, PodNetwork, fold, identify
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import only_u64, sum_u64_slots
from monitor.kernel.records import ProgramStats
from monitor.monitormetrics import MonitorCollector
from monitor.probes import REGISTRY, drops, packets, retransmits
from monitor.probes.base import Scrape
from monitor.probes.packets import Counts
from monitor.settings import prometheus_label as label_name
from monitor.state import InterfaceStatus, MonitorState, PodStatus, Snapshot
from tests.unit.fakes import DictMaps, kernel, no_offsets_kernel, registry_of, u32, u64

INGRESS, EGRESS = 0, 1
TCP, UDP, ICMP, OTHER = 0, 1, 2, 3

PodFactory = Callable[..., Pod]  # the make_pod fixture (conftest.py)


def counts(packets_: dict[tuple[int, int], int], bytes_: dict[tuple[int, int], int]) -> bytes:
    """A pnm_counts value: {(direction, protocol): number}."""
    c = Counts()
    for (d, p), n in packets_.items():
        c.packets[d][p] = n
    for (d, p), n in bytes_.items():
        c.bytes[d][p] = n
    return bytes(c)


class FakeMaps:
    """A MapReader over pnm_packets, an array indexed by interface slot; records every read."""

    def __init__(self, slots: dict[int, bytes] | None = None, error: OSError | None = None) -> None:
        self.slots = slots or {}
        self.error = error
        self.reads: list[tuple[str, object]] = []

    def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
        self.reads.append(("items", name))
        if self.error is not None:
            raise self.error
        return [(struct.pack("=I", slot), value) for slot, value in self.slots.items()]

    def lookup(self, name: str, key: bytes) -> bytes | None:
        (slot,) = struct.unpack("=I", key)
        return self.lookup_slots(name, [slot])[0]

    def lookup_slots(self, name: str, slots: Sequence[int]) -> list[bytes | None]:
        self.reads.extend((name, slot) for slot in slots)
        if self.error is not None:
            raise self.error
        assert name == "pnm_packets"
        return [self.slots.get(slot) for slot in slots]


class DaemonCollectors:
    """The pod collector and the monitor's own, as the daemon registers them
    (monitor/httpside.py): one after the other, sharing the probe readings."""

    def __init__(self, *, probes: Sequence[Any], state: MonitorState, kernel: KernelInfo,
                 probe_states: Mapping[str, str] | None = None,
                 program_stats: Callable[[], Sequence[ProgramStats]] | None = None,
                 bcc_version: str = "", api_stats: Callable[[], Mapping[str, float]] | None = None,
                 bypassed: Callable[[], Mapping[tuple[str, str], str]] | None = None,
                 scrape_stats: Callable[[], tuple[int, float]] | None = None,
                 **pod_kwargs: Any) -> None:
        self.pods = PodCollector(probes=probes, state=state, kernel=kernel, **pod_kwargs)
        self.monitor = MonitorCollector(
            state=state, kernel=kernel, readings=self.pods.readings,
            probe_states=probe_states or {p.name: "loaded" for p in probes},
            program_stats=program_stats, bcc_version=bcc_version, api_stats=api_stats,
            bypassed=bypassed, scrape_stats=scrape_stats)

    def describe(self) -> Iterator[Family]:
        yield from self.pods.describe()
        yield from self.monitor.describe()

    def collect(self) -> Iterator[Family]:
        yield from self.pods.collect()
        yield from self.monitor.collect()


def status(pod: Pod, mode: str = "tc") -> PodStatus:
    return PodStatus(pod, tuple(InterfaceStatus(v, mode, 1.0 if mode else None, "")
                                for v in pod.interfaces))


def setup(maps: FakeMaps, pods: Sequence[Pod], slots: dict[int, int] | None = None, *,
          modes: Sequence[str] = (), program_stats: Sequence[ProgramStats] | None = None,
          state: MonitorState | None = None) -> tuple[CollectorRegistry, MonitorState]:
    """A registry over the collector; `slots` maps ifindex -> counter slot (the SlotTable's view)."""
    state = state or MonitorState()
    modes = list(modes) or ["tc"] * len(pods)
    state.publish(Snapshot(IdentityIndex(pods, slots),
                           tuple(status(p, m) for p, m in zip(pods, modes, strict=True))))
    registry = registry_of(DaemonCollectors(
        probes=[packets.PROBE], maps=maps, state=state, node="node-1", kernel=kernel(),
        node_slot=1024,
        program_stats=(lambda: program_stats) if program_stats is not None else None,
        bcc_version="0.26.0"), auto_describe=True)
    return registry, state


def render(collector: DaemonCollectors) -> str:
    """The collector's text exposition, as /metrics serves it by default."""
    registry = Registry()
    registry.register(collector)
    return registry.render().decode()


def value(registry: CollectorRegistry, name: str, pod: tuple[str, str], direction: str,
          protocol: str) -> float | None:
    return registry.get_sample_value(name, {"namespace": pod[0], "pod": pod[1],
                                            "direction": direction, "protocol": protocol})


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [s.labels for m in registry.collect() for s in m.samples if s.name == name]


# -- packets and bytes ----------------------------------------------------------------------------
# Counters live in per-CPU arrays indexed by interface slot; the IdentityIndex says which
# slot belongs to which pod (ifindex -> slot, as the SlotTable handed them out).

def test_packets_and_bytes_per_direction_and_protocol(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    maps = FakeMaps({3: counts({(INGRESS, TCP): 10, (EGRESS, UDP): 3, (EGRESS, ICMP): 2,
                                (INGRESS, OTHER): 1},
                               {(INGRESS, TCP): 15000, (EGRESS, UDP): 384, (EGRESS, ICMP): 196,
                                (INGRESS, OTHER): 60})})
    registry, _ = setup(maps, [web], {7: 3})
    expected = {
        ("ingress", "tcp"): (10, 15000), ("ingress", "udp"): (0, 0), ("ingress", "icmp"): (0, 0),
        ("ingress", "other"): (1, 60), ("egress", "tcp"): (0, 0), ("egress", "udp"): (3, 384),
        ("egress", "icmp"): (2, 196), ("egress", "other"): (0, 0),
    }
    for (direction, protocol), (npackets, nbytes) in expected.items():
        assert value(registry, "podnet_packets_total", ("shop", "web"), direction, protocol) == npackets
        assert value(registry, "podnet_bytes_total", ("shop", "web"), direction, protocol) == nbytes


def test_only_the_slots_of_the_index_are_read(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7"), (9, "veth9")], namespace="shop", name="web")
    maps = FakeMaps({0: counts({(EGRESS, TCP): 1}, {})})
    registry, _ = setup(maps, [web], {9: 4, 7: 0})
    maps.reads.clear()
    generate_latest(registry)
    assert maps.reads == [("pnm_packets", 0), ("pnm_packets", 4)]  # by ifindex: 7, then 9


def test_zero_series_for_every_direction_and_protocol(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    registry, _ = setup(FakeMaps({0: counts({}, {})}), [web], {7: 0})
    got = series(registry, "podnet_packets_total")
    assert len(got) == 8
    assert {(s["direction"], s["protocol"]) for s in got} == {
        (d, p) for d in ("ingress", "egress") for p in ("tcp", "udp", "icmp", "other")}
    assert value(registry, "podnet_bytes_total", ("shop", "web"), "egress", "icmp") == 0


def test_two_interfaces_of_one_pod_are_summed(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7"), (9, "veth9")], namespace="shop", name="web")
    maps = FakeMaps({0: counts({(EGRESS, TCP): 5}, {(EGRESS, TCP): 500}),
                     1: counts({(EGRESS, TCP): 6, (INGRESS, UDP): 1}, {(EGRESS, TCP): 700,
                                                                      (INGRESS, UDP): 80})})
    registry, _ = setup(maps, [web], {7: 0, 9: 1})
    assert value(registry, "podnet_packets_total", ("shop", "web"), "egress", "tcp") == 11
    assert value(registry, "podnet_bytes_total", ("shop", "web"), "egress", "tcp") == 1200
    assert value(registry, "podnet_packets_total", ("shop", "web"), "ingress", "udp") == 1
    assert len(series(registry, "podnet_packets_total")) == 8


def test_slots_of_unknown_interfaces_are_skipped(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    maps = FakeMaps({0: counts({(EGRESS, TCP): 5}, {(EGRESS, TCP): 500}),
                     1: counts({(EGRESS, TCP): 1000}, {(EGRESS, TCP): 99999}),  # ifindex 8: no pod
                     2: counts({(EGRESS, TCP): 2000}, {(EGRESS, TCP): 88888})})  # no ifindex at all
    registry, _ = setup(maps, [web], {7: 0, 8: 1})
    assert value(registry, "podnet_packets_total", ("shop", "web"), "egress", "tcp") == 5
    assert {s["pod"] for s in series(registry, "podnet_packets_total")} == {"web"}
    assert ("pnm_packets", 1) not in maps.reads


def test_interface_without_a_slot_or_value_has_no_series(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")  # no slot: not attached
    db = make_pod(4026532002, [(8, "veth8")], namespace="shop", name="db")  # a slot with no value
    registry, _ = setup(FakeMaps({}), [web, db], {8: 5})
    assert series(registry, "podnet_packets_total") == []
    assert len(series(registry, "podnet_pod_info")) == 2


def test_two_netns_with_the_same_labels_are_summed(make_pod: PodFactory) -> None:
    old = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    new = make_pod(4026532002, [(12, "veth12")], namespace="shop", name="web")  # recreated sandbox
    maps = FakeMaps({0: counts({(INGRESS, TCP): 4}, {(INGRESS, TCP): 400}),
                     1: counts({(INGRESS, TCP): 6}, {(INGRESS, TCP): 600})})
    registry, _ = setup(maps, [old, new], {7: 0, 12: 1})
    assert value(registry, "podnet_packets_total", ("shop", "web"), "ingress", "tcp") == 10
    assert value(registry, "podnet_bytes_total", ("shop", "web"), "ingress", "tcp") == 1000
    assert len(series(registry, "podnet_packets_total")) == 8  # one set of series, not two


def test_pods_kept_apart(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    db = make_pod(4026532002, [(8, "veth8")], namespace="shop", name="db")
    maps = FakeMaps({0: counts({(INGRESS, TCP): 4}, {(INGRESS, TCP): 400}),
                     1: counts({(INGRESS, TCP): 6}, {(INGRESS, TCP): 600})})
    registry, _ = setup(maps, [web, db], {7: 1, 8: 0})
    assert value(registry, "podnet_packets_total", ("shop", "web"), "ingress", "tcp") == 6
    assert value(registry, "podnet_packets_total", ("shop", "db"), "ingress", "tcp") == 4


def test_pod_without_metadata_gets_the_fallback_identity(make_pod: PodFactory) -> None:
    anon = make_pod(4026532077, [(7, "veth7")], net_uid="1b4e28ba-2fa1-11d2-883f-0016d3cca427",
                    pause_pid=4242)
    registry, _ = setup(FakeMaps({0: counts({(EGRESS, UDP): 3}, {(EGRESS, UDP): 300})}), [anon], {7: 0})
    assert value(registry, "podnet_packets_total", ("_unknown", "netns-4026532077"), "egress", "udp") == 3
    assert registry.get_sample_value("podnet_pod_info", {
        "namespace": "_unknown", "pod": "netns-4026532077",
        "uid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "netns": "4026532077", "interface": "veth7",
        "node": "node-1", "workload": "", "workload_kind": ""}) == 1


# -- podnet_pod_info ------------------------------------------------------------------------------

def test_pod_info(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7"), (9, "veth9")], namespace="shop", name="web-abc",
                   uid="uid-web", workload="web", workload_kind="Deployment")
    db = make_pod(4026532002, [(8, "veth8")], namespace="shop", name="db-0", uid="uid-db",
                  workload="db", workload_kind="StatefulSet")
    registry, _ = setup(FakeMaps(), [web, db])
    assert registry.get_sample_value("podnet_pod_info", {
        "namespace": "shop", "pod": "web-abc", "uid": "uid-web", "netns": "4026532001",
        "interface": "veth7,veth9", "node": "node-1", "workload": "web",
        "workload_kind": "Deployment"}) == 1
    assert registry.get_sample_value("podnet_pod_info", {
        "namespace": "shop", "pod": "db-0", "uid": "uid-db", "netns": "4026532002",
        "interface": "veth8", "node": "node-1", "workload": "db",
        "workload_kind": "StatefulSet"}) == 1
    assert len(series(registry, "podnet_pod_info")) == 2


def test_no_pods_no_series() -> None:
    registry, _ = setup(FakeMaps({0: counts({(EGRESS, TCP): 1}, {})}), [], {7: 0})
    assert series(registry, "podnet_pod_info") == []
    assert series(registry, "podnet_packets_total") == []
    assert registry.get_sample_value("podnet_monitor_attached_pods") == 0


# -- podnet_monitor_* -----------------------------------------------------------------------------

def test_monitor_metrics(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    db = make_pod(4026532002, [(8, "veth8")], namespace="shop", name="db")
    dns = make_pod(4026532003, [(9, "veth9")], namespace="kube-system", name="dns")
    state = MonitorState()
    for _ in range(3):
        state.count_attach_error()
    state.count_reconcile(0.25)
    state.count_reconcile(0.5)
    registry, _ = setup(FakeMaps(), [web, db, dns], modes=["tc", "", "tcx"], state=state)
    assert registry.get_sample_value("podnet_monitor_attached_pods") == 2
    assert registry.get_sample_value("podnet_monitor_attach_errors_total") == 3
    assert registry.get_sample_value("podnet_monitor_reconciles_total") == 2
    assert registry.get_sample_value("podnet_monitor_reconcile_seconds_total") == 0.75
    assert registry.get_sample_value("podnet_monitor_collect_errors_total") == 0
    assert registry.get_sample_value("podnet_monitor_build_info", {
        "version": monitor.__version__, "bcc_version": "0.26.0",
        "kernel": platform.release()}) == 1
    assert registry.get_sample_value("podnet_monitor_kernel_offsets", {"source": "btf"}) == 1
    assert series(registry, "podnet_monitor_kernel_offsets") == [{"source": "btf"}]
    # no probe_states given: every probe the collector runs is "loaded"
    assert series(registry, "podnet_monitor_probe_state") == [{"probe": "packets", "state": "loaded"}]


def test_no_bpf_stats_families_without_program_stats(make_pod: PodFactory) -> None:
    text = render(DaemonCollectors(probes=[packets.PROBE], maps=FakeMaps(), state=MonitorState(),
                                   node="node-1", kernel=kernel(), node_slot=1024))
    assert "podnet_monitor_bpf_run" not in text
    assert "podnet_monitor_bpf_runs" not in text


def test_bpf_program_stats() -> None:
    stats = [ProgramStats("pnm_tc_ingress", 41, 1_500_000_000, 300),
             ProgramStats("pnm_tc_egress", 42, 250_000_000, 120)]
    registry, _ = setup(FakeMaps(), [], program_stats=stats)
    assert registry.get_sample_value("podnet_monitor_bpf_run_seconds_total",
                                     {"program": "pnm_tc_ingress"}) == 1.5
    assert registry.get_sample_value("podnet_monitor_bpf_runs_total",
                                     {"program": "pnm_tc_ingress"}) == 300
    assert registry.get_sample_value("podnet_monitor_bpf_run_seconds_total",
                                     {"program": "pnm_tc_egress"}) == 0.25
    assert registry.get_sample_value("podnet_monitor_bpf_runs_total",
                                     {"program": "pnm_tc_egress"}) == 120


def test_unreadable_maps_cost_only_the_probe_families(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web", uid="uid-web")
    maps = FakeMaps(error=OSError(9, "Bad file descriptor"))
    registry, _ = setup(maps, [web], {7: 0})
    assert registry.get_sample_value("podnet_monitor_collect_errors_total") == 1  # one scrape
    assert registry.get_sample_value("podnet_monitor_collect_errors_total") == 2  # another one
    assert series(registry, "podnet_packets_total") == []
    assert series(registry, "podnet_bytes_total") == []
    assert [s["pod"] for s in series(registry, "podnet_pod_info")] == ["web"]
    assert registry.get_sample_value("podnet_monitor_attached_pods") == 1


def test_registering_reads_no_map(make_pod: PodFactory) -> None:
    maps = FakeMaps(error=OSError(9, "Bad file descriptor"))
    setup(maps, [make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")], {7: 0})
    assert maps.reads == []


def test_registering_reads_no_map_and_a_scrape_reads_them(make_pod: PodFactory) -> None:
    maps = FakeMaps()
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex([make_pod(4026532001, [(7, "veth7")])], {7: 2})))
    registry = Registry()
    registry.register(DaemonCollectors(probes=[packets.PROBE], maps=maps, state=state, node="node-1",
                                       kernel=kernel(), node_slot=1024))
    assert maps.reads == []
    registry.render()
    assert maps.reads == [("pnm_packets", 2)]


def test_registering_twice_is_refused() -> None:
    def collector() -> DaemonCollectors:
        return DaemonCollectors(probes=[packets.PROBE], maps=FakeMaps(), state=MonitorState(),
                                node="node-1", kernel=kernel(), node_slot=1024)

    registry = Registry()
    registry.register(collector())
    with pytest.raises(DuplicateSeriesError, match="podnet_packets_total"):
        registry.register(collector())


def test_describe_names_every_family_without_samples(make_pod: PodFactory) -> None:
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex([make_pod(4026532001, [(7, "veth7")])])))
    collector = DaemonCollectors(probes=[packets.PROBE], maps=FakeMaps(), state=state,
                                 node="node-1", kernel=kernel(), node_slot=1024, program_stats=list)
    assert [f.series for f in collector.describe()] == [[]] * 28
    assert [m.name for m in collector.describe()] == [
        "podnet_packets", "podnet_bytes", "podnet_tcp_segments",
        "podnet_packets_before_attach", "podnet_bytes_before_attach",
        "podnet_redirected_packets", "podnet_redirected_bytes", "podnet_pod_info",
        "podnet_monitor_attached_pods",
        "podnet_monitor_attach_errors", "podnet_monitor_reconciles",
        "podnet_monitor_reconcile_seconds", "podnet_monitor_collect_errors",
        "podnet_monitor_build_info", "podnet_monitor_kernel_offsets",
        "podnet_monitor_probe_state", "podnet_monitor_series_dropped", "podnet_monitor_maps",
        "podnet_monitor_netlink_overflows", "podnet_monitor_reattaches",
        "podnet_monitor_api_synced", "podnet_monitor_api_requests", "podnet_monitor_bypassed",
        "podnet_monitor_bpf_run_seconds", "podnet_monitor_bpf_runs",
        "podnet_monitor_scrapes", "podnet_monitor_scrape_seconds",
        "podnet_monitor_lost_events"]


def test_exposition_text(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    registry, _ = setup(FakeMaps({0: counts({(INGRESS, TCP): 10}, {(INGRESS, TCP): 1500})}), [web], {7: 0})
    text = generate_latest(registry).decode()
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex([web], {7: 0}), (status(web),)))
    assert render(DaemonCollectors(
        probes=[packets.PROBE], maps=FakeMaps({0: counts({(INGRESS, TCP): 10}, {(INGRESS, TCP): 1500})}),
        state=state, node="node-1", kernel=kernel(), node_slot=1024, bcc_version="0.26.0")) == text
    assert "# TYPE podnet_packets_total counter" in text
    assert ('podnet_packets_total{direction="ingress",namespace="shop",pod="web",protocol="tcp"} 10.0'
            in text)
    assert ('podnet_bytes_total{direction="ingress",namespace="shop",pod="web",protocol="tcp"} 1500.0'
            in text)


# -- maps helpers ---------------------------------------------------------------------------------

def test_sum_u64_slots_one_word() -> None:
    raw = struct.pack("<4Q", 1, 20, 300, 4000)
    assert struct.unpack("<Q", sum_u64_slots(raw, 8, 4)) == (4321,)


def test_sum_u64_slots_many_words() -> None:
    raw = struct.pack("<6Q", 1, 10, 2, 20, 3, 30)  # three CPUs, two words each
    assert struct.unpack("<2Q", sum_u64_slots(raw, 16, 3)) == (6, 60)


def test_sum_u64_slots_counts_value() -> None:
    size = ctypes.sizeof(Counts)
    per_cpu = [counts({(INGRESS, TCP): n}, {(EGRESS, OTHER): 100 * n}) for n in (1, 2, 3, 4)]
    folded = Counts.from_buffer_copy(sum_u64_slots(b"".join(per_cpu), size, 4))
    assert folded.packets[INGRESS][TCP] == 10
    assert folded.bytes[EGRESS][OTHER] == 1000
    assert folded.packets[EGRESS][TCP] == 0


def test_sum_u64_slots_ignores_cpus_beyond_ncpus() -> None:
    raw = struct.pack("<3Q", 5, 6, 1000)
    assert struct.unpack("<Q", sum_u64_slots(raw, 8, 2)) == (11,)


def test_sum_u64_slots_wraps_like_a_u64() -> None:
    raw = struct.pack("<2Q", 2**64 - 1, 2)
    assert struct.unpack("<Q", sum_u64_slots(raw, 8, 2)) == (1,)


def test_sum_u64_slots_slot_stride_is_rounded_up_to_8() -> None:
    # A 12-byte value occupies a 16-byte slot per CPU; the u64 word is read from each slot start.
    raw = struct.pack("<QIIQII", 5, 0xFFFFFFFF, 0, 7, 0xFFFFFFFF, 0)
    assert struct.unpack_from("<Q", sum_u64_slots(raw, 12, 2)) == (12,)


class U64Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


class Nested(ctypes.Structure):
    _fields_ = [("pair", U64Pair), ("more", ctypes.c_uint64 * 3)]


class Mixed(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_uint32)]


class NestedMixed(ctypes.Structure):
    _fields_ = [("ok", U64Pair), ("bad", Mixed)]


@pytest.mark.parametrize(("kind", "expected"), [
    (ctypes.c_uint64, True), (ctypes.c_uint32, False), (ctypes.c_int32, False),
    (ctypes.c_uint8, False), (ctypes.c_uint64 * 4, True), (ctypes.c_uint32 * 4, False),
    ((ctypes.c_uint64 * 4) * 2, True), (Counts, True), (U64Pair, True), (Nested, True),
    (Mixed, False), (NestedMixed, False),
])
def test_only_u64(kind: type, expected: bool) -> None:
    assert only_u64(kind) is expected


# -- the kernel's facts, probe states, and probes beyond packets ----------------------------------

def collector_over(maps: object, pods: Sequence[Pod], slots: dict[int, int], *,
                   probes: Sequence[object] = (), **kwargs: object) -> CollectorRegistry:
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex(pods, slots), tuple(status(p) for p in pods)))
    return registry_of(DaemonCollectors(probes=list(probes) or [packets.PROBE], maps=maps,  # type: ignore[arg-type]
                                        state=state, **kwargs))  # type: ignore[arg-type]


def test_kernel_offsets_none() -> None:
    registry = collector_over(FakeMaps(), [], {}, node="node-1", node_slot=1024,
                              kernel=no_offsets_kernel())
    assert registry.get_sample_value("podnet_monitor_kernel_offsets", {"source": "none"}) == 1
    assert registry.get_sample_value("podnet_monitor_kernel_offsets", {"source": "btf"}) is None


def test_probe_states_as_given() -> None:
    registry = collector_over(FakeMaps(), [], {}, node="node-1", node_slot=1024,
                              kernel=no_offsets_kernel(),
                              probe_states={"rtt": "off", "packets": "loaded", "drops": "degraded"})
    assert series(registry, "podnet_monitor_probe_state") == [
        {"probe": "drops", "state": "degraded"}, {"probe": "packets", "state": "loaded"},
        {"probe": "rtt", "state": "off"}]


def test_scrape_carries_node_name_and_node_slot(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    maps = DictMaps({retransmits.MAP: {u32(0): u64(3), u32(16): u64(11), u32(17): u64(99)}})
    registry = collector_over(maps, [web], {7: 0}, probes=[retransmits.PROBE], node="worker-3",
                              node_slot=16, kernel=kernel())
    assert registry.get_sample_value("podnet_tcp_retransmits_total",
                                     {"namespace": "shop", "pod": "web"}) == 3
    assert registry.get_sample_value("podnet_tcp_retransmits_total",
                                     {"namespace": "_node", "pod": "worker-3"}) == 11
    assert len(series(registry, "podnet_tcp_retransmits_total")) == 2  # slot 17 is no one's


def test_one_probe_failing_leaves_the_others(make_pod: PodFactory) -> None:
    class Failing(DictMaps):
        def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
            if name == drops.MAP:
                raise OSError(9, "Bad file descriptor")
            return super().items(name)

    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")
    maps = Failing({retransmits.MAP: {u32(0): u64(4)}})
    registry = collector_over(maps, [web], {7: 0}, probes=[drops.PROBE, retransmits.PROBE],
                              node="node-1", node_slot=1024, kernel=kernel())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in registry.collect() for s in m.samples}  # one scrape
    assert samples[("podnet_tcp_retransmits_total", (("namespace", "shop"), ("pod", "web")))] == 4
    assert samples[("podnet_monitor_collect_errors_total", ())] == 1
    assert not [name for name, _ in samples if name.startswith("podnet_drops")]
    # nor its source of lost events: left out, not shown as 0 (a counter reset to Prometheus)
    assert not [labels for name, labels in samples
                if name == "podnet_monitor_lost_events_total" and ("source", "drops") in labels]


def test_describe_of_every_probe_reads_no_map() -> None:
    maps = DictMaps()
    state = MonitorState()
    collector = DaemonCollectors(probes=list(REGISTRY.values()), maps=maps, state=state, node="n",
                                 kernel=kernel(), node_slot=1024)
    names = [m.name for m in collector.describe()]
    assert names[:12] == [
        "podnet_packets", "podnet_bytes", "podnet_tcp_segments", "podnet_peer_packets",
        "podnet_peer_bytes", "podnet_tcp_flags",
        "podnet_tcp_handshake_seconds", "podnet_tcp_connect_failures",
        "podnet_dns_latency_seconds", "podnet_dns_responses", "podnet_dns_queries",
        "podnet_dns_timeouts"]
    assert names[12:16] == ["podnet_dns_name_failures", "podnet_drops",
                            "podnet_monitor_drops_excluded", "podnet_tcp_retransmits"]
    assert names[16] == "podnet_tcp_rtt_seconds"  # trace has no families of its own
    assert names[-1] == "podnet_monitor_lost_events"  # one family, whichever probes lose events
    assert len(names) == len(set(names))  # no family twice
    assert maps.log == []


# -- pod labels, the series cap and the API's families ---------------------------------------------

def labelled(netns: int, ifindex: int, name: str, labels: dict[str, str], uid: str = "") -> Pod:
    meta = PodMeta("shop", name, uid=uid, labels=tuple(sorted(labels.items())), workload="web",
                   workload_kind="Deployment")
    return identify(PodNetwork(netns, f"/proc/{netns % 1000}/ns/net"), [HostVeth(ifindex, f"veth{ifindex}")],
                    meta)


def registry_with(pods: Sequence[Pod], slots: dict[int, int] | None = None, *, maps: object = None,
                  state: MonitorState | None = None, **kwargs: object) -> CollectorRegistry:
    state = state or MonitorState()
    state.publish(Snapshot(IdentityIndex(pods, slots), tuple(status(p) for p in pods)))
    return registry_of(DaemonCollectors(probes=[packets.PROBE], maps=maps or FakeMaps(), state=state,  # type: ignore[arg-type]
                                        node="node-1", kernel=kernel(), node_slot=1024, **kwargs),  # type: ignore[arg-type]
                       auto_describe=True)


@pytest.mark.parametrize(("key", "name"), [
    ("app", "label_app"), ("app.kubernetes.io/name", "label_app_kubernetes_io_name"),
    ("pod-template-hash", "label_pod_template_hash"), ("Team_1", "label_Team_1"),
    ("example.com/ünïcode", "label_example_com__n_code"),
])
def test_label_name(key: str, name: str) -> None:
    assert label_name(key) == name


def test_pod_info_carries_the_allowed_labels() -> None:
    web = labelled(4026532001, 7, "web-1", {"app": "web", "app.kubernetes.io/name": "shop-web",
                                            "secret": "x"}, uid="uid-web")
    registry = registry_with([web], pod_labels=["app.kubernetes.io/name", "app", "team"])
    assert series(registry, "podnet_pod_info") == [{
        "namespace": "shop", "pod": "web-1", "uid": "uid-web", "netns": "4026532001",
        "interface": "veth7", "node": "node-1", "workload": "web", "workload_kind": "Deployment",
        "label_app_kubernetes_io_name": "shop-web", "label_app": "web", "label_team": ""}]


def test_pod_info_without_an_allow_list_has_no_label_columns() -> None:
    web = labelled(4026532001, 7, "web-1", {"app": "web"})
    registry = registry_with([web])
    (labels,) = series(registry, "podnet_pod_info")
    assert not [k for k in labels if k.startswith("label_")]


def test_folded_pods_share_one_overflow_pod_info(make_pod: PodFactory) -> None:
    web = make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web", uid="uid-web")
    many = [fold(make_pod(4026532002 + i, [(8 + i, f"veth{8 + i}")], namespace="shop", name=f"p{i}",
                          uid=f"uid-{i}")) for i in range(3)]
    maps = FakeMaps({0: counts({(INGRESS, TCP): 1}, {(INGRESS, TCP): 100}),
                     1: counts({(INGRESS, TCP): 2}, {(INGRESS, TCP): 200}),
                     2: counts({(INGRESS, TCP): 4}, {(INGRESS, TCP): 400}),
                     3: counts({(INGRESS, TCP): 8}, {(INGRESS, TCP): 800})})
    registry = registry_with([web, *many], {7: 0, 8: 1, 9: 2, 10: 3}, maps=maps, pod_labels=["app"])
    info = series(registry, "podnet_pod_info")
    assert sorted((i["namespace"], i["pod"]) for i in info) == [(OVERFLOW, OVERFLOW), ("shop", "web")]
    overflow = next(i for i in info if i["namespace"] == OVERFLOW)
    assert overflow == {"namespace": OVERFLOW, "pod": OVERFLOW, "uid": "", "netns": "", "interface": "",
                        "node": "node-1", "workload": "", "workload_kind": "", "label_app": ""}
    # their traffic is counted, under the one overflow identity
    assert value(registry, "podnet_packets_total", (OVERFLOW, OVERFLOW), "ingress", "tcp") == 14
    assert value(registry, "podnet_packets_total", ("shop", "web"), "ingress", "tcp") == 1
    assert {s["pod"] for s in series(registry, "podnet_packets_total")} == {"web", OVERFLOW}


def test_no_overflow_pod_info_without_folded_pods(make_pod: PodFactory) -> None:
    registry = registry_with([make_pod(4026532001, [(7, "veth7")], namespace="shop", name="web")])
    assert [i["pod"] for i in series(registry, "podnet_pod_info")] == ["web"]


def test_series_dropped_counter() -> None:
    state = MonitorState()
    registry = registry_with([], state=state)
    assert registry.get_sample_value("podnet_monitor_series_dropped_total") == 0
    for _ in range(3):
        state.count_series_dropped()
    assert registry.get_sample_value("podnet_monitor_series_dropped_total") == 3


def test_api_families_only_with_api_stats() -> None:
    text = generate_latest(registry_with([])).decode()
    assert "podnet_monitor_api" not in text
    assert "podnet_monitor_api" not in render(DaemonCollectors(
        probes=[packets.PROBE], maps=FakeMaps(), state=MonitorState(), node="node-1",
        kernel=kernel(), node_slot=1024))
    stats = {"synced": 1.0, "list": 2, "watch": 7, "error": 3}
    registry = registry_with([], api_stats=lambda: stats)
    assert registry.get_sample_value("podnet_monitor_api_synced") == 1
    assert registry.get_sample_value("podnet_monitor_api_requests_total", {"kind": "list"}) == 2
    assert registry.get_sample_value("podnet_monitor_api_requests_total", {"kind": "watch"}) == 7
    assert registry.get_sample_value("podnet_monitor_api_requests_total", {"kind": "error"}) == 3
    stats.update(synced=0.0, error=4)  # read afresh at every scrape
    assert registry.get_sample_value("podnet_monitor_api_synced") == 0
    assert registry.get_sample_value("podnet_monitor_api_requests_total", {"kind": "error"}) == 4
    assert series(registry, "podnet_monitor_api_requests_total") == [
        {"kind": "list"}, {"kind": "watch"}, {"kind": "error"}]


def test_api_families_default_missing_stats_to_zero() -> None:
    registry = registry_with([], api_stats=dict)
    assert registry.get_sample_value("podnet_monitor_api_synced") == 0
    assert registry.get_sample_value("podnet_monitor_api_requests_total", {"kind": "watch"}) == 0


# -- podnet_monitor_lost_events_total: every probe's `lost` hook and the state's, merged ----------

def lost_values(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["source"]: s.value for m in registry.collect() for s in m.samples
            if s.name == "podnet_monitor_lost_events_total"}


def test_lost_events_merge_the_drop_map_and_the_traces() -> None:
    state = MonitorState()
    maps = DictMaps({drops.LOST: {u32(0): u64(9)}})
    registry = registry_of(DaemonCollectors(probes=[drops.PROBE], maps=maps, state=state, node="node-1",
                                            kernel=kernel(), node_slot=1024))
    # every source is there from the start, at 0: a rate() needs the series before the first loss
    assert lost_values(registry) == {"capture": 0, "drop_events": 0, "drops": 9}
    state.count_lost("capture", 5)  # the trace perf buffers' lost callbacks (CaptureManager on_lost)
    state.count_lost("capture", 2)
    state.count_lost("drop_events", 1)
    maps.maps[drops.LOST][u32(0)] = u64(11)
    assert lost_values(registry) == {"capture": 7, "drop_events": 1, "drops": 11}
    assert len([m for m in registry.collect() if m.name == "podnet_monitor_lost_events"]) == 1


def test_lost_events_of_the_same_source_are_added() -> None:
    def lost_too(_scrape: Scrape) -> dict[str, int]:
        return {"drops": 4, "other": 2}

    other = dataclasses.replace(retransmits.PROBE, name="other", lost=lost_too)
    state = MonitorState()
    state.count_lost("other", 3)
    registry = registry_of(DaemonCollectors(probes=[drops.PROBE, other],
                                            maps=DictMaps({drops.LOST: {u32(0): u64(9)}}),
                                            state=state, node="node-1", kernel=kernel(), node_slot=1024))
    assert lost_values(registry) == {"capture": 0, "drop_events": 0, "drops": 13, "other": 5}


def test_lost_events_without_the_drops_probe() -> None:
    # the daemon's own sources are always there; a probe's only with the probe
    registry = collector_over(FakeMaps(), [], {}, node="node-1", node_slot=1024, kernel=kernel())
    assert lost_values(registry) == {"capture": 0, "drop_events": 0}


def test_an_unreadable_drop_map_does_not_reset_the_lost_counter() -> None:
    class Flaky(DictMaps):
        broken = False

        def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
            if self.broken and name == drops.MAP:
                raise OSError(9, "Bad file descriptor")
            return super().items(name)

    maps = Flaky({drops.LOST: {u32(0): u64(9)}})
    registry = registry_of(DaemonCollectors(probes=[drops.PROBE], maps=maps, state=MonitorState(),
                                            node="node-1", kernel=kernel(), node_slot=1024))
    assert lost_values(registry)["drops"] == 9
    maps.broken = True
    assert lost_values(registry) == {"capture": 0, "drop_events": 0}  # absent for that scrape
    maps.broken = False
    assert lost_values(registry)["drops"] == 9


def test_maps_state_says_where_counters_started(make_pod: PodFactory) -> None:
    state = MonitorState()
    collector = DaemonCollectors(probes=[packets.PROBE], maps=FakeMaps(), state=state,
                                 node="node-1", kernel=kernel(), node_slot=1024)
    for where in ("adopted", "fresh", "reset", "unpinned"):
        state.maps_states = {"core": "adopted", "packets": where}
        family = next(f for f in collector.collect() if f.name == "podnet_monitor_maps")
        assert [labels for labels, _ in family.series] == [("core", "adopted"),
                                                          ("packets", where)]


def test_one_scrape_reads_one_identity_snapshot(make_pod: PodFactory) -> None:
    # The reconciler publishes a new snapshot at any moment; a scrape that read a pod's
    # counters under one and its pod_info under the next paired a name's new pod (pod_info)
    # with its gone namesake's counts, which then went "down" at the next scrape (issue 14)
    old = make_pod(4026532001, [(7, "veth7")], namespace="lab", name="pod-4", uid="old")
    new = make_pod(4026532001, [(8, "veth8")], namespace="lab", name="pod-4", uid="new")
    state = MonitorState()
    state.publish(Snapshot(IdentityIndex([old], {7: 0})))

    class Swapping(FakeMaps):
        def lookup_slots(self, name: str, slots: Sequence[int]) -> list[bytes | None]:
            state.publish(Snapshot(IdentityIndex([new], {8: 1})))  # mid-scrape
            return super().lookup_slots(name, slots)

    maps = Swapping({0: counts({(EGRESS, TCP): 5}, {}), 1: counts({}, {})})
    text = render(DaemonCollectors(probes=[packets.PROBE], maps=maps, state=state, node="n",
                                   kernel=kernel(), node_slot=1024))
    assert 'uid="old"' in text and 'uid="new"' not in text  # pod_info of the counted pod


def test_a_scrapes_lost_events_are_its_own_threads() -> None:
    """Scrapes run side by side in the HTTP workers: the monitor's collector exposes the
    lost events the pod collector read in the same scrape, not another thread's."""
    readings = ProbeReadings()
    readings.start()
    readings.add_lost({"drops": 9})
    seen: list[dict[str, int]] = []
    other = threading.Thread(target=lambda: seen.append(readings.lost()))
    other.start()
    other.join()
    assert seen == [{}]
    assert readings.lost() == {"drops": 9}
    readings.start()  # the next scrape in this thread: none until its probes are read
    assert readings.lost() == {}
