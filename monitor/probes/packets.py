"""Per-pod packets and bytes by direction and protocol (bpf/packets.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from monitor.exposition import CounterFamily, Family
from monitor.kernel.maps import MapReader, word_slice, words
from monitor.probes.base import INTERFACE_COUNTS, MapLayout, Probe, Scrape

# Index order of pnm_counts' arrays, as bpf/pnm.h numbers them.
DIRECTIONS = ("ingress", "egress")  # PNM_DIR_INGRESS (pod receives), PNM_DIR_EGRESS (pod sends)
PROTOCOLS = ("tcp", "udp", "icmp", "other")

MAP = "pnm_packets"
LABELS = ["namespace", "pod", "direction", "protocol"]


class Counts(ctypes.Structure):
    """struct pnm_counts."""

    _fields_ = [
        ("packets", (ctypes.c_uint64 * len(PROTOCOLS)) * len(DIRECTIONS)),
        ("bytes", (ctypes.c_uint64 * len(PROTOCOLS)) * len(DIRECTIONS)),
        ("tcp_segments", ctypes.c_uint64 * len(DIRECTIONS)),
    ]


def _families() -> tuple[CounterFamily, CounterFamily, CounterFamily]:
    return (
        CounterFamily("podnet_packets", "Packets the pod sent (egress) or received "
                      "(ingress), counted on its host veth.", LABELS),
        CounterFamily("podnet_bytes", "Bytes the pod sent (egress) or received "
                      "(ingress), Ethernet header included, as the interface "
                      "statistics count them.", LABELS),
        CounterFamily("podnet_tcp_segments", "TCP segments the pod sent (egress) or "
                      "received (ingress): a GSO packet counts its segments, as "
                      "TcpOutSegs does.", ["namespace", "pod", "direction"]),
    )


PACKETS, BYTES, SEGMENTS = (word_slice(Counts, f) for f in ("packets", "bytes", "tcp_segments"))


def _by_name(names: tuple[str, ...]) -> list[int]:
    return sorted(range(len(names)), key=names.__getitem__)


# A pod's series in the order sorted label values put them (egress before ingress, icmp
# first): (direction, protocol, index of the counter in the [direction][protocol] array).
SERIES = [(DIRECTIONS[d], PROTOCOLS[p], d * len(PROTOCOLS) + p)
          for d in _by_name(DIRECTIONS) for p in _by_name(PROTOCOLS)]


def totals(maps: MapReader, slots: list[int]) -> dict[int, tuple[int, int, int, int]]:
    """(egress packets, egress bytes, ingress packets, ingress bytes) counted by slot,
    every protocol, in one batch read; a slot with no entry is absent."""
    out = {}
    width = len(PROTOCOLS)
    egress, ingress = DIRECTIONS.index("egress") * width, DIRECTIONS.index("ingress") * width
    for slot, raw in zip(slots, maps.lookup_slots(MAP, slots), strict=True):
        if raw is not None:
            counts = words(Counts, raw)
            npackets, nbytes = counts[PACKETS], counts[BYTES]
            out[slot] = (sum(npackets[egress:egress + width]), sum(nbytes[egress:egress + width]),
                         sum(npackets[ingress:ingress + width]),
                         sum(nbytes[ingress:ingress + width]))
    return out


def collect(scrape: Scrape) -> Iterator[Family]:
    packets, byte_count, segments = _families()
    # Several interfaces (or a recreated sandbox) can map to one pod's labels:
    # sum them rather than emit duplicate series.
    totals: dict[tuple[str, str], list[int]] = {}
    for owner, (value,) in scrape.read_slots(MAP):
        if value is None:
            continue
        counts = words(Counts, value)
        seen = totals.get(owner)
        totals[owner] = counts if seen is None else [a + b for a, b in zip(seen, counts, strict=True)]
    for (namespace, pod), counts in sorted(totals.items()):
        npackets, nbytes, nsegments = counts[PACKETS], counts[BYTES], counts[SEGMENTS]
        for direction, protocol, i in SERIES:
            packets.add((namespace, pod, direction, protocol), npackets[i])
            byte_count.add((namespace, pod, direction, protocol), nbytes[i])
        for d in _by_name(DIRECTIONS):
            segments.add((namespace, pod, DIRECTIONS[d]), nsegments[d])
    yield packets
    yield byte_count
    yield segments


def describe() -> Iterator[Family]:
    yield from _families()


PROBE = Probe(
    name="packets",
    summary="packets and bytes per pod, direction and protocol (TC)",
    c_file="packets.c",
    tc_hook="packets_tc",
    maps={MAP: MapLayout(ctypes.c_uint32, Counts, per_slot=True)},
    collect=collect,
    describe=describe,
    provides=(INTERFACE_COUNTS,),
    interface_totals=totals,
)
