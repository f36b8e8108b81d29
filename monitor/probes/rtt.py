"""The kernel's smoothed TCP RTT, one sample per connection, per pod (bpf/rtt.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from monitor.exposition import Family
from monitor.kernel.maps import word_slice, words
from monitor.probes.base import HIST_BUCKETS, KSTRUCT_OFFSETS, HistogramSum, MapLayout, Probe, Scrape

MAP = "pnm_rtt"
OFFSETS = {**KSTRUCT_OFFSETS, "PNM_OFF_TCP_SRTT": ("tcp_sock", "srtt_us")}
HIST = ("podnet_tcp_rtt_seconds", "The kernel's smoothed round-trip time of the pod's TCP "
        "connections, sampled once per connection when it leaves ESTABLISHED.")


class Hist(ctypes.Structure):
    """struct pnm_hist."""

    _fields_ = [("buckets", ctypes.c_uint64 * HIST_BUCKETS), ("sum_us", ctypes.c_uint64),
                ("count", ctypes.c_uint64)]


BUCKETS, SUM = word_slice(Hist, "buckets"), Hist.sum_us.offset // 8


def collect(scrape: Scrape) -> Iterator[Family]:
    hist = HistogramSum()
    for owner, (raw,) in scrape.read_slots(MAP, with_node=True):
        if raw is not None:
            h = words(Hist, raw)
            hist.add(owner, h[BUCKETS], h[SUM])
    yield hist.family(*HIST, ["namespace", "pod"])


def describe() -> Iterator[Family]:
    yield HistogramSum().family(*HIST, ["namespace", "pod"])


PROBE = Probe(
    name="rtt",
    summary="smoothed TCP RTT per pod, sampled when a connection ends "
            "(tracepoint sock:inet_sock_set_state)",
    c_file="rtt.c",
    tracepoints=("sock:inet_sock_set_state",),
    offsets=OFFSETS,
    maps={MAP: MapLayout(ctypes.c_uint32, Hist, per_slot=True)},
    collect=collect,
    describe=describe,
)
