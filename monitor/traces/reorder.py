"""Frames from per-CPU buffers back in timestamp order, within a bounded window.

A trace's frames are stamped in the kernel (bpf_ktime_get_ns(), then copied into
the perf ring of the CPU that saw them) and read by one thread that drains the
rings one after the other. Each ring is in order; across rings they are not: a
frame of CPU 1 stamped before one of CPU 0 comes after it when ring 0 is read
first, or when ring 1 had not woken the reader yet. Written as they come, a
multi-stream TCP trace had 9 of 581 frames earlier than the one before, which
Wireshark reads as retransmissions that never happened.

So frames wait in a window (a heap by timestamp) and leave it in order once no
earlier frame can still come. The reader knows when that is: when a poll of the
rings begins at time T, every frame stamped before T is already in its ring
(the program stamps and copies a frame in one go, with bottom halves disabled:
microseconds), so once that poll's drain is done, no frame stamped before T is
still to come. The reader publishes T, less a slack, as the *watermark* after
each poll (CaptureManager._read), and the window lets out every frame stamped
up to it. Frames therefore wait one poll (at most its 100 ms timeout, less
under traffic, which wakes the reader every 32 frames) plus the slack: a live
trace lags about a tenth of a second, and a file is in order.

The slack (SLACK_NS, 10 ms) covers a stamp and its copy that are further apart
than a softirq: a virtual CPU descheduled by its hypervisor between the two.
The window is bounded in time, should the reader stall (a frame older than
MAX_HOLD_NS, 1 s, leaves whatever the watermark says), and in memory (at most
`max_frames` wait; past that the oldest leave early; their bytes stay in the
session's byte budget until written). A frame that arrives after a later one
has left (a copy more than the slack after its stamp, a stalled reader, an early
leave) cannot be put in its place any more: it is written all the same, with its
own timestamp, marked late (the pcapng writer gives it a comment) and counted.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

SLACK_NS = 10_000_000  # a stamp and its copy into the ring: see the module's docstring
MAX_HOLD_NS = 1_000_000_000  # no frame waits longer than this, whatever the watermark

T = TypeVar("T")


@dataclass(frozen=True)
class Released(Generic[T]):
    """A frame leaving the window: `late_ns` > 0 when a frame stamped that much later had
    left before it (it is out of order in the output, and said to be)."""

    ts: int
    item: T
    late_ns: int = 0


@dataclass
class ReorderWindow(Generic[T]):
    """Frames pushed in any order, released in timestamp order up to a watermark."""

    max_frames: int
    _heap: list[tuple[int, int, T]] = field(default_factory=list)
    _seq: Iterator[int] = field(default_factory=itertools.count)  # ties keep arrival order
    last_ts: int = -1  # the timestamp of the latest frame released
    late: int = 0  # frames released after a later-stamped one
    early: int = 0  # frames let out before the watermark because the window was full

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, ts: int, item: T) -> None:
        heapq.heappush(self._heap, (ts, next(self._seq), item))

    def release(self, watermark: int) -> Iterator[Released[T]]:
        """Every frame stamped up to `watermark`, in order; and, while more than
        max_frames wait, the oldest of the rest."""
        while self._heap and (self._heap[0][0] <= watermark or len(self._heap) > self.max_frames):
            if self._heap[0][0] > watermark:
                self.early += 1
            yield self._pop()

    def flush(self) -> Iterator[Released[T]]:
        """Every frame still waiting, in order (the trace is over: none can come before)."""
        while self._heap:
            yield self._pop()

    def _pop(self) -> Released[T]:
        ts, _seq, item = heapq.heappop(self._heap)
        if ts < self.last_ts:
            self.late += 1
            return Released(ts, item, self.last_ts - ts)
        self.last_ts = ts
        return Released(ts, item)
