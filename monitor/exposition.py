"""Metric families and the /metrics exposition, made for one scrape of many pods.

prometheus_client builds a Sample (with a dict of labels) for every line and, when
it writes them out, sorts, validates and escapes every label of every line again: at
500 pods that is 80,000 lines and most of a second per scrape. Here a family keeps
each series as a tuple of label values and plain numbers; the renderer sorts a
family's label names once, escapes and joins a series' labels once (not once per
histogram line), writes a histogram's 30 lines with one %-format from a template made
once per family, and joins the whole scrape once.

The bytes are exactly prometheus_client's for the same data, in the Prometheus text
format 0.0.4 (and 1.0.0) and OpenMetrics 1.0.0, under every name-escaping scheme its
`choose_encoder` negotiates, so dashboards, rules and parsers see no change.
tests/unit/test_exposition.py proves it against prometheus_client itself, which stays
a dependency as the oracle (and as `podnetmon top`'s parser).

Only what podnetmon exports is supported: counters, gauges and histograms with
legacy (ASCII) metric and label names, no timestamps, exemplars, units or
`_created` samples.

Numbers and names as prometheus_client writes them are in monitor/promtext.py, the
choice of format from a scraper's Accept header in monitor/scrapeformat.py.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from operator import itemgetter
from typing import Any, ClassVar, Protocol

from monitor.promtext import (
    EXACT,
    escape_name,
    escape_value,
    go_float,
    header_name,
    label_name,
    sample_value,
)
from monitor.scrapeformat import TEXT, Format

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# -- families ----------------------------------------------------------------------------------------

class Family:
    """One metric family: a name, its HELP text, label names, and its series in order."""

    type: ClassVar[str]
    sample_suffixes: ClassVar[tuple[str, ...]]  # what the samples' names add to the name
    series: Sequence[tuple[Any, ...]]  # (label values, then the numbers), in output order

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: a label name twice in {list(labels)}")
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.series)} series)"

    def _check(self, values: tuple[str, ...]) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: values {values} for labels {self.labels}")


class CounterFamily(Family):
    """A counter: `name` without _total (the samples are name_total, as Prometheus has it)."""

    type = "counter"
    sample_suffixes = ("_total", "_created")

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labels)
        self.series: list[tuple[tuple[str, ...], float]] = []

    def add(self, values: tuple[str, ...], value: float) -> None:
        self._check(values)
        self.series.append((values, value))


class GaugeFamily(Family):
    type = "gauge"
    sample_suffixes = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self.series: list[tuple[tuple[str, ...], float]] = []

    def add(self, values: tuple[str, ...], value: float) -> None:
        self._check(values)
        self.series.append((values, value))


class HistogramFamily(Family):
    """A histogram with fixed buckets: `bounds` are the le values as written, +Inf last."""

    type = "histogram"
    sample_suffixes = ("_bucket", "_sum", "_count", "_created")

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 bounds: Sequence[str]) -> None:
        super().__init__(name, documentation, labels)
        if "le" in self.labels:
            raise ValueError(f"{name}: le is the bucket label")
        if not bounds or bounds[-1] != "+Inf":
            raise ValueError(f"{name}: the last bucket must be +Inf")
        if float(bounds[0]) < 0:  # prometheus_client then leaves _sum and _count out
            raise ValueError(f"{name}: negative buckets are not supported")
        self.bounds = tuple(bounds)
        self.series: list[tuple[tuple[str, ...], Sequence[int], float]] = []

    def add(self, values: tuple[str, ...], counts: Sequence[int], sum_value: float) -> None:
        """`counts`: observations per bucket, not cumulative (the last: beyond every finite
        bound); their total is _count."""
        self._check(values)
        if len(counts) != len(self.bounds):
            raise ValueError(f"{self.name}: {len(counts)} counts for {len(self.bounds)} buckets")
        self.series.append((values, counts, sum_value))


class Collector(Protocol):
    """What a Registry renders: families afresh at every scrape, and their names without
    reading anything (for the duplicate check at registration)."""

    def describe(self) -> Iterable[Family]: ...
    def collect(self) -> Iterable[Family]: ...

# -- rendering ---------------------------------------------------------------------------------------

def _sample_name(name: str, fmt: Format) -> str:
    """A sample's name on its line: the text format writes it as on HELP/TYPE lines;
    prometheus_client's OpenMetrics writer escapes it with label-name runes instead."""
    if fmt.openmetrics:
        return escape_name(name, fmt.escaping, False)
    return header_name(name, fmt.escaping)


def _header(family: Family, fmt: Format) -> str:
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    kind = family.type
    name = family.name
    if fmt.openmetrics:
        doc = doc.replace('"', r"\"")
    elif kind == "counter":
        name += "_total"  # the text format names a counter family by its samples
    name = header_name(name, fmt.escaping)
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _sorted(names: Sequence[str]) -> tuple[int, ...]:
    """The order prometheus_client writes labels in: sorted by name."""
    return tuple(sorted(range(len(names)), key=names.__getitem__))


def _template(names: Sequence[str], order: Sequence[int], escaping: str) -> str:
    """A %-template of labels in `order`: name="%s" joined by commas (a name has no %)."""
    return ",".join(f'{label_name(names[i], escaping)}="%s"' for i in order)


def _picker(order: Sequence[int]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    """A series' label values in `order`, escaped: one join and three scans per series
    finds the rare value that needs escaping, instead of three replace() per value."""
    # itemgetter(i) would give the value itself, not a 1-tuple: a slice does
    pick: Callable[[tuple[str, ...]], tuple[str, ...]] = (
        itemgetter(*order) if len(order) > 1 else itemgetter(slice(order[0], order[0] + 1)))

    def picked(values: tuple[str, ...]) -> tuple[str, ...]:
        out = pick(values)
        joined = "".join(out)
        if "\\" in joined or "\n" in joined or '"' in joined:
            return tuple(map(escape_value, out))
        return out

    return picked


def _render_simple(family: CounterFamily | GaugeFamily, fmt: Format, out: list[str]) -> None:
    suffix = "_total" if family.type == "counter" else ""
    name = _sample_name(family.name + suffix, fmt)
    if not family.labels:
        out.extend([f"{name} {sample_value(value)}\n" for _, value in family.series])
        return
    order = _sorted(family.labels)
    line = f"{name}{{{_template(family.labels, order, fmt.escaping)}}} %s\n"
    picked = _picker(order)
    out.extend([line % (*picked(values), sample_value(value)) for values, value in family.series])


# A histogram series' text, by its label values, with the counts and sum it was made from.
_Rendered = dict[tuple[str, ...], tuple[Sequence[int], float, str]]


class RenderCache:
    """Histogram series' text from the last scrape, reused while their numbers stand still.

    Three quarters of a 500-pod scrape are histogram bucket lines, and most of them
    belong to series that did not move since the scrape before (an idle pod's DNS or
    handshake latencies): comparing 28 counts costs a tenth of writing 30 lines. Keyed by
    everything the text depends on besides the numbers (the family's name, labels and
    bounds, and the format); a scrape keeps only the series it wrote, so series of gone
    pods go with it. Concurrent scrapes each build their own generation and the last one
    stored wins: an entry is only ever used when its numbers match.
    """

    def __init__(self) -> None:
        self._families: dict[tuple[object, ...], _Rendered] = {}

    def take(self, family: HistogramFamily, fmt: Format) -> tuple[_Rendered, _Rendered]:
        """(the last scrape's series of this family, a fresh dict for this scrape's)."""
        key = (family.name, family.labels, family.bounds, fmt)
        fresh: _Rendered = {}
        old = self._families.get(key, {})
        self._families[key] = fresh
        return old, fresh


def _render_histogram(family: HistogramFamily, fmt: Format, out: list[str],
                      cache: RenderCache | None = None) -> None:
    bucket = _sample_name(family.name + "_bucket", fmt)
    names = family.labels
    order = _sorted(names)
    # le takes its sorted place among the labels: a bucket line is its head (name and
    # the labels sorted before le), le="...", its tail (the labels after le) and the value
    split = bisect_left([names[i] for i in order], "le")
    before = _template(names, order[:split], fmt.escaping)
    after = _template(names, order[split:], fmt.escaping)
    every = _template(names, order, fmt.escaping)
    picked = _picker(order) if names else None
    le = label_name("le", fmt.escaping)
    # the whole series as one %-template, written in one go: (head, tail, value) for each
    # bucket, then the labels and value of _count and of _sum
    series = "".join([f'%s{le}="{escape_value(b).replace("%", "%%")}"%s%s\n'
                      for b in family.bounds])
    series += (f"{_sample_name(family.name + '_count', fmt)}%s %s\n"
               f"{_sample_name(family.name + '_sum', fmt)}%s %s\n")
    head, tail, labels = f"{bucket}{{", "} ", ""
    last, kept = cache.take(family, fmt) if cache is not None else ({}, None)
    for values, counts, sum_value in family.series:
        seen = last.get(values)
        if seen is not None and seen[1] == sum_value and seen[0] == counts:
            out.append(seen[2])
            if kept is not None:
                kept[values] = seen
            continue
        if picked is not None:
            label_values = picked(values)
            if split:
                head = f"{bucket}{{{before % label_values[:split]},"
            if split < len(names):
                tail = f",{after % label_values[split:]}}} "
            labels = f"{{{every % label_values}}}"
        numbers = [f"{n}.0" if type(n) is int and -EXACT < n < 1_000_000 else go_float(n)
                   for n in accumulate(counts)]  # sample_value, inlined: 30 a series
        args: list[str] = [head, tail, ""] * len(numbers)
        args[2::3] = numbers
        args += (labels, numbers[-1], labels, go_float(sum_value))
        text = series % tuple(args)
        out.append(text)
        if kept is not None:
            kept[values] = (counts, sum_value, text)


def render(families: Iterable[Family], fmt: Format, cache: RenderCache | None = None) -> bytes:
    """The exposition of `families`, in order, as prometheus_client would write it."""
    out: list[str] = []
    for family in families:
        out.append(_header(family, fmt))
        if isinstance(family, HistogramFamily):
            _render_histogram(family, fmt, out, cache)
        elif isinstance(family, CounterFamily | GaugeFamily):
            _render_simple(family, fmt, out)
        else:
            raise TypeError(f"{family!r}: not a family this renderer knows")
    if fmt.openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode()


# -- the registry ------------------------------------------------------------------------------------

class DuplicateSeriesError(ValueError):
    """Two collectors would write series of the same name."""


def sample_names(family: Family) -> list[str]:
    """Every name a family's samples can take (what must not clash between collectors)."""
    return [family.name, *(family.name + s for s in family.sample_suffixes)]


class Registry:
    """The collectors /metrics renders, and what rendering them costs."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._scrapes = 0
        self._scrape_seconds = 0.0
        self._cache = RenderCache()

    def register(self, collector: Collector) -> None:
        """Add a collector; its describe() must name no series another one writes."""
        names = {n for family in collector.describe() for n in sample_names(family)}
        with self._lock:
            clash = self._names & names
            if clash:
                raise DuplicateSeriesError(f"duplicated series: {sorted(clash)}")
            self._names |= names
            self._collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            yield from collector.collect()

    def render(self, fmt: Format = TEXT) -> bytes:
        """One scrape: every collector's families, rendered; timed for scrape_stats()."""
        start = time.perf_counter()
        body = render(self.collect(), fmt, self._cache)
        elapsed = time.perf_counter() - start
        with self._lock:
            self._scrapes += 1
            self._scrape_seconds += elapsed
        return body

    def scrape_stats(self) -> tuple[int, float]:
        """Scrapes rendered so far and the seconds they took (a scrape counts once done)."""
        with self._lock:
            return self._scrapes, self._scrape_seconds
