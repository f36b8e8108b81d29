"""The one HTTP listener's routes: /metrics, /healthz, /readyz and /api/v1/.

A small router over the standard library's request handler. Connections, TLS and
every bound on what a client may cost (connections, threads, sizes, time) live in
monitor/listener.py; this module is what a request means. Everything that returns
packet contents or drop details, or starts a capture, is authorized first
(monitor/auth.py), as /metrics and /api/v1/pods are with --auth-metrics; a
request that carries credentials over plain HTTP from another host is refused
before anything reads them. Bad requests get a 4xx with the reason, never a
traceback.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from monitor import __version__, log
from monitor.auth import Access, Authenticator, AuthError, NoAuth, Request
from monitor.connection import Conn, ConnReader, ConnWriter
from monitor.exposition import Registry
from monitor.failurelimit import FailureLimiter
from monitor.identity import NAMESPACE_RE, POD_NAME_RE
from monitor.listener import FrontDoor, Limits
from monitor.scrapeformat import negotiate
from monitor.state import MonitorState
from monitor.tls import TlsFiles

MAX_BODY = 1 << 20  # an Alertmanager notification is a few KB; refuse what is not
DRAIN_MAX = 8 << 20  # an oversized body up to this is read and dropped, so the client gets our 413


class RequestError(Exception):
    """A request we answer with a 4xx and this reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


Params = Mapping[str, str]
Handler_ = Callable[["Handler", Params, Mapping[str, str]], None]


class Api:
    """The routes, bound to the daemon's registry, state and capture machinery."""

    def __init__(self, registry: Registry, state: MonitorState, node: str,
                 alive: Callable[[], bool], *, auth: Authenticator | None = None,
                 extensions: Any = None, auth_metrics: bool = False,
                 allow_insecure_auth: bool = False,
                 failures: FailureLimiter | None = None) -> None:
        self.registry, self.state, self.node, self.alive = registry, state, node, alive
        self.auth: Authenticator = auth or NoAuth()
        self.auth_metrics, self.allow_insecure_auth = auth_metrics, allow_insecure_auth
        self.failures = failures or FailureLimiter()
        self.routes: list[tuple[str, re.Pattern[str], Handler_]] = []
        self._no_head: set[re.Pattern[str]] = set()
        self.route("GET", "/metrics", self.metrics)
        self.route("GET", "/healthz", self.healthz)
        self.route("GET", "/readyz", self.readyz)
        self.route("GET", "/api/v1/pods", self.pods)
        if extensions is not None:
            extensions.register(self)

    def route(self, method: str, pattern: str, handler: Handler_, *, head: bool = True) -> None:
        """`pattern` is a path with {name} parts (no slashes in them). head=False: HEAD is
        refused, for GET routes that start something (a trace) or stream a body."""
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "/?$")
        self.routes.append((method, regex, handler))
        if not head:
            self._no_head.add(regex)

    def head_allowed(self, regex: re.Pattern[str]) -> bool:
        return regex not in self._no_head

    def authorize(self, h: Handler, access: Access) -> str:
        """The user, or AuthError. An address whose authentications keep failing is told
        to wait (429) before its next token costs the API server a TokenReview."""
        request = h.auth_request()
        wait = self.failures.wait(request.peer)
        if wait > 0:
            raise AuthError(429, "too many failed authentications from this address: retry "
                                 f"in {wait:.0f} s", retry_after=wait)
        try:
            return self.auth.check(request, access)
        except AuthError as err:
            if err.status == 401:
                self.failures.failed(request.peer)
            raise

    def refuse_cleartext(self, h: Handler) -> None:
        """A request that sent credentials in cleartext across the network is refused, so
        that a misconfigured client learns it leaked its token instead of working."""
        if h.conn.tls or self.allow_insecure_auth or "Authorization" not in h.headers:
            return
        if is_loopback(h.conn.address):
            return
        raise AuthError(403, "credentials were sent over plain HTTP from another host: use "
                             "https (the daemon's --tls-cert-file), and rotate that token; "
                             "--allow-insecure-auth accepts them on a trusted network")

    # -- the routes everyone may read (with --auth-metrics, those allowed to) ---------------

    def metrics(self, h: Handler, _p: Params, _q: Mapping[str, str]) -> None:
        if self.auth_metrics:
            self.authorize(h, Access("get", path="/metrics"))
        fmt = negotiate(h.headers.get("Accept", ""))  # as prometheus_client's choose_encoder
        h.reply(HTTPStatus.OK, self.registry.render(fmt), fmt.content_type)

    def healthz(self, h: Handler, _p: Params, _q: Mapping[str, str]) -> None:
        if self.alive():
            h.reply(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        else:
            h.reply(HTTPStatus.SERVICE_UNAVAILABLE, b"reconciler not running\n",
                    "text/plain; charset=utf-8")

    def readyz(self, h: Handler, _p: Params, _q: Mapping[str, str]) -> None:
        if self.state.ready and self.alive():
            h.reply(HTTPStatus.OK, b"ready\n", "text/plain; charset=utf-8")
        else:
            h.reply(HTTPStatus.SERVICE_UNAVAILABLE, b"first discovery and attach not done\n",
                    "text/plain; charset=utf-8")

    def pods(self, h: Handler, _p: Params, _q: Mapping[str, str]) -> None:
        if self.auth_metrics:
            self.authorize(h, Access("get", path="/api/v1/pods"))
        snapshot, bypassed = self.state.snapshot, self.state.bypassed
        h.reply_json(HTTPStatus.OK, {"node": self.node, "time": time.time(), "pods": [
            {**p.as_json(), "bypassed": bypassed.get(p.pod.key, "")}
            for p in snapshot.pods]})


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def pod_params(params: Params) -> tuple[str, str]:
    namespace, pod = params.get("namespace", ""), params.get("pod", "")
    if not NAMESPACE_RE.fullmatch(namespace):
        raise RequestError(400, f"{namespace[:70]!r} is not a namespace name")
    if not POD_NAME_RE.fullmatch(pod):
        raise RequestError(400, f"{pod[:70]!r} is not a pod name")
    return namespace, pod


def int_param(query: Mapping[str, str], name: str, limit: int) -> int:
    raw = query.get(name, "")
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or int(raw) > limit:
        raise RequestError(400, f"{name}={raw[:20]!r}: a whole number up to {limit}")
    return int(raw)


class Handler(BaseHTTPRequestHandler):
    """One request on a connection the front door (monitor/listener.py) read the headers
    of; keep-alive is the front door's: it waits for the next request, not this thread."""

    server_version = f"podnetmon/{__version__}"
    protocol_version = "HTTP/1.1"  # keep-alive: a scrape over TLS need not handshake each time
    api: Api

    def __init__(self, conn: Conn, api: Api, limits: Limits) -> None:
        self.conn, self.api, self._limits = conn, api, limits
        self._body_read = False
        self.responded = False  # a status line went out: an error can no longer be answered
        super().__init__(conn.sock, conn.peer, None)  # type: ignore[arg-type]

    def send_response(self, code: int, message: str | None = None) -> None:
        self.responded = True
        super().send_response(code, message)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = ConnReader(self.conn, self._limits)  # type: ignore[assignment]
        self.wfile = ConnWriter(self.conn)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        if not self.close_connection and self._unread_body():
            self.close_connection = True  # what is left of the body is not the next request

    def _unread_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        if headers.get("Transfer-Encoding"):
            return True
        length = headers.get("Content-Length", "0").strip()
        return not self._body_read and length not in ("", "0")

    def auth_request(self) -> Request:
        return Request(self.command, urlsplit(self.path).path, dict(self.headers.items()),
                       peer=self.conn.address, tls=self.conn.tls,
                       certificate=self.conn.certificate)

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        methods_here = []
        for method, regex, handler in self.api.routes:
            match = regex.match(path)
            if match is None:
                continue
            methods_here.append(method)
            head = method == "GET" and self.command == "HEAD" and self.api.head_allowed(regex)
            if method != self.command and not head:
                continue
            try:
                self.api.refuse_cleartext(self)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                handler(self, match.groupdict(), query)
            except AuthError as exc:
                self.reply_json(exc.status, {"error": exc.reason}, exc.headers)
            except RequestError as exc:
                self.reply_json(exc.status, {"error": exc.reason})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left; nothing to answer
            except Exception:  # noqa: BLE001 - a handler's failure is answered and logged, never silent
                log.get("http").exception("request failed", method=self.command,
                                          path=path[:200])
                if not self.responded:
                    self.reply_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                    {"error": "internal error: the daemon's log has the details"})
            return
        if methods_here:
            allowed = sorted(set(methods_here))
            self.reply_json(HTTPStatus.METHOD_NOT_ALLOWED,
                            {"error": f"{self.command} not allowed here", "allowed": allowed},
                            {"Allow": ", ".join(allowed)})
            return
        self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path[:200]}"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch  # noqa: N815

    def body(self) -> bytes:
        """The request body, refused past MAX_BODY before it is read."""
        raw = self.headers.get("Content-Length", "")
        if not (raw.isascii() and raw.isdigit()):
            raise RequestError(411, "a Content-Length is required")
        length = int(raw)
        if length > MAX_BODY:
            if length <= DRAIN_MAX:  # read it away: a client still sending would see a reset
                while length > 0:
                    length -= len(self.rfile.read(min(length, 1 << 16)) or b"x" * length)
            self.close_connection = True
            raise RequestError(413, f"the body is {raw} bytes; at most {MAX_BODY}")
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(body)} of {length} bytes")
        self._body_read = True
        return body

    def reply(self, status: int, body: bytes, content_type: str,
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        self.reply(status, json.dumps(doc, indent=1, default=_jsonable).encode() + b"\n",
                   "application/json", headers)

    def start_stream(self, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        """Headers of a response whose length is not known: the body ends at close."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # never a log line per request or scrape


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


class Server:
    """The listener: the port is bound when this is made (so a start-up learns at once
    that another daemon holds it, before the kernel is touched); requests are served
    from start() on."""

    def __init__(self, host: str, port: int, api: Api | None = None, *,
                 tls: TlsFiles | None = None, limits: Limits | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=1024)
        self.api, self.tls, self.limits = api, tls, limits or Limits()
        self._door: FrontDoor | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def door(self) -> FrontDoor | None:
        return self._door

    def start(self, api: Api | None = None) -> None:
        self.api = api or self.api
        if self.api is None:
            raise ValueError("a server needs its routes (Api) to start")
        bound_api, limits = self.api, self.limits

        def serve(conn: Conn) -> bool:
            handler = Handler(conn, bound_api, limits)
            return not handler.close_connection

        self._door = FrontDoor(self._sock, limits, self.tls, serve)
        self._door.start()
        log.get("http").info("listening", address=self._sock.getsockname()[0], port=self.port,
                             tls=self.tls is not None)

    def stop(self) -> None:
        door, self._door = self._door, None
        if door is not None:
            door.stop()
        self._sock.close()

    close = stop  # a start-up that fails after binding: release the port
