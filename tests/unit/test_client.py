"""The daemon's clients (pods, top, trace, drops) over TLS, against a real local TLS server.

The server is Python's http.server wrapped with ssl and a throwaway PKI made by
the openssl command: one CA that signs the server's and a client's
certificates, another CA that signs nothing the client is told to trust, and
a leaf for some other host name.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog

from monitor import client
from monitor.cli import main
from tests.pki import Pair, leaf, new_ca

METRICS = """\
podnet_bytes_total{namespace="shop",pod="web",direction="ingress",protocol="tcp"} 1000
podnet_bytes_total{namespace="shop",pod="web",direction="egress",protocol="tcp"} 500
"""
PODS = {"pods": [{"namespace": "shop", "pod": "web", "interface": "veth7", "ifindex": 7}]}
TOKEN = "s3cret-token"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl command (make setup installs it)")


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """main() points structlog at the stderr pytest captures, closed after the test: undo it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair  # IP:127.0.0.1 and DNS:localhost
    other_ca: Pair  # trusted by nobody here
    other_server: Pair  # a good certificate from other_ca
    elsewhere: Pair  # signed by ca, for DNS:elsewhere.example only
    client: Pair  # clientAuth, signed by ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = new_ca(d, "ca", "podnetmon-test-ca"), new_ca(d, "other", "someone-else-ca")
    san = "IP:127.0.0.1,DNS:localhost"
    return Pki(ca, leaf(d, ca, "server", "/CN=podnetmon", usage="serverAuth", sans=san),
               other, leaf(d, other, "other-server", "/CN=podnetmon", usage="serverAuth", sans=san),
               leaf(d, ca, "elsewhere", "/CN=podnetmon", usage="serverAuth",
                    sans="DNS:elsewhere.example"),
               leaf(d, ca, "client", "/O=oncall/CN=alice", usage="clientAuth"))


@dataclass
class Seen:
    """What the server was asked, and by whom."""

    paths: list[str] = field(default_factory=list)
    authorization: list[str] = field(default_factory=list)
    client_cn: list[str] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    seen: Seen

    def do_GET(self) -> None:
        self.seen.paths.append(self.path)
        self.seen.authorization.append(self.headers.get("Authorization", ""))
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        subject = dict(item for rdn in peer.get("subject", ()) for item in rdn) if peer else {}
        self.seen.client_cn.append(str(subject.get("commonName", "")))
        if self.path.startswith("/denied"):
            self._send(403, "application/json", json.dumps({"error": "not for you"}).encode())
        elif self.path == "/metrics":
            self._send(200, "text/plain", METRICS.encode())
        elif self.path == "/api/v1/pods":
            self._send(200, "application/json", json.dumps(PODS).encode())
        elif "/drops?" in self.path:
            self._send(200, "application/x-ndjson", b'{"reason": "NO_SOCKET"}\n{"reason": "X"}\n')
        else:
            self._send(404, "text/plain", b"no")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


Serve = Callable[..., tuple[str, Seen]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(pair, client_ca=None): a server on loopback; returns its host:port and what it saw."""
    servers: list[ThreadingHTTPServer] = []

    def start(pair: Pair | None, client_ca: Pair | None = None) -> tuple[str, Seen]:
        seen = Seen()
        handler = type("H", (Handler,), {"seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if pair is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pair.cert, pair.key)
            if client_ca is not None:  # optional client certificates, as the daemon asks
                context.load_verify_locations(client_ca.cert)
                context.verify_mode = ssl.CERT_OPTIONAL
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(err: str) -> str:
    """stderr holds exactly one line, no traceback: return it."""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err.rstrip("\n")


@pytest.mark.parametrize(("address", "url"), [
    ("127.0.0.1:9655", "http://127.0.0.1:9655"),
    ("node-1:9000", "http://node-1:9000"),
    ("node-1", "http://node-1:9655"),
    ("http://10.0.0.7:9655", "http://10.0.0.7:9655"),
    ("https://10.0.0.7:9655", "https://10.0.0.7:9655"),
    ("HTTPS://Node-1.example:443/", "https://node-1.example:443"),
    ("https://[fd00::7]:9655", "https://[fd00::7]:9655"),
    ("[::1]:9655", "http://[::1]:9655"),
])
def test_address_forms(address: str, url: str) -> None:
    assert client.base_url(address) == url


@pytest.mark.parametrize("address", ["ftp://node:21", "https://node:9655/metrics", "node:port",
                                     "https://node:99999", "https://", "https://u:p@node:9655",
                                     "node:9655?x=1"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(client.ClientError, match=r"^--address "):
        client.base_url(address)


@pytest.mark.usefixtures("clean_env")
def test_https_with_the_right_ca_is_verified_and_answers(
        pki: Pki, serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.server)
    assert main(["pods", "--address", f"https://{address}", "--ca-file", str(pki.ca.cert)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].split()[:3] == ["shop", "web", "veth7"]
    assert (seen.paths, seen.client_cn, err) == (["/api/v1/pods"], [""], "")


@pytest.mark.usefixtures("clean_env")
def test_a_host_name_verifies_as_well_as_an_ip(pki: Pki, serve: Serve,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.server)
    port = address.rsplit(":", 1)[1]
    assert main(["pods", "--json", "--address", f"https://localhost:{port}",
                 "--ca-file", str(pki.ca.cert)]) == 0
    assert json.loads(capsys.readouterr().out) == PODS
    assert seen.paths == ["/api/v1/pods"]


@pytest.mark.usefixtures("clean_env")
def test_a_certificate_from_another_ca_is_refused(pki: Pki, serve: Serve,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.other_server)
    assert main(["pods", "--address", f"https://{address}", "--ca-file", str(pki.ca.cert)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == (
        f"podnetmon pods: https://{address}: the daemon's certificate does not verify against "
        f"{pki.ca.cert}: unable to get local issuer certificate")
    assert seen.paths == []  # no request, so no token, went to it


@pytest.mark.usefixtures("clean_env")
def test_without_ca_file_the_system_store_is_used_and_a_private_ca_refused(
        pki: Pki, serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.server)
    assert main(["pods", "--address", f"https://{address}"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "does not verify against the system trust store (name the daemon's CA with --ca-file)" in err
    assert seen.paths == []


@pytest.mark.usefixtures("clean_env")
def test_a_certificate_for_another_host_name_is_refused(pki: Pki, serve: Serve,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.elsewhere)  # the right CA signed it, but not for 127.0.0.1
    assert main(["pods", "--address", f"https://{address}", "--ca-file", str(pki.ca.cert)]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.endswith("does not verify against "
                        f"{pki.ca.cert}: IP address mismatch, certificate is not valid for '127.0.0.1'")
    port = address.rsplit(":", 1)[1]
    assert main(["pods", "--address", f"https://localhost:{port}", "--ca-file",
                 str(pki.ca.cert)]) == 1
    assert one_line(capsys.readouterr().err).endswith(
        "Hostname mismatch, certificate is not valid for 'localhost'")
    assert seen.paths == []


@pytest.mark.usefixtures("clean_env")
def test_a_missing_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.crt"
    assert main(["pods", "--address", "https://127.0.0.1:1", "--ca-file", str(missing)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"podnetmon pods: --ca-file {missing}: no such file or directory")


@pytest.mark.usefixtures("clean_env")
def test_a_ca_file_with_no_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    assert main(["top", "--once", "--address", "https://127.0.0.1:1", "--ca-file", str(junk)]) == 1
    assert one_line(capsys.readouterr().err).startswith(
        f"podnetmon top: --ca-file {junk}: not a PEM CA bundle (")


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("scheme", ["", "http://", "https://"])
def test_a_refused_connection(scheme: str, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # bound and closed at once: nothing listens there
    ca = ["--ca-file", str(pki.ca.cert)] if scheme == "https://" else []
    assert main(["pods", "--address", f"{scheme}127.0.0.1:{port}", *ca]) == 1
    url = f"{scheme or 'http://'}127.0.0.1:{port}"
    assert one_line(capsys.readouterr().err) == (
        f"podnetmon pods: cannot reach the daemon at {url}: connection refused (is the daemon "
        "running, and listening there?)")


@pytest.mark.usefixtures("clean_env")
def test_https_to_a_plain_http_daemon_and_back(pki: Pki, serve: Serve,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    plain, _ = serve(None)
    assert main(["pods", "--address", f"https://{plain}", "--ca-file", str(pki.ca.cert)]) == 1
    assert one_line(capsys.readouterr().err).endswith(
        "the daemon did not answer in TLS (does it serve plain http://?)")
    tls, _ = serve(pki.server)
    assert main(["pods", "--address", tls]) == 1
    assert one_line(capsys.readouterr().err).endswith(
        "the daemon closed the connection unanswered (does it serve https://?)")


@pytest.mark.usefixtures("clean_env")
def test_tls_flags_on_a_plain_http_address_are_refused(pki: Pki,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # else a user who asked for verification would silently get cleartext
    assert main(["pods", "--address", "127.0.0.1:9655", "--ca-file", str(pki.ca.cert)]) == 1
    assert one_line(capsys.readouterr().err) == (
        "podnetmon pods: --ca-file, --cert-file and --key-file are for https:// addresses; "
        "http://127.0.0.1:9655 is plain HTTP")


@pytest.mark.usefixtures("clean_env")
def test_a_client_certificate_is_presented(pki: Pki, serve: Serve,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.server, client_ca=pki.ca)
    base = ["pods", "--address", f"https://{address}", "--ca-file", str(pki.ca.cert)]
    assert main([*base, "--cert-file", str(pki.client.cert), "--key-file", str(pki.client.key)]) == 0
    assert main(base) == 0  # optional: none presented, none required
    assert seen.client_cn == ["alice", ""]
    capsys.readouterr()
    assert main([*base, "--key-file", str(pki.client.key)]) == 1
    assert one_line(capsys.readouterr().err) == "podnetmon pods: --key-file needs --cert-file"
    assert main([*base, "--cert-file", str(pki.client.cert), "--key-file",
                 str(pki.other_server.key)]) == 1
    assert one_line(capsys.readouterr().err).startswith(
        f"podnetmon pods: --cert-file {pki.client.cert}: not a PEM certificate and its key (")


@pytest.mark.usefixtures("clean_env")
def test_pods_top_and_drops_send_the_token_over_https(
        pki: Pki, serve: Serve, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address, seen = serve(pki.server)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    tls = ["--address", f"https://{address}", "--ca-file", str(pki.ca.cert),
           "--token-file", str(token)]
    assert main(["pods", *tls]) == 0
    assert main(["top", "--once", "--interval", "0.01", *tls]) == 0
    assert main(["drops", "shop/web", "-d", "5s", *tls]) == 0
    out = capsys.readouterr().out
    assert "shop/web" in out  # top's table
    assert out.endswith('{"reason": "NO_SOCKET"}\n{"reason": "X"}\n')
    assert seen.paths == ["/api/v1/pods", "/metrics", "/metrics",
                          "/api/v1/namespaces/shop/pods/web/drops?duration=5s"]
    assert seen.authorization == [f"Bearer {TOKEN}"] * 4


@pytest.mark.usefixtures("clean_env")
def test_the_token_from_the_environment_and_none(pki: Pki, serve: Serve,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    address, seen = serve(pki.server)
    tls = ["--address", f"https://{address}", "--ca-file", str(pki.ca.cert)]
    assert main(["pods", *tls]) == 0
    monkeypatch.setenv("PODNETMON_TOKEN", TOKEN)
    assert main(["pods", *tls]) == 0
    assert seen.authorization == ["", f"Bearer {TOKEN}"]


@pytest.mark.usefixtures("clean_env")
def test_a_missing_token_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["trace", "shop/web", "--token-file", str(tmp_path / "nope")])
    assert info.value.code == f"podnetmon trace: --token-file {tmp_path / 'nope'}: no such file or directory"


def test_a_refusal_carries_the_daemons_reason(pki: Pki, serve: Serve) -> None:
    address, _ = serve(pki.server)
    daemon = client.Daemon(f"https://{address}", client.tls_context(str(pki.ca.cert)))
    with pytest.raises(client.ClientError) as info:
        daemon.open("/denied", timeout=5)
    assert str(info.value) == f"https://{address}: 403 not for you"


def test_the_context_verifies_and_asks_tls_1_2_at_least(pki: Pki) -> None:
    context = client.tls_context(str(pki.ca.cert))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    # the --ca-file alone: no system CA is trusted beside it
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "podnetmon-test-ca"),),)]
