"""No series of a live pod ever goes down, scraped in a tight loop while pods churn under
drop, DNS and TCP load; and the drops sum to the kernel's own count (issue 14).

Stable pods: a sink with no listener (every datagram to it is a NO_SOCKET drop in its
netns), a DNS server answering NXDOMAIN, and a TCP refuser. Churn pods come and go at a
few a second, each sending datagrams to the sink, DNS queries and TCP connects, while a
thread scrapes as fast as it can and compares every series of a pod alive in both of two
consecutive scrapes. At the end the sink's drops equal its UdpNoPorts (nstat, the kernel).
"""

from __future__ import annotations

import sys
import threading
import time

from podnetlab.lab import Lab
from tests.kernel.dnstools import SERVER
from tests.kernel.support import (
    Daemon,
    Metrics,
    in_pod,
    parse_metrics,
    spawn_in_pod,
    wait_for,
)

LOAD = r"""
import socket, struct, sys
sink, dns, refuser = sys.argv[1:4]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(20):
    u.sendto(b"x", (sink, 9))
q = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
q.settimeout(0.2)
for i in range(3):
    q.sendto(struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + b"\x05nx-ch\x00\x00\x01\x00\x01",
             (dns, 53))
    try:
        q.recv(512)
    except OSError:
        pass
for i in range(3):
    try:
        socket.create_connection((refuser, 81), timeout=0.2).close()
    except OSError:
        pass
"""


def _nstat(pod: object, name: str) -> int:
    out = in_pod(pod, "nstat", "-az", name).stdout.split()
    return int(out[out.index(name) + 1])


def _live(m: Metrics) -> set[tuple[str, str, str]]:
    """(namespace, pod, uid) of every pod: a name used again (the lab's, a StatefulSet's)
    is another pod, whose counters start from zero, as Prometheus expects of a reset."""
    return {(d["namespace"], d["pod"], d["uid"]) for d in (dict(ls) for n, ls in m.samples
                                                          if n == "podnet_pod_info")}


def test_no_series_of_a_live_pod_goes_down_under_churn(lab: Lab, daemons: list[Daemon]) -> None:
    sink, dns, refuser, loader = lab.up(4)
    daemon = Daemon("--dns-timeout", "0.5", "--sweep-interval", "0.2", "--peer-interval", "1",
                    inventory=str(lab.inventory))
    daemons.append(daemon)
    server = spawn_in_pod(dns, sys.executable, "-c", SERVER, "0.001")
    assert server.stdout is not None and server.stdout.readline().strip() == "up"
    stop = threading.Event()
    problems: list[str] = []
    scrapes = [0]

    def watch() -> None:
        before = None
        while not stop.is_set():
            status, body = daemon.get("/metrics")
            assert status == 200
            now = Metrics(parse_metrics(body.decode()))
            scrapes[0] += 1
            if before is not None:
                # one pod under its name in both (for a moment the gone one and its
                # namesake can both be there, their series summed)
                alive = {(ns, pod) for ns, pod, _uid in _live(before) & _live(now)
                         if sum(1 for x in _live(before) | _live(now) if x[:2] == (ns, pod)) == 1}
                for key, value in now.samples.items():
                    labels = dict(key[1])
                    if (labels.get("namespace"), labels.get("pod")) not in alive:
                        continue
                    if not key[0].endswith(("_total", "_bucket", "_count", "_sum")):
                        continue  # gauges (pod_info) may change
                    old = before.samples.get(key)
                    if old is not None and value < old:
                        problems.append(f"{key}: {old} -> {value}")
            before = now

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ends = time.monotonic() + 12
        churned = 0
        while time.monotonic() < ends:
            pod = lab.add()
            in_pod(pod, sys.executable, "-c", LOAD, sink.ip, dns.ip, refuser.ip)
            in_pod(loader, sys.executable, "-c", LOAD, sink.ip, dns.ip, refuser.ip)
            lab.remove(pod.name)
            churned += 1
    finally:
        stop.set()
        watcher.join()
        server.kill()
        server.wait()
    assert churned >= 10 and scrapes[0] >= 50, (churned, scrapes[0])
    assert not problems, problems[:20]
    # every datagram to the sink's closed port is one NO_SOCKET drop of the sink's
    wait_for(lambda: daemon.scrape().sum("podnet_drops_total", pod=sink.name,
                                         reason="NO_SOCKET") == _nstat(sink, "UdpNoPorts"),
             timeout=10)
    # (not every datagram sent reaches it: a new pod's first ones wait for ARP, and the
    # neighbour queue keeps only a few; the sink's own count is the oracle)
    assert _nstat(sink, "UdpNoPorts") > 20 * churned
