"""The perf ring parser against hand-built ring contents: no kernel, no root.

A fake ring is a bytearray laid out like a perf mmap: a metadata page whose
data_head/data_tail/data_offset/data_size sit where struct perf_event_mmap_page
has them, then a power-of-two data area the test writes records into.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import platform
import struct
from pathlib import Path

import pytest

from monitor.kernel import perfbuffer, perfevent, perfring, tracepoints
from monitor.kernel.perfevent import PERF_RECORD_LOST, PERF_RECORD_SAMPLE, parse_records
from monitor.kernel.perfring import Ring

PAGE = 4096
HEAD, TAIL, DATA_OFFSET, DATA_SIZE = 1024, 1032, 1040, 1048


class FakeRing:
    """A perf mmap in a bytearray, and a writer that behaves like the kernel's."""

    def __init__(self, pages: int = 1, *, head: int = 0) -> None:
        self.size = pages * PAGE
        self.buf = bytearray(PAGE + self.size)
        struct.pack_into("<QQ", self.buf, DATA_OFFSET, PAGE, self.size)
        self.head = head  # free-running, as the kernel's: only ever grows
        self.set_tail(head)
        self.publish()

    @property
    def tail(self) -> int:
        return int(struct.unpack_from("<Q", self.buf, TAIL)[0])

    def set_tail(self, tail: int) -> None:
        struct.pack_into("<Q", self.buf, TAIL, tail)

    def publish(self) -> None:
        struct.pack_into("<Q", self.buf, HEAD, self.head)

    def write(self, record: bytes) -> None:
        """Append a record at head, wrapping byte by byte past the end of the data area."""
        for i, byte in enumerate(record):
            self.buf[PAGE + (self.head + i) % self.size] = byte
        self.head += len(record)

    def sample(self, payload: bytes) -> bytes:
        """A PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW, padded to 8 bytes as the kernel does.

        The raw size counts the padding, so the reader sees it too.
        """
        raw_size = (len(payload) + 4 + 7) // 8 * 8 - 4
        raw = payload.ljust(raw_size, b"\0")
        record = struct.pack("<IHHI", PERF_RECORD_SAMPLE, 0, 8 + 4 + raw_size, raw_size) + raw
        self.write(record)
        return raw


def lost_record(count: int, ident: int = 7) -> bytes:
    return struct.pack("<IHHQQ", PERF_RECORD_LOST, 0, 24, ident, count)


class Sink:
    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.lost: list[int] = []

    def drain(self, ring: Ring) -> int:
        return ring.drain(self.events.append, self.lost.append)


def test_samples_are_delivered_in_order_with_the_kernels_padding() -> None:
    fake, sink = FakeRing(), Sink()
    expected = [fake.sample(b"a" * n) for n in (4, 5, 12, 20, 1)]
    fake.publish()
    ring = Ring(fake.buf)
    assert sink.drain(ring) == 5
    assert sink.events == expected
    assert [len(e) for e in sink.events] == [4, 12, 12, 20, 4]  # size includes padding
    assert sink.lost == []
    assert fake.tail == fake.head


def test_an_empty_ring_delivers_nothing_and_leaves_tail() -> None:
    fake, sink = FakeRing(head=4096 * 3), Sink()
    assert sink.drain(Ring(fake.buf)) == 0
    assert fake.tail == 4096 * 3


def test_only_what_head_publishes_is_read() -> None:
    fake, sink = FakeRing(), Sink()
    fake.sample(b"one!")
    fake.publish()
    fake.sample(b"two!")  # written but head not yet moved: the kernel is mid-record
    ring = Ring(fake.buf)
    assert sink.drain(ring) == 1
    fake.publish()
    assert sink.drain(ring) == 1
    assert sink.events == [b"one!", b"two!"]


def test_lost_record_goes_to_on_lost_between_samples() -> None:
    fake = FakeRing()
    order: list[object] = []
    before = fake.sample(b"before")
    fake.write(lost_record(41))
    after = fake.sample(b"after")
    fake.publish()
    n = Ring(fake.buf).drain(order.append, lambda count: order.append(("lost", count)))
    assert n == 2
    assert order == [before, ("lost", 41), after]
    assert after == b"after" + bytes(7)  # 8 header + 4 size + 12 raw = 24, 8-aligned


def test_a_record_wrapping_around_the_end_is_joined() -> None:
    # head and tail start 20 bytes before the end of the data area: the first
    # record's header fits, its payload wraps to the start.
    start = 5 * PAGE - 20
    fake, sink = FakeRing(head=start), Sink()
    payload = bytes(range(60))
    fake.sample(payload)
    fake.sample(b"next")
    fake.publish()
    assert fake.head % PAGE < 20 + 64  # it did wrap
    assert sink.drain(Ring(fake.buf)) == 2
    assert sink.events == [payload, b"next"]
    assert fake.tail == fake.head


def test_a_header_split_by_the_end_is_joined() -> None:
    fake, sink = FakeRing(head=PAGE - 4), Sink()  # the header itself straddles the end
    fake.sample(b"split header")
    fake.write(lost_record(3))
    fake.publish()
    assert sink.drain(Ring(fake.buf)) == 1
    assert sink.events == [b"split header"]
    assert sink.lost == [3]


def test_head_and_tail_are_free_running_counters() -> None:
    fake, sink = FakeRing(head=(1 << 40) + 8), Sink()
    ring = Ring(fake.buf)
    for round_ in range(300):  # many times around a one-page ring
        fake.sample(struct.pack("<I", round_) * 5)
        fake.publish()
        assert sink.drain(ring) == 1
    assert [struct.unpack_from("<I", e)[0] for e in sink.events] == list(range(300))


def test_a_full_ring_is_read_whole() -> None:
    fake, sink = FakeRing(), Sink()
    for i in range(PAGE // 32):  # 32-byte records fill the page exactly
        fake.sample(struct.pack("<Q", i) + bytes(12))
    fake.publish()
    assert fake.head - fake.tail == PAGE
    assert sink.drain(Ring(fake.buf)) == PAGE // 32


def test_zero_size_header_stops_and_resyncs_to_head() -> None:
    fake, sink = FakeRing(), Sink()
    fake.sample(b"good")
    fake.write(struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 0) + bytes(24))
    fake.sample(b"unreachable")
    fake.publish()
    ring = Ring(fake.buf)
    assert sink.drain(ring) == 1
    assert sink.events == [b"good"]
    assert fake.tail == fake.head  # the reader carries on where the kernel is
    later = fake.sample(b"later")
    fake.publish()
    assert sink.drain(ring) == 1
    assert sink.events[-1] == later


@pytest.mark.parametrize("record", [
    struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 4),  # smaller than a header
    struct.pack("<IHHI", PERF_RECORD_SAMPLE, 0, 16, 4000) + bytes(4),  # raw size past the record
    struct.pack("<IHH", PERF_RECORD_SAMPLE, 0, 8000),  # record past the end of what is there
])
def test_malformed_records_never_loop_or_overread(record: bytes) -> None:
    fake, sink = FakeRing(), Sink()
    fake.write(record.ljust(16, b"\0"))
    fake.publish()
    assert sink.drain(Ring(fake.buf)) == 0
    assert sink.events == []
    assert fake.tail == fake.head


def test_unknown_record_types_are_skipped_by_size() -> None:
    fake, sink = FakeRing(), Sink()
    fake.write(struct.pack("<IHH", 3, 0, 16) + bytes(8))  # PERF_RECORD_COMM, say
    fake.sample(b"kept")
    fake.publish()
    assert sink.drain(Ring(fake.buf)) == 1
    assert sink.events == [b"kept"]


def test_impossible_distance_between_tail_and_head_resyncs() -> None:
    fake, sink = FakeRing(), Sink()
    fake.head = 3 * PAGE  # more than the data area holds
    fake.publish()
    ring = Ring(fake.buf)
    assert sink.drain(ring) == 0
    assert fake.tail == 3 * PAGE
    assert ring.resyncs == 1


def test_parse_records_on_plain_bytes() -> None:
    data = (struct.pack("<IHHI", PERF_RECORD_SAMPLE, 0, 16, 4) + b"abcd"
            + lost_record(2) + struct.pack("<IHH", 0, 0, 0))
    events: list[bytes] = []
    lost: list[int] = []
    assert parse_records(data, events.append, lost.append) == 1
    assert events == [b"abcd"]
    assert lost == [2]


def test_ring_geometry_is_checked() -> None:
    fake = FakeRing(pages=2)
    assert (Ring(fake.buf).data_offset, Ring(fake.buf).data_size) == (PAGE, 2 * PAGE)
    struct.pack_into("<QQ", fake.buf, DATA_OFFSET, PAGE, 3 * PAGE)  # not a power of two
    with pytest.raises(ValueError, match="not a perf ring"):
        Ring(fake.buf)
    struct.pack_into("<QQ", fake.buf, DATA_OFFSET, PAGE, 4 * PAGE)  # larger than the mapping
    with pytest.raises(ValueError, match="not a perf ring"):
        Ring(fake.buf)
    struct.pack_into("<QQ", fake.buf, DATA_OFFSET, 0, 0)  # an old kernel: data after page 1
    assert Ring(fake.buf).data_size == 2 * PAGE


@pytest.mark.parametrize("pages", [0, 3, 6, -2])
def test_reader_refuses_page_counts_that_are_not_powers_of_two(pages: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        perfring.PerfReader(-1, pages=pages, on_event=print, on_lost=print)


def test_online_cpu_lists(tmp_path: Path) -> None:
    path = tmp_path / "online"
    for spec, cpus in (("0", [0]), ("0-3\n", [0, 1, 2, 3]), ("0,2-4,7", [0, 2, 3, 4, 7])):
        path.write_text(spec)
        assert perfring.online_cpus(str(path)) == cpus


def test_perf_attr_layout() -> None:
    attr = perfevent.perf_attr(perfevent.PERF_TYPE_SOFTWARE, perfevent.PERF_COUNT_SW_BPF_OUTPUT,
                               sample_type=perfevent.PERF_SAMPLE_RAW, wakeup_events=32,
                               disabled=True)
    type_, size, config, period, sample_type = struct.unpack_from("<IIQQQ", attr, 0)
    assert (type_, size, config, period, sample_type) == (1, 128, 10, 1, 1 << 10)
    assert struct.unpack_from("<Q", attr, 40)[0] == 1  # disabled
    assert struct.unpack_from("<I", attr, 48)[0] == 32


# -- tracepoint ids (monitor/tracepoints.py) ---------------------------------------------------

def test_tracepoint_id_read_from_tracefs(tmp_path: Path) -> None:
    event = tmp_path / "events" / "syscalls" / "sys_enter_getppid"
    event.mkdir(parents=True)
    (event / "id").write_text("311\n")
    assert tracepoints.tracepoint_id("syscalls", "sys_enter_getppid", str(tmp_path)) == 311


def test_missing_tracepoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    with pytest.raises(tracepoints.TracepointError, match="no tracepoint tcp:nope") as info:
        tracepoints.tracepoint_id("tcp", "nope", str(tmp_path))
    assert info.value.errno == errno.ENOENT


def test_unmounted_tracefs_is_named(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="is tracefs mounted"):
        tracepoints.tracepoint_id("tcp", "tcp_probe", str(tmp_path))


@pytest.mark.parametrize(("category", "event"), [("..", "x"), ("a/b", "c"), ("a", ""), ("a", "../../x")])
def test_tracepoint_names_cannot_leave_tracefs(tmp_path: Path, category: str, event: str) -> None:
    with pytest.raises(tracepoints.TracepointError, match="not a tracepoint name"):
        tracepoints.tracepoint_id(category, event, str(tmp_path))


def test_a_ring_lets_go_of_its_mmap_when_closed() -> None:
    mm = mmap.mmap(-1, 2 * PAGE)
    struct.pack_into("<QQ", mm, DATA_OFFSET, PAGE, PAGE)
    ring = Ring(mm)
    assert ring.read() == b""
    with pytest.raises(BufferError):  # its head/tail views pin the mapping...
        mm.close()
    ring.close()
    mm.close()  # ...until it is closed
    with pytest.raises(ValueError, match="closed"):
        ring.read()


@pytest.mark.parametrize(("machine", "reader"), [("x86_64", "python"), ("amd64", "python"),
                                                 ("aarch64", "libbpf"), ("arm64", "libbpf")])
def test_the_default_reader_follows_the_machine(monkeypatch: pytest.MonkeyPatch, machine: str,
                                                reader: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert perfring.default_reader() == reader


def test_our_reader_is_refused_where_plain_loads_are_not_ordered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(ValueError, match=r"aarch64.*libbpf"):
        perfring.PerfReader(-1, pages=1, on_event=print, on_lost=print, reader="python")
    with pytest.raises(ValueError, match="reader must be one of"):
        perfring.PerfReader(-1, pages=1, on_event=print, on_lost=print, reader="mine")


def test_libbpf_has_what_the_reader_calls() -> None:
    lib = perfbuffer.libbpf()
    for name in ("perf_buffer__new_raw", "perf_buffer__consume", "perf_buffer__epoll_fd",
                 "perf_buffer__free"):
        assert hasattr(lib, name)
    # struct perf_buffer_raw_opts of libbpf >= 1.0 on LP64: sz, (long :0 x2), cpu_cnt, cpus, map_keys
    opts = perfbuffer._PerfBufferRawOpts
    assert ctypes.sizeof(opts) == 32
    assert [getattr(opts, f).offset for f in ("sz", "cpu_cnt", "cpus", "map_keys")] == [0, 8, 16, 24]


def _libbpf_rings(events: list[bytes], lost: list[int]) -> perfbuffer.LibbpfRings:
    """The callback half of LibbpfRings, without a kernel behind it."""
    rings = object.__new__(perfbuffer.LibbpfRings)
    rings._on_event, rings._on_lost = events.append, lost.append
    rings.delivered, rings._error = 0, None
    return rings


def test_the_libbpf_callback_parses_each_record_it_is_handed() -> None:
    events: list[bytes] = []
    lost: list[int] = []
    rings = _libbpf_rings(events, lost)
    fake = FakeRing()
    raw = fake.sample(b"payload!1234")
    record = bytes(fake.buf[PAGE:PAGE + fake.head])
    for rec in (record, lost_record(5), struct.pack("<IHHQ", 99, 0, 16, 0)):
        buf = ctypes.create_string_buffer(rec, len(rec))
        assert rings._record(None, 0, ctypes.addressof(buf)) == perfbuffer._LIBBPF_PERF_EVENT_CONT
    assert events == [raw] and lost == [5] and rings.delivered == 1


def test_a_raising_callback_stops_libbpf_and_is_kept_for_drain() -> None:
    rings = _libbpf_rings([], [])
    rings._on_event = lambda _raw: (_ for _ in ()).throw(KeyError("boom"))
    fake = FakeRing()
    fake.sample(b"x" * 8)
    buf = ctypes.create_string_buffer(bytes(fake.buf[PAGE:PAGE + fake.head]), fake.head)
    assert rings._record(None, 0, ctypes.addressof(buf)) == perfbuffer._LIBBPF_PERF_EVENT_ERROR
    assert isinstance(rings._error, KeyError)
