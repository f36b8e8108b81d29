"""The trace endpoints of the HTTP API, all behind authorization.

    GET  /api/v1/namespaces/{ns}/pods/{pod}/capture   pcapng, streamed live
         ?duration=10s&filter=<pcap filter>&snaplen=N&packets=N&bytes=N
    GET  /api/v1/namespaces/{ns}/pods/{pod}/drops     NDJSON drop events, streamed
         ?duration=60s&events=N
    POST /api/v1/alertmanager                         Alertmanager's webhook
    GET  /api/v1/captures                             stored captures (JSON)
    GET  /api/v1/captures/{id}                        one stored capture (pcapng)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from http import HTTPStatus
from typing import Any

from monitor.alerts import AlertCaptures
from monitor.auth import Access
from monitor.capture import (
    CaptureError,
    CaptureManager,
    TraceRequest,
    ndjson_drops,
    parse_duration,
    write_pcapng,
)
from monitor.server import Api, Handler, Params, RequestError, int_param, pod_params
from monitor.store import CaptureStore


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

    def _start(self, namespace: str, pod: str, request: TraceRequest, kind: str) -> Any:
        try:
            return self.captures.start(namespace, pod, request, kind)
        except CaptureError as exc:
            raise RequestError(exc.status, exc.reason) from None

    def capture(self, h: Handler, params: Params, query: Mapping[str, str]) -> None:
        namespace, pod = pod_params(params)
        self.api.authorize(h, Access("get", namespace, pod, "capture"))
        session = self._start(namespace, pod, self._request(query, "packets"), "packets")
        try:
            h.start_stream("application/x-pcapng", {
                "Content-Disposition": f'attachment; filename="{namespace}_{pod}.pcapng"'})
            write_pcapng(session, h.wfile, self.node)
        finally:
            self.captures.finish(session, "the client went away")

    def drops(self, h: Handler, params: Params, query: Mapping[str, str]) -> None:
        namespace, pod = pod_params(params)
        self.api.authorize(h, Access("get", namespace, pod, "drops"))
        session = self._start(namespace, pod, self._request(query, "events"), "drops")
        try:
            h.start_stream("application/x-ndjson")
            for line in ndjson_drops(session):
                h.wfile.write(line)  # empty lines never reach the wire, but test the socket
                h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            session.end("the client went away")
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
        h.start_stream("application/x-pcapng", {
            "Content-Disposition": f'attachment; filename="{path.name}"'})
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                h.wfile.write(chunk)
