"""iperf3 through a lab veth: with podnetmon, with tcpdump, with neither.

TCP throughput with 1 and 4 streams, and the rate of 64-byte UDP datagrams an
unthrottled sender gets through. All three configurations run in one process
tree and in rotating order, round after round, so drift in the machine's speed
hits each alike; the medians' ratios are printed. The daemon is started once
per round (and ready before the traffic starts), like tcpdump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    daemon,
    iperf3_gbits,
    iperf3_udp_pps,
    lab_pods,
    machine,
    median,
    spawn_in,
    tcpdump,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--tests", default="tcp1,tcp4,udp64",
                        help="tcpN: TCP with N streams; udp64: 64-byte UDP packet rate")
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
            for test in args.tests.split(","):
                results: dict[str, list[float]] = {name: [] for name in configs}
                names = list(configs)
                unit = "kpkt/s" if test.startswith("udp") else "Gbit/s"
                for r in range(args.rounds):
                    for name in names[r % 3:] + names[:r % 3]:
                        with configs[name]():
                            if test.startswith("udp"):
                                value = iperf3_udp_pps(client, server, args.seconds,
                                                       int(test[3:])) / 1000
                            else:
                                value = iperf3_gbits(client, server, args.seconds, int(test[3:]))
                        results[name].append(value)
                        print(f"{test} round {r} {name:9}: {value:8.2f} {unit}", flush=True)
                base = median(results["none"])
                for name in ("podnetmon", "tcpdump"):
                    ratio = median(results[name]) / base
                    print(f"RESULT throughput {test} {name} / none: {ratio:.3f} "
                          f"({median(results[name]):.2f} / {base:.2f} {unit}, medians of "
                          f"{args.rounds})")
        finally:
            iperf.kill()
            iperf.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
