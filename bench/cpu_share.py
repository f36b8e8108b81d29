"""What watching costs, as the kernel accounts it: our programs' share of busy CPU.

Wall-clock A/B throughput scatters by about ±15 % a run on these machines, so it cannot
judge a cost of a few per cent. The kernel's own accounting can: with
`kernel.bpf_stats_enabled=1` every BPF program's run time is summed (`run_time_ns`), and
/proc/stat says how much CPU was busy (user, nice, system, irq, softirq) over the same
window. For each probe set (`--configs`) and traffic (`--tests`: iperf3 TCP with 1 and 4
streams, 64-byte UDP datagrams) between two lab pods, `--runs` windows of `--seconds`:

- share: the run time of the programs this configuration loaded (every program whose id
  appeared after it started: the daemon's TC and tracepoint programs, or the empty one)
  over the busy CPU time, in per cent; the worst run is reported, as a budget must hold
  in it;
- ns/run: that run time over their runs (every TC program runs once per packet per hook);
- throughput: iperf3's own figure, as a ratio to the `none` configuration's median.

The statistics cost something themselves: two clock reads around every run, which an
empty program's ns per run shows (70-90 ns here, where a run of it by BPF_PROG_TEST_RUN,
with no statistics, takes ~40 ns with the test loop's own work). The share includes them:
it is an upper bound of what the programs cost with them off, as they are by default.
`over empty` takes the empty program's ns per run (measured in the same run, on the same
hook and traffic) off every run: the share of the work our programs add to a program's
bare call, the figure issue 19's budget is about (the hook and the bare call are the
hook's own cost, which `empty-tc`/`empty-tcx` report).

Configurations: `none` (nothing attached), `empty-tc`/`empty-tcx` (a program returning
at once on both hooks: the hook's own cost), `counters` (`--probes packets`), `+<probe>`
(the counters and one probe), `all` (every probe, the default) and `all-tcx`.

    .venv/bin/python bench/cpu_share.py --seconds 5 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, run_in, spawn_in
from bench.throughput import empty_tc, empty_tcx, iperf3, watching
from monitor.probes import REGISTRY
from podnetlab.lab import Lab, LabPod

STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
BUSY_FIELDS = (0, 1, 2, 5, 6)  # user nice system (idle iowait) irq softirq


def busy_ns() -> int:
    """CPU time spent busy since boot, over every CPU, in ns (/proc/stat's first line)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = sum(int(fields[i]) for i in BUSY_FIELDS)
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def programs() -> dict[int, tuple[str, int, int]]:
    """Every loaded BPF program: id -> (name, run_time_ns, run_cnt)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: (p.get("name", ""), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out)}


@contextmanager
def stats_on() -> Iterator[None]:
    before = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(before)


def configs(lab: Lab, pair: tuple[LabPod, LabPod], other: tuple[LabPod, LabPod]
            ) -> dict[str, Callable[[], AbstractContextManager[None]]]:
    devs = [pair[0].host_veth, pair[1].host_veth]
    out: dict[str, Callable[[], AbstractContextManager[None]]] = {
        "none": nullcontext,
        "empty-tc": lambda: empty_tc(devs),
        "empty-tcx": lambda: empty_tcx(devs),
        "counters": lambda: watching(lab, pair, other, "--probes", "packets"),
    }
    for name in REGISTRY:
        if name not in ("packets", "trace"):  # trace costs nothing until a trace runs
            out[f"+{name}"] = (lambda n=name: watching(lab, pair, other, "--probes",
                                                       f"packets,{n}"))
    out["all"] = lambda: watching(lab, pair, other)
    out["all-tcx"] = lambda: watching(lab, pair, other, "--attach-mode", "tcx")
    return out


@dataclass(frozen=True)
class Window:
    """One traffic window: our programs' run time and runs, the busy CPU time, iperf3's rate."""

    ran_ns: int
    runs: int
    busy_ns: int
    throughput: float

    def share(self, accounting_ns: float = 0.0) -> float:
        """Our programs' share of busy CPU in %, less `accounting_ns` a run (the empty
        program's ns per run: the statistics' own clock reads and a program's call)."""
        return 100 * max(0.0, self.ran_ns - accounting_ns * self.runs) / max(1, self.busy_ns)

    def ns_per_run(self) -> float:
        return self.ran_ns / self.runs if self.runs else 0.0


def window(client: LabPod, server: LabPod, test: str, seconds: float, ours: set[int]) -> Window:
    progs, busy = programs(), busy_ns()
    value = iperf3([(client, server)], test, seconds)[0]
    progs_after, busy_after = programs(), busy_ns()
    ran = sum(progs_after[i][1] - progs[i][1] for i in ours if i in progs and i in progs_after)
    runs = sum(progs_after[i][2] - progs[i][2] for i in ours if i in progs and i in progs_after)
    return Window(ran, runs, busy_after - busy, value)


def measure_all(lab: Lab, pods: list[LabPod], args: argparse.Namespace) -> None:
    server, client = pods[0], pods[1]
    tests = args.tests.split(",")
    table = configs(lab, (server, client), (pods[2], pods[3]))
    wanted = args.configs.split(",") if args.configs else list(table)
    baseline: dict[str, float] = {}
    empty: dict[tuple[str, str], float] = {}  # (hook, test) -> the empty program's ns/run
    for name in wanted:
        before = set(programs())
        hook = "tcx" if name.endswith("tcx") else "tc"
        with table[name]():
            ours = set(programs()) - before
            for test in tests:
                got = [window(client, server, test, args.seconds, ours)
                       for _ in range(args.runs)]
                worst = max(got, key=lambda g: g.share())
                value = statistics.median(g.throughput for g in got)
                if name == "none":
                    baseline[test] = value
                if name.startswith("empty"):
                    empty[hook, test] = statistics.median(g.ns_per_run() for g in got)
                ratio = value / baseline[test] if baseline.get(test) else float("nan")
                # Over the empty program measured in this run (the configuration list
                # must have it first): what our work adds to a program's bare call.
                accounting = empty.get((hook, test))
                net = ("" if accounting is None or name.startswith("empty") else
                       f"over empty {max(g.share(accounting) for g in got):5.2f} % ")
                print(f"RESULT cpu_share {name:14} {test:6} share {worst.share():5.2f} % "
                      f"(runs: {', '.join(f'{g.share():.2f}' for g in got)}) {net}"
                      f"ns/run {worst.ns_per_run():6.1f} throughput {value:8.2f} "
                      f"ratio {ratio:5.3f} programs {len(ours)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--tests", default="tcp1,tcp4,udp64")
    parser.add_argument("--configs", default="",
                        help="comma-separated; empty: every one (see the module doc)")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    lab = Lab()
    lab.down()
    try:
        # 0, 1: pause processes (watched); 2, 3: pinned only (the daemon leaves them be)
        pods = lab.up(4, pinned=2)
        server, client = pods[0], pods[1]
        run_in(client, "ping", "-c", "1", "-W", "1", server.ip)
        sink = spawn_in(server, "iperf3", "-s")
        time.sleep(0.5)
        try:
            with stats_on():
                measure_all(lab, pods, args)
        finally:
            sink.kill()
            sink.wait()
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
