"""What a scraper gets from /metrics: the format and name escaping its Accept header
asks for, chosen as prometheus_client's choose_encoder chooses, and the Content-Type
that says so. Apart from the writer (monitor/exposition.py) because this is the
HTTP side: it reads what a client wrote, and nothing of it may reach a header unchecked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monitor.promtext import ALLOW_UTF8, DOTS, UNDERSCORES, VALUES

_ESCAPINGS = (ALLOW_UTF8, UNDERSCORES, DOTS, VALUES)

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_TEXT_1 = "text/plain; version=1.0.0; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# The OpenMetrics versions answered as asked for, the ones prometheus_client writes. Any
# other version= is never echoed into Content-Type (see negotiate).
OPENMETRICS_VERSIONS = ("1.0.0", "2.0.0")


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
