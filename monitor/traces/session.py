"""A trace as asked for and as it runs: the request, the limits it is held to, the session
the perf reader fills and its consumer drains, and why a trace cannot start. Shared by
the manager (monitor/traces/capture.py) and the consumers that write a session out
(monitor/traces/pcapout.py, monitor/traces/dropevents.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.identity import Pod
from monitor.traces.pcapfilter import PacketFilter

QUEUE_PACKETS = 10_000  # per session, between the perf reader and the writer
QUEUE_BYTES = 32 << 20  # ... and in bytes: at 65,000-byte snaps, 10,000 would be 650 MB


class CaptureError(Exception):
    """A trace cannot be started as asked; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    """What a trace may take; every request is held to these (settings)."""

    max_duration: float = 300.0
    default_duration: float = 10.0
    max_packets: int = 1_000_000
    max_bytes: int = 1 << 30
    max_snaplen: int = 65000
    default_snaplen: int = 1500
    per_node: int = 4
    per_pod: int = 2


@dataclass(frozen=True)
class TraceRequest:
    """One trace, as asked for (already parsed; limits are checked by the manager)."""

    duration: float
    packets: int = 0  # 0: up to the limit
    bytes: int = 0
    snaplen: int = 0
    filter: str = ""

@dataclass
class Session:
    """One running trace (packets) or drop trace (events)."""

    id: int
    kind: str  # "packets" or "drops"
    pod: Pod
    slots: frozenset[int]
    interfaces: tuple[tuple[int, str, int], ...]  # (ifindex, host veth, slot)
    request: TraceRequest
    started: float
    deadline: float
    filter: PacketFilter | None = None
    queue: queue.Queue[Any] = field(default_factory=lambda: queue.Queue(QUEUE_PACKETS))
    packets: int = 0
    bytes: int = 0
    lost_kernel: int = 0  # perf buffer overruns while this session ran
    lost_queue: int = 0  # dropped because the consumer was too slow
    queued_bytes: int = 0  # changed by the reader and the writer: under _bytes_lock
    packets_by_slot: dict[int, int] = field(default_factory=dict)
    # Frames stamped up to this (wall-clock ns) have all been queued: set by the perf
    # reader after each poll, read by the writer to put frames in order (monitor/reorder.py)
    watermark: int = 0
    wall_offset: int = 0  # the frames' clock: CLOCK_MONOTONIC + this is wall-clock ns
    late: int = 0  # frames written out of order: they came after the reorder window
    _bytes_lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self, size: int) -> bool:
        """Room for `size` more queued bytes? Takes it if so (the reader's side)."""
        with self._bytes_lock:
            if self.queued_bytes + size > QUEUE_BYTES:
                return False
            self.queued_bytes += size
            return True

    def release(self, size: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= size
    ended: str = ""  # why it ended, once it has
    done: threading.Event = field(default_factory=threading.Event)
    # called once, when the session first ends: the manager switches its slots off there
    on_end: Callable[[Session], None] | None = field(default=None, repr=False, compare=False)

    def end(self, why: str) -> None:
        first = not self.ended
        if first:
            self.ended = why
        self.done.set()
        if first and self.on_end is not None:
            self.on_end(self)


def parse_duration(text: str) -> float:
    """'10s', '2m', '500ms', '1h' or plain seconds; ValueError otherwise."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    text = text.strip()
    for suffix, factor in units:
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * factor
    if text.replace(".", "", 1).isdigit():
        return float(text)
    raise ValueError(f"not a duration: {text[:40]!r} (e.g. 10s, 2m, 500ms)")
