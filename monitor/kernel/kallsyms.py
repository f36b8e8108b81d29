"""Kernel addresses to function names, from /proc/kallsyms (for drop events' "function")."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from typing import IO


class Symbols:
    """Loaded on first use (the table is ~10 MB in Python, needed only by drop traces).

    The kernel decides whether the file shows real addresses when it is opened, by
    the opener's capabilities (CAP_SYSLOG, unless perf_event_paranoid <= 1); open()
    at start-up, before the daemon drops its capabilities, keeps that answer for the
    lazy read later.
    """

    def __init__(self, path: str = "/proc/kallsyms") -> None:
        self._path = path
        self._lock = threading.Lock()
        self._addrs: list[int] | None = None
        self._names: list[str] = []
        self._file: IO[str] | None = None

    def open(self) -> None:
        """Open the file now (with the capabilities the process holds now)."""
        try:
            self._file = open(self._path, encoding="ascii", errors="replace")  # noqa: SIM115
        except OSError:
            self._file = None

    def _load(self) -> None:
        entries = []
        try:
            f = self._file if self._file is not None else open(self._path, encoding="ascii",  # noqa: SIM115
                                                                errors="replace")
            with f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":  # text (code) symbols
                        entries.append((int(parts[0], 16), parts[2]))
        except OSError:
            pass
        entries.sort()
        if entries and entries[-1][0] == 0:  # kptr_restrict: every address reads as 0
            entries = []
        self._addrs = [a for a, _n in entries]
        self._names = [n for _a, n in entries]

    def resolve(self, address: int) -> str:
        """'function+0xoffset', or the address in hex when it cannot be named."""
        with self._lock:
            if self._addrs is None:
                self._load()
        assert self._addrs is not None  # noqa: S101 - set by _load
        i = bisect.bisect_right(self._addrs, address) - 1
        if i < 0 or not address:
            return hex(address)
        return f"{self._names[i]}+{address - self._addrs[i]:#x}"


def function_ranges(names: Iterable[str], path: str = "/proc/kallsyms") -> dict[str, tuple[int, int]]:
    """[start, end) of each named kernel function (its start to the next text symbol's),
    for programs that must know which function freed a packet. Empty where the file is
    unreadable or shows no addresses (kptr_restrict without CAP_SYSLOG), and without
    the names it lacks: the programs then count those frees as they come."""
    wanted = set(names)
    starts: dict[str, int] = {}
    addresses = []
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in "tTwW":
                    address = int(parts[0], 16)
                    addresses.append(address)
                    if parts[2] in wanted and len(parts) == 3:  # the core's, not a module's
                        starts[parts[2]] = address
    except (OSError, ValueError):
        return {}
    addresses.sort()
    out = {}
    for name, start in starts.items():
        after = bisect.bisect_right(addresses, start)
        if start and after < len(addresses):
            out[name] = (start, addresses[after])
    return out
