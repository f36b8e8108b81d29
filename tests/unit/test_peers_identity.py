"""monitor.peers.identity: Peer, and PeerResolver's order (local, cluster, CIDRs, external).

Addresses are made here as the kernel side stores them (family, 16 bytes, an IPv4
address in the first four), with socket.inet_pton, not with the module's helpers.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import pytest

from monitor.peers.identity import EXTERNAL, UNKNOWN, Peer, PeerResolver

WEB = Peer("pod", "shop", "web")
DB = Peer("pod", "shop", "db")
DNS = Peer("service", "kube-system", "kube-dns")
NODE_A = Peer("node", "", "node-a")


def v4(text: str) -> tuple[int, bytes]:
    return 4, socket.inet_pton(socket.AF_INET, text) + bytes(12)


def v6(text: str) -> tuple[int, bytes]:
    return 6, socket.inet_pton(socket.AF_INET6, text)


def key4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def key6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


class DictIndex:
    """A cluster index as the resolver sees one: a lookup by 4- or 16-byte key."""

    def __init__(self, entries: dict[bytes, Peer]) -> None:
        self.entries = entries
        self.asked: list[bytes] = []

    def lookup(self, key: bytes) -> Peer | None:
        self.asked.append(key)
        return self.entries.get(key)


def test_peer_is_frozen_data_with_empty_defaults() -> None:
    assert Peer("external") == Peer("external", "", "")
    assert (Peer("unknown"), Peer("external")) == (UNKNOWN, EXTERNAL)
    assert Peer("pod", "shop", "web") != Peer("pod", "shop", "db")
    assert len({Peer("pod", "a", "b"), Peer("pod", "a", "b")}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        WEB.kind = "service"  # type: ignore[misc]


def test_without_any_source_everything_ip_is_external() -> None:
    resolver = PeerResolver()
    assert resolver.resolve(*v4("10.244.1.7")) == EXTERNAL
    assert resolver.resolve(*v6("fd00::7")) == EXTERNAL
    assert resolver.resolve(*v4("8.8.8.8")) == EXTERNAL


@pytest.mark.parametrize("family", [0, 1, 2, 10, 17, 255])
def test_not_ip_is_unknown(family: int) -> None:
    resolver = PeerResolver(["10.0.0.0/8"])
    resolver.set_local({v4("10.0.0.1"): WEB})
    assert resolver.resolve(family, bytes(16)) == UNKNOWN
    assert resolver.resolve(family, key4("10.0.0.1") + bytes(12)) == UNKNOWN


def test_cidrs_make_unnamed_cluster_addresses_unknown() -> None:
    resolver = PeerResolver(cluster_cidrs=["10.244.0.0/16", "fd00:10:244::/56"],
                            service_cidrs=["10.96.0.0/12", "fd00:10:96::/112"])
    # each range's first and last address is inside; the ones either side are not
    expected = {
        "10.244.0.0": UNKNOWN, "10.244.255.255": UNKNOWN, "10.243.255.255": EXTERNAL,
        "10.245.0.0": EXTERNAL, "10.96.0.0": UNKNOWN, "10.111.255.255": UNKNOWN,
        "10.112.0.0": EXTERNAL, "10.95.255.255": EXTERNAL, "192.168.1.1": EXTERNAL,
    }
    assert {a: resolver.resolve(*v4(a)) for a in expected} == expected
    expected6 = {
        "fd00:10:244::": UNKNOWN, "fd00:10:244:ff:ffff:ffff:ffff:ffff": UNKNOWN,
        "fd00:10:244:100::": EXTERNAL, "fd00:10:96::ffff": UNKNOWN, "fd00:10:96::1:0": EXTERNAL,
        "2001:db8::1": EXTERNAL,
    }
    assert {a: resolver.resolve(*v6(a)) for a in expected6} == expected6


def test_an_ipv4_cidr_never_matches_ipv6_and_back() -> None:
    # 10.0.0.0/8 starts with the byte 0x0a, as does the IPv6 range a00::/8: each CIDR
    # holds addresses of its own family only
    resolver = PeerResolver(["10.0.0.0/8"], ["a00::/8"])
    assert resolver.resolve(*v6("a00::1")) == UNKNOWN
    assert resolver.resolve(*v6("b00::1")) == EXTERNAL
    only4 = PeerResolver(["10.0.0.0/8"])
    assert only4.resolve(*v6("a00::1")) == EXTERNAL
    assert only4.resolve(*v4("10.1.2.3")) == UNKNOWN


def test_host_bits_in_a_cidr_are_ignored_as_settings_allows() -> None:
    resolver = PeerResolver(["10.244.3.9/16"])
    assert resolver.resolve(*v4("10.244.200.1")) == UNKNOWN


@pytest.mark.parametrize("cidr", ["10.244.0.0/33", "not-a-cidr", "", "fd00::/129"])
def test_a_malformed_cidr_is_refused_at_construction(cidr: str) -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        PeerResolver([cidr])


def test_order_local_then_index_then_cidrs_then_external() -> None:
    index = DictIndex({key4("10.244.1.7"): DB, key4("10.96.0.10"): DNS, key4("10.244.2.2"): DB})
    resolver = PeerResolver(["10.244.0.0/16"], ["10.96.0.0/12"], index=index)
    resolver.set_local({v4("10.244.1.7"): WEB, v4("192.168.0.5"): NODE_A})
    assert resolver.resolve(*v4("10.244.1.7")) == WEB  # the kernel's word beats the API's
    assert resolver.resolve(*v4("192.168.0.5")) == NODE_A  # local, outside every CIDR
    assert resolver.resolve(*v4("10.96.0.10")) == DNS
    assert resolver.resolve(*v4("10.244.2.2")) == DB
    assert resolver.resolve(*v4("10.244.9.9")) == UNKNOWN
    assert resolver.resolve(*v4("1.1.1.1")) == EXTERNAL
    # the index is asked only for what the local table does not name, by 4-byte key
    assert index.asked == [key4(a) for a in ("10.96.0.10", "10.244.2.2", "10.244.9.9", "1.1.1.1")]


def test_index_may_come_later() -> None:
    resolver = PeerResolver(["10.244.0.0/16"])
    assert resolver.resolve(*v4("10.244.2.2")) == UNKNOWN
    resolver.index = DictIndex({key4("10.244.2.2"): DB})
    assert resolver.resolve(*v4("10.244.2.2")) == DB


def test_ipv6_keys_are_16_bytes_and_never_collide_with_ipv4() -> None:
    index = DictIndex({key6("fd00::10"): DNS})
    resolver = PeerResolver(index=index)
    # an IPv6 address whose first four bytes are those of 10.0.0.1 (0a00:0001::)
    resolver.set_local({v4("10.0.0.1"): WEB})
    assert resolver.resolve(*v6("a00:1::")) == EXTERNAL
    assert resolver.resolve(*v4("10.0.0.1")) == WEB
    assert resolver.resolve(*v6("fd00::10")) == DNS
    assert index.asked == [key6("a00:1::"), key6("fd00::10")]


def test_the_tail_of_an_ipv4_slot_is_not_part_of_the_address() -> None:
    resolver = PeerResolver()
    resolver.set_local({v4("10.0.0.1"): WEB})
    family, addr = v4("10.0.0.1")
    assert resolver.resolve(family, addr[:4] + b"\xff" * 12) == WEB


def test_short_addresses_are_unknown() -> None:
    resolver = PeerResolver(["10.0.0.0/8"])
    assert resolver.resolve(4, b"\x0a\x00") == UNKNOWN
    assert resolver.resolve(6, key4("10.0.0.1")) == UNKNOWN


def test_set_local_replaces_the_whole_table() -> None:
    resolver = PeerResolver(["10.244.0.0/16"])
    resolver.set_local({v4("10.244.1.7"): WEB, v6("fd00::7"): WEB, (0, bytes(16)): DB})
    assert resolver.resolve(*v4("10.244.1.7")) == WEB
    assert resolver.resolve(*v6("fd00::7")) == WEB
    assert resolver.resolve(0, bytes(16)) == UNKNOWN  # a non-IP entry names nothing
    resolver.set_local({v4("10.244.1.8"): DB})
    assert resolver.resolve(*v4("10.244.1.7")) == UNKNOWN  # gone with the old table
    assert resolver.resolve(*v6("fd00::7")) == EXTERNAL
    assert resolver.resolve(*v4("10.244.1.8")) == DB


def test_set_local_keeps_no_reference_to_the_callers_mapping() -> None:
    resolver = PeerResolver()
    table = {v4("10.0.0.1"): WEB}
    resolver.set_local(table)
    table[v4("10.0.0.2")] = DB
    table[v4("10.0.0.1")] = DB
    assert resolver.resolve(*v4("10.0.0.1")) == WEB
    assert resolver.resolve(*v4("10.0.0.2")) == EXTERNAL


def test_resolve_while_the_local_table_changes() -> None:
    """Every answer is one table's or the other's, never a mix or an error."""
    first = {v4(f"10.244.0.{i}"): WEB for i in range(1, 200)}
    second = {v4(f"10.244.1.{i}"): DB for i in range(1, 200)}
    resolver = PeerResolver(["10.244.0.0/16"])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                resolver.set_local(first)
                resolver.set_local(second)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen: set[Peer] = set()
    try:
        for _ in range(30):
            for i in range(1, 200):
                seen.add(resolver.resolve(*v4(f"10.244.0.{i}")))
                seen.add(resolver.resolve(*v4(f"10.244.1.{i}")))
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen <= {WEB, DB, UNKNOWN}
