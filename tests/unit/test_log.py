"""The log set-up: where lines go, and that a replaced stderr never breaks a caller."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator

import pytest
import structlog

from monitor import log


@pytest.fixture
def restored() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_a_stderr_closed_since_configure_does_not_break_logging(restored: None) -> None:
    # A command run under a capture configures logging while sys.stderr is the capture's
    # file; once that file is closed, every later log line used to raise ValueError in
    # whichever thread logged it (the reconciler's, the listener's).
    real = sys.stderr
    captured = io.StringIO()
    sys.stderr = captured
    try:
        log.configure("info", "json")
    finally:
        sys.stderr = real
    captured.close()
    now = io.StringIO()
    sys.stderr = now
    try:
        log.get("test").info("still logging", n=1)
    finally:
        sys.stderr = real
    line = json.loads(now.getvalue())
    assert (line["event"], line["component"], line["n"]) == ("still logging", "test", 1)


def test_a_given_stream_receives_every_line(restored: None) -> None:
    out = io.StringIO()
    log.configure("debug", "json", stream=out)
    log.get("test").debug("to the stream")
    assert json.loads(out.getvalue())["event"] == "to the stream"


def test_the_level_filters(restored: None) -> None:
    out = io.StringIO()
    log.configure("warning", "json", stream=out)
    log.get("test").info("hidden")
    log.get("test").warning("shown")
    assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == ["shown"]
