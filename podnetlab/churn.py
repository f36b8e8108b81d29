"""Pod churn in the lab: pods created and deleted at a steady rate, each one talking.

Used by the scale benchmark (how soon is a new pod counted?), the soak (is
anything leaked over thousands of pod lifecycles?) and their tests. Pods are
made with `Lab.add(save=False)` (the state file is not rewritten 20 times a
second; `lab down` finds them by name anyway).

Each churned pod sends one UDP datagram every `interval` seconds from a socket
made inside its netns (the thread enters the netns just long enough to create
the socket: a socket stays in the namespace it was made in). The send times
are kept, so a monitor's count of the pod's UDP packets says when it started
counting: if it counted n of N datagrams, the first counted one is datagram
N - n, sent at a known time.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from monitor.kernel import netns, rtnl
from podnetlab.lab import Lab, LabPod
from podnetlab.netsetup import Quiet

SINK_PORT = 9  # discard: the peer answers with ICMP port unreachable, which nobody minds
# A program for the peer: takes the churned pods' datagrams on the port in argv[1]
# without a word back (no ICMP port unreachable), so quiet pods' veths carry nothing but
# what the pods send. Prints "ready" once bound.
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    s.recv(2048)
"""

_SERIES = re.compile(r'^(podnet_packets_total|podnet_packets_before_attach_total|'
                     r'podnet_drops_total)\{([^}]*)\} (\S+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Counted:
    """What the monitor said of one pod it knows only by netns inode (churned pods are in
    no inventory): packets by direction (every protocol), UDP sent, what passed before the
    attach by direction, drops by reason."""

    packets: dict[str, int] = field(default_factory=lambda: {"egress": 0, "ingress": 0})
    udp_egress: int = 0
    before_attach: dict[str, int] = field(default_factory=lambda: {"egress": 0, "ingress": 0})
    drops: dict[str, int] = field(default_factory=dict)


def counted_by_netns(exposition: str) -> dict[int, Counted]:
    """Each netns-named pod's counts, from a /metrics text, whatever the label order.

    A regex over the lines it needs, not prometheus_client's parser: that one takes ~1.4 s
    for a 500-pod scrape (569 ms for 31,000 lines, against 17 ms here), longer than the
    churn's one-second counting turn."""
    out: dict[int, Counted] = {}
    for name, labels_text, value in _SERIES.findall(exposition):
        labels = dict(_LABEL.findall(labels_text))
        pod = labels.get("pod", "")
        if labels.get("namespace") != "_unknown" or not pod.startswith("netns-"):
            continue
        counted = out.setdefault(int(pod.removeprefix("netns-")), Counted())
        n = int(float(value))
        if name == "podnet_drops_total":
            counted.drops[labels["reason"]] = n
        elif name == "podnet_packets_before_attach_total":
            counted.before_attach[labels["direction"]] += n
        else:
            counted.packets[labels["direction"]] += n
            if labels["direction"] == "egress" and labels.get("protocol") == "udp":
                counted.udp_egress = n
    return out


@dataclass(frozen=True)
class Wire:
    """A host veth's own statistics: packets the pod sent (its rx), and those handed to
    it for the pod (its tx, with tx_dropped: what it could not deliver, the pod's CPU's
    backlog full, our program saw and the monitor counts as a CPU_BACKLOG drop too)."""

    egress: int
    ingress: int


def veth_wire() -> dict[str, Wire]:
    """Every veth's packet counts, by name, from one link dump."""
    with rtnl.Rtnl() as r:
        return {link.name: Wire(link.rx_packets, link.tx_packets + link.tx_dropped)
                for link in r.links("veth")}


def socket_in(netns_path: str) -> socket.socket:
    """A UDP socket that lives in another network namespace."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            netns.setns(home)
    finally:
        os.close(target)
        os.close(home)


@dataclass
class ChurnPod:
    pod: LabPod
    created: float  # monotonic, when the lab started making it
    ready: float  # monotonic, when its interface was up and addressed
    sock: socket.socket
    sent: list[float] = field(default_factory=list)  # monotonic send times
    stop_sending: float = 0.0
    counted: int | None = None  # the monitor's count of its UDP datagrams, read before it went
    # the monitor's counts and the veth's own statistics, read together while the pod
    # was quiet, just before it went (Churn.observer); None if never read or never quiet
    seen: Counted | None = None
    wire_before: Wire | None = None  # the veth's statistics just before that scrape ...
    wire: Wire | None = None  # ... and just after it

    def told(self, direction: str) -> int:
        """Packets the monitor accounts for in a direction: counted, or before the attach
        (0 if it was never read)."""
        if self.seen is None:
            return 0
        return self.seen.packets[direction] + self.seen.before_attach[direction]

    def consistent(self) -> bool:
        """The monitor's account lies between the veth's statistics before and after the
        scrape (each packet is in the statistics microseconds from our hook, in one order
        or the other, never a scrape apart): a missed packet shows unless traffic during
        the scrape hides it."""
        if self.seen is None or self.wire is None or self.wire_before is None:
            return False
        return all(getattr(self.wire_before, d) <= self.told(d) <= getattr(self.wire, d)
                   for d in ("egress", "ingress"))

    def exact(self) -> bool:
        """Read at rest (no packet during the scrape), and every packet the veth counted is
        counted by the monitor or as before the attach."""
        return self.wire == self.wire_before and self.consistent()

    def first_counted(self) -> float | None:
        """When the first datagram the monitor counted was sent (None: none counted)."""
        if not self.counted:
            return None
        missed = len(self.sent) - self.counted
        return self.sent[missed] if 0 <= missed < len(self.sent) else None


def observer(scrape: Callable[[], str], attempts: int = 5) -> Callable[[list[ChurnPod]], None]:
    """A Churn.run `count` that reads, for each finished pod, the monitor's counts and its
    veth's statistics together: statistics, a scrape, statistics again, until the two
    statistics agree for every one of those pods (nothing passed between: the scrape saw
    what the veth had counted)."""

    def count(finished: list[ChurnPod]) -> None:
        for _ in range(attempts):
            before = veth_wire()
            seen = counted_by_netns(scrape())
            after = veth_wire()
            for cp in finished:
                cp.seen = seen.get(cp.pod.netns, Counted())
                cp.counted = cp.seen.udp_egress
                cp.wire_before = before.get(cp.pod.host_veth)
                cp.wire = after.get(cp.pod.host_veth)
            if all(cp.wire == cp.wire_before for cp in finished):
                return  # at rest: exact; otherwise try again, keeping the last reads

    return count


class Churn:
    """Creates `rate` pods a second, each living `lifetime` seconds while it talks."""

    def __init__(self, lab: Lab, peer_ip: str, *, rate: float, lifetime: float,
                 interval: float = 0.01, peer_port: int = SINK_PORT,
                 quiet: Quiet | None = None) -> None:
        """quiet: pods made quiet (netsetup.Quiet), e.g. with the peer as a permanent
        neighbour; a peer that listens on peer_port then sends nothing back either."""
        self.lab, self.peer_ip, self.peer_port, self.quiet = lab, peer_ip, peer_port, quiet
        self.rate, self.lifetime, self.interval = rate, lifetime, interval
        self.live: list[ChurnPod] = []
        self.done: list[ChurnPod] = []
        self.lifecycles = 0
        # pods are removed in the background (killing the pause process and deleting the
        # veth take longer than making them): the senders of the live ones keep their pace
        self._remover = ThreadPoolExecutor(max_workers=2, thread_name_prefix="churn-rm")
        self._removing: list[Future[None]] = []

    def _create(self) -> ChurnPod:
        started = time.monotonic()
        pod = self.lab.add(save=False, quiet=self.quiet)
        sock = socket_in(pod.netns_path)
        sock.setblocking(False)
        return ChurnPod(pod, started, time.monotonic(), sock,
                        stop_sending=time.monotonic() + self.lifetime)

    def _send(self, now: float) -> None:
        for cp in self.live:
            if now >= cp.stop_sending:
                continue
            due = cp.ready + len(cp.sent) * self.interval
            if now >= due:
                try:
                    cp.sock.sendto(b"podnetmon-churn", (self.peer_ip, self.peer_port))
                    cp.sent.append(time.monotonic())
                except BlockingIOError:
                    pass  # the neighbour is being resolved; the next turn sends

    def run(self, duration: float, *, count: Callable[[list[ChurnPod]], None] | None = None,
            count_every: float = 1.0, keep: bool = True) -> None:
        """Churn for `duration` seconds. `count` is called about every `count_every`
        seconds with the pods that stopped sending and are about to be deleted: it
        records their counts (ChurnPod.counted) from the monitor. `keep` False: forget
        finished pods (a long soak keeps no history)."""
        start = time.monotonic()
        next_create = start
        next_count = start + count_every
        while True:
            now = time.monotonic()
            if now - start < duration and now >= next_create:
                self.live.append(self._create())
                # When making a pod takes longer than the interval, the rate is what the
                # machine manages: never a backlog made in a burst, and never a turn
                # without the live pods' datagrams.
                next_create = max(next_create + 1.0 / self.rate, time.monotonic() - 1.0 / self.rate)
                now = time.monotonic()
            self._send(now)
            if now >= next_count or (now - start >= duration and self.live and
                                     all(now >= cp.stop_sending for cp in self.live)):
                finished = [cp for cp in self.live if now >= cp.stop_sending + 0.1]
                if count is not None and finished:
                    count(finished)
                for cp in finished:
                    self._delete(cp, keep)
                next_count = now + count_every
            if now - start >= duration and not self.live:
                wait(self._removing)
                for future in self._removing:
                    future.result()  # a removal that failed fails the run
                self._removing.clear()
                return
            time.sleep(0.001)

    def _delete(self, cp: ChurnPod, keep: bool) -> None:
        cp.sock.close()
        self._removing.append(self._remover.submit(self.lab.remove_pod, cp.pod))
        self.live.remove(cp)
        self.lifecycles += 1
        if keep:
            self.done.append(cp)

    def stop(self) -> None:
        for cp in list(self.live):
            self._delete(cp, keep=False)
        self._remover.shutdown(wait=True)
