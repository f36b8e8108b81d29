"""What a trace costs: per packet while a pod is traced, and the rate it keeps up with.

- Per packet: our TC program (every probe) on a lab veth, 64-byte UDP, the kernel's
  BPF statistics for ns/run, with the pod's trace switch off and on (snaplen 96
  and 1500) in the same run; a reader drains the perf buffer meanwhile.
- Keeping up: the real daemon traces a pod (no filter, snaplen 1500) while iperf3
  sends UDP at rising rates; the ISB comment of each pcapng says how many
  packets were lost (in the kernel's buffer or waiting for the writer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import UDP_SENDER, daemon, lab_pods, machine, median, run_in, spawn_in
from bench.tc_cost import _slots_for
from monitor.kernel import kernelinfo, syscalls
from monitor.kernel.attach import Attacher
from monitor.kernel.netlink import Netlink
from monitor.kernel.programs import Programs
from monitor.probes import select
from monitor.probes.trace import MAP, TraceConfig


def per_packet(rounds: int, datagrams: int) -> dict[str, list[float]]:
    stats_fd = syscalls.enable_run_stats()
    kernel = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                              btf_path="/sys/kernel/btf/vmlinux")
    programs = Programs(select([]), kernel, max_interfaces=64, bpf_stats=False)
    received = [0]
    programs.open_perf("pnm_trace_events", lambda raw: received.__setitem__(0, received[0] + 1),
                       lambda _n: None, 256)
    stop = threading.Event()
    reader = threading.Thread(target=lambda: [programs.poll_perf(50) for _ in iter(stop.is_set, True)])
    reader.start()
    out: dict[str, list[float]] = {"off": [], "on96": [], "on1500": []}
    with lab_pods(2) as (_lab, (a, b)):
        ifindex = int(Path(f"/sys/class/net/{a.host_veth}/ifindex").read_text())
        _slots_for(programs, ifindex, a.netns)
        attacher = Attacher(programs, Netlink(), mode="tc", tc_priority=100, tc_handle=0x504E)
        att = attacher.attach(ifindex, a.host_veth, a.netns)
        slot_key = struct.pack("=I", 0)
        try:
            for _ in range(rounds):
                for name, snaplen in (("off", 0), ("on96", 96), ("on1500", 1500)):
                    cfg = TraceConfig(on=1 if snaplen else 0, snaplen=snaplen)
                    programs.maps.handle(MAP).put(slot_key, bytes(cfg))
                    before = syscalls.prog_info(programs.ingress_fd)
                    run_in(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(datagrams), "22")
                    now = syscalls.prog_info(programs.ingress_fd)
                    runs = now.run_cnt - before.run_cnt
                    out[name].append((now.run_time_ns - before.run_time_ns) / max(runs, 1))
        finally:
            programs.maps.handle(MAP).put(slot_key, bytes(TraceConfig()))
            attacher.detach(att)
    stop.set()
    reader.join()
    programs.close()
    os.close(stats_fd)
    return out


def keeping_up(rates: list[int], token_file: Path) -> list[tuple[int, int, int]]:
    results = []
    with lab_pods(2) as (lab, (a, b)), daemon(lab.inventory, "--auth-token-file",
                                             str(token_file)) as address:
        server = spawn_in(b, "iperf3", "-s")
        time.sleep(0.5)
        token = token_file.read_text()
        try:
            for rate in rates:
                url = f"http://{address}/api/v1/namespaces/lab/pods/{a.name}/capture?duration=4s"
                req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
                body: list[bytes] = []

                def read(r: urllib.request.Request = req, into: list[bytes] = body) -> None:
                    with urllib.request.urlopen(r, timeout=60) as resp:
                        into.append(resp.read())

                t = threading.Thread(target=read)
                t.start()
                time.sleep(0.5)
                out = run_in(a, "iperf3", "-u", "-c", b.ip, "-b", f"{rate}M", "-l", "1400", "-t", "2", "-J")
                sent = int(json.loads(out)["end"]["sum"]["packets"])
                t.join()
                text = body[0].decode("latin-1") if body else ""
                lost = re.search(r"lost (\d+) in the kernel's buffer, (\d+) waiting", text)
                total_lost = int(lost.group(1)) + int(lost.group(2)) if lost else -1
                results.append((rate, sent, total_lost))
                print(f"trace at {rate} Mbit/s UDP (1400-byte datagrams, {sent} sent): "
                      f"{total_lost} lost", flush=True)
        finally:
            server.kill()
            server.wait()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--datagrams", type=int, default=100_000)
    parser.add_argument("--rates", default="50,100,200,400,800")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    costs = per_packet(args.rounds, args.datagrams)
    for name, values in costs.items():
        print(f"RESULT trace per packet {name}: median {median(values):.1f} ns/run "
              f"({', '.join(f'{v:.0f}' for v in values)})")
    token = Path("/tmp/podnetmon-bench-token")
    token.write_text("bench-token")
    token.chmod(0o600)
    try:
        for rate, sent, lost in keeping_up([int(r) for r in args.rates.split(",")], token):
            print(f"RESULT trace keeps up: {rate} Mbit/s, {sent} packets sent, {lost} lost")
    finally:
        token.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
