"""TCP segments retransmitted per pod (bpf/retransmits.c)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

from monitor.exposition import CounterFamily, Family
from monitor.kernel.kernelinfo import KernelInfo
from monitor.probes.base import KSTRUCT_OFFSETS, CounterSum, MapLayout, Probe, Scrape

MAP = "pnm_retrans"
# the segment's socket (the tracepoint's), and how many segments a GSO skb holds
OFFSETS = {**KSTRUCT_OFFSETS, "PNM_OFF_SKB_CB": ("sk_buff", "cb"),
           "PNM_OFF_TCB_GSO_SEGS": ("tcp_skb_cb", "tcp_gso_segs")}


def _family() -> CounterFamily:
    return CounterFamily(
        "podnet_tcp_retransmits", "TCP segments the pod retransmitted (as TcpRetransSegs "
        "counts them, less retransmissions that failed before leaving the pod).",
        ["namespace", "pod"])


def collect(scrape: Scrape) -> Iterator[Family]:
    family, sums = _family(), CounterSum()
    for owner, (raw,) in scrape.read_slots(MAP, with_node=True):
        if raw is not None:
            sums.add(owner, struct.unpack("=Q", raw)[0])
    for labels, value in sums.items():
        family.add(labels, value)
    yield family


def describe() -> Iterator[Family]:
    yield _family()


def cflags(kernel: KernelInfo) -> list[str]:
    has_err = kernel.has_field("tcp:tcp_retransmit_skb", "err")
    return ["-DPNM_RETRANS_HAS_ERR"] if has_err else []


PROBE = Probe(
    name="retransmits",
    summary="TCP retransmitted segments per pod (tracepoints tcp:tcp_retransmit_skb/_synack)",
    c_file="retransmits.c",
    tracepoints=("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack"),
    offsets=OFFSETS,
    maps={MAP: MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_slot=True)},
    collect=collect,
    describe=describe,
    cflags=cflags,
)
