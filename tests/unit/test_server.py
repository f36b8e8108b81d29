"""The HTTP listener on 127.0.0.1, an ephemeral port, over a trivial registry."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

import pytest
import structlog
from prometheus_client.exposition import choose_encoder

from monitor import log as monitor_log
from monitor.exposition import Family, GaugeFamily, Registry
from monitor.identity import HostVeth, PodMeta, PodNetwork, identify
from monitor.server import Api, Server
from monitor.state import InterfaceStatus, MonitorState, PodStatus, Snapshot


class Trivial:
    def describe(self) -> Iterator[Family]:
        yield GaugeFamily("unit_test_up", "Always 1.")

    def collect(self) -> Iterator[Family]:
        up = GaugeFamily("unit_test_up", "Always 1.")
        up.add((), 1)
        yield up


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: Message | None = field(default=None, compare=False)

    def json(self) -> dict[str, object]:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc


@dataclass
class Live:
    """The running server and the knobs the tests turn."""

    state: MonitorState
    port: int
    alive: list[bool] = field(default_factory=lambda: [True])

    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> Reply:
        data = b"{}" if method in ("POST", "PUT") else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return Reply(resp.status, resp.headers["Content-Type"], resp.read(), resp.headers)
        except urllib.error.HTTPError as err:
            with err:
                return Reply(err.code, err.headers["Content-Type"], err.read(), err.headers)


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[Server, Api]]:
    """One server for the module: stopping one takes up to its 0.5 s poll interval."""
    registry = Registry()
    registry.register(Trivial())
    api = Api(registry, MonitorState(), "node-1", alive=lambda: True)
    server = Server("127.0.0.1", 0, api)
    server.start()
    try:
        yield server, api
    finally:
        server.stop()


@pytest.fixture
def live(running: tuple[Server, Api]) -> Live:
    """A fresh state and liveness flag for each test."""
    server, api = running
    live = Live(MonitorState(), server.port)
    api.state = live.state
    api.alive = lambda: live.alive[0]
    return live


def test_port_zero_picks_a_port(live: Live) -> None:
    assert live.port > 0


def test_metrics(live: Live) -> None:
    reply = live.request("/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain; version=0.0.4")
    assert b"# TYPE unit_test_up gauge\n" in reply.body
    assert b"\nunit_test_up 1.0\n" in reply.body


def test_metrics_openmetrics(live: Live) -> None:
    reply = live.request("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert reply.status == 200
    assert reply.content_type.startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")


# What Prometheus 2 and 3 send, and a few others: the content type is prometheus_client's
@pytest.mark.parametrize("accept", [
    "",
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/"
    "openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "text/plain;version=1.0.0;escaping=dots",
    "application/json",
])
def test_metrics_content_type_is_negotiated(live: Live, accept: str) -> None:
    reply = live.request("/metrics", headers={"Accept": accept} if accept else {})
    assert reply.status == 200
    assert reply.content_type == choose_encoder(accept)[1]


def test_metrics_head(live: Live) -> None:
    get, head = live.request("/metrics"), live.request("/metrics", method="HEAD")
    assert (head.status, head.content_type, head.body) == (200, get.content_type, b"")
    assert head.headers is not None and get.headers is not None
    assert head.headers["Content-Length"] == get.headers["Content-Length"]


def test_healthz(live: Live) -> None:
    assert live.request("/healthz") == Reply(200, "text/plain; charset=utf-8", b"ok\n")
    live.alive[0] = False
    assert live.request("/healthz") == Reply(503, "text/plain; charset=utf-8",
                                             b"reconciler not running\n")


def test_readyz(live: Live) -> None:
    assert live.request("/readyz").status == 503
    live.state.ready = True
    assert live.request("/readyz") == Reply(200, "text/plain; charset=utf-8", b"ready\n")
    live.alive[0] = False  # ready once, but the reconciler died since
    assert live.request("/readyz").status == 503


def test_pods(live: Live) -> None:
    web, unknown, db = (
        identify(PodNetwork(4026532001, "/proc/100/ns/net", pause_pid=100),
                 [HostVeth(7, "veth7"), HostVeth(9, "veth9")], PodMeta("shop", "web-1", "uid-web")),
        identify(PodNetwork(4026532002, "/run/netns/cni-b", pinned_path="/run/netns/cni-b"),
                 [HostVeth(8, "veth8")], None),
        identify(PodNetwork(4026532003, "/proc/300/ns/net", pause_pid=300), [],
                 PodMeta("shop", "db-0", "uid-db")))
    live.state.publish(Snapshot(pods=(
        PodStatus(web, (InterfaceStatus(web.interfaces[0], "tc", 1700000000.5, ""),
                        InterfaceStatus(web.interfaces[1], "", None, "attach by tc failed: boom"))),
        PodStatus(unknown, (InterfaceStatus(unknown.interfaces[0], "", None,
                                            "attach by tcx failed: busy"),)),
        PodStatus(db, ()),
    )))
    live.state.bypassed = {("shop", "db-0"): "redirect_peer", ("shop", "web-1"): ""}
    reply = live.request("/api/v1/pods")
    assert (reply.status, reply.content_type) == (200, "application/json")
    doc = reply.json()
    assert doc["node"] == "node-1"
    assert isinstance(doc["time"], float)
    assert doc["pods"] == [
        {"namespace": "shop", "pod": "web-1", "uid": "uid-web", "netns": 4026532001,
         "has_metadata": True, "pause_pid": 100, "pinned_netns": None, "interface": "veth7",
         "ifindex": 7, "attach_mode": "tc", "attached_since": 1700000000.5, "last_error": "",
         "interfaces": [
             {"name": "veth7", "ifindex": 7, "attach_mode": "tc", "attached_since": 1700000000.5,
              "last_error": ""},
             {"name": "veth9", "ifindex": 9, "attach_mode": "", "attached_since": None,
              "last_error": "attach by tc failed: boom"}], "bypassed": ""},
        {"namespace": "_unknown", "pod": "netns-4026532002", "uid": "", "netns": 4026532002,
         "has_metadata": False, "pause_pid": None, "pinned_netns": "/run/netns/cni-b",
         "interface": "veth8", "ifindex": 8, "attach_mode": "", "attached_since": None,
         "last_error": "attach by tcx failed: busy", "interfaces": [
             {"name": "veth8", "ifindex": 8, "attach_mode": "", "attached_since": None,
              "last_error": "attach by tcx failed: busy"}], "bypassed": ""},
        {"namespace": "shop", "pod": "db-0", "uid": "uid-db", "netns": 4026532003,
         "has_metadata": True, "pause_pid": 300, "pinned_netns": None, "interface": "",
         "ifindex": 0, "attach_mode": "", "attached_since": None, "last_error": "",
         "interfaces": [], "bypassed": "redirect_peer"},
    ]


def test_pods_empty(live: Live) -> None:
    assert live.request("/api/v1/pods").json()["pods"] == []


def test_unknown_path_404_json(live: Live) -> None:
    reply = live.request("/nope?x=1")
    assert (reply.status, reply.content_type) == (404, "application/json")
    assert reply.json() == {"error": "no such endpoint: /nope"}
    assert reply.headers is not None and reply.headers["Allow"] is None  # not a 405
    assert live.request("/").status == 404
    # a known route with more after it, or a method no route has, is still no endpoint
    assert live.request("/metrics/x").json() == {"error": "no such endpoint: /metrics/x"}
    assert live.request("/nope", method="DELETE").status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_405(live: Live, method: str) -> None:
    reply = live.request("/metrics", method=method)
    assert (reply.status, reply.content_type) == (405, "application/json")
    assert reply.json() == {"error": f"{method} not allowed here", "allowed": ["GET"]}
    assert reply.headers is not None and reply.headers["Allow"] == "GET"


def test_trailing_slash_and_query(live: Live) -> None:
    live.state.ready = True
    assert live.request("/readyz/").status == 200
    assert live.request("/metrics/?name[]=x").status == 200
    assert live.request("/api/v1/pods/").json()["node"] == "node-1"


def test_head(live: Live) -> None:
    reply = live.request("/healthz", method="HEAD")
    assert (reply.status, reply.body) == (200, b"")


def test_stop_closes_the_port() -> None:
    server = Server("127.0.0.1", 0, Api(Registry(), MonitorState(), "n", alive=lambda: True))
    server.start()
    port = server.port
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


class Failing:
    """An extension whose handlers fail as a kernel refusal or a bug would: a handler that
    raised anything but the request errors used to end the connection with no answer."""

    def register(self, api: Api) -> None:
        api.route("GET", r"/api/v1/fails", self.fails)
        api.route("GET", r"/api/v1/fails-late", self.fails_late)

    def fails(self, h: object, _params: object, _query: object) -> None:
        raise OSError(1, "Operation not permitted")

    def fails_late(self, h: object, _params: object, _query: object) -> None:
        h.start_stream("application/octet-stream")  # type: ignore[attr-defined]
        h.wfile.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(1, "Operation not permitted")


def test_a_failing_handler_is_answered_500_and_logged() -> None:
    saved, logs = structlog.get_config(), io.StringIO()
    monitor_log.configure("info", "json", stream=logs)
    api = Api(Registry(), MonitorState(), "node-1", alive=lambda: True, extensions=Failing())
    server = Server("127.0.0.1", 0, api)
    server.start()
    try:
        live = Live(MonitorState(), server.port)
        reply = live.request("/api/v1/fails")
        assert reply.status == 500
        assert "internal error" in str(reply.json()["error"])
        # once the status line is out, the stream just ends: nothing is written twice
        late = live.request("/api/v1/fails-late")
        assert (late.status, late.body) == (200, b"partial")
        assert live.request("/healthz").status == 200  # and the listener serves on
    finally:
        server.stop()
        structlog.configure(**saved)
    logged = logs.getvalue()
    assert logged.count("request failed") == 2 and "Operation not permitted" in logged
