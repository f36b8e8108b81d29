"""Bounded series: per owner, the top keys get series of their own, the rest one `_other`.

What peers (who a pod talks to) and failing DNS names have in common: the keys are
unbounded (every address, every name), the series must not be, and every series is a
Prometheus counter, so none may ever go down. Per owner (a pod's interface and a
direction, say) at most `top` keys have a series of their own; everything else is
added to the owner's `_other`. The rules that keep it exact and monotonic:

- every delta goes to exactly one place: its key's own series if it has one, else
  `_other`, so own series plus `_other` always sum to everything added;
- a key gets its own series (is promoted) when it shows traffic while there is room,
  or when what it brought in this update beats the weakest own key's recent total;
  its series starts at what it brought in the update that promoted it (nothing it
  brought before moves out of `_other`, which would make `_other` go down);
- a key loses its series (is demoted) when it has been idle for `ttl` seconds, or to
  make room for a stronger one: its total is then added to `_other` and its series
  ends (Prometheus marks it stale). Promoted again later, it starts again from zero,
  which Prometheus reads as a new series, or a counter reset.

Each value is a vector (packets and bytes, or counts by RCODE); `rank` picks what
ranks keys (bytes, or all failures). Not thread-safe: its user holds a lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Values = list[int]


@dataclass
class _Own:
    total: Values
    recent: int  # rank of what came since the last window boundary, and the window before
    previous: int
    last_active: float


@dataclass
class Bounded:
    """One owner's series: at most `top` keys of its own, and `_other`."""

    width: int
    own: dict[Hashable, _Own] = field(default_factory=dict)
    other: Values = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.other:
            self.other = [0] * self.width


class TopSeries:
    """Bounded series for many owners; see the module's docstring for the rules."""

    def __init__(self, *, top: int, ttl: float, width: int,
                 rank: Callable[[Sequence[int]], int] = sum) -> None:
        if top < 0 or width < 1:
            raise ValueError("top must be >= 0 and width >= 1")
        self.top, self.ttl, self.width, self._rank = top, ttl, width, rank
        self._owners: dict[Hashable, Bounded] = {}

    def owner(self, owner: Hashable) -> Bounded:
        found = self._owners.get(owner)
        if found is None:
            found = self._owners[owner] = Bounded(self.width)
        return found

    def add(self, owner: Hashable, deltas: Mapping[Any, Sequence[int]], now: float) -> None:
        """One update's deltas for one owner: promotions first, then the deltas applied."""
        b = self.owner(owner)
        active = {k for k, v in deltas.items() if any(v)}
        for key in [k for k, o in b.own.items()
                    if now - o.last_active >= self.ttl and k not in active]:
            self._demote(b, key)
        ranked = sorted(((self._rank(v), k) for k, v in deltas.items() if k not in b.own),
                        key=lambda rk: -rk[0])
        fresh = set()  # promoted by this update: their rank already counts it
        for score, key in ranked:
            if score <= 0:
                break
            if len(b.own) >= self.top:
                weakest = min(b.own, key=lambda k: (b.own[k].recent + b.own[k].previous,
                                                    b.own[k].last_active,
                                                    self._rank(b.own[k].total)), default=None)
                if weakest is None or score <= b.own[weakest].recent + b.own[weakest].previous:
                    break  # sorted: no later candidate beats it either
                self._demote(b, weakest)
                fresh.discard(weakest)
            b.own[key] = _Own([0] * self.width, score, 0, now)
            fresh.add(key)
        for key, values in deltas.items():
            own = b.own.get(key)
            target = own.total if own is not None else b.other
            for i, v in enumerate(values):
                target[i] += v
            if own is not None:
                if key not in fresh:
                    own.recent += self._rank(values)
                if any(values):
                    own.last_active = now

    def add_other(self, owner: Hashable, values: Sequence[int]) -> None:
        """Counts that belong to no key (a baseline, a kernel map that was full)."""
        other = self.owner(owner).other
        for i, v in enumerate(values):
            other[i] += v

    def end_window(self) -> None:
        """A window boundary: `recent` moves to `previous`, so ranks cover two windows."""
        for b in self._owners.values():
            for own in b.own.values():
                own.previous, own.recent = own.recent, 0

    def _demote(self, b: Bounded, key: Hashable) -> None:
        gone = b.own.pop(key)
        for i, v in enumerate(gone.total):
            b.other[i] += v

    def series(self, owner: Hashable) -> Iterator[tuple[Hashable | None, Values]]:
        """(key, values) of each own series, then (None, `_other`'s values)."""
        b = self._owners.get(owner)
        if b is None:
            return
        for key, own in b.own.items():
            yield key, own.total
        yield None, b.other

    def owners(self) -> list[Hashable]:
        return list(self._owners)

    def forget(self, owner: Hashable) -> None:
        self._owners.pop(owner, None)
