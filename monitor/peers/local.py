"""The node's own addresses as peers: its pods' (read from the kernel) and its own.

A peer on the same node needs no cluster-wide index: the kernel knows every pod
network's addresses. They are read over rtnetlink with IFA_TARGET_NETNSID (kernel
4.20), without entering the namespace, once per pod network (and again every
`refresh_every` seconds, for addresses added later), and named as the identity index
names the pod: its namespace and workload (a pod no controller owns is its own
workload). The host's own addresses are this node. Whatever the metadata source:
the API, an inventory, podman, or nothing at all (`_unknown`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from monitor import log
from monitor.identity import IdentityIndex, Pod
from monitor.kernel import rtnl, rtnllinks
from monitor.peers.identity import Peer

Key = tuple[int, bytes]  # (family, 16-byte address: IPv4 in the first four bytes)


class Addresses(Protocol):
    """The kernel's side (monitor.kernel.rtnl.Rtnl has it)."""

    def addresses(self, nsid: int | None = None) -> list[rtnllinks.Address]: ...
    def netnsid(self, fd: int) -> int | None: ...


def key_of(address: rtnllinks.Address) -> Key:
    return address.family, address.address.ljust(16, b"\0")


def pod_peer(pod: Pod) -> Peer:
    return Peer("pod", pod.namespace, pod.meta.workload or pod.name)


class LocalAddresses:
    """Keeps {(family, address): Peer} for this node; refresh() from the reconciler's
    published identity index (cheap when nothing changed)."""

    def __init__(self, node: str, kernel: Addresses | None = None, *,
                 refresh_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # the socket is opened now, at start-up, not at the first drain: the daemon's
        # descriptors are what they are from the start (the churn test counts them)
        self._node, self._kernel = node, kernel if kernel is not None else rtnl.Rtnl()
        self._refresh_every, self._clock = refresh_every, clock
        self._by_netns: dict[int, tuple[float, list[Key]]] = {}
        self._host: tuple[float, list[Key]] | None = None
        self._seen: IdentityIndex | None = None
        self._mapping: dict[Key, Peer] = {}
        self._log = log.get("peers")

    def _rtnl(self) -> Addresses:
        return self._kernel

    def refresh(self, index: IdentityIndex) -> Mapping[Key, Peer] | None:
        """The new mapping if anything changed since the last call, else None."""
        now = self._clock()
        stale = (self._host is None or now - self._host[0] >= self._refresh_every
                 or any(now - at >= self._refresh_every for at, _ in self._by_netns.values()))
        if index is self._seen and not stale:
            return None
        self._seen = index
        pods = {p.netns_inode: p for p in index.pods() if p.namespace != "_overflow"}
        for gone in set(self._by_netns) - set(pods):
            del self._by_netns[gone]
        for inode, pod in pods.items():
            cached = self._by_netns.get(inode)
            if cached is None or now - cached[0] >= self._refresh_every:
                self._by_netns[inode] = (now, self._pod_addresses(pod))
        if self._host is None or now - self._host[0] >= self._refresh_every:
            self._host = (now, self._addresses(None))
        mapping: dict[Key, Peer] = {k: Peer("node", "", self._node) for k in self._host[1]}
        for inode, (_at, keys) in self._by_netns.items():
            peer = pod_peer(pods[inode])
            for k in keys:
                mapping[k] = peer
        self._mapping = mapping
        return mapping

    def _pod_addresses(self, pod: Pod) -> list[Key]:
        try:
            fd = os.open(pod.network.open_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return []  # the pod went while we looked
        try:
            nsid = self._rtnl().netnsid(fd)
        except OSError:
            nsid = None
        finally:
            os.close(fd)
        return [] if nsid is None else self._addresses(nsid)

    def _addresses(self, nsid: int | None) -> list[Key]:
        try:
            found: Iterable[rtnllinks.Address] = self._rtnl().addresses(nsid)
        except OSError as exc:
            self._log.debug("addresses unreadable", nsid=nsid, error=str(exc))
            return []
        # loopback addresses are every netns's own: they never name a peer
        return [key_of(a) for a in found
                if not (a.family == 4 and a.address[0] == 127)
                and not (a.family == 6 and a.address == bytes(15) + b"\1")]
