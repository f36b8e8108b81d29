"""Who a pod talks to: podnet_peer_* against a capture of the same veth, and its statistics.

One client pod talks to a pod of another workload (ICMP v4 and v6, TCP), a pod of a third
(UDP), the node (an address of the host), an external address (through the delay line's
router, so it leaves the lab's subnet) and an address in the cluster CIDR that nobody
holds. tcpdump on the client's host veth is the oracle: every frame's length, summed by
direction and by the identity the test itself gives each address, must equal the
daemon's peer series; and the series of each direction sum to the veth's own statistics.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from podnetlab.lab import Lab, LabPod
from tests.fakeapi import FakeApiServer, make_pod, make_service
from tests.kernel.support import (
    INNER_IP,
    ROOT,
    UDP_SENDER,
    Daemon,
    Metrics,
    delay_line,
    in_pod,
    quiet_window,
    spawn_in_pod,
    wait_for,
)

HOST_V4 = "10.213.255.254"  # given to the lab's bridge here (which has no IPv6, on purpose)
NOBODY = "10.213.9.9"  # inside the cluster CIDR, held by no pod
CIDRS = ("--cluster-cidrs", "10.213.0.0/16,fd00:213::/64")
PEER_LABELS = ("peer_kind", "peer_namespace", "peer_workload")


def _inventory(pods: list[LabPod], workloads: list[tuple[str, str]], path: Path) -> str:
    """The lab's pods under workloads of their own (the lab's names them all `lab`)."""
    entries = [{"uid": p.uid, "namespace": "shop", "name": p.name,
                "owner": {"kind": kind, "name": name}}
               for p, (kind, name) in zip(pods, workloads, strict=True)]
    path.write_text(yaml.safe_dump({"pods": entries}))
    return str(path)


@contextmanager
def host_addresses() -> Iterator[None]:
    """The node's own addresses on the lab's bridge: a peer that is this node."""
    subprocess.run(["ip", "addr", "add", f"{HOST_V4}/16", "dev", "pnmlab0"], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "addr", "del", f"{HOST_V4}/16", "dev", "pnmlab0"],
                       capture_output=True, check=False)


def _permanent_neighbour(pod: LabPod, ip: str, mac: str) -> None:
    """No ARP or ND inside a counting window: they would be frames to no peer's address."""
    in_pod(pod, "ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0", "nud", "permanent")


def _peers(m: Metrics, pod: str, metric: str = "podnet_peer_bytes_total"
           ) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for (name, labels), value in m.samples.items():
        d = dict(labels)
        if name == metric and d["pod"] == pod:
            key = (d["direction"], *(d[k] for k in PEER_LABELS))
            out[key] = out.get(key, 0) + value
    return out


def _capture_by_peer(path: Path, own_mac: str, identity: dict[str, tuple[str, str, str]]
                     ) -> tuple[dict[tuple[str, ...], int], list[str]]:
    """Bytes by (direction, peer identity) from tshark, and the frames no identity took."""
    # occurrence=f: the outer header's addresses (an ICMP error quotes the inner ones too)
    rows = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "occurrence=f",
                           "-e", "eth.src",
                           "-e", "ip.src", "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst",
                           "-e", "frame.len"], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    out: dict[tuple[str, ...], int] = {}
    strays = []
    for row in rows:
        src_mac, src4, dst4, src6, dst6, length = row.split("\t")
        egress = src_mac == own_mac
        far = (dst4 or dst6) if egress else (src4 or src6)
        peer = identity.get(far) if far else ("unknown", "", "")  # not IP: unknown
        if peer is None:
            strays.append(row)
            continue
        key = ("egress" if egress else "ingress", *peer)
        out[key] = out.get(key, 0) + int(length)
    return out, strays


def _mac(pod: LabPod) -> str:
    return str(json.loads(in_pod(pod, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"])


def test_peer_series_equal_a_capture_by_address_and_sum_to_the_veth(
        lab: Lab, daemons: list[Daemon], tmp_path: Path) -> None:
    client, web, db, router = lab.up(4)
    inventory = _inventory([client, web, db, router],
                           [("Deployment", "client"), ("Deployment", "web"),
                            ("StatefulSet", "db"), ("Deployment", "router")],
                           tmp_path / "inventory.yaml")
    daemon = Daemon(*CIDRS, "--node-name", "lab-node", inventory=inventory)
    daemons.append(daemon)
    macs = {p.name: _mac(p) for p in (client, web, db, router)}
    for other in (web, db, router):
        for mine, theirs in ((client.ip, other.ip), (client.ip6, other.ip6)):
            _permanent_neighbour(client, theirs, macs[other.name])
            _permanent_neighbour(other, mine, macs[client.name])
    bridge_mac = Path("/sys/class/net/pnmlab0/address").read_text().strip()
    _permanent_neighbour(client, HOST_V4, bridge_mac)
    with host_addresses(), delay_line(client, router, 5):
        in_pod(client, "ip", "route", "add", f"{NOBODY}/32", "via", HOST_V4)
        in_pod(client, "ping", "-c", "1", "-W", "2", INNER_IP)  # the route works
        capture = tmp_path / "client.pcap"
        dump = subprocess.Popen(["tcpdump", "-i", client.host_veth, "-w", str(capture),
                                 "-s", "128", "-U", "-n", "-Z", "root", "--immediate-mode"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert dump.stderr is not None and "listening" in dump.stderr.readline()
        before = quiet_window(daemon, [client])
        in_pod(client, "ping", "-c", "20", "-i", "0.01", "-q", web.ip)
        in_pod(client, "ping", "-c", "10", "-i", "0.01", "-q", web.ip6)
        in_pod(client, "ping", "-c", "7", "-i", "0.01", "-q", HOST_V4)
        in_pod(client, "ping", "-c", "5", "-i", "0.05", "-q", INNER_IP)
        in_pod(client, "ping", "-c", "3", "-i", "0.01", "-W", "1", NOBODY, check=False)
        in_pod(client, sys.executable, "-c", UDP_SENDER, db.ip, "9", "300", "200")
        sink = spawn_in_pod(web, "iperf3", "-s", "-1")
        time.sleep(0.3)
        in_pod(client, "iperf3", "-c", web.ip, "-t", "1", "-b", "200M")
        sink.wait(timeout=30)
        after = quiet_window(daemon, [client])
        time.sleep(0.3)
        dump.terminate()
        _out, err = dump.communicate(timeout=10)
        assert "0 packets dropped by kernel" in err, err
    web_id, db_id = ("pod", "shop", "web"), ("pod", "shop", "db")
    identity = {web.ip: web_id, web.ip6: web_id, db.ip: db_id,
                HOST_V4: ("node", "", "lab-node"),
                INNER_IP: ("external", "", ""), NOBODY: ("unknown", "", "")}
    expected, strays = _capture_by_peer(capture, macs[client.name], identity)
    assert not strays, strays
    got = {k: after_v - _peers(before.metrics, client.name).get(k, 0)
           for k, after_v in _peers(after.metrics, client.name).items()}
    got = {k: v for k, v in got.items() if v}
    assert got == expected, (got, expected)
    # every kind met, and the sums are the veth's own, both ways
    assert {k[1] for k in got} == {"pod", "node", "external", "unknown"}
    for direction, stat in (("egress", "rx_bytes"), ("ingress", "tx_bytes")):
        ours = sum(v for k, v in got.items() if k[0] == direction)
        kernel = after.stats[client.host_veth][stat] - before.stats[client.host_veth][stat]
        assert ours == kernel, (direction, ours, kernel)
    packets = _peers(after.metrics, client.name, "podnet_peer_packets_total")
    for direction in ("egress", "ingress"):
        assert sum(v for k, v in packets.items() if k[0] == direction) == after.metrics.sum(
            "podnet_packets_total", pod=client.name, direction=direction)


def test_a_thousand_external_addresses_are_one_series_and_an_idle_peer_goes(
        lab: Lab, daemons: list[Daemon]) -> None:
    """Addresses that resolve to one identity are one series (the thousand outside the
    cluster are `external`), exactly summed; a peer idle for --peer-ttl loses its series
    and its bytes join `_other`. (Bounding by --peer-top among a thousand identities is
    in the cluster test, where the API names them.)"""
    client, sink = lab.up(2)
    daemon = Daemon(*CIDRS, "--peer-top", "10", "--peer-ttl", "4", "--peer-interval", "1",
                    inventory=str(lab.inventory))
    daemons.append(daemon)
    bridge_mac = Path("/sys/class/net/pnmlab0/address").read_text().strip()
    _permanent_neighbour(client, HOST_V4, bridge_mac)
    _permanent_neighbour(client, sink.ip, _mac(sink))
    _permanent_neighbour(sink, client.ip, _mac(client))
    with host_addresses():
        in_pod(client, "ip", "route", "add", "10.214.0.0/16", "via", HOST_V4)
        targets = " ".join(f"10.214.{i // 250}.{i % 250 + 1}" for i in range(1000))
        sender = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "for i, dst in enumerate(sys.argv[1].split()):\n"
                  "    s.sendto(b'x' * (i % 50 + 1), (dst, 9))\n")
        before = quiet_window(daemon, [client])
        in_pod(client, sys.executable, "-c", sender, targets)
        in_pod(client, "ping", "-c", "4", "-i", "0.01", "-q", sink.ip)
        after = quiet_window(daemon, [client])
    was = _peers(before.metrics, client.name)
    delta = {k: v - was.get(k, 0) for k, v in _peers(after.metrics, client.name).items()}
    # the thousand datagrams: 1000 frames of 14 + 20 + 8 + (1..50) bytes
    assert delta[("egress", "external", "", "")] == sum(42 + i % 50 + 1 for i in range(1000))
    assert delta[("egress", "pod", "lab", "lab")] == 4 * 98  # the pings, 98-byte frames
    for direction, stat in (("egress", "rx_bytes"), ("ingress", "tx_bytes")):
        assert sum(v for k, v in delta.items() if k[0] == direction) == (
            after.stats[client.host_veth][stat] - before.stats[client.host_veth][stat])

    def external_gone() -> bool:
        return ("egress", "external", "", "") not in _peers(daemon.scrape(), client.name)
    wait_for(external_gone, timeout=15, interval=0.5)  # idle 4 s: gone, into _other
    final = quiet_window(daemon, [client])
    now = _peers(final.metrics, client.name)
    assert now[("egress", "_other", "", "")] >= delta[("egress", "external", "", "")]
    assert sum(v for k, v in now.items() if k[0] == "egress") == final.metrics.sum(
        "podnet_bytes_total", pod=client.name, direction="egress")


def test_peer_sums_survive_restarts_and_kills(lab: Lab, daemons: list[Daemon]) -> None:
    """The peer series restart with the daemon (the split by peer lived in it), `_other`
    takes what the last daemons counted, and the sums stay the pod's totals: after a
    SIGTERM with --leave-attached, and after kill -9 (whatever epoch it died in)."""
    client, web = lab.up(2)
    _permanent_neighbour(client, web.ip, _mac(web))
    _permanent_neighbour(web, client.ip, _mac(client))
    try:
        _restarts(lab, daemons, client, web)
    finally:
        for d in daemons:
            d.stop()
        # the daemons left everything attached and pinned, as told: cleanup removes it
        subprocess.run([sys.executable, "-m", "monitor", "cleanup", "--force"], cwd=ROOT,
                       check=True, capture_output=True)


def _restarts(lab: Lab, daemons: list[Daemon], client: LabPod, web: LabPod) -> None:
    args = ("--leave-attached", "true", "--peer-interval", "1")
    for stop in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        daemon = Daemon(*args, inventory=str(lab.inventory))
        daemons.append(daemon)
        pinger = spawn_in_pod(client, "ping", "-i", "0.005", "-q", web.ip)
        time.sleep(1.5)  # drains happen meanwhile, and the kill lands wherever it lands
        daemon.stop(stop)
        pinger.terminate()
        pinger.wait()
    daemon = Daemon(*args, inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(client, "ping", "-c", "9", "-i", "0.01", "-q", web.ip)
    final = quiet_window(daemon, [client, web])
    for pod in (client, web):
        for direction in ("egress", "ingress"):
            peers = sum(v for k, v in _peers(final.metrics, pod.name).items()
                        if k[0] == direction)
            assert peers == final.metrics.sum("podnet_bytes_total", pod=pod.name,
                                              direction=direction), (pod.name, direction)
    # and those are the veth's own: counted since the first daemon attached, nothing lost
    assert final.metrics.sum("podnet_packets_total", pod=client.name, direction="egress") > 400


SERVICE_VIP = "10.96.0.10"
ECHO = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(('{HOST_V4}', 7))\nprint('up', flush=True)\n"
        "while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)\n")


@contextmanager
def service_on_the_host() -> Iterator[None]:
    """A "Service": SERVICE_VIP:7 DNAT-ed by nft in the host (as kube-proxy does) to a UDP
    echo on the host's own address, whose answers conntrack turns back into the VIP's."""
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        "table ip pnm_test_svc {\n chain pre {\n  type nat hook prerouting priority dstnat;\n"
        f"  ip daddr {SERVICE_VIP} udp dport 7 dnat to {HOST_V4}:7\n }}\n}}\n"))
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "up"
        yield
    finally:
        echo.kill()
        echo.wait()
        subprocess.run(["nft", "delete", "table", "ip", "pnm_test_svc"], check=False)


def test_peers_named_by_the_api_services_before_nat_and_a_thousand_pods_bounded(
        lab: Lab, daemons: list[Daemon], tmp_path: Path) -> None:
    """With the API (tests/fakeapi.py, the real client): the lab pods, a thousand pods of
    other nodes (a thousand workloads) and a Service are named; the Service's traffic is
    the Service's both ways (the veth sees the VIP before the host's DNAT and after its
    reverse); the thousand stay within --peer-top + 1 series, and every sum is exact."""
    client, web = lab.up(2)
    node = "lab-node"
    with FakeApiServer(node=node) as api:
        api.add(make_pod("client-0", "shop", client.uid, node, owner=("StatefulSet", "client"),
                         pod_ips=[client.ip, client.ip6]))
        api.add(make_pod("web-5d8f7-abcde", "shop", web.uid, node,
                         owner=("ReplicaSet", "web-5d8f7"), labels={"pod-template-hash": "5d8f7"},
                         pod_ips=[web.ip, web.ip6]))
        for i in range(1000):
            api.add(make_pod(f"app{i}-0", "far", str(uuid.uuid4()), "other-node",
                             owner=("StatefulSet", f"app{i}"),
                             pod_ips=[f"10.216.{i // 250}.{i % 250 + 1}"], host_ips=["192.0.2.9"]))
        api.add_service(make_service("db", "shop", SERVICE_VIP))
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        daemon = Daemon("--metadata", "kubernetes", "--kubeconfig", kubeconfig, "--node-name",
                        node, "--runtime-dirs", str(lab.runtime_dir), "--cluster-cidrs",
                        "10.213.0.0/16,10.216.0.0/16", "--service-cidrs", "10.96.0.0/12")
        daemons.append(daemon)
        bridge_mac = Path("/sys/class/net/pnmlab0/address").read_text().strip()
        _permanent_neighbour(client, HOST_V4, bridge_mac)
        _permanent_neighbour(client, web.ip, _mac(web))
        _permanent_neighbour(web, client.ip, _mac(client))
        with host_addresses(), service_on_the_host():
            for net in ("10.216.0.0/16", "10.96.0.0/12"):
                in_pod(client, "ip", "route", "add", net, "via", HOST_V4)
            sender = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                      "for dst in sys.argv[1].split():\n    s.sendto(b'x' * 58, (dst, 9))\n")

            def far_named() -> bool:  # the index has listed the thousand
                in_pod(client, sys.executable, "-c", sender, "10.216.0.1")
                return ("egress", "pod", "far", "app0") in _peers(daemon.scrape(), "client-0")
            try:
                wait_for(far_named, timeout=30, interval=0.5)
            except AssertionError:
                raise AssertionError(f"the thousand never got their names: "
                                     f"{_peers(daemon.scrape(), 'client-0')}\n"
                                     f"{daemon.logs()}") from None
            before = quiet_window(daemon, [client])
            echo = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    "s.settimeout(2)\nfor _ in range(5):\n"
                    f"    s.sendto(b'y' * 100, ('{SERVICE_VIP}', 7)); s.recvfrom(2048)\n")
            in_pod(client, sys.executable, "-c", echo)  # five answers, or it raises
            in_pod(client, "ping", "-c", "6", "-i", "0.01", "-q", web.ip)
            targets = " ".join(f"10.216.{i // 250}.{i % 250 + 1}" for i in range(1000))
            in_pod(client, sys.executable, "-c", sender, targets)
            after = quiet_window(daemon, [client])
    was = _peers(before.metrics, "client-0")
    now = _peers(after.metrics, "client-0")
    delta = {k: v - was.get(k, 0) for k, v in now.items() if v - was.get(k, 0)}
    frame = 14 + 20 + 8 + 100  # a datagram to the Service and its echo
    assert delta[("egress", "service", "shop", "db")] == 5 * frame
    assert delta[("ingress", "service", "shop", "db")] == 5 * frame
    assert delta[("egress", "pod", "shop", "web")] == 6 * 98  # named by the API: Deployment web
    assert delta[("ingress", "pod", "shop", "web")] == 6 * 98
    for direction, stat in (("egress", "rx_bytes"), ("ingress", "tx_bytes")):
        mine = {k: v for k, v in now.items() if k[0] == direction}
        assert len(mine) <= 11, sorted(mine)  # a thousand workloads: ten, and _other
        assert sum(v for k, v in delta.items() if k[0] == direction) == (
            after.stats[client.host_veth][stat] - before.stats[client.host_veth][stat])
    assert delta[("egress", "_other", "", "")] >= 900 * (14 + 20 + 8 + 58)
