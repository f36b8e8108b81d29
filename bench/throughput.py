"""iperf3 between lab pods: with podnetmon, with an empty TC program (tcx and classic
tc), with tcpdump, and with nothing.

Two pairs of lab pods hang on the lab bridge. Pair A is where each configuration is
put: the daemon watches A's pods (pause processes) and, told to read no netns
directory, leaves pair B (pinned namespaces only) alone; the empty programs and
tcpdump go on A's host veths. Pair B always carries bare traffic. Each iperf3
client runs on CPU 0 and each server on CPU 1.

Two measurements per configuration:

- side by side: A and B run the same iperf3 test at the same time, so the two
  senders share CPU 0. A's result over B's, divided by the same ratio with nothing
  on either pair (measured before and after, ~1.0), is what the configuration costs.
  The VM's speed drifts by +-10 % within seconds (bench/RESULTS.md); side by side,
  the drift hits both pairs at once and cancels, so 5 rounds resolve 1 %. What a
  configuration does to the whole machine rather than to A's veths (the daemon's
  tracepoint programs and its own CPU, tcpdump's process) reaches both pairs and
  is not in this ratio: tracepoint_cost.py and scale.py measure those.
- in turn: A alone, then B alone (then B, then A: the order alternates), round
  after round; the same ratio of ratios. This is the plain "with against without"
  figure, and the drift is in it.

The daemon is started once per test and has settled before its rounds. With the
defaults, each test takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import daemon, machine, median, run_in, spawn_in, tcpdump
from monitor.kernel import rtnl, rtnlwire, syscalls
from monitor.kernel.rtnltc import TC_PARENT_EGRESS, TC_PARENT_INGRESS
from podnetlab.lab import Lab, LabPod

EMPTY_PRIO = 4096  # where the daemon's classic filters go
SENDER_CPU, RECEIVER_CPU = 0, 1
SETTLE = 2.0  # seconds between the daemon's readiness and its first round


def _ifindex(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/ifindex").read_text())


@contextmanager
def empty_tc(devs: list[str]) -> Iterator[None]:
    """The floor of classic tc: a two-instruction program returning TC_ACT_UNSPEC as a
    cls_bpf filter on both hooks of each device, where podnetmon's classic filters go."""
    fd = syscalls.load_unspec_program()
    tc = rtnl.Rtnl()
    added: list[tuple[int, int]] = []
    try:
        for dev in devs:
            ifindex = _ifindex(dev)
            try:
                tc.add_clsact(ifindex)
            except rtnlwire.RtnlError as exc:  # it has one already (never removed: polite)
                if exc.errno != errno.EEXIST:
                    raise
            for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
                tc.add_bpf_filter(ifindex, parent=parent, prio=EMPTY_PRIO, handle=1, fd=fd,
                                  name="bench-empty", direct_action=True, classid=1)
                added.append((ifindex, parent))
        yield
    finally:
        for ifindex, parent in added:
            tc.delete_filter(ifindex, parent=parent, prio=EMPTY_PRIO, handle=1)
        tc.close()
        os.close(fd)


@contextmanager
def empty_tcx(devs: list[str]) -> Iterator[None]:
    """The floor of tcx: the same empty program by a tcx link on both hooks of each device."""
    fd = syscalls.load_unspec_program()
    links: list[int] = []
    try:
        for dev in devs:
            for hook in (syscalls.BPF_TCX_INGRESS, syscalls.BPF_TCX_EGRESS):
                links.append(syscalls.tcx_link_create(fd, _ifindex(dev), hook, first=True))
        yield
    finally:
        for link in links:
            syscalls.link_detach(link)
            os.close(link)
        os.close(fd)


@contextmanager
def watching(lab: Lab, pair: tuple[LabPod, LabPod], other: tuple[LabPod, LabPod],
             *args: str) -> Iterator[None]:
    """The daemon (every probe) on `pair`'s pods and not `other`'s, checked through its
    own pod listing."""
    with daemon(lab.inventory, "--netns-dirs", "", *args) as address:
        with urllib.request.urlopen(f"http://{address}/api/v1/pods", timeout=10) as resp:
            pods = json.loads(resp.read())["pods"]
        attached = {str(p["interface"]) for p in pods if p.get("attach_mode")}
        modes = sorted({str(p["attach_mode"]) for p in pods if p.get("attach_mode")})
        want = {pod.host_veth for pod in pair}
        if not want <= attached or attached & {pod.host_veth for pod in other}:
            raise RuntimeError(f"the daemon attached to {sorted(attached)}, wanted {sorted(want)}")
        print(f"  podnetmon attached by {', '.join(modes)} to {', '.join(sorted(want))}",
              flush=True)
        time.sleep(SETTLE)
        yield


def _iperf3_cmd(client: LabPod, server: LabPod, test: str, seconds: float) -> list[str]:
    cmd = [*client.exec_prefix(), "iperf3", "-c", server.ip, "-t", str(seconds), "-J",
           "-A", f"{SENDER_CPU},{RECEIVER_CPU}"]
    if test.startswith("udp"):
        return [*cmd, "-u", "-l", test[3:], "-b", "0"]
    return [*cmd, "-P", test[3:]]


def _value(doc: dict[str, object], test: str) -> float:
    """Gbit/s received (TCP), or thousands of datagrams received per second (UDP)."""
    end = doc["end"]
    assert isinstance(end, dict)
    if test.startswith("udp"):
        total = end["sum"]
        return float(total["packets"] - total["lost_packets"]) / float(total["seconds"]) / 1000
    return float(end["sum_received"]["bits_per_second"]) / 1e9


def iperf3(runs: list[tuple[LabPod, LabPod]], test: str, seconds: float) -> list[float]:
    """Run the test between each (client, server) at the same time; each one's result."""
    for _attempt in range(20):  # a server may still be finishing the last test
        procs = [subprocess.Popen(_iperf3_cmd(c, s, test, seconds), stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for c, s in runs]
        docs = [json.loads(p.communicate(timeout=seconds + 60)[0] or "{}") for p in procs]
        if all("error" not in d and "end" in d for d in docs):
            return [_value(d, test) for d in docs]
        time.sleep(0.5)
    raise RuntimeError(f"iperf3 failed: {[d.get('error') for d in docs]}")


def measure(a: tuple[LabPod, LabPod], b: tuple[LabPod, LabPod], test: str, seconds: float,
            rounds: int) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """(A/B side by side, A/B in turn, (A, B) values in turn) for each round."""
    together, in_turn, values = [], [], []
    for r in range(rounds):
        va, vb = iperf3([a, b], test, seconds)
        together.append(va / vb)
        first, second = (a, b) if r % 2 == 0 else (b, a)
        v1 = iperf3([first], test, seconds)[0]
        v2 = iperf3([second], test, seconds)[0]
        sa, sb = (v1, v2) if r % 2 == 0 else (v2, v1)
        in_turn.append(sa / sb)
        values.append((sa, sb))
    return together, in_turn, values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--tests", default="udp64,tcp1,tcp4",
                        help="tcpN: TCP with N streams; udpN: N-byte UDP datagrams, unthrottled")
    parser.add_argument("--configs", default="empty-tc,podnetmon,empty-tcx,podnetmon-tcx,tcpdump")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two CPUs: senders on one, receivers on the other")
    print(f"machine: {machine()}")
    lab = Lab()
    lab.down()
    try:
        pods = lab.up(4, pinned=2)  # 0, 1: pause processes (watched); 2, 3: pinned only
        a, b = (pods[1], pods[0]), (pods[3], pods[2])  # (client, server)
        for client, server in (a, b):
            run_in(client, "ping", "-c", "1", "-W", "1", server.ip)
        configs: dict[str, Callable[[], AbstractContextManager[object]]] = {
            "empty-tcx": lambda: empty_tcx([pods[0].host_veth, pods[1].host_veth]),
            "empty-tc": lambda: empty_tc([pods[0].host_veth, pods[1].host_veth]),
            # the default (auto: classic tc on these veths), and tcx links
            "podnetmon": lambda: watching(lab, (pods[0], pods[1]), (pods[2], pods[3])),
            "podnetmon-tcx": lambda: watching(lab, (pods[0], pods[1]), (pods[2], pods[3]),
                                              "--attach-mode", "tcx"),
            "tcpdump": lambda: tcpdump(pods[1].host_veth),
        }
        chosen = args.configs.split(",")
        servers = [spawn_in(server, "iperf3", "-s") for server in (pods[0], pods[2])]
        time.sleep(0.5)
        try:
            for test in args.tests.split(","):
                unit = "kpkt/s" if test.startswith("udp") else "Gbit/s"
                base_together: list[float] = []
                base_in_turn: list[float] = []
                results = {}
                for name in ["none", *chosen, "none"]:
                    with (nullcontext() if name == "none" else configs[name]()):
                        together, in_turn, values = measure(a, b, test, args.seconds, args.rounds)
                    if name == "none":
                        base_together += together
                        base_in_turn += in_turn
                    else:
                        results[name] = (together, in_turn)
                    print(f"{test} {name:9}: A/B side by side "
                          f"{' '.join(f'{x:.3f}' for x in together)}; in turn "
                          f"{' '.join(f'{x:.3f}' for x in in_turn)}; A alone "
                          f"{' '.join(f'{va:.1f}' for va, _ in values)} {unit}, B alone "
                          f"{' '.join(f'{vb:.1f}' for _, vb in values)}", flush=True)
                for name, (together, in_turn) in results.items():
                    print(f"RESULT throughput {test} {name} / none: side by side "
                          f"{median(together) / median(base_together):.3f}, in turn "
                          f"{median(in_turn) / median(base_in_turn):.3f} (medians of "
                          f"{args.rounds} rounds of {args.seconds:g} s; none's A/B "
                          f"{median(base_together):.3f} side by side, "
                          f"{median(base_in_turn):.3f} in turn)", flush=True)
        finally:
            for server in servers:
                server.kill()
                server.wait()
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
