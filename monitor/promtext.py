"""Numbers and names on exposition lines, written as prometheus_client writes them.

Each function is one of prometheus_client's (floatToGoString, escape_metric_name,
escape_label_name, its label-value escaping), for legacy (ASCII) metric and label
names only: the byte-for-byte part of monitor/exposition.py, apart so that what must
track prometheus_client's writers is in one place. tests/unit/test_exposition.py
checks it against prometheus_client itself.
"""

from __future__ import annotations

import math

# Name escaping schemes a scraper may ask for (the Accept header's escaping=).
ALLOW_UTF8, UNDERSCORES, DOTS, VALUES = "allow-utf-8", "underscores", "dots", "values"


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


EXACT = 10**15  # below this an int converts to float exactly and repr() shows it in full


def sample_value(value: float) -> str:
    """go_float, with a short cut for the common case: a counter's int below 10^6."""
    # repr(float(n)) is f"{n}.0" for |n| < 10^16; go_float leaves it so up to 6 digits
    # (and for every negative n, which never takes the exponent form)
    if type(value) is int and -EXACT < value < 1_000_000:
        return f"{value}.0"
    return go_float(value)


def escape_value(value: str) -> str:
    """A label value (or OpenMetrics HELP text) in double quotes: \\, newline and " escaped."""
    if "\\" in value or "\n" in value or '"' in value:  # rare: skip three replace() scans
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _is_label_rune(c: str, i: int) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z" or c == "_" or ("0" <= c <= "9" and i > 0)


def _is_metric_rune(c: str, i: int) -> bool:
    return _is_label_rune(c, i) or c == ":"


def escape_name(name: str, escaping: str, metric_runes: bool) -> str:
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
    return escape_value(name)  # allow-utf-8


def header_name(name: str, escaping: str) -> str:
    """A metric name on HELP/TYPE lines (and text-format samples): escape_metric_name.
    Legacy names are left alone except under dots, which always rewrites."""
    return escape_name(name, escaping, True) if escaping == DOTS else name


def label_name(name: str, escaping: str) -> str:
    """escape_label_name for a legacy label name: only dots rewrites it."""
    return escape_name(name, escaping, False) if escaping == DOTS else name
