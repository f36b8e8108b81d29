"""The reorder window: per-CPU streams in, one stream in timestamp order out, bounded."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from monitor.traces.reorder import Released, ReorderWindow


def out(released: object) -> list[tuple[int, str, int]]:
    return [(r.ts, r.item, r.late_ns) for r in released]  # type: ignore[attr-defined]


def test_two_cpus_merged_in_time_order_up_to_the_watermark() -> None:
    w: ReorderWindow[str] = ReorderWindow(max_frames=100)
    # ring 0 drained first, then ring 1: each in order, the two interleaved in time
    for ts, item in ((10, "a0"), (30, "b0"), (50, "c0"), (20, "a1"), (40, "b1"), (60, "c1")):
        w.push(ts, item)
    assert out(w.release(45)) == [(10, "a0", 0), (20, "a1", 0), (30, "b0", 0), (40, "b1", 0)]
    assert len(w) == 2  # stamped after the watermark: a frame before them may still come
    w.push(55, "d1")
    assert out(w.release(100)) == [(50, "c0", 0), (55, "d1", 0), (60, "c1", 0)]
    assert (w.late, w.early) == (0, 0)


def test_a_frame_later_than_the_window_is_still_released_marked_and_counted() -> None:
    w: ReorderWindow[str] = ReorderWindow(max_frames=100)
    w.push(100, "x")
    assert out(w.release(100)) == [(100, "x", 0)]
    w.push(70, "late")  # stamped before one already written
    w.push(120, "y")
    assert out(w.release(110)) == [(70, "late", 30)]  # at once, not held: it cannot be placed
    assert out(w.release(200)) == [(120, "y", 0)]  # the order after it is the stamps' again
    assert w.late == 1


def test_at_most_max_frames_wait_and_the_oldest_leave_early() -> None:
    w: ReorderWindow[int] = ReorderWindow(max_frames=3)
    for ts in (5, 1, 4, 2, 3):
        w.push(ts, ts)
    assert [r.ts for r in w.release(0)] == [1, 2]  # nothing is due, but only 3 may wait
    assert (len(w), w.early) == (3, 2)
    assert [r.ts for r in w.flush()] == [3, 4, 5]
    assert len(w) == 0


def test_equal_stamps_keep_their_arrival_order() -> None:
    w: ReorderWindow[str] = ReorderWindow(max_frames=10)
    for item in ("first", "second", "third"):
        w.push(7, item)
    assert [r.item for r in w.flush()] == ["first", "second", "third"]


def test_a_caller_that_stops_taking_leaves_the_rest_waiting() -> None:
    w: ReorderWindow[int] = ReorderWindow(max_frames=10)
    for ts in range(5):
        w.push(ts, ts)
    for released in w.release(10):
        if released.ts == 1:
            break  # a limit reached: the rest stays, not lost in a generator
    assert [r.ts for r in w.flush()] == [2, 3, 4]


@given(st.lists(st.lists(st.integers(0, 10_000), max_size=40), min_size=1, max_size=4),
       st.integers(1, 50), st.randoms(use_true_random=False))
def test_any_cpus_any_polls_in_order_and_nothing_lost(cpus: list[list[int]], polls: int,
                                                      rnd: random.Random) -> None:
    """CPUs each stamp in order; the reader drains them in turns of random sizes, and the
    watermark after a turn is the earliest stamp any CPU could still deliver. Then the
    output is in order, nothing is late, nothing is lost."""
    rings = [sorted(stamps) for stamps in cpus]
    w: ReorderWindow[int] = ReorderWindow(max_frames=1_000_000)
    released: list[Released[int]] = []
    pos = [0] * len(rings)
    while any(p < len(r) for p, r in zip(pos, rings, strict=True)):
        for i, ring in enumerate(rings):
            take = rnd.randint(0, max(1, len(ring) // polls + 1))
            for ts in ring[pos[i]: pos[i] + take]:
                w.push(ts, ts)
            pos[i] = min(len(ring), pos[i] + take)
        pending = [r[p] for p, r in zip(pos, rings, strict=True) if p < len(r)]
        released += w.release(min(pending) - 1 if pending else 1 << 62)
    released += w.flush()
    stamps = [r.ts for r in released]
    assert stamps == sorted(ts for ring in rings for ts in ring)
    assert w.late == 0 and all(r.late_ns == 0 for r in released)
