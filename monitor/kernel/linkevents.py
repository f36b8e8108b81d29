"""Link and tc events: a socket subscribed to rtnetlink's link and tc groups, drained
without blocking, for the reconciler's loop to select on.
"""

from __future__ import annotations

import errno
import socket
import struct

from monitor.kernel.rtnltc import (
    RTM_DELCHAIN,
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_NEWCHAIN,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
)
from monitor.kernel.rtnlwire import BUFSIZE, FLUSH_LIMIT, HDRLEN, S32, RtnlError, Socket, align, open_socket

# <linux/rtnetlink.h>
RTMGRP_LINK = 1
RTMGRP_TC = 8  # 1 << (RTNLGRP_TC - 1): qdiscs and filters added and removed
# The chain messages come with filters (a device's first at a hook makes chain 0, its last
# deletes it): taken for link events, each of our moves to tcx cost a full rescan.
_TC_TYPES = frozenset((RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER, RTM_DELTFILTER,
                       RTM_NEWCHAIN, RTM_DELCHAIN))


def _count_messages(buf: bytearray, n: int, tc: set[int] | None = None) -> int:
    """How many netlink messages a datagram holds (at least 1: it woke us up) that are
    not tc messages; the ifindex of each tc message (struct tcmsg: family, 3 bytes of
    padding, then the ifindex) goes into `tc`."""
    count, off, others = 0, 0, 0
    while n - off >= HDRLEN:
        mlen, mtype = struct.unpack_from("=IH", buf, off)
        if mlen < HDRLEN:
            break  # garbage: the datagram still counts as one event
        count += 1
        if mtype in _TC_TYPES and tc is not None and mlen >= HDRLEN + 8:
            tc.add(S32.unpack_from(buf, off + HDRLEN + 4)[0])
        else:
            others += 1
        off += align(mlen)
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

    def __init__(self, *, sock: Socket | None = None) -> None:
        """Opens, binds and subscribes the socket; `sock` is for tests only."""
        if sock is None:
            real = open_socket(RTMGRP_LINK | RTMGRP_TC)
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
        self._sock: Socket | None = sock
        self._buf = bytearray(BUFSIZE)
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
        for _ in range(FLUSH_LIMIT):
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
