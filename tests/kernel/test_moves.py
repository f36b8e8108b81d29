"""A device moved between classic tc and tcx under traffic: every packet counted once.

attach_mode auto moves a device from classic tc to tcx once it has stayed a while, and
an upgrade to a daemon that attaches by tcx (or back to classic tc) finds our programs
on the other hook. For a moment both hooks carry ours, and a pass through a hook runs
tcx first, then the classic filter; the move's switch and skb mark (bpf/tc_main.c) make
the second count nothing. Without them every packet between the tcx attach and the
filter's removal (an RCU grace period and a netlink round trip) counts twice.

The oracle is each host veth's own statistics, read at rest before and after, with the
datagrams flowing through both moves; tx_dropped counts beside tx_packets, as our
egress hook sees a packet before veth_xmit() may fail to queue it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from podnetlab.lab import Lab, LabPod
from tests.kernel.support import (
    PINS,
    Daemon,
    Metrics,
    Window,
    cleanup,
    iface_stats,
    in_pod,
    our_programs,
    quiet_window,
    wait_for,
)

# Datagrams to a closed port on the server, both IP families, until stdin closes;
# the server's ICMP errors come back, so both veths carry both directions.
SENDER = """
import select, socket, sys
four = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
six = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sent = 0
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(20):
        four.sendto(b'moving', (sys.argv[1], 9))
        six.sendto(b'moving', (sys.argv[2], 9))
        sent += 2
    select.select([], [], [], 0.001)
print(sent, flush=True)
"""


def veth_counts(pod: LabPod, window: Window | None = None) -> dict[str, int]:
    """What the pod's host veth carried, by the pod's direction: its statistics in a quiet
    window, or as they are; tx_dropped read now (only a flood moves it)."""
    base = Path("/sys/class/net") / pod.host_veth / "statistics"
    stats = window.stats[pod.host_veth] if window else iface_stats(pod.host_veth)
    dropped = int((base / "tx_dropped").read_text())
    return {"egress": stats["rx_packets"], "ingress": stats["tx_packets"] + dropped}


def counted(m: Metrics, pod: LabPod) -> dict[str, float]:
    return {d: m.sum("podnet_packets_total", pod=pod.name, direction=d)
            for d in ("egress", "ingress")}


def modes(daemon: Daemon) -> dict[str, str]:
    return {str(p["pod"]): str(p["attach_mode"]) for p in daemon.pods_api()}


class Traffic:
    """The sender running between a quiet window before and one after; then every pod's
    counts must have moved exactly as its host veth's statistics did."""

    def __init__(self, daemon: Daemon, server: LabPod, client: LabPod) -> None:
        self.pods, self.client = (server, client), client
        in_pod(client, "ping", "-c", "1", "-W", "1", server.ip)  # neighbours settle first
        in_pod(client, "ping", "-6", "-c", "1", "-W", "1", server.ip6)
        self.before = quiet_window(daemon, list(self.pods))
        self.kernel_before = {p.name: veth_counts(p, self.before) for p in self.pods}
        self.started = time.monotonic()
        self.sender = subprocess.Popen([*client.exec_prefix(), sys.executable, "-c", SENDER,
                                        server.ip, server.ip6], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        wait_for(lambda: self._carried(client, veth_counts(client)) > 1000, 10)

    def _carried(self, pod: LabPod, now: dict[str, int], direction: str = "egress") -> int:
        return now[direction] - self.kernel_before[pod.name][direction]

    def stop_and_compare(self, daemon: Daemon, what: str) -> None:
        assert self.sender.stdin is not None and self.sender.stdout is not None
        self.sender.stdin.close()
        sent = int(self.sender.stdout.readline())
        assert self.sender.wait(timeout=10) == 0
        print(f"{what} under {sent} datagrams in {time.monotonic() - self.started:.1f} s")
        after = quiet_window(daemon, list(self.pods))
        assert sent > 10_000
        for pod in self.pods:
            ours, was = counted(after.metrics, pod), counted(self.before.metrics, pod)
            kernel = veth_counts(pod, after)
            for direction in ("egress", "ingress"):
                assert (ours[direction] - was[direction]
                        == self._carried(pod, kernel, direction)), (pod.name, direction)
        # the sender's datagrams all crossed its veth: the traffic really ran through
        assert self._carried(self.client, veth_counts(self.client)) >= sent

    def kill(self) -> None:
        if self.sender.poll() is None:
            self.sender.kill()
            self.sender.wait()


def test_moves_between_tc_and_tcx_under_traffic_count_every_packet_once(lab: Lab) -> None:
    server, client = lab.up(2)
    inventory = str(lab.inventory)
    daemon = Daemon("--attach-mode", "tc", "--leave-attached", "true", inventory=inventory)
    traffic = None
    try:
        assert modes(daemon) == {server.name: "tc", client.name: "tc"}
        traffic = Traffic(daemon, server, client)
        for mode in ("tcx", "tc"):  # the upgrade, and back
            assert daemon.stop() == 0
            daemon = Daemon("--attach-mode", mode, "--leave-attached", "true",
                            inventory=inventory)
            assert modes(daemon) == {server.name: mode, client.name: mode}
            for pod in (server, client):  # moved: ours on the new hook only
                assert set(our_programs(pod.host_veth)) == {f"{mode} ingress",
                                                            f"{mode} egress"}
        traffic.stop_and_compare(daemon, "moved twice")
    finally:
        if traffic is not None:
            traffic.kill()
        daemon.stop()
        cleanup()
    assert not PINS.exists()


def test_auto_moves_a_device_to_tcx_once_it_stayed_and_counts_through(lab: Lab) -> None:
    server, client = lab.up(2)
    # auto; a pass each second publishes the moves in /api/v1/pods
    daemon = Daemon("--tcx-move-after", "3", "--resync-interval", "1",
                    inventory=str(lab.inventory))
    traffic = None
    try:
        assert modes(daemon) == {server.name: "tc", client.name: "tc"}  # at once, by tc
        traffic = Traffic(daemon, server, client)
        wait_for(lambda: modes(daemon) == {server.name: "tcx", client.name: "tcx"}, 15)
        for pod in (server, client):
            assert set(our_programs(pod.host_veth)) == {"tcx ingress", "tcx egress"}
        traffic.stop_and_compare(daemon, "moved to tcx")
        assert daemon.scrape().sum("podnet_monitor_reattaches_total",
                                   reason="moved to tcx") == 2
    finally:
        if traffic is not None:
            traffic.kill()
        daemon.stop()
    for pod in (server, client):
        assert our_programs(pod.host_veth) == {}
