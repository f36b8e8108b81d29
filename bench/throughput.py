"""iperf3 through a lab veth: with podnetmon, with an empty TC program, with tcpdump, with
neither.

TCP throughput with 1 and 4 streams, and the rate of 64-byte UDP datagrams an
unthrottled sender gets through. All four configurations run in one process
tree and in rotating order, round after round, so drift in the machine's speed
hits each alike; the medians' ratios are printed. The daemon is started once
per round (and ready before the traffic starts), like tcpdump.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from pyroute2 import IPRoute  # type: ignore[import-untyped]

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
from monitor import bpfsys
from monitor.bpf import TC_PARENT_EGRESS, TC_PARENT_INGRESS

EMPTY_PRIO = 4096  # where the daemon's filters go


@contextmanager
def empty_programs(devs: list[str]) -> Iterator[None]:
    """The floor: a two-instruction program returning TC_ACT_UNSPEC on both TC hooks of
    each device, where podnetmon's go, so its ratio is what any TC program costs here."""
    fd = bpfsys.load_unspec_program()
    ipr = IPRoute()
    added: list[tuple[int, int]] = []
    try:
        for dev in devs:
            ifindex = int(Path(f"/sys/class/net/{dev}/ifindex").read_text())
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception:  # noqa: BLE001 - it has one already (a daemon left it: never removed)
                pass
            for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
                ipr.tc("add-filter", "bpf", ifindex, 1, fd=fd, name="bench-empty", parent=parent,
                       classid=1, direct_action=True, prio=EMPTY_PRIO)
                added.append((ifindex, parent))
        yield
    finally:
        for ifindex, parent in added:
            ipr.tc("del-filter", "bpf", ifindex, 1, parent=parent, prio=EMPTY_PRIO)
        ipr.close()
        os.close(fd)


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
            "empty": lambda: empty_programs([client.host_veth, server.host_veth]),
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
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        with configs[name]():
                            if test.startswith("udp"):
                                value = iperf3_udp_pps(client, server, args.seconds,
                                                       int(test[3:])) / 1000
                            else:
                                value = iperf3_gbits(client, server, args.seconds, int(test[3:]))
                        results[name].append(value)
                        print(f"{test} round {r} {name:9}: {value:8.2f} {unit}", flush=True)
                base = median(results["none"])
                for name in ("empty", "podnetmon", "tcpdump"):
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
