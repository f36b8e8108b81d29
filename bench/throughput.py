"""iperf3 TCP throughput through a lab veth: with podnetmon, with tcpdump, with neither.

All three run in one process tree and in rotating order, round after round, so
drift in the machine's speed hits each alike; the medians' ratios are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import daemon, iperf3_gbits, lab_pods, machine, median, spawn_in, tcpdump


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--streams", default="1,4")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with lab_pods(2) as (lab, (server, client)):
        configs: dict[str, Callable[[], AbstractContextManager[object]]] = {
            "none": nullcontext,
            "podnetmon": lambda: daemon(lab.inventory),
            "tcpdump": lambda: tcpdump(client.host_veth),
        }
        iperf = spawn_in(server, "iperf3", "-s")
        try:
            for streams in (int(s) for s in args.streams.split(",")):
                results: dict[str, list[float]] = {name: [] for name in configs}
                names = list(configs)
                for r in range(args.rounds):
                    for name in names[r % 3:] + names[:r % 3]:
                        with configs[name]():
                            gbits = iperf3_gbits(client, server, args.seconds, streams)
                        results[name].append(gbits)
                        print(f"streams {streams} round {r} {name:9}: {gbits:6.2f} Gbit/s",
                              flush=True)
                base = median(results["none"])
                for name in ("podnetmon", "tcpdump"):
                    ratio = median(results[name]) / base
                    print(f"RESULT throughput tcp x{streams} {name} / none: {ratio:.3f} "
                          f"({median(results[name]):.2f} / {base:.2f} Gbit/s, medians of "
                          f"{args.rounds})")
        finally:
            iperf.kill()
            iperf.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
