"""One rtnetlink request at a time over one socket: the sequence number that matches
replies to it, the receive buffer they are read into (grown when one does not fit), the
retries worth making (a truncated reply, an EBUSY dump, NLM_F_DUMP_INTR) and the flush
that reads away what an abandoned request left behind.

RtnlExchange is the base of each request family (monitor.kernel.rtnllinks' and
monitor.kernel.rtnltc's), which monitor.kernel.rtnl.Rtnl joins into one client.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from typing import Self, TypeVar

from monitor.kernel.rtnlwire import (
    BUFSIZE,
    FLUSH_LIMIT,
    HDRLEN,
    NETLINK_GET_STRICT_CHK,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSGHDR,
    S32,
    SOL_NETLINK,
    RtnlError,
    Socket,
    align,
    ext_ack,
    kernel_error,
    malformed,
    open_socket,
)

_ATTEMPTS = 3           # for a truncated reply, an EBUSY dump or NLM_F_DUMP_INTR


class _RetryError(Exception):
    """Internal: start the request again (a reply did not fit the receive buffer)."""


T = TypeVar("T")


class RtnlExchange:
    """One rtnetlink socket for requests (not for events: see monitor.kernel.linkevents)."""

    def __init__(self, *, sock: Socket | None = None) -> None:
        """Opens and binds the socket; `sock` is for tests only."""
        self._sock: Socket | None = sock if sock is not None else open_socket(0)
        self._seq = int.from_bytes(os.urandom(2), "little")  # any start: replies are matched by it
        # Set while a request may have left replies in the socket (it failed, or was
        # abandoned half-read): the next request reads them away first, because a new
        # dump cannot start while an old one is still running (EBUSY).
        self._dirty = False
        self._interrupted = False
        self._is_strict = False  # NETLINK_GET_STRICT_CHK set (by the first targeted dump)
        self._set_buffer(BUFSIZE)

    def _strict(self) -> None:
        setsockopt = getattr(self._sock, "setsockopt", None)  # a test's fake has none
        if setsockopt is not None and not self._is_strict:
            setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self._is_strict = True

    def _set_buffer(self, size: int) -> None:
        self._buf = bytearray(align(size))
        self._w = memoryview(self._buf).cast("I")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

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
            sock.send(NLMSGHDR.pack(HDRLEN + len(body), msg_type, flags, seq, 0) + body)
        except OSError as exc:
            raise RtnlError(exc.errno or errno.EIO, f"{what}: send: {exc.strerror}") from exc
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        while True:
            n = self._recv(what)
            buf = self._buf
            off = 0
            while off < n:
                if n - off < HDRLEN:
                    raise malformed(what, f"{n - off} bytes left over after the last message")
                mlen, mtype, mflags, mseq, _pid = NLMSGHDR.unpack_from(buf, off)
                if mlen < HDRLEN or mlen > n - off:
                    raise malformed(what, f"message length {mlen} with {n - off} bytes left")
                end = off + mlen
                if mseq == seq:
                    if mflags & NLM_F_DUMP_INTR:
                        self._interrupted = True
                    if mtype in (NLMSG_ERROR, NLMSG_DONE):
                        # Both carry an int: a negated errno, or 0 (an ACK; a clean DONE).
                        # A dump's DONE may be bare on old kernels.
                        if mtype == NLMSG_ERROR and mlen < HDRLEN + 4:
                            raise malformed(what, "short NLMSG_ERROR")
                        code = S32.unpack_from(buf, off + HDRLEN)[0] if mlen >= HDRLEN + 4 else 0
                        self._dirty = False
                        if code:
                            raise kernel_error(what, -code, ext_ack(buf, off + HDRLEN, end, mflags))
                        return
                    if mtype != NLMSG_NOOP:
                        yield mtype, off + HDRLEN, end
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
        for _ in range(FLUSH_LIMIT):
            try:
                self._recv(what, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._dirty = False
                return
            except (_RetryError, RtnlError):
                pass  # stale data anyway
        raise RtnlError(errno.EBUSY, f"{what}: the socket would not drain")
