"""Churn: pods come and go fast; every one is counted exactly and nothing is left behind.

Each churned pod sends a datagram every 10 ms from its own netns; the daemon's
count of its UDP packets is read before the pod goes and must not exceed what
it sent (and must not be zero: it was seen). Afterwards the kernel holds our
filters and slot table entries for the idle pods only, and the daemon's fds and
threads are what they were before the churn. The 10,000-lifecycle version with
memory is `make soak` (bench/soak.py).
"""

from __future__ import annotations

from monitor.churn import Churn, ChurnPod, udp_sent_by_netns
from monitor.lab import Lab
from tests.kernel.support import Daemon, census, wait_for


def test_churn_counts_every_pod_and_leaks_nothing(lab: Lab) -> None:
    idle = lab.up(5)
    daemon = Daemon(inventory=str(lab.inventory))
    try:
        before = census(daemon.proc.pid)
        assert (before.filters, before.ifslots, before.owners, before.netns) == (10, 5, 5, 5)

        def count(finished: list[ChurnPod]) -> None:
            seen = udp_sent_by_netns(daemon.get("/metrics")[1].decode())
            for cp in finished:
                cp.counted = seen.get(cp.pod.netns, 0)

        churn = Churn(lab, idle[0].ip, rate=20, lifetime=1.0)
        churn.run(10, count=count)
        assert churn.lifecycles >= 150  # creating a pod takes the lab ~50 ms here
        unseen = [cp.pod.name for cp in churn.done if not cp.counted]
        over = [(cp.pod.name, cp.counted, len(cp.sent)) for cp in churn.done
                if (cp.counted or 0) > len(cp.sent)]
        assert not unseen and not over, (unseen, over)
        late = [cp.first_counted() - cp.created for cp in churn.done]  # type: ignore[operator]
        assert max(late) < 1.0, sorted(late)[-5:]

        wait_for(lambda: census(daemon.proc.pid).ifslots == 5, 10)
        after = census(daemon.proc.pid)
        assert (after.filters, after.tcx, after.ifslots, after.spill, after.owners,
                after.netns) == (10, 0, 5, 0, 5, 5), after
        assert after.fds <= before.fds and after.threads == before.threads, (before, after)
    finally:
        assert daemon.stop() == 0
