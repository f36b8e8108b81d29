"""rtnetlink's wire format as our sockets speak it: <linux/netlink.h>'s numbers, the
message and attribute headers, packing an attribute, reading attributes straight out of
a receive buffer, the kernel's errors (with its extended-ack message), and the socket
itself, opened and bound.

What is specific to a request family (links, addresses and nsids; tc) lives with it:
monitor.kernel.rtnllinks, monitor.kernel.rtnltc; the exchange of one request and its
replies is monitor.kernel.rtnlexchange's.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Protocol

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

NLMSGHDR = struct.Struct("=IHHII")   # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")        # len, type
U32 = struct.Struct("=I")
S32 = struct.Struct("=i")
HDRLEN = NLMSGHDR.size
S32_MAX = 2**31 - 1
U32_MAX = 2**32 - 1

# The kernel sends dump parts of at most 32 KiB (it caps the size it learns from our
# recv calls), so this fits every part; a bigger single reply grows it (see RtnlExchange._recv).
BUFSIZE = 64 * 1024
FLUSH_LIMIT = 1 << 16  # datagrams read before giving up on a stream that never ends


class RtnlError(OSError):
    """A failed, truncated or malformed rtnetlink exchange; errno says why."""


class Socket(Protocol):
    """What we use of socket.socket (the unit tests pass a scripted stand-in)."""

    def send(self, data: bytes, /) -> int: ...
    def recv_into(self, buffer: bytearray, nbytes: int, flags: int, /) -> int: ...
    def close(self) -> None: ...


def open_socket(groups: int) -> socket.socket:
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


def malformed(what: str, detail: str) -> RtnlError:
    return RtnlError(errno.EBADMSG, f"{what}: malformed reply: {detail}")


def align(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(atype: int, payload: bytes) -> bytes:
    pad = b"\0" * (align(len(payload)) - len(payload))
    return NLATTR.pack(NLATTR.size + len(payload), atype) + payload + pad


def cbytes(buf: bytearray, start: int, end: int) -> bytes:
    """A NUL-terminated string attribute's payload (a missing NUL ends at the payload's end)."""
    nul = buf.find(0, start, end)
    return bytes(buf[start:end if nul < 0 else nul])


def cstr(buf: bytearray, start: int, end: int) -> str:
    # Interface names are bytes to the kernel; surrogateescape keeps odd ones round-trippable.
    return cbytes(buf, start, end).decode("utf-8", "surrogateescape")


def attr_spans(buf: bytearray, start: int, end: int, what: str) -> dict[int, tuple[int, int]]:
    """(payload start, payload end) of each attribute among [start, end), by type without
    the flag bits; the last one of a type wins."""
    found = {}
    a = start
    while a < end:
        alen, atype = NLATTR.unpack_from(buf, a) if end - a >= 4 else (0, 0)
        if alen < 4 or alen > end - a:
            raise malformed(what, f"attribute length {alen}, {end - a} bytes left in its message or parent")
        found[atype & NLA_TYPE_MASK] = (a + 4, a + alen)
        a += align(alen)
    return found


def find_attr(buf: bytearray, start: int, end: int, want: int, what: str) -> tuple[int, int]:
    """(payload start, payload end) of the attribute `want` among [start, end), or (0, 0)."""
    return attr_spans(buf, start, end, what).get(want, (0, 0))


def u32_attr(buf: bytearray, spans: dict[int, tuple[int, int]], atype: int, what: str) -> int:
    """A u32 attribute's value out of attr_spans' answer; 0 if it is absent."""
    at, at_end = spans.get(atype, (0, 0))
    if not at:
        return 0
    if at_end - at < 4:
        raise malformed(what, f"attribute {atype} is shorter than 4 bytes")
    value: int = U32.unpack_from(buf, at)[0]
    return value


def ext_ack(buf: bytearray, off: int, end: int, flags: int) -> str:
    """The kernel's extended-ack message in an NLMSG_ERROR payload, or ""."""
    if not flags & NLM_F_ACK_TLVS or end - off < 4 + HDRLEN:
        return ""
    echoed = HDRLEN if flags & NLM_F_CAPPED else NLMSGHDR.unpack_from(buf, off + 4)[0]
    a, msg = off + 4 + align(echoed), ""
    while end - a >= 4:
        alen, atype = NLATTR.unpack_from(buf, a)
        if alen < 4 or alen > end - a:
            return ""  # an unreadable explanation is no reason to hide the errno
        if atype & NLA_TYPE_MASK == NLMSGERR_ATTR_MSG:
            msg = cstr(buf, a + 4, a + alen)
        a += align(alen)
    return msg


def kernel_error(what: str, code: int, detail: str) -> RtnlError:
    text = f"{what}: {os.strerror(code)}" + (f" ({detail})" if detail else "")
    return RtnlError(code, text)
