"""Beside the CNIs people run, reproduced with small BPF programs of our own on the host
veth (tests/kernel/foreign.py), and our own filters and links taken away under traffic.

- Cilium's legacy tc mode and Calico's eBPF dataplane: a direct-action classic filter at
  priority 1 on both hooks, ending TC processing (TC_ACT_OK): ours at 4096 would never
  run. With tcx in the kernel the daemon attaches that veth by tcx, which runs before
  every classic filter, whether the filter was there first or came after.
- Cilium's host routing (and netkit): traffic to a pod delivered with bpf_redirect_peer()
  never passes its host veth's egress; the pod-side device's statistics see it, and the
  daemon reports it and counts its volume.
- Filters and tcx links of ours removed by someone else come back within a second.
Every count is held against the veths' own statistics (both sides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.kernel import rtnl, syscalls, tracepoints
from podnetlab.lab import Lab, LabPod
from tests.kernel.foreign import ForeignPrograms
from tests.kernel.support import (
    ROOT,
    Daemon,
    in_pod,
    our_programs,
    quiet_window,
    spawn_in_pod,
    wait_for,
)

FAST = ("--bypass-check-interval", "1", "--sweep-interval", "0.2")


@pytest.fixture
def passers() -> Iterator[list[ForeignPrograms]]:
    made: list[ForeignPrograms] = []
    try:
        yield made
    finally:
        for p in made:
            p.close()


def _ifindex(pod: LabPod) -> int:
    return int(Path(f"/sys/class/net/{pod.host_veth}/ifindex").read_text())


def _neighbours(*pods: LabPod) -> None:
    """Permanent entries: no ARP inside a window (and the redirect program lets only
    IPv4 through its own way)."""
    macs = {p.name: json.loads(in_pod(p, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
            for p in pods}
    for x in pods:
        for y in pods:
            if x is not y:
                in_pod(x, "ip", "neigh", "replace", y.ip, "lladdr", macs[y.name], "dev", "eth0",
                       "nud", "permanent")


def _exact(daemon: Daemon, a: LabPod, b: LabPod, count: int) -> None:
    before = quiet_window(daemon, [a, b])
    in_pod(a, "ping", "-c", str(count), "-i", "0.01", "-q", b.ip)
    after = quiet_window(daemon, [a, b])
    for pod in (a, b):
        for direction, stat in (("egress", "rx_packets"), ("ingress", "tx_packets")):
            ours = (after.metrics.sum("podnet_packets_total", pod=pod.name, direction=direction)
                    - before.metrics.sum("podnet_packets_total", pod=pod.name,
                                         direction=direction))
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            assert ours == kernel >= count, (pod.name, direction, ours, kernel)


def _modes(daemon: Daemon) -> dict[str, str]:
    return {p["pod"]: str(p["attach_mode"]) for p in daemon.pods_api()}


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_classic_filter_ending_tc_first_moves_the_veth_to_tcx(
        lab: Lab, daemons: list[Daemon], passers: list[ForeignPrograms], when: str) -> None:
    a, b = lab.up(2)
    _neighbours(a, b)
    cni = ForeignPrograms(verdict="TC_ACT_OK")  # Cilium legacy / Calico eBPF: "allowed"
    passers.append(cni)
    if when == "before":
        cni.attach_tc(a.host_veth, prio=1)
    daemon = Daemon(*FAST, inventory=str(lab.inventory))
    daemons.append(daemon)
    if when == "after":
        assert _modes(daemon)[a.name] == "tc"
        cni.attach_tc(a.host_veth, prio=1)  # the CNI comes after us: a tc event
        wait_for(lambda: _modes(daemon)[a.name] == "tcx", timeout=2, interval=0.05)
        reattached = daemon.scrape().sum("podnet_monitor_reattaches_total",
                                         reason="a filter runs before ours")
        assert reattached == 1
    assert _modes(daemon) == {a.name: "tcx", b.name: "tc"}
    assert set(our_programs(a.host_veth)) == {"tcx ingress", "tcx egress"}
    _exact(daemon, a, b, 23)
    seen = cni.counts()
    assert seen[0] >= 23 and seen[1] >= 23  # theirs ran too: ours passes on (TCX_NEXT)
    assert daemon.scrape().sum("podnet_monitor_bypassed", pod=a.name) == 0


def _check_line(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "monitor", "check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[1:2] == ["cni"])
    return lines[at:at + 2]


def test_check_says_which_veths_carry_filters_that_run_before_ours(
        lab: Lab, passers: list[ForeignPrograms]) -> None:
    a, _b = lab.up(2)
    line = _check_line()
    assert line[0].split()[:2] == ["ok", "cni"] and a.host_veth not in line[0], line
    cni = ForeignPrograms(verdict="TC_ACT_OK")
    passers.append(cni)
    cni.attach_tc(a.host_veth, prio=1)
    line = _check_line()  # with tcx, attach_mode auto: those veths go to tcx
    assert line[0].split()[:2] == ["ok", "cni"], line
    assert f"{a.host_veth} (egress prio 1 " in line[0] and "attaches those by tcx" in line[0]
    line = _check_line("--attach-mode", "tc")  # forced to tc: their traffic is not all seen
    assert line[0].split()[:2] == ["warn", "cni"], line
    assert a.host_veth in line[0] and 'reason="tc_filter_first"' in line[0]
    assert "remedy: attach_mode auto" in line[1]
    line = _check_line("--tc-priority", "1")  # ours first at 1? theirs holds it: still ahead
    assert a.host_veth in line[0], line


def test_redirect_peer_past_the_host_veth_is_reported_and_its_volume_counted(
        lab: Lab, daemons: list[Daemon], passers: list[ForeignPrograms]) -> None:
    a, b = lab.up(2)
    _neighbours(a, b)
    routing = ForeignPrograms(verdict="TC_ACT_OK", redirect_peer=_ifindex(b))
    passers.append(routing)
    routing.attach_tc(a.host_veth, prio=1, hooks=("ingress",))
    daemon = Daemon(*FAST, inventory=str(lab.inventory))
    daemons.append(daemon)
    assert _modes(daemon)[a.name] == "tcx"  # a's classic filter runs first: tcx for a
    with rtnl.Rtnl() as r:
        veth = next(link for link in r.links("veth") if link.name == b.host_veth)

        def pod_side() -> tuple[int, int]:
            link = r.link(veth.link, veth.link_netnsid)
            assert link is not None
            return link.rx_packets, link.rx_bytes

        side_before = pod_side()
        before = quiet_window(daemon, [a, b])
        ping = spawn_in_pod(a, "ping", "-c", "200", "-i", "0.02", "-q", b.ip)
        wait_for(lambda: daemon.scrape().sum("podnet_monitor_bypassed", pod=b.name,
                                             reason="redirect_peer") == 1, timeout=5)
        assert {p["pod"]: p["bypassed"] for p in daemon.pods_api()}[b.name] == "redirect_peer"
        assert ping.wait(timeout=30) == 0  # delivered: the pings are answered
        time.sleep(1.5)  # one more check: the last pings' volume is in
        after = quiet_window(daemon, [a, b])
        side_after = pod_side()
    host_tx = after.stats[b.host_veth]["tx_packets"] - before.stats[b.host_veth]["tx_packets"]
    assert host_tx == 0  # the host veth never saw them ...
    assert side_after[0] - side_before[0] == 200  # ... b's own device did
    m = after.metrics
    assert m.sum("podnet_redirected_packets_total", pod=b.name) == 200
    assert m.sum("podnet_redirected_bytes_total", pod=b.name) == 200 * 98  # the frames, whole
    # a's side, by tcx before the redirecting filter, counted every packet it sent
    sent = (m.sum("podnet_packets_total", pod=a.name, direction="egress")
            - before.metrics.sum("podnet_packets_total", pod=a.name, direction="egress"))
    assert sent == after.stats[a.host_veth]["rx_packets"] - before.stats[a.host_veth]["rx_packets"]


@pytest.mark.parametrize("mode", ["tc", "tcx"])
def test_filters_and_links_removed_by_someone_else_come_back_within_a_second(
        lab: Lab, daemons: list[Daemon], mode: str) -> None:
    a, b = lab.up(2)
    _neighbours(a, b)
    daemon = Daemon(*FAST, "--attach-mode", mode, inventory=str(lab.inventory))
    daemons.append(daemon)
    pinger = spawn_in_pod(a, "ping", "-i", "0.01", "-q", b.ip)
    try:
        time.sleep(0.5)
        if mode == "tc":  # what a CNI recreating its qdisc, or an admin, does
            for hook in ("ingress", "egress"):
                subprocess.run(["tc", "filter", "del", "dev", a.host_veth, hook, "prio", "4096",
                                "handle", "0x504e", "bpf"], check=True)
        else:  # someone detaching our tcx links
            for direction in ("ingress", "egress"):
                pin = Path(f"/sys/fs/bpf/podnetmon/links/tcx-{_ifindex(a)}-{direction}")
                fd = tracepoints.get_pinned(str(pin))
                try:
                    syscalls.link_detach(fd)
                finally:
                    os.close(fd)
        gone = time.monotonic()
        assert our_programs(a.host_veth) == {}
        took = wait_for(lambda: set(our_programs(a.host_veth)) == {f"{mode} ingress",
                                                                   f"{mode} egress"},
                        timeout=3, interval=0.02)
        assert took < 1.0, took
        assert time.monotonic() - gone < 1.5
        reason = "filter gone" if mode == "tc" else "link gone"
        wait_for(lambda: daemon.scrape().sum("podnet_monitor_reattaches_total",
                                             reason=reason) == 1, timeout=2)
    finally:
        pinger.terminate()
        pinger.wait()
    _exact(daemon, a, b, 17)  # counting as before, from then on
