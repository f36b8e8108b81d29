"""perf_event_open(2) as include/uapi/linux/perf_event.h lays it out: the syscall, the
few perf_event_attr fields this project sets, the enable/disable ioctls, and the
records a perf ring holds (parse_records).

Both perf ring readers (monitor.kernel.perfring's own and monitor.kernel.perfbuffer's,
libbpf's) deliver records through parse_records; monitor.kernel.tracepoints opens its
tracepoint events here too. The layouts were checked with offsetof() against the
running kernel's BTF (perf_event_attr, perf_event_header).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable

from monitor.kernel import arch

# enum perf_type_id, perf_sw_ids, perf_event_sample_format, perf_event_type
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_DISABLE = 0x2401  # _IO('$', 1)
_ATTR_FLAG_DISABLED = 1 << 0  # the first bit of the flags word at offset 40

# struct perf_event_attr: type@0 size@4 config@8 sample_period@16 sample_type@24
# flags@40 wakeup_events@48. 128 is PERF_ATTR_SIZE_VER7; newer kernels (136 on 6.18)
# take a shorter attr as if the missing tail were zero.
_PERF_ATTR_SIZE = 128

_HEADER = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size
SAMPLE_HEADER = struct.Struct("<IHHI")  # the header and the u32 size of PERF_SAMPLE_RAW
_LOST = struct.Struct("<IHHQQ")  # the header, u64 id, u64 lost
_HEADER_SIZE = _HEADER.size

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]

EventCallback = Callable[[bytes], None]
LostCallback = Callable[[int], None]


class PerfError(OSError):
    """perf_event_open(2), a perf ioctl or the ring mmap failed; errno is kept."""


def perf_event_open(attr: ctypes.Array[ctypes.c_char], pid: int, cpu: int, group_fd: int,
                    flags: int) -> int:
    """The raw syscall; raises PerfError (OSError) with errno on failure."""
    fd = int(_libc.syscall(arch.number("perf_event_open"), attr, ctypes.c_int(pid), ctypes.c_int(cpu),
                           ctypes.c_int(group_fd), ctypes.c_ulong(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        raise PerfError(err, f"perf_event_open(cpu={cpu}): {os.strerror(err)}")
    return fd


def perf_attr(type_: int, config: int, *, sample_period: int = 1, sample_type: int = 0,
              wakeup_events: int = 0, disabled: bool = False) -> ctypes.Array[ctypes.c_char]:
    """A struct perf_event_attr with the few fields this project sets."""
    buf = ctypes.create_string_buffer(_PERF_ATTR_SIZE)
    struct.pack_into("<IIQQQ", buf, 0, type_, _PERF_ATTR_SIZE, config, sample_period, sample_type)
    struct.pack_into("<Q", buf, 40, _ATTR_FLAG_DISABLED if disabled else 0)
    struct.pack_into("<I", buf, 48, wakeup_events)
    return buf


def perf_ioctl(fd: int, request: int, arg: int = 0) -> None:
    if _libc.ioctl(fd, request, arg) < 0:
        err = ctypes.get_errno()
        raise PerfError(err, f"ioctl({request:#x}) on perf fd {fd}: {os.strerror(err)}")


def parse_records(data: bytes, on_event: EventCallback, on_lost: LostCallback) -> int:
    """Deliver the records in `data` (whole records, oldest first); returns samples delivered.

    A sample's bytes are exactly the `size` the kernel wrote: that includes the
    padding that keeps records 8-byte aligned, so callers that need the exact
    length must carry it in the payload. A header smaller than itself (a zero
    size) or running past the end means the data cannot be trusted: the rest is
    dropped and the reader carries on at the kernel's head.
    """
    off, end, delivered = 0, len(data), 0
    while end - off >= _HEADER_SIZE:
        rtype, _misc, size = _HEADER.unpack_from(data, off)
        if size < _HEADER_SIZE or size > end - off:
            break
        if rtype == PERF_RECORD_SAMPLE and size >= SAMPLE_HEADER.size:
            raw = SAMPLE_HEADER.unpack_from(data, off)[3]
            start = off + SAMPLE_HEADER.size
            if raw <= size - SAMPLE_HEADER.size:
                on_event(data[start:start + raw])
                delivered += 1
        elif rtype == PERF_RECORD_LOST and size >= _LOST.size:
            on_lost(_LOST.unpack_from(data, off)[4])
        # anything else (this attr asks for no other record type) is skipped by its size
        off += size
    return delivered
