"""Handshake latency, RTT and DNS, against a delay line, `ss -ti` and the DNS tools' own counts.

The kernel has no netem; tests/kernel/delayline.py holds every packet N ms in
each direction between a lab pod (P) and a namespace behind it where the
server runs. A client pod (C) reaches that server through P, so both C (the
client) and P (on whose veth the server's SYN-ACK leaves) see the added delay.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from podnetlab.lab import LabPod
from tests.kernel.dnstools import CLIENT, SERVER
from tests.kernel.support import (
    INNER,
    INNER_IP,
    Daemon,
    Metrics,
    delay_line,
    in_pod,
    lab_with_daemon,
    nft_in_pod,
    spawn_in_pod,
    wait_for,
)


@dataclass
class Env:
    client: LabPod
    router: LabPod
    dns: LabPod
    daemon: Daemon


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with lab_with_daemon(3, "--tcp-connect-timeout", "1", "--dns-timeout", "1",
                         "--sweep-interval", "0.2") as run:
        yield Env(*run.pods, run.daemon)


def _median_le(after: Metrics, before: Metrics, name: str, **labels: str) -> tuple[float, int]:
    """The upper bound of the bucket holding the median of the samples added in between."""
    def buckets(m: Metrics) -> dict[float, float]:
        out: dict[float, float] = {}
        for (n, ls), v in m.samples.items():
            d = dict(ls)
            if n == f"{name}_bucket" and all(d.get(k) == x for k, x in labels.items()):
                le = float(d["le"])
                out[le] = out.get(le, 0) + v
        return out
    b, a = buckets(before), buckets(after)
    added = {le: a[le] - b.get(le, 0) for le in a}
    total = added[float("inf")]
    for le in sorted(added):
        if added[le] >= total / 2:
            return le, int(total)
    raise AssertionError("no samples")


SERVER_SCRIPT = ("import socket\ns=socket.create_server(('0.0.0.0',8080))\nprint('up',flush=True)\n"
                 "while True:\n  c,_=s.accept()\n  while (d:=c.recv(100)): c.send(d)\n  c.close()")
CONNECT_SCRIPT = ("import socket,sys\nfor _ in range(int(sys.argv[2])):\n"
                  "  c=socket.create_connection((sys.argv[1],8080),timeout=5); c.close()")
PINGPONG_SCRIPT = ("import socket,sys\nc=socket.create_connection((sys.argv[1],8080),timeout=5)\n"
                   "for _ in range(30):\n  c.send(b'x'); c.recv(1)\nprint('ready',flush=True)\n"
                   "sys.stdin.readline(); c.close()")


@pytest.mark.parametrize(("rtt_ms", "bucket_le"), [(20, 0.032768), (50, 0.065536)])
def test_handshake_and_rtt_follow_the_added_delay(env: Env, rtt_ms: int, bucket_le: float) -> None:
    with delay_line(env.client, env.router, rtt_ms / 2):
        server = subprocess.Popen(["ip", "netns", "exec", INNER, sys.executable, "-c",
                                   SERVER_SCRIPT], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "up"
            before = env.daemon.scrape()
            in_pod(env.client, sys.executable, "-c", CONNECT_SCRIPT, INNER_IP, "11")
            # one connection held open to compare the kernel's RTT with ss -ti
            pingpong = subprocess.Popen([*env.client.exec_prefix(), sys.executable, "-c",
                                         PINGPONG_SCRIPT, INNER_IP], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
            assert pingpong.stdout is not None and pingpong.stdout.readline().strip() == "ready"
            ss = in_pod(env.client, "ss", "-tin", "dst", INNER_IP).stdout
            mid = env.daemon.scrape()
            pingpong.communicate("close\n", timeout=10)  # the close samples its srtt
            time.sleep(0.5)
            after = env.daemon.scrape()
        finally:
            server.kill()
            server.wait()
    for pod, role in ((env.client, "client"), (env.router, "server")):
        le, count = _median_le(after, before, "podnet_tcp_handshake_seconds", pod=pod.name,
                               role=role)
        assert count == 12, (role, count)  # 11 connections and the ping-pong one
        assert le == bucket_le, (role, le)
    # the ping-pong connection's RTT sample against ss -ti just before it closed
    match = re.search(r"\brtt:([\d.]+)/", ss)
    assert match, ss
    ss_ms = float(match.group(1))
    samples = (after.sum("podnet_tcp_rtt_seconds_count", pod=env.client.name)
               - mid.sum("podnet_tcp_rtt_seconds_count", pod=env.client.name))
    ours_ms = 1000 * (after.sum("podnet_tcp_rtt_seconds_sum", pod=env.client.name)
                      - mid.sum("podnet_tcp_rtt_seconds_sum", pod=env.client.name))
    assert samples == 1
    assert abs(ours_ms - ss_ms) <= 0.2 * ss_ms, (ours_ms, ss_ms)
    le, count = _median_le(after, before, "podnet_tcp_rtt_seconds", pod=env.client.name)
    assert count == 12 and le == bucket_le


def test_unanswered_syn_is_one_timeout(env: Env) -> None:
    nft_in_pod(env.router, """
table inet pnmblackhole {
  chain input {
    type filter hook input priority 0;
    tcp dport 9 drop
  }
}""")
    try:
        before = env.daemon.scrape()
        in_pod(env.client, sys.executable, "-c",
               "import socket,sys\ntry: socket.create_connection((sys.argv[1],9),timeout=2.5)\n"
               "except OSError: pass", env.router.ip)

        def counted(m: Metrics) -> float:
            return (m.sum("podnet_tcp_connect_failures_total", pod=env.client.name, role="client",
                          reason="timeout")
                    - before.sum("podnet_tcp_connect_failures_total", pod=env.client.name,
                                 role="client", reason="timeout"))

        wait_for(lambda: counted(env.daemon.scrape()) >= 1, timeout=5)
        time.sleep(1.5)  # the SYN retransmits at 1 s and 3 s must not count again
        assert counted(env.daemon.scrape()) == 1
    finally:
        in_pod(env.router, "nft", "delete", "table", "inet", "pnmblackhole")


def test_dns_rcodes_latency_and_timeouts_exact(env: Env) -> None:
    server = spawn_in_pod(env.dns, sys.executable, "-c", SERVER, "0.024")
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        before = env.daemon.scrape()
        names4 = ["ok.a"] * 7 + ["nx.b"] * 5 + ["fail.c"] * 3 + ["drop.d"] * 2
        names6 = ["ok.e"] * 3 + ["nx.f"] + ["drop.g"]
        got: dict[str, int] = {}
        for server_ip, names in ((env.dns.ip, names4), (env.dns.ip6, names6)):
            out = json.loads(in_pod(env.client, sys.executable, "-c", CLIENT, server_ip,
                                    *names).stdout)
            for key, n in out["answers"].items():
                got[key] = got.get(key, 0) + n
            assert all(0.020 < t < 0.0327 for t in out["latencies"]), out["latencies"]
        assert got == {"0": 10, "3": 6, "2": 3, "timeout": 3}

        def timeouts(m: Metrics) -> float:
            return (m.sum("podnet_dns_timeouts_total", pod=env.client.name)
                    - before.sum("podnet_dns_timeouts_total", pod=env.client.name))

        wait_for(lambda: timeouts(env.daemon.scrape()) >= 3, timeout=5)
        after = env.daemon.scrape()
    finally:
        server.kill()
    assert timeouts(after) == 3
    c = env.client.name
    for rcode, n in (("NOERROR", 10), ("NXDOMAIN", 6), ("SERVFAIL", 3)):
        ours = (after.sum("podnet_dns_responses_total", pod=c, rcode=rcode)
                - before.sum("podnet_dns_responses_total", pod=c, rcode=rcode))
        assert ours == n, rcode
    queries = (after.sum("podnet_dns_queries_total", pod=c)
               - before.sum("podnet_dns_queries_total", pod=c))
    assert queries == len(names4) + len(names6)
    le, count = _median_le(after, before, "podnet_dns_latency_seconds", pod=c)
    assert (le, count) == (0.032768, 19)
    # every answer, not just the median, lies in the 24 ms bucket
    exact = (after.sum("podnet_dns_latency_seconds_bucket", pod=c, le="0.032768")
             - before.sum("podnet_dns_latency_seconds_bucket", pod=c, le="0.032768")
             - after.sum("podnet_dns_latency_seconds_bucket", pod=c, le="0.016384")
             + before.sum("podnet_dns_latency_seconds_bucket", pod=c, le="0.016384"))
    assert exact == 19
