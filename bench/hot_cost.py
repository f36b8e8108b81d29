"""The instructions' own cost: ns per run of our TC programs with the cache warm.

`bench/tc_cost.py` and `bench/cpu_share.py` measure programs on real traffic, where
most of a run is spent waiting for cache lines the network stack pushed out between two
packets. This one takes the cache out: the kernel runs each program on one frame
`--repeat` times in a row (BPF_PROG_TEST_RUN, with no run statistics), and times the
loop. What is left over an empty program is what the program's instructions cost: the
parse and the probes' logic, which is what a change to the C alone can cut. Each variant
runs on the same frames (IPv4 and IPv6, a 64-byte UDP datagram and a TCP segment with
ACK only: the common packet), round after round in turn, medians reported.

The programs get a lab pod's host veth and its slot as the daemon gives them, so every
probe takes the path it takes on that pod's packets. `--against REV` runs the same
variants as another git revision builds them (bench/tc_cost.py's `against`).

    .venv/bin/python bench/hot_cost.py --per-probe
"""

from __future__ import annotations

import argparse
import ctypes
import os
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import lab_pods, machine, median
from bench.tc_cost import PER_PROBE, VARIANTS, _slots_for, against
from monitor.kernel import kernelinfo, syscalls
from monitor.kernel.programs import Programs
from monitor.probes import select

BPF_PROG_TEST_RUN = 10
SKB_IFINDEX = 40  # offsetof(struct __sk_buff, ifindex): the device the kernel runs it as


def frame(kind: str) -> bytes:
    """An Ethernet frame: `udp4`, `tcp4`, `udp6` or `tcp6` between two pod addresses."""
    v6 = kind.endswith("6")
    if kind.startswith("tcp"):  # an ACK with 200 bytes of data: no flag a probe acts on
        l4 = struct.pack("!HHIIBBHHH", 5201, 40000, 1, 1, 5 << 4, 0x10, 500, 0, 0) + bytes(200)
        proto = 6
    else:  # 22 bytes of payload: 64 bytes on the wire over IPv4
        l4 = struct.pack("!HHHH", 40000, 9, 30, 0) + bytes(22)
        proto = 17
    if v6:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64,
                         bytes.fromhex("fd00000000000000000000000000000a"),
                         bytes.fromhex("fd00000000000000000000000000000b"))
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                         bytes([10, 0, 0, 10]), bytes([10, 0, 0, 11]))
    eth = bytes.fromhex("020000000002020000000001") + (b"\x86\xdd" if v6 else b"\x08\x00")
    return eth + ip + l4


def test_run(fd: int, data: bytes, ifindex: int, repeat: int) -> int:
    """ns per run of the program on `data`, as the kernel timed `repeat` runs of it."""
    packet = ctypes.create_string_buffer(data, len(data))
    ctx = bytearray(192)  # struct __sk_buff: every field zero but the device
    struct.pack_into("I", ctx, SKB_IFINDEX, ifindex)
    ctx_buf = ctypes.create_string_buffer(bytes(ctx), len(ctx))
    attr = syscalls.attr((0, "I", fd), (8, "I", len(data)), (16, "Q", ctypes.addressof(packet)),
                         (32, "I", repeat), (40, "I", len(ctx)),
                         (48, "Q", ctypes.addressof(ctx_buf)))
    syscalls.bpf(BPF_PROG_TEST_RUN, attr)
    return int(struct.unpack_from("I", attr, 36)[0])  # duration: the mean ns per run


def measure(rounds: int, repeat: int, variants: dict[str, list[str]],
            against_rev: str | None) -> dict[str, dict[str, list[int]]]:
    kernel = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                              btf_path="/sys/kernel/btf/vmlinux")
    programs = {name: Programs(select(probes), kernel, max_interfaces=64, bpf_stats=False)
                for name, probes in variants.items()}
    empty_fd = syscalls.load_unspec_program()
    kinds = ("udp4", "tcp4", "udp6", "tcp6")
    try:
        with lab_pods(1) as (_lab, (pod,)):
            ifindex = int(Path(f"/sys/class/net/{pod.host_veth}/ifindex").read_text())
            for prog in programs.values():
                _slots_for(prog, ifindex, pod.netns)
            others = against(against_rev, variants, ifindex, pod.netns) if against_rev else {}
            # both hooks of ours; the other revision's ingress program (its egress takes
            # the same path but for the direction)
            fds = {"empty": empty_fd, **{f"{n} ingress": p.ingress_fd for n, p in programs.items()},
                   **{f"{n} egress": p.egress_fd for n, p in programs.items()},
                   **{f"{n} ingress": fd for n, fd in others.items()}}
            runs: dict[str, dict[str, list[int]]] = {n: {k: [] for k in kinds} for n in fds}
            try:
                for kind in kinds:
                    data = frame(kind)
                    for _ in range(rounds):
                        for name, fd in fds.items():
                            runs[name][kind].append(test_run(fd, data, ifindex, repeat))
            finally:
                for fd in others.values():
                    os.close(fd)
    finally:
        for prog in programs.values():
            prog.close()
        os.close(empty_fd)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=100_000)
    parser.add_argument("--per-probe", action="store_true",
                        help="also the packet counters with each other TC probe alone")
    parser.add_argument("--against", metavar="REV",
                        help="also every variant as this git revision builds it")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    variants = {**VARIANTS, **(PER_PROBE if args.per_probe else {})}
    runs = measure(args.rounds, args.repeat, variants, args.against)
    empty = {kind: median(values) for kind, values in runs.pop("empty").items()}
    print(f"RESULT hot_cost empty program: {', '.join(f'{k} {v:.0f} ns' for k, v in empty.items())}"
          " a run (the test loop's own work)")
    for name, kinds in runs.items():
        over = ", ".join(f"{kind} {median(v) - empty[kind]:+.0f}" for kind, v in kinds.items())
        print(f"RESULT hot_cost {name}: ns per run over the empty program: {over}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
