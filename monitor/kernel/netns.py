"""Entering and making network namespaces: setns(2) and unshare(2) through libc.

Python 3.11 has neither (os.setns arrives in 3.12). libc's wrappers are called by name,
so no syscall number is involved, and resolved at import: a forked child (a pause
process between fork and exec) only calls them.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


def unshare() -> None:
    """Give the calling process a network namespace of its own, new and empty."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
