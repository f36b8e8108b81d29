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

import ctypes
import os
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from monitor.lab import Lab, LabPod

CLONE_NEWNET = 0x40000000
SINK_PORT = 9  # discard: the peer answers with ICMP port unreachable, which nobody minds

_PACKETS = re.compile(r'^podnet_packets_total\{([^}]*)\} (\S+)$', re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def udp_sent_by_netns(exposition: str) -> dict[int, int]:
    """UDP packets counted leaving each pod the monitor knows only by netns inode
    (churned pods are in no inventory), from a /metrics text, whatever the label order.

    A regex over the packet lines, not prometheus_client's parser: that one takes ~1.4 s
    for a 500-pod scrape (569 ms for 31,000 lines, against 17 ms here), longer than the
    churn's one-second counting turn."""
    out: dict[int, int] = {}
    for labels_text, value in _PACKETS.findall(exposition):
        labels = dict(_LABEL.findall(labels_text))
        pod = labels.get("pod", "")
        if (labels.get("namespace") == "_unknown" and pod.startswith("netns-")
                and labels.get("direction") == "egress" and labels.get("protocol") == "udp"):
            out[int(pod.removeprefix("netns-"))] = int(float(value))
    return out


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns_path: str) -> socket.socket:
    """A UDP socket that lives in another network namespace."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            _setns(home)
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
    counted: int | None = None  # the monitor's count, read before the pod went

    def first_counted(self) -> float | None:
        """When the first datagram the monitor counted was sent (None: none counted)."""
        if not self.counted:
            return None
        missed = len(self.sent) - self.counted
        return self.sent[missed] if 0 <= missed < len(self.sent) else None


class Churn:
    """Creates `rate` pods a second, each living `lifetime` seconds while it talks."""

    def __init__(self, lab: Lab, peer_ip: str, *, rate: float, lifetime: float,
                 interval: float = 0.01) -> None:
        self.lab, self.peer_ip = lab, peer_ip
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
        pod = self.lab.add(save=False)
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
                    cp.sock.sendto(b"podnetmon-churn", (self.peer_ip, SINK_PORT))
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
