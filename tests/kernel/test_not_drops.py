"""What the kernel frees with a drop reason but is not a drop of pod traffic.

- ping with a raw ICMP socket (root's ping, a container's with NET_RAW): ping_rcv() frees
  every echo reply no ping socket claims with NO_SOCKET, after the raw socket took its
  copy. A healthy pinging pod must show no drops (it fired PodNetDropsHigh in the demo).
- a capture's own copy (af_packet's PACKET_SOCK_ERROR when its socket is full): the packet
  went on; only the capture lost it.
Both are counted apart, in podnet_monitor_drops_excluded_total{why}, the replies against
the raw socket's and ping's own counts; a reply no socket at all took, and a datagram to a closed port, stay
NO_SOCKET drops, one each.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from podnetlab.lab import LabPod
from tests.kernel.support import (
    UDP_SENDER,
    Daemon,
    LabRun,
    Metrics,
    in_pod,
    lab_with_daemon,
)

EXCLUDED = "podnet_monitor_drops_excluded_total"

# Echo replies nobody asked for, sent with a raw socket, an optional gap (s) between them:
# the kernel computes an ICMPv6 checksum for a raw ICMPv6 socket; ICMP's is ours to compute.
ECHO_REPLIES = """
import socket, struct, sys, time
dst, count = sys.argv[1], int(sys.argv[2])
gap = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
v6 = ':' in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
for seq in range(count):
    body = struct.pack('!BBHHH', 129 if v6 else 0, 0, 0, 0x7e57, seq) + b'podnetmon' * 4
    if not v6:
        words = sum(struct.unpack('!%dH' % (len(body) // 2), body))
        while words >> 16:
            words = (words & 0xffff) + (words >> 16)
        body = body[:2] + struct.pack('!H', ~words & 0xffff) + body[4:]
    s.sendto(body, (dst, 0))
    time.sleep(gap)
print(count)
"""

# A raw ICMP socket that reads echo replies until stdin closes, then prints how many.
RAW_LISTENER = """
import select, socket, sys
v6 = sys.argv[1] == '6'
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
print('ready', flush=True)
seen = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        data = s.recv(4096)
        icmp = data if v6 else data[(data[0] & 15) * 4:]  # v4 raw sockets get the IP header
        seen += icmp[0] == (129 if v6 else 0)
    if sys.stdin in ready:
        break
print(seen, flush=True)
"""

# An af_packet socket on eth0 with the smallest receive buffer, never read: the copies
# af_packet makes for it overflow it (PACKET_SOCK_ERROR); PACKET_STATISTICS says how many.
FULL_CAPTURE = """
import socket, struct, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
s.bind(('eth0', 0))
print('ready', flush=True)
sys.stdin.read()
packets, drops = struct.unpack('II', s.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
print(drops, flush=True)
"""


@pytest.fixture(scope="module")
def env() -> Iterator[LabRun]:
    with lab_with_daemon(2) as run:  # no static neighbours: ARP and ND as a user has them
        yield run


def pod_drops(m: Metrics, *pods: LabPod) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for (name, label_set), value in m.samples.items():
        labels = dict(label_set)
        if name == "podnet_drops_total" and labels["pod"] in {p.name for p in pods}:
            out[(labels["pod"], labels["reason"])] = value
    return out


def spawn_with_stdin(pod: LabPod, *cmd: str) -> subprocess.Popen[str]:
    """A process in the pod that runs until its stdin is closed."""
    return subprocess.Popen([*pod.exec_prefix(), *cmd], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def settled(daemon: Daemon, seconds: float = 0.3) -> Metrics:
    time.sleep(seconds)  # a drop is counted where it happens: nothing is in flight after this
    return daemon.scrape()


def ping(src: LabPod, dst: str, count: int, *, datagram: bool) -> int:
    """Pings from src; returns how many replies ping says it received. ping uses a datagram
    ICMP socket where the netns' ping_group_range lets it, a raw one otherwise."""
    in_pod(src, "sysctl", "-qw", "net.ipv4.ping_group_range=" + ("0 2147483647" if datagram
                                                                  else "1 0"))
    out = in_pod(src, "ping", "-6" if ":" in dst else "-4", "-c", str(count), "-i", "0.01",
                 "-q", dst).stdout
    match = re.search(r"(\d+) received", out)
    assert match, out
    return int(match.group(1))


@pytest.fixture
def tcpdumps(env: LabRun) -> Iterator[None]:
    """Captures running where an SRE would run them: on both host veths and in a pod."""
    procs = [subprocess.Popen(["tcpdump", "-n", "-i", p.host_veth, "-w", "/dev/null"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for p in (env.a, env.b)]
    procs.append(subprocess.Popen([*env.b.exec_prefix(), "tcpdump", "-n", "-i", "eth0", "-w",
                                   "/dev/null"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
    try:
        for proc in procs:
            assert proc.stderr is not None
            assert "listening on" in proc.stderr.readline()
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def test_healthy_pings_are_no_drops_with_raw_or_datagram_sockets_v4_v6_under_tcpdump(
        env: LabRun, tcpdumps: None) -> None:
    a, b, daemon = env.a, env.b, env.daemon
    before = settled(daemon, 0)
    raw_replies = 0
    for datagram in (False, True):
        for src, dst in ((a, b), (b, a)):
            for address in (dst.ip, dst.ip6):
                received = ping(src, address, 40, datagram=datagram)
                assert received == 40, (src.name, address, datagram)
                raw_replies += 0 if datagram else received
    after = settled(daemon)
    assert pod_drops(after, a, b) == pod_drops(before, a, b)  # not one, of any reason
    # each reply a raw socket received was freed with NO_SOCKET: counted apart, exactly
    excluded = (after.sum(EXCLUDED, why="echo_reply_to_raw_socket")
                - before.sum(EXCLUDED, why="echo_reply_to_raw_socket"))
    assert excluded == raw_replies == 160


@pytest.mark.parametrize("family", ["4", "6"])
def test_an_echo_reply_is_a_drop_unless_a_socket_received_it(env: LabRun, family: str) -> None:
    a, b, daemon = env.a, env.b, env.daemon
    dst = b.ip if family == "4" else b.ip6
    before = settled(daemon, 0)
    in_pod(a, sys.executable, "-c", ECHO_REPLIES, dst, "9")  # b: no socket wants these
    middle = settled(daemon)
    assert (pod_drops(middle, b).get((b.name, "NO_SOCKET"), 0)
            - pod_drops(before, b).get((b.name, "NO_SOCKET"), 0)) == 9
    listener = spawn_with_stdin(b, sys.executable, "-c", RAW_LISTENER, family)
    assert listener.stdin is not None and listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    # now a raw socket takes them, spaced as ping spaces them: back to back, its reader can
    # free its copy before ping_rcv() frees the original (README: *What is not a drop*)
    in_pod(a, sys.executable, "-c", ECHO_REPLIES, dst, "11", "0.005")
    time.sleep(0.3)
    listener.stdin.close()
    got = int(listener.stdout.readline())
    assert listener.wait(timeout=10) == 0
    after = settled(daemon)
    assert got == 11
    assert pod_drops(after, b) == pod_drops(middle, b)
    assert (after.sum(EXCLUDED, why="echo_reply_to_raw_socket")
            - middle.sum(EXCLUDED, why="echo_reply_to_raw_socket")) == got


def test_a_closed_port_stays_one_no_socket_drop_each_under_tcpdump(
        env: LabRun, tcpdumps: None) -> None:
    a, b, daemon = env.a, env.b, env.daemon
    before = settled(daemon, 0)
    no_ports = _udp_no_ports(b)
    sent = int(in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", "23", "16").stdout)
    sent += int(in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip6, "9", "19", "16").stdout)
    after = settled(daemon)
    assert sent == 42 == _udp_no_ports(b) - no_ports
    assert (pod_drops(after, b).get((b.name, "NO_SOCKET"), 0)
            - pod_drops(before, b).get((b.name, "NO_SOCKET"), 0)) == sent


def test_a_full_captures_lost_copies_are_not_the_pods_drops(env: LabRun) -> None:
    a, b, daemon = env.a, env.b, env.daemon
    capture = spawn_with_stdin(b, sys.executable, "-c", FULL_CAPTURE)
    assert capture.stdin is not None and capture.stdout is not None
    assert capture.stdout.readline().strip() == "ready"
    before = settled(daemon, 0)
    received = ping(a, b.ip, 60, datagram=True)
    capture.stdin.close()
    lost = int(capture.stdout.readline())
    assert capture.wait(timeout=10) == 0
    after = settled(daemon)
    assert received == 60 and lost >= 100  # most of the requests and replies: not b's drops
    assert pod_drops(after, a, b) == pod_drops(before, a, b)
    # Not every lost copy is seen: a copy of a received packet is the shared skb itself
    # (deliver_skb() takes a reference), and freeing a shared skb drops that reference
    # without the tracepoint. The copies of what b sent are clones of their own.
    excluded = (after.sum(EXCLUDED, why="packet_socket_copy")
                - before.sum(EXCLUDED, why="packet_socket_copy"))
    assert 60 <= excluded <= lost


def _udp_no_ports(pod: LabPod) -> int:
    total = 0
    for path, prefix in (("/proc/net/snmp", "Udp:"), ("/proc/net/snmp6", "Udp6NoPorts")):
        lines = in_pod(pod, "cat", path).stdout.splitlines()
        if prefix == "Udp:":
            names, values = [ln.split() for ln in lines if ln.startswith(prefix)][:2]
            total += int(values[names.index("NoPorts")])
        else:
            total += int(next(ln.split()[1] for ln in lines if ln.startswith(prefix)))
    return total


def test_what_was_excluded_is_waited_for_not_raced(env: LabRun) -> None:
    """The exclusion reads a live second reference to the reply's data: a raw socket's
    queued copy. Flooding keeps the reader busy on the other CPU, the likeliest way for it
    to free its copy before the original is freed; not one reply may count as a drop."""
    a, b, daemon = env.a, env.b, env.daemon
    in_pod(a, "sysctl", "-qw", "net.ipv4.ping_group_range=1 0")
    before = settled(daemon, 0)
    out = in_pod(a, "ping", "-f", "-c", "3000", "-q", b.ip).stdout
    match = re.search(r"(\d+) received", out)
    assert match, out
    received = int(match.group(1))
    after = settled(daemon)
    assert pod_drops(after, a, b) == pod_drops(before, a, b)
    assert (after.sum(EXCLUDED, why="echo_reply_to_raw_socket")
            - before.sum(EXCLUDED, why="echo_reply_to_raw_socket")) == received == 3000


# Datagrams to an IPv6 link-local multicast group, out of eth0; with "join", a socket in
# the pod that joined the group and reads what comes until stdin closes, printing the count.
MULTICAST_SEND = """
import socket, sys
group, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"anyone in the group?", (group, 4242, 0, socket.if_nametoindex("eth0")))
"""
MULTICAST_JOIN = """
import select, socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 4242))
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
             socket.inet_pton(socket.AF_INET6, sys.argv[1]) +
             struct.pack("@I", socket.if_nametoindex("eth0")))
print("ready", flush=True)
seen = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        s.recv(2048)
        seen += 1
    if sys.stdin in ready:
        break
print(seen, flush=True)
"""


def multicast_in(pod: LabPod) -> int:
    """The pod's Ip6InMcastPkts: multicast that reached ip6_mc_input, joined or not."""
    snmp6 = in_pod(pod, "cat", "/proc/net/snmp6").stdout
    match = re.search(r"^Ip6InMcastPkts\s+(\d+)$", snmp6, re.M)
    assert match, snmp6
    return int(match.group(1))


def test_multicast_to_a_group_the_pod_did_not_join_is_no_drop(env: LabRun) -> None:
    """A bridge floods every pod's MLD reports (and any link-local multicast) to every
    other pod, whose ip6_mc_input() frees what no socket there joined with no reason:
    beside a pod that starts, every pod on the bridge showed NOT_SPECIFIED drops."""
    a, b, daemon = env.a, env.b, env.daemon
    group = "ff02::4242"  # joined by nobody
    time.sleep(2)  # the pods' own joins' MLD reports (sent twice at start) are over
    before, heard = settled(daemon, 0), multicast_in(b)
    in_pod(a, sys.executable, "-c", MULTICAST_SEND, group, "40")
    after = settled(daemon)
    assert multicast_in(b) - heard == 40  # the kernel's count: b heard all 40
    assert pod_drops(after, b) == pod_drops(before, b)
    assert (after.sum(EXCLUDED, why="multicast_not_joined") -
            before.sum(EXCLUDED, why="multicast_not_joined")) == 40

    # joined, the same datagrams are delivered: nothing freed, nothing excluded
    member = spawn_with_stdin(b, sys.executable, "-c", MULTICAST_JOIN, group)
    assert member.stdin is not None and member.stdout is not None
    try:
        assert member.stdout.readline().strip() == "ready"
        time.sleep(2)  # the join's own MLD reports reach a, not b
        before = settled(daemon, 0)
        in_pod(a, sys.executable, "-c", MULTICAST_SEND, group, "40")
        after = settled(daemon)
        member.stdin.close()
        assert member.stdout.readline().strip() == "40"
    finally:
        member.wait(timeout=10)
    assert pod_drops(after, b) == pod_drops(before, b)
    assert after.sum(EXCLUDED, why="multicast_not_joined") == before.sum(
        EXCLUDED, why="multicast_not_joined")
