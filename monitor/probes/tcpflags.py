"""TCP SYN, SYN-ACK, RST and FIN segments per pod and direction (bpf/tcpflags.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from monitor.maps import decode
from monitor.probes.base import CounterSum, MapLayout, Probe, Scrape, u32_key
from monitor.probes.packets import DIRECTIONS

FLAGS = ("syn", "synack", "rst", "fin")  # PNM_FLAG_* order
MAP = "pnm_tcpflags"


class Flags(ctypes.Structure):
    """struct pnm_tcpflags."""

    _fields_ = [("count", (ctypes.c_uint64 * len(FLAGS)) * len(DIRECTIONS))]


def _family() -> CounterMetricFamily:
    return CounterMetricFamily(
        "podnet_tcp_flags", "TCP segments the pod sent (egress) or received (ingress) "
        "carrying SYN (without ACK), SYN-ACK, RST or FIN.",
        labels=["namespace", "pod", "direction", "flag"])


def collect(scrape: Scrape) -> Iterator[Metric]:
    family, sums = _family(), CounterSum()
    for slot, (namespace, pod) in scrape.slots():
        raw = scrape.maps.lookup(MAP, u32_key(slot))
        if raw is None:
            continue
        flags = decode(Flags, raw)
        for d, direction in enumerate(DIRECTIONS):
            for f, flag in enumerate(FLAGS):
                sums.add((namespace, pod, direction, flag), flags.count[d][f])
    for labels, value in sums.items():
        family.add_metric(labels, value)
    yield family


def describe() -> Iterator[Metric]:
    yield _family()


PROBE = Probe(
    name="tcpflags",
    summary="TCP SYN, SYN-ACK, RST and FIN segments per pod and direction (TC)",
    c_file="tcpflags.c",
    tc_hook="tcpflags_tc",
    needs_ports=True,
    maps={MAP: MapLayout(ctypes.c_uint32, Flags, per_slot=True)},
    collect=collect,
    describe=describe,
)
