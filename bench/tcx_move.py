"""What moving a device from classic tc to tcx costs the daemon (attach_mode auto does it
once a device has stayed --tcx-move-after): wall time and CPU per device, through the
daemon's own Attacher on `--pods` lab pods, and the rtnetlink events the moves make
(each link event would cost the daemon a full rescan; tc events do not).

A move is: the switch on (one map write), our classic filters pointed at our program
(two netlink replaces), an RCU grace period (membarrier), two tcx links (each an RCU
grace period under the rtnl lock), our filters removed (two netlink deletes), another
grace period, the switch off. So it is four grace periods of wall time, and little CPU.

    .venv/bin/python bench/tcx_move.py --pods 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import lab_pods, machine, median
from monitor.kernel import kernelinfo
from monitor.kernel.attach import Attacher
from monitor.kernel.linkevents import LinkEvents
from monitor.kernel.netlink import Netlink
from monitor.kernel.programs import Programs
from monitor.probes import select


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=50)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    kernel = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                              btf_path="/sys/kernel/btf/vmlinux")
    programs = Programs(select([]), kernel, max_interfaces=args.pods + 8, bpf_stats=False)
    try:
        with lab_pods(args.pods) as (_lab, pods):
            attacher = Attacher(programs, Netlink(), mode="auto", tc_priority=100,
                                tc_handle=0x504E)
            atts = [attacher.attach(int(Path(f"/sys/class/net/{p.host_veth}/ifindex")
                                        .read_text()), p.host_veth, p.netns) for p in pods]
            assert {a.mode for a in atts} == {"tc"}
            time.sleep(1)  # the lab's own link events (new veths settling) go first
            events = LinkEvents()
            walls, cpus = [], []
            moved = []
            for att in atts:
                cpu, wall = time.process_time(), time.monotonic()
                moved.append(attacher.attach(att.ifindex, att.ifname, att.netns, mode="tcx"))
                walls.append(time.monotonic() - wall)
                cpus.append(time.process_time() - cpu)
            time.sleep(0.2)
            link_events = events.drain()
            tc_devices = len(events.tc_changed)
            events.close()
            for att in moved:
                attacher.detach(att)
    finally:
        programs.close()
    print(f"RESULT tcx_move {args.pods} devices: wall per device median "
          f"{median(walls) * 1000:.1f} ms (max {max(walls) * 1000:.1f}), CPU per device median "
          f"{median(cpus) * 1000:.2f} ms (max {max(cpus) * 1000:.2f}); link events {link_events}, "
          f"tc events on {tc_devices} devices", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
