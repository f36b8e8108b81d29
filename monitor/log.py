"""structlog set-up: JSON lines when stderr is not a terminal, a console renderer when it is.

Events are constant lowercase phrases with bound keys; the daemon logs state
changes (attached, detached, errors), never per scrape or per packet.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr:
    """Writes each line to whatever sys.stderr is at that moment.

    structlog's PrintLogger keeps the file it was given; a configure() made while
    sys.stderr was replaced (a test's capture, a redirect undone since) would then
    write every later line to a closed file and raise in the caller's thread.
    """

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = msg


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up logging; `stream` pins the output to one file (else sys.stderr as it is then)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (structlog.dev.ConsoleRenderer() if fmt == "console"
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=(structlog.PrintLoggerFactory(file=stream) if stream is not None
                        else lambda *_args: _CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name).bind(component=name)
