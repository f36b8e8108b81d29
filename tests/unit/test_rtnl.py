"""monitor.kernel.rtnl against scripted kernel replies, built here with struct (not with rtnl's encoders)."""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque
from collections.abc import Callable

import pytest

from monitor.kernel.linkevents import LinkEvents
from monitor.kernel.rtnl import Rtnl
from monitor.kernel.rtnlwire import RtnlError

# Kernel numbers, written out again so that a wrong constant in the module shows up here.
RTM_NEWLINK, RTM_GETLINK, RTM_NEWNSID, RTM_GETNSID = 16, 18, 88, 90
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x300
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_STATS64, IFLA_AF_SPEC, IFLA_LINK_NETNSID = 18, 23, 26, 37
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
NETNSA_NSID, NETNSA_FD = 1, 3


# -- builders ---------------------------------------------------------------------------

def nla(atype: int, payload: bytes) -> bytes:
    pad = -len(payload) % 4
    return struct.pack("=HH", 4 + len(payload), atype) + payload + b"\0" * pad


def nla_u32(atype: int, value: int) -> bytes:
    return nla(atype, struct.pack("=I", value))


def nla_s32(atype: int, value: int) -> bytes:
    return nla(atype, struct.pack("=i", value))


def nla_str(atype: int, text: str) -> bytes:
    return nla(atype, text.encode() + b"\0")


def stats64(rx_packets: int, tx_packets: int, rx_bytes: int, tx_bytes: int,
            tx_dropped: int = 0) -> bytes:
    # struct rtnl_link_stats64: 24 u64 counters (the kernel's current size), ours first;
    # rx/tx_errors and rx_dropped between them and tx_dropped (the 8th).
    return nla(IFLA_STATS64, struct.pack("=24Q", rx_packets, tx_packets, rx_bytes, tx_bytes,
                                         0, 0, 99, tx_dropped, *[0] * 16))


def nlmsg(mtype: int, flags: int, seq: int, payload: bytes, *, pid: int = 4242) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, pid) + payload


def newlink(seq: int, ifindex: int, *attrs: bytes, flags: int = NLM_F_MULTI) -> bytes:
    ifinfomsg = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, ifindex, 0x1003, 0)
    return nlmsg(RTM_NEWLINK, flags, seq, ifinfomsg + b"".join(attrs))


def veth(seq: int, ifindex: int, name: str, *, nsid: int, peer: int, master: int | None = None,
         stats: tuple[int, ...] = (1, 2, 3, 4), flags: int = NLM_F_MULTI) -> bytes:
    attrs = [nla_str(IFLA_IFNAME, name), nla_u32(IFLA_MTU, 1500), nla_u32(IFLA_LINK, peer)]
    if master is not None:
        attrs.append(nla_u32(IFLA_MASTER, master))
    attrs += [nla(IFLA_ADDRESS, b"\x02\0\0\0\0\x01"), stats64(*stats),
              nla(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "veth")),
              nla_s32(IFLA_LINK_NETNSID, nsid),
              nla(IFLA_AF_SPEC | NLA_F_NESTED, nla(2, nla_u32(1, 7)))]
    return newlink(seq, ifindex, *attrs, flags=flags)


def loopback(seq: int) -> bytes:
    return newlink(seq, 1, nla_str(IFLA_IFNAME, "lo"), nla_u32(IFLA_MTU, 65536))


def done(seq: int, code: int = 0) -> bytes:
    return nlmsg(NLMSG_DONE, NLM_F_MULTI, seq, struct.pack("=i", code))


def error(seq: int, code: int, *, extack: str | None = None) -> bytes:
    # struct nlmsgerr as a NETLINK_CAP_ACK socket gets it: error, then only the request's header.
    flags = NLM_F_CAPPED
    payload = struct.pack("=i", -code) + struct.pack("=IHHII", 32, RTM_GETLINK, 1, seq, 0)
    if extack is not None:
        flags |= NLM_F_ACK_TLVS
        payload += nla_str(1, extack)  # NLMSGERR_ATTR_MSG
    return nlmsg(NLMSG_ERROR, flags, seq, payload)


# -- a scripted kernel ------------------------------------------------------------------

Reply = Callable[[int, int, int, bytes], list[bytes | OSError]]


class FakeKernel:
    """Stands in for the netlink socket: each request queues the datagrams `reply` makes."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.requests: list[tuple[int, int, int, bytes]] = []
        self.pending: deque[bytes | OSError] = deque()
        self.closed = False

    def send(self, data: bytes, /) -> int:
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", data)
        assert length == len(data)
        self.requests.append((mtype, flags, seq, data[16:]))
        self.pending.extend(self.reply(mtype, flags, seq, data[16:]))
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        if not self.pending:
            if flags & socket.MSG_DONTWAIT:
                raise BlockingIOError(errno.EAGAIN, "nothing pending")
            raise AssertionError("recv on an empty socket would block forever")
        item = self.pending.popleft()
        if isinstance(item, OSError):
            raise item
        room = min(nbytes or len(buffer), len(buffer))
        buffer[:min(room, len(item))] = item[:room]
        return len(item) if flags & socket.MSG_TRUNC else min(room, len(item))

    def close(self) -> None:
        self.closed = True


def rtnl(reply: Reply) -> tuple[Rtnl, FakeKernel]:
    kernel = FakeKernel(reply)
    return Rtnl(sock=kernel), kernel


def one_dump(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
    """Two parts and a DONE, as the kernel sends a dump bigger than one datagram."""
    assert (mtype, flags & NLM_F_DUMP) == (RTM_GETLINK, NLM_F_DUMP)
    first = loopback(seq) + veth(seq, 7, "pnmrt0", nsid=3, peer=2, master=9)
    second = veth(seq, 8, "pnmrt1", nsid=4, peer=2, stats=(10, 20, 3000, 4000))
    return [first, second, done(seq)]


# -- links() ----------------------------------------------------------------------------

def test_dump_in_two_parts_then_done() -> None:
    rt, kernel = rtnl(one_dump)
    links = rt.links()
    assert [(lk.ifindex, lk.name, lk.kind) for lk in links] == [(1, "lo", ""), (7, "pnmrt0", "veth"),
                                                                (8, "pnmrt1", "veth")]
    pnmrt0, pnmrt1 = links[1], links[2]
    assert (pnmrt0.link_netnsid, pnmrt0.link, pnmrt0.master) == (3, 2, 9)
    assert (pnmrt0.rx_packets, pnmrt0.tx_packets, pnmrt0.rx_bytes, pnmrt0.tx_bytes) == (1, 2, 3, 4)
    assert (pnmrt1.master, pnmrt1.rx_packets, pnmrt1.tx_bytes) == (0, 10, 4000)
    # The request: RTM_GETLINK, a dump, one ifinfomsg of zeros and no attributes.
    assert kernel.requests == [(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, kernel.requests[0][2], bytes(16))]


def test_absent_attributes_take_their_defaults() -> None:
    rt, _ = rtnl(one_dump)
    lo = rt.links()[0]
    assert (lo.kind, lo.link_netnsid, lo.link, lo.master) == ("", None, 0, 0)
    assert (lo.rx_packets, lo.tx_packets, lo.rx_bytes, lo.tx_bytes) == (0, 0, 0, 0)


def test_nested_linkinfo_with_flag_bits_and_kind_filter() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        # LINKINFO marked NLA_F_NESTED, INFO_DATA after the kind, a NET_BYTEORDER attribute;
        # and a bridge the (pretend old) kernel did not filter out.
        info = nla(IFLA_LINKINFO | NLA_F_NESTED,
                   nla_str(IFLA_INFO_KIND, "veth") + nla(IFLA_INFO_DATA | NLA_F_NESTED, nla_u32(1, 5)))
        vethmsg = newlink(seq, 5, nla(99 | NLA_F_NET_BYTEORDER, b"\0\x50"), nla_str(IFLA_IFNAME, "pnmrt5"),
                          info, nla_s32(IFLA_LINK_NETNSID, 0))
        bridge = newlink(seq, 6, nla_str(IFLA_IFNAME, "pnmrtbr"),
                         nla(IFLA_LINKINFO, nla_str(IFLA_INFO_KIND, "bridge")))
        return [vethmsg + bridge + done(seq)]

    rt, kernel = rtnl(reply)
    links = rt.links("veth")
    assert [(lk.name, lk.kind, lk.link_netnsid) for lk in links] == [("pnmrt5", "veth", 0)]
    # The kind also went to the kernel: IFLA_LINKINFO { IFLA_INFO_KIND "veth\0" } after the ifinfomsg.
    body = kernel.requests[0][3]
    alen, atype = struct.unpack_from("=HH", body, 16)
    assert atype & ~NLA_F_NESTED == IFLA_LINKINFO
    assert body[20:16 + alen] == struct.pack("=HH", 9, IFLA_INFO_KIND) + b"veth\0" + bytes(3)  # padded
    assert [lk.name for lk in rt.links("bridge")] == ["pnmrtbr"]
    assert rt.links("vxlan") == []


def test_names_end_at_the_first_nul() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        return [newlink(seq, 3, nla(IFLA_IFNAME, b"pnmrt3\0junk\0")) + done(seq)]

    rt, _ = rtnl(reply)
    assert rt.links()[0].name == "pnmrt3"


def test_stale_replies_are_skipped() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        stale = veth(seq - 1, 99, "old", nsid=1, peer=2) + done(seq - 1)
        return [stale, nlmsg(NLMSG_NOOP, 0, seq, b""), *one_dump(mtype, flags, seq, body)]

    rt, _ = rtnl(reply)
    assert [lk.ifindex for lk in rt.links()] == [1, 7, 8]


def test_an_interrupted_dump_is_done_again() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        part = NLM_F_MULTI | (NLM_F_DUMP_INTR if len(kernel.requests) == 1 else 0)
        return [loopback(seq) + veth(seq, 7, "pnmrt0", nsid=1, peer=2, flags=part) + done(seq)]

    rt, kernel = rtnl(reply)
    assert len(rt.links()) == 2
    assert len(kernel.requests) == 2


def test_an_interrupted_flag_on_done_alone_counts_too() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        last = nlmsg(NLMSG_DONE, NLM_F_MULTI | NLM_F_DUMP_INTR, seq, struct.pack("=i", 0))
        return [loopback(seq) + (last if len(kernel.requests) == 1 else done(seq))]

    rt, kernel = rtnl(reply)
    assert len(rt.links()) == 1
    assert len(kernel.requests) == 2


def test_a_dump_interrupted_every_time_returns_the_last_one() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        return [loopback(seq) + nlmsg(NLMSG_DONE, NLM_F_MULTI | NLM_F_DUMP_INTR, seq, bytes(4))]

    rt, kernel = rtnl(reply)
    assert [lk.name for lk in rt.links()] == ["lo"]
    assert len(kernel.requests) == 3


def test_out_of_range_numbers_never_reach_struct() -> None:
    rt, kernel = rtnl(lambda *_: [])
    assert rt.link(0) is None
    assert rt.link(-1) is None
    assert rt.link(2**40) is None
    for fd in (-1, 2**40):
        with pytest.raises(RtnlError) as caught:
            rt.netnsid(fd)
        assert caught.value.errno == errno.EBADF
    assert kernel.requests == []


def test_a_reply_bigger_than_the_buffer_is_asked_again_with_room() -> None:
    big = 70_000  # > the 64 KiB buffer

    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        msgs, n = b"", 0
        while len(msgs) < big:
            n += 1
            msgs += veth(seq, 100 + n, f"pnmrt{n}", nsid=n, peer=2)
        return [msgs, done(seq)]

    rt, kernel = rtnl(reply)
    links = rt.links()
    assert len(kernel.requests) == 2
    assert len(links) == len({lk.ifindex for lk in links}) > 200
    assert links[-1].link_netnsid == len(links)


# -- errors -----------------------------------------------------------------------------

def test_nlmsg_error_raises_with_errno_and_says_which_request() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [error(seq, errno.EPERM, extack="not for you")])
    with pytest.raises(RtnlError) as caught:
        rt.links()
    assert caught.value.errno == errno.EPERM
    assert "RTM_GETLINK" in str(caught.value)
    assert "not for you" in str(caught.value)
    assert isinstance(caught.value, OSError)


def test_link_by_index_and_enodev() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        assert (mtype, flags) == (RTM_GETLINK, NLM_F_REQUEST)
        ifindex = struct.unpack_from("=i", body, 4)[0]
        if ifindex == 7:
            return [veth(seq, 7, "pnmrt0", nsid=3, peer=2, flags=0)]
        return [error(seq, errno.ENODEV)]

    rt, _ = rtnl(reply)
    found = rt.link(7)
    assert found is not None
    assert (found.name, found.link_netnsid) == ("pnmrt0", 3)
    assert rt.link(8) is None


def test_an_error_in_done_raises() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [loopback(seq), done(seq, -errno.EMSGSIZE)])
    with pytest.raises(RtnlError) as caught:
        rt.links()
    assert caught.value.errno == errno.EMSGSIZE


def test_ack_only_gives_nothing() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [error(seq, 0)])
    assert rt.links() == []


def truncate_last_attribute(msg: bytes) -> bytes:
    """Cuts 4 bytes off the message but keeps the last attribute's length: it now overruns."""
    return struct.pack("=I", len(msg) - 4) + msg[4:-4]


X = nla_str(IFLA_IFNAME, "x")  # a name, so that only the damage is wrong

MALFORMED: dict[str, Callable[[int], bytes]] = {
    "attribute overruns the message": lambda seq: truncate_last_attribute(veth(seq, 7, "a", nsid=3, peer=2)),
    "attribute length below 4": lambda seq: newlink(seq, 7, X, struct.pack("=HH", 0, 1)),
    "attribute header cut short": lambda seq: newlink(seq, 7, X, b"\x08\0"),
    "short u32": lambda seq: newlink(seq, 7, X, nla(IFLA_LINK, b"\1\0")),
    "short stats64": lambda seq: newlink(seq, 7, X, nla(IFLA_STATS64, bytes(16))),
    "nested kind overruns linkinfo": lambda seq: newlink(
        seq, 7, X, nla(IFLA_LINKINFO, struct.pack("=HH", 40, IFLA_INFO_KIND) + b"veth")),
    "short ifinfomsg": lambda seq: nlmsg(RTM_NEWLINK, NLM_F_MULTI, seq, bytes(8)),
    "no name": lambda seq: newlink(seq, 7, nla_u32(IFLA_MTU, 1500)),
    "message longer than the datagram": lambda seq: veth(seq, 7, "pnmrt0", nsid=3, peer=2)[:-8],
    "message length below the header": lambda seq: struct.pack("=IHHII", 8, RTM_NEWLINK, NLM_F_MULTI, seq, 0),
    "bytes after the last message": lambda seq: loopback(seq) + b"\0" * 8,
    "short NLMSG_ERROR": lambda seq: nlmsg(NLMSG_ERROR, 0, seq, b"\0\0"),
}


@pytest.mark.parametrize("damage", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_replies_raise_and_the_socket_stays_usable(damage: Callable[[int], bytes]) -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        if len(kernel.requests) == 1:
            # The broken part, then the rest of that dump, which the next request must skip.
            return [damage(seq), veth(seq, 8, "pnmrt1", nsid=4, peer=2), done(seq)]
        return one_dump(mtype, flags, seq, body)

    rt, kernel = rtnl(reply)
    with pytest.raises(RtnlError) as caught:
        rt.links()
    assert caught.value.errno == errno.EBADMSG
    assert "RTM_GETLINK" in str(caught.value)
    assert [lk.ifindex for lk in rt.links()] == [1, 7, 8]
    assert not kernel.pending


# -- netnsid() --------------------------------------------------------------------------

def nsid_reply(nsid: int) -> Reply:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        rtgenmsg = struct.pack("=Bxxx", socket.AF_UNSPEC)
        return [nlmsg(RTM_NEWNSID, 0, seq, rtgenmsg + nla_s32(NETNSA_NSID, nsid))]
    return reply


def test_netnsid_request_and_reply() -> None:
    rt, kernel = rtnl(nsid_reply(5))
    assert rt.netnsid(17) == 5
    mtype, flags, _seq, body = kernel.requests[0]
    assert (mtype, flags) == (RTM_GETNSID, NLM_F_REQUEST)
    # struct rtgenmsg padded to 4, then NETNSA_FD (u32).
    assert body == struct.pack("=BxxxHHI", socket.AF_UNSPEC, 8, NETNSA_FD, 17)


def test_netnsid_not_assigned_is_none() -> None:
    rt, _ = rtnl(nsid_reply(-1))
    assert rt.netnsid(17) is None


def test_netnsid_error() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [error(seq, errno.EINVAL)])
    with pytest.raises(RtnlError) as caught:
        rt.netnsid(17)
    assert caught.value.errno == errno.EINVAL
    assert "RTM_GETNSID fd 17" in str(caught.value)


def test_netnsid_reply_without_nsid_is_malformed() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [nlmsg(RTM_NEWNSID, 0, seq, bytes(4))])
    with pytest.raises(RtnlError):
        rt.netnsid(17)


def test_many_requests_on_one_socket_use_new_sequence_numbers() -> None:
    rt, kernel = rtnl(nsid_reply(5))
    for _ in range(50):
        assert rt.netnsid(3) == 5
    seqs = [seq for _, _, seq, _ in kernel.requests]
    assert len(set(seqs)) == 50


def test_close_is_idempotent_and_final() -> None:
    with Rtnl(sock=FakeKernel(nsid_reply(1))) as rt:
        assert rt.netnsid(3) == 1
    rt.close()
    with pytest.raises(RtnlError) as caught:
        rt.netnsid(3)
    assert caught.value.errno == errno.EBADF


# -- LinkEvents -------------------------------------------------------------------------

def test_drain_counts_messages_and_overflows() -> None:
    kernel = FakeKernel(lambda *_: [])
    event = newlink(0, 7, nla_str(IFLA_IFNAME, "pnmrt0"), flags=0)
    kernel.pending.extend([event + event, OSError(errno.ENOBUFS, "No buffer space available"), event])
    events = LinkEvents(sock=kernel)
    assert events.drain() == 4  # two, one for the overflow, one
    assert events.overflows == 1
    assert events.drain() == 0
    events.close()
    events.close()
    assert kernel.closed


def test_tc_messages_name_their_device_and_are_no_link_events() -> None:
    # what `tc filter add` then `del` on a fresh clsact sends to RTNLGRP_TC (measured):
    # RTM_NEWQDISC, RTM_NEWCHAIN, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_DELCHAIN
    kernel = FakeKernel(lambda *_: [])
    kernel.pending.extend([nlmsg(mtype, 0, 0, tcmsg(ifindex, 0, INGRESS, 0))
                           for mtype, ifindex in ((36, 7), (100, 7), (44, 8), (45, 8), (101, 9))])
    events = LinkEvents(sock=kernel)
    assert events.drain() == 0  # no rescan for these
    assert events.tc_changed == {7, 8, 9}
    kernel.pending.append(newlink(0, 7, nla_str(IFLA_IFNAME, "pnmrt0"), flags=0))
    assert events.drain() == 1


def test_drain_raises_other_errors() -> None:
    kernel = FakeKernel(lambda *_: [])
    kernel.pending.append(OSError(errno.EBADF, "Bad file descriptor"))
    with pytest.raises(RtnlError):
        LinkEvents(sock=kernel).drain()



def test_tx_dropped_is_the_eighth_counter() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        return [veth(seq, 8, "pnmrt1", nsid=4, peer=2, stats=(10, 20, 3000, 4000, 6)),
                done(seq)]

    rt, _ = rtnl(reply)
    (link,) = rt.links()
    assert (link.tx_packets, link.tx_dropped) == (20, 6)  # rx_dropped (99) is not it


# -- tc: clsact and cls_bpf filters -----------------------------------------------------

RTM_NEWQDISC, RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 36, 44, 45, 46
NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x4, 0x100, 0x200, 0x400
TCA_KIND, TCA_OPTIONS, TCA_CHAIN = 1, 2, 11
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAGS_GEN, TCA_BPF_TAG, TCA_BPF_ID = 9, 10, 11
INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3


def acked(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
    return [error(seq, 0)]


def tcmsg(ifindex: int, handle: int, parent: int, info: int) -> bytes:
    return struct.pack("=BxxxiIII", socket.AF_UNSPEC, ifindex, handle, parent, info)


# The requests below, written out byte by byte from struct tcmsg (<linux/rtnetlink.h>)
# and the attributes of <linux/pkt_cls.h>; they are also the bytes pyroute2 0.9 sent
# for the same calls (read with strace), less pyroute2's TCA_OPTIONS {FLAGS 0} on delete.
CLSACT_ON_7 = bytes.fromhex(
    "00 000000"       # tcm_family AF_UNSPEC, padding
    "07000000"        # tcm_ifindex 7
    "0000ffff"        # tcm_handle ffff:0000
    "f1ffffff"        # tcm_parent ffff:fff1 (TC_H_CLSACT)
    "00000000"        # tcm_info
    "0b00 0100 636c7361637400 00")  # TCA_KIND "clsact\0", padded

FILTER_ON_7 = bytes.fromhex(
    "00 000000 07000000"
    "2a000000"        # tcm_handle 0x2a
    "f2ffffff"        # tcm_parent ffff:fff2, clsact's ingress
    "0003 0300"       # tcm_info: htons(ETH_P_ALL) below, prio 3 above
    "0800 0100 62706600"                # TCA_KIND "bpf\0"
    "2c00 0200"                         # TCA_OPTIONS, 44 bytes, not flagged nested
    "0800 0300 01000000"                # TCA_BPF_CLASSID 1
    "0800 0600 09000000"                # TCA_BPF_FD 9
    "0d00 0700 706e6d5f7465737400 000000"  # TCA_BPF_NAME "pnm_test\0", padded
    "0800 0800 01000000")               # TCA_BPF_FLAGS TCA_BPF_FLAG_ACT_DIRECT


def test_add_clsact_request_is_byte_exact() -> None:
    rt, kernel = rtnl(acked)
    rt.add_clsact(7)
    assert kernel.requests == [(RTM_NEWQDISC, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                                kernel.requests[0][2], CLSACT_ON_7)]


def test_an_existing_clsact_is_eexist_with_the_kernels_words() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [error(seq, errno.EEXIST,
                                                        extack="Exclusivity flag on, cannot modify")])
    with pytest.raises(RtnlError) as caught:
        rt.add_clsact(7)
    assert caught.value.errno == errno.EEXIST
    assert "RTM_NEWQDISC clsact ifindex 7" in str(caught.value)
    assert "Exclusivity flag on, cannot modify" in str(caught.value)


def test_replace_and_add_bpf_filter_requests_are_byte_exact() -> None:
    rt, kernel = rtnl(acked)
    rt.replace_bpf_filter(7, parent=INGRESS, prio=3, handle=0x2A, fd=9, name="pnm_test")
    rt.add_bpf_filter(7, parent=INGRESS, prio=3, handle=0x2A, fd=9, name="pnm_test")
    (t1, f1, _, b1), (t2, f2, _, b2) = kernel.requests
    assert (t1, f1, b1) == (RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                            FILTER_ON_7)
    assert (t2, f2, b2) == (RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                            FILTER_ON_7)


def test_filter_options_follow_the_arguments() -> None:
    rt, kernel = rtnl(acked)
    rt.replace_bpf_filter(7, parent=EGRESS, prio=0xFFFF, handle=0xFFFFFFFF, fd=3, name="x",
                          direct_action=False, classid=0x10002)
    body = kernel.requests[0][3]
    assert body[:20] == tcmsg(7, 0xFFFFFFFF, EGRESS, 0xFFFF0000 | socket.htons(3))
    assert body[20:] == nla_str(TCA_KIND, "bpf") + nla(TCA_OPTIONS, (
        nla_u32(TCA_BPF_CLASSID, 0x10002) + nla_u32(TCA_BPF_FD, 3) + nla_str(TCA_BPF_NAME, "x")
        + nla_u32(TCA_BPF_FLAGS, 0)))


def test_delete_filter_requests() -> None:
    rt, kernel = rtnl(acked)
    rt.delete_filter(7, parent=INGRESS, prio=3, handle=0x2A)
    rt.delete_filter(7, parent=EGRESS, prio=3)                # every filter at that prio
    rt.delete_filter(7, parent=INGRESS, prio=3, handle=0x2A, kind=None)
    info = 0x30000 | socket.htons(3)
    assert kernel.requests == [
        (RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK, kernel.requests[0][2],
         FILTER_ON_7[:20] + nla_str(TCA_KIND, "bpf")),
        (RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK, kernel.requests[1][2],
         tcmsg(7, 0, EGRESS, info) + nla_str(TCA_KIND, "bpf")),
        (RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK, kernel.requests[2][2], tcmsg(7, 0x2A, INGRESS, info)),
    ]


def test_a_change_fails_with_the_kernels_errno_and_is_not_sent_again() -> None:
    rt, kernel = rtnl(lambda mtype, flags, seq, body: [error(seq, errno.EBUSY, extack="busy here")])
    with pytest.raises(RtnlError) as caught:
        rt.replace_bpf_filter(7, parent=INGRESS, prio=3, handle=1, fd=9, name="pnm_test")
    assert caught.value.errno == errno.EBUSY
    assert ("RTM_NEWTFILTER replace bpf 'pnm_test' ifindex 7 parent ffff:fff2 prio 3 handle 0x1"
            in str(caught.value))
    assert "busy here" in str(caught.value)
    assert len(kernel.requests) == 1


def test_a_change_waits_for_its_own_ack() -> None:
    # A late ACK of an older request comes first: it must not be taken for ours.
    rt, kernel = rtnl(lambda mtype, flags, seq, body: [error(seq - 1, errno.ENOENT), error(seq, 0)])
    rt.delete_filter(7, parent=INGRESS, prio=3, handle=1)
    assert not kernel.pending


def test_out_of_range_tc_numbers_never_reach_the_kernel() -> None:
    rt, kernel = rtnl(acked)
    cases: list[tuple[int, Callable[[], object]]] = [
        (errno.ENODEV, lambda: rt.add_clsact(0)),
        (errno.ENODEV, lambda: rt.filters(2**31, INGRESS)),
        (errno.EINVAL, lambda: rt.filters(7, 2**32)),
        (errno.EINVAL, lambda: rt.delete_filter(7, parent=INGRESS, prio=0)),  # would flush the chain
        (errno.EINVAL, lambda: rt.add_bpf_filter(7, parent=INGRESS, prio=0x10000, handle=1, fd=3, name="x")),
        (errno.EINVAL, lambda: rt.add_bpf_filter(7, parent=INGRESS, prio=1, handle=-1, fd=3, name="x")),
        (errno.EINVAL, lambda: rt.add_bpf_filter(7, parent=INGRESS, prio=1, handle=1, fd=3, name="x",
                                                 classid=2**32)),
        (errno.EBADF, lambda: rt.replace_bpf_filter(7, parent=INGRESS, prio=1, handle=1, fd=-1, name="x")),
    ]
    for code, call in cases:
        with pytest.raises(RtnlError) as caught:
            call()
        assert caught.value.errno == code
    assert kernel.requests == []


def chain_head(seq: int, parent: int, prio: int, kind: str = "bpf") -> bytes:
    """What the kernel sends first for each classifier instance: handle 0, no options."""
    return nlmsg(RTM_NEWTFILTER, NLM_F_MULTI, seq, tcmsg(7, 0, parent, prio << 16 | socket.htons(3))
                 + nla_str(TCA_KIND, kind) + nla_u32(TCA_CHAIN, 0))


def bpf_filter(seq: int, parent: int, prio: int, handle: int, *, name: str, prog_id: int, flags: int,
               protocol: int = 3, nested: int = 0) -> bytes:
    # As cls_bpf_dump writes them: CLASSID, NAME, ID, TAG, FLAGS, FLAGS_GEN; stats after.
    options = (nla_u32(TCA_BPF_CLASSID, 1) + nla_str(TCA_BPF_NAME, name) + nla_u32(TCA_BPF_ID, prog_id)
               + nla(TCA_BPF_TAG, bytes(range(8))) + nla_u32(TCA_BPF_FLAGS, flags)
               + nla_u32(TCA_BPF_FLAGS_GEN, 8))
    return nlmsg(RTM_NEWTFILTER, NLM_F_MULTI, seq,
                 tcmsg(7, handle, parent, prio << 16 | socket.htons(protocol))
                 + nla_str(TCA_KIND, "bpf") + nla_u32(TCA_CHAIN, 0)
                 + nla(TCA_OPTIONS | nested, options) + nla(7, bytes(20)))  # TCA_STATS


def test_filters_dump_request_and_parsing() -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        u32 = nlmsg(RTM_NEWTFILTER, NLM_F_MULTI, seq, tcmsg(7, 0x800, INGRESS, 5 << 16 | socket.htons(0x0800))
                    + nla_str(TCA_KIND, "u32") + nla(TCA_OPTIONS, nla_str(TCA_BPF_NAME, "not a name")))
        first = bpf_filter(seq, INGRESS, 1, 1, name="cil_from", prog_id=77, flags=1)
        second = bpf_filter(seq, INGRESS, 3, 0x2A, name="pnm_test", prog_id=0x9000_0001, flags=0,
                            nested=NLA_F_NESTED)
        return [chain_head(seq, INGRESS, 1) + first, chain_head(seq, INGRESS, 3) + second,
                chain_head(seq, INGRESS, 5, "u32") + u32, done(seq)]

    rt, kernel = rtnl(reply)
    found = rt.filters(7, INGRESS)
    assert kernel.requests == [(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, kernel.requests[0][2],
                                tcmsg(7, 0, INGRESS, 0))]
    assert [(f.kind, f.parent, f.prio, f.handle, f.protocol, f.name, f.prog_id, f.direct_action)
            for f in found] == [
        ("bpf", INGRESS, 1, 1, 3, "cil_from", 77, True),
        ("bpf", INGRESS, 3, 0x2A, 3, "pnm_test", 0x9000_0001, False),
        ("u32", INGRESS, 5, 0x800, 0x0800, "", 0, False),   # another kind's options are not read
    ]


def test_an_empty_hook_dumps_nothing() -> None:
    rt, _ = rtnl(lambda mtype, flags, seq, body: [done(seq)])
    assert rt.filters(7, EGRESS) == []


TC_MALFORMED: dict[str, Callable[[int], bytes]] = {
    "short tcmsg": lambda seq: nlmsg(RTM_NEWTFILTER, NLM_F_MULTI, seq, bytes(12)),
    "no kind": lambda seq: nlmsg(RTM_NEWTFILTER, NLM_F_MULTI, seq,
                                 tcmsg(7, 1, INGRESS, 0) + nla_u32(TCA_CHAIN, 0)),
    "short program id": lambda seq: nlmsg(
        RTM_NEWTFILTER, NLM_F_MULTI, seq, tcmsg(7, 1, INGRESS, 0) + nla_str(TCA_KIND, "bpf")
        + nla(TCA_OPTIONS, nla(TCA_BPF_ID, b"\1\0"))),
    "option overruns the options": lambda seq: nlmsg(
        RTM_NEWTFILTER, NLM_F_MULTI, seq, tcmsg(7, 1, INGRESS, 0) + nla_str(TCA_KIND, "bpf")
        + nla(TCA_OPTIONS, struct.pack("=HH", 40, TCA_BPF_NAME) + b"pnm\0")),
    "attribute overruns the message": lambda seq: truncate_last_attribute(
        bpf_filter(seq, INGRESS, 1, 1, name="x", prog_id=1, flags=1)),
}


@pytest.mark.parametrize("damage", TC_MALFORMED.values(), ids=TC_MALFORMED.keys())
def test_malformed_filter_dumps_raise_and_the_socket_stays_usable(damage: Callable[[int], bytes]) -> None:
    def reply(mtype: int, flags: int, seq: int, body: bytes) -> list[bytes | OSError]:
        if len(kernel.requests) == 1:
            return [damage(seq), bpf_filter(seq, INGRESS, 2, 2, name="y", prog_id=2, flags=1), done(seq)]
        return [bpf_filter(seq, INGRESS, 1, 1, name="x", prog_id=1, flags=1), done(seq)]

    rt, kernel = rtnl(reply)
    with pytest.raises(RtnlError) as caught:
        rt.filters(7, INGRESS)
    assert caught.value.errno == errno.EBADMSG
    assert "RTM_GETTFILTER dump ifindex 7 parent ffff:fff2" in str(caught.value)
    assert [f.name for f in rt.filters(7, INGRESS)] == ["x"]
    assert not kernel.pending
