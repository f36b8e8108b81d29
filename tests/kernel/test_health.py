"""Drops with the kernel's reason, TCP retransmits and flags: each against an independent count."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podnetlab.lab import LabPod
from tests.kernel.foreign import ForeignPrograms
from tests.kernel.support import (
    UDP_SENDER,
    Daemon,
    Metrics,
    drop_keys,
    in_pod,
    lab_with_daemon,
    nft_counter,
    nft_in_pod,
    spawn_in_pod,
    wait_for,
)


@dataclass
class Env:
    a: LabPod
    b: LabPod
    daemon: Daemon


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with lab_with_daemon(2, neighbours=True) as run:
        yield Env(run.pods[0], run.pods[1], run.daemon)


def drops(m: Metrics, pod: LabPod, reason: str) -> int:
    return int(m.sum("podnet_drops_total", namespace=pod.namespace, pod=pod.name, reason=reason))


def test_netfilter_drop_equals_the_nft_counter(env: Env) -> None:
    a, b = env.a, env.b
    nft_in_pod(b, f"""
table inet pnmtest {{
  chain input {{
    type filter hook input priority 0;
    ip saddr {a.ip} udp dport 7777 counter drop comment "dropped"
  }}
}}""")
    before = env.daemon.scrape()
    in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "7777", "37", "32")
    counted = nft_counter(b, "pnmtest", "dropped")
    assert counted == 37
    wait_for(lambda: drops(env.daemon.scrape(), b, "NETFILTER_DROP")
             - drops(before, b, "NETFILTER_DROP") >= counted, timeout=3)
    after = env.daemon.scrape()
    assert drops(after, b, "NETFILTER_DROP") - drops(before, b, "NETFILTER_DROP") == counted
    assert drops(after, a, "NETFILTER_DROP") == drops(before, a, "NETFILTER_DROP")
    # The netns inode the kernel side saw is the one `stat` gives for the pod's netns.
    netns_keys = {ident for kind, ident, _reason, _n in drop_keys() if kind == 1}
    assert os.stat(b.netns_path).st_ino in netns_keys
    assert netns_keys <= {os.stat(p.netns_path).st_ino for p in (a, b)}


def test_udp_to_a_closed_port_is_no_socket_per_datagram(env: Env) -> None:
    a, b = env.a, env.b
    before = env.daemon.scrape()
    sent = int(in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", "41", "16").stdout)
    assert sent == 41
    wait_for(lambda: drops(env.daemon.scrape(), b, "NO_SOCKET")
             - drops(before, b, "NO_SOCKET") >= sent, timeout=3)
    time.sleep(0.2)
    after = env.daemon.scrape()
    assert drops(after, b, "NO_SOCKET") - drops(before, b, "NO_SOCKET") == sent


def test_drop_by_a_tc_program_on_the_veth_goes_to_that_pod(env: Env) -> None:
    a, b = env.a, env.b
    shooter = ForeignPrograms(verdict="TC_ACT_SHOT")
    try:
        before = env.daemon.scrape()
        shooter.attach_tc(b.host_veth, prio=50, hooks=("egress",))  # what b would receive
        in_pod(a, "ping", "-c", "13", "-i", "0.01", "-W", "1", b.ip, check=False)
        shot = shooter.counts()[1]
    finally:
        shooter.close()
    assert shot >= 13
    wait_for(lambda: drops(env.daemon.scrape(), b, "TC_EGRESS")
             - drops(before, b, "TC_EGRESS") >= shot, timeout=3)
    after = env.daemon.scrape()
    assert drops(after, b, "TC_EGRESS") - drops(before, b, "TC_EGRESS") == shot
    ifindex = int(Path(f"/sys/class/net/{b.host_veth}/ifindex").read_text())
    assert any(kind == 2 and ident == ifindex for kind, ident, _r, _n in drop_keys())


def test_drops_of_no_pod_count_under_the_node(env: Env) -> None:
    before = env.daemon.scrape()
    # A UDP datagram to a closed port on the host's loopback: the host's, no pod's.
    subprocess.run([sys.executable, "-c", UDP_SENDER, "127.0.0.1", "9", "5", "8"], check=True)
    node = env.daemon.scrape
    wait_for(lambda: node().sum("podnet_drops_total", namespace="_node", reason="NO_SOCKET")
             - before.sum("podnet_drops_total", namespace="_node", reason="NO_SOCKET") >= 5,
             timeout=3)


def _retrans_segs(pod: LabPod) -> int:
    out = in_pod(pod, "nstat", "-asz", "TcpRetransSegs").stdout
    for line in out.splitlines():
        if line.startswith("TcpRetransSegs"):
            return int(line.split()[1])
    return 0


def test_retransmits_equal_tcp_retrans_segs_under_loss(env: Env) -> None:
    sender, receiver = env.a, env.b
    # 3 % of what reaches the receiver's iperf3 port is dropped: the sender retransmits.
    nft_in_pod(receiver, """
table inet pnmloss {
  chain input {
    type filter hook input priority 0;
    tcp dport 5201 numgen random mod 100 < 3 counter drop comment "loss"
  }
}""")
    server = spawn_in_pod(receiver, "iperf3", "-s", "-1")
    try:
        time.sleep(0.3)
        before, segs_before = env.daemon.scrape(), _retrans_segs(sender)
        in_pod(sender, "iperf3", "-c", receiver.ip, "-t", "2", "-b", "200M")
        server.wait(timeout=30)
        time.sleep(1.5)  # let the last retransmits and the FIN exchange finish
        after, segs_after = env.daemon.scrape(), _retrans_segs(sender)
    finally:
        server.kill()
        in_pod(receiver, "nft", "delete", "table", "inet", "pnmloss")
    kernel = segs_after - segs_before
    ours = (after.sum("podnet_tcp_retransmits_total", pod=sender.name)
            - before.sum("podnet_tcp_retransmits_total", pod=sender.name))
    assert kernel > 10, "the induced loss caused no retransmits"
    assert ours == kernel


def _capture_flags(pcap: Path, pod: LabPod) -> Counter[tuple[str, str]]:
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "tcp", "-T", "fields", "-e", "ip.src",
                          "-e", "ipv6.src", "-e", "tcp.flags"], capture_output=True, text=True,
                         check=True).stdout
    counts: Counter[tuple[str, str]] = Counter()
    for line in out.splitlines():
        src4, src6, flags_hex = [*line.split("\t"), "", "", ""][:3]
        direction = "egress" if pod.ip in (src4, src6) or pod.ip6 == src6 else "ingress"
        flags = int(flags_hex, 16)
        if flags & 0x02:
            counts[(direction, "synack" if flags & 0x10 else "syn")] += 1
        if flags & 0x04:
            counts[(direction, "rst")] += 1
        if flags & 0x01:
            counts[(direction, "fin")] += 1
    return counts


def test_tcp_flags_equal_a_capture(env: Env, tmp_path: Path) -> None:
    a, b = env.a, env.b
    pcap = tmp_path / "flags.pcap"
    # --immediate-mode: without it libpcap hands packets over in ring blocks, and a
    # block not yet retired when tcpdump is stopped is never written.
    dump = subprocess.Popen(["tcpdump", "-i", a.host_veth, "-w", str(pcap), "-U", "-n", "-Z", "root",
                             "--immediate-mode"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert dump.stderr is not None
    assert "listening" in dump.stderr.readline()
    server = spawn_in_pod(b, sys.executable, "-c",
                          "import socket\ns=socket.create_server(('::',8080),family=socket.AF_INET6,"
                          "dualstack_ipv6=True)\nprint('up',flush=True)\n"
                          "for _ in range(10):\n  c,_=s.accept(); c.recv(100); c.close()")
    assert server.stdout is not None and server.stdout.readline().strip() == "up"
    before = env.daemon.scrape()
    client = ("import socket,sys\nfor host in sys.argv[1:]:\n"
              "  for port in (8080, 8081):\n"
              "    try:\n      c=socket.create_connection((host,port),timeout=2); c.send(b'hi');"
              " c.close()\n    except OSError: pass\n")
    for _ in range(3):
        in_pod(a, sys.executable, "-c", client, b.ip, b.ip6)
    time.sleep(0.5)
    after = env.daemon.scrape()
    dump.terminate()
    _out, dump_err = dump.communicate(timeout=10)
    server.kill()
    expected = _capture_flags(pcap, a)
    assert "0 packets dropped by kernel" in dump_err
    assert expected[("egress", "syn")] >= 12 and expected[("ingress", "rst")] >= 6
    for direction in ("egress", "ingress"):
        for flag in ("syn", "synack", "rst", "fin"):
            ours = (after.sum("podnet_tcp_flags_total", pod=a.name, direction=direction, flag=flag)
                    - before.sum("podnet_tcp_flags_total", pod=a.name, direction=direction,
                                 flag=flag))
            assert ours == expected[(direction, flag)], (direction, flag, ours, expected)
    # the refused attempts (port 8081) were answered by RST: failed client attempts
    failures = (after.sum("podnet_tcp_connect_failures_total", pod=a.name, role="client",
                          reason="reset")
                - before.sum("podnet_tcp_connect_failures_total", pod=a.name, role="client",
                             reason="reset"))
    assert failures == expected[("ingress", "rst")] == 6
    refused = (after.sum("podnet_tcp_connect_failures_total", pod=b.name, role="server",
                         reason="reset")
               - before.sum("podnet_tcp_connect_failures_total", pod=b.name, role="server",
                            reason="reset"))
    assert refused == 6
