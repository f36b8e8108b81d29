"""What reading a perf ring or a BPF ring buffer costs: our readers against libbpf's.

A BPF program on the tracepoint syscalls:sys_enter_getppid emits one record per call
of a producer process (its tgid is in a config map), and counts its runs in an array:
the independent count every figure is checked against. Where the record goes is
chosen per round (config[1]): a BPF_PERF_OUTPUT perf array (the trace probe's
output today) or a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, kernel 5.8+,
bpf_ringbuf_output: one ring shared by every CPU). A perf ring reports what it lost
in the ring itself; a ring buffer reports nothing to the reader, so the program counts
its failed bpf_ringbuf_output() calls in a map: delivered + lost (perf) or delivered +
dropped (ring buffer) == runs, every round. Four readers, alternating round by round,
in this process:

- perf-ours: monitor.kernel.perfring's Ring (what the daemon uses on x86-64): each
  CPU's ring copied out in one slice, parsed in one Python loop.
- perf-libbpf: libbpf's perf_buffer through ctypes, one Python callback per record.
- ringbuf-libbpf: libbpf's ring_buffer__new/__poll/__consume through ctypes, one
  Python callback per record (ctypes.string_at of the sample); libbpf stores the
  consumer position after every record.
- ringbuf-ours (here only): the consumer page mmap'ed read-write and the producer page
  and data pages (mapped twice, so a record never wraps) read-only; producer_pos
  read once, each record's 8-byte header read in place (BUSY bit: stop; DISCARD bit:
  skip), its sample sliced out of the mapping, the consumer position stored once per
  batch. Plain loads and stores, each one 8-byte access: right on x86-64 only, like
  perf-ours.

Modes:

- drain: the producer, pinned to one CPU, fills that CPU's 2,048-page perf ring or a
  2,048-page ring buffer (nothing reading), then one drain() takes it all: the
  reader's CPU time per event, nothing else running.
- stream: the producer calls getppid() as fast as it can for `--seconds` while the
  reader polls a 64-page-a-CPU perf array or a ring buffer of the same memory
  (64 pages x the online CPUs, rounded up to a power of two), 100 ms timeout; the perf
  readers are woken every 32 events (as the daemon does), the ring buffer by the
  kernel's default (a wake-up when a record lands on an emptied ring); events
  delivered per second, what was lost, and the reader's CPU per event
  (time.process_time of this process: the producer is another process).

Also per stream round: the BPF program's ns per run (kernel run statistics while the
bench runs): what one output costs the producing side.

Results (bench/RESULTS.md, issue 16 item 2, "The BPF ring buffer against the perf
array"; 2 vCPUs, kernel 6.18, medians of 5): read in batches by Python the two formats
cost the same (16 B drain: ringbuf-ours 660 ns/event, perf-ours 831; streaming 1,399
vs 1,166 ns reader CPU/event; 256 B: 1,201 vs 1,382, 1,314 vs 1,135); libbpf's
ring_buffer, a callback per record, costs more than perf-ours (1,093 and 1,452 ns
drain, 1.5x the streaming CPU) but half of libbpf's perf_buffer. The ring buffer wins
on the producing side: bpf_ringbuf_output ran in ~300 ns against ~750-900 for
bpf_perf_event_output. The trace probe keeps the perf array: it copies packets with
perf_submit_skb (the kernel copies from the skb), which a ring buffer has no
counterpart for (a scratch copy first), the ring buffer is allocated at load and kept,
and it needs kernel 5.8; what switching would take is written down there.

Run as root: .venv/bin/python bench/ring_cost.py [--payload 256]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median
from monitor.kernel import perfring, syscalls, tracepoints
from monitor.kernel.perfbuffer import libbpf
from monitor.kernel.perfring import PerfReader

SOURCE = r"""
struct ring_cost_event { u64 seq; u64 pad[PAYLOAD_WORDS]; };

BPF_PERF_OUTPUT(ring_cost_events);
BPF_RINGBUF_OUTPUT(ring_cost_rb_drain, RB_DRAIN_PAGES);
BPF_RINGBUF_OUTPUT(ring_cost_rb_stream, RB_STREAM_PAGES);
BPF_ARRAY(ring_cost_config, u32, 2);   /* [0]: the producer's tgid, [1]: OUT_* */
BPF_ARRAY(ring_cost_runs, u64, 1);
BPF_ARRAY(ring_cost_dropped, u64, 1);  /* ring buffer outputs that failed (full) */

int ring_cost_emit(void *ctx)
{
    int zero = 0, one = 1;
    u32 *tgid = ring_cost_config.lookup(&zero);
    if (!tgid || (bpf_get_current_pid_tgid() >> 32) != *tgid)
        return 0;
    u32 *out = ring_cost_config.lookup(&one);
    u64 *runs = ring_cost_runs.lookup(&zero);
    u64 *dropped = ring_cost_dropped.lookup(&zero);
    if (!out || !runs || !dropped)
        return 0;
    struct ring_cost_event e = {};
    e.seq = __sync_fetch_and_add(runs, 1);
    if (*out == 0) {
        ring_cost_events.perf_submit(ctx, &e, sizeof(e));
        return 0;
    }
    int err = *out == 1 ? ring_cost_rb_drain.ringbuf_output(&e, sizeof(e), 0)
                        : ring_cost_rb_stream.ringbuf_output(&e, sizeof(e), 0);
    if (err)
        __sync_fetch_and_add(dropped, 1);
    return 0;
}
"""
OUT_PERF, OUT_RB_DRAIN, OUT_RB_STREAM = 0, 1, 2
DRAIN_PAGES, STREAM_PAGES = 2048, 64  # the perf rings': a CPU's

# waits for a line on stdin, then calls getppid() `count` times or for `seconds`
PRODUCER = r"""
import os, sys, time
count, seconds = int(sys.argv[1]), float(sys.argv[2])
sys.stdin.readline()
getppid = os.getppid
if count:
    for _ in range(count):
        getppid()
else:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            getppid()
"""

_U32 = struct.Struct("<I")


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Bench:
    def __init__(self, payload: int) -> None:
        import bcc

        words = max(0, (payload - 8) // 8)
        self.rb_stream_pages = _pow2(STREAM_PAGES * len(perfring.online_cpus()))
        self.bpf: Any = bcc.BPF(text=SOURCE.encode(), cflags=[
            f"-DPAYLOAD_WORDS={words or 1}", f"-DRB_DRAIN_PAGES={DRAIN_PAGES}",
            f"-DRB_STREAM_PAGES={self.rb_stream_pages}"])
        fn = self.bpf.load_func(b"ring_cost_emit", bcc.BPF.TRACEPOINT)
        self.prog_fd: int = fn.fd
        self.stats_fd = syscalls.enable_run_stats()  # run time and count, while open
        self.link = tracepoints.attach_tracepoint(fn.fd, "syscalls", "sys_enter_getppid")
        self.events_fd: int = self.bpf[b"ring_cost_events"].map_fd
        self.rb_fds = {OUT_RB_DRAIN: self.bpf[b"ring_cost_rb_drain"].map_fd,
                       OUT_RB_STREAM: self.bpf[b"ring_cost_rb_stream"].map_fd}
        self.config_fd: int = self.bpf[b"ring_cost_config"].map_fd
        self.runs_fd: int = self.bpf[b"ring_cost_runs"].map_fd
        self.dropped_fd: int = self.bpf[b"ring_cost_dropped"].map_fd

    def _counter(self, fd: int) -> int:
        value = syscalls.map_lookup(fd, _U32.pack(0), 8)
        assert value is not None
        return int(struct.unpack("<Q", value)[0])

    def counts(self) -> tuple[int, int]:
        """(the program's runs, its failed ring buffer outputs)."""
        return self._counter(self.runs_fd), self._counter(self.dropped_fd)

    def output(self, out: int) -> None:
        syscalls.map_update(self.config_fd, _U32.pack(1), _U32.pack(out))

    def producer(self, count: int, seconds: float, cpu: int | None) -> subprocess.Popen[bytes]:
        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(count), str(seconds)],
                                stdin=subprocess.PIPE, preexec_fn=pin)  # noqa: PLW1509
        syscalls.map_update(self.config_fd, _U32.pack(0), _U32.pack(proc.pid))
        return proc

    def last_samples(self) -> int:
        """One more sample on each CPU, made by this process: the kernel writes a LOST
        record for a full perf ring only before the next sample that finds room in that
        CPU's ring (the stream's producer is not pinned). Returns how many."""
        cpus, affinity = perfring.online_cpus(), os.sched_getaffinity(0)
        syscalls.map_update(self.config_fd, _U32.pack(0), _U32.pack(os.getpid()))
        try:
            for cpu in cpus:
                os.sched_setaffinity(0, {cpu})
                os.getppid()
        finally:
            os.sched_setaffinity(0, affinity)
            syscalls.map_update(self.config_fd, _U32.pack(0), _U32.pack(0))
        return len(cpus)

    def prog_run(self) -> tuple[int, int]:
        """The program's (run time ns, runs) so far: every getppid() on the machine."""
        info = syscalls.prog_info(self.prog_fd)
        return info.run_time_ns, info.run_cnt

    def close(self) -> None:
        os.close(self.link)
        os.close(self.stats_fd)
        self.bpf.cleanup()


class Reader(Protocol):
    def drain(self) -> int: ...
    def poll(self, timeout_ms: int) -> int: ...
    def lost(self) -> int: ...
    def close(self) -> None: ...


class PerfArray:
    """PerfReader ("python" or "libbpf") with its LOST records summed."""

    def __init__(self, bench: Bench, reader: str, pages: int, on_event: Callable[[bytes], None]):
        bench.output(OUT_PERF)
        self._lost: list[int] = []
        self._reader = PerfReader(bench.events_fd, pages=pages, on_event=on_event,
                                  on_lost=self._lost.append, reader=reader)

    def drain(self) -> int:
        return self._reader.drain()

    def poll(self, timeout_ms: int) -> int:
        return self._reader.poll(timeout_ms)

    def lost(self) -> int:
        return sum(self._lost)

    def close(self) -> None:
        self._reader.close()


# libbpf's ring_buffer (libbpf.so.1; struct ring_buffer_opts is { size_t sz; }, NULL is fine)
_RB_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _libbpf_ring() -> ctypes.CDLL:
    lib = libbpf()
    lib.ring_buffer__new.restype = ctypes.c_void_p
    lib.ring_buffer__new.argtypes = [ctypes.c_int, _RB_SAMPLE_FN, ctypes.c_void_p, ctypes.c_void_p]
    lib.ring_buffer__poll.restype = ctypes.c_int
    lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ring_buffer__consume.restype = ctypes.c_int
    lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
    lib.ring_buffer__free.restype = None
    lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
    return lib


class RingbufLibbpf:
    """A BPF ring buffer read by libbpf: one ctypes callback per record."""

    def __init__(self, bench: Bench, out: int, on_event: Callable[[bytes], None]) -> None:
        bench.output(out)
        self._lib = _libbpf_ring()
        string_at = ctypes.string_at

        def sample(_ctx: int | None, data: int, size: int) -> int:
            on_event(string_at(data, size))
            return 0

        self._callback = _RB_SAMPLE_FN(sample)  # alive as long as libbpf may call it
        self._rb: int | None = self._lib.ring_buffer__new(bench.rb_fds[out], self._callback,
                                                          None, None)
        if not self._rb:
            raise OSError(ctypes.get_errno(), "libbpf ring_buffer__new failed")

    def drain(self) -> int:
        n = int(self._lib.ring_buffer__consume(self._rb))
        if n < 0:
            raise OSError(-n, "ring_buffer__consume")
        return n

    def poll(self, timeout_ms: int) -> int:
        n = int(self._lib.ring_buffer__poll(self._rb, timeout_ms))
        if n < 0 and n != -4:  # -EINTR
            raise OSError(-n, "ring_buffer__poll")
        return max(n, 0)

    def lost(self) -> int:
        return 0  # the program counts the ring buffer's losses

    def close(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None


# the ring buffer's layout (kernel/bpf/ringbuf.c, include/uapi/linux/bpf.h)
RB_BUSY_BIT, RB_DISCARD_BIT, RB_HDR_SIZE = 1 << 31, 1 << 30, 8


class RingbufOurs:
    """A BPF ring buffer read in Python: headers in place, the consumer position stored
    once per batch. x86-64 only (plain loads of producer_pos and the headers stand for
    the acquire loads, a plain store of consumer_pos for the release store)."""

    def __init__(self, bench: Bench, out: int, on_event: Callable[[bytes], None]) -> None:
        bench.output(out)
        self._on_event = on_event
        fd = bench.rb_fds[out]
        page = mmap.PAGESIZE
        self._size = bench.rb_stream_pages * page if out == OUT_RB_STREAM else DRAIN_PAGES * page
        self._cons_map = mmap.mmap(fd, page, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # the producer page, then the data pages twice over: a record never wraps
        self._data = mmap.mmap(fd, page + 2 * self._size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ, offset=page)
        self._cons: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._cons_map, 0)
        # native-order views: an item is one 4- or 8-byte load (struct's "<I" costs a
        # buffer export per call, ~20 % more per record here)
        self._words: memoryview | None = memoryview(self._data).cast("I")
        self._prod: memoryview | None = memoryview(self._data).cast("Q")
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)

    def drain(self) -> int:
        cons_word, words, prod_word = self._cons, self._words, self._prod
        assert cons_word is not None and words is not None and prod_word is not None
        buf, on_event, mask, page = self._data, self._on_event, self._size - 1, mmap.PAGESIZE
        cons = cons_word.value
        prod = prod_word[0]  # one pass, up to where the producer was: as PerfReader
        start, delivered = cons, 0
        while cons < prod:
            off = page + (cons & mask)
            hdr = words[off >> 2]  # records are 8-byte aligned
            if hdr & RB_BUSY_BIT:  # reserved, not yet committed: the rest waits
                break
            size = hdr & ~(RB_BUSY_BIT | RB_DISCARD_BIT)
            if not hdr & RB_DISCARD_BIT:
                on_event(buf[off + RB_HDR_SIZE:off + RB_HDR_SIZE + size])
                delivered += 1
            cons += (size + RB_HDR_SIZE + 7) & ~7
        if cons != start:
            cons_word.value = cons  # once per batch: the space goes back to the kernel
        return delivered

    def poll(self, timeout_ms: int) -> int:
        self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return self.drain()

    def lost(self) -> int:
        return 0  # the program counts the ring buffer's losses

    def close(self) -> None:
        self._cons = None
        for view in (self._words, self._prod):
            if view is not None:
                view.release()
        self._words = self._prod = None
        self._cons_map.close()
        self._data.close()
        self._epoll.close()


READERS = ("perf-ours", "perf-libbpf", "ringbuf-libbpf", "ringbuf-ours")


class Opened:
    """One of READERS, opened for a drain or a stream round; a context manager."""

    def __init__(self, bench: Bench, name: str, mode: str,
                 on_event: Callable[[bytes], None]) -> None:
        self.perf = name.startswith("perf-")
        if self.perf:
            self.reader: Reader = PerfArray(bench, "python" if name == "perf-ours" else "libbpf",
                                            DRAIN_PAGES if mode == "drain" else STREAM_PAGES,
                                            on_event)
        else:
            out = OUT_RB_DRAIN if mode == "drain" else OUT_RB_STREAM
            kind = RingbufLibbpf if name == "ringbuf-libbpf" else RingbufOurs
            self.reader = kind(bench, out, on_event)

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.reader.close()


def drain_round(bench: Bench, name: str, count: int) -> tuple[float, int]:
    """ns of this process's CPU per event for one drain() of a ring `count` events fill."""
    got: list[bytes] = []
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with Opened(bench, name, "drain", got.append) as opened:
        reader = opened.reader
        reader.drain()  # a ring buffer outlives its readers: anything a past round left
        got.clear()
        runs0, dropped0 = bench.counts()
        proc = bench.producer(count, 0, cpu)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait()
        runs1, dropped1 = bench.counts()
        made, dropped = runs1 - runs0, dropped1 - dropped0
        started = time.process_time()
        delivered = reader.drain()
        spent = time.process_time() - started
        reader.drain()
        lost = reader.lost() + dropped
    if delivered + lost != made or delivered != len(got):
        raise SystemExit(f"{name}: {delivered} delivered + {lost} lost != {made} made")
    return spent * 1e9 / max(delivered, 1), delivered


Stream = tuple[float, float, int, int, float, float]


def stream_round(bench: Bench, name: str, seconds: float) -> Stream:
    """(events/s delivered, ns of reader CPU per event, delivered, lost, events/s made,
    ns per run of the BPF program: the producing side's cost of one output)."""
    got = [0]

    def count(_raw: bytes) -> None:
        got[0] += 1

    with Opened(bench, name, "stream", count) as opened:
        reader = opened.reader
        reader.drain()
        got[0] = 0
        runs0, dropped0 = bench.counts()
        prog0 = bench.prog_run()
        proc = bench.producer(0, seconds, None)
        assert proc.stdin is not None
        cpu0, wall0 = time.process_time(), time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        while proc.poll() is None:
            reader.poll(100)
        reader.drain()
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        prog1 = bench.prog_run()
        extra = 0
        if opened.perf:
            extra = bench.last_samples()  # bring the LOST records full perf rings still owe
            reader.drain()
        runs1, dropped1 = bench.counts()
        made = runs1 - runs0 - extra
        got[0] -= extra
        lost = reader.lost() + dropped1 - dropped0
    if got[0] + lost != made:
        raise SystemExit(f"{name}: {got[0]} delivered + {lost} lost != {made} made")
    prog_ns = (prog1[0] - prog0[0]) / max(prog1[1] - prog0[1], 1)
    return got[0] / wall, cpu * 1e9 / max(got[0], 1), got[0], lost, made / wall, prog_ns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=200_000, help="per drain round")
    parser.add_argument("--seconds", type=float, default=3.0, help="per stream round")
    parser.add_argument("--payload", type=int, default=16, help="bytes per event")
    parser.add_argument("--readers", default=",".join(READERS),
                        help=f"a comma-separated subset of {', '.join(READERS)}")
    args = parser.parse_args()
    readers = [r for r in args.readers.split(",") if r]
    if not readers or any(r not in READERS for r in readers):
        parser.error(f"--readers: choose from {', '.join(READERS)}")
    bench = Bench(args.payload)
    print(f"machine: {machine()}, payload {args.payload} bytes, ring buffer "
          f"{DRAIN_PAGES} pages (drain), {bench.rb_stream_pages} pages (stream)")
    # what a 2048-page perf ring holds of these records (header, u32 size, payload,
    # padding); a ring buffer's records are smaller (an 8-byte header, the payload)
    events = min(args.events, DRAIN_PAGES * 4096 // (args.payload + 16) * 9 // 10)
    drain: dict[str, list[float]] = {r: [] for r in readers}
    stream: dict[str, list[Stream]] = {r: [] for r in readers}
    try:
        for i in range(args.rounds):
            for name in readers if i % 2 == 0 else readers[::-1]:
                ns, n = drain_round(bench, name, events)
                drain[name].append(ns)
                print(f"round {i} {name} drain: {n} events, {ns:.0f} ns/event", flush=True)
                result = stream_round(bench, name, args.seconds)
                stream[name].append(result)
                rate, ns_ev, n, lost, made, prog_ns = result
                print(f"round {i} {name} stream: {rate:,.0f} events/s, {ns_ev:.0f} ns CPU/event, "
                      f"{n} delivered, {lost} lost, {made:,.0f} made/s, BPF program "
                      f"{prog_ns:.0f} ns/run", flush=True)
    finally:
        bench.close()
    for name in readers:
        print(f"RESULT {name} drain: median {median(drain[name]):.0f} ns/event "
              f"({', '.join(f'{v:.0f}' for v in drain[name])})")
        print(f"RESULT {name} stream: median {median([s[0] for s in stream[name]]):,.0f} "
              f"events/s, {median([s[1] for s in stream[name]]):.0f} ns reader CPU/event, "
              f"lost {sum(s[3] for s in stream[name])} of "
              f"{sum(s[2] + s[3] for s in stream[name])}, "
              f"made {median([s[4] for s in stream[name]]):,.0f}/s, BPF program "
              f"{median([s[5] for s in stream[name]]):.0f} ns/run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
