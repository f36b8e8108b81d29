"""One client connection of the listener: its socket, the bytes it sent that no request
consumed yet, and the file-like request and response sides BaseHTTPRequestHandler reads
and writes through (monitor/server.py), each read and write bounded by a deadline.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from monitor.tls import Certificate

if TYPE_CHECKING:  # the listener makes connections: its Limits only types them here
    from monitor.listener import Limits

RECV_SIZE = 65536


class Conn:
    """One client connection: its socket, what it sent that no request consumed yet,
    and the deadline of the phase it is in."""

    def __init__(self, sock: socket.socket, peer: tuple[Any, ...], tls: bool,
                 deadline: float) -> None:
        self.sock, self.peer, self.tls = sock, peer, tls
        self.buf = bytearray()
        self.handshaking = tls
        self.busy = False  # a worker has it
        self.deadline = deadline
        self.certificate: Certificate | None = None

    @property
    def address(self) -> str:
        return str(self.peer[0]) if self.peer else ""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def headers_complete(self) -> bool:
        data = bytes(self.buf.lstrip(b"\r\n"))  # RFC 9112: blank lines before a request are ignored
        return b"\r\n\r\n" in data or b"\n\n" in data

    def request_path(self) -> str:
        line = bytes(self.buf.lstrip(b"\r\n")).split(b"\n", 1)[0].decode("latin-1")
        parts = line.split()
        return urlsplit(parts[1]).path if len(parts) >= 2 else ""


class ConnReader:
    """The request side of a connection for BaseHTTPRequestHandler: what the front door
    read first, then the socket, every read bounded by the body deadline."""

    closed = False

    def __init__(self, conn: Conn, limits: Limits) -> None:
        self.conn, self.limits = conn, limits
        self._deadline: float | None = None

    def _fill(self) -> bool:
        """One more read into the buffer; False at end of stream."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.limits.body_timeout
        left = self._deadline - now
        if left <= 0:
            raise TimeoutError("the request body did not arrive in time")
        sock = self.conn.sock
        sock.settimeout(left)
        try:
            data = sock.recv(RECV_SIZE)
        finally:
            sock.settimeout(self.limits.write_timeout)
        if not data:
            return False
        self.conn.buf += data
        return True

    def readline(self, limit: int = -1) -> bytes:
        buf = self.conn.buf
        while True:
            end = buf.find(b"\n")
            if end >= 0 and (limit < 0 or end < limit):
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                return line
            if 0 <= limit <= len(buf):
                line = bytes(buf[:limit])
                del buf[:limit]
                return line
            if not self._fill():
                line = bytes(buf)
                buf.clear()
                return line

    def read(self, n: int = -1) -> bytes:
        buf = self.conn.buf
        while n < 0 or len(buf) < n:
            if not self._fill():
                break
        n = len(buf) if n < 0 else min(n, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def close(self) -> None:
        return


class ConnWriter:
    """The response side: sendall under the socket's timeout (write_timeout unless the
    handler set its own, as a trace does for its deadline)."""

    closed = False  # BaseHTTPRequestHandler.finish() asks

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def write(self, data: bytes) -> int:
        self.conn.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        return

    def close(self) -> None:
        return
