"""PerfReader and bcc-free tracepoint links on the real kernel.

A small program compiled with bcc runs on syscalls:sys_enter_getpgid for this
process only (its tgid is a -D cflag) and submits the syscall's argument
through BPF_PERF_OUTPUT; the test calls getpgid() with pids that cannot exist
(pid_max is at most 2^22), so every event is one the test made and carries a
value the test chose. Nothing here touches the lab; everything made in bpffs
is under /sys/fs/bpf/pnmpr-test and is removed at the end.

Run alone: .venv/bin/pytest --noconftest -q tests/kernel/test_perfring.py
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.kernel import syscalls, tracepoints
from monitor.kernel.perfring import READERS, PerfReader

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root and the real kernel")]

PIN_DIR = Path("/sys/fs/bpf/pnmpr-test")
TRACEPOINT = ("syscalls", "sys_enter_getpgid")
BASE = 10_000_000  # above any pid_max: getpgid() fails with ESRCH, the tracepoint still fires
EVENT = struct.Struct("<QII")  # struct pnmpr_event below
RAW_SIZE = 20  # 16-byte event; the kernel pads 8 (header) + 4 (size) + raw to 8 bytes
RECORD = 8 + 4 + RAW_SIZE

SOURCE = r"""
struct pnmpr_getpgid_args {         /* tracefs: syscalls/sys_enter_getpgid/format */
    u64 common;
    s32 syscall_nr;
    u32 pad;
    u64 pid;
};
struct pnmpr_event { u64 arg; u32 tgid; u32 cpu; };

BPF_PERF_OUTPUT(events);
BPF_ARRAY(runs, u64, 1);

int pnmpr_getpgid(struct pnmpr_getpgid_args *args)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != PNMPR_TGID)
        return 0;
    int zero = 0;
    u64 *runs_p = runs.lookup(&zero);
    if (runs_p)
        __sync_fetch_and_add(runs_p, 1);
    struct pnmpr_event e = {};
    e.arg = args->pid;
    e.tgid = id >> 32;
    e.cpu = bpf_get_smp_processor_id();
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""


def trigger(args: range | list[int]) -> None:
    for arg in args:
        try:
            os.getpgid(arg)
        except ProcessLookupError:
            pass


class Collector:
    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.lost: list[int] = []

    def args(self) -> list[int]:
        return [EVENT.unpack_from(r)[0] for r in self.raw]


class Loaded:
    """The compiled module, its program fd and id, and the maps' fds."""

    def __init__(self) -> None:
        bcc = pytest.importorskip("bcc")
        self.bpf: Any = bcc.BPF(text=SOURCE.encode(), cflags=[f"-DPNMPR_TGID={os.getpid()}"])
        fn = self.bpf.load_func(b"pnmpr_getpgid", bcc.BPF.TRACEPOINT)
        self.prog_fd: int = fn.fd
        self.prog_id = syscalls.prog_info(fn.fd).prog_id
        self.events_fd: int = self.bpf[b"events"].map_fd
        self.runs_fd: int = self.bpf[b"runs"].map_fd

    def close(self) -> None:
        self.bpf.cleanup()


def runs(map_fd: int) -> int:
    value = syscalls.map_lookup(map_fd, struct.pack("<I", 0), 8)
    assert value is not None
    return int(struct.unpack("<Q", value)[0])


def bpf_fds() -> dict[int, str]:
    """This process's fds to bpf objects, with their fdinfo (prog_id:, link_id: ...)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("anon_inode:bpf"):
                out[int(name)] = Path(f"/proc/self/fdinfo/{name}").read_text()
    return out


@contextlib.contextmanager
def on_one_cpu(cpu: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    mod = Loaded()
    link = -1
    try:
        link = tracepoints.attach_tracepoint(mod.prog_fd, *TRACEPOINT)
        yield mod
    finally:
        if link >= 0:
            os.close(link)
        mod.close()


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    PIN_DIR.mkdir(exist_ok=True)
    try:
        yield PIN_DIR
    finally:
        for entry in PIN_DIR.iterdir():
            entry.unlink()
        PIN_DIR.rmdir()


@pytest.fixture(params=READERS)
def reader_name(request: pytest.FixtureRequest) -> str:
    """Each test of PerfReader runs with both readers: ours and libbpf's perf_buffer."""
    return str(request.param)


def test_every_event_arrives_once_with_its_payload(loaded: Loaded, reader_name: str) -> None:
    got = Collector()
    fds_before = set(os.listdir("/proc/self/fd"))
    reader = PerfReader(loaded.events_fd, pages=16, on_event=got.raw.append,
                        on_lost=got.lost.append, reader=reader_name)
    assert reader.reader == reader_name
    try:
        n = 5000
        delivered = 0
        for start in range(0, n, 250):
            trigger(range(BASE + start, BASE + start + 250))
            delivered += reader.poll(0)
        delivered += reader.drain()
        assert got.lost == []
        assert delivered == len(got.raw) == n
        assert sorted(got.args()) == list(range(BASE, BASE + n))
        assert {len(r) for r in got.raw} == {RAW_SIZE}
        assert {EVENT.unpack_from(r)[1] for r in got.raw} == {os.getpid()}
        assert {EVENT.unpack_from(r)[2] for r in got.raw} <= set(reader.cpus)
    finally:
        reader.close()
        reader.close()  # idempotent
    # the map entries it set are gone, and so is every fd it opened
    for cpu in reader.cpus or range(os.cpu_count() or 1):
        assert not syscalls.map_delete(loaded.events_fd, struct.pack("<I", cpu))
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_wakeups_and_timeouts(loaded: Loaded, reader_name: str) -> None:
    got = Collector()
    with PerfReader(loaded.events_fd, pages=4, on_event=got.raw.append,
                    on_lost=got.lost.append, wakeup_events=32,
                    reader=reader_name) as reader, on_one_cpu(0):
        ep = reader.fileno()
        assert select.select([ep], [], [], 0)[0] == []
        trigger(range(BASE, BASE + 5))  # fewer than wakeup_events: no wake-up...
        assert select.select([ep], [], [], 0.05)[0] == []
        started = time.monotonic()
        assert reader.poll(100) == 5  # ...but poll drains them when it times out
        assert time.monotonic() - started >= 0.09
        trigger(range(BASE + 5, BASE + 5 + 32))  # the 32nd event wakes the reader
        started = time.monotonic()
        assert reader.poll(5000) == 32
        assert time.monotonic() - started < 1.0
        trigger(range(BASE + 37, BASE + 37 + 32))
        # The epoll fd shows the wake-up to select(), but looking consumes it (perf's
        # poll hands out a wake-up once): after select, drain() rather than poll(timeout).
        assert select.select([ep], [], [], 1.0)[0] == [ep]
        assert reader.drain() == 32
        assert select.select([ep], [], [], 0)[0] == []
        assert got.args() == list(range(BASE, BASE + 69))  # one CPU: in order


def test_a_full_ring_reports_what_it_lost(loaded: Loaded, reader_name: str) -> None:
    got = Collector()
    n = 2000  # far more than a one-page ring holds
    cpu = os.sched_getaffinity(0).pop()
    with PerfReader(loaded.events_fd, pages=1, on_event=got.raw.append,
                    on_lost=got.lost.append, reader=reader_name) as reader, on_one_cpu(cpu):
        trigger(range(BASE, BASE + n))  # a burst, nothing reading
        delivered = reader.drain()
        # 32-byte records; the kernel keeps one byte of the ring free: 127 fit, not 128
        assert delivered == 4096 // RECORD - 1
        # The kernel writes its LOST record into the ring at the next sample that
        # finds room, so one more event brings the count.
        assert got.lost == []
        trigger([BASE + n])
        assert reader.drain() == 1
        assert delivered + sum(got.lost) == n
        assert len(got.lost) == 1
        args = got.args()
        assert args[:delivered] == list(range(BASE, BASE + delivered))  # the oldest are kept
        assert args[-1] == BASE + n


def test_records_that_wrap_past_the_end_arrive_whole(loaded: Loaded, reader_name: str) -> None:
    """After a 24-byte LOST record the 32-byte samples no longer divide the one-page ring:
    every eighth wraps past its end, and must come out joined and in order."""
    got = Collector()
    cpu = os.sched_getaffinity(0).pop()
    with PerfReader(loaded.events_fd, pages=1, on_event=got.raw.append,
                    on_lost=got.lost.append, reader=reader_name) as reader, on_one_cpu(cpu):
        trigger(range(BASE, BASE + 200))  # overflows: a LOST record at the next sample
        first = reader.drain()
        sent = 200
        for _ in range(60):  # 60 x 50 samples of 32 bytes: ~47 passes of the 4 KiB ring
            trigger(range(BASE + sent, BASE + sent + 50))
            sent += 50
            assert reader.drain() == 50
        args = got.args()
        assert first + sum(got.lost) == 200
        assert args[first:] == list(range(BASE + 200, BASE + sent))
        assert {len(r) for r in got.raw} == {RAW_SIZE}


def test_a_callback_that_raises_stops_the_drain(loaded: Loaded, reader_name: str) -> None:
    seen: list[int] = []

    def on_event(raw: bytes) -> None:
        seen.append(EVENT.unpack_from(raw)[0])
        if len(seen) == 3:
            raise RuntimeError("the third")

    cpu = os.sched_getaffinity(0).pop()
    with PerfReader(loaded.events_fd, pages=4, on_event=on_event, on_lost=print,
                    reader=reader_name) as reader, on_one_cpu(cpu):
        trigger(range(BASE, BASE + 10))
        with pytest.raises(RuntimeError, match="the third"):
            reader.drain()
        assert seen == [BASE, BASE + 1, BASE + 2]
        rest = reader.drain()
        # ours had taken the whole ring's bytes and drops the rest; libbpf leaves them
        if reader_name == "libbpf":
            assert rest == 7 and seen == list(range(BASE, BASE + 10))
        else:
            assert rest == 0


def test_attach_errors_name_the_tracepoint(loaded: Loaded) -> None:
    with pytest.raises(tracepoints.TracepointError, match="syscalls:sys_enter_nosuch") as info:
        tracepoints.attach_tracepoint(loaded.prog_fd, "syscalls", "sys_enter_nosuch")
    assert info.value.errno == errno.ENOENT
    # the module fixture's link already carries this program on this tracepoint
    with pytest.raises(tracepoints.TracepointError, match="already attached") as info:
        tracepoints.attach_tracepoint(loaded.prog_fd, *TRACEPOINT)
    assert info.value.errno == errno.EEXIST
    sched_cls = syscalls.load_unspec_program()
    try:
        with pytest.raises(tracepoints.TracepointError, match="sys_enter_getpgid"):
            tracepoints.attach_tracepoint(sched_cls, *TRACEPOINT)
    finally:
        os.close(sched_cls)
    with pytest.raises(OSError, match="/sys/fs/bpf/pnmpr-test/nothing"):
        tracepoints.get_pinned(str(PIN_DIR / "nothing"))


def test_a_pinned_link_outlives_every_fd(pin_dir: Path) -> None:
    mod = Loaded()
    closed = False
    try:
        link = tracepoints.attach_tracepoint(mod.prog_fd, *TRACEPOINT)
        info = tracepoints.link_info(link)
        assert (info.type, info.prog_id) == (tracepoints.BPF_LINK_TYPE_PERF_EVENT, mod.prog_id)
        with pytest.raises(OSError, match="BPF_LINK_UPDATE"):  # perf links cannot swap
            tracepoints.link_update(link, mod.prog_fd)
        tracepoints.pin(link, str(pin_dir / "link"))
        tracepoints.pin(mod.runs_fd, str(pin_dir / "runs"))
        with pytest.raises(OSError, match="pnmpr-test/link") as exists:
            tracepoints.pin(link, str(pin_dir / "link"))
        assert exists.value.errno == errno.EEXIST
        os.close(link)
        mod.close()
        closed = True
    finally:
        if not closed:
            mod.close()
    ours = [fd for fd, fdinfo in bpf_fds().items()
            if f"prog_id:\t{mod.prog_id}\n" in fdinfo or f"link_id:\t{info.id}\n" in fdinfo]
    assert ours == [], "an fd to the program or link is still open"

    runs_fd = tracepoints.get_pinned(str(pin_dir / "runs"))
    try:
        before = runs(runs_fd)
        trigger(range(BASE, BASE + 10))
        assert runs(runs_fd) == before + 10  # no fd anywhere, still running

        again = tracepoints.get_pinned(str(pin_dir / "link"))
        try:
            assert tracepoints.link_info(again) == info
        finally:
            os.close(again)

        (pin_dir / "link").unlink()  # the last reference: the kernel detaches (deferred)
        deadline = time.monotonic() + 5
        while True:
            before = runs(runs_fd)
            trigger([BASE])
            if runs(runs_fd) == before:
                break
            assert time.monotonic() < deadline, "the program still runs after the unpin"
            time.sleep(0.01)
        trigger(range(BASE, BASE + 100))
        assert runs(runs_fd) == before
        deadline = time.monotonic() + 5
        while True:  # and, with no link and no fd, the program itself is freed
            try:
                os.close(syscalls.prog_fd_by_id(mod.prog_id))
            except OSError as exc:
                assert exc.errno == errno.ENOENT
                break
            assert time.monotonic() < deadline, "the program was not freed"
            time.sleep(0.01)
    finally:
        os.close(runs_fd)


@pytest.fixture
def veth() -> Iterator[int]:
    """A veth pair of our own (no traffic); the ifindex of one end."""
    ip = shutil.which("ip")
    if ip is None:
        pytest.skip("needs iproute2")
    subprocess.run([ip, "link", "del", "pnmpr0"], capture_output=True, check=False)
    subprocess.run([ip, "link", "add", "pnmpr0", "type", "veth", "peer", "name", "pnmpr1"],
                   check=True)
    try:
        yield int(Path("/sys/class/net/pnmpr0/ifindex").read_text())
    finally:
        subprocess.run([ip, "link", "del", "pnmpr0"], check=False)


def test_tcx_link_info_and_update(veth: int) -> None:
    first, second = syscalls.load_unspec_program(), syscalls.load_unspec_program()
    link = -1
    try:
        first_id = syscalls.prog_info(first).prog_id
        second_id = syscalls.prog_info(second).prog_id
        link = syscalls.tcx_link_create(first, veth, syscalls.BPF_TCX_INGRESS, first=False)
        info = tracepoints.link_info(link)
        assert (info.type, info.prog_id, info.ifindex, info.attach_type) == (
            tracepoints.BPF_LINK_TYPE_TCX, first_id, veth, syscalls.BPF_TCX_INGRESS)
        tracepoints.link_update(link, second)
        assert tracepoints.link_info(link) == tracepoints.LinkInfo(
            tracepoints.BPF_LINK_TYPE_TCX, info.id, second_id, veth, syscalls.BPF_TCX_INGRESS)
        assert syscalls.tcx_query(veth, syscalls.BPF_TCX_INGRESS) == [second_id]
    finally:
        for fd in (link, first, second):
            if fd >= 0:
                os.close(fd)
