"""What reading a perf ring costs: our Python reader against libbpf's perf_buffer.

A BPF program on the tracepoint syscalls:sys_enter_getppid emits one record per call
of a producer process (its tgid is in a config map) into a BPF_PERF_OUTPUT map, and
counts its runs in an array: the independent count every figure is checked against
(delivered + lost == runs). Readers alternate round by round, in this process:

- drain: the producer, pinned to one CPU, fills that CPU's ring (nothing reading),
  then one drain() takes it all: the reader's CPU time per event, nothing else running.
- stream: the producer calls getppid() as fast as it can for `--seconds` while the
  reader polls (wakeup every 32 events, 100 ms timeout, as the daemon does); events
  delivered per second, what the kernel lost, and the reader's CPU per event
  (time.process_time of this process: the producer is another process).

Run as root: .venv/bin/python bench/ring_cost.py
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, median
from monitor.kernel import syscalls, tracepoints
from monitor.kernel.perfring import READERS, PerfReader

SOURCE = r"""
struct ring_cost_event { u64 seq; u64 pad[PAYLOAD_WORDS]; };

BPF_PERF_OUTPUT(ring_cost_events);
BPF_ARRAY(ring_cost_config, u32, 1);   /* [0]: the producer's tgid */
BPF_ARRAY(ring_cost_runs, u64, 1);

int ring_cost_emit(void *ctx)
{
    int zero = 0;
    u32 *tgid = ring_cost_config.lookup(&zero);
    if (!tgid || (bpf_get_current_pid_tgid() >> 32) != *tgid)
        return 0;
    u64 *runs = ring_cost_runs.lookup(&zero);
    if (!runs)
        return 0;
    struct ring_cost_event e = {};
    e.seq = __sync_fetch_and_add(runs, 1);
    ring_cost_events.perf_submit(ctx, &e, sizeof(e));
    return 0;
}
"""

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


class Bench:
    def __init__(self, payload: int) -> None:
        import bcc

        words = max(0, (payload - 8) // 8)
        self.bpf: Any = bcc.BPF(text=SOURCE.encode(), cflags=[f"-DPAYLOAD_WORDS={words or 1}"])
        fn = self.bpf.load_func(b"ring_cost_emit", bcc.BPF.TRACEPOINT)
        self.link = tracepoints.attach_tracepoint(fn.fd, "syscalls", "sys_enter_getppid")
        self.events_fd: int = self.bpf[b"ring_cost_events"].map_fd
        self.config_fd: int = self.bpf[b"ring_cost_config"].map_fd
        self.runs_fd: int = self.bpf[b"ring_cost_runs"].map_fd

    def runs(self) -> int:
        value = syscalls.map_lookup(self.runs_fd, struct.pack("<I", 0), 8)
        assert value is not None
        return int(struct.unpack("<Q", value)[0])

    def producer(self, count: int, seconds: float, cpu: int | None) -> subprocess.Popen[bytes]:
        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(count), str(seconds)],
                                stdin=subprocess.PIPE, preexec_fn=pin)  # noqa: PLW1509
        syscalls.map_update(self.config_fd, struct.pack("<I", 0), struct.pack("<I", proc.pid))
        return proc

    def last_sample(self) -> None:
        """One more sample, made by this process: the kernel writes a LOST record for a
        full ring only before the next sample that finds room."""
        syscalls.map_update(self.config_fd, struct.pack("<I", 0), struct.pack("<I", os.getpid()))
        os.getppid()
        syscalls.map_update(self.config_fd, struct.pack("<I", 0), struct.pack("<I", 0))

    def close(self) -> None:
        os.close(self.link)
        self.bpf.cleanup()


def drain_round(bench: Bench, name: str, count: int) -> tuple[float, int]:
    """ns of this process's CPU per event for one drain() of a ring `count` events fill."""
    got: list[bytes] = []
    lost: list[int] = []
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with PerfReader(bench.events_fd, pages=2048, on_event=got.append, on_lost=lost.append,
                    reader=name) as reader:
        before = bench.runs()
        proc = bench.producer(count, 0, cpu)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait()
        made = bench.runs() - before
        started = time.process_time()
        delivered = reader.drain()
        spent = time.process_time() - started
        reader.drain()
    if delivered + sum(lost) != made or delivered != len(got):
        raise SystemExit(f"{name}: {delivered} delivered + {sum(lost)} lost != {made} made")
    return spent * 1e9 / max(delivered, 1), delivered


def stream_round(bench: Bench, name: str, seconds: float) -> tuple[float, float, int, int]:
    """(events/s delivered, ns of reader CPU per event, delivered, lost)."""
    got = [0]
    lost: list[int] = []

    def count(_raw: bytes) -> None:
        got[0] += 1

    with PerfReader(bench.events_fd, pages=64, on_event=count, on_lost=lost.append,
                    reader=name) as reader:
        before = bench.runs()
        proc = bench.producer(0, seconds, None)
        assert proc.stdin is not None
        cpu0, wall0 = time.process_time(), time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        while proc.poll() is None:
            reader.poll(100)
        reader.drain()
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        bench.last_sample()  # brings the LOST record a full ring still owes
        reader.drain()
        made = bench.runs() - before - 1
        got[0] -= 1
    if got[0] + sum(lost) != made:
        raise SystemExit(f"{name}: {got[0]} delivered + {sum(lost)} lost != {made} made")
    return got[0] / wall, cpu * 1e9 / max(got[0], 1), got[0], sum(lost)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=200_000, help="per drain round")
    parser.add_argument("--seconds", type=float, default=3.0, help="per stream round")
    parser.add_argument("--payload", type=int, default=16, help="bytes per event")
    args = parser.parse_args()
    print(f"machine: {machine()}, payload {args.payload} bytes")
    bench = Bench(args.payload)
    # what a 2048-page ring holds of these records (header, u32 size, payload, padding)
    events = min(args.events, 2048 * 4096 // (args.payload + 16) * 9 // 10)
    drain: dict[str, list[float]] = {r: [] for r in READERS}
    stream: dict[str, list[tuple[float, float, int, int]]] = {r: [] for r in READERS}
    try:
        for i in range(args.rounds):
            for name in READERS if i % 2 == 0 else READERS[::-1]:
                ns, n = drain_round(bench, name, events)
                drain[name].append(ns)
                print(f"round {i} {name} drain: {n} events, {ns:.0f} ns/event", flush=True)
                rate, ns_ev, n, lost = stream_round(bench, name, args.seconds)
                stream[name].append((rate, ns_ev, n, lost))
                print(f"round {i} {name} stream: {rate:,.0f} events/s, {ns_ev:.0f} ns CPU/event, "
                      f"{n} delivered, {lost} lost", flush=True)
    finally:
        bench.close()
    for name in READERS:
        rates = [s[0] for s in stream[name]]
        print(f"RESULT {name} drain: median {median(drain[name]):.0f} ns/event "
              f"({', '.join(f'{v:.0f}' for v in drain[name])})")
        print(f"RESULT {name} stream: median {median(rates):,.0f} events/s, "
              f"{median([s[1] for s in stream[name]]):.0f} ns reader CPU/event, "
              f"lost {sum(s[3] for s in stream[name])} of "
              f"{sum(s[2] + s[3] for s in stream[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
