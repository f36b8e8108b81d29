"""Churn: pods come and go fast; every one is counted exactly and nothing is left behind.

Each churned pod sends a datagram every 10 ms from its own netns, from the moment its
veth is up: its first packets pass before the daemon can have attached. Just before a
pod goes, its host veth's own statistics and the daemon's counts are read together while
the pod is quiet; for every pod, in each direction, the packets the daemon counted plus
those it reports as before the attach (podnet_packets_before_attach_total) equal what
the veth counted. Afterwards the kernel holds our filters and slot table entries for the
idle pods only, and the daemon's fds and threads are what they were before the churn.
The 10,000-lifecycle version with memory is `make soak` (bench/soak.py); the per-pod
report beside 500 pods is `bench/scale.py`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from podnetlab.churn import SINK_PORT, UDP_SINK, Churn, ChurnPod, observer
from podnetlab.lab import Lab
from podnetlab.netsetup import Quiet
from tests.kernel.support import Daemon, census, in_pod, spawn_in_pod, wait_for


def report(pods: list[ChurnPod], check: Callable[[ChurnPod], bool]) -> list[str]:
    """The pods that fail `check`, with what was seen of each."""
    return [f"{cp.pod.name} {cp.pod.host_veth}: wire {cp.wire_before} .. {cp.wire}, counted "
            f"{cp.seen.packets if cp.seen else None}, before attach "
            f"{cp.seen.before_attach if cp.seen else None}, drops "
            f"{cp.seen.drops if cp.seen else None}, sent {len(cp.sent)}"
            for cp in pods if not check(cp)]


def metrics_of(daemon: Daemon) -> Callable[[], str]:
    def scrape() -> str:
        return daemon.get("/metrics")[1].decode()
    return scrape


def test_churn_counts_every_pod_and_leaks_nothing(lab: Lab) -> None:
    idle = lab.up(5)
    daemon = Daemon(inventory=str(lab.inventory))
    try:
        before = census(daemon.proc.pid)
        assert (before.filters, before.ifslots, before.owners, before.netns) == (10, 5, 5, 5)
        churn = Churn(lab, idle[0].ip, rate=20, lifetime=1.0)
        churn.run(10, count=observer(metrics_of(daemon)))
        # making a pod takes the lab ~50 ms, and no pod is made while the observer reads
        # (up to five scrapes a turn when noisy pods are never at rest): 133 and 150+ seen
        assert churn.lifecycles >= 100
        # ARP broadcasts and MLD reports of the pods being made reach every pod: the
        # account is held between the statistics before and after the scrape
        assert report(churn.done, ChurnPod.consistent) == []
        over = [(cp.pod.name, cp.counted, len(cp.sent)) for cp in churn.done
                if (cp.counted or 0) > len(cp.sent)]
        assert not over, over
        # the daemon saw each pod within a second: a datagram sent then was counted
        late = [first - cp.created if (first := cp.first_counted()) is not None else None
                for cp in churn.done]
        assert None not in late and max(late) < 1.0, sorted(late)[-5:]  # type: ignore[type-var]

        wait_for(lambda: census(daemon.proc.pid).ifslots == 5, 10)
        after = census(daemon.proc.pid)
        assert (after.filters, after.tcx, after.ifslots, after.spill, after.owners,
                after.netns) == (10, 0, 5, 0, 5, 5), after
        assert after.fds <= before.fds and after.threads == before.threads, (before, after)
    finally:
        assert daemon.stop() == 0


def test_churn_beside_many_pods_counts_every_packet_each_veth_carried(lab: Lab) -> None:
    idle = lab.up(200)
    peer = idle[0]
    sink = spawn_in_pod(peer, sys.executable, "-c", UDP_SINK, str(SINK_PORT))  # no ICMP back
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    mac = json.loads(in_pod(peer, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
    daemon = Daemon(inventory=str(lab.inventory))
    try:
        # quiet pods (no IPv6, the peer a permanent neighbour): each veth carries only the
        # pod's datagrams, from its first one on, so each is compared at rest, exactly
        churn = Churn(lab, peer.ip, rate=20, lifetime=1.5, quiet=Quiet({peer.ip: mac}))
        churn.run(8, count=observer(metrics_of(daemon)))
        assert churn.lifecycles >= 50  # ~10 a second here, the observer's reads included
        assert report(churn.done, ChurnPod.exact) == []
        assert all(cp.wire and cp.wire.egress == len(cp.sent) for cp in churn.done)
        # most sent before the daemon attached: counts alone would have missed them
        early = sum(1 for cp in churn.done if cp.seen and cp.seen.before_attach["egress"])
        assert early > len(churn.done) / 2, early
    finally:
        sink.terminate()
        sink.wait()
        assert daemon.stop() == 0
