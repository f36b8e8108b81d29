"""What differs between the CPU architectures podnetmon runs on: raw syscall numbers.

The few syscalls this project makes by number (glibc has no wrapper for bpf(2),
perf_event_open(2) or membarrier(2)) have one number on x86-64 and another on arm64, which uses the
asm-generic table. Numbers from the kernel's uapi headers:
arch/x86/entry/syscalls/syscall_64.tbl (installed as asm/unistd_64.h) and
include/uapi/asm-generic/unistd.h. Every other call into libc (setns, unshare, mount,
statfs, ioctl) goes by name and is portable as it is.

The machine is read when a number is first needed, not at import, so `podnetmon --help`
works anywhere; an architecture without a table fails there, naming the machine.
"""

from __future__ import annotations

import errno
import functools
import platform

# name -> number, per architecture (the names platform.machine() gives on Linux)
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"bpf": 321, "perf_event_open": 298, "capget": 125, "capset": 126,
               "membarrier": 324},
    "aarch64": {"bpf": 280, "perf_event_open": 241, "capget": 90, "capset": 91,
                "membarrier": 283},
}
# other spellings of the same machines (BSD, Go, Debian and macOS names)
ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


class UnsupportedArchitectureError(OSError):
    """No syscall table for this machine. An OSError (ENOSYS), so every caller that
    reports a failed bpf() or perf_event_open() reports this too, with the machine."""


def machine(name: str | None = None) -> str:
    """The canonical name of this machine (or of `name`): a key of SYSCALLS."""
    raw = platform.machine() if name is None else name
    canonical = ALIASES.get(raw.lower(), raw.lower())
    if canonical not in SYSCALLS:
        raise UnsupportedArchitectureError(
            errno.ENOSYS, f"podnetmon knows the syscall numbers of {', '.join(SYSCALLS)} "
            f"only, not of this machine ({raw or 'unknown'!r})")
    return canonical


def syscall_number(name: str, machine_name: str | None = None) -> int:
    """The number of syscall `name` on this machine (or on `machine_name`)."""
    return SYSCALLS[machine(machine_name)][name]


@functools.cache
def number(name: str) -> int:
    """syscall_number(name) for this machine, looked up once: for the calls made often."""
    return syscall_number(name)
