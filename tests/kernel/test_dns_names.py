"""Which DNS names fail: podnet_dns_name_failures_total against what the client was answered.

tests/kernel/dnstools.py's server answers by the name's first label (ok: NOERROR, nx:
NXDOMAIN, fail: SERVFAIL, drop: never) and its client prints every answer it got: the
independent count. Names are asked in a fixed mix, IPv4 and IPv6, in mixed case; then
a flood of malformed questions whose answers fail: each counts once, under a name the
daemon marks cut ("~"), and the programs (the verifier's) are untroubled.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from podnetlab.lab import LabPod
from tests.kernel.dnstools import CLIENT, SERVER
from tests.kernel.support import Daemon, Metrics, in_pod, lab_with_daemon, spawn_in_pod

# 0.3 s: the client waits 0.5 s for an answer, then goes on; the sweep runs every 0.1 s
ARGS = ("--dns-timeout", "0.3", "--sweep-interval", "0.1")


@dataclass
class Env:
    daemon: Daemon
    client: LabPod
    dns: LabPod


@pytest.fixture
def env() -> Iterator[Env]:
    with lab_with_daemon(2, *ARGS, neighbours=True) as run:
        client, dns = run.pods
        server = spawn_in_pod(dns, sys.executable, "-c", SERVER, "0.01")
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "up"
            yield Env(run.daemon, client, dns)
        finally:
            server.kill()
            server.wait()


def _failures(m: Metrics, pod: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in m.samples.items():
        d = dict(labels)
        if name == "podnet_dns_name_failures_total" and d["pod"] == pod:
            out[(d["qname"], d["rcode"])] = value
    return out


def _ask(env: Env, server: str, names: list[str]) -> dict[str, int]:
    out = json.loads(in_pod(env.client, sys.executable, "-c", CLIENT, server, *names).stdout)
    return {str(k): int(v) for k, v in out["answers"].items()}


def test_failing_names_are_counted_exactly_by_name_and_rcode(env: Env) -> None:
    names4 = (["nx-a.shop.svc"] * 5 + ["fail-b.db.example"] * 4 + ["ok-c.example"] * 6
              + ["drop-d.example"] * 2 + ["nx-a.SHOP.Svc"] * 2)
    names6 = ["nx-e.example"] * 3 + ["drop-f.example"]
    got4, got6 = _ask(env, env.dns.ip, names4), _ask(env, env.dns.ip6, names6)
    # the client's own count: what the server answered, and what it never did
    assert got4 == {"3": 7, "2": 4, "0": 6, "timeout": 2}
    assert got6 == {"3": 3, "timeout": 1}

    def seen() -> dict[tuple[str, str], float]:
        return _failures(env.daemon.scrape(), env.client.name)

    expected = {("nx-a.shop.svc", "NXDOMAIN"): 7, ("fail-b.db.example", "SERVFAIL"): 4,
                ("drop-d.example", "timeout"): 2, ("nx-e.example", "NXDOMAIN"): 3,
                ("drop-f.example", "timeout"): 1}
    failures = seen()
    assert failures == expected, failures  # names lower-cased: nx-a's two spellings are one
    m = env.daemon.scrape()
    # per RCODE they sum to the pod's own counts (all since this daemon started)
    assert m.sum("podnet_dns_responses_total", pod=env.client.name, rcode="NXDOMAIN") == 10
    assert m.sum("podnet_dns_timeouts_total", pod=env.client.name) == 3


def _malformed(seq: int) -> bytes:
    """A query whose first label is "nx" (so the server answers NXDOMAIN, echoing the
    question) and whose name then goes wrong in one of four ways."""
    header = struct.pack(">HHHHHH", seq, 0x0100, 1, 0, 0, 0)
    tails = [b"\xc0\x0c",                      # a compression pointer, looping to the header
             b"\x50" + b"z" * 10,              # a label longer than 63
             b"\x3f" + b"y" * 20,              # a label cut short by the end of the packet
             b"\x3f" + b"w" * 63 + b"\x3f" + b"v" * 63 + b"\0"]  # longer than 63 characters
    return header + b"\x02nx" + tails[seq % 4]


FLOOD = r"""
import socket, sys
server = sys.argv[1]
payloads = [bytes.fromhex(h) for h in sys.argv[2:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
answered = 0
for p in payloads:
    s.sendto(p, (server, 53))
    try:
        s.recv(2048)
        answered += 1
    except socket.timeout:
        pass
print(answered)
"""


def test_a_malformed_name_flood_counts_each_once_under_a_cut_name(env: Env) -> None:
    payloads = [_malformed(i) for i in range(200)]
    answered = int(in_pod(env.client, sys.executable, "-c", FLOOD, env.dns.ip,
                          *(p.hex() for p in payloads)).stdout)
    assert answered == 200
    failures = _failures(env.daemon.scrape(), env.client.name)
    # each ends in a name marked cut ("~"): where a pointer or an overlong length stopped
    # it, where the packet ended, or where the kernel's 64-byte copy of the question did
    # (4 bytes of "\x02nx\x3f", then 60 of the long label); each NXDOMAIN, counted once
    assert failures == {("nx~", "NXDOMAIN"): 100, ("nx." + "y" * 20 + "~", "NXDOMAIN"): 50,
                        ("nx." + "w" * 59 + "~", "NXDOMAIN"): 50}, failures
    assert _ask(env, env.dns.ip, ["nx-after.flood"]) == {"3": 1}  # and the probe carries on
    assert _failures(env.daemon.scrape(), env.client.name)[("nx-after.flood", "NXDOMAIN")] == 1


def test_dns_top_bounds_the_names_and_the_rest_is_other() -> None:
    with lab_with_daemon(2, *ARGS, "--dns-top", "2", neighbours=True) as run:
        client, dns = run.pods
        server = spawn_in_pod(dns, sys.executable, "-c", SERVER, "0.005")
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "up"
            names = [f"nx-{i}.example" for i in range(40) for _ in range(1 + i % 3)]
            out = json.loads(in_pod(client, sys.executable, "-c", CLIENT, dns.ip,
                                    *names).stdout)
            assert out["answers"] == {"3": len(names)}
            failures = _failures(run.daemon.scrape(), client.name)
            assert len(failures) <= 3, failures  # two names and _other
            assert ("_other", "NXDOMAIN") in failures
            assert sum(failures.values()) == len(names)
        finally:
            server.kill()
            server.wait()
