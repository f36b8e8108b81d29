"""monitor.kernel.rtnl on the real kernel, checked against iproute2's own reading.

Two netns (pnmrt-a, pnmrt-b) hang off a host bridge pnmrtbr0 through veths pnmrt0 and
pnmrt1, and ping each other through it, so both host veths count traffic both ways;
a third netns, pnmrt-c, has nothing in it and so no id in the host. IPv6 is off on
everything made here, so that no router solicitation moves a counter mid-comparison.
Everything is named pnmrt* and removed at the end, also after a failure.

Run alone: .venv/bin/pytest --noconftest -q tests/kernel/test_rtnl.py
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from monitor.kernel.linkevents import LinkEvents
from monitor.kernel.rtnl import Rtnl
from monitor.kernel.rtnllinks import Link
from monitor.kernel.rtnlwire import RtnlError

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root, iproute2 and the real kernel")]

NETNS = ("pnmrt-a", "pnmrt-b", "pnmrt-c")
VETHS = {"pnmrt0": ("pnmrt-a", "10.213.77.1/24"), "pnmrt1": ("pnmrt-b", "10.213.77.2/24")}
BRIDGE = "pnmrtbr0"
SCRATCH = ("pnmrt9", "pnmrt8")  # links the event tests make and remove


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def ipv6_off(name: str, netns: str | None = None) -> None:
    where = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*where, "sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True,
                   capture_output=True, timeout=30)


def teardown() -> None:
    for name in (*VETHS, BRIDGE, *SCRATCH):
        ip("link", "del", name, check=False)
    for netns in NETNS:
        ip("netns", "del", netns, check=False)


@dataclass
class Setup:
    ifindex: dict[str, int]   # host-side links by name


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    teardown()  # whatever a crashed run left
    try:
        for netns in NETNS:
            ip("netns", "add", netns)
        for netns in NETNS:
            ipv6_off("default", netns)
        ip("link", "add", BRIDGE, "type", "bridge")
        ipv6_off(BRIDGE)
        for name, (netns, addr) in VETHS.items():
            ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p", "netns", netns)
            ipv6_off(name)
            ip("link", "set", name, "master", BRIDGE)
            ip("-n", netns, "addr", "add", addr, "dev", f"{name}p")
            ip("-n", netns, "link", "set", f"{name}p", "up")
            ip("link", "set", name, "up")
        ip("link", "set", BRIDGE, "up")
        # a -> b through the bridge: pnmrt0 receives and sends, and so does pnmrt1.
        subprocess.run(["ip", "netns", "exec", "pnmrt-a", "ping", "-c", "3", "-i", "0.2", "-W", "2",
                        "10.213.77.2"], check=True, capture_output=True, timeout=30)
        shown = json.loads(ip("-j", "link", "show"))
        yield Setup({row["ifname"]: row["ifindex"] for row in shown})
    finally:
        teardown()


def ip_links() -> dict[str, dict[str, Any]]:
    return {row["ifname"]: row for row in json.loads(ip("-j", "-d", "-s", "link", "show"))}


def counters(row: dict[str, Any] | Link) -> tuple[int, int, int, int]:
    if isinstance(row, Link):
        return row.rx_packets, row.tx_packets, row.rx_bytes, row.tx_bytes
    s = row["stats64"]
    return s["rx"]["packets"], s["tx"]["packets"], s["rx"]["bytes"], s["tx"]["bytes"]


@contextmanager
def netns_fd(name: str) -> Iterator[int]:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def test_veths_match_iproute2(setup: Setup) -> None:
    before = ip_links()
    with Rtnl() as rt:
        veths = {lk.name: lk for lk in rt.links("veth")}
    after = ip_links()

    assert set(VETHS) <= set(veths)
    assert all(lk.kind == "veth" for lk in veths.values())
    for name in VETHS:
        ours, theirs = veths[name], after[name]
        assert ours.ifindex == theirs["ifindex"] == setup.ifindex[name]
        assert ours.kind == theirs["linkinfo"]["info_kind"] == "veth"
        assert ours.link_netnsid == theirs["link_netnsid"]
        assert ours.link == theirs["link_index"]
        assert ours.master == setup.ifindex[BRIDGE]
        assert theirs["master"] == BRIDGE
        # Counters can only grow: ours were read between iproute2's two readings.
        for low, mine, high in zip(counters(before[name]), counters(ours), counters(theirs), strict=True):
            assert low <= mine <= high
        assert ours.rx_packets >= 3 and ours.tx_packets >= 3, "the pings crossed both veths"


def test_every_link_and_kinds(setup: Setup) -> None:
    with Rtnl() as rt:
        everything = {lk.name: lk for lk in rt.links()}
        bridges = [lk.name for lk in rt.links("bridge")]
        assert rt.links("pnmrt-no-such-kind") == []
        one = rt.link(setup.ifindex["pnmrt0"])
        assert rt.link(2**31 - 1) is None
    shown = ip_links()
    # Other work on this machine may add or remove its own links meanwhile: ours must be
    # there, and every link both readings saw must agree.
    assert {"lo", BRIDGE, *VETHS} <= set(everything) & set(shown)
    for name in set(everything) & set(shown):
        assert everything[name].ifindex == shown[name]["ifindex"]
        assert everything[name].kind == shown[name].get("linkinfo", {}).get("info_kind", "")
        assert everything[name].link_netnsid == shown[name].get("link_netnsid")
    assert everything["lo"].kind == "" and everything["lo"].link_netnsid is None
    assert everything[BRIDGE].kind == "bridge" and everything[BRIDGE].link == 0
    assert BRIDGE in bridges and "pnmrt0" not in bridges
    assert one is not None and one.name == "pnmrt0" and one.link_netnsid == everything["pnmrt0"].link_netnsid


def test_netnsid_matches_iproute2(setup: Setup) -> None:
    # `ip netns list-id` is an RTM_GETNSID dump, which on this kernel ends after its first
    # datagram (~134 ids, then a clean DONE): with many netns on the machine ours may be
    # missing from it, so it is checked where it lists them. The links always say.
    listed = {row.get("name"): row["nsid"] for row in json.loads(ip("-j", "netns", "list-id"))}
    shown = ip_links()
    with Rtnl() as rt:
        for name, (netns, _) in VETHS.items():
            with netns_fd(netns) as fd:
                nsid = rt.netnsid(fd)
            assert nsid is not None
            assert nsid == shown[name]["link_netnsid"]
            assert listed.get(netns, nsid) == nsid
        with netns_fd("pnmrt-c") as fd:
            assert rt.netnsid(fd) is None
        assert "pnmrt-c" not in listed


def test_netnsid_of_something_else_fails_and_the_socket_lives_on(setup: Setup) -> None:
    with Rtnl() as rt:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(RtnlError) as caught:
                rt.netnsid(fd)
        finally:
            os.close(fd)
        assert caught.value.errno in (errno.EINVAL, errno.EBADF)
        assert "RTM_GETNSID" in str(caught.value)
        with netns_fd("pnmrt-a") as fd:
            assert rt.netnsid(fd) is not None


def test_one_socket_many_requests_and_a_tiny_buffer(setup: Setup) -> None:
    with Rtnl() as rt:
        reference = [(lk.ifindex, lk.name) for lk in rt.links()]
        with netns_fd("pnmrt-a") as fd:
            nsid = rt.netnsid(fd)
            for _ in range(100):
                assert rt.netnsid(fd) == nsid
                assert [lk.name for lk in rt.links("veth") if lk.name in VETHS] == sorted(VETHS)
        # Every dump part now overflows the buffer: the dump is drained and asked again
        # with room for it.
        rt._set_buffer(256)
        assert [(lk.ifindex, lk.name) for lk in rt.links()] == reference
        assert len(rt._buf) > 256


def wait_readable(events: LinkEvents, timeout: float) -> bool:
    readable, _, _ = select.select([events], [], [], timeout)
    return bool(readable)


def test_link_events_wake_up_on_a_new_link(setup: Setup) -> None:
    with LinkEvents() as events:
        events.drain()
        try:
            ip("link", "add", "pnmrt9", "type", "veth", "peer", "name", "pnmrt9p")
            assert wait_readable(events, 5.0)
            assert events.drain() > 0
            assert events.overflows == 0
        finally:
            ip("link", "del", "pnmrt9", check=False)


def test_link_events_overflow_counts_and_does_not_raise(setup: Setup) -> None:
    with LinkEvents() as events:
        # The smallest receive buffer the kernel allows holds about one event.
        sock = socket.socket(fileno=os.dup(events.fileno()))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        finally:
            sock.close()
        events.drain()
        try:
            ip("link", "add", "pnmrt8", "type", "veth", "peer", "name", "pnmrt8p")
            for _ in range(5):
                ip("link", "set", "pnmrt8", "up")
                ip("link", "set", "pnmrt8", "down")
            assert wait_readable(events, 5.0)
            assert events.drain() >= 1
            assert events.overflows >= 1
        finally:
            ip("link", "del", "pnmrt8", check=False)
