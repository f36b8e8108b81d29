"""On-demand copies of one pod's packets (bpf/trace.c); monitor/capture.py drives them.

No metric families of its own: the capture manager reports on traces. The
switch per slot (pnm_trace) is zeroed whenever a slot is handed out, so a
new pod never inherits a trace.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Mapping
from typing import Any

from monitor.exposition import Family
from monitor.probes.base import CAPTURES, MapLayout, Probe, Scrape, Setting, at_least_one

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


def _absolute(name: str, value: str, _values: Mapping[str, Any]) -> list[str]:
    return [] if os.path.isabs(value) else [f"{name}: {value!r} must be an absolute path"]


def _duration(name: str, value: float, _values: Mapping[str, Any]) -> list[str]:
    return [] if 0 < value <= 86400 else [f"{name}: {value} s is outside (0, 86400]"]


def _snaplens(_name: str, value: int, values: Mapping[str, Any]) -> list[str]:
    if 14 <= value <= values["trace_max_snaplen"] <= 65000:
        return []
    return ["trace_snaplen and trace_max_snaplen: need 14 <= snaplen <= max <= 65000"]


# The limits of the capture machinery the daemon builds on this probe (Probe.provides)
SETTINGS = (
    Setting("capture_dir", "/var/lib/podnetmon/captures",
            "Where captures started by alerts are stored (0700; files 0600).", _absolute),
    Setting("capture_max_files", 20, "Stored captures kept at most; the oldest go first.",
            at_least_one),
    Setting("capture_max_bytes", 500 << 20,
            "Bytes of stored captures kept at most; the oldest go first.", at_least_one),
    Setting("trace_max_duration", 300.0, "The longest trace anyone may ask for, in seconds.",
            _duration),
    Setting("trace_max_packets", 1_000_000,
            "Packets (or drop events) a trace may take at most.", at_least_one),
    Setting("trace_max_bytes", 1 << 30, "Bytes of packets a trace may take at most.",
            at_least_one),
    Setting("trace_snaplen", 1500,
            "Bytes copied of each packet unless a trace asks otherwise: one MTU, headers and "
            "the start of the payload; each copied byte costs on the packet's path.", _snaplens),
    Setting("trace_max_snaplen", 65000, "The largest snap length a trace may ask for (a perf "
            "event holds at most 64 KiB)."),  # checked with trace_snaplen
    Setting("traces_per_node", 4, "Traces running at once on the node, at most.", at_least_one),
    Setting("traces_per_pod", 2, "Traces of one pod running at once, at most.", at_least_one),
)


PROBE = Probe(
    name="trace",
    summary="on-demand packet copies of one pod for `podnetmon trace` (TC; off: one lookup)",
    c_file="trace.c",
    tc_hook="trace_tc",
    needs_ports=True,
    maps={MAP: MapLayout(ctypes.c_uint32, TraceConfig, per_slot=True)},
    collect=collect,
    describe=describe,
    settings=SETTINGS,
    provides=(CAPTURES,),
)
