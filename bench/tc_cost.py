"""Per-packet cost of podnetmon's TC programs over an empty TC program, in one run.

Our program compiled twice (the packet counters alone, and every probe) and an
empty program sit on the same host veth and see the same packets; the kernel's
BPF statistics (run time and run count per program) give each one's ns per
run, and the difference from the empty one is what our probes add. The order
of the three rotates round by round, so that none pays alone for bringing the
packet into the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import UDP_SENDER, lab_pods, machine, median, run_in, spawn_in, stable
from monitor.identity import IdentityIndex
from monitor.kernel import kernelinfo, rtnl, source, syscalls, tracepoints
from monitor.kernel.programs import Programs
from monitor.kernel.rtnltc import TC_PARENT_INGRESS
from monitor.peers.identity import PeerResolver
from monitor.probes import select
from monitor.probes.peeraccounts import PeerAccounts, PeerOptions
from monitor.slots import SlotTable, per_slot_maps


def _infos(fds: dict[str, int]) -> dict[str, syscalls.ProgInfo]:
    """Every program's statistics at one moment: no packet ran between the first read
    and the last (bench.common.stable), so each saw the same packets up to it."""
    return stable(lambda: {n: syscalls.prog_info(fd) for n, fd in fds.items()})


def _ns_per_run(now: syscalls.ProgInfo, before: syscalls.ProgInfo) -> tuple[float, int]:
    runs = now.run_cnt - before.run_cnt
    return (now.run_time_ns - before.run_time_ns) / max(runs, 1), runs


# name -> probes ([] = every probe); "peers" is the packets probe plus the peer aggregation
VARIANTS = {"packets": ["packets"], "peers": ["packets", "peers"], "all": []}
# --per-probe: the packet counters and each other probe with a TC hook, one at a time
PER_PROBE = {f"+{name}": ["packets", name]
             for name in ("tcpflags", "handshake", "dns", "dnsnames", "trace")}


def _slots_for(programs: Programs, ifindex: int, kernel_netns: int) -> None:
    slots = SlotTable(ifslots=programs.maps.handle(source.IFSLOTS_MAP),
                      spill=programs.maps.handle(source.IFSLOT_SPILL_MAP),
                      netns=programs.maps.handle(source.NETNS_MAP),
                      owners=programs.maps.handle(source.SLOT_OWNER_MAP),
                      per_slot=per_slot_maps(programs.probes, programs.maps.handle, 64),
                      capacity=64, buckets=source.IFSLOT_BUCKETS)
    slots.assign(ifindex, kernel_netns)  # as the daemon does before it attaches
    slots.sync_netns({kernel_netns: ifindex})
    if any(p.name == "peers" for p in programs.probes):
        # the epoch maps into the outer map, as the daemon's start does: else every
        # packet would take the cheaper path of a packet with no map to count in
        PeerAccounts(programs.maps, PeerResolver(), PeerOptions(), slots=slots.assigned,
                     snapshot=IdentityIndex).start(adopted=False)


# Run in a worktree of another revision, by its own code: load each variant, give it the
# device's slot as the daemon would, pin its ingress program where the parent opens it.
AGAINST_CHILD = """
import os, sys
sys.path.insert(0, os.getcwd())
from bench.tc_cost import _slots_for
from monitor.kernel import kernelinfo, tracepoints
from monitor.kernel.programs import Programs
from monitor.probes import select
ifindex, netns, pin_dir, *variants = sys.argv[1:]
kernel = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                          btf_path="/sys/kernel/btf/vmlinux")
for variant in variants:
    name, _, probes = variant.partition("=")
    program = Programs(select([p for p in probes.split(",") if p]), kernel, max_interfaces=64,
                       bpf_stats=False)
    _slots_for(program, int(ifindex), int(netns))
    tracepoints.pin(program.ingress_fd, os.path.join(pin_dir, name))
os._exit(0)  # no clean-up: the pinned programs keep their maps, slots set
"""


def against(rev: str, variants: dict[str, list[str]], ifindex: int, netns: int) -> dict[str, int]:
    """`rev`'s programs for each variant, loaded from a worktree of it: name -> program fd."""
    from bench.versions import worktree

    tree = worktree(rev)
    try:
        # the pins go with the directory: the programs stay loaded by the fds opened here
        with tempfile.TemporaryDirectory(prefix="pnm-bench-", dir="/sys/fs/bpf") as pins:
            child = subprocess.run(
                [sys.executable, "-c", AGAINST_CHILD, str(ifindex), str(netns), pins,
                 *(f"{n}={','.join(p)}" for n, p in variants.items())],
                cwd=tree, capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"{rev}'s programs did not load:\n{child.stderr[-3000:]}")
            return {f"{rev}:{n}": tracepoints.get_pinned(f"{pins}/{n}") for n in variants}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                       cwd=Path(__file__).resolve().parent.parent, check=False)


def measure(rounds: int, datagrams: int, variants: dict[str, list[str]],
            against_rev: str | None = None) -> dict[str, dict[str, list[float]]]:
    stats_fd = syscalls.enable_run_stats()
    kernel = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                              btf_path="/sys/kernel/btf/vmlinux")
    programs = {name: Programs(select(probes), kernel, max_interfaces=64, bpf_stats=False)
                for name, probes in variants.items()}
    empty_fd = syscalls.load_unspec_program()  # "return TC_ACT_UNSPEC", two instructions
    with lab_pods(2) as (_lab, (a, b)):
        ifindex = int(Path(f"/sys/class/net/{a.host_veth}/ifindex").read_text())
        for prog in programs.values():
            _slots_for(prog, ifindex, a.netns)
        others = against(against_rev, variants, ifindex, a.netns) if against_rev else {}
        results: dict[str, dict[str, list[float]]] = {
            name: {"udp64": [], "udp64x16": [], "tcp": []} for name in [*programs, *others]}
        # sixteen peers, all b: addresses of its own, each with a's neighbour entry for it,
        # so that a's datagrams to them take turns (the peers probe's worst case)
        mac = json.loads(run_in(b, "ip", "-j", "link", "show", "eth0"))[0]["address"]
        many = [f"10.213.200.{i}" for i in range(1, 17)]
        for ip in many:
            run_in(b, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
            run_in(a, "ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0", "nud",
                   "permanent")
            run_in(a, "ip", "route", "add", f"{ip}/32", "dev", "eth0")
        tc = rtnl.Rtnl()
        tc.add_clsact(ifindex)  # a fresh lab veth has none; lab down removes it
        sink = spawn_in(b, "iperf3", "-s")
        fds = {"empty": empty_fd, **{n: p.ingress_fd for n, p in programs.items()}, **others}
        order = list(fds)
        try:
            for r in range(rounds):
                # rotate who runs first: the first program pays the packet's cache misses
                turn = order[r % len(order):] + order[:r % len(order)]
                for prio, name in enumerate(turn, start=100):
                    tc.add_bpf_filter(ifindex, parent=TC_PARENT_INGRESS, prio=prio, handle=1,
                                      fd=fds[name], name=f"bench-{name}", direct_action=True,
                                      classid=1)
                try:
                    for kind in ("udp64", "udp64x16", "tcp"):
                        start = _infos(fds)
                        if kind.startswith("udp64"):
                            to = ",".join(many) if kind == "udp64x16" else b.ip
                            run_in(a, sys.executable, "-c", UDP_SENDER, to, "9", str(datagrams),
                                   "22")  # 22 + 8 + 20 + 14 = 64 bytes on the wire
                        else:
                            run_in(a, "iperf3", "-c", b.ip, "-t", "2")
                        end = _infos(fds)
                        cost = {n: _ns_per_run(end[n], start[n]) for n in fds}
                        runs = {c[1] for c in cost.values()}
                        # every program saw every packet: read at two quiet moments, the
                        # run counts are equal, or a program skipped packets (a bug)
                        assert len(runs) == 1, cost
                        line = ", ".join(f"{n} {c[0]:6.1f}" for n, c in cost.items())
                        print(f"round {r} {kind:5} ns/run over {runs.pop()} runs: {line}",
                              flush=True)
                        for name in results:
                            results[name][kind].append(cost[name][0] - cost["empty"][0])
                finally:
                    for prio, _name in enumerate(turn, start=100):
                        tc.delete_filter(ifindex, parent=TC_PARENT_INGRESS, prio=prio, handle=1)
        finally:
            sink.kill()
            sink.wait()
            tc.close()
            for fd in others.values():
                os.close(fd)
    for prog in programs.values():
        prog.close()
    os.close(empty_fd)
    os.close(stats_fd)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--datagrams", type=int, default=200_000)
    parser.add_argument("--per-probe", action="store_true",
                        help="also the packet counters with each other TC probe alone")
    parser.add_argument("--against", metavar="REV",
                        help="also every variant as this git revision builds it, in the stack")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    results = measure(args.rounds, args.datagrams,
                      {**VARIANTS, **(PER_PROBE if args.per_probe else {})}, args.against)
    for name, kinds in results.items():
        for kind, deltas in kinds.items():
            print(f"RESULT tc_cost {name} {kind}: median +{median(deltas):.1f} ns/packet over an "
                  f"empty program ({len(deltas)} rounds, range {min(deltas):+.1f}.."
                  f"{max(deltas):+.1f})")
    if args.against:
        # each round's difference on the same packets: the machine's drift between rounds,
        # which the ranges above carry, cancels
        for name, kinds in results.items():
            if ":" in name:
                continue
            for kind, deltas in kinds.items():
                paired = [new - old for new, old in
                          zip(deltas, results[f"{args.against}:{name}"][kind], strict=True)]
                print(f"RESULT tc_cost {name} {kind} against {args.against}: median "
                      f"{median(paired):+.1f} ns/packet, round by round (range "
                      f"{min(paired):+.1f}..{max(paired):+.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
