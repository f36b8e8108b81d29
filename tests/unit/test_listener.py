"""monitor/listener.py under the real server: TLS and its rotation, client certificates,
keep-alive, and every bound a client meets (connections, header time and size, body
time, busy workers), each attacked over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from monitor.auth import Access, Request
from monitor.connection import Conn, ConnReader
from monitor.exposition import Registry
from monitor.listener import Limits
from monitor.server import Api, Handler, Server, is_loopback
from monitor.state import MonitorState
from monitor.tls import TlsError, TlsFiles
from tests.pki import Pair, leaf, new_ca

FAST = Limits(max_connections=40, workers=1, probe_workers=1, header_timeout=0.5,
              idle_timeout=1.0, body_timeout=0.5, write_timeout=2.0, queued=2)


@dataclass(frozen=True)
class Certs:
    ca: Pair
    server: Pair
    rotated: Pair
    other_ca: Pair
    client_ca: Pair
    client: Pair
    stranger: Pair  # a client certificate from a CA the server does not trust


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("pki")
    ca, other, client_ca = (new_ca(d, "ca", "test-ca"), new_ca(d, "other", "other-ca"),
                            new_ca(d, "client-ca", "client-ca"))
    sans = "IP:127.0.0.1,DNS:localhost"
    return Certs(ca=ca, server=leaf(d, ca, "server", "/CN=first", usage="serverAuth", sans=sans),
                 rotated=leaf(d, ca, "rotated", "/CN=second", usage="serverAuth", sans=sans),
                 other_ca=other, client_ca=client_ca,
                 client=leaf(d, client_ca, "carol", "/O=netops/CN=carol", usage="clientAuth"),
                 stranger=leaf(d, other, "mallory", "/CN=mallory", usage="clientAuth"))


@dataclass
class Recorder:
    """An authenticator that allows everyone and keeps what it was asked."""

    seen: list[Request] = field(default_factory=list)

    def check(self, request: Request, access: Access) -> str:
        self.seen.append(request)
        return request.certificate.user if request.certificate else "anyone"


def serving(tls: TlsFiles | None = None, limits: Limits = FAST, **api: Any) -> tuple[Server, Api]:
    routes = Api(Registry(), MonitorState(), "n", alive=lambda: True, **api)
    server = Server("127.0.0.1", 0, tls=tls, limits=limits)
    server.start(routes)
    return server, routes


@pytest.fixture
def served_files(certs: Certs, tmp_path: Path) -> tuple[Path, Path]:
    """The serving pair as the daemon reads it: files we can rotate under it."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(certs.server.cert.read_bytes())
    key.write_bytes(certs.server.key.read_bytes())
    return cert, key


def tls_get(port: int, ca: Path, path: str = "/healthz", client: Pair | None = None) -> tuple[str, str]:
    """(status line, the server certificate's CN) over a verifying TLS client."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        peer = s.getpeercert()
    cn = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
    return data.split(b"\r\n", 1)[0].decode(), cn


def test_tls_is_verified_by_curl_and_openssl(certs: Certs, served_files: tuple[Path, Path]) -> None:
    server, _ = serving(TlsFiles(str(served_files[0]), str(served_files[1])))
    try:
        url = f"https://127.0.0.1:{server.port}/healthz"
        ok = subprocess.run(["curl", "-sS", "--cacert", str(certs.ca.cert), url],
                            capture_output=True, text=True, timeout=10, check=False)
        assert ok.returncode == 0 and ok.stdout == "ok\n", ok.stderr
        wrong = subprocess.run(["curl", "-sS", "--cacert", str(certs.other_ca.cert), url],
                               capture_output=True, text=True, timeout=10, check=False)
        assert wrong.returncode == 60, wrong.stderr  # curl: peer certificate cannot be verified
        verify = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-CAfile",
             str(certs.ca.cert), "-verify_return_error", "-verify_ip", "127.0.0.1", "-brief"],
            input="", capture_output=True, text=True, timeout=10, check=False)
        assert verify.returncode == 0 and "Verification: OK" in verify.stderr, verify.stderr
        old = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
                              "-tls1_1", "-brief"], input="", capture_output=True, text=True,
                             timeout=10, check=False)
        assert old.returncode != 0  # TLS 1.2 at least
        plain = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{server.port}/healthz"],
                               capture_output=True, text=True, timeout=10, check=False)
        assert plain.returncode != 0  # no cleartext on a TLS listener
    finally:
        server.stop()


def test_a_rotated_certificate_is_served_without_a_restart(
        certs: Certs, served_files: tuple[Path, Path]) -> None:
    cert, key = served_files
    tls = TlsFiles(str(cert), str(key))
    server, _ = serving(tls)
    try:
        assert tls_get(server.port, certs.ca.cert) == ("HTTP/1.1 200 OK", "first")
        # half a rotation (the certificate new, the key still old) keeps the last good pair
        cert.write_bytes(certs.rotated.cert.read_bytes())
        time.sleep(TlsFiles.CHECK_INTERVAL + 0.1)
        assert tls_get(server.port, certs.ca.cert)[1] == "first"
        # the whole rotation, as a Secret volume swaps its files
        tmp = key.with_suffix(".new")
        tmp.write_bytes(certs.rotated.key.read_bytes())
        os.replace(tmp, key)
        time.sleep(TlsFiles.CHECK_INTERVAL + 0.1)
        assert tls_get(server.port, certs.ca.cert) == ("HTTP/1.1 200 OK", "second")
        assert tls.reloads == 1
    finally:
        server.stop()


def test_bad_tls_files_stop_the_start_up(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="cannot load"):
        TlsFiles(str(certs.server.cert), str(certs.rotated.key))  # a key of another certificate
    with pytest.raises(TlsError, match="cannot load"):
        TlsFiles(str(tmp_path / "missing.crt"), str(certs.server.key))


def test_a_client_certificate_names_the_user(certs: Certs, served_files: tuple[Path, Path]) -> None:
    recorder = Recorder()
    tls = TlsFiles(str(served_files[0]), str(served_files[1]), str(certs.client_ca.cert))
    server, _ = serving(tls, auth=recorder, auth_metrics=True)
    try:
        assert tls_get(server.port, certs.ca.cert, "/metrics", certs.client)[0].endswith("200 OK")
        assert tls_get(server.port, certs.ca.cert, "/metrics")[0].endswith("200 OK")
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            tls_get(server.port, certs.ca.cert, "/metrics", certs.stranger)
    finally:
        server.stop()
    first, second = recorder.seen
    assert first.certificate is not None and first.tls
    assert (first.certificate.user, first.certificate.groups) == ("carol", ("netops",))
    assert second.certificate is None and second.tls


def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            out += b"<still open>"
    return out


def test_keep_alive_serves_pipelined_requests_in_order() -> None:
    server, _ = serving()
    try:
        out = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        server.stop()
    assert out.count(b"HTTP/1.1 ") == 2
    assert out.index(b"ok\n") < out.index(b"first discovery")


def test_slow_headers_get_408_and_the_connection_closes() -> None:
    server, _ = serving()
    try:
        t0 = time.monotonic()
        out = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost:")
        took = time.monotonic() - t0
    finally:
        server.stop()
    assert out.startswith(b"HTTP/1.1 408 ")
    assert FAST.header_timeout <= took < FAST.header_timeout + 1.0


def test_an_idle_keep_alive_connection_is_closed_silently() -> None:
    server, _ = serving()
    try:
        t0 = time.monotonic()
        out = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        took = time.monotonic() - t0
    finally:
        server.stop()
    assert out.count(b"HTTP/1.1 ") == 1 and out.endswith(b"ok\n")
    assert FAST.idle_timeout <= took < FAST.idle_timeout + 1.0


def test_huge_headers_get_431() -> None:
    server, _ = serving()
    try:
        out = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 40000)
    finally:
        server.stop()
    assert out.startswith(b"HTTP/1.1 431 ")


def test_held_open_connections_cannot_lock_out_a_scrape() -> None:
    server, _ = serving()
    threads_before = threading.active_count()
    held = []
    try:
        for _ in range(4 * FAST.max_connections):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            held.append(s)
        time.sleep(0.1)
        out = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ")
        door = server.door
        assert door is not None
        assert door.connections <= FAST.max_connections
        assert door.stats["evicted"] >= 3 * FAST.max_connections
        assert threading.active_count() <= threads_before + 1  # no thread per connection
    finally:
        for s in held:
            s.close()
        server.stop()


def test_api_work_never_delays_a_scrape_and_a_full_queue_is_503() -> None:
    server, routes = serving()
    release = threading.Event()

    def slow(h: Handler, _p: Any, _q: Any) -> None:
        release.wait(10)
        h.reply(200, b"slow\n", "text/plain")

    routes.route("GET", "/api/v1/slow", slow)
    busy = [threading.Thread(target=raw_exchange, args=(server.port,
            b"GET /api/v1/slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
            for _ in range(1 + FAST.queued)]
    door = server.door
    assert door is not None
    lane = door.lanes["api"]

    def until(condition: Any) -> None:
        deadline = time.monotonic() + 5
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition(), (lane.busy, lane.queue.qsize())

    try:
        busy[0].start()
        until(lambda: lane.busy == 1)  # the one api worker taken first: else the queue
        for t in busy[1:]:             # would fill before it and refuse one of these
            t.start()
        until(lane.queue.full)
        refused = raw_exchange(server.port, b"GET /api/v1/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in refused
        t0 = time.monotonic()
        scrape = raw_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert scrape.startswith(b"HTTP/1.1 200 ") and time.monotonic() - t0 < 0.5
    finally:
        release.set()
        for t in busy:
            t.join()
        server.stop()


def test_a_body_that_does_not_arrive_times_out() -> None:
    a, b = socket.socketpair()
    try:
        conn = Conn(a, ("127.0.0.1", 1), False, time.monotonic() + 10)
        reader = ConnReader(conn, FAST)
        b.sendall(b"0123456789")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            reader.read(100)
        assert FAST.body_timeout <= time.monotonic() - t0 < FAST.body_timeout + 0.5
    finally:
        a.close()
        b.close()


def test_a_body_left_unread_is_not_taken_for_the_next_request() -> None:
    server, _ = serving()
    try:
        # /healthz reads no body; what follows the headers would be "a request" otherwise
        out = raw_exchange(server.port, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                        b"35\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        server.stop()
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 405 ")


def local_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no default route: no non-loopback address to test from")
        return str(s.getsockname()[0])


@pytest.mark.parametrize("allow", [False, True])
def test_credentials_over_plain_http_from_another_host_are_refused(allow: bool) -> None:
    address = local_address()
    routes = Api(Registry(), MonitorState(), "n", alive=lambda: True, auth=Recorder(),
                 allow_insecure_auth=allow)
    server = Server("0.0.0.0", 0, limits=FAST)
    server.start(routes)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n"
        with socket.create_connection((address, server.port), timeout=5) as s:
            s.sendall(request)
            remote = s.makefile("rb").read()
        local = raw_exchange(server.port, request)
        bare = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with socket.create_connection((address, server.port), timeout=5) as s:
            s.sendall(bare)
            without = s.makefile("rb").read()
    finally:
        server.stop()
    if allow:
        assert remote.startswith(b"HTTP/1.1 200 ")
    else:
        assert remote.startswith(b"HTTP/1.1 403 ") and b"plain HTTP" in remote
    assert local.startswith(b"HTTP/1.1 200 ")  # loopback never crosses a network
    assert without.startswith(b"HTTP/1.1 200 ")  # no credentials, nothing leaked


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.5")
    assert not is_loopback("10.0.0.1") and not is_loopback("") and not is_loopback("::ffff:10.0.0.1")


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    before = {t.name for t in threading.enumerate()}
    yield
    time.sleep(0.05)
    left = [t.name for t in threading.enumerate() if t.name.startswith("http")
            and t.name not in before and t.is_alive()]
    assert not left, left


def test_auth_metrics_asks_the_api_for_the_non_resource_url(tmp_path: Path) -> None:
    from kubernetes import config

    from monitor.kubeauth import KubernetesAuth
    from tests.fakeapi import FakeApiServer

    with FakeApiServer() as api:
        api.add_token("prom-token", "system:serviceaccount:monitoring:prometheus")
        api.add_token("other-token", "mallory")
        api.grant_path("system:serviceaccount:monitoring:prometheus", "/metrics")
        client = config.new_client_from_config(config_file=api.write_kubeconfig(
            str(tmp_path / "kc")))
        server, _ = serving(auth=KubernetesAuth(client), auth_metrics=True)
        try:
            def status(path: str, token: str = "") -> int:
                auth = f"Authorization: Bearer {token}\r\n" if token else ""
                out = raw_exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}"
                                                "Connection: close\r\n\r\n".encode())
                return int(out.split()[1])

            assert status("/metrics", "prom-token") == 200
            assert status("/metrics", "other-token") == 403
            assert status("/metrics") == 401
            assert status("/api/v1/pods", "prom-token") == 403  # granted /metrics only
            assert status("/healthz") == 200  # probes never need a token
        finally:
            server.stop()
        spec = api.access_reviews()[0]["spec"]
        assert spec["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}
