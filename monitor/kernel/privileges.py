"""Dropping the capabilities the daemon needs only to start.

Once the programs are loaded, the tracepoints attached and bpffs mounted, the
daemon still needs, for as long as it runs:

    BPF         every bpf(2) call: map reads at scrape time, slot writes, links
    PERFMON     perf buffers, opened when the first trace starts (their rings cost
                kernel memory per CPU, so they are not allocated on every node up front)
    NET_ADMIN   attaching to and detaching from new pods' veths (tc, tcx)
    SYS_PTRACE  opening new pause processes' /proc/<pid>/ns/net

Everything else a root process holds (SYS_ADMIN for mounting bpffs or for
BPF_ENABLE_STATS, DAC_OVERRIDE, SYS_MODULE, ...) is dropped from the effective,
permitted and inheritable sets. Capabilities are per thread in Linux, so this runs
in the main thread before any other thread starts; threads made afterwards
inherit the reduced sets.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable

from monitor.kernel import arch

CAP_DAC_OVERRIDE = 1
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
RUNTIME_CAPABILITIES = (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE)
# Every capability by its number (linux/capability.h), as Kubernetes spells them in a
# securityContext: the log names what was dropped and kept in those words.
NAMES = dict(enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
    "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
    "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
    "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
    "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
    "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")))
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _call(name: str, data: ctypes.Array[_Data]) -> None:
    """capget(2) or capset(2), by its number on this architecture (monitor.kernel.arch)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    if libc.syscall(arch.number(name), ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def current() -> tuple[int, int]:
    """(effective, permitted) of the calling thread, as 64-bit masks."""
    data = (_Data * 2)()
    _call("capget", data)
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32)


def mask(caps: Iterable[int]) -> int:
    out = 0
    for cap in caps:
        out |= 1 << cap
    return out


def names(bits: int) -> list[str]:
    return [NAMES.get(i, str(i)) for i in range(64) if bits >> i & 1]


def drop_to(keep: Iterable[int] = RUNTIME_CAPABILITIES) -> list[str]:
    """Keep only `keep` (of what the thread has); returns the names of what was dropped."""
    effective, permitted = current()
    wanted = mask(keep) & permitted
    dropped = permitted & ~wanted
    if not dropped and effective == wanted:
        return []
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = data[i].permitted = (wanted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = 0
    _call("capset", data)
    return names(dropped)
