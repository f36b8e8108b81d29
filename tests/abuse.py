"""An attacker of the node API: connections held open half-sent, and a flood of bad
tokens at a steady rate, from this host. Shared by tests/kernel/test_node_api.py and
bench/node_api.py, so the test and the benchmark attack alike."""

from __future__ import annotations

import resource
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from types import TracebackType

FLOOD_PATH = "/api/v1/captures"  # authenticated: every bad token is one to check


def raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))


def request_status(address: str, port: int, path: str, token: str = "", *,
                   context: ssl.SSLContext | None = None, server_name: str = "") -> tuple[int, str]:
    """One request on a fresh connection: the answer's status and body."""
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection((address, port), timeout=10) as raw:
        s = context.wrap_socket(raw, server_hostname=server_name or address) if context else raw
        with s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
                      .encode())
            answer = s.makefile("rb").read().decode()
    return int(answer.split()[1]), answer.partition("\r\n\r\n")[2]


class Abuse:
    """`held` connections that sent half a request line, and `rate` bad tokens a second
    for `seconds`, while the with-block runs (the flood runs its whole time: join())."""

    def __init__(self, port: int, *, held: int = 1000, rate: float = 200, seconds: float = 6,
                 context: ssl.SSLContext | None = None) -> None:
        self.port, self.held_count, self.rate, self.seconds = port, held, rate, seconds
        self.context = context
        self.statuses: Counter[int] = Counter()
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, name="flood")
        self.took = 0.0

    def __enter__(self) -> Abuse:
        raise_fd_limit()
        for _ in range(self.held_count):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if self.context is None:  # half a request, never the rest; over TLS not even
                s.sendall(b"GET /metrics HTTP/1.1\r\n")  # a ClientHello: the slowest kind
            self._held.append(s)
        self._begin = time.monotonic()
        self._thread.start()
        return self

    def _flood(self) -> None:
        n = 0
        while time.monotonic() < self._begin + self.seconds and not self._stop.is_set():
            try:
                status, _ = request_status("127.0.0.1", self.port, FLOOD_PATH,
                                           "garbage-" + secrets.token_hex(16),
                                           context=self.context, server_name="127.0.0.1")
            except OSError:
                status = 0
            self.statuses[status] += 1
            n += 1
            time.sleep(max(0.0, self._begin + n / self.rate - time.monotonic()))

    def join(self) -> None:
        self._thread.join()
        self.took = time.monotonic() - self._begin

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self._stop.set()
        self.join()
        for s in self._held:
            s.close()
