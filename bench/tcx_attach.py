"""What a tcx attach costs, and whether anything short of the kernel can make it cheaper.

A tcx link (kernel 6.6+) is cheaper per packet than a classic cls_bpf filter, but each
attach and detach swaps the device's program array and waits out an RCU grace period
(`tcx_entry_sync()`: `synchronize_rcu()`) under the rtnl lock: ~15 ms a link here, so
500 pods (1,000 links) take ~15 s where classic tc takes under 2 s. This measures, on
`--devices` veths made for the purpose (and removed), each way to attach a program by
tcx to both hooks:

- serial: one link after another, as the daemon does;
- threads: the same links from `--threads` threads at once (do the grace periods
  overlap, or does the rtnl lock serialize them?);
- expedited: serial with /sys/kernel/rcu_expedited set to 1 for the duration (restored
  after): expedited grace periods end in microseconds, but by interrupting every CPU,
  for every user of RCU on the node, which no monitor should impose by default;
- classic: a cls_bpf filter on clsact, the same program, for comparison.

    .venv/bin/python bench/tcx_attach.py --devices 100 --threads 8
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from monitor.kernel import rtnl, syscalls
from monitor.kernel.rtnltc import TC_PARENT_EGRESS, TC_PARENT_INGRESS
from monitor.kernel.rtnlwire import RtnlError

EXPEDITED = Path("/sys/kernel/rcu_expedited")
HOOKS = (syscalls.BPF_TCX_INGRESS, syscalls.BPF_TCX_EGRESS)
PREFIX = "pnmtcx"


def make_veths(count: int) -> list[int]:
    script = "\n".join(f"link add {PREFIX}{i} type veth peer name {PREFIX}p{i}" for i in range(count))
    subprocess.run(["ip", "-batch", "-"], input=script, text=True, check=True)
    return [int(Path(f"/sys/class/net/{PREFIX}{i}/ifindex").read_text()) for i in range(count)]


def remove_veths(count: int) -> None:
    script = "\n".join(f"link del {PREFIX}{i}" for i in range(count))
    subprocess.run(["ip", "-force", "-batch", "-"], input=script, text=True, check=False,
                   stderr=subprocess.DEVNULL)


def tcx_attach(prog: int, devices: list[int], links: list[int]) -> None:
    for ifindex in devices:
        for hook in HOOKS:
            links.append(syscalls.tcx_link_create(prog, ifindex, hook, first=True))


def timed(what: Callable[[], None]) -> float:
    started = time.monotonic()
    what()
    return time.monotonic() - started


def detach_all(links: list[int]) -> float:
    def run() -> None:
        for link in links:
            syscalls.link_detach(link)
            os.close(link)
    seconds = timed(run)
    links.clear()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    devices = make_veths(args.devices)
    prog = syscalls.load_unspec_program()
    links: list[int] = []
    expedited_before = EXPEDITED.read_text().strip()
    count = 2 * args.devices
    try:
        serial = timed(lambda: tcx_attach(prog, devices, links))
        serial_detach = detach_all(links)

        def threaded() -> None:
            parts = [devices[k::args.threads] for k in range(args.threads)]
            threads = [threading.Thread(target=tcx_attach, args=(prog, part, links))
                       for part in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        threads = timed(threaded)
        detach_all(links)

        EXPEDITED.write_text("1")
        try:
            expedited = timed(lambda: tcx_attach(prog, devices, links))
            expedited_detach = detach_all(links)
        finally:
            EXPEDITED.write_text(expedited_before)

        with rtnl.Rtnl() as tc:
            def classic() -> None:
                for ifindex in devices:
                    try:
                        tc.add_clsact(ifindex)
                    except RtnlError as exc:
                        if exc.errno != errno.EEXIST:
                            raise
                    for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
                        tc.add_bpf_filter(ifindex, parent=parent, prio=1, handle=1, fd=prog,
                                          name="bench-tcx", direct_action=True)
            classic_s = timed(classic)
    finally:
        EXPEDITED.write_text(expedited_before)
        detach_all(links)
        os.close(prog)
        remove_veths(args.devices)
    for name, seconds in (("tcx serial", serial), ("tcx serial detach", serial_detach),
                          (f"tcx {args.threads} threads", threads),
                          ("tcx rcu_expedited", expedited),
                          ("tcx rcu_expedited detach", expedited_detach),
                          ("classic tc", classic_s)):
        print(f"RESULT tcx_attach {name}: {count} links in {seconds * 1000:.0f} ms, "
              f"{seconds / count * 1000:.2f} ms each; 500 pods (1,000 links) at that "
              f"rate: {seconds / count * 1000:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
