"""The one HTTP listener: /metrics, /healthz, /readyz and /api/v1/.

A small router over the standard library's threading server: each request
gets a thread, so a slow client cannot hold up a scrape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from monitor import __version__, log
from monitor.state import MonitorState

Route = Callable[["Handler"], None]


class Api:
    """The routes, bound to the daemon's registry and state."""

    def __init__(self, registry: CollectorRegistry, state: MonitorState, node: str,
                 alive: Callable[[], bool]) -> None:
        self.registry, self.state, self.node, self.alive = registry, state, node, alive
        self.routes: dict[str, Route] = {
            "/metrics": self.metrics,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/api/v1/pods": self.pods,
        }

    def metrics(self, h: Handler) -> None:
        encoder, content_type = choose_encoder(h.headers.get("Accept", ""))
        h.reply(HTTPStatus.OK, encoder(self.registry), content_type)

    def healthz(self, h: Handler) -> None:
        if self.alive():
            h.reply(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        else:
            h.reply(HTTPStatus.SERVICE_UNAVAILABLE, b"reconciler not running\n",
                    "text/plain; charset=utf-8")

    def readyz(self, h: Handler) -> None:
        if self.state.ready and self.alive():
            h.reply(HTTPStatus.OK, b"ready\n", "text/plain; charset=utf-8")
        else:
            h.reply(HTTPStatus.SERVICE_UNAVAILABLE, b"first discovery and attach not done\n",
                    "text/plain; charset=utf-8")

    def pods(self, h: Handler) -> None:
        snapshot = self.state.snapshot
        h.reply_json(HTTPStatus.OK, {"node": self.node, "time": time.time(),
                                     "pods": [p.as_json() for p in snapshot.pods]})


class Handler(BaseHTTPRequestHandler):
    server_version = f"podnetmon/{__version__}"
    api: Api  # set on the subclass made per server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        route = self.api.routes.get(path.rstrip("/") or "/")
        if route is None:
            self.reply_json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path[:200]}",
                                                   "endpoints": sorted(self.api.routes)})
            return
        route(self)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _not_allowed(self) -> None:
        self.reply_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} not allowed"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(self, status: HTTPStatus, doc: Any) -> None:
        self.reply(status, json.dumps(doc, indent=1).encode() + b"\n", "application/json")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # never a log line per request or scrape


class Server:
    """The listener in a thread of its own."""

    def __init__(self, host: str, port: int, api: Api) -> None:
        handler = type("BoundHandler", (Handler,), {"api": api})
        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.get("http").info("listening", address=self._httpd.server_address[0], port=self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
