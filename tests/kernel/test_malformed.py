"""Crafted odd and malformed packets through a lab veth: counts stay exact, nothing breaks.

Each frame is built with scapy inside the sending pod and written straight to
its eth0, with the protocol class podnetmon must give it (an independent
expectation: what was sent), so the test checks classification as well as
the totals against the veth's own statistics.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator

import pytest

from podnetlab.lab import LabPod
from tests.kernel.support import (
    ON_ONE_HOOK,
    Daemon,
    in_pod,
    lab_with_daemon,
    our_programs,
    quiet_window,
)

# (scapy expression, protocol class). `dst` is the receiver's MAC, `a`/`b` the pods'
# IPv4 and `a6`/`b6` their IPv6 addresses; L2 source is the sender's own.
FRAMES: list[tuple[str, str]] = [
    ("Ether(dst=dst)/IP(src=a,dst=b,options=[IPOption_RR(routers=['1.2.3.4'])])/UDP(dport=9999)/b'opt'",
     "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b,ihl=15,options=[IPOption_NOP()]*40)/TCP(dport=1,flags='S')",
     "tcp"),
    ("Ether(dst=dst)/IP(src=a,dst=b,ihl=3)/UDP(dport=9)", "udp"),
    ("Ether(bytes(Ether(dst=dst)/IP(src=a,dst=b)/TCP(dport=80))[:14 + 12])", "other"),
    ("Ether(dst=dst)/IP(src=a,dst=b,flags='MF',frag=0,proto=17)/bytes(UDP(dport=9)/(b'x'*40))[:24]",
     "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b,frag=3,proto=17)/(b'y'*30)", "udp"),
    ("Ether(dst=dst)/IPv6(src=a6,dst=b6)/IPv6ExtHdrHopByHop()/IPv6ExtHdrDestOpt()"
     "/IPv6ExtHdrRouting()/TCP(dport=22,flags='S')", "tcp"),
    ("Ether(dst=dst)/IPv6(src=a6,dst=b6)" + "/IPv6ExtHdrDestOpt()" * 7 + "/UDP(dport=9)", "other"),
    ("Ether(dst=dst)/IPv6(src=a6,dst=b6)/IPv6ExtHdrFragment(offset=10,nh=17)/(b'z'*16)", "udp"),
    ("Ether(dst=dst)/IPv6(src=a6,dst=b6)/IPv6ExtHdrFragment(offset=0,m=1)/UDP(dport=9)/(b'z'*16)",
     "udp"),
    # cut inside an extension header that says UDP follows: classified by what it says
    ("Ether(bytes(Ether(dst=dst)/IPv6(src=a6,dst=b6)/IPv6ExtHdrDestOpt(len=20)/UDP())[:14 + 40 + 4])",
     "udp"),
    ("Ether(dst=dst)/IPv6(src=a6,dst=b6)/ICMPv6EchoRequest()", "icmp"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/TCP(dport=80,dataofs=0,flags='S')", "tcp"),
    ("Ether(bytes(Ether(dst=dst)/IP(src=a,dst=b)/TCP(dport=80))[:14 + 20 + 10])", "tcp"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/UDP(sport=3333,dport=53)/b'short'", "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/UDP(sport=3334,dport=53)/(b'\\x12\\x34\\x01\\x00\\xff\\xff\\xff\\xff"
     "\\xff\\xff\\xff\\xff' + b'\\xc0\\x0c' * 8)", "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/UDP(sport=53,dport=3335)/(b'\\x56\\x78\\x81\\x83' + b'\\0' * 8)",
     "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/UDP(dport=9,len=8)", "udp"),
    ("Ether(dst=dst,type=0x88b5)/(b'\\0' * 46)", "other"),
    # the kernel takes the tag out of the frame before TC sees it: an IPv4 datagram
    ("Ether(dst=dst)/Dot1Q(vlan=7)/IP(src=a,dst=b)/UDP(dport=9)", "udp"),
    ("Ether(dst=dst)/IP(src=a,dst=b,proto=132)/(b'\\0' * 12)", "other"),
    ("Ether(dst=dst)/IP(src=a,dst=b)/ICMP(type=250,code=9)", "icmp"),
]

SENDER = """
import json, sys
from scapy.all import *  # noqa
dst, a, b, a6, b6 = sys.argv[1:6]
frames = [eval(expr) for expr in json.loads(sys.argv[6])]
sendp(frames, iface="eth0", verbose=False)
print(len(frames))
"""


@pytest.fixture(scope="module")
def pods() -> Iterator[tuple[LabPod, LabPod, Daemon]]:
    # full neighbour caches: no ARP or ND exchange mixes with the frames
    with lab_with_daemon(2, neighbours=True) as run:
        yield run.pods[0], run.pods[1], run.daemon


def _mac(pod: LabPod) -> str:
    out = in_pod(pod, "ip", "-j", "link", "show", "eth0").stdout
    return str(json.loads(out)[0]["address"])


def _ours(w: object, pod: LabPod, **labels: str) -> int:
    return int(w.metrics.sum("podnet_packets_total", pod=pod.name, **labels))  # type: ignore[attr-defined]


def test_malformed_frames_counted_exactly_and_classified(pods: tuple[LabPod, LabPod, Daemon]) -> None:
    a, b, daemon = pods
    before = quiet_window(daemon, [a, b])
    dns_before = daemon.scrape()
    rounds = 3
    for _ in range(rounds):
        out = in_pod(a, sys.executable, "-c", SENDER, _mac(b), a.ip, b.ip, a.ip6, b.ip6,
                     json.dumps([expr for expr, _cls in FRAMES]))
        assert int(out.stdout) == len(FRAMES)
    after = quiet_window(daemon, [a, b])
    for pod in (a, b):
        for direction, stat in (("egress", "rx_packets"), ("ingress", "tx_packets")):
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            ours = _ours(after, pod, direction=direction) - _ours(before, pod, direction=direction)
            assert ours == kernel, (pod.name, direction)
        for direction, stat in (("egress", "rx_bytes"), ("ingress", "tx_bytes")):
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            ours = (int(after.metrics.sum("podnet_bytes_total", pod=pod.name, direction=direction))
                    - int(before.metrics.sum("podnet_bytes_total", pod=pod.name,
                                             direction=direction)))
            assert ours == kernel, (pod.name, direction, "bytes")
    sent = Counter(cls for _expr, cls in FRAMES)
    for cls in ("tcp", "udp", "icmp", "other"):
        ours = (_ours(after, a, direction="egress", protocol=cls)
                - _ours(before, a, direction="egress", protocol=cls))
        assert ours == rounds * sent[cls], cls
    # DNS: only the datagram with a whole 12-byte header to port 53 is a query; the
    # compression loop and the bogus counts in it are never read. The unsolicited
    # "answer" from port 53 matches no query and counts nothing.
    dns_after = daemon.scrape()
    queries = (dns_after.sum("podnet_dns_queries_total", pod=a.name)
               - dns_before.sum("podnet_dns_queries_total", pod=a.name))
    assert queries == rounds
    for pod in (a, b):
        assert dns_after.sum("podnet_dns_responses_total", pod=pod.name) == \
            dns_before.sum("podnet_dns_responses_total", pod=pod.name)
    assert daemon.get("/healthz")[0] == 200
    assert daemon.proc.poll() is None
    assert set(our_programs(a.host_veth)) in ON_ONE_HOOK  # still attached
