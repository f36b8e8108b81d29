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
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from operator import itemgetter
from typing import Any, ClassVar, Protocol

# Name escaping schemes a scraper may ask for (the Accept header's escaping=).
ALLOW_UTF8, UNDERSCORES, DOTS, VALUES = "allow-utf-8", "underscores", "dots", "values"
_ESCAPINGS = (ALLOW_UTF8, UNDERSCORES, DOTS, VALUES)

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_TEXT_1 = "text/plain; version=1.0.0; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# The OpenMetrics versions answered as asked for, the ones prometheus_client writes. Any
# other version= is never echoed into Content-Type (see negotiate).
OPENMETRICS_VERSIONS = ("1.0.0", "2.0.0")

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


# -- numbers and names, as prometheus_client writes them --------------------------------------------

def go_float(value: float) -> str:
    """A sample value as Go (and so prometheus_client.utils.floatToGoString) prints it."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    # Go's shortest form takes an exponent from 10^6 up, Python's repr() from 10^16 only:
    # prometheus_client rewrites repr() the Go way past six integer digits (positives only)
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


_EXACT = 10**15  # below this an int converts to float exactly and repr() shows it in full


def _number(value: float) -> str:
    """go_float, with a short cut for the common case: a counter's int below 10^6."""
    # repr(float(n)) is f"{n}.0" for |n| < 10^16; go_float leaves it so up to 6 digits
    # (and for every negative n, which never takes the exponent form)
    if type(value) is int and -_EXACT < value < 1_000_000:
        return f"{value}.0"
    return go_float(value)


def _escape_value(value: str) -> str:
    """A label value (or OpenMetrics HELP text) in double quotes: \\, newline and " escaped."""
    if "\\" in value or "\n" in value or '"' in value:  # rare: skip three replace() scans
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _is_label_rune(c: str, i: int) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z" or c == "_" or ("0" <= c <= "9" and i > 0)


def _is_metric_rune(c: str, i: int) -> bool:
    return _is_label_rune(c, i) or c == ":"


def _escape_name(name: str, escaping: str, metric_runes: bool) -> str:
    """A (valid, legacy) name under an escaping scheme, as prometheus_client's _escape does
    it; `metric_runes`: ':' counts as valid (metric names) or not (label names)."""
    valid = _is_metric_rune if metric_runes else _is_label_rune
    if escaping == UNDERSCORES:
        return "".join(c if valid(c, i) else "_" for i, c in enumerate(name))
    if escaping == DOTS:
        return "".join("__" if c == "_" else "_dot_" if c == "." else c if valid(c, i) else "__"
                       for i, c in enumerate(name))
    if escaping == VALUES:  # legacy names are valid UTF-8: no _FFFD_ case
        return "U__" + "".join("__" if c == "_" else c if valid(c, i) else f"_{ord(c):x}_"
                               for i, c in enumerate(name))
    return _escape_value(name)  # allow-utf-8


def _header_name(name: str, escaping: str) -> str:
    """A metric name on HELP/TYPE lines (and text-format samples): escape_metric_name.
    Legacy names are left alone except under dots, which always rewrites."""
    return _escape_name(name, escaping, True) if escaping == DOTS else name


def _label_name(name: str, escaping: str) -> str:
    """escape_label_name for a legacy label name: only dots rewrites it."""
    return _escape_name(name, escaping, False) if escaping == DOTS else name


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


# -- negotiation -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """What a scraper gets: OpenMetrics or the Prometheus text format, and name escaping."""

    openmetrics: bool
    escaping: str
    content_type: str


TEXT = Format(False, UNDERSCORES, CONTENT_TYPE_TEXT)
OPENMETRICS = Format(True, UNDERSCORES, CONTENT_TYPE_OPENMETRICS)


def _param(tokens: Sequence[str], key: str) -> str:
    for tok in tokens:
        if "=" in tok:
            name, value = tok.strip().split("=", 1)
            if name == key:
                return value
    return ""


def _escaping(tokens: Sequence[str]) -> str:
    for tok in tokens:
        if "=" in tok:
            name, value = tok.strip().split("=", 1)
            if name == "escaping":
                return value if value in _ESCAPINGS else UNDERSCORES
    return UNDERSCORES


def _version(version: str) -> tuple[int | str, ...]:
    parts: list[int | str] = []
    for part in version.split("."):
        try:
            parts.append(int(part))
        except ValueError:
            parts.append(part)
    return tuple(parts)


def _at_least_1(version: str) -> bool:
    # a tuple comparison as prometheus_client makes it, except that a version part that is
    # not a number (which raises TypeError there, dropping the connection) means "no":
    # a bad Accept header gets the text format, never a failed scrape
    try:
        return _version(version) >= (1, 0, 0)
    except TypeError:
        return False


def negotiate(accept: str) -> Format:
    """The format for an Accept header, chosen as prometheus_client's choose_encoder does:
    the first OpenMetrics entry of a version it writes (or none given), else the first
    text/plain entry of version >= 1.0.0, else the text format 0.0.4. Prometheus asks
    for OpenMetrics first. (The OpenMetrics version only matters to native histograms,
    which podnetmon has none of: the body is 1.0.0's whatever the version.)

    Unlike choose_encoder, nothing the client wrote reaches Content-Type unchecked: that
    echoes any version that compares >= (1, 0, 0), such as `1.5.<script>` or one with
    an obs-folded CRLF in it, into the response's headers. Here the version must be one
    of OPENMETRICS_VERSIONS (surrounding spaces aside) and the escaping one of the four
    schemes; an OpenMetrics entry with any other version is passed over, as
    choose_encoder passes over 0.0.1."""
    for accepted in (accept or "").split(","):
        tokens = accepted.split(";")
        mime = tokens[0].strip()
        if mime == "application/openmetrics-text":
            version, escaping = _param(tokens, "version").strip(), _escaping(tokens)
            if not version:
                return OPENMETRICS
            if version in OPENMETRICS_VERSIONS:
                return Format(True, escaping, f"application/openmetrics-text; version={version}; "
                                              f"charset=utf-8; escaping={escaping}")
        elif mime == "text/plain":
            version, escaping = _param(tokens, "version"), _escaping(tokens)
            if version and _at_least_1(version):
                return Format(False, escaping, f"{CONTENT_TYPE_TEXT_1}; escaping={escaping}")
    return TEXT


# -- rendering ---------------------------------------------------------------------------------------

def _sample_name(name: str, fmt: Format) -> str:
    """A sample's name on its line: the text format writes it as on HELP/TYPE lines;
    prometheus_client's OpenMetrics writer escapes it with label-name runes instead."""
    if fmt.openmetrics:
        return _escape_name(name, fmt.escaping, False)
    return _header_name(name, fmt.escaping)


def _header(family: Family, fmt: Format) -> str:
    doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
    kind = family.type
    name = family.name
    if fmt.openmetrics:
        doc = doc.replace('"', r"\"")
    elif kind == "counter":
        name += "_total"  # the text format names a counter family by its samples
    name = _header_name(name, fmt.escaping)
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


def _sorted(names: Sequence[str]) -> tuple[int, ...]:
    """The order prometheus_client writes labels in: sorted by name."""
    return tuple(sorted(range(len(names)), key=names.__getitem__))


def _template(names: Sequence[str], order: Sequence[int], escaping: str) -> str:
    """A %-template of labels in `order`: name="%s" joined by commas (a name has no %)."""
    return ",".join(f'{_label_name(names[i], escaping)}="%s"' for i in order)


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
            return tuple(map(_escape_value, out))
        return out

    return picked


def _render_simple(family: CounterFamily | GaugeFamily, fmt: Format, out: list[str]) -> None:
    suffix = "_total" if family.type == "counter" else ""
    name = _sample_name(family.name + suffix, fmt)
    if not family.labels:
        out.extend([f"{name} {_number(value)}\n" for _, value in family.series])
        return
    order = _sorted(family.labels)
    line = f"{name}{{{_template(family.labels, order, fmt.escaping)}}} %s\n"
    picked = _picker(order)
    out.extend([line % (*picked(values), _number(value)) for values, value in family.series])


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
    le = _label_name("le", fmt.escaping)
    # the whole series as one %-template, written in one go: (head, tail, value) for each
    # bucket, then the labels and value of _count and of _sum
    series = "".join([f'%s{le}="{_escape_value(b).replace("%", "%%")}"%s%s\n'
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
        numbers = [f"{n}.0" if type(n) is int and -_EXACT < n < 1_000_000 else go_float(n)
                   for n in accumulate(counts)]  # _number, inlined: 30 a series
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
