"""Read a BPF_MAP_TYPE_PERF_EVENT_ARRAY map (BCC's BPF_PERF_OUTPUT) without bcc.

One perf event of type PERF_COUNT_SW_BPF_OUTPUT per online CPU, each with its
own mmap'ed ring, its fd stored in the map under the CPU's index: that is where
bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, ...) writes. The layouts
follow include/uapi/linux/perf_event.h and were checked with offsetof() against
the running kernel's BTF (perf_event_attr, perf_event_mmap_page).

`Ring` works on any writable buffer laid out like a perf mmap (one metadata page,
then the data area), so it is tested without a kernel. perf_event_open(2) and the
record format are monitor.kernel.perfevent's, libbpf's reader is
monitor.kernel.perfbuffer's; this module holds ours and PerfReader, which picks one.

Memory ordering: the kernel writes a record, then (release) data_head; a reader must
load data_head with acquire semantics (smp_rmb after it), read the records, and store
data_tail with release semantics (smp_mb before it), or the kernel may overwrite
records still being read. Two readers do that:

- "python" (`Ring`): plain loads and stores, correct on x86-64 only, whose TSO gives
  exactly that order: a load is never reordered with an older load (records are read
  after head), and a store is never reordered with an older load (the tail store
  cannot pass the record reads). Python has no compiler barrier to offer; the loads
  and stores happen inside separate C calls (ctypes field access, mmap slicing) that
  the compiler cannot move across each other. On arm64 the CPU may do both
  reorderings, and CPython offers no fence; nor does a call into C give one unless
  the callee issues a barrier instruction (libc exports none; libatomic's
  __atomic_load_8 would, but libatomic1 is no dependency of bcc's packages).
- "libbpf" (monitor.kernel.perfbuffer): libbpf's perf_buffer (libbpf.so.1, a
  dependency of Debian's libbpfcc), whose reader reads head by smp_load_acquire and
  writes tail by smp_store_release; libbpf's own include/linux/compiler.h spells both,
  off x86-64, as a full barrier (__sync_synchronize: `dmb ish` on arm64) after the
  head load and before the tail store, stronger than the ABI asks. It calls back once
  per record.

PerfReader takes ours on x86-64, where it measured faster (bench/RESULTS.md, issue 16;
bench/ring_cost.py), and libbpf's on every other architecture; both are tested here.
Each access to data_head/data_tail must also be a single 8-byte load or store:
see Ring.__init__.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
from types import TracebackType

from monitor.kernel import arch, syscalls
from monitor.kernel.perfbuffer import LibbpfRings
from monitor.kernel.perfevent import (
    PERF_COUNT_SW_BPF_OUTPUT,
    PERF_EVENT_IOC_ENABLE,
    PERF_FLAG_FD_CLOEXEC,
    PERF_SAMPLE_RAW,
    PERF_TYPE_SOFTWARE,
    EventCallback,
    LostCallback,
    PerfError,
    parse_records,
    perf_attr,
    perf_event_open,
    perf_ioctl,
)

# struct perf_event_mmap_page: the control words of the data ring
_OFF_DATA_HEAD = 1024
_OFF_DATA_TAIL = 1032
_OFF_DATA_OFFSET = 1040
_OFF_DATA_SIZE = 1048
_META_SIZE = 1056

_U64 = struct.Struct("<Q")  # data_offset, data_size: set once by the kernel at mmap time


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




READERS = ("python", "libbpf")


def default_reader() -> str:
    """Ours on x86-64, libbpf's on every other architecture (see the module's docstring)."""
    return "python" if arch.machine() == "x86_64" else "libbpf"


class PerfReader:
    """The per-CPU rings of one BPF_PERF_OUTPUT map, read from Python.

    Events are delivered by poll() or drain() on the calling thread; on_event
    gets each sample's bytes, on_lost each count of samples the kernel dropped
    because a ring was full. The kernel reports a loss in the ring itself, so
    it arrives once that ring has room again and the next sample is written.
    If a callback raises, the exception propagates; the python reader drops the rest
    of the records already taken from that CPU's ring, libbpf's leaves them there for
    the next drain.

    The reader holds its own reference to the map (a dup of map_fd): the map
    entries it sets stay valid until close(), even if the caller closes map_fd.

    `reader` picks who reads the rings: "python" (Ring, below: plain loads and stores,
    correct on x86-64's TSO only) or "libbpf" (perf_buffer, with the barriers every
    architecture needs); the default is default_reader(): ours on x86-64, where it
    measured faster (bench/RESULTS.md, issue 16), libbpf's everywhere else.
    """

    def __init__(self, map_fd: int, *, pages: int, on_event: EventCallback,
                 on_lost: LostCallback, wakeup_events: int = 32,
                 reader: str | None = None) -> None:
        if pages < 1 or pages & (pages - 1):
            raise ValueError(f"pages must be a power of two, not {pages}")
        if wakeup_events < 1:
            raise ValueError(f"wakeup_events must be at least 1, not {wakeup_events}")
        reader = default_reader() if reader is None else reader
        if reader not in READERS:
            raise ValueError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
        if reader == "python" and arch.machine() != "x86_64":
            raise ValueError(f"the python ring reader relies on x86-64's memory ordering; "
                             f"this machine is {arch.machine()}: use reader='libbpf'")
        self.reader = reader
        self._on_event, self._on_lost = on_event, on_lost
        self._map_fd = -1
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._rings: list[Ring] = []
        self._keys: list[int] = []
        self._libbpf: LibbpfRings | None = None
        self._waiter: select.poll | None = None
        self._epoll: select.epoll | None = None
        try:
            self._map_fd = os.dup(map_fd)  # non-inheritable, like every fd Python makes
            attr = perf_attr(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                             sample_type=PERF_SAMPLE_RAW, wakeup_events=wakeup_events,
                             disabled=True)
            if reader == "libbpf":
                cpus = online_cpus()
                self._libbpf = LibbpfRings(self._map_fd, cpus, pages=pages, attr=attr,
                                            on_event=on_event, on_lost=on_lost)
                self._keys = cpus
                self._waiter = select.poll()
                self._waiter.register(self._libbpf.fileno(), select.POLLIN)
            else:
                self._epoll = select.epoll()
                self._open(self._epoll, pages, attr)
        except BaseException:
            self.close()
            raise

    def _open(self, epoll: select.epoll, pages: int, attr: ctypes.Array[ctypes.c_char]) -> None:
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
        if self._libbpf is not None:
            return self._libbpf.fileno()
        if self._epoll is None:
            raise ValueError("the perf reader is closed")
        return self._epoll.fileno()

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms (negative: forever) for a wake-up, then drain every ring."""
        if self._waiter is not None:
            self._waiter.poll(timeout_ms if timeout_ms >= 0 else None)
            return self.drain()
        if self._epoll is None:
            raise ValueError("the perf reader is closed")
        self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return self.drain()

    def drain(self) -> int:
        """Deliver whatever the rings hold now, without waiting; returns samples delivered."""
        if self._libbpf is not None:
            return self._libbpf.consume()
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
        if self._libbpf is not None:
            self._libbpf.close()  # deletes its map entries, unmaps, closes its fds
            self._libbpf = None
        self._waiter = None
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
