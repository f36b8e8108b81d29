"""The trace endpoints (monitor/traceapi.py) through the real HTTP server (monitor/server.py).

One Server on 127.0.0.1, an ephemeral port, with TokenFileAuth over a token file; the
capture manager is a fake handing out real Sessions (already ended, with what they
yield queued), the store a real one in a temporary directory per test. Everything the
daemon logs while this module runs is rendered as JSON lines, to check that no token
ever reaches it.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import structlog
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgReader

from monitor import log as monitor_log
from monitor.auth import CHALLENGE, TokenFileAuth
from monitor.exposition import Registry
from monitor.failurelimit import FailureLimiter
from monitor.identity import HostVeth, PodMeta, PodNetwork, identify
from monitor.server import DRAIN_MAX, MAX_BODY, Api, Server
from monitor.state import MonitorState
from monitor.traces import api as traceapi
from monitor.traces.alertcaptures import AlertCaptures
from monitor.traces.api import DeadlineWriter, TraceApi
from monitor.traces.cli import BlockCounter
from monitor.traces.session import CaptureError, Limits, Session, TraceRequest
from monitor.traces.store import CaptureStore

NODE = "node-1"
TOKEN = "pnm-test-token-6f1d2c3b4a5e"
WRONG = "pnm-wrong-token-0a9b8c7d6e5f"
LIMITS = Limits(max_duration=300.0, max_packets=100, max_bytes=1_000_000, max_snaplen=9000)
WEB = identify(PodNetwork(4026532001, "/proc/1/ns/net"), [HostVeth(7, "veth7")], PodMeta("shop", "web"))
FRAMES = [bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=53 + i))
          + b"d" * (20 * i) for i in range(3)]
CAPTURE = "/api/v1/namespaces/shop/pods/web/capture"
DROPS = "/api/v1/namespaces/shop/pods/web/drops"


@dataclass
class FakeCaptures:
    """start() and finish() of a CaptureManager, and its limits."""

    limits: Limits = LIMITS
    error: CaptureError | None = None
    started: list[tuple[str, str, TraceRequest, str]] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # what a drop trace yields
    flood: int = 0  # > 0: a packet trace of that many 60 KB frames, running to its deadline

    def start(self, namespace: str, name: str, request: TraceRequest, kind: str = "packets") -> Session:
        self.started.append((namespace, name, request, kind))
        if self.error is not None:
            raise self.error
        req = TraceRequest(request.duration or 10.0, request.packets or 100,
                           request.bytes or 1_000_000, request.snaplen or 1500, request.filter)
        if self.flood and kind == "packets":
            return self._flood(req.duration)
        now = time.monotonic()
        session = Session(id=len(self.started), kind=kind, pod=WEB, slots=frozenset({3}),
                          interfaces=((7, "veth7", 3),), request=req, started=now,
                          deadline=now + req.duration)
        if kind == "packets":
            for i, frame in enumerate(FRAMES):
                session.queue.put((1_700_000_000_000_000_000 + i, 3, "outbound", frame, len(frame)))
        else:
            for record in self.records:
                session.queue.put(record)
        session.end("duration reached")
        return session

    def _flood(self, duration: float) -> Session:
        """A running trace with more queued than any socket buffers, at no limit soon."""
        now = time.monotonic()
        req = TraceRequest(duration, 10**6, 10**9, 65000)
        session = Session(id=len(self.started), kind="packets", pod=WEB, slots=frozenset({3}),
                          interfaces=((7, "veth7", 3),), request=req, started=now,
                          deadline=now + duration)
        frame = FRAMES[0] + b"f" * 60000
        for i in range(self.flood):
            session.queue.put((1_700_000_000_000_000_000 + i, 3, "outbound", frame, len(frame)))
        threading.Timer(duration, session.end, ("duration reached",)).start()  # the reader's _expire
        return session

    def finish(self, session: Session, why: str) -> None:
        session.end(why)
        self.finished.append((session.id, session.ended))


@dataclass
class Served:
    port: int
    captures: FakeCaptures
    traces: TraceApi
    logs: io.StringIO
    store: CaptureStore | None = None


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    saved = structlog.get_config()
    logs = io.StringIO()
    monitor_log.configure("debug", "json", stream=logs)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    captures = FakeCaptures()
    store = CaptureStore(str(tmp_path_factory.mktemp("captures")), max_files=10, max_bytes=1 << 20)
    traces = TraceApi(captures, store, AlertCaptures(captures, store, NODE), NODE)  # type: ignore[arg-type]
    api = Api(Registry(), MonitorState(), NODE, alive=lambda: True,
              auth=TokenFileAuth(str(token_file)), extensions=traces,
              failures=FailureLimiter(100000))  # these tests fail many on purpose
    server = Server("127.0.0.1", 0, api)
    server.start()
    try:
        yield Served(server.port, captures, traces, logs)
    finally:
        server.stop()
        structlog.configure(**saved)


@pytest.fixture
def live(served: Served, tmp_path: Path) -> Served:
    """A fresh fake and store for each test."""
    served.captures.started.clear()
    served.captures.finished.clear()
    served.captures.records.clear()
    served.captures.error = None
    served.captures.flood = 0
    store = CaptureStore(str(tmp_path / "captures"), max_files=10, max_bytes=1 << 20)
    served.traces.store = store
    served.traces.alerts = AlertCaptures(served.captures, store, NODE)  # type: ignore[arg-type]
    served.store = store
    return served


@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without an answer
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, *, token: str | None = TOKEN, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> Reply:
    """One request on its own connection; the path goes on the wire exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent = {"Authorization": f"Bearer {token}"} if token is not None else {}
    sent.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return Reply(None, Message(), b"")
    finally:
        conn.close()


def raw(port: int, request: bytes) -> bytes:
    """Bytes on a socket, and what comes back: until the server closes, or (keep-alive)
    until the first response's Content-Length is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if sep and length and (request.startswith(b"HEAD ") or
                                   len(body) >= int(length.group(1))):
                break
    return out


def pcapng_frames(data: bytes) -> list[bytes]:
    """The frames of a pcapng stream, as scapy's reader finds them."""
    return [bytes(p) for p in PcapNgReader(io.BytesIO(data)).read_all()]  # type: ignore[arg-type]


def auth_header(token: str = TOKEN) -> str:
    return f"Authorization: Bearer {token}\r\n"


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {"version": "4", "status": "firing", "receiver": "podnetmon", "alerts": list(alerts)}


def firing(pod: str = "web", fingerprint: str = "f00d") -> dict[str, Any]:
    return {"status": "firing", "fingerprint": fingerprint, "startsAt": "2024-05-01T10:00:00Z",
            "labels": {"alertname": "PodDropsHigh", "namespace": "shop", "pod": pod,
                       "podnet_capture": "30s"}, "annotations": {}}


# -- authentication -----------------------------------------------------------------------------

ENDPOINTS = [("GET", CAPTURE), ("GET", DROPS), ("GET", "/api/v1/captures"),
             ("GET", "/api/v1/captures/20240101T000000Z-deadbeef"), ("POST", "/api/v1/alertmanager")]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("authorization", [None, f"Bearer {WRONG}", f"Basic {TOKEN}", "Bearer ",
                                           f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"])
def test_401_without_the_token(live: Served, method: str, path: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    reply = call(live.port, method, path, token=None, headers=headers,
                 body=json.dumps(notification(firing())).encode() if method == "POST" else None)
    assert reply.status == 401
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["WWW-Authenticate"] == CHALLENGE
    assert set(reply.json()) == {"error"}
    assert TOKEN not in reply.body.decode() and WRONG not in reply.body.decode()
    assert live.captures.started == []  # refused before anything started


def test_the_unprotected_routes_need_no_token(live: Served) -> None:
    assert call(live.port, "GET", "/healthz", token=None).status == 200
    assert call(live.port, "GET", "/metrics", token=None).status == 200


# -- the capture and drops streams --------------------------------------------------------------

def test_the_capture_streams_the_sessions_packets_as_pcapng(live: Served) -> None:
    reply = call(live.port, "GET", f"{CAPTURE}?duration=5s&filter=udp&snaplen=200&packets=7&bytes=5000")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-pcapng"
    assert reply.headers["Content-Disposition"] == 'attachment; filename="shop_web.pcapng"'
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Content-Length"] is None  # the body ends when the trace does
    assert live.captures.started == [("shop", "web", TraceRequest(5.0, 7, 5000, 200, "udp"), "packets")]
    counter = BlockCounter()
    counter.feed(reply.body)
    assert counter.packets == len(FRAMES)
    assert pcapng_frames(reply.body) == FRAMES
    assert live.captures.finished == [(1, "duration reached")]  # finished, with the real reason


def test_a_request_without_parameters_leaves_the_defaults_to_the_manager(live: Served) -> None:
    assert call(live.port, "GET", CAPTURE).status == 200
    assert call(live.port, "GET", f"{CAPTURE}/?filter=").status == 200  # a trailing slash, empty filter
    assert [s[2] for s in live.captures.started] == [TraceRequest(0.0)] * 2


def test_the_drops_stream_ndjson(live: Served) -> None:
    live.captures.records.extend([{"reason": "NO_SOCKET", "dport": 53}, {"reason": "TC_EGRESS"}])
    reply = call(live.port, "GET", f"{DROPS}?duration=1m&events=2")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line) for line in reply.body.splitlines()] == live.captures.records
    assert reply.body.endswith(b"\n")
    assert live.captures.started == [("shop", "web", TraceRequest(60.0, 2, 0, 0, ""), "drops")]
    assert live.captures.finished == [(1, "duration reached")]  # the first reason stays


@pytest.mark.parametrize(("status", "reason"), [
    (404, "no pod shop/web on node node-1"),
    (409, "pod shop/web is not attached (yet): nothing to trace"),
    (429, "4 traces run on this node already (at most 4)"),
    (400, "bad filter: can't parse filter expression: syntax error"),
])
@pytest.mark.parametrize("path", [CAPTURE, DROPS])
def test_the_managers_refusal_is_the_answer(live: Served, path: str, status: int, reason: str) -> None:
    live.captures.error = CaptureError(status, reason)
    reply = call(live.port, "GET", path)
    assert (reply.status, reply.json()) == (status, {"error": reason})


# -- the input matrix ---------------------------------------------------------------------------

KNOWN = "known: ['bytes', 'duration', 'filter', 'packets', 'snaplen']"  # of the capture endpoint


@pytest.mark.parametrize(("path", "error"), [
    ("/api/v1/namespaces/Shop/pods/web/capture", "'Shop' is not a namespace name"),
    ("/api/v1/namespaces/shop_1/pods/web/capture", "'shop_1' is not a namespace name"),
    ("/api/v1/namespaces/-shop/pods/web/drops", "'-shop' is not a namespace name"),
    (f"/api/v1/namespaces/{'a' * 64}/pods/web/capture", f"{'a' * 64!r} is not a namespace name"),
    (f"/api/v1/namespaces/{'a' * 80}/pods/web/capture", f"{'a' * 70!r} is not a namespace name"),
    ("/api/v1/namespaces/%2E%2E/pods/web/capture", "'%2E%2E' is not a namespace name"),
    ("/api/v1/namespaces/shop/pods/-web/capture", "'-web' is not a pod name"),
    ("/api/v1/namespaces/shop/pods/web./capture", "'web.' is not a pod name"),
    ("/api/v1/namespaces/shop/pods/Web/drops", "'Web' is not a pod name"),
    ("/api/v1/namespaces/shop/pods/web%00/capture", "'web%00' is not a pod name"),
    (f"{CAPTURE}?foo=1&bar=", f"unknown parameters ['bar', 'foo']; {KNOWN}"),
    (f"{CAPTURE}?token={TOKEN}", f"unknown parameters ['token']; {KNOWN}"),
    (f"{CAPTURE}?packets=9999999999999", "packets='9999999999999': a whole number up to 100"),
    (f"{CAPTURE}?packets={'9' * 400}", f"packets={'9' * 20!r}: a whole number up to 100"),
    (f"{CAPTURE}?packets=101", "packets='101': a whole number up to 100"),
    (f"{CAPTURE}?packets=-1", "packets='-1': a whole number up to 100"),
    (f"{CAPTURE}?packets=1.5", "packets='1.5': a whole number up to 100"),
    (f"{CAPTURE}?packets=0x10", "packets='0x10': a whole number up to 100"),
    (f"{CAPTURE}?packets=%201", "packets=' 1': a whole number up to 100"),
    (f"{CAPTURE}?snaplen=9001", "snaplen='9001': a whole number up to 9000"),
    (f"{CAPTURE}?snaplen=%2B5", "snaplen='+5': a whole number up to 9000"),
    (f"{CAPTURE}?bytes=1e6", "bytes='1e6': a whole number up to 1000000"),
    (f"{CAPTURE}?bytes=1000001", "bytes='1000001': a whole number up to 1000000"),
    (f"{DROPS}?events=101", "events='101': a whole number up to 100"),
    (f"{CAPTURE}?duration=soon", "not a duration: 'soon' (e.g. 10s, 2m, 500ms)"),
    (f"{CAPTURE}?duration=-1s", "not a duration: '-1s' (e.g. 10s, 2m, 500ms)"),
    (f"{DROPS}?duration=1d", "not a duration: '1d' (e.g. 10s, 2m, 500ms)"),
])
def test_bad_input_is_400_before_anything_starts(live: Served, path: str, error: str) -> None:
    reply = call(live.port, "GET", path)
    assert (reply.status, reply.json()) == (400, {"error": error})
    assert live.captures.started == []


@pytest.mark.parametrize(("value", "shown"), [
    ("%C2%B2", "²"), ("%C2%B9", "¹"), ("1%C2%B3", "1³"),  # isdigit(), but int() refuses them
    ("%D9%A1%D9%A2", "١٢"),  # Arabic-Indic digits: int() reads them, the API does not
])
def test_a_number_that_is_not_ascii_digits_is_400(live: Served, value: str, shown: str) -> None:
    reply = call(live.port, "GET", f"{CAPTURE}?packets={value}")
    assert (reply.status, reply.json()) == (400, {"error": f"packets={shown!r}: a whole number up to 100"})
    assert live.captures.started == []


def test_a_content_length_int_cannot_read_is_refused(live: Served) -> None:
    # "²" (latin-1 0xb2) passes isdigit() and int() refuses it: still an answer, a 400
    answer = raw(live.port, b"POST /api/v1/alertmanager HTTP/1.1\r\nHost: x\r\n"
                 + auth_header().encode() + b"Content-Length: \xb2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 411 ")  # not a length we can read: none at all
    assert live.captures.started == []


# -- stored captures ----------------------------------------------------------------------------

def test_list_and_get_a_stored_capture(live: Served) -> None:
    assert live.store is not None
    assert call(live.port, "GET", "/api/v1/captures").json() == {"node": NODE, "captures": []}
    record, path = live.store.create("shop", "web", "alert PodDropsHigh", "udp", 30.0)
    path.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(range(256)) * 300)  # longer than one read
    listed = call(live.port, "GET", "/api/v1/captures/").json()
    assert listed == {"node": NODE, "captures": [record.__dict__]}
    reply = call(live.port, "GET", f"/api/v1/captures/{record.id}")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-pcapng"
    assert reply.headers["Content-Disposition"] == f'attachment; filename="{record.id}.pcapng"'
    assert reply.body == path.read_bytes()


@pytest.mark.parametrize(("path", "error"), [
    ("/api/v1/captures/20240101T000000Z-deadbeef", "no such capture"),
    ("/api/v1/captures/..%2F..%2F..%2Fetc%2Fpasswd", "no such capture"),
    ("/api/v1/captures/%2E%2E", "no such capture"),
    ("/api/v1/captures/..", "no such capture"),
    ("/api/v1/captures/SECRET.json", "no such capture"),
    ("/api/v1/captures/../../etc/passwd", "no such endpoint: /api/v1/captures/../../etc/passwd"),
    ("/api/v1/captures//etc/passwd", "no such endpoint: /api/v1/captures//etc/passwd"),
])
def test_unknown_captures_and_path_tricks_are_404(live: Served, path: str, error: str) -> None:
    assert live.store is not None
    record, file = live.store.create("shop", "web", "alert A", "", 10.0)
    file.write_bytes(b"pcapng")
    (live.store.dir / "SECRET.json").write_text("{}")
    reply = call(live.port, "GET", path)
    assert (reply.status, reply.json()) == (404, {"error": error})
    assert call(live.port, "GET", f"/api/v1/captures/{record.id}.json").status == 404
    assert call(live.port, "GET", f"/api/v1/captures/{record.id}").status == 200  # the one real one


# -- the Alertmanager webhook -------------------------------------------------------------------

def test_a_notification_starts_a_stored_capture(live: Served) -> None:
    assert live.store is not None
    body = json.dumps(notification(firing(), {**firing(), "status": "resolved"})).encode()
    reply = call(live.port, "POST", "/api/v1/alertmanager", body=body,
                 headers={"Content-Type": "application/json"})
    assert reply.status == 200
    doc = reply.json()
    (started,) = doc["started"]
    assert doc["skipped"] == [{"alert": "PodDropsHigh", "why": "not firing"}]
    assert live.captures.started == [("shop", "web", TraceRequest(30.0), "packets")]
    deadline = time.monotonic() + 10
    while not live.captures.finished and time.monotonic() < deadline:  # the writer's thread
        time.sleep(0.01)
    for t in threading.enumerate():
        if t.name == f"capture-{started['capture']}":
            t.join(timeout=10)
    (listed,) = call(live.port, "GET", "/api/v1/captures").json()["captures"]
    assert (listed["id"], listed["packets"], listed["ended"]) == (started["capture"], 3, "duration reached")
    stored = call(live.port, "GET", f"/api/v1/captures/{started['capture']}")
    assert pcapng_frames(stored.body) == FRAMES
    # Alertmanager repeats the notification while the alert fires: one capture
    again = call(live.port, "POST", "/api/v1/alertmanager", body=body).json()
    assert again["started"] == []


@pytest.mark.parametrize(("body", "error"), [
    (b"{not json", "the body is not JSON"),
    (b"\xff\xfe{}", "the body is not JSON"),
    (b"", "the body is not JSON"),
    (b"[]", "not an Alertmanager notification: no 'alerts' list"),
    (b'{"alerts": {}}', "not an Alertmanager notification: no 'alerts' list"),
])
def test_a_body_that_is_not_a_notification_is_400(live: Served, body: bytes, error: str) -> None:
    reply = call(live.port, "POST", "/api/v1/alertmanager", body=body)
    assert (reply.status, reply.json()) == (400, {"error": error})
    assert live.captures.started == []


def test_a_body_over_max_body_is_413_and_the_client_gets_it(live: Served) -> None:
    assert MAX_BODY + 1 <= DRAIN_MAX
    body = b" " * (MAX_BODY + 1)  # valid JSON whitespace, were it read
    reply = call(live.port, "POST", "/api/v1/alertmanager", body=body)
    assert (reply.status, reply.json()) == (413, {"error": f"the body is {MAX_BODY + 1} bytes; "
                                                           f"at most {MAX_BODY}"})
    assert reply.headers["Content-Type"] == "application/json"
    assert live.captures.started == []
    # MAX_BODY itself is read (and is not JSON)
    assert call(live.port, "POST", "/api/v1/alertmanager", body=b" " * MAX_BODY).status == 400


def test_a_body_without_content_length_is_411(live: Served) -> None:
    answer = raw(live.port, b"POST /api/v1/alertmanager HTTP/1.1\r\nHost: x\r\n"
                 + auth_header().encode() + b"Connection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ")
    assert json.loads(body) == {"error": "a Content-Length is required"}


def test_a_chunked_body_is_411(live: Served) -> None:
    answer = raw(live.port, b"POST /api/v1/alertmanager HTTP/1.1\r\nHost: x\r\n"
                 + auth_header().encode() + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411 ")


# -- methods ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("POST", "/api/v1/captures", "GET"),
    ("DELETE", "/api/v1/captures/20240101T000000Z-deadbeef", "GET"),
    ("PUT", CAPTURE, "GET"),
    ("PATCH", DROPS, "GET"),
    ("GET", "/api/v1/alertmanager", "POST"),
    ("HEAD", "/api/v1/alertmanager", "POST"),
    ("DELETE", "/api/v1/alertmanager/", "POST"),
])
def test_405_says_what_is_allowed(live: Served, method: str, path: str, allowed: str) -> None:
    reply = call(live.port, method, path, body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
    assert reply.status == 405
    assert reply.headers["Allow"] == allowed
    if method != "HEAD":
        assert reply.json() == {"error": f"{method} not allowed here", "allowed": [allowed]}
    assert live.captures.started == []


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/api/v1/pods", "/api/v1/captures"])
def test_head_on_get_routes_has_the_headers_and_no_body(live: Served, path: str) -> None:
    answer = raw(live.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{auth_header()}"
                 "Connection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nContent-Length: " in head
    assert body == b""


@pytest.mark.parametrize("path", [CAPTURE, DROPS, "/api/v1/captures/{id}"])
def test_head_is_refused_where_a_get_starts_a_trace_or_streams(live: Served, path: str) -> None:
    assert live.store is not None
    record, file = live.store.create("shop", "web", "alert A", "", 10.0)
    file.write_bytes(b"pcapng bytes")
    path = path.replace("{id}", record.id)
    answer = raw(live.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{auth_header()}\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ")
    assert b"Allow: GET" in head.split(b"\r\n")
    assert body == b""  # no file after the headers
    assert live.captures.started == []  # and no trace started by a HEAD


# -- a client that reads nothing ----------------------------------------------------------------

@dataclass
class Stalled:
    """The two ends of a connection whose reader reads nothing, as a handler holds its end."""

    connection: socket.socket
    peer: socket.socket

    @property
    def wfile(self) -> Any:
        return self.connection.makefile("wb", buffering=0)


@pytest.fixture
def stalled() -> Iterator[Stalled]:
    ours, theirs = socket.socketpair()
    for sock, opt in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4096)
    try:
        yield Stalled(ours, theirs)
    finally:
        ours.close()
        theirs.close()


def test_a_write_to_a_stalled_client_ends_at_the_deadline_plus_the_grace(
        stalled: Stalled, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traceapi, "WRITE_GRACE", 0.2)
    out = DeadlineWriter(stalled, deadline=time.monotonic() + 0.3)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        for _ in range(1000):
            out.write(b"x" * 50_000)
    took = time.monotonic() - started
    assert 0.45 < took < 1.0, took
    assert out.timed_out
    with pytest.raises(TimeoutError):  # past the deadline and its grace: not one more write
        out.write(b"x")
    out.close()
    # closing the connection now resets it: the unsent bytes are dropped, not kept
    assert struct.unpack("ii", stalled.connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (1, 0)
    assert stalled.connection.gettimeout() is None  # given back as it was


def test_without_a_deadline_each_write_is_bounded_by_the_sockets_timeout(stalled: Stalled) -> None:
    stalled.connection.settimeout(0.3)  # the listener's write timeout
    out = DeadlineWriter(stalled)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        for _ in range(1000):
            out.write(b"x" * 50_000)
    assert time.monotonic() - started < 1.5  # what was sent, and one write that never was
    out.close()
    assert stalled.connection.gettimeout() == 0.3


def test_a_client_that_keeps_reading_gets_everything_and_no_reset(stalled: Stalled) -> None:
    got = bytearray()

    def read() -> None:
        while chunk := stalled.peer.recv(65536):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    out = DeadlineWriter(stalled, deadline=time.monotonic() + 5)  # type: ignore[arg-type]
    for _ in range(100):
        out.write(b"y" * 50_000)
    out.flush()
    out.close()
    stalled.connection.shutdown(socket.SHUT_WR)
    reader.join(timeout=10)
    assert len(got) == 5_000_000 and not out.timed_out
    assert struct.unpack("ii", stalled.connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (0, 0)


def test_a_capture_client_that_reads_nothing_is_let_go_at_the_deadline(
        live: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traceapi, "WRITE_GRACE", 0.3)
    live.captures.flood = 400  # 24 MB queued: more than any socket buffers
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    try:
        client.connect(("127.0.0.1", live.port))
        client.sendall(f"GET {CAPTURE}?duration=0.5s HTTP/1.1\r\nHost: x\r\n"
                       f"{auth_header()}\r\n".encode())
        started = time.monotonic()
        while not live.captures.finished and time.monotonic() - started < 10:
            time.sleep(0.02)
        took = time.monotonic() - started
        assert live.captures.finished == [(1, "duration reached")], live.captures.finished
        assert 0.7 < took < 2.0, took  # the deadline and the grace, not the 30 s write timeout
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):  # reset: the daemon dropped the rest
            while client.recv(1 << 20):
                pass
    finally:
        client.close()
    assert call(live.port, "GET", "/healthz").status == 200


# -- the log ------------------------------------------------------------------------------------

def test_no_token_in_any_log_line(live: Served) -> None:
    start = len(live.logs.getvalue())
    bodies = []
    for token, path in [(TOKEN, CAPTURE), (WRONG, CAPTURE), (TOKEN, f"{CAPTURE}?token={TOKEN}"),
                        (WRONG, f"{DROPS}?token={WRONG}"), (TOKEN, "/api/v1/captures"),
                        (WRONG, "/api/v1/captures/20240101T000000Z-deadbeef")]:
        bodies.append(call(live.port, "GET", path, token=token).body)
    bodies.append(call(live.port, "GET", CAPTURE, token=None,
                       headers={"Authorization": f"Basic {TOKEN}"}).body)
    bodies.append(call(live.port, "POST", "/api/v1/alertmanager", token=WRONG, body=b"{}").body)
    bodies.append(call(live.port, "POST", "/api/v1/alertmanager",
                       body=json.dumps(notification(firing(fingerprint=TOKEN))).encode()).body)
    output = live.logs.getvalue()[start:]
    events = [json.loads(line) for line in output.splitlines()]
    decisions = [(e["event"], e.get("status"), e["path"]) for e in events
                 if e["event"].startswith("access")]
    assert decisions == [
        ("access allowed", None, CAPTURE), ("access refused", 401, CAPTURE),
        ("access allowed", None, CAPTURE), ("access refused", 401, DROPS),  # paths without query
        ("access allowed", None, "/api/v1/captures"),
        ("access refused", 401, "/api/v1/captures/20240101T000000Z-deadbeef"),
        ("access refused", 401, CAPTURE), ("access refused", 401, "/api/v1/alertmanager"),
        ("access allowed", None, "/api/v1/alertmanager")]
    assert any(e["event"] == "capture started by alert" for e in events)
    for secret in (TOKEN, WRONG):
        assert secret not in output
        assert not [b for b in bodies if secret.encode() in b]
