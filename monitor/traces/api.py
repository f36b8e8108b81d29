"""The trace endpoints of the HTTP API, all behind authorization.

    GET  /api/v1/namespaces/{ns}/pods/{pod}/capture   pcapng, streamed live
         ?duration=10s&filter=<pcap filter>&snaplen=N&packets=N&bytes=N
    GET  /api/v1/namespaces/{ns}/pods/{pod}/drops     NDJSON drop events, streamed
         ?duration=60s&events=N
    POST /api/v1/alertmanager                         Alertmanager's webhook
    GET  /api/v1/captures                             stored captures (JSON)
    GET  /api/v1/captures/{id}                        one stored capture (pcapng)

A stream writes to its client through a DeadlineWriter: each write may wait on
the client no longer than the socket's write timeout (the listener's, or
WRITE_TIMEOUT), and a trace's never past its deadline plus WRITE_GRACE. A client
that stops reading thus ends its trace on time: the trace's switch went off at
the deadline already (monitor/capture.py), and at deadline + grace the writer
gives up, the connection is reset (its unsent bytes dropped) and the session
with its queue is let go.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict
from http import HTTPStatus
from typing import Any

from monitor import log
from monitor.auth import Access
from monitor.server import Api, Handler, Params, RequestError, int_param, pod_params
from monitor.traces.alertcaptures import AlertCaptures
from monitor.traces.capture import CaptureManager
from monitor.traces.dropevents import ndjson_drops
from monitor.traces.pcapout import write_pcapng
from monitor.traces.session import CaptureError, Session, TraceRequest, parse_duration
from monitor.traces.store import CaptureStore

WRITE_GRACE = 3.0  # seconds past a trace's deadline its last bytes may take to leave
WRITE_TIMEOUT = 30.0  # a write's bound where the listener set none (http_write_timeout's default)
_CHUNK = 16 << 10  # at most one TLS record a send: each chunk is bounded by the time left
_RESET_EVERY = 0.1  # s: the socket's timeout is set again at most this often (a syscall)


class DeadlineWriter(io.BufferedIOBase):
    """A handler's wfile whose every write and flush is bounded in time.

    Before each chunk the socket's timeout is set to the time left: at most the write
    timeout the socket had (set by the listener) or WRITE_TIMEOUT if it had none, and,
    with a deadline, never past deadline + WRITE_GRACE. A write that does not finish in
    it raises TimeoutError; close() then makes the connection's close a reset, so the
    kernel drops the unsent bytes instead of holding them for a client that reads
    nothing, and gives the socket its timeout back.
    """

    def __init__(self, h: Handler, deadline: float | None = None) -> None:
        super().__init__()
        self._out, self._sock = h.wfile, h.connection
        self._listener_timeout = self._sock.gettimeout()
        self._cap = self._listener_timeout or WRITE_TIMEOUT
        self._end = None if deadline is None else deadline + WRITE_GRACE
        self.timed_out = False
        self._closing = False
        self._set_at: float | None = None  # when the socket's timeout was last set

    def bound(self) -> None:
        """Set the socket's timeout to what the next write may take (also before writes
        that do not go through this object: the response's headers). Set again only
        every _RESET_EVERY (it costs a syscall or two, per packet otherwise): a write
        may overrun deadline + grace by that much, never more."""
        now = time.monotonic()
        if self._end is not None and now >= self._end:
            self.timed_out = True
            raise TimeoutError("the trace's deadline passed with bytes still unsent")
        if self._set_at is not None and (now - self._set_at < _RESET_EVERY or self._end is None):
            return  # without a deadline the budget is the same every time
        self._set_at = now
        self._sock.settimeout(self._cap if self._end is None else min(self._cap, self._end - now))

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = data if isinstance(data, bytes) else memoryview(data).cast("B")
        size, at = len(view), 0
        while at < size:
            self.bound()
            # a packet's block, the usual case, in one piece; more in chunks (no copies)
            piece = view if at == 0 and size <= _CHUNK else memoryview(view)[at: at + _CHUNK]
            try:
                sent = self._out.write(piece)
            except TimeoutError:
                self.timed_out = True
                raise
            # a raw socket file may send less than it was given (None: a writer that says
            # nothing wrote it all)
            at += len(piece) if sent is None else sent
        return size

    def flush(self) -> None:
        if self._closing:  # IOBase.close() flushes: nothing of ours is buffered
            return
        self.bound()
        try:
            self._out.flush()
        except TimeoutError:
            self.timed_out = True
            raise

    def close(self) -> None:
        """Give the socket back as it was; after a timeout, closing it will reset it."""
        if self.closed:
            return
        self._closing = True
        super().close()
        try:
            if self.timed_out:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._sock.settimeout(self._listener_timeout)
        except OSError:
            pass  # closed already


class TraceApi:
    """Registers the routes on an Api."""

    def __init__(self, captures: CaptureManager, store: CaptureStore, alerts: AlertCaptures,
                 node: str) -> None:
        self.captures, self.store, self.alerts, self.node = captures, store, alerts, node

    def register(self, api: Api) -> None:
        self.api = api
        # HEAD is refused where a GET starts a trace or streams a file
        api.route("GET", "/api/v1/namespaces/{namespace}/pods/{pod}/capture", self.capture,
                  head=False)
        api.route("GET", "/api/v1/namespaces/{namespace}/pods/{pod}/drops", self.drops,
                  head=False)
        api.route("POST", "/api/v1/alertmanager", self.alertmanager)
        api.route("GET", "/api/v1/captures", self.list_captures)
        api.route("GET", "/api/v1/captures/{id}", self.get_capture, head=False)

    def _request(self, query: Mapping[str, str], count_name: str) -> TraceRequest:
        limits = self.captures.limits
        known = ({"duration", "filter", "snaplen", "packets", "bytes"} if count_name == "packets"
                 else {"duration", "events"})
        unknown = sorted(set(query) - known)
        if unknown:
            raise RequestError(400, f"unknown parameters {unknown}; known: {sorted(known)}")
        try:
            duration = parse_duration(query["duration"]) if "duration" in query else 0.0
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        if "duration" in query and duration <= 0:
            raise RequestError(400, "duration must be more than 0 s")
        return TraceRequest(duration=duration,
                            packets=int_param(query, count_name, limits.max_packets),
                            bytes=int_param(query, "bytes", limits.max_bytes),
                            snaplen=int_param(query, "snaplen", limits.max_snaplen),
                            filter=query.get("filter", ""))

    def _start(self, namespace: str, pod: str, request: TraceRequest, kind: str) -> Session:
        try:
            return self.captures.start(namespace, pod, request, kind)
        except CaptureError as exc:
            raise RequestError(exc.status, exc.reason) from None

    def capture(self, h: Handler, params: Params, query: Mapping[str, str]) -> None:
        namespace, pod = pod_params(params)
        self.api.authorize(h, Access("get", namespace, pod, "capture"))
        session = self._start(namespace, pod, self._request(query, "packets"), "packets")
        out = DeadlineWriter(h, session.deadline)
        try:
            out.bound()
            h.start_stream("application/x-pcapng", {
                "Content-Disposition": f'attachment; filename="{namespace}_{pod}.pcapng"'})
            write_pcapng(session, out, self.node)
        except TimeoutError:
            session.end("the client stopped reading")
        finally:
            self._done(h, out, session)

    def drops(self, h: Handler, params: Params, query: Mapping[str, str]) -> None:
        namespace, pod = pod_params(params)
        self.api.authorize(h, Access("get", namespace, pod, "drops"))
        session = self._start(namespace, pod, self._request(query, "events"), "drops")
        out = DeadlineWriter(h, session.deadline)
        try:
            out.bound()
            h.start_stream("application/x-ndjson")
            for line in ndjson_drops(session):
                out.write(line)  # empty lines never reach the wire
                out.flush()
        except (BrokenPipeError, ConnectionResetError):
            session.end("the client went away")
        except TimeoutError:
            session.end("the client stopped reading")
        finally:
            self._done(h, out, session)

    def _done(self, h: Handler, out: DeadlineWriter, session: Session) -> None:
        """A trace's stream is over: its session finished (switch, filter, queue let go)."""
        if out.timed_out:
            h.close_connection = True
            log.get("http").info("trace client stopped reading", id=session.id,
                                 kind=session.kind, reason=session.ended)
        try:
            out.close()
        finally:
            self.captures.finish(session, "the client went away")

    def alertmanager(self, h: Handler, _params: Params, _query: Mapping[str, str]) -> None:
        self.api.authorize(h, Access("create", "", "", "captures"))
        try:
            payload = json.loads(h.body())
        except ValueError:
            raise RequestError(400, "the body is not JSON") from None
        try:
            result = self.alerts.handle(payload)
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
        h.reply_json(HTTPStatus.OK, result)

    def list_captures(self, h: Handler, _params: Params, _query: Mapping[str, str]) -> None:
        self.api.authorize(h, Access("list", "", "", "captures"))
        h.reply_json(HTTPStatus.OK, {"node": self.node,
                                     "captures": [asdict(c) for c in self.store.captures()]})

    def get_capture(self, h: Handler, params: Params, _query: Mapping[str, str]) -> None:
        self.api.authorize(h, Access("get", "", "", "captures"))
        path = self.store.path(params.get("id", ""))
        if path is None:
            raise RequestError(404, "no such capture")
        out = DeadlineWriter(h)  # a stored file: no deadline, each write bounded
        try:
            with path.open("rb") as f:
                out.bound()
                h.start_stream("application/x-pcapng", {
                    "Content-Disposition": f'attachment; filename="{path.name}"'})
                while chunk := f.read(1 << 16):
                    out.write(chunk)
        except TimeoutError:
            h.close_connection = True
        finally:
            out.close()
