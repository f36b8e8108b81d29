"""Per-packet cost of podnetmon's TC programs over an empty TC program, in one run.

Both programs sit on the same host veth and see the same packets; the kernel's
BPF statistics (run time and run count per program) give each one's ns per
run, and the difference is what our probes add. The empty program is placed
before ours in half the rounds and after it in the other half, so that neither
pays alone for bringing the packet into the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bcc import BPF  # type: ignore[import-untyped]
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from bench.common import UDP_SENDER, lab_pods, machine, median, run_in, spawn_in
from monitor import (
    bpf,
    bpfsys,
)
from monitor.bpf import TC_PARENT_INGRESS, Attacher, Netlink, Programs
from monitor.probes import select
from monitor.slots import SlotTable

EMPTY = "#include <uapi/linux/pkt_cls.h>\nint empty_prog(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }\n"


def _ns_per_run(fd: int, before: bpfsys.ProgInfo) -> tuple[float, int]:
    now = bpfsys.prog_info(fd)
    runs = now.run_cnt - before.run_cnt
    return (now.run_time_ns - before.run_time_ns) / max(runs, 1), runs


def measure(probes: list[str], rounds: int, datagrams: int) -> dict[str, list[float]]:
    stats_fd = bpfsys.enable_run_stats()
    programs = Programs(select(probes), max_interfaces=64, bpf_stats=False)
    empty = BPF(text=EMPTY)
    empty_fn = empty.load_func(b"empty_prog", BPF.SCHED_CLS)
    results: dict[str, list[float]] = {"udp64": [], "tcp": []}
    with lab_pods(2) as (_lab, (a, b)):
        ifindex = int(Path(f"/sys/class/net/{a.host_veth}/ifindex").read_text())
        slots = SlotTable(ifslots=programs.maps.handle(bpf.IFSLOTS_MAP),
                          spill=programs.maps.handle(bpf.IFSLOT_SPILL_MAP),
                          per_slot=[programs.maps.handle(n) for p in programs.probes
                                    for n, layout in p.maps.items() if layout.per_slot],
                          capacity=64, buckets=bpf.IFSLOT_BUCKETS)
        slots.assign(ifindex)  # as the daemon does before it attaches
        ipr = IPRoute()
        sink = spawn_in(b, "iperf3", "-s")
        try:
            for r in range(rounds):
                empty_prio, our_prio = (100, 200) if r % 2 == 0 else (300, 200)
                attacher = Attacher(programs, Netlink(), mode="tc", tc_priority=our_prio,
                                    tc_handle=0x504E)
                att = attacher.attach(ifindex, a.host_veth, a.netns)
                ipr.tc("add-filter", "bpf", ifindex, 1, fd=empty_fn.fd, name="empty",
                       parent=TC_PARENT_INGRESS, classid=1, direct_action=True, prio=empty_prio)
                try:
                    for kind in ("udp64", "tcp"):
                        e0 = bpfsys.prog_info(empty_fn.fd)
                        o0 = bpfsys.prog_info(programs.ingress.fd)
                        if kind == "udp64":
                            run_in(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(datagrams),
                                   "22")  # 22 + 8 + 20 + 14 = 64 bytes on the wire
                        else:
                            run_in(a, "iperf3", "-c", b.ip, "-t", "2")
                        e_ns, e_runs = _ns_per_run(empty_fn.fd, e0)
                        o_ns, o_runs = _ns_per_run(programs.ingress.fd, o0)
                        assert e_runs == o_runs, (e_runs, o_runs)
                        results[kind].append(o_ns - e_ns)
                        print(f"round {r} {kind:5}: empty {e_ns:6.1f} ns/run, podnetmon "
                              f"{o_ns:6.1f} ns/run over {o_runs} runs: +{o_ns - e_ns:.1f} ns",
                              flush=True)
                finally:
                    ipr.tc("del-filter", "bpf", ifindex, 1, parent=TC_PARENT_INGRESS,
                           prio=empty_prio)
                    attacher.detach(att)
        finally:
            sink.kill()
            sink.wait()
            ipr.close()
    programs.close()
    empty.cleanup()
    os.close(stats_fd)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--datagrams", type=int, default=200_000)
    parser.add_argument("--probes", default="", help="comma-separated; empty: every probe")
    args = parser.parse_args()
    probes = [p for p in args.probes.split(",") if p]
    print(f"machine: {machine()}")
    print(f"probes: {probes or 'all'}")
    results = measure(probes, args.rounds, args.datagrams)
    for kind, deltas in results.items():
        print(f"RESULT tc_cost {kind}: median +{median(deltas):.1f} ns/packet over an empty "
              f"program ({len(deltas)} rounds, range {min(deltas):+.1f}..{max(deltas):+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
