"""Two releases side by side: start-up, RSS, scrape time and per-packet cost, one run.

For a change that should change no behaviour (a reshaping of the tree), the question
is whether anything got slower or bigger. Each release runs from a git worktree of its
own (`python -m monitor run` with the worktree as its working directory, so its own
monitor package and bpf/ are the ones loaded) beside the same lab pods, alternately,
`--rounds` times each:

- start-up: from starting the process to /readyz answering (compiling included);
- scrape: the median of `--scrapes` back-to-back /metrics reads;
- RSS: VmRSS after those scrapes, and VmHWM;
- per packet: with the kernel's BPF run statistics on, 64-byte UDP datagrams between
  two lab pods for `--traffic-seconds`; the TC programs' run time per run, read from
  the daemon's own podnet_monitor_bpf_run_seconds / podnet_monitor_bpf_runs.

Prints a RESULT line per figure with each release's median over the rounds and the
ratio head/base.

    .venv/bin/python bench/versions.py --base 3cc9352 --head HEAD --pods 100
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, UDP_SENDER, lab_pods, median, run_in, running_daemon
from podnetlab.lab import LabPod

TC_PROGRAMS = ("pnm_tc_ingress", "pnm_tc_egress")


def worktree(rev: str) -> Path:
    path = Path(f"/tmp/podnetmon-version-{rev[:12]}")
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def sample_sum(text: str, name: str, program: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'program="{program}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def measure(checkout: Path, inventory: Path, pods: list[LabPod],
            args: argparse.Namespace) -> dict[str, float]:
    started = time.monotonic()
    with running_daemon(inventory, "--bpf-stats", "true", checkout=checkout) as daemon:
        startup = time.monotonic() - started
        times = []
        for _ in range(args.scrapes):
            t0 = time.monotonic()
            with urllib.request.urlopen(f"http://{daemon.address}/metrics", timeout=60) as r:
                r.read()
            times.append(time.monotonic() - t0)
        rss, hwm = daemon.status("VmRSS") / 1024, daemon.status("VmHWM") / 1024
        before = daemon.scrape()
        server, client = pods[0], pods[1]
        count = int(args.traffic_seconds * 20000)
        run_in(client, sys.executable, "-c", UDP_SENDER, server.ip, "9", str(count), "64")
        after = daemon.scrape()
    seconds = sum(sample_sum(after, "podnet_monitor_bpf_run_seconds_total", p)
                  - sample_sum(before, "podnet_monitor_bpf_run_seconds_total", p) for p in TC_PROGRAMS)
    runs = sum(sample_sum(after, "podnet_monitor_bpf_runs_total", p)
               - sample_sum(before, "podnet_monitor_bpf_runs_total", p) for p in TC_PROGRAMS)
    return {"startup_s": startup, "scrape_ms": median(times) * 1000, "rss_mib": rss,
            "hwm_mib": hwm, "ns_per_run": seconds * 1e9 / runs if runs else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="3cc9352", help="the release before (a git revision)")
    parser.add_argument("--head", default="HEAD", help="the release after")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--traffic-seconds", type=float, default=3.0)
    args = parser.parse_args()
    revs = {"base": args.base, "head": args.head}
    trees = {name: worktree(rev) for name, rev in revs.items()}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in revs}
    try:
        with lab_pods(args.pods) as (lab, pods):
            for round_ in range(args.rounds):
                order = ("base", "head") if round_ % 2 == 0 else ("head", "base")
                for name in order:
                    got = measure(trees[name], lab.inventory, pods, args)
                    print(f"round {round_ + 1} {name}: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
                    for key, value in got.items():
                        results[name].setdefault(key, []).append(value)
    finally:
        for path in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for key in results["base"]:
        base, head = median(results["base"][key]), median(results["head"][key])
        print(f"RESULT versions {key}: base {base:.3f} head {head:.3f} ratio {head / base:.3f} "
              f"(medians of {args.rounds}; {args.pods} pods; base {args.base}, head {args.head})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
