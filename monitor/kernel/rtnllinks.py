"""The link, address and nsid requests of our rtnetlink client: link dumps (every
link, or those of one kind), one link (in this netns or a pod's, by nsid), a netns's
nsid, and a netns's interface addresses; each reply parsed for the few attributes we
read (the costs are in monitor.kernel.rtnl's docstring).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from monitor.kernel.rtnlexchange import RtnlExchange
from monitor.kernel.rtnlwire import (
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLA_TYPE_MASK,
    NLATTR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    S32,
    S32_MAX,
    U32,
    RtnlError,
    align,
    cbytes,
    cstr,
    find_attr,
    malformed,
    pack_attr,
)

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWNSID = 88
RTM_GETNSID = 90

# <linux/if_link.h>
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_STATS64 = 23
IFLA_TARGET_NETNSID = 46
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND = 1

# <linux/if_addr.h>
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_TARGET_NETNSID = 10

# <linux/net_namespace.h>
NETNSA_NSID = 1
NETNSA_FD = 3
NETNSA_NSID_NOT_ASSIGNED = -1

_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_RTGENMSG = struct.Struct("=Bxxx")    # family, padded to NLMSG_ALIGNTO
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_STATS4 = struct.Struct("=4Q")        # rtnl_link_stats64: rx/tx packets, rx/tx bytes come first
_TX_DROPPED = struct.Struct("=Q")      # ... then rx/tx errors, rx_dropped, tx_dropped
_TX_DROPPED_AT = 7 * 8
# The attribute types _parse_link wants, with every combination of the two flag bits,
# so that the hot loop tests the raw nla_type.
_LINK_ATTRS = frozenset(t | flags
                        for t in (IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_STATS64,
                                  IFLA_LINK_NETNSID)
                        for flags in (0, NLA_F_NESTED, NLA_F_NET_BYTEORDER,
                                      NLA_F_NESTED | NLA_F_NET_BYTEORDER))


@dataclass(frozen=True, slots=True)
class Link:
    ifindex: int
    name: str
    kind: str                  # IFLA_LINKINFO/IFLA_INFO_KIND, "" if absent
    link_netnsid: int | None   # IFLA_LINK_NETNSID: the netns of a veth's peer, as the host numbers it
    link: int                  # IFLA_LINK: a veth peer's ifindex (in its own netns), 0 if absent
    master: int                # IFLA_MASTER, 0 if absent
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int              # IFLA_STATS64, 0 if absent
    # handed to the device but not sent: a veth's peer could not take them (its CPU's
    # backlog full), which the veth counts here and not in tx_packets
    tx_dropped: int = 0


@dataclass(frozen=True)
class Address:
    """An interface address: family 4 or 6, the interface's index, the address bytes."""

    family: int
    ifindex: int
    address: bytes


def _parse_link(buf: bytearray, w: memoryview, off: int, end: int, *, want_kind: bytes | None,
                what: str) -> Link | None:
    """One RTM_NEWLINK payload; None if want_kind is given and the link is of another kind.

    `w` is `buf` read as native u32s. Messages and attributes are 4-byte aligned, so
    w[a >> 2] is an attribute's header, nla_len in the low half and nla_type above.
    """
    if end - off < _IFINFOMSG.size:
        raise malformed(what, "short ifinfomsg")
    ifindex = S32.unpack_from(buf, off + 4)[0]
    name = info = stats = (0, 0)
    link_at = master_at = nsid_at = 0
    # The hot loop: ~42 attributes a link, 6 of them wanted; a set test per attribute
    # (flag bits included in the set) is the cheapest filter CPython offers here. Only
    # the last attribute can overrun the message (it ends the loop), so that is checked
    # once, after it, and before any payload is read.
    a = last = off + _IFINFOMSG.size
    while a < end:
        v = w[a >> 2]
        alen = v & 0xFFFF
        if alen < 4:
            raise malformed(what, f"link {ifindex}: attribute length {alen} at {a - off}")
        if v >> 16 in _LINK_ATTRS:
            atype = (v >> 16) & NLA_TYPE_MASK
            if atype == IFLA_IFNAME:
                name = (a + 4, a + alen)
            elif atype == IFLA_LINKINFO:
                info = (a + 4, a + alen)
            elif atype == IFLA_STATS64:
                stats = (a + 4, a + alen)
            elif alen < 8:  # the other three are u32/s32
                raise malformed(what, f"link {ifindex}: attribute {atype} is shorter than 4 bytes")
            elif atype == IFLA_LINK:
                link_at = a + 4
            elif atype == IFLA_MASTER:
                master_at = a + 4
            else:
                nsid_at = a + 4
        last = a
        a += (alen + 3) & ~3
    if a > end and last + (w[last >> 2] & 0xFFFF) > end:
        raise malformed(what, f"link {ifindex}: attribute at {last - off} overruns the message")

    kind = b""
    if info[0]:
        kind_at, kind_end = find_attr(buf, info[0], info[1], IFLA_INFO_KIND, what)
        if kind_at:
            kind = cbytes(buf, kind_at, kind_end)
    if want_kind is not None and kind != want_kind:
        return None
    if not name[0]:
        raise malformed(what, f"link {ifindex} has no IFLA_IFNAME")
    if stats[0]:
        if stats[1] - stats[0] < _STATS4.size:
            raise malformed(what, f"link {ifindex}: short IFLA_STATS64")
        rx_packets, tx_packets, rx_bytes, tx_bytes = _STATS4.unpack_from(buf, stats[0])
        tx_dropped = (_TX_DROPPED.unpack_from(buf, stats[0] + _TX_DROPPED_AT)[0]
                      if stats[1] - stats[0] >= _TX_DROPPED_AT + 8 else 0)
    else:
        rx_packets = tx_packets = rx_bytes = tx_bytes = tx_dropped = 0
    return Link(
        ifindex=ifindex,
        name=cstr(buf, name[0], name[1]),
        kind=kind.decode("utf-8", "surrogateescape"),
        link_netnsid=S32.unpack_from(buf, nsid_at)[0] if nsid_at else None,
        link=w[link_at >> 2] if link_at else 0,
        master=w[master_at >> 2] if master_at else 0,
        rx_packets=rx_packets, tx_packets=tx_packets, rx_bytes=rx_bytes, tx_bytes=tx_bytes,
        tx_dropped=tx_dropped,
    )


def _parse_nsid(buf: bytearray, off: int, end: int, what: str) -> int | None:
    """One RTM_NEWNSID payload: rtgenmsg (padded to 4), then NETNSA_NSID (s32)."""
    at, at_end = find_attr(buf, off + _RTGENMSG.size, end, NETNSA_NSID, what)
    if not at or at_end - at < 4:
        raise malformed(what, "no NETNSA_NSID")
    nsid: int = S32.unpack_from(buf, at)[0]
    return None if nsid == NETNSA_NSID_NOT_ASSIGNED else nsid


class LinkRequests(RtnlExchange):
    """Links, addresses and nsids, asked for over one RtnlExchange."""

    def links(self, kind: str | None = None) -> list[Link]:
        """Every link of this netns (RTM_GETLINK dump); with `kind`, those of that kind.

        The kind goes into the request too, and a kernel that can filter dumps by kind
        and knows that kind sends only those (6.18 does, and flags the parts
        NLM_F_DUMP_FILTERED); we filter again here for kernels that cannot.
        """
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        want = None
        if kind is not None:
            want = kind.encode("utf-8", "surrogateescape")
            body += pack_attr(IFLA_LINKINFO | NLA_F_NESTED, pack_attr(IFLA_INFO_KIND, want + b"\0"))
        what = "RTM_GETLINK dump" + (f" kind {kind}" if kind is not None else "")

        def parse(off: int, end: int) -> Link | None:
            return _parse_link(self._buf, self._w, off, end, want_kind=want, what=what)

        return self._call(what, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWLINK, parse=parse)

    def link(self, ifindex: int, nsid: int | None = None) -> Link | None:
        """One link by ifindex; None if there is none (ENODEV). With `nsid`, the link of
        that index in the netns the host numbers so (a veth's peer in its pod: its
        statistics, read without entering the pod's netns; IFLA_TARGET_NETNSID, 4.20)."""
        if not 0 < ifindex <= S32_MAX:
            return None  # no link has it; and the kernel would read 0 as "look up by name"
        what = f"RTM_GETLINK ifindex {ifindex}" + (f" nsid {nsid}" if nsid is not None else "")
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        if nsid is not None:
            body += pack_attr(IFLA_TARGET_NETNSID, S32.pack(nsid))

        def parse(off: int, end: int) -> Link | None:
            return _parse_link(self._buf, self._w, off, end, want_kind=None, what=what)

        try:
            found = self._call(what, RTM_GETLINK, NLM_F_REQUEST, body, reply_type=RTM_NEWLINK, parse=parse)
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        if len(found) != 1:
            raise malformed(what, f"{len(found)} links in the reply")
        return found[0]

    def netnsid(self, fd: int) -> int | None:
        """The host's id for the netns behind `fd` (RTM_GETNSID); None if it has none.

        Asking does not assign one: the kernel numbers a netns when something needs
        it, typically when a veth with its peer there is first shown to this netns.
        """
        what = f"RTM_GETNSID fd {fd}"
        if not 0 <= fd <= S32_MAX:
            raise RtnlError(errno.EBADF, f"{what}: not a file descriptor")
        body = _RTGENMSG.pack(socket.AF_UNSPEC) + pack_attr(NETNSA_FD, U32.pack(fd))

        # One-element list: the reply itself may say "no id" (None).
        def parse(off: int, end: int) -> list[int | None]:
            return [_parse_nsid(self._buf, off, end, what)]

        found = self._call(what, RTM_GETNSID, NLM_F_REQUEST, body, reply_type=RTM_NEWNSID, parse=parse)
        if len(found) != 1:
            raise malformed(what, f"{len(found)} replies")
        return found[0][0]

    def addresses(self, nsid: int | None = None) -> list[Address]:
        """Every IPv4 and IPv6 address of a netns's interfaces (RTM_GETADDR dump): this
        one's, or with `nsid` the netns the host numbers so (IFA_TARGET_NETNSID, kernel
        4.20), read without entering it. IFA_LOCAL wins over IFA_ADDRESS where both are
        (on a point-to-point link IFA_ADDRESS is the far end)."""
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        if nsid is not None:
            # The kernel reads IFA_TARGET_NETNSID of a dump only under strict checking
            # (inet_valid_dump_ifaddr_req); without it the dump is silently of this netns.
            self._strict()
            body += pack_attr(IFA_TARGET_NETNSID, S32.pack(nsid))
        what = "RTM_GETADDR dump" + (f" nsid {nsid}" if nsid is not None else "")

        def parse(off: int, end: int) -> Address | None:
            if end - off < _IFADDRMSG.size:
                raise malformed(what, "a reply shorter than ifaddrmsg")
            family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(self._buf, off)
            if family not in (socket.AF_INET, socket.AF_INET6):
                return None
            found: dict[int, bytes] = {}
            pos = off + align(_IFADDRMSG.size)
            while pos + NLATTR.size <= end:
                alen, atype = NLATTR.unpack_from(self._buf, pos)
                if alen < NLATTR.size or pos + alen > end:
                    raise malformed(what, "an attribute runs past its message")
                if atype & NLA_TYPE_MASK in (IFA_ADDRESS, IFA_LOCAL):
                    found[atype & NLA_TYPE_MASK] = bytes(self._buf[pos + NLATTR.size:pos + alen])
                pos += align(alen)
            raw = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
            if raw is None or len(raw) != (4 if family == socket.AF_INET else 16):
                return None
            return Address(4 if family == socket.AF_INET else 6, index, raw)

        return self._call(what, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWADDR, parse=parse)
