"""Read a BPF_MAP_TYPE_PERF_EVENT_ARRAY map (BCC's BPF_PERF_OUTPUT) without bcc.

One perf event of type PERF_COUNT_SW_BPF_OUTPUT per online CPU, each with its
own mmap'ed ring, its fd stored in the map under the CPU's index: that is where
bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, ...) writes. The layouts
follow include/uapi/linux/perf_event.h and were checked with offsetof() against
the running kernel's BTF (perf_event_attr, perf_event_mmap_page).

The ring parser (`Ring`, `parse_records`) works on any writable buffer laid out
like a perf mmap (one metadata page, then the data area), so it is tested
without a kernel.

Memory ordering: the kernel writes a record, then (release) data_head; we read
data_head, then the records, then store data_tail. The reader below relies on
x86-64's TSO (the syscall numbers are per architecture, arch.py), which gives exactly
what the perf ABI asks for with plain accesses: a load is never reordered with
an older load (records are read after head), and a store is never reordered
with an older load (the tail store cannot pass the record reads). Python has
no compiler barrier to offer; the loads and stores happen inside separate C
calls (ctypes field access, mmap slicing) that the compiler cannot move across
each other. On a weakly ordered architecture this would need real fences.
Each access to data_head/data_tail must also be a single 8-byte load or store:
see Ring.__init__.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import select
import struct
from collections.abc import Callable
from types import TracebackType

from monitor.kernel import arch, syscalls

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

# struct perf_event_mmap_page: the control words of the data ring
_OFF_DATA_HEAD = 1024
_OFF_DATA_TAIL = 1032
_OFF_DATA_OFFSET = 1040
_OFF_DATA_SIZE = 1048
_META_SIZE = 1056

_U64 = struct.Struct("<Q")  # data_offset, data_size: set once by the kernel at mmap time
_HEADER = struct.Struct("<IHH")  # struct perf_event_header: type, misc, size
_SAMPLE = struct.Struct("<IHHI")  # the header and the u32 size of PERF_SAMPLE_RAW
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


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """CPU numbers from a sysfs list such as "0-3" or "0,2-5,7"."""
    with open(path, encoding="ascii") as f:
        spec = f.read().strip()
    cpus: list[int] = []
    for part in spec.split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


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
        if rtype == PERF_RECORD_SAMPLE and size >= _SAMPLE.size:
            raw = _SAMPLE.unpack_from(data, off)[3]
            start = off + _SAMPLE.size
            if raw <= size - _SAMPLE.size:
                on_event(data[start:start + raw])
                delivered += 1
        elif rtype == PERF_RECORD_LOST and size >= _LOST.size:
            on_lost(_LOST.unpack_from(data, off)[4])
        # anything else (this attr asks for no other record type) is skipped by its size
        off += size
    return delivered


class Ring:
    """One CPU's ring: a perf mmap (metadata page + 2^n data pages) or a buffer shaped like one."""

    def __init__(self, buf: mmap.mmap | bytearray, page_size: int = mmap.PAGESIZE) -> None:
        self._buf = buf
        offset = _U64.unpack_from(buf, _OFF_DATA_OFFSET)[0]
        size = _U64.unpack_from(buf, _OFF_DATA_SIZE)[0]
        if offset == 0:  # kernels before 4.1 leave these zero: the data follows the first page
            offset, size = page_size, len(buf) - page_size
        if size <= 0 or size & (size - 1) or offset < _META_SIZE or offset + size > len(buf):
            raise ValueError(f"not a perf ring: data at {offset}, {size} bytes, in a "
                             f"{len(buf)}-byte mapping")
        self.data_offset, self.data_size = offset, size
        self.resyncs = 0  # times a malformed or impossible head/tail was skipped over
        # data_head and data_tail are shared with the kernel while it writes, so each
        # access must be one whole 8-byte load or store, which reading or setting a
        # ctypes c_uint64's .value is (a fixed-size memcpy: one mov). struct is not:
        # "<Q" unpacks byte by byte, and pack_into zeroes the field before it writes
        # it, so the kernel can read data_tail == 0 in between and, with head near the
        # end of the ring, find no room and drop a sample. Measured here with a busy
        # reader on a one-page ring: 19-45 such single-sample losses per 1.5 M events
        # with struct.pack_into, none with this.
        self._head: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(buf, _OFF_DATA_HEAD)
        self._tail: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(buf, _OFF_DATA_TAIL)

    def close(self) -> None:
        """Let go of the buffer (an mmap cannot be closed while these views exist)."""
        self._head = self._tail = None

    def read(self) -> bytes:
        """Take everything between tail and head out of the ring and give the space back.

        The records are copied out (joining the two pieces of a record that wraps
        past the end of the data area) before data_tail moves, so callbacks run
        on a private copy while the kernel can already reuse the space.
        """
        buf, head_word, tail_word = self._buf, self._head, self._tail
        if head_word is None or tail_word is None:
            raise ValueError("the ring is closed")
        head = head_word.value
        tail = tail_word.value
        count = (head - tail) & 0xFFFF_FFFF_FFFF_FFFF
        if count == 0:
            return b""
        if count > self.data_size:  # cannot happen with a writable mapping: resync
            self.resyncs += 1
            tail_word.value = head
            return b""
        base, size = self.data_offset, self.data_size
        start = tail & (size - 1)
        first = min(count, size - start)
        chunk = buf[base + start:base + start + first]
        if first < count:
            chunk += buf[base:base + count - first]
        tail_word.value = head
        return bytes(chunk)  # no copy from an mmap, whose slices are bytes already

    def drain(self, on_event: EventCallback, on_lost: LostCallback) -> int:
        """Deliver every complete record now in the ring; returns samples delivered."""
        return parse_records(self.read(), on_event, on_lost)


class PerfReader:
    """The per-CPU rings of one BPF_PERF_OUTPUT map, read from Python.

    Events are delivered by poll() or drain() on the calling thread; on_event
    gets each sample's bytes, on_lost each count of samples the kernel dropped
    because a ring was full. The kernel reports a loss in the ring itself, so
    it arrives once that ring has room again and the next sample is written.
    If a callback raises, the exception propagates and the rest of the records
    already taken from that CPU's ring are dropped.

    The reader holds its own reference to the map (a dup of map_fd): the map
    entries it sets stay valid until close(), even if the caller closes map_fd.
    """

    def __init__(self, map_fd: int, *, pages: int, on_event: EventCallback,
                 on_lost: LostCallback, wakeup_events: int = 32) -> None:
        if pages < 1 or pages & (pages - 1):
            raise ValueError(f"pages must be a power of two, not {pages}")
        if wakeup_events < 1:
            raise ValueError(f"wakeup_events must be at least 1, not {wakeup_events}")
        self._on_event, self._on_lost = on_event, on_lost
        self._map_fd = -1
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._rings: list[Ring] = []
        self._keys: list[int] = []
        epoll = select.epoll()
        self._epoll: select.epoll | None = epoll
        try:
            self._map_fd = os.dup(map_fd)  # non-inheritable, like every fd Python makes
            self._open(epoll, pages, wakeup_events)
        except BaseException:
            self.close()
            raise

    def _open(self, epoll: select.epoll, pages: int, wakeup_events: int) -> None:
        attr = perf_attr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                         sample_type=PERF_SAMPLE_RAW, wakeup_events=wakeup_events,
                         disabled=True)
        length = (1 + pages) * mmap.PAGESIZE
        for cpu in online_cpus():
            fd = perf_event_open(attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
            self._fds.append(fd)
            try:
                ring_map = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise PerfError(exc.errno or errno.EINVAL,
                                f"mmap of the cpu {cpu} perf ring ({length} bytes): "
                                f"{exc.strerror}") from None
            self._maps.append(ring_map)
            self._rings.append(Ring(ring_map))
            try:
                syscalls.map_update(self._map_fd, struct.pack("<I", cpu), struct.pack("<I", fd))
            except OSError as exc:
                raise PerfError(exc.errno or errno.EINVAL,
                                f"storing the cpu {cpu} perf fd in map fd {self._map_fd}: "
                                f"{os.strerror(exc.errno or errno.EINVAL)} (is it a "
                                "PERF_EVENT_ARRAY with an entry per CPU?)") from None
            self._keys.append(cpu)
            perf_ioctl(fd, PERF_EVENT_IOC_ENABLE)
            epoll.register(fd, select.EPOLLIN)

    def fileno(self) -> int:
        """The epoll fd: readable when some ring has woken the reader.

        perf hands each wake-up out once: whoever looks at this fd (select,
        an outer epoll) consumes it, so call drain() then, not poll(timeout),
        which would wait for the next wake-up.
        """
        if self._epoll is None:
            raise ValueError("the perf reader is closed")
        return self._epoll.fileno()

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms (negative: forever) for a wake-up, then drain every ring."""
        if self._epoll is None:
            raise ValueError("the perf reader is closed")
        self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return self.drain()

    def drain(self) -> int:
        """Deliver whatever the rings hold now, without waiting; returns samples delivered."""
        delivered = 0
        for ring in self._rings:
            delivered += ring.drain(self._on_event, self._on_lost)
        return delivered

    @property
    def cpus(self) -> list[int]:
        """The CPUs (map keys) this reader has a ring for."""
        return list(self._keys)

    def close(self) -> None:
        """Take our fds out of the map, unmap the rings, close everything. Idempotent."""
        for cpu in self._keys:
            try:
                syscalls.map_delete(self._map_fd, struct.pack("<I", cpu))
            except OSError:
                pass  # best effort: closing the perf fds below stops the output anyway
        self._keys = []
        for ring in self._rings:
            ring.close()
        self._rings = []
        for ring_map in self._maps:
            ring_map.close()
        self._maps = []
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._map_fd >= 0:
            os.close(self._map_fd)
            self._map_fd = -1

    def __enter__(self) -> PerfReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
