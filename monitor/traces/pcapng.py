"""A streaming pcapng writer for `podnetmon trace`.

pcapng (draft-ietf-opsawg-pcapng), not classic pcap, because a trace needs
what pcap cannot carry: a direction per packet (the frames of both directions
of a pod's veth go into one file), nanosecond timestamps with no header trick,
an interface name and description per pod, comments, and a statistics block
to say how many packets the kernel lost.

Every block is built whole in memory and handed to the stream in one write,
so a reader never sees half a block after a flush, and `bytes_written` is
exact for callers that cap a trace's size. Everything is little-endian (the
byte-order magic in the section header says so; every reader handles both).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

# Block types (section 4 of the draft; the SHB type is a palindrome on purpose).
_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_ISB = 0x00000005
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D

# Option codes. Codes are per block type, so the same number means different
# things in different blocks (2 is shb_hardware, if_name and epb_flags).
_OPT_ENDOFOPT = 0
_OPT_COMMENT = 1
_SHB_OS = 3
_SHB_USERAPPL = 4
_IF_NAME = 2
_IF_DESCRIPTION = 3
_IF_TSRESOL = 9
_EPB_FLAGS = 2
_ISB_IFRECV = 4
_ISB_IFDROP = 5

_TSRESOL_NS = 9  # if_tsresol: high bit 0, so 10^-9 s units
_MAX_U32 = 0xFFFFFFFF
_MAX_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_OPTION = 0xFFFF  # option length is a 16-bit field

# epb_flags bits 0-1: 00 unknown, 01 inbound, 10 outbound.
DIRECTIONS = {"inbound": 1, "outbound": 2}


def _pad4(n: int) -> int:
    return -n % 4


def _option(code: int, value: bytes) -> bytes:
    if len(value) > _MAX_OPTION:
        raise ValueError(f"option {code} is {len(value)} bytes; pcapng options hold at most {_MAX_OPTION}")
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad4(len(value))


def _text(code: int, text: str) -> bytes:
    # Strings are UTF-8 and not NUL-terminated in pcapng.
    return _option(code, text.encode("utf-8"))


def _options(opts: Sequence[bytes]) -> bytes:
    # The list ends with opt_endofopt; a block without options has no list at all.
    if not opts:
        return b""
    return b"".join(opts) + struct.pack("<HH", _OPT_ENDOFOPT, 0)


def _block(block_type: int, body: bytes) -> bytes:
    # Total length appears at both ends so a reader can walk the file backwards.
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def _timestamp(ns: int) -> bytes:
    if not 0 <= ns <= _MAX_U64:
        raise ValueError(f"timestamp {ns} ns does not fit 64 bits")
    return struct.pack("<II", ns >> 32, ns & _MAX_U32)


class PcapngWriter:
    """Writes one pcapng section to `out`: the header now, then blocks as asked.

    `out` stays the caller's: the writer never closes it. Interfaces are
    numbered 0, 1, ... in the order they are added, as pcapng numbers them.
    """

    def __init__(self, out: BinaryIO, *, comments: Sequence[str] = (), application: str = "podnetmon",
                 os_name: str | None = None) -> None:
        self._out = out
        self._snaplens: list[int] = []
        self.bytes_written = 0
        opts = [_text(_OPT_COMMENT, c) for c in comments]
        if os_name is not None:
            opts.append(_text(_SHB_OS, os_name))
        opts.append(_text(_SHB_USERAPPL, application))
        # Version 1.0; section length -1: not known while streaming, readers then walk blocks.
        body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts)
        self._write(_block(_SHB, body))

    def add_interface(self, name: str, description: str, *, snaplen: int, linktype: int = 1) -> int:
        """Describe an interface (linktype 1: Ethernet); returns its id for packet().

        snaplen 0 means "no limit", as in the spec.
        """
        if not 0 <= linktype <= 0xFFFF:
            raise ValueError(f"linktype {linktype} does not fit 16 bits")
        if not 0 <= snaplen <= _MAX_U32:
            raise ValueError(f"snaplen {snaplen} does not fit 32 bits")
        opts = [_text(_IF_NAME, name), _text(_IF_DESCRIPTION, description),
                _option(_IF_TSRESOL, bytes([_TSRESOL_NS]))]
        body = struct.pack("<HHI", linktype, 0, snaplen) + _options(opts)
        self._write(_block(_IDB, body))
        self._snaplens.append(snaplen)
        return len(self._snaplens) - 1

    def packet(self, interface: int, timestamp_ns: int, data: bytes, original_length: int, *,
               direction: str, comment: str | None = None) -> None:
        """One Enhanced Packet Block: `data` as captured, `original_length` as it was on the wire."""
        snaplen = self._snaplen(interface)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} is not one of {sorted(DIRECTIONS)}")
        if snaplen and len(data) > snaplen:
            raise ValueError(f"{len(data)} bytes captured exceed interface {interface}'s snaplen {snaplen}")
        if not len(data) <= original_length <= _MAX_U32:
            raise ValueError(f"original length {original_length} is not between the captured "
                             f"length {len(data)} and 2^32-1")
        opts = [_option(_EPB_FLAGS, struct.pack("<I", DIRECTIONS[direction]))]
        if comment is not None:
            opts.append(_text(_OPT_COMMENT, comment))
        body = (struct.pack("<I", interface) + _timestamp(timestamp_ns)
                + struct.pack("<II", len(data), original_length)
                + data + b"\0" * _pad4(len(data)) + _options(opts))
        self._write(_block(_EPB, body))

    def statistics(self, interface: int, *, received: int, dropped: int, timestamp_ns: int,
                   comment: str | None = None) -> None:
        """An Interface Statistics Block: how many packets came, how many were lost.

        Written at the end of a trace, so that a reader of the file can tell a
        complete trace from one the perf buffer dropped events from.
        """
        self._snaplen(interface)
        for what, value in (("received", received), ("dropped", dropped)):
            if not 0 <= value <= _MAX_U64:
                raise ValueError(f"{what} {value} does not fit 64 bits")
        opts = [_option(_ISB_IFRECV, struct.pack("<Q", received)),
                _option(_ISB_IFDROP, struct.pack("<Q", dropped))]
        if comment is not None:
            opts.append(_text(_OPT_COMMENT, comment))
        body = struct.pack("<I", interface) + _timestamp(timestamp_ns) + _options(opts)
        self._write(_block(_ISB, body))

    def flush(self) -> None:
        self._out.flush()

    def _snaplen(self, interface: int) -> int:
        if not 0 <= interface < len(self._snaplens):
            raise ValueError(f"unknown interface id {interface} ({len(self._snaplens)} added)")
        return self._snaplens[interface]

    def _write(self, block: bytes) -> None:
        # An unbuffered stream (a pipe opened with buffering=0) may take part of a
        # block; loop so that a block is never cut short in the file.
        view = memoryview(block)
        while view:
            n = self._out.write(view)
            if n is None:  # a non-blocking raw stream that could take nothing now
                raise BlockingIOError("pcapng output would block")
            view = view[n:]
            self.bytes_written += n
