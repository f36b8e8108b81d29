"""monitor.topn: bounded series that sum exactly and never go down, under any sequence."""

from __future__ import annotations

from collections.abc import Hashable

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.topn import TopSeries


def snapshot(ts: TopSeries, owner: Hashable) -> dict[Hashable | None, list[int]]:
    return {key: list(values) for key, values in ts.series(owner)}


def test_the_first_keys_get_series_until_top_then_the_rest_is_other() -> None:
    ts = TopSeries(top=2, ttl=60, width=2, rank=lambda v: v[1])
    ts.add("pod", {"a": [1, 100], "b": [1, 50], "c": [1, 10]}, now=0)
    assert snapshot(ts, "pod") == {"a": [1, 100], "b": [1, 50], None: [1, 10]}


def test_a_stronger_key_takes_the_weakest_place_and_its_total_goes_to_other() -> None:
    ts = TopSeries(top=2, ttl=60, width=2, rank=lambda v: v[1])
    ts.add("pod", {"a": [1, 100], "b": [1, 50]}, now=0)
    ts.end_window()
    ts.end_window()  # two windows on: a and b have no recent traffic left to rank by
    ts.add("pod", {"c": [2, 70]}, now=1)
    assert snapshot(ts, "pod") == {"a": [1, 100], "c": [2, 70], None: [1, 50]}


def test_a_weaker_newcomer_stays_in_other() -> None:
    ts = TopSeries(top=1, ttl=60, width=1)
    ts.add("pod", {"a": [100]}, now=0)
    ts.add("pod", {"b": [10]}, now=1)
    assert snapshot(ts, "pod") == {"a": [100], None: [10]}


def test_an_idle_key_loses_its_series_after_ttl() -> None:
    ts = TopSeries(top=5, ttl=30, width=1)
    ts.add("pod", {"a": [7], "b": [3]}, now=0)
    ts.add("pod", {"b": [1]}, now=20)
    ts.add("pod", {}, now=31)
    assert snapshot(ts, "pod") == {"b": [4], None: [7]}
    ts.add("pod", {"a": [2]}, now=32)  # back: a new series, from what it brought now
    assert snapshot(ts, "pod") == {"b": [4], "a": [2], None: [7]}


def test_owners_are_apart_and_forget_drops_one() -> None:
    ts = TopSeries(top=1, ttl=60, width=1)
    ts.add(("pod", "ingress"), {"a": [1]}, now=0)
    ts.add(("pod", "egress"), {"b": [2]}, now=0)
    ts.add_other(("pod", "egress"), [5])
    assert snapshot(ts, ("pod", "egress")) == {"b": [2], None: [5]}
    ts.forget(("pod", "ingress"))
    assert ts.owners() == [("pod", "egress")]


updates = st.lists(st.tuples(
    st.dictionaries(st.integers(0, 30), st.tuples(st.integers(0, 5), st.integers(0, 3000)),
                    max_size=12),
    st.integers(0, 40),  # seconds since the last update
    st.booleans()),  # a window boundary after it
    max_size=40)


@settings(max_examples=300, deadline=None)
@given(updates, st.integers(0, 6), st.integers(1, 90))
def test_sums_are_exact_series_never_go_down_and_stay_bounded(
        steps: list[tuple[dict[int, tuple[int, int]], int, bool]], top: int, ttl: int) -> None:
    ts = TopSeries(top=top, ttl=ttl, width=2, rank=lambda v: v[1])
    total, now = [0, 0], 0.0
    last: dict[Hashable | None, list[int]] = {}
    for deltas, gap, boundary in steps:
        now += gap
        ts.add("pod", {k: list(v) for k, v in deltas.items()}, now)
        for v in deltas.values():
            total = [total[0] + v[0], total[1] + v[1]]
        if boundary:
            ts.end_window()
        seen = snapshot(ts, "pod")
        assert len(seen) <= top + 1
        assert [sum(v[i] for v in seen.values()) for i in (0, 1)] == total
        for key, values in seen.items():
            if key in last:  # a series that stays never goes down
                assert all(a >= b for a, b in zip(values, last[key], strict=True)), key
        last = seen
