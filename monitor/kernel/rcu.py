"""Waiting out an RCU grace period from user space.

A TC program runs inside an RCU read-side section (softirq, or a task with bottom
halves off): once synchronize_rcu() has returned, every run that began before it has
ended, and every later run sees what was written before it. The daemon needs that
when it moves a device between classic tc and tcx (attach.py): a filter removed
through netlink is freed after a grace period, but nothing tells the caller when.
membarrier(MEMBARRIER_CMD_GLOBAL) is the one syscall that waits for one and does
nothing else (kernel/sched/membarrier.c: synchronize_rcu()). Kernels built with
nohz_full refuse that command; there the wait is a fixed sleep, thousands of times
longer than a program's run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import time

from monitor.kernel import arch

MEMBARRIER_CMD_GLOBAL = 1  # uapi linux/membarrier.h
FALLBACK_SECONDS = 0.1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def grace_period() -> bool:
    """Return after an RCU grace period: True if the kernel waited for one, False if it
    refused (nohz_full, no membarrier) and a FALLBACK_SECONDS sleep stood in."""
    ret = int(_libc.syscall(arch.number("membarrier"), MEMBARRIER_CMD_GLOBAL, 0, 0))
    if ret == 0:
        return True
    if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(ctypes.get_errno(), "membarrier(MEMBARRIER_CMD_GLOBAL) failed")
    time.sleep(FALLBACK_SECONDS)
    return False
