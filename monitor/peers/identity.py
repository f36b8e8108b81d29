"""Who a peer address is: a Peer, and the resolver the collector asks at scrape time.

The kernel side stores every peer as (family, 16 bytes): 4 or 6 (0 when the
packet was not IP, e.g. ARP), and an IPv4 address in the first 4 bytes with the
rest zero. The resolver answers from, in this order:

1. the node-local table the daemon sets on each pass (this node's pods and
   its own addresses, as the kernel shows them: the freshest truth there is);
2. the cluster index (monitor/peers/cluster.py), if there is one: every pod,
   service and node address of the cluster from the API;
3. the cluster's pod and service CIDRs (settings): an address in them that
   nothing above names is `unknown` (a pod or service we have not heard of
   yet, or one already gone), never `external`;
4. anything else is `external`.

Inside, an address is a bytes key of its natural length: 4 bytes for IPv4, 16
for IPv6. The length tells the families apart, so one dict serves both, and an
IPv6 address whose first 4 bytes look like an IPv4 one never collides with it.

Threads: the scrape thread resolves while the reconciler sets the local table
and watch threads update the index. Each source is replaced by assigning a new
object (the local table) or changed one key at a time (the index), and a read
of one dict key is atomic in CPython, so resolve() takes no lock: 20,000
lookups per scrape must not queue behind a relist.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

KINDS = ("pod", "service", "node", "external", "unknown")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Peer:
    """What a peer address is: its kind and, for pods, services and nodes, which one."""

    kind: str  # one of KINDS
    namespace: str = ""
    workload: str = ""  # a pod's workload, a service's name, a node's name


UNKNOWN = Peer("unknown")
EXTERNAL = Peer("external")

ADDRESS_BYTES = {4: 4, 6: 16}  # family -> the length of its key


def address_key(family: int, addr: bytes) -> bytes | None:
    """The index key of a kernel address (family, 16 bytes); None if it is not IP."""
    size = ADDRESS_BYTES.get(family)
    if size is None or len(addr) < size:
        return None
    return bytes(addr[:size])


def text_key(text: str) -> bytes | None:
    """The index key of an address as the API writes it ("10.0.0.1", "fd00::1");
    None if it is not one."""
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


class AddressIndex(Protocol):
    """Answers for an address key (see address_key) or None: the cluster index's face."""

    def lookup(self, key: bytes) -> Peer | None: ...


class _Networks:
    """CIDRs as (network, mask) integer pairs per key length: a test is an AND and a compare."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        by_len: dict[int, list[tuple[int, int]]] = {4: [], 16: []}
        for cidr in cidrs:
            try:  # host bits allowed (10.244.0.1/16), as settings validates them
                net = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"not a CIDR: {cidr!r} ({exc})") from None
            by_len[4 if net.version == 4 else 16].append(
                (int(net.network_address), int(net.netmask)))
        self._v4 = tuple(by_len[4])
        self._v6 = tuple(by_len[16])

    def __contains__(self, key: bytes) -> bool:
        nets = self._v4 if len(key) == 4 else self._v6
        if not nets:
            return False
        value = int.from_bytes(key, "big")
        return any(value & mask == net for net, mask in nets)


class PeerResolver:
    """Resolves a kernel peer address to a Peer: local table, cluster index, CIDRs, else external."""

    def __init__(self, cluster_cidrs: Iterable[str] = (), service_cidrs: Iterable[str] = (),
                 index: AddressIndex | None = None) -> None:
        """CIDR strings may be IPv4 or IPv6 (host bits are ignored); a malformed one
        raises ValueError."""
        self._inside = _Networks([*cluster_cidrs, *service_cidrs])
        self.index = index  # may be set later, once the index exists
        self._local: Mapping[bytes, Peer] = {}

    def set_local(self, mapping: Mapping[tuple[int, bytes], Peer]) -> None:
        """Replace the node-local table: (family, 16-byte address) -> Peer."""
        local: dict[bytes, Peer] = {}
        for (family, addr), peer in mapping.items():
            key = address_key(family, addr)
            if key is not None:
                local[key] = peer
        self._local = local  # one assignment: a resolve sees the old table or the new one

    def resolve(self, family: int, addr: bytes) -> Peer:
        key = address_key(family, addr)
        if key is None:
            return UNKNOWN  # not IP (ARP, ...): nothing to name it by
        peer = self._local.get(key)
        if peer is not None:
            return peer
        index = self.index
        if index is not None:
            peer = index.lookup(key)
            if peer is not None:
                return peer
        # Inside the cluster's ranges but named by nobody: a pod or service we do not
        # know (yet, or any more), not the outside world.
        return UNKNOWN if key in self._inside else EXTERNAL
