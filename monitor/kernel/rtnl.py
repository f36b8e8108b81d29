"""A small rtnetlink client: link dumps, one link, a netns's nsid, link events, and the
few tc requests the attacher makes (a clsact qdisc; cls_bpf filters added, replaced,
dumped and deleted).

Pure standard library over a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket. It packs
only the requests we send and reads only the attributes we need, straight out of one
reusable receive buffer, so a reconcile pass stops paying for a general-purpose
netlink library's decoding of every attribute of every link.

Cost, measured on the build VM (kernel 6.18, 2 cores shared with other work, CPython
3.11) with a throwaway script: 40 interleaved rounds, ``time.perf_counter`` (wall) and
``time.thread_time`` (CPU, which includes the kernel's work inside our syscalls) around
each call; best round, median in brackets.

With 1,008 links in the host netns, 1,003 of them veths whose peers each sit in their
own netns (1,004 nsids)::

    links()                     22 ms wall [29], 17.5 ms CPU
    links("veth")               23 ms wall [30], 16.4 ms CPU
      the kernel's part: a bare RTM_GETLINK dump, send + recv, no decoding: 12 ms [16]
    500 netnsid() calls         7.1 ms [9.4]; bare RTM_GETNSID round trips: 5.3 ms
    pyroute2 0.9.7, same host:  IPRoute().get_links() 299 ms [459];
                                500 get_netnsid(fd=...) 66 ms [84]

With half of that (508 links, 503 such veths: the 500 pods of a busy node)::

    links() 9.1 ms, links("veth") 8.8 ms, 500 netnsid() 5.0 ms
    pyroute2: get_links() 126 ms, 500 get_netnsid() 84 ms

The tc requests, on 200 veths with a clsact each, a cls_bpf filter on ingress (20
interleaved rounds, as above; CPU within 0.1 ms of wall)::

    200 replace_bpf_filter()    3.4 ms wall [4.2]   (17 us each, the kernel's swap included)
    200 filters() dumps         5.3 ms [6.8]        (each finding one filter)
    200 delete_filter()         2.5 ms [3.3]
    pyroute2 0.9.7, same calls: tc("replace-filter", "bpf", ...) 96 ms [111],
                                get_filters(index=, parent=) 79 ms [89],
                                tc("del-filter", "bpf", ...) 82 ms [93]

Our Python costs about 6-7 us a link (one pass over its ~42 attributes, read through
a memoryview cast rather than struct calls) and 3.5 us a netnsid(). The rest is the
kernel, and it grows faster than the links: filling IFLA_LINK_NETNSID, like answering
RTM_GETNSID, looks the peer netns up by walking the host's nsid table linearly (~15 ns
an entry here; one RTM_GETLINK takes 8 us for lo, 24 us for a veth with nsid 999), so a
full dump is quadratic in the number of pod netns. Asking the kernel for one kind does
not help on a node whose links are nearly all veths.

Each thread makes its own ``Rtnl``; one ``Rtnl`` serves any number of requests.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

# <linux/netlink.h>
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100     # in a NEW request: replace what is there
NLM_F_EXCL = 0x200        # in a NEW request: fail with EEXIST if it is there
NLM_F_CREATE = 0x400      # in a NEW request: create it if it is not there
NLM_F_CAPPED = 0x100      # in an NLMSG_ERROR: the request was not echoed back
NLM_F_ACK_TLVS = 0x200    # in an NLMSG_ERROR: extended-ack attributes follow
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWNSID = 88
RTM_GETNSID = 90
RTMGRP_LINK = 1
RTMGRP_TC = 8  # 1 << (RTNLGRP_TC - 1): qdiscs and filters added and removed
RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 37, 44, 45, 46
TCA_KIND = 1
TCA_OPTIONS = 2
_TC_TYPES = frozenset((RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER))

# <linux/if_link.h>
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_STATS64 = 23
IFLA_TARGET_NETNSID = 46
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND = 1

# <linux/pkt_sched.h>
TC_H_CLSACT = 0xFFFFFFF1         # = TC_H_INGRESS: clsact's parent (the device's ingress slot)
TC_H_CLSACT_HANDLE = 0xFFFF0000  # TC_H_MAKE(TC_H_CLSACT, 0): clsact's own handle, ffff:
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
TC_PARENT_INGRESS = 0xFFFF0000 | TC_H_MIN_INGRESS  # ffff:fff2, clsact's ingress hook
TC_PARENT_EGRESS = 0xFFFF0000 | TC_H_MIN_EGRESS    # ffff:fff3, its egress hook

# <linux/pkt_cls.h>
TCA_BPF_CLASSID = 3
TCA_BPF_FD = 6
TCA_BPF_NAME = 7
TCA_BPF_FLAGS = 8
TCA_BPF_ID = 11                  # in a dump: the program's id (kernel 4.13)
TCA_BPF_FLAG_ACT_DIRECT = 1      # "direct-action": the program's return code is the verdict

# <linux/if_ether.h>
ETH_P_ALL = 0x0003               # goes into tcm_info in network order, as tc and pyroute2 send it

# <linux/if_addr.h>
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_TARGET_NETNSID = 10

# <linux/net_namespace.h>
NETNSA_NSID = 1
NETNSA_FD = 3
NETNSA_NSID_NOT_ASSIGNED = -1

_NLMSGHDR = struct.Struct("=IHHII")   # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")        # len, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_RTGENMSG = struct.Struct("=Bxxx")    # family, padded to NLMSG_ALIGNTO
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_TCMSG = struct.Struct("=BxxxiIII")   # family, 3 pad, ifindex, handle, parent, info (prio << 16 | protocol)
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")
_STATS4 = struct.Struct("=4Q")        # rtnl_link_stats64: rx/tx packets, rx/tx bytes come first
_TX_DROPPED = struct.Struct("=Q")      # ... then rx/tx errors, rx_dropped, tx_dropped
_TX_DROPPED_AT = 7 * 8
_HDRLEN = _NLMSGHDR.size
_S32_MAX = 2**31 - 1
_U32_MAX = 2**32 - 1

# The kernel sends dump parts of at most 32 KiB (it caps the size it learns from our
# recv calls), so this fits every part; a bigger single reply grows it (see _recv).
_BUFSIZE = 64 * 1024
_ATTEMPTS = 3           # for a truncated reply, an EBUSY dump or NLM_F_DUMP_INTR
_FLUSH_LIMIT = 1 << 16  # datagrams read before giving up on a stream that never ends
# The attribute types _parse_link wants, with every combination of the two flag bits,
# so that the hot loop tests the raw nla_type.
_LINK_ATTRS = frozenset(t | flags
                        for t in (IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_STATS64,
                                  IFLA_LINK_NETNSID)
                        for flags in (0, NLA_F_NESTED, NLA_F_NET_BYTEORDER,
                                      NLA_F_NESTED | NLA_F_NET_BYTEORDER))


class RtnlError(OSError):
    """A failed, truncated or malformed rtnetlink exchange; errno says why."""


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


@dataclass(frozen=True, slots=True)
class TcFilter:
    """One classifier on a tc hook, as a filter dump gives it."""

    kind: str              # TCA_KIND: "bpf", "u32", "matchall", ...
    parent: int            # tcm_parent: TC_PARENT_INGRESS or TC_PARENT_EGRESS on clsact
    prio: int              # tc's "pref": the upper half of tcm_info
    handle: int            # tcm_handle
    protocol: int          # the lower half of tcm_info, in host order (ETH_P_ALL is 3)
    name: str = ""         # TCA_BPF_NAME; "" if absent or not a bpf filter
    prog_id: int = 0       # TCA_BPF_ID; 0 if absent or not a bpf filter
    direct_action: bool = False  # TCA_BPF_FLAGS has TCA_BPF_FLAG_ACT_DIRECT


@dataclass(frozen=True)
class Address:
    """An interface address: family 4 or 6, the interface's index, the address bytes."""

    family: int
    ifindex: int
    address: bytes


class _Socket(Protocol):
    """What we use of socket.socket (the unit tests pass a scripted stand-in)."""

    def send(self, data: bytes, /) -> int: ...
    def recv_into(self, buffer: bytearray, nbytes: int, flags: int, /) -> int: ...
    def close(self) -> None: ...


class _RetryError(Exception):
    """Internal: start the request again (a reply did not fit the receive buffer)."""


T = TypeVar("T")


def _open(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            try:
                # CAP_ACK: errors do not echo our request; EXT_ACK: the kernel says why.
                sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError:
                pass  # older kernels: plain errno, which is all we need
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def _malformed(what: str, detail: str) -> RtnlError:
    return RtnlError(errno.EBADMSG, f"{what}: malformed reply: {detail}")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(atype: int, payload: bytes) -> bytes:
    pad = b"\0" * (_align(len(payload)) - len(payload))
    return _NLATTR.pack(_NLATTR.size + len(payload), atype) + payload + pad


def _cbytes(buf: bytearray, start: int, end: int) -> bytes:
    """A NUL-terminated string attribute's payload (a missing NUL ends at the payload's end)."""
    nul = buf.find(0, start, end)
    return bytes(buf[start:end if nul < 0 else nul])


def _cstr(buf: bytearray, start: int, end: int) -> str:
    # Interface names are bytes to the kernel; surrogateescape keeps odd ones round-trippable.
    return _cbytes(buf, start, end).decode("utf-8", "surrogateescape")


def _spans(buf: bytearray, start: int, end: int, what: str) -> dict[int, tuple[int, int]]:
    """(payload start, payload end) of each attribute among [start, end), by type without
    the flag bits; the last one of a type wins."""
    found = {}
    a = start
    while a < end:
        alen, atype = _NLATTR.unpack_from(buf, a) if end - a >= 4 else (0, 0)
        if alen < 4 or alen > end - a:
            raise _malformed(what, f"attribute length {alen}, {end - a} bytes left in its message or parent")
        found[atype & NLA_TYPE_MASK] = (a + 4, a + alen)
        a += _align(alen)
    return found


def _find(buf: bytearray, start: int, end: int, want: int, what: str) -> tuple[int, int]:
    """(payload start, payload end) of the attribute `want` among [start, end), or (0, 0)."""
    return _spans(buf, start, end, what).get(want, (0, 0))


def _u32_in(buf: bytearray, spans: dict[int, tuple[int, int]], atype: int, what: str) -> int:
    """A u32 attribute's value out of _spans' answer; 0 if it is absent."""
    at, at_end = spans.get(atype, (0, 0))
    if not at:
        return 0
    if at_end - at < 4:
        raise _malformed(what, f"attribute {atype} is shorter than 4 bytes")
    value: int = _U32.unpack_from(buf, at)[0]
    return value


def _parse_link(buf: bytearray, w: memoryview, off: int, end: int, *, want_kind: bytes | None,
                what: str) -> Link | None:
    """One RTM_NEWLINK payload; None if want_kind is given and the link is of another kind.

    `w` is `buf` read as native u32s. Messages and attributes are 4-byte aligned, so
    w[a >> 2] is an attribute's header, nla_len in the low half and nla_type above.
    """
    if end - off < _IFINFOMSG.size:
        raise _malformed(what, "short ifinfomsg")
    ifindex = _S32.unpack_from(buf, off + 4)[0]
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
            raise _malformed(what, f"link {ifindex}: attribute length {alen} at {a - off}")
        if v >> 16 in _LINK_ATTRS:
            atype = (v >> 16) & NLA_TYPE_MASK
            if atype == IFLA_IFNAME:
                name = (a + 4, a + alen)
            elif atype == IFLA_LINKINFO:
                info = (a + 4, a + alen)
            elif atype == IFLA_STATS64:
                stats = (a + 4, a + alen)
            elif alen < 8:  # the other three are u32/s32
                raise _malformed(what, f"link {ifindex}: attribute {atype} is shorter than 4 bytes")
            elif atype == IFLA_LINK:
                link_at = a + 4
            elif atype == IFLA_MASTER:
                master_at = a + 4
            else:
                nsid_at = a + 4
        last = a
        a += (alen + 3) & ~3
    if a > end and last + (w[last >> 2] & 0xFFFF) > end:
        raise _malformed(what, f"link {ifindex}: attribute at {last - off} overruns the message")

    kind = b""
    if info[0]:
        kind_at, kind_end = _find(buf, info[0], info[1], IFLA_INFO_KIND, what)
        if kind_at:
            kind = _cbytes(buf, kind_at, kind_end)
    if want_kind is not None and kind != want_kind:
        return None
    if not name[0]:
        raise _malformed(what, f"link {ifindex} has no IFLA_IFNAME")
    if stats[0]:
        if stats[1] - stats[0] < _STATS4.size:
            raise _malformed(what, f"link {ifindex}: short IFLA_STATS64")
        rx_packets, tx_packets, rx_bytes, tx_bytes = _STATS4.unpack_from(buf, stats[0])
        tx_dropped = (_TX_DROPPED.unpack_from(buf, stats[0] + _TX_DROPPED_AT)[0]
                      if stats[1] - stats[0] >= _TX_DROPPED_AT + 8 else 0)
    else:
        rx_packets = tx_packets = rx_bytes = tx_bytes = tx_dropped = 0
    return Link(
        ifindex=ifindex,
        name=_cstr(buf, name[0], name[1]),
        kind=kind.decode("utf-8", "surrogateescape"),
        link_netnsid=_S32.unpack_from(buf, nsid_at)[0] if nsid_at else None,
        link=w[link_at >> 2] if link_at else 0,
        master=w[master_at >> 2] if master_at else 0,
        rx_packets=rx_packets, tx_packets=tx_packets, rx_bytes=rx_bytes, tx_bytes=tx_bytes,
        tx_dropped=tx_dropped,
    )


def _parse_nsid(buf: bytearray, off: int, end: int, what: str) -> int | None:
    """One RTM_NEWNSID payload: rtgenmsg (padded to 4), then NETNSA_NSID (s32)."""
    at, at_end = _find(buf, off + _RTGENMSG.size, end, NETNSA_NSID, what)
    if not at or at_end - at < 4:
        raise _malformed(what, "no NETNSA_NSID")
    nsid: int = _S32.unpack_from(buf, at)[0]
    return None if nsid == NETNSA_NSID_NOT_ASSIGNED else nsid


def _parse_filter(buf: bytearray, off: int, end: int, what: str) -> TcFilter | None:
    """One RTM_NEWTFILTER payload of a dump; None for a classifier's own entry.

    The kernel starts each classifier instance (one per chain and prio) of a dump with
    an entry for the instance itself: handle 0, TCA_KIND and TCA_CHAIN, no TCA_OPTIONS
    (tcf_chain_dump); `tc filter show` prints it as the line without a handle,
    "filter protocol all pref 1 bpf chain 0". Those are skipped: no classifier gives
    one of its filters handle 0 (cls_bpf picks a free one when asked for 0).
    """
    if end - off < _TCMSG.size:
        raise _malformed(what, "short tcmsg")
    _family, _ifindex, handle, parent, info = _TCMSG.unpack_from(buf, off)
    if not handle:
        return None
    attrs = _spans(buf, off + _TCMSG.size, end, what)
    kind_at, kind_end = attrs.get(TCA_KIND, (0, 0))
    if not kind_at:
        raise _malformed(what, f"filter {handle:#x} has no TCA_KIND")
    kind = _cstr(buf, kind_at, kind_end)
    name, prog_id, flags = "", 0, 0
    opt_at, opt_end = attrs.get(TCA_OPTIONS, (0, 0))
    if kind == "bpf" and opt_at:
        bpf = _spans(buf, opt_at, opt_end, what)
        name_at, name_end = bpf.get(TCA_BPF_NAME, (0, 0))
        name = _cstr(buf, name_at, name_end) if name_at else ""
        prog_id = _u32_in(buf, bpf, TCA_BPF_ID, what)
        flags = _u32_in(buf, bpf, TCA_BPF_FLAGS, what)
    return TcFilter(kind=kind, parent=parent, prio=info >> 16, handle=handle,
                    protocol=socket.ntohs(info & 0xFFFF), name=name, prog_id=prog_id,
                    direct_action=bool(flags & TCA_BPF_FLAG_ACT_DIRECT))


def _tc_id(handle: int) -> str:
    """A tc handle or parent as tc writes it: ffff:fff2."""
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def _tcmsg(what: str, ifindex: int, *, handle: int, parent: int, prio: int | None) -> bytes:
    """A struct tcmsg; with `prio`, a filter's (tcm_info: prio and ETH_P_ALL). Numbers out
    of range fail here, as the kernel would, rather than in struct or on a wrong filter
    (prio 0 asks the kernel to pick one; with no handle it deletes a whole chain)."""
    if not 0 < ifindex <= _S32_MAX:
        raise RtnlError(errno.ENODEV, f"{what}: no such device")
    if not (0 <= handle <= _U32_MAX and 0 <= parent <= _U32_MAX):
        raise RtnlError(errno.EINVAL, f"{what}: handle or parent out of range")
    info = 0
    if prio is not None:
        if not 0 < prio <= 0xFFFF:
            raise RtnlError(errno.EINVAL, f"{what}: prio out of range (1-65535)")
        info = prio << 16 | socket.htons(ETH_P_ALL)
    return _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)


def _ext_ack(buf: bytearray, off: int, end: int, flags: int) -> str:
    """The kernel's extended-ack message in an NLMSG_ERROR payload, or ""."""
    if not flags & NLM_F_ACK_TLVS or end - off < 4 + _HDRLEN:
        return ""
    echoed = _HDRLEN if flags & NLM_F_CAPPED else _NLMSGHDR.unpack_from(buf, off + 4)[0]
    a, msg = off + 4 + _align(echoed), ""
    while end - a >= 4:
        alen, atype = _NLATTR.unpack_from(buf, a)
        if alen < 4 or alen > end - a:
            return ""  # an unreadable explanation is no reason to hide the errno
        if atype & NLA_TYPE_MASK == NLMSGERR_ATTR_MSG:
            msg = _cstr(buf, a + 4, a + alen)
        a += _align(alen)
    return msg


def _kernel_error(what: str, code: int, detail: str) -> RtnlError:
    text = f"{what}: {os.strerror(code)}" + (f" ({detail})" if detail else "")
    return RtnlError(code, text)


class Rtnl:
    """One rtnetlink socket for requests (not for events: see LinkEvents)."""

    def __init__(self, *, sock: _Socket | None = None) -> None:
        """Opens and binds the socket; `sock` is for tests only."""
        self._sock: _Socket | None = sock if sock is not None else _open(0)
        self._seq = int.from_bytes(os.urandom(2), "little")  # any start: replies are matched by it
        # Set while a request may have left replies in the socket (it failed, or was
        # abandoned half-read): the next request reads them away first, because a new
        # dump cannot start while an old one is still running (EBUSY).
        self._dirty = False
        self._interrupted = False
        self._is_strict = False  # NETLINK_GET_STRICT_CHK set (by the first targeted dump)
        self._set_buffer(_BUFSIZE)

    def _strict(self) -> None:
        setsockopt = getattr(self._sock, "setsockopt", None)  # a test's fake has none
        if setsockopt is not None and not self._is_strict:
            setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self._is_strict = True

    def _set_buffer(self, size: int) -> None:
        self._buf = bytearray(_align(size))
        self._w = memoryview(self._buf).cast("I")

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- the requests ------------------------------------------------------------------

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
            body += _attr(IFLA_LINKINFO | NLA_F_NESTED, _attr(IFLA_INFO_KIND, want + b"\0"))
        what = "RTM_GETLINK dump" + (f" kind {kind}" if kind is not None else "")

        def parse(off: int, end: int) -> Link | None:
            return _parse_link(self._buf, self._w, off, end, want_kind=want, what=what)

        return self._call(what, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWLINK, parse=parse)

    def link(self, ifindex: int, nsid: int | None = None) -> Link | None:
        """One link by ifindex; None if there is none (ENODEV). With `nsid`, the link of
        that index in the netns the host numbers so (a veth's peer in its pod: its
        statistics, read without entering the pod's netns; IFLA_TARGET_NETNSID, 4.20)."""
        if not 0 < ifindex <= _S32_MAX:
            return None  # no link has it; and the kernel would read 0 as "look up by name"
        what = f"RTM_GETLINK ifindex {ifindex}" + (f" nsid {nsid}" if nsid is not None else "")
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)
        if nsid is not None:
            body += _attr(IFLA_TARGET_NETNSID, _S32.pack(nsid))

        def parse(off: int, end: int) -> Link | None:
            return _parse_link(self._buf, self._w, off, end, want_kind=None, what=what)

        try:
            found = self._call(what, RTM_GETLINK, NLM_F_REQUEST, body, reply_type=RTM_NEWLINK, parse=parse)
        except RtnlError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        if len(found) != 1:
            raise _malformed(what, f"{len(found)} links in the reply")
        return found[0]

    def netnsid(self, fd: int) -> int | None:
        """The host's id for the netns behind `fd` (RTM_GETNSID); None if it has none.

        Asking does not assign one: the kernel numbers a netns when something needs
        it, typically when a veth with its peer there is first shown to this netns.
        """
        what = f"RTM_GETNSID fd {fd}"
        if not 0 <= fd <= _S32_MAX:
            raise RtnlError(errno.EBADF, f"{what}: not a file descriptor")
        body = _RTGENMSG.pack(socket.AF_UNSPEC) + _attr(NETNSA_FD, _U32.pack(fd))

        # One-element list: the reply itself may say "no id" (None).
        def parse(off: int, end: int) -> list[int | None]:
            return [_parse_nsid(self._buf, off, end, what)]

        found = self._call(what, RTM_GETNSID, NLM_F_REQUEST, body, reply_type=RTM_NEWNSID, parse=parse)
        if len(found) != 1:
            raise _malformed(what, f"{len(found)} replies")
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
            body += _attr(IFA_TARGET_NETNSID, _S32.pack(nsid))
        what = "RTM_GETADDR dump" + (f" nsid {nsid}" if nsid is not None else "")

        def parse(off: int, end: int) -> Address | None:
            if end - off < _IFADDRMSG.size:
                raise _malformed(what, "a reply shorter than ifaddrmsg")
            family, _plen, _flags, _scope, index = _IFADDRMSG.unpack_from(self._buf, off)
            if family not in (socket.AF_INET, socket.AF_INET6):
                return None
            found: dict[int, bytes] = {}
            pos = off + _align(_IFADDRMSG.size)
            while pos + _NLATTR.size <= end:
                alen, atype = _NLATTR.unpack_from(self._buf, pos)
                if alen < _NLATTR.size or pos + alen > end:
                    raise _malformed(what, "an attribute runs past its message")
                if atype & NLA_TYPE_MASK in (IFA_ADDRESS, IFA_LOCAL):
                    found[atype & NLA_TYPE_MASK] = bytes(self._buf[pos + _NLATTR.size:pos + alen])
                pos += _align(alen)
            raw = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
            if raw is None or len(raw) != (4 if family == socket.AF_INET else 16):
                return None
            return Address(4 if family == socket.AF_INET else 6, index, raw)

        return self._call(what, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWADDR, parse=parse)

    # -- tc ------------------------------------------------------------------------------
    #
    # Each change asks for an ACK (NLM_F_ACK), so that success is an answer too, and is
    # sent once: never again after an error, which is the caller's to judge.

    def add_clsact(self, ifindex: int) -> None:
        """Adds a clsact qdisc to a device. One already there (the CNI's, or ours from
        before) fails with errno EEXIST, as does an ingress qdisc (same slot)."""
        what = f"RTM_NEWQDISC clsact ifindex {ifindex}"
        body = _tcmsg(what, ifindex, handle=TC_H_CLSACT_HANDLE, parent=TC_H_CLSACT, prio=None)
        self._change(what, RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL,
                     body + _attr(TCA_KIND, b"clsact\0"))

    def add_bpf_filter(self, ifindex: int, *, parent: int, prio: int, handle: int, fd: int,
                       name: str, direct_action: bool = True, classid: int = 1) -> None:
        """Adds a cls_bpf filter running program `fd`; EEXIST if this prio and handle
        hold one (of any kind) already."""
        self._bpf_filter("add", NLM_F_CREATE | NLM_F_EXCL, ifindex, parent=parent, prio=prio,
                         handle=handle, fd=fd, name=name, direct_action=direct_action, classid=classid)

    def replace_bpf_filter(self, ifindex: int, *, parent: int, prio: int, handle: int, fd: int,
                           name: str, direct_action: bool = True, classid: int = 1) -> None:
        """Puts a cls_bpf filter running program `fd` at this prio and handle: a new one,
        or the one there swapped in place (atomically: no packet sees neither program).
        A filter of another kind there fails (EINVAL)."""
        self._bpf_filter("replace", NLM_F_CREATE | NLM_F_REPLACE, ifindex, parent=parent, prio=prio,
                         handle=handle, fd=fd, name=name, direct_action=direct_action, classid=classid)

    def _bpf_filter(self, op: str, flags: int, ifindex: int, *, parent: int, prio: int, handle: int,
                    fd: int, name: str, direct_action: bool, classid: int) -> None:
        # Byte for byte what pyroute2 0.9's tc("replace-filter"/"add-filter", "bpf", ...)
        # sends, attributes in its order: TCA_KIND "bpf", then TCA_OPTIONS (not marked
        # nested) { CLASSID, FD, NAME, FLAGS }, FLAGS always there.
        what = (f"RTM_NEWTFILTER {op} bpf {name!r} ifindex {ifindex} parent {_tc_id(parent)} "
                f"prio {prio} handle {handle:#x}")
        body = _tcmsg(what, ifindex, handle=handle, parent=parent, prio=prio)
        if not 0 <= fd <= _S32_MAX:
            raise RtnlError(errno.EBADF, f"{what}: not a file descriptor")
        if not 0 <= classid <= _U32_MAX:
            raise RtnlError(errno.EINVAL, f"{what}: classid out of range")
        options = (_attr(TCA_BPF_CLASSID, _U32.pack(classid)) + _attr(TCA_BPF_FD, _U32.pack(fd))
                   + _attr(TCA_BPF_NAME, name.encode("utf-8", "surrogateescape") + b"\0")
                   + _attr(TCA_BPF_FLAGS, _U32.pack(TCA_BPF_FLAG_ACT_DIRECT if direct_action else 0)))
        self._change(what, RTM_NEWTFILTER, flags,
                     body + _attr(TCA_KIND, b"bpf\0") + _attr(TCA_OPTIONS, options))

    def delete_filter(self, ifindex: int, *, parent: int, prio: int, handle: int | None = None,
                      kind: str | None = "bpf") -> None:
        """Deletes the filter at this prio and handle, or with no handle every filter at
        this prio. The kernel says ENOENT if there is none, EINVAL if the prio holds
        another kind (or protocol: ours is ETH_P_ALL), ENODEV without the device;
        `kind` None sends no kind and deletes whatever kind is there."""
        what = (f"RTM_DELTFILTER {kind or ''} ifindex {ifindex} parent {_tc_id(parent)} prio {prio}"
                + (f" handle {handle:#x}" if handle is not None else ""))
        body = _tcmsg(what, ifindex, handle=handle or 0, parent=parent, prio=prio)
        if kind is not None:
            body += _attr(TCA_KIND, kind.encode("utf-8", "surrogateescape") + b"\0")
        self._change(what, RTM_DELTFILTER, 0, body)

    def filters(self, ifindex: int, parent: int) -> list[TcFilter]:
        """The filters on one hook of a device (RTM_GETTFILTER dump), in the kernel's
        order (by chain, then prio). Empty if the device has no such hook, or no device
        by that index: the kernel answers those dumps with nothing, not an error."""
        what = f"RTM_GETTFILTER dump ifindex {ifindex} parent {_tc_id(parent)}"
        body = _tcmsg(what, ifindex, handle=0, parent=parent, prio=None)

        def parse(off: int, end: int) -> TcFilter | None:
            return _parse_filter(self._buf, off, end, what)

        return self._call(what, RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, body,
                          reply_type=RTM_NEWTFILTER, parse=parse)

    # -- the exchange ------------------------------------------------------------------

    def _change(self, what: str, msg_type: int, flags: int, body: bytes) -> None:
        """Sends one change with NLM_F_ACK and waits for the ACK; a kernel error raises."""
        try:
            for _ in self._exchange(what, msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, body):
                pass  # a change gets only its ACK back (we never ask for NLM_F_ECHO)
        except _RetryError as exc:
            raise RtnlError(errno.EMSGSIZE, f"{what}: {exc}") from None

    def _call(self, what: str, msg_type: int, flags: int, body: bytes, *, reply_type: int,
              parse: Callable[[int, int], T | None]) -> list[T]:
        """Sends a request and parses each reply of reply_type; retries what is worth it."""
        out: list[T] = []
        for attempt in range(_ATTEMPTS):
            last = attempt == _ATTEMPTS - 1
            out = []
            try:
                for mtype, off, end in self._exchange(what, msg_type, flags, body):
                    if mtype != reply_type:
                        continue
                    item = parse(off, end)
                    if item is not None:
                        out.append(item)
            except _RetryError as retry:
                if last:
                    raise RtnlError(errno.EMSGSIZE, f"{what}: {retry}") from None
                continue
            except RtnlError as exc:
                # EBUSY: a dump of ours still runs (the flush could not end it): once more.
                if exc.errno != errno.EBUSY or last:
                    raise
                self._dirty = True
                continue
            # NLM_F_DUMP_INTR: links changed during the dump, which may have missed or
            # doubled some. Dump again; if it keeps happening, return the last one: the
            # change that interrupted it also makes a LinkEvents readable.
            if not self._interrupted:
                break
        return out

    def _exchange(self, what: str, msg_type: int, flags: int,
                  body: bytes) -> Iterator[tuple[int, int, int]]:
        """Yields (type, payload start, end) of each reply to one request.

        Offsets are into self._buf, valid until the next item is asked for. Replies of
        other (older) requests are skipped by sequence number. Sets self._interrupted
        if any reply, NLMSG_DONE included, carries NLM_F_DUMP_INTR.
        """
        if self._sock is None:
            raise RtnlError(errno.EBADF, f"{what}: the Rtnl is closed")
        sock = self._sock
        if self._dirty:
            self._flush(what)
        self._seq = seq = self._seq % 0xFFFFFFFF + 1
        self._dirty = True
        self._interrupted = False
        try:
            sock.send(_NLMSGHDR.pack(_HDRLEN + len(body), msg_type, flags, seq, 0) + body)
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, f"{what}: send: {exc.strerror}") from exc
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        while True:
            n = self._recv(what)
            buf = self._buf
            off = 0
            while off < n:
                if n - off < _HDRLEN:
                    raise _malformed(what, f"{n - off} bytes left over after the last message")
                mlen, mtype, mflags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
                if mlen < _HDRLEN or mlen > n - off:
                    raise _malformed(what, f"message length {mlen} with {n - off} bytes left")
                end = off + mlen
                if mseq == seq:
                    if mflags & NLM_F_DUMP_INTR:
                        self._interrupted = True
                    if mtype in (NLMSG_ERROR, NLMSG_DONE):
                        # Both carry an int: a negated errno, or 0 (an ACK; a clean DONE).
                        # A dump's DONE may be bare on old kernels.
                        if mtype == NLMSG_ERROR and mlen < _HDRLEN + 4:
                            raise _malformed(what, "short NLMSG_ERROR")
                        code = _S32.unpack_from(buf, off + _HDRLEN)[0] if mlen >= _HDRLEN + 4 else 0
                        self._dirty = False
                        if code:
                            raise _kernel_error(what, -code, _ext_ack(buf, off + _HDRLEN, end, mflags))
                        return
                    if mtype != NLMSG_NOOP:
                        yield mtype, off + _HDRLEN, end
                        if not dump:
                            self._dirty = False
                            return
                off += (mlen + 3) & ~3

    def _recv(self, what: str, flags: int = 0) -> int:
        """One datagram into self._buf; returns its length."""
        if self._sock is None:
            raise RtnlError(errno.EBADF, f"{what}: the Rtnl is closed")
        try:
            # MSG_TRUNC: returns the datagram's real length even if it did not fit.
            n = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC | flags)
        except BlockingIOError:
            raise
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, f"{what}: recv: {exc.strerror}") from exc
        if n > len(self._buf):
            # The rest of that datagram is lost. Make room, and let _call start over
            # (the flush before it reads away whatever is left of this reply).
            self._set_buffer(max(n, 2 * len(self._buf)))
            raise _RetryError(f"a {n}-byte reply did not fit the receive buffer")
        return n

    def _flush(self, what: str) -> None:
        """Reads away every pending datagram, ending any dump of ours still running.

        A dump queues its next part while we read the last one, so reading until
        nothing is pending runs it to its end.
        """
        for _ in range(_FLUSH_LIMIT):
            try:
                self._recv(what, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._dirty = False
                return
            except (_RetryError, RtnlError):
                pass  # stale data anyway
        raise RtnlError(errno.EBUSY, f"{what}: the socket would not drain")


def _count_messages(buf: bytearray, n: int, tc: set[int] | None = None) -> int:
    """How many netlink messages a datagram holds (at least 1: it woke us up) that are
    not tc messages; the ifindex of each tc message (struct tcmsg: family, 3 bytes of
    padding, then the ifindex) goes into `tc`."""
    count, off, others = 0, 0, 0
    while n - off >= _HDRLEN:
        mlen, mtype = struct.unpack_from("=IH", buf, off)
        if mlen < _HDRLEN:
            break  # garbage: the datagram still counts as one event
        count += 1
        if mtype in _TC_TYPES and tc is not None and mlen >= _HDRLEN + 8:
            tc.add(_S32.unpack_from(buf, off + _HDRLEN + 4)[0])
        else:
            others += 1
        off += _align(mlen)
    return max(others, 1) if count == 0 or others else 0


class LinkEvents:
    """A socket subscribed to RTMGRP_LINK and RTMGRP_TC: readable when links are added,
    changed or removed, or a device's qdiscs and filters.

    A link event means "rescan": drain() counts them and reads no more. A tc event
    names its device: drain() adds it to `tc_changed`, for the reconciler to check
    that what it attached there is still there (someone may have removed our filter,
    or put theirs before ours). An overflow (ENOBUFS: the kernel dropped events for
    us) counts as a link event, and in `overflows`.
    """

    _EVENT_RCVBUF = 1 << 20   # asked for; the kernel caps it at net.core.rmem_max

    def __init__(self, *, sock: _Socket | None = None) -> None:
        """Opens, binds and subscribes the socket; `sock` is for tests only."""
        if sock is None:
            real = _open(RTMGRP_LINK | RTMGRP_TC)
            real.setblocking(False)
            try:
                # Room for a burst (a node starting 100 pods), so overflows stay rare.
                real.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._EVENT_RCVBUF)
            except OSError:
                pass
            self._fd = real.fileno()
            sock = real
        else:
            self._fd = -1
        self._sock: _Socket | None = sock
        self._buf = bytearray(_BUFSIZE)
        self.overflows = 0
        self.tc_changed: set[int] = set()  # ifindexes with tc events since the caller cleared it

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> int:
        """Reads everything pending without blocking; returns how many messages."""
        if self._sock is None:
            raise RtnlError(errno.EBADF, "link events: closed")
        count = 0
        # Bounded, so a flood of events cannot keep us here: what is left keeps the
        # socket readable, and the caller comes back.
        for _ in range(_FLUSH_LIMIT):
            try:
                n = self._sock.recv_into(self._buf, 0, socket.MSG_TRUNC | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise RtnlError(exc.errno or errno.EIO, f"link events: recv: {exc.strerror}") from exc
                self.overflows += 1
                count += 1
                continue
            count += _count_messages(self._buf, min(n, len(self._buf)), self.tc_changed)
        return count

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> LinkEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
