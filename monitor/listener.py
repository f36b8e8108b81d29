"""The listener's front door: accept, TLS handshake, a request's headers, then a worker.

Why not the standard library's ThreadingHTTPServer: it gives every connection a
thread for as long as the connection is open and never times it out, so 1,000
held-open connections are 1,000 threads and one slow client holds a thread
forever. Here one thread, the front door, waits on every connection with a
selector: an idle or slow connection costs a socket and a buffer, no thread. A
request goes to a worker only once all its headers are in, and workers are a fixed
number of threads in two lanes, so a scrape never waits behind API work (traces,
alerts, reviews). Every phase has a deadline: the handshake and headers, the idle
wait between keep-alive requests, a body, a write. When the connection cap is
reached, the connection that has been waiting longest without a request in
progress is closed to make room, so held-open connections cannot lock anyone out.

A connection's bytes and deadlines are in monitor/connection.py, the TLS context and
client certificates in monitor/tls.py.
"""

from __future__ import annotations

import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from monitor import log
from monitor.connection import RECV_SIZE, Conn
from monitor.tls import TlsFiles, peer_certificate

# The routes the probe lane serves: cheap, unauthenticated by default, and what the
# kubelet and Prometheus need answered whatever else the daemon is doing.
PROBE_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


@dataclass(frozen=True)
class Limits:
    """How much the listener gives any client; see the http_* settings for why."""

    max_connections: int = 512
    workers: int = 8
    probe_workers: int = 2
    header_timeout: float = 10.0
    idle_timeout: float = 120.0
    body_timeout: float = 10.0
    write_timeout: float = 30.0
    max_header_bytes: int = 32 << 10  # a 16 KiB token and the usual headers fit
    queued: int = 64  # requests waiting for a worker, per lane; beyond it 503


# -- the front door and the lanes ----------------------------------------------------------

Serve = Callable[[Conn], bool]  # handles one request; True: keep the connection open


class Lane:
    """A fixed set of worker threads behind a bounded queue."""

    def __init__(self, name: str, workers: int, queued: int, serve: Serve,
                 done: Callable[[Conn, bool], None]) -> None:
        self.name = name
        self.queue: queue.Queue[Conn | None] = queue.Queue(maxsize=queued)
        self._serve, self._done = serve, done
        self._threads = [threading.Thread(target=self._work, name=f"http-{name}-{i}", daemon=True)
                         for i in range(workers)]
        self.busy = 0

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _ in self._threads:
            try:
                self.queue.put(None, timeout=1.0)
            except queue.Full:
                break

    def _work(self) -> None:
        while True:
            conn = self.queue.get()
            if conn is None:
                return
            self.busy += 1
            keep = False
            try:
                keep = self._serve(conn)
            except Exception as exc:  # noqa: BLE001 - one request's failure ends its connection only
                log.get("http").debug("request failed", error=type(exc).__name__,
                                      detail=str(exc)[:200])
            finally:
                self.busy -= 1
                self._done(conn, keep)


class FrontDoor:
    """The one thread that accepts and waits on every connection."""

    def __init__(self, sock: socket.socket, limits: Limits, tls: TlsFiles | None,
                 serve: Serve) -> None:
        self.sock, self.limits, self.tls = sock, limits, tls
        self.sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._returned: queue.SimpleQueue[tuple[Conn, bool]] = queue.SimpleQueue()
        # Every connection, those waiting longest first: insertion order, and a connection
        # back from a worker goes to the end (so eviction finds its victim at the front).
        self._conns: dict[Conn, None] = {}
        self._stop = threading.Event()
        self._log = log.get("http")
        self.lanes = {
            "probe": Lane("probe", limits.probe_workers, limits.queued, serve, self._hand_back),
            "api": Lane("api", limits.workers, limits.queued, serve, self._hand_back),
        }
        self.stats = {"accepted": 0, "evicted": 0, "timed_out": 0, "refused_busy": 0,
                      "too_large": 0}
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        for lane in self.lanes.values():
            lane.stop()

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._selector
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                for key, _mask in sel.select(timeout=0.25):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._readable(key.data)
                now = time.monotonic()
                if now >= next_sweep:  # deadlines are seconds: a sweep of every connection
                    self._expire(now)  # four times a second, not at every event
                    next_sweep = now + 0.25
        finally:
            for conn in list(self._conns):
                self._close(conn)
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pipe is full: a wake-up is already pending

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if not keep:
                self._close(conn)
                continue
            self._conns.pop(conn, None)
            self._conns[conn] = None
            conn.sock.setblocking(False)
            now = time.monotonic()
            conn.deadline = now + (self.limits.header_timeout if conn.buf else
                                   self.limits.idle_timeout)
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._readable(conn)  # a pipelined request, or TLS data already decrypted

    def _hand_back(self, conn: Conn, keep: bool) -> None:
        """From a worker: the request is done; wait for the connection's next one."""
        self._returned.put((conn, keep))
        self._wake()

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: keep serving who is connected
                self._log.warning("accept failed", error=exc.strerror)
                return
            if len(self._conns) >= self.limits.max_connections and not self._evict():
                self.stats["refused_busy"] += 1  # every connection has a request in progress
                if self.tls is None:
                    _refuse(sock, 503, "too many connections")
                sock.close()
                continue
            self.stats["accepted"] += 1
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.tls is not None
            if self.tls is not None:
                sock = self.tls.context().wrap_socket(sock, server_side=True,
                                                      do_handshake_on_connect=False)
            conn = Conn(sock, peer, tls, time.monotonic() + self.limits.header_timeout)
            self._conns[conn] = None
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close the connection waiting longest with no request in progress."""
        victim = next((c for c in self._conns if not c.busy), None)
        if victim is None:
            return False
        self.stats["evicted"] += 1
        self._close(victim)
        return True

    def _close(self, conn: Conn, status: int = 0, reason: str = "") -> None:
        """Forget the connection; with a status, tell the client why first (best effort:
        never over a TLS connection whose handshake is not done)."""
        if not conn.busy:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._conns.pop(conn, None)
        if status and not conn.handshaking:
            _refuse(conn.sock, status, reason)
        conn.close()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns if not c.busy and c.deadline <= now]:
            self.stats["timed_out"] += 1
            # a request under way is told why it ends; an idle keep-alive just closes
            self._close(conn, 408 if conn.buf else 0,
                        "the request's headers did not arrive in time")

    def _readable(self, conn: Conn) -> None:
        if conn.handshaking:
            try:
                conn.sock.do_handshake()  # type: ignore[attr-defined]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ssl.SSLError, OSError):
                self._close(conn)
                return
            conn.handshaking = False
            conn.certificate = peer_certificate(conn.sock)
        while True:
            try:
                data = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            if not conn.buf:
                conn.deadline = min(conn.deadline, time.monotonic() + self.limits.header_timeout)
            conn.buf += data
            if len(conn.buf) > self.limits.max_header_bytes:
                break
        if conn.headers_complete():
            self._dispatch(conn)
        elif len(conn.buf) > self.limits.max_header_bytes:
            self.stats["too_large"] += 1
            self._close(conn, 431, "the request's headers are too large")

    def _dispatch(self, conn: Conn) -> None:
        lane = self.lanes["probe" if conn.request_path() in PROBE_PATHS else "api"]
        self._selector.unregister(conn.sock)
        conn.busy = True
        conn.sock.setblocking(True)
        conn.sock.settimeout(self.limits.write_timeout)
        try:
            lane.queue.put_nowait(conn)
        except queue.Full:
            self.stats["refused_busy"] += 1
            self._conns.pop(conn, None)
            _refuse(conn.sock, 503, f"the {lane.name} workers are all busy: retry")
            conn.close()


def _refuse(sock: socket.socket, status: int, reason: str) -> None:
    """A last answer, best effort and never blocking for long; the caller closes."""
    body = f'{{"error": "{reason}"}}\n'.encode()
    head = (f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            + ("Retry-After: 1\r\n" if status == 503 else "") + "\r\n")
    try:
        sock.settimeout(0.05)
        sock.sendall(head.encode() + body)
    except (OSError, ValueError):
        pass


_PHRASES = {408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}
