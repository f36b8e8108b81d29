"""500 pods on one node: start-up, scrape, memory, idle CPU, and new pods under churn.

One run, one daemon (every probe on), measured from outside the daemon where
there is an outside: attachments are counted with `bpftool net`, memory and
CPU read from /proc/<pid>, scrapes timed by the client, and the churn pods'
counts checked against the datagrams each one sent. The start-up time comes
from the daemon's own log (from "bpf programs loaded" to "ready"), as nothing
outside can see the compile finish.

Goals (issue 7): all attached within 10 s of the programs being loaded; a scrape
within 250 ms; resident memory within 150 MiB; idle CPU within 1% of a core with a
scrape every 15 s; a new pod counted within 1 s (p99) under 20 pods/s of churn.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import lab_pods, machine, median, percentile, running_daemon, stamp
from monitor.churn import Churn, ChurnPod, udp_sent_by_netns


def attached_by_bpftool(prefix: str = "pnml") -> int:
    """Lab veths carrying our programs on both hooks, as bpftool lists them."""
    out = json.loads(subprocess.run(["bpftool", "-j", "net", "show"], capture_output=True,
                                    text=True, check=True).stdout)
    hooks: dict[str, set[str]] = {}
    for section in out:
        for key in ("tc",):  # bpftool 7.1 lists classic filters only (the daemon's default)
            for entry in section.get(key, []):
                name = str(entry.get("devname", ""))
                if name.startswith(prefix) and entry.get("name") == "podnetmon":  # the filter's
                    hooks.setdefault(name, set()).add(str(entry.get("kind", "")))
    return sum(1 for kinds in hooks.values() if len(kinds) >= 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=120)
    parser.add_argument("--churn-seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20, help="pods created (and deleted) per s")
    parser.add_argument("--lifetime", type=float, default=2.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    started = time.monotonic()
    with lab_pods(args.pods) as (lab, pods):
        print(f"lab: {args.pods} pods in {time.monotonic() - started:.1f} s", flush=True)
        with running_daemon(lab.inventory) as daemon:
            loaded = stamp(daemon.events("bpf programs loaded")[0])
            ready = stamp(daemon.events("ready")[0])
            on_hooks = attached_by_bpftool()
            print(f"RESULT start {args.pods} pods: all attached {ready - loaded:.2f} s after "
                  f"the programs were loaded (goal 10 s); bpftool: {on_hooks} of "
                  f"{args.pods} lab veths carry our programs on both hooks", flush=True)

            times, lines = [], 0
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                text = daemon.scrape()
                times.append(time.perf_counter() - t0)
                lines = text.count("\n")
            print(f"RESULT scrape {args.pods} pods, every probe: median {median(times) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms, {lines} lines (goal 250 ms)", flush=True)
            rss = daemon.status("VmRSS") / 1024
            print(f"RESULT memory {args.pods} pods, steady: VmRSS {rss:.1f} MiB, peak VmHWM "
                  f"{daemon.status('VmHWM') / 1024:.1f} MiB (goal 150 MiB)", flush=True)

            cpu0, wall0 = daemon.cpu_seconds(), time.monotonic()
            while time.monotonic() - wall0 < args.idle_seconds:
                daemon.scrape()
                time.sleep(max(0.0, min(15.0, args.idle_seconds - (time.monotonic() - wall0))))
            share = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
            print(f"RESULT idle cpu {args.pods} pods, scraped every 15 s: {share * 100:.2f}% of "
                  f"one core over {time.monotonic() - wall0:.0f} s (goal 1%)", flush=True)

            def count(finished: list[ChurnPod]) -> None:
                seen = udp_sent_by_netns(daemon.scrape())
                for cp in finished:
                    cp.counted = seen.get(cp.pod.netns, 0)

            churn = Churn(lab, pods[0].ip, rate=args.rate, lifetime=args.lifetime)
            cpu0, wall0 = daemon.cpu_seconds(), time.monotonic()
            churn.run(args.churn_seconds, count=count)
            churn_cpu = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
            latencies, never, over = [], 0, 0
            for cp in churn.done:
                first = cp.first_counted()
                if cp.counted is not None and cp.counted > len(cp.sent):
                    over += 1
                if first is None:
                    never += 1
                    print(f"never counted: {cp.pod.name} netns {cp.pod.netns} "
                          f"{cp.pod.host_veth}: sent {len(cp.sent)}, counted {cp.counted}, "
                          f"made in {cp.ready - cp.created:.3f} s", flush=True)
                else:
                    latencies.append(first - cp.created)
            after = (f"counted after p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 "
                     f"{percentile(latencies, 0.99) * 1000:.0f} ms, max "
                     f"{max(latencies) * 1000:.0f} ms" if latencies else "none counted")
            print(f"RESULT churn {churn.lifecycles} pods at {args.rate:g}/s beside {args.pods}: "
                  f"{after} (goal p99 1 s); never counted: {never}; over-counted: {over}; daemon CPU "
                  f"{churn_cpu * 100:.0f}% of a core", flush=True)
            print(f"RESULT memory after churn: VmRSS {daemon.status('VmRSS') / 1024:.1f} MiB",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
