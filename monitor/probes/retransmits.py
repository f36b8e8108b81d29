"""TCP segments retransmitted per pod (bpf/retransmits.c)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from monitor.kernelinfo import KernelInfo
from monitor.probes.base import CounterSum, MapLayout, Probe, Scrape, u32_key

MAP = "pnm_retrans"


def _family() -> CounterMetricFamily:
    return CounterMetricFamily(
        "podnet_tcp_retransmits", "TCP segments the pod retransmitted (as TcpRetransSegs "
        "counts them, less retransmissions that failed before leaving the pod).",
        labels=["namespace", "pod"])


def collect(scrape: Scrape) -> Iterator[Metric]:
    family, sums = _family(), CounterSum()
    for slot, owner in scrape.slots(with_node=True):
        raw = scrape.maps.lookup(MAP, u32_key(slot))
        if raw is not None:
            sums.add(owner, struct.unpack("=Q", raw)[0])
    for labels, value in sums.items():
        family.add_metric(labels, value)
    yield family


def describe() -> Iterator[Metric]:
    yield _family()


def cflags(kernel: KernelInfo) -> list[str]:
    has_err = kernel.has_field("tcp:tcp_retransmit_skb", "err")
    return ["-DPNM_RETRANS_HAS_ERR"] if has_err else []


PROBE = Probe(
    name="retransmits",
    summary="TCP retransmitted segments per pod (tracepoints tcp:tcp_retransmit_skb/_synack)",
    c_file="retransmits.c",
    tracepoints=("tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack"),
    needs_offsets=True,
    maps={MAP: MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_slot=True)},
    collect=collect,
    describe=describe,
    cflags=cflags,
)
