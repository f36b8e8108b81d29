"""rtnetlink as the daemon uses it: per-thread sockets for link dumps, one link's
statistics, nsids and link events; classic tc filters read and removed.

One stack, our own (monitor.kernel.rtnl): a socket serves one request at a time, so
each thread gets its own from a thread-local.
"""

from __future__ import annotations

import errno
import os
import threading

from monitor import log
from monitor.kernel import linkevents, rtnl, rtnllinks
from monitor.kernel.records import HostSide, VethCounts, VethLink
from monitor.kernel.rtnltc import TC_PARENT_EGRESS, TC_PARENT_INGRESS
from monitor.kernel.rtnlwire import RtnlError

FILTER_NAME = "podnetmon"


class Netlink:
    """Per-thread rtnetlink sockets (monitor.kernel.rtnl): link dumps, nsid queries,
    one link's statistics, and the tc requests of the attacher."""

    def __init__(self) -> None:
        self._local = threading.local()

    def tc(self) -> rtnl.Rtnl:
        """This thread's socket, for tc requests."""
        return self._rtnl()

    def _rtnl(self) -> rtnl.Rtnl:
        sock = getattr(self._local, "rtnl", None)
        if sock is None:
            sock = rtnl.Rtnl()
            self._local.rtnl = sock
        return sock

    def close(self) -> None:
        """Close this thread's sockets."""
        for name in ("rtnl",):
            sock = getattr(self._local, name, None)
            if sock is not None:
                sock.close()
                setattr(self._local, name, None)

    def links(self) -> list[rtnllinks.Link]:
        return self._rtnl().links()

    def veths(self) -> list[VethLink]:
        return [VethLink(link.ifindex, link.name, link.link_netnsid, link.link)
                for link in self._rtnl().links("veth") if link.link_netnsid is not None]

    def link_stats(self) -> dict[int, HostSide]:
        """Statistics of every veth by ifindex, and where its peer is, from one link dump."""
        return {link.ifindex: HostSide(link.rx_packets, link.tx_packets, link.tx_bytes,
                                       link.link_netnsid, link.link)
                for link in self._rtnl().links("veth")}

    def veth_counts(self, ifindex: int) -> VethCounts | None:
        """One host device's statistics (one request, not a dump); None if it is gone."""
        try:
            link = self._rtnl().link(ifindex)
        except RtnlError:
            return None
        if link is None:
            return None
        return VethCounts(link.rx_packets, link.rx_bytes, link.tx_packets, link.tx_bytes,
                          link.tx_dropped)

    def peer_stats(self, nsid: int, ifindex: int) -> tuple[int, int] | None:
        """(rx_packets, rx_bytes) of a device in another netns (a veth's pod side), read
        without entering it; None if it is gone."""
        try:
            link = self._rtnl().link(ifindex, nsid)
        except RtnlError:
            return None
        return (link.rx_packets, link.rx_bytes) if link is not None else None

    def netnsid(self, netns_path: str) -> int | None:
        """The host's id for a netns (None if it has none: no veth peer lives there)."""
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return self._rtnl().netnsid(fd)
        except RtnlError:
            return None
        finally:
            os.close(fd)


def filter_name_at(netlink: Netlink, ifindex: int, parent: int, prio: int,
                   handle: int) -> str | None:
    """The name of the bpf filter at this priority and handle, or None if there is none."""
    for found in netlink.tc().filters(ifindex, parent):
        if found.handle == handle and found.prio == prio:
            return found.name
    return None


def remove_our_filters(netlink: Netlink, ifindex: int, prio: int, handle: int) -> int:
    """Remove our filters (this priority, handle and our name) from a device's two
    hooks; returns how many there were. Another agent's filter is never touched."""
    removed = 0
    for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
        try:
            if filter_name_at(netlink, ifindex, parent, prio, handle) != FILTER_NAME:
                continue
            netlink.tc().delete_filter(ifindex, parent=parent, prio=prio, handle=handle)
            removed += 1
        except RtnlError as exc:
            if exc.errno not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                log.get("attach").warning("detach failed", ifindex=ifindex, error=str(exc))
    return removed


def filters_before(netlink: Netlink, ifindex: int, prio: int) -> list[str]:
    """Other agents' classic filters that run before a filter of ours at `prio` on a
    device, described ("ingress prio 1 cil_from_container"); an unreadable device has
    none. A filter at our very priority runs first too when it is not ours."""
    found = []
    for parent, hook in ((TC_PARENT_INGRESS, "ingress"), (TC_PARENT_EGRESS, "egress")):
        try:
            filters = netlink.tc().filters(ifindex, parent)
        except RtnlError:
            continue
        for each in filters:
            at = each.prio
            if each.handle and (at < prio or (at == prio and each.name != FILTER_NAME)):
                found.append(f"{hook} prio {at} {each.name or each.kind}")
    return sorted(set(found))


def all_links(netlink: Netlink) -> list[tuple[int, str]]:
    """(ifindex, name) of every interface in this netns."""
    return [(link.ifindex, link.name) for link in netlink.links()]

def link_events() -> linkevents.LinkEvents:
    """Wakes the reconciler on rtnetlink link changes; made and used in its thread.

    An overflowed socket (ENOBUFS, events lost) counts as an event: the answer to
    lost events is a full rescan, which is what every event triggers anyway.
    """
    return linkevents.LinkEvents()
