"""The probe registry: selection by name, and the refusals of duplicates."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from monitor.exposition import Family
from monitor.probes import (
    REGISTRY,
    RegistryError,
    _registry,
    dns,
    dnsnames,
    drops,
    handshake,
    packets,
    peers,
    retransmits,
    rtt,
    select,
    tcpflags,
    trace,
)
from monitor.probes.base import MapLayout, Probe, Scrape, u32_key, u32_of

ALL = ["packets", "peers", "tcpflags", "handshake", "dns", "dnsnames", "drops", "retransmits",
       "rtt", "trace"]


def nothing(_scrape: Scrape) -> Iterator[Family]:
    yield from ()


def no_families() -> Iterator[Family]:
    yield from ()


def probe(name: str, *maps: str) -> Probe:
    return Probe(name=name, summary=f"the {name} probe", c_file=f"{name}.c",
                 maps={m: MapLayout(ctypes.c_uint32, ctypes.c_uint64) for m in maps},
                 collect=nothing, describe=no_families)


def test_registry_holds_every_probe_in_order() -> None:
    assert list(REGISTRY) == ALL
    assert [REGISTRY[n] for n in ALL] == [packets.PROBE, peers.PROBE, tcpflags.PROBE,
                                          handshake.PROBE, dns.PROBE, dnsnames.PROBE,
                                          drops.PROBE, retransmits.PROBE, rtt.PROBE, trace.PROBE]
    assert packets.PROBE.maps["pnm_packets"].per_slot is True


def test_what_each_probe_declares() -> None:
    hooks = {p.name: p.tc_hook for p in REGISTRY.values()}
    assert hooks == {"packets": "packets_tc", "peers": "peers_tc", "tcpflags": "tcpflags_tc",
                     "handshake": "handshake_tc", "dns": "dns_tc", "dnsnames": "dnsnames_tc",
                     "drops": "", "retransmits": "", "rtt": "", "trace": "trace_tc"}
    # trace's kernel prefilter compares ports, so it needs them parsed
    assert {p.name for p in REGISTRY.values() if p.needs_ports} == {"tcpflags", "handshake", "dns",
                                                                    "dnsnames", "trace"}
    assert {p.name for p in REGISTRY.values() if p.needs_offsets} == {"drops", "retransmits", "rtt"}
    assert {p.name for p in REGISTRY.values() if p.degraded} == {"drops"}
    assert {p.name for p in REGISTRY.values() if p.sweep} == {"handshake", "dns"}
    assert {p.name for p in REGISTRY.values() if p.forget} == {"drops"}
    # probes with state of their own: their sweep and forget come with it (Probe.start)
    assert {p.name for p in REGISTRY.values() if p.start} == {"peers", "dnsnames"}
    assert {p.name for p in REGISTRY.values() if p.lost} == {"drops"}
    assert {p.name for p in REGISTRY.values() if p.tracepoints} == {"drops", "retransmits", "rtt"}
    assert drops.PROBE.tracepoints == ("skb:kfree_skb",)
    assert retransmits.PROBE.tracepoints == ("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack")
    assert rtt.PROBE.tracepoints == ("sock:inet_sock_set_state",)
    # the pending maps are hashes keyed by flow; the counters per slot
    assert handshake.PROBE.maps["pnm_hs_pending"].per_slot is False
    assert handshake.PROBE.maps["pnm_hs_timeouts"].per_slot is True
    assert dns.PROBE.maps["pnm_dns_pending"].per_slot is False
    assert dns.PROBE.maps["pnm_dns_timeouts"].per_slot is True
    assert drops.PROBE.maps["pnm_drops"].per_slot is False
    # the trace switches: one per slot, zeroed when a slot is handed out again
    assert trace.PROBE.maps["pnm_trace"].per_slot is True
    assert drops.PROBE.maps["pnm_drop_trace"].per_slot is True
    assert list(trace.PROBE.describe()) == []  # no families of its own


def test_select_empty_means_all() -> None:
    assert [p.name for p in select([])] == ALL
    assert [p.name for p in select(())] == ALL


def test_select_by_name_in_registry_order() -> None:
    assert select(["packets"]) == [packets.PROBE]
    assert select(iter(["packets", "packets"])) == [packets.PROBE]
    assert select(["rtt", "dns", "packets"]) == [packets.PROBE, dns.PROBE, rtt.PROBE]


@pytest.mark.parametrize("names", [["flows"], ["packets", "flows", "conntrack"], ["Packets"]])
def test_select_unknown(names: list[str]) -> None:
    unknown = sorted(set(names) - set(ALL))
    with pytest.raises(RegistryError) as info:
        select(names)
    assert str(info.value) == f"unknown probes {unknown}; known: {sorted(ALL)}"


def test_registry_keeps_order() -> None:
    assert list(_registry([probe("b", "map_b"), probe("a", "map_a"), probe("c")])) == ["b", "a", "c"]


def test_registry_refuses_a_duplicate_name() -> None:
    with pytest.raises(RegistryError, match=r"^probe 'flows' registered twice$"):
        _registry([probe("flows", "map_1"), probe("dns", "map_2"), probe("flows", "map_3")])


def test_registry_refuses_a_map_claimed_twice() -> None:
    with pytest.raises(RegistryError, match=r"^map 'shared' claimed by 'flows' and 'dns'$"):
        _registry([probe("flows", "own", "shared"), probe("dns", "shared")])


def test_u32_key_round_trip() -> None:
    assert u32_key(7) == (7).to_bytes(4, "little")  # x86-64: native is little-endian
    assert u32_of(u32_key(4_000_000_000)) == 4_000_000_000
    assert u32_of(b"\x2a\x00\x00\x00extra") == 42
