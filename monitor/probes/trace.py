"""On-demand copies of one pod's packets (bpf/trace.c); monitor/capture.py drives them.

No metric families of its own: the capture manager reports on traces. The
switch per slot (pnm_trace) is zeroed whenever a slot is handed out, so a
new pod never inherits a trace.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from monitor.exposition import Family
from monitor.probes.base import MapLayout, Probe, Scrape

MAP = "pnm_trace"
EVENTS = "pnm_trace_events"


class TraceConfig(ctypes.Structure):
    """struct pnm_trace_cfg."""

    _fields_ = [("on", ctypes.c_uint32), ("snaplen", ctypes.c_uint32),
                ("protocol", ctypes.c_uint8), ("family", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("addr", ctypes.c_uint8 * 16)]


class TraceMeta(ctypes.Structure):
    """struct pnm_trace_meta, ahead of the packet bytes in each perf event."""

    _fields_ = [("ts", ctypes.c_uint64), ("slot", ctypes.c_uint32), ("len", ctypes.c_uint32),
                ("caplen", ctypes.c_uint32), ("dir", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3)]


def collect(_scrape: Scrape) -> Iterator[Family]:
    return iter(())


def describe() -> Iterator[Family]:
    return iter(())


PROBE = Probe(
    name="trace",
    summary="on-demand packet copies of one pod for `podnetmon trace` (TC; off: one lookup)",
    c_file="trace.c",
    tc_hook="trace_tc",
    needs_ports=True,
    maps={MAP: MapLayout(ctypes.c_uint32, TraceConfig, per_slot=True)},
    collect=collect,
    describe=describe,
)
