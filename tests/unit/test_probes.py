"""Each probe's collector over fake maps holding its C structs, its sweep, and drops' forget.

Values are built with the probes' ctypes structures (which mirror bpf/*.c) and read back
through a prometheus_client registry (fakes.registry_of converts the families), so names,
labels, le strings, _sum and _count are what Prometheus would scrape.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from monitor.exposition import render
from monitor.identity import IdentityIndex, Pod
from monitor.kernel.kernelinfo import KernelInfo
from monitor.probes import dns, drops, handshake, retransmits, rtt, tcpflags
from monitor.probes.base import LE as BOUNDS
from monitor.probes.base import TIMED_OUT, HistogramSum, Scrape, Sweep
from monitor.probes.dns import Dns, Query
from monitor.probes.drops import DropKey
from monitor.probes.handshake import Flow, Handshake, Timeouts
from monitor.probes.rtt import Hist
from monitor.probes.tcpflags import Flags
from monitor.scrapeformat import TEXT
from tests.unit.fakes import DictMaps, kernel, registry_of, u32, u64

PodFactory = Callable[..., Pod]
NODE_SLOT = 1024
NODE = "worker-1"

# le of the 27 finite buckets, 2^i us in seconds, as the exposition shows them; then +Inf
LE = ["1e-06", "2e-06", "4e-06", "8e-06", "1.6e-05", "3.2e-05", "6.4e-05", "0.000128", "0.000256",
      "0.000512", "0.001024", "0.002048", "0.004096", "0.008192", "0.016384", "0.032768",
      "0.065536", "0.131072", "0.262144", "0.524288", "1.048576", "2.097152", "4.194304",
      "8.388608", "16.777216", "33.554432", "67.108864", "+Inf"]

NS_WEB, NS_DB, NS_CACHE = 4026532001, 4026532002, 4026532003


@pytest.fixture
def pods(make_pod: PodFactory) -> tuple[list[Pod], dict[int, int]]:
    """web has two interfaces (slots 0 and 2), db one (slot 1); ifindex -> slot as SlotTable gives."""
    web = make_pod(NS_WEB, [(7, "veth7"), (9, "veth9")], namespace="shop", name="web")
    db = make_pod(NS_DB, [(8, "veth8")], namespace="shop", name="db")
    return [web, db], {7: 0, 8: 1, 9: 2}


def scrape(maps: DictMaps, pods: tuple[list[Pod], dict[int, int]],
           k: KernelInfo | None = None) -> Scrape:
    return Scrape(maps, IdentityIndex(pods[0], pods[1]), k or kernel(), NODE, NODE_SLOT)


def registry(collect: Callable[[Scrape], object], s: Scrape) -> CollectorRegistry:
    return registry_of(lambda: collect(s))


def series(reg: CollectorRegistry, sample: str) -> list[dict[str, str]]:
    return [s.labels for m in reg.collect() for s in m.samples if s.name == sample]


def buckets(reg: CollectorRegistry, name: str, labels: dict[str, str]) -> list[float | None]:
    return [reg.get_sample_value(f"{name}_bucket", {**labels, "le": le}) for le in LE]


def cumulative(counts: dict[int, int]) -> list[float]:
    """The expected cumulative bucket values for kernel buckets {index: count}."""
    out, total = [], 0
    for i in range(28):
        total += counts.get(i, 0)
        out.append(float(total))
    return out


WEB = {"namespace": "shop", "pod": "web"}
DB = {"namespace": "shop", "pod": "db"}
NODE_LABELS = {"namespace": "_node", "pod": NODE}


# -- the kernel's histograms as Prometheus buckets -----------------------------------------------

def test_le_bounds() -> None:
    assert list(BOUNDS) == LE
    assert [float(le) for le in BOUNDS[:-1]] == [2**i * 1e-6 for i in range(27)]


def test_histogram_sum_buckets_are_cumulative() -> None:
    counts = [0] * 28
    counts[0], counts[3], counts[26], counts[27] = 1, 2, 4, 8
    hist = HistogramSum()
    hist.add(("shop", "web"), counts, 1_500_000)
    hist.add(("shop", "web"), [1] * 28, 500_000)  # a second interface of the same pod
    text = render([hist.family("unit_seconds", "Doc.", ["namespace", "pod"])], TEXT).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[0] == 'unit_seconds_bucket{le="1e-06",namespace="shop",pod="web"} 2.0'
    assert lines[2] == 'unit_seconds_bucket{le="4e-06",namespace="shop",pod="web"} 4.0'
    assert lines[3] == 'unit_seconds_bucket{le="8e-06",namespace="shop",pod="web"} 7.0'
    assert lines[26] == 'unit_seconds_bucket{le="67.108864",namespace="shop",pod="web"} 34.0'
    assert lines[27] == 'unit_seconds_bucket{le="+Inf",namespace="shop",pod="web"} 43.0'
    assert lines[28:] == ['unit_seconds_count{namespace="shop",pod="web"} 43.0',
                          'unit_seconds_sum{namespace="shop",pod="web"} 2.0']


# -- tcpflags -------------------------------------------------------------------------------------

def flags(counts: dict[tuple[int, int], int]) -> bytes:
    """{(direction, flag): n}: direction 0 ingress, 1 egress; flag syn, synack, rst, fin."""
    f = Flags()
    for (d, i), n in counts.items():
        f.count[d][i] = n
    return bytes(f)


def test_tcpflags_per_direction_summed_over_a_pods_slots(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({tcpflags.MAP: {
        u32(0): flags({(0, 0): 2, (0, 2): 1, (1, 1): 3, (1, 3): 4}),
        u32(2): flags({(0, 0): 5, (1, 3): 1}),
        u32(1): flags({}),
        u32(NODE_SLOT): flags({(0, 0): 1000}),  # no node series for TC probes
    }})
    reg = registry(tcpflags.collect, scrape(maps, pods))
    expected = {("ingress", "syn"): 7, ("ingress", "synack"): 0, ("ingress", "rst"): 1,
                ("ingress", "fin"): 0, ("egress", "syn"): 0, ("egress", "synack"): 3,
                ("egress", "rst"): 0, ("egress", "fin"): 5}
    for (direction, flag), n in expected.items():
        labels = {**WEB, "direction": direction, "flag": flag}
        assert reg.get_sample_value("podnet_tcp_flags_total", labels) == n
        assert reg.get_sample_value("podnet_tcp_flags_total", {**labels, **DB}) == 0
    got = series(reg, "podnet_tcp_flags_total")
    assert len(got) == 16
    assert {s["pod"] for s in got} == {"web", "db"}


def test_tcpflags_slot_without_value_has_no_series(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({tcpflags.MAP: {u32(1): flags({(1, 2): 9})}})
    reg = registry(tcpflags.collect, scrape(maps, pods))
    assert {s["pod"] for s in series(reg, "podnet_tcp_flags_total")} == {"db"}
    assert reg.get_sample_value("podnet_tcp_flags_total",
                                {**DB, "direction": "egress", "flag": "rst"}) == 9


# -- handshake ------------------------------------------------------------------------------------

def hs(client: dict[int, int] | None = None, server: dict[int, int] | None = None, *,
       sum_us: tuple[int, int] = (0, 0), resets: tuple[int, int] = (0, 0)) -> bytes:
    h = Handshake()
    for role, counts in enumerate((client or {}, server or {})):
        for i, n in counts.items():
            h.buckets[role][i] = n
        h.count[role] = sum(counts.values())
        h.sum_us[role] = sum_us[role]
        h.resets[role] = resets[role]
    return bytes(h)


def hs_timeouts(client: int, server: int) -> bytes:
    t = Timeouts()
    t.count[0], t.count[1] = client, server
    return bytes(t)


def test_handshake(pods: tuple[list[Pod], dict[int, int]], make_pod: PodFactory) -> None:
    cache = make_pod(NS_CACHE, [(11, "veth11")], namespace="shop", name="cache")
    maps = DictMaps({
        handshake.MAP: {
            u32(0): hs({0: 1, 3: 2, 10: 4}, {27: 1}, sum_us=(5000, 100_000_000), resets=(2, 1)),
            u32(2): hs({3: 1}, sum_us=(6, 0), resets=(1, 0)),
            u32(1): hs(None, {5: 2}, sum_us=(0, 50)),
            u32(3): hs({0: 9}, sum_us=(9, 0)),  # cache: no timeouts value, so no series
        },
        handshake.TIMEOUTS: {u32(0): hs_timeouts(3, 0), u32(2): hs_timeouts(1, 4),
                             u32(1): hs_timeouts(0, 0)},
    })
    s = Scrape(maps, IdentityIndex([*pods[0], cache], {**pods[1], 11: 3}), kernel(), NODE, NODE_SLOT)
    reg = registry(handshake.collect, s)
    name = "podnet_tcp_handshake_seconds"
    web_client, web_server = {**WEB, "role": "client"}, {**WEB, "role": "server"}
    assert buckets(reg, name, web_client) == cumulative({0: 1, 3: 3, 10: 4})
    assert reg.get_sample_value(f"{name}_bucket", {**web_client, "le": "8e-06"}) == 4
    assert reg.get_sample_value(f"{name}_bucket", {**web_client, "le": "0.001024"}) == 8
    assert reg.get_sample_value(f"{name}_bucket", {**web_client, "le": "+Inf"}) == 8
    assert reg.get_sample_value(f"{name}_count", web_client) == 8
    assert reg.get_sample_value(f"{name}_sum", web_client) == pytest.approx(0.005006)
    assert buckets(reg, name, web_server) == [0.0] * 27 + [1.0]  # beyond 2^26 us: +Inf only
    assert reg.get_sample_value(f"{name}_sum", web_server) == pytest.approx(100.0)
    assert reg.get_sample_value(f"{name}_count", web_server) == 1
    db_server = {**DB, "role": "server"}
    assert reg.get_sample_value(f"{name}_bucket", {**db_server, "le": "1.6e-05"}) == 0
    assert reg.get_sample_value(f"{name}_bucket", {**db_server, "le": "3.2e-05"}) == 2
    assert reg.get_sample_value(f"{name}_count", {**DB, "role": "client"}) == 0
    assert {(s["pod"], s["role"]) for s in series(reg, f"{name}_count")} == {
        ("web", "client"), ("web", "server"), ("db", "client"), ("db", "server")}

    failures = "podnet_tcp_connect_failures_total"
    assert reg.get_sample_value(failures, {**web_client, "reason": "reset"}) == 3
    assert reg.get_sample_value(failures, {**web_client, "reason": "timeout"}) == 4
    assert reg.get_sample_value(failures, {**web_server, "reason": "reset"}) == 1
    assert reg.get_sample_value(failures, {**web_server, "reason": "timeout"}) == 4
    assert reg.get_sample_value(failures, {**db_server, "reason": "timeout"}) == 0
    assert len(series(reg, failures)) == 8
    assert "cache" not in {s.labels["pod"] for m in reg.collect() for s in m.samples}


def test_handshake_reads_only_pod_slots(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({handshake.MAP: {u32(NODE_SLOT): hs({0: 1})},
                     handshake.TIMEOUTS: {u32(NODE_SLOT): hs_timeouts(1, 1)}})
    reg = registry(handshake.collect, scrape(maps, pods))
    assert [s for m in reg.collect() for s in m.samples] == []
    assert maps.slots_read(handshake.MAP) == [0, 1, 2]  # by ifindex: 7, 8, 9
    assert maps.slots_read(handshake.TIMEOUTS) == [0, 1, 2]
    assert [op for op in maps.log if op[0] == "lookup"] == []  # one batch read a map, no more


# -- dns ------------------------------------------------------------------------------------------

def dns_value(counts: dict[int, int], *, sum_us: int, queries: int, rcodes: dict[int, int]) -> bytes:
    d = Dns()
    for i, n in counts.items():
        d.buckets[i] = n
    d.sum_us, d.count, d.queries = sum_us, sum(counts.values()), queries
    for code, n in rcodes.items():
        d.rcodes[code] = n
    return bytes(d)


def test_dns(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({
        dns.MAP: {u32(0): dns_value({1: 3}, sum_us=5, queries=10, rcodes={0: 2, 3: 1}),
                  u32(2): dns_value({12: 1}, sum_us=3000, queries=4, rcodes={0: 1, 5: 1, 11: 2}),
                  u32(1): dns_value({}, sum_us=0, queries=0, rcodes={})},
        dns.TIMEOUTS: {u32(0): u64(2), u32(2): u64(1), u32(1): u64(0)},
    })
    reg = registry(dns.collect, scrape(maps, pods))
    name = "podnet_dns_latency_seconds"
    assert buckets(reg, name, WEB) == cumulative({1: 3, 12: 1})
    assert reg.get_sample_value(f"{name}_bucket", {**WEB, "le": "2e-06"}) == 3
    assert reg.get_sample_value(f"{name}_bucket", {**WEB, "le": "0.002048"}) == 3
    assert reg.get_sample_value(f"{name}_bucket", {**WEB, "le": "0.004096"}) == 4
    assert reg.get_sample_value(f"{name}_count", WEB) == 4
    assert reg.get_sample_value(f"{name}_sum", WEB) == pytest.approx(0.003005)

    responses = "podnet_dns_responses_total"
    web_rcodes = {s["rcode"]: reg.get_sample_value(responses, s)
                  for s in series(reg, responses) if s["pod"] == "web"}
    assert web_rcodes == {"NOERROR": 3, "SERVFAIL": 0, "NXDOMAIN": 1, "REFUSED": 1, "RCODE11": 2}
    db_rcodes = {s["rcode"] for s in series(reg, responses) if s["pod"] == "db"}
    assert db_rcodes == {"NOERROR", "SERVFAIL", "NXDOMAIN"}  # the usual three, even at zero
    assert reg.get_sample_value("podnet_dns_queries_total", WEB) == 14
    assert reg.get_sample_value("podnet_dns_queries_total", DB) == 0
    assert reg.get_sample_value("podnet_dns_timeouts_total", WEB) == 3
    assert reg.get_sample_value("podnet_dns_timeouts_total", DB) == 0


@pytest.mark.parametrize(("code", "name"), [
    (0, "NOERROR"), (1, "FORMERR"), (2, "SERVFAIL"), (3, "NXDOMAIN"), (4, "NOTIMP"),
    (5, "REFUSED"), (6, "YXDOMAIN"), (7, "YXRRSET"), (8, "NXRRSET"), (9, "NOTAUTH"),
    (10, "NOTZONE"), (11, "RCODE11"), (15, "RCODE15")])
def test_rcode_names(code: int, name: str) -> None:
    assert dns.rcode_name(code) == name


def test_dns_slot_without_timeouts_value_is_skipped(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({dns.MAP: {u32(0): dns_value({0: 1}, sum_us=1, queries=1, rcodes={0: 1})}})
    reg = registry(dns.collect, scrape(maps, pods))
    assert [s for m in reg.collect() for s in m.samples] == []


# -- drops ----------------------------------------------------------------------------------------

def drop_key(kind: int, id_: int, reason: int) -> bytes:
    return bytes(DropKey(id=id_, reason=reason, kind=kind))


REASONS = {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 77: "TC_INGRESS"}


def test_drops_by_owner_and_reason(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({
        drops.MAP: {
            drop_key(0, 0, 2): u64(5),
            drop_key(0, 0, 3): u64(1),
            drop_key(1, NS_WEB, 3): u64(10),
            drop_key(2, 7, 3): u64(4),  # web's host veth
            drop_key(2, 9, 3): u64(2),  # web's other host veth
            drop_key(1, NS_DB, 77): u64(6),
            drop_key(1, 4026539999, 3): u64(20),  # a netns of no pod
            drop_key(2, 55, 2): u64(7),  # an ifindex of no pod
            drop_key(1, NS_WEB, 200): u64(1),  # a reason the kernel did not name
        },
        drops.LOST: {u32(0): u64(9)},
    })
    sc = scrape(maps, pods, kernel(drop_reasons=REASONS))
    reg = registry(drops.collect, sc)
    name = "podnet_drops_total"
    got = {(s["namespace"], s["pod"], s["reason"]): reg.get_sample_value(name, s)
           for s in series(reg, name)}
    assert got == {
        ("_node", NODE, "NOT_SPECIFIED"): 12,
        ("_node", NODE, "NO_SOCKET"): 21,
        ("shop", "web", "NO_SOCKET"): 16,
        ("shop", "web", "REASON_200"): 1,
        ("shop", "db", "TC_INGRESS"): 6,
    }
    # The lost drops are the probe's `lost` hook now; the collector merges every probe's
    # into one podnet_monitor_lost_events_total family (test_collector.py).
    assert series(reg, "podnet_monitor_lost_events_total") == []
    assert drops.PROBE.lost is drops.lost
    assert drops.lost(sc) == {"drops": 9}


def test_drops_without_pods_all_count_under_the_node() -> None:
    maps = DictMaps({drops.MAP: {drop_key(1, NS_WEB, 3): u64(2), drop_key(2, 7, 3): u64(3)}})
    sc = scrape(maps, ([], {}), kernel(drop_reasons=REASONS))
    reg = registry(drops.collect, sc)
    assert series(reg, "podnet_drops_total") == [{**NODE_LABELS, "reason": "NO_SOCKET"}]
    assert reg.get_sample_value("podnet_drops_total", {**NODE_LABELS, "reason": "NO_SOCKET"}) == 5
    assert drops.lost(sc) == {"drops": 0}  # no element in the lost map yet: none lost
    assert ("lookup", drops.LOST, u32(0)) in maps.log


def test_drops_of_a_pod_without_a_slot_are_still_the_pods(make_pod: PodFactory) -> None:
    web = make_pod(NS_WEB, [(7, "veth7")], namespace="shop", name="web")
    maps = DictMaps({drops.MAP: {drop_key(1, NS_WEB, 3): u64(2)}})
    s = Scrape(maps, IdentityIndex([web], {}), kernel(drop_reasons=REASONS), NODE, NODE_SLOT)
    reg = registry(drops.collect, s)
    assert reg.get_sample_value("podnet_drops_total", {**WEB, "reason": "NO_SOCKET"}) == 2


def test_drops_forget_only_the_given_netns_and_ifindexes() -> None:
    keep = {drop_key(1, NS_DB, 3): u64(1), drop_key(2, 8, 3): u64(2), drop_key(0, 0, 3): u64(3),
            drop_key(1, 7, 3): u64(4),  # a netns inode equal to a forgotten ifindex: kind differs
            drop_key(2, NS_WEB, 3): u64(5)}  # likewise the other way round
    gone = {drop_key(1, NS_WEB, 3): u64(6), drop_key(1, NS_WEB, 77): u64(7),
            drop_key(2, 7, 3): u64(8), drop_key(2, 9, 2): u64(9), drop_key(2, 9, 3): u64(10)}
    maps = DictMaps({drops.MAP: {**keep, **gone}, drops.LOST: {u32(0): u64(1)}})
    drops.forget(maps, NS_WEB, [7, 9])
    assert maps.maps[drops.MAP] == keep
    assert sorted(op[2] for op in maps.writes()) == sorted(gone)
    assert all(op[0] == "delete" and op[1] == drops.MAP for op in maps.writes())
    assert maps.maps[drops.LOST] == {u32(0): u64(1)}


def test_drops_forget_with_no_interfaces() -> None:
    maps = DictMaps({drops.MAP: {drop_key(1, NS_WEB, 3): u64(6), drop_key(2, 7, 3): u64(8)}})
    drops.forget(maps, NS_WEB, [])
    assert maps.maps[drops.MAP] == {drop_key(2, 7, 3): u64(8)}


def test_drops_prune_keeps_live_pods_and_the_node() -> None:
    live = {drop_key(1, NS_WEB, 3): u64(1), drop_key(2, 7, 3): u64(2), drop_key(0, 0, 3): u64(3)}
    gone = {drop_key(1, NS_DB, 3): u64(4), drop_key(2, 9, 3): u64(5),
            drop_key(1, 7, 3): u64(6)}  # the live ifindex's number as a netns: not live
    maps = DictMaps({drops.MAP: {**live, **gone}})
    drops.prune(maps, {NS_WEB}, {7})
    assert maps.maps[drops.MAP] == live


def test_drops_cflags() -> None:
    with_rx_sk = kernel(tracepoints={"skb:kfree_skb": {"skbaddr", "reason", "rx_sk"}})
    without = kernel(tracepoints={"skb:kfree_skb": {"skbaddr", "reason"}})
    assert drops.cflags(with_rx_sk) == ["-DPNM_HAVE_RX_SK"]
    assert drops.cflags(without) == []


def test_drops_cflags_give_the_reasons_it_tells_apart_by_this_kernels_values() -> None:
    # values differ between kernels: 6.18 has PACKET_SOCK_ERROR at 84, 5.17 has none
    tp = {"skb:kfree_skb": {"skbaddr", "reason"}}
    new = kernel(tracepoints=tp, drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET",
                                               84: "PACKET_SOCK_ERROR"})
    old = kernel(tracepoints=tp, drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"})
    assert drops.cflags(new) == ["-DPNM_REASON_NO_SOCKET=3", "-DPNM_REASON_PACKET_SOCK_ERROR=84",
                                 "-DPNM_REASON_NOT_SPECIFIED=2"]
    assert drops.cflags(old) == ["-DPNM_REASON_NO_SOCKET=3", "-DPNM_REASON_NOT_SPECIFIED=2"]


# -- retransmits and rtt: pods and the node ---------------------------------------------------------

def test_retransmits_per_pod_and_node(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({retransmits.MAP: {u32(0): u64(3), u32(2): u64(4), u32(1): u64(0),
                                       u32(NODE_SLOT): u64(11), u32(5): u64(99)}})
    reg = registry(retransmits.collect, scrape(maps, pods))
    name = "podnet_tcp_retransmits_total"
    assert reg.get_sample_value(name, WEB) == 7
    assert reg.get_sample_value(name, DB) == 0
    assert reg.get_sample_value(name, NODE_LABELS) == 11
    assert len(series(reg, name)) == 3


def test_retransmits_node_series_without_pods() -> None:
    maps = DictMaps({retransmits.MAP: {u32(NODE_SLOT): u64(2)}})
    reg = registry(retransmits.collect, scrape(maps, ([], {})))
    assert series(reg, "podnet_tcp_retransmits_total") == [NODE_LABELS]


def test_retransmits_cflags() -> None:
    assert retransmits.cflags(kernel(tracepoints={"tcp:tcp_retransmit_skb": {"skaddr", "err"}})) \
        == ["-DPNM_RETRANS_HAS_ERR"]
    assert retransmits.cflags(kernel(tracepoints={"tcp:tcp_retransmit_skb": {"skaddr"}})) == []
    assert retransmits.cflags(kernel()) == []


def hist(counts: dict[int, int], sum_us: int) -> bytes:
    h = Hist()
    for i, n in counts.items():
        h.buckets[i] = n
    h.sum_us, h.count = sum_us, sum(counts.values())
    return bytes(h)


def test_rtt_per_pod_and_node(pods: tuple[list[Pod], dict[int, int]]) -> None:
    maps = DictMaps({rtt.MAP: {u32(0): hist({4: 1}, 10), u32(2): hist({4: 1, 6: 1}, 70),
                               u32(NODE_SLOT): hist({20: 2}, 2_000_000)}})
    reg = registry(rtt.collect, scrape(maps, pods))
    name = "podnet_tcp_rtt_seconds"
    assert buckets(reg, name, WEB) == cumulative({4: 2, 6: 1})
    assert reg.get_sample_value(f"{name}_bucket", {**WEB, "le": "1.6e-05"}) == 2
    assert reg.get_sample_value(f"{name}_bucket", {**WEB, "le": "6.4e-05"}) == 3
    assert reg.get_sample_value(f"{name}_sum", WEB) == pytest.approx(8e-05)
    assert reg.get_sample_value(f"{name}_count", WEB) == 3
    assert reg.get_sample_value(f"{name}_bucket", {**NODE_LABELS, "le": "0.524288"}) == 0
    assert reg.get_sample_value(f"{name}_bucket", {**NODE_LABELS, "le": "1.048576"}) == 2
    assert reg.get_sample_value(f"{name}_sum", NODE_LABELS) == pytest.approx(2.0)
    assert reg.get_sample_value(f"{name}_count", DB) is None  # db's slot has no value
    assert {s["pod"] for s in series(reg, f"{name}_count")} == {"web", NODE}


# -- sweeps ---------------------------------------------------------------------------------------

NOW = 1_000_000_000_000  # ns: 1000 s of CLOCK_MONOTONIC
S = 1_000_000_000


def flow(slot: int, role: int, lport: int) -> bytes:
    f = Flow(slot=slot, family=4, role=role, lport=lport, rport=443)
    f.laddr[:4] = [10, 0, 0, 7]
    f.raddr[:4] = [10, 0, 0, 1]
    return bytes(f)


def timeouts_of(maps: DictMaps, slot: int) -> tuple[int, int]:
    t = Timeouts.from_buffer_copy(maps.maps[handshake.TIMEOUTS][u32(slot)])
    return t.count[0], t.count[1]


def test_handshake_sweep() -> None:
    a, b, c = flow(1, 0, 40001), flow(1, 0, 40002), flow(1, 1, 8080)
    d, e, f, h = flow(2, 0, 40003), flow(2, 0, 40004), flow(2, 1, 8081), flow(2, 0, 40005)
    pending = {a: u64(NOW - 6 * S), b: u64(NOW - 10 * S), c: u64(NOW - 7 * S),
               d: u64(NOW - 4 * S),  # young
               e: u64(TIMED_OUT | (NOW - 100 * S)),  # marked, kept for its retries
               f: u64(TIMED_OUT | (NOW - 136 * S)),  # marked, past 5 + 130 s: deleted
               h: u64(NOW - 5 * S)}  # exactly the timeout: not yet
    maps = DictMaps({handshake.PENDING: pending,
                     handshake.TIMEOUTS: {u32(1): hs_timeouts(3, 0), u32(2): hs_timeouts(0, 7)}})
    timeouts = {"tcp_connect_timeout": 5.0, "dns_timeout": 1.0}

    handshake.sweep(Sweep(maps, NOW, timeouts))
    assert timeouts_of(maps, 1) == (5, 1)
    assert timeouts_of(maps, 2) == (0, 7)
    assert maps.maps[handshake.PENDING] == {
        a: u64(TIMED_OUT | (NOW - 6 * S)), b: u64(TIMED_OUT | (NOW - 10 * S)),
        c: u64(TIMED_OUT | (NOW - 7 * S)), d: u64(NOW - 4 * S),
        e: u64(TIMED_OUT | (NOW - 100 * S)), h: u64(NOW - 5 * S)}

    maps.log.clear()
    handshake.sweep(Sweep(maps, NOW, timeouts))  # the same attempts are not counted again
    assert maps.writes() == []

    handshake.sweep(Sweep(maps, NOW + 131 * S, timeouts))
    assert set(maps.maps[handshake.PENDING]) == {d, h}  # a, b, c, e: past 135 s
    assert maps.maps[handshake.PENDING][d] == u64(TIMED_OUT | (NOW - 4 * S))
    assert timeouts_of(maps, 1) == (5, 1)
    assert timeouts_of(maps, 2) == (2, 7)  # d and h, now old


def test_handshake_sweep_with_nothing_pending_writes_nothing() -> None:
    maps = DictMaps({handshake.TIMEOUTS: {u32(1): hs_timeouts(3, 0)}})
    handshake.sweep(Sweep(maps, NOW, {"tcp_connect_timeout": 5.0, "dns_timeout": 5.0}))
    assert maps.writes() == []


def query(slot: int, id_: int) -> bytes:
    q = Query(slot=slot, family=6, id=id_, lport=53000 + id_, rport=53)
    q.laddr[15] = 7
    q.raddr[15] = 1
    return bytes(q)


def test_dns_sweep() -> None:
    a, b, c, d, e = query(1, 1), query(1, 2), query(2, 3), query(2, 4), query(2, 5)
    pending = {a: u64(NOW - 3 * S), b: u64(NOW - int(2.5 * S)), c: u64(NOW - 1 * S),
               d: u64(TIMED_OUT | (NOW - 61 * S)),  # 61 < 2 + 60: kept
               e: u64(TIMED_OUT | (NOW - 63 * S))}  # 63 > 62: deleted
    maps = DictMaps({dns.PENDING: pending, dns.TIMEOUTS: {u32(1): u64(4), u32(2): u64(0)}})
    timeouts = {"tcp_connect_timeout": 99.0, "dns_timeout": 2.0}

    dns.sweep(Sweep(maps, NOW, timeouts))
    assert maps.maps[dns.TIMEOUTS] == {u32(1): u64(6), u32(2): u64(0)}
    assert maps.maps[dns.PENDING] == {a: u64(TIMED_OUT | (NOW - 3 * S)),
                                      b: u64(TIMED_OUT | (NOW - int(2.5 * S))),
                                      c: u64(NOW - 1 * S), d: u64(TIMED_OUT | (NOW - 61 * S))}
    assert sorted(op[:2] for op in maps.writes()) == [
        ("delete", dns.PENDING), ("put", dns.TIMEOUTS), ("replace", dns.PENDING),
            ("replace", dns.PENDING)]

    maps.log.clear()
    dns.sweep(Sweep(maps, NOW + 1 * S, timeouts))
    assert maps.writes() == []  # counted once only; c is 2 s old: not past the timeout

    dns.sweep(Sweep(maps, NOW + 60 * S, timeouts))
    assert set(maps.maps[dns.PENDING]) == {c}  # a 63 s, b 62.5 s, d 121 s: past 62 s
    assert maps.maps[dns.PENDING][c] == u64(TIMED_OUT | (NOW - 1 * S))
    assert maps.maps[dns.TIMEOUTS] == {u32(1): u64(6), u32(2): u64(1)}


def test_sweep_keys_are_the_c_layouts() -> None:
    # struct pnm_flow and struct pnm_dns_key: 4 + 1 + 1 + 2 + 2 + 2 + 16 + 16 bytes
    assert ctypes.sizeof(Flow) == 44
    assert ctypes.sizeof(Query) == 44
    assert Flow.role.offset == 5
    assert Flow.laddr.offset == 12
    assert Query.id.offset == 6
    assert Query.laddr.offset == 12
    assert ctypes.sizeof(DropKey) == 12 and DropKey.reason.size == 4  # not cut to 16 bits
    assert DropKey.kind.offset == 8
    assert ctypes.sizeof(Handshake) == (2 * 28 + 2 + 2 + 2) * 8
    assert ctypes.sizeof(Dns) == (28 + 3 + 16) * 8
    assert ctypes.sizeof(Hist) == 30 * 8
    assert ctypes.sizeof(Flags) == 8 * 8
