"""A slot, a netns inode or a probe's maps used again start at zero (issue 14).

Slots are handed out oldest-first (monitor/slots.py), so with --max-interfaces 16 the
sixteenth interface made after one goes gets its slot; the kernel hands a freed netns
inode to the next netns at once. Every test makes a pod reuse what a gone pod held and
asks whether it inherited anything.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from monitor import cleanup
from monitor.settings import Settings
from podnetlab.lab import Lab, LabPod
from tests.kernel.support import Daemon, ifslot_of, in_pod, wait_for

SLOTS = ("--max-interfaces", "16")
QUERIES = ("import socket, struct, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "for i in range(int(sys.argv[2])):\n"
           "    s.sendto(struct.pack('>HHHHHH', i, 0x0100, 1, 0, 0, 0) + b'\\x01a\\x00\\x00\\x01"
           "\\x00\\x01', (sys.argv[1], 53))\n")


def _slot(pod: LabPod) -> int | None:
    return ifslot_of(int(Path(f"/sys/class/net/{pod.host_veth}/ifindex").read_text()))


def _gone(daemon: Daemon, pod: LabPod) -> bool:
    return not daemon.scrape().has("podnet_pod_info", pod=pod.name)


def _take_the_slot(lab: Lab, daemon: Daemon, slot: int) -> LabPod:
    """New pods until one gets `slot` (at most the 16 slots round)."""
    for _ in range(16):
        pod = lab.add()
        wait_for(lambda p=pod: daemon.scrape().has("podnet_pod_info", pod=p.name), timeout=10)
        if _slot(pod) == slot:
            return pod
    raise AssertionError(f"no new pod got slot {slot}")


def test_a_reused_slot_does_not_inherit_pending_dns_queries(lab: Lab, daemons: list[Daemon]
                                                            ) -> None:
    """Queries left pending by a gone pod used to time out, later, into the counts of the
    pod its slot went to."""
    asker, silent = lab.up(2)
    daemon = Daemon(*SLOTS, "--dns-timeout", "4", "--sweep-interval", "0.2",
                    inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(asker, sys.executable, "-c", QUERIES, silent.ip, "5")  # nobody answers port 53
    wait_for(lambda: daemon.scrape().sum("podnet_dns_queries_total", pod=asker.name) == 5,
             timeout=10)
    slot = _slot(asker)
    assert slot is not None
    lab.remove(asker.name)
    wait_for(lambda: _gone(daemon, asker), timeout=10)
    heir = _take_the_slot(lab, daemon, slot)
    time.sleep(5)  # past the timeout: the gone pod's queries expire now
    m = daemon.scrape()
    assert m.sum("podnet_dns_timeouts_total", pod=heir.name) == 0
    assert m.sum("podnet_dns_queries_total", pod=heir.name) == 0


def test_a_probe_switched_off_then_on_hands_no_pod_old_counts(lab: Lab,
                                                              daemons: list[Daemon]) -> None:
    """A daemon without the dns probe zeroes no dns slot; the pinned dns map used to keep
    a gone pod's counts in a slot another pod got meanwhile, for the next daemon with dns
    on to show. And the tracepoint links of probes not loaded stayed attached."""
    asker, silent = lab.up(2)
    pinned = ("--leave-attached", "true", *SLOTS)
    try:
        first = Daemon(*pinned, inventory=str(lab.inventory))
        daemons.append(first)
        in_pod(asker, sys.executable, "-c", QUERIES, silent.ip, "7")
        wait_for(lambda: first.scrape().sum("podnet_dns_queries_total", pod=asker.name) == 7,
                 timeout=10)
        slot = _slot(asker)
        assert slot is not None
        assert first.stop() == 0
        links = Path(Settings.bpffs_root) / "podnetmon" / "links"
        assert (links / "tp-skb-kfree_skb").exists()

        second = Daemon(*pinned, "--probes", "packets", inventory=str(lab.inventory))
        daemons.append(second)
        lab.remove(asker.name)
        wait_for(lambda: _gone(second, asker), timeout=10)
        heir = _take_the_slot(lab, second, slot)
        # what the first daemon's probes left, the second does not keep
        assert not (links / "tp-skb-kfree_skb").exists()
        ours = subprocess.run(["bpftool", "link", "show"], capture_output=True, text=True,
                              check=True).stdout
        assert "tracepoint" not in ours or "pnm_" not in ours, ours
        assert second.stop() == 0

        third = Daemon(*pinned, inventory=str(lab.inventory))
        daemons.append(third)
        m = third.scrape()
        assert m.has("podnet_dns_queries_total", pod=heir.name)
        assert m.sum("podnet_dns_queries_total", pod=heir.name) == 0
        assert third.stop() == 0
    finally:
        for d in daemons:
            d.stop()
        cleanup.cleanup(Settings.bpffs_root, Settings.tc_priority, Settings.tc_handle)


def test_a_netns_inode_reused_in_one_pass_does_not_inherit_drops(
        lab: Lab, daemons: list[Daemon]) -> None:
    """The kernel gives a freed netns inode to the next netns at once; within one pass (a
    long debounce makes one of the gone pod and the new one), the new pod used to keep
    the old one's drops, counted by netns inode."""
    victim, sender = lab.up(2)
    daemon = Daemon("--event-debounce", "1", inventory=str(lab.inventory))
    daemons.append(daemon)
    drop = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for _ in range(9):\n    s.sendto(b'x', (sys.argv[1], 9))\n")
    in_pod(sender, sys.executable, "-c", drop, victim.ip)  # nothing listens: NO_SOCKET
    wait_for(lambda: daemon.scrape().sum("podnet_drops_total", pod=victim.name) == 9,
             timeout=10)
    inode = victim.netns
    for _ in range(5):  # the inode comes back nearly always; retry if it did not
        lab.remove(victim.name)
        heir = lab.add()
        if heir.netns == inode:
            break
        victim = heir
    assert heir.netns == inode, "the kernel did not reuse the netns inode"
    wait_for(lambda: daemon.scrape().has("podnet_pod_info", pod=heir.name), timeout=10)
    assert daemon.scrape().sum("podnet_drops_total", pod=heir.name) == 0
