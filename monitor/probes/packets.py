"""Per-pod packets and bytes by direction and protocol (bpf/packets.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from monitor.maps import decode
from monitor.probes.base import MapLayout, Probe, Scrape, u32_key

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


def _families() -> tuple[CounterMetricFamily, CounterMetricFamily, CounterMetricFamily]:
    return (
        CounterMetricFamily("podnet_packets", "Packets the pod sent (egress) or received "
                            "(ingress), counted on its host veth.", labels=LABELS),
        CounterMetricFamily("podnet_bytes", "Bytes the pod sent (egress) or received "
                            "(ingress), Ethernet header included, as the interface "
                            "statistics count them.", labels=LABELS),
        CounterMetricFamily("podnet_tcp_segments", "TCP segments the pod sent (egress) or "
                            "received (ingress): a GSO packet counts its segments, as "
                            "TcpOutSegs does.", labels=["namespace", "pod", "direction"]),
    )


def collect(scrape: Scrape) -> Iterator[Metric]:
    packets, byte_count, segments = _families()
    # Several interfaces (or a recreated sandbox) can map to one pod's labels:
    # sum them rather than emit duplicate series.
    totals: dict[tuple[str, ...], list[int]] = {}
    segs: dict[tuple[str, ...], int] = {}
    for slot, (namespace, pod) in scrape.slots():
        value = scrape.maps.lookup(MAP, u32_key(slot))
        if value is None:
            continue
        counts = decode(Counts, value)
        for d, direction in enumerate(DIRECTIONS):
            key = (namespace, pod, direction)
            segs[key] = segs.get(key, 0) + counts.tcp_segments[d]
            for p, protocol in enumerate(PROTOCOLS):
                acc = totals.setdefault((namespace, pod, direction, protocol), [0, 0])
                acc[0] += counts.packets[d][p]
                acc[1] += counts.bytes[d][p]
    for labels, (npackets, nbytes) in sorted(totals.items()):
        packets.add_metric(list(labels), npackets)
        byte_count.add_metric(list(labels), nbytes)
    for labels, n in sorted(segs.items()):
        segments.add_metric(list(labels), n)
    yield packets
    yield byte_count
    yield segments


def describe() -> Iterator[Metric]:
    yield from _families()


PROBE = Probe(
    name="packets",
    summary="packets and bytes per pod, direction and protocol (TC)",
    c_file="packets.c",
    tc_hook="packets_tc",
    maps={MAP: MapLayout(ctypes.c_uint32, Counts, per_slot=True)},
    collect=collect,
    describe=describe,
)
