"""TCP SYN, SYN-ACK, RST and FIN segments per pod and direction (bpf/tcpflags.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from monitor.exposition import CounterFamily, Family
from monitor.kernel.maps import words
from monitor.probes.base import MapLayout, Probe, Scrape
from monitor.probes.packets import DIRECTIONS

FLAGS = ("syn", "synack", "rst", "fin")  # PNM_FLAG_* order
MAP = "pnm_tcpflags"


class Flags(ctypes.Structure):
    """struct pnm_tcpflags."""

    _fields_ = [("count", (ctypes.c_uint64 * len(FLAGS)) * len(DIRECTIONS))]


def _family() -> CounterFamily:
    return CounterFamily(
        "podnet_tcp_flags", "TCP segments the pod sent (egress) or received (ingress) "
        "carrying SYN (without ACK), SYN-ACK, RST or FIN.",
        ["namespace", "pod", "direction", "flag"])


# A pod's series in sorted label order: (direction, flag, index in count[direction][flag]).
SERIES = sorted((direction, flag, d * len(FLAGS) + f)
                for d, direction in enumerate(DIRECTIONS) for f, flag in enumerate(FLAGS))


def collect(scrape: Scrape) -> Iterator[Family]:
    family = _family()
    totals: dict[tuple[str, str], list[int]] = {}  # a pod's interfaces summed
    for owner, (raw,) in scrape.read_slots(MAP):
        if raw is None:
            continue
        counts = words(Flags, raw)
        seen = totals.get(owner)
        totals[owner] = counts if seen is None else [a + b for a, b in zip(seen, counts, strict=True)]
    for (namespace, pod), counts in sorted(totals.items()):
        for direction, flag, i in SERIES:
            family.add((namespace, pod, direction, flag), counts[i])
    yield family


def describe() -> Iterator[Family]:
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
