"""The soak: 10,000 pod lifecycles in the lab, and nothing leaked (`make soak`).

Beside a few idle pods, pods are created and deleted at a steady rate, each
sending a datagram every 10 ms while it lives. Every `--every` lifecycles the
daemon's resident memory, fds and threads, and what it holds in the kernel
(our tc filters, the slot table's entries, pnm_netns, the drop keys) are
counted from outside (/proc, bpftool). At the end the kernel must hold exactly
what the idle pods need, fds and threads must be back where they were, and
resident memory within 10% of where it stood after the first `--every`
lifecycles (the warm-up: Python's allocator and the caches find their size).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import lab_pods, machine, running_daemon
from podnetlab.churn import Churn
from tests.kernel.support import Census, census


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lifecycles", type=int, default=10_000)
    parser.add_argument("--idle", type=int, default=20)
    parser.add_argument("--rate", type=float, default=25)
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    leaked = False
    with lab_pods(args.idle) as (lab, pods), running_daemon(lab.inventory) as daemon:
        start = census(daemon.proc.pid)
        print(f"start: {start}", flush=True)
        churn = Churn(lab, pods[0].ip, rate=args.rate, lifetime=1.0)
        samples: list[tuple[int, Census]] = []
        started = time.monotonic()
        while churn.lifecycles < args.lifecycles:
            churn.run(args.every / args.rate, keep=False)
            daemon.scrape()  # a scrape now and then, as Prometheus would
            now = census(daemon.proc.pid)
            samples.append((churn.lifecycles, now))
            print(f"{churn.lifecycles:6} lifecycles, {time.monotonic() - started:5.0f} s: "
                  f"RSS {now.rss_kib / 1024:6.1f} MiB, fds {now.fds}, threads {now.threads}, "
                  f"filters {now.filters}, slots {now.ifslots}+{now.spill}, netns {now.netns}, "
                  f"drop keys {now.drop_keys}", flush=True)
        end = census(daemon.proc.pid)
        warm = samples[0][1].rss_kib
        growth = end.rss_kib / warm - 1
        kernel_ok = (end.filters, end.tcx, end.ifslots, end.spill, end.owners, end.netns) == (
            2 * args.idle, 0, args.idle, 0, args.idle, args.idle)
        print(f"RESULT soak {churn.lifecycles} lifecycles at {args.rate:g}/s beside {args.idle} "
              f"idle pods: RSS {warm / 1024:.1f} MiB after {samples[0][0]} -> "
              f"{end.rss_kib / 1024:.1f} MiB at the end ({growth * 100:+.1f}%, goal within 10%); "
              f"fds {start.fds} -> {end.fds}; threads {start.threads} -> {end.threads}; "
              f"kernel: filters {end.filters}, slots {end.ifslots}+{end.spill}, owners "
              f"{end.owners}, netns {end.netns} for {args.idle} pods "
              f"({'exact' if kernel_ok else 'LEAKED'}); drop keys {end.drop_keys}")
        # a leak (kernel objects, fds, threads not back where they were) is a bug and fails
        # the soak; RSS growth is a measured figure, reported against its goal above
        leaked = not kernel_ok or end.fds > start.fds or end.threads != start.threads
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
