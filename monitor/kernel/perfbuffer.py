"""libbpf's perf_buffer reading a BPF_PERF_OUTPUT map's rings (ctypes): the reader
PerfReader (monitor.kernel.perfring) takes off x86-64, for the barriers the perf ABI
asks for, which ours cannot give there (see perfring's docstring). It calls back once
per record.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

from monitor.kernel.perfevent import (
    PERF_RECORD_SAMPLE,
    SAMPLE_HEADER,
    EventCallback,
    LostCallback,
    PerfError,
    parse_records,
)

# libbpf's perf_buffer (libbpf.so.1, >= 0.6 for perf_buffer__new_raw's signature; bcc's
# Debian package depends on libbpf1): the same rings, read in C with the barriers the
# perf ABI asks for on every architecture (smp_load_acquire of data_head,
# smp_store_release of data_tail), each record handed to a Python callback.
_LIBBPF_PERF_EVENT_ERROR, _LIBBPF_PERF_EVENT_CONT = -1, -2
_EVENT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


class _PerfBufferRawOpts(ctypes.Structure):
    """struct perf_buffer_raw_opts (libbpf >= 1.0): sz, two zero-width `long :0`, cpu_cnt,
    cpus, map_keys; 32 bytes on LP64."""

    _fields_ = [("sz", ctypes.c_size_t), ("cpu_cnt", ctypes.c_int),
                ("cpus", ctypes.POINTER(ctypes.c_int)), ("map_keys", ctypes.POINTER(ctypes.c_int))]


@functools.cache
def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with the perf_buffer functions typed; PerfError if it is not installed."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise PerfError(errno.ENOENT, f"libbpf ({name}) cannot be loaded: {exc}") from None
    lib.perf_buffer__new_raw.restype = ctypes.c_void_p
    lib.perf_buffer__new_raw.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p,
                                         _EVENT_FN, ctypes.c_void_p,
                                         ctypes.POINTER(_PerfBufferRawOpts)]
    lib.perf_buffer__free.restype = None
    lib.perf_buffer__free.argtypes = [ctypes.c_void_p]
    lib.perf_buffer__epoll_fd.restype = ctypes.c_int
    lib.perf_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
    lib.perf_buffer__consume.restype = ctypes.c_int
    lib.perf_buffer__consume.argtypes = [ctypes.c_void_p]
    return lib


class LibbpfRings:
    """One PERF_EVENT_ARRAY's rings opened and read by libbpf's perf_buffer__new_raw.

    libbpf opens the perf events with our attr on the CPUs given, mmaps them, stores
    their fds under the same keys, reads each ring with the perf ABI's barriers and
    calls back once per record (a record that wraps past the end of the ring comes
    joined, in libbpf's own buffer); perf_buffer__free deletes the map entries again.
    """

    def __init__(self, map_fd: int, cpus: list[int], *, pages: int,
                 attr: ctypes.Array[ctypes.c_char], on_event: EventCallback,
                 on_lost: LostCallback) -> None:
        self._lib = libbpf()
        self._on_event, self._on_lost = on_event, on_lost
        self.delivered = 0
        self._error: BaseException | None = None
        self._callback = _EVENT_FN(self._record)  # kept alive as long as libbpf may call it
        self._attr = attr
        keys = (ctypes.c_int * len(cpus))(*cpus)
        self._cpus = keys
        opts = _PerfBufferRawOpts(ctypes.sizeof(_PerfBufferRawOpts), len(cpus), keys, keys)
        pb = self._lib.perf_buffer__new_raw(map_fd, pages, ctypes.addressof(attr),
                                            self._callback, None, ctypes.byref(opts))
        if not pb:
            err = ctypes.get_errno() or errno.EINVAL
            raise PerfError(err, f"libbpf perf_buffer__new_raw on map fd {map_fd} ({pages} "
                            f"pages a CPU): {os.strerror(err)}")
        self._pb: int | None = pb

    def _record(self, _ctx: int | None, _cpu: int, header: int) -> int:
        try:
            size = ctypes.c_uint16.from_address(header + 6).value  # perf_event_header.size
            data = ctypes.string_at(header, size)
            if size >= SAMPLE_HEADER.size:  # the common case inline: a sample, one unpack
                rtype, _misc, _size, raw = SAMPLE_HEADER.unpack_from(data)
                if rtype == PERF_RECORD_SAMPLE and raw <= size - SAMPLE_HEADER.size:
                    self._on_event(data[SAMPLE_HEADER.size:SAMPLE_HEADER.size + raw])
                    self.delivered += 1
                    return _LIBBPF_PERF_EVENT_CONT
            self.delivered += parse_records(data, self._on_event, self._on_lost)
        except BaseException as exc:  # noqa: BLE001 - carried across C, raised in consume()
            self._error = exc
            return _LIBBPF_PERF_EVENT_ERROR  # libbpf stops this ring; the record is consumed
        return _LIBBPF_PERF_EVENT_CONT

    def fileno(self) -> int:
        if self._pb is None:
            raise ValueError("the perf reader is closed")
        return int(self._lib.perf_buffer__epoll_fd(self._pb))

    def consume(self) -> int:
        """Every ring read to its head; returns samples delivered."""
        if self._pb is None:
            raise ValueError("the perf reader is closed")
        self.delivered, self._error = 0, None
        ret = self._lib.perf_buffer__consume(self._pb)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if ret < 0:
            raise PerfError(-ret, f"libbpf perf_buffer__consume: {os.strerror(-ret)}")
        return self.delivered

    def close(self) -> None:
        if self._pb is not None:
            self._lib.perf_buffer__free(self._pb)
            self._pb = None
