"""monitor.traces.alertcaptures: Alertmanager notifications in, one stored capture per firing alert out.

The capture manager is a fake that records what it is asked and hands back real
Sessions (already ended, with packets queued), so the stored file is what
write_pcapng makes of them; the store is a real one in a temporary directory.
"""

from __future__ import annotations

import errno
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from monitor.identity import HostVeth, PodMeta, PodNetwork, identify
from monitor.traces.alertcaptures import REMEMBER, AlertCaptures, alert_key
from monitor.traces.cli import BlockCounter
from monitor.traces.session import CaptureError, Limits, Session, TraceRequest
from monitor.traces.store import ID_RE, CaptureStore

NODE = "node-1"
WEB = identify(PodNetwork(4026532001, "/proc/1/ns/net"), [HostVeth(7, "veth7")], PodMeta("shop", "web"))
FRAME = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=53)) + b"q" * 58  # 100


@dataclass
class FakeCaptures:
    """What AlertCaptures uses of a CaptureManager: start() and finish()."""

    limits: Limits = field(default_factory=Limits)
    packets: int = 3  # queued in each session handed out
    ended: str = "duration reached"  # how they have ended already ("": still running)
    error: CaptureError | None = None
    started: list[tuple[str, str, TraceRequest, str]] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    finished: list[tuple[int, str]] = field(default_factory=list)

    def start(self, namespace: str, name: str, request: TraceRequest, kind: str = "packets") -> Session:
        self.started.append((namespace, name, request, kind))
        if self.error is not None:
            raise self.error
        req = TraceRequest(request.duration or 10.0, request.packets or 100, request.bytes or 10**6,
                           request.snaplen or 1500, request.filter)
        session = Session(id=len(self.started), kind=kind, pod=WEB, slots=frozenset({3}),
                          interfaces=((7, "veth7", 3),), request=req, started=0.0,
                          deadline=req.duration)
        for i in range(self.packets):
            session.queue.put((1_700_000_000_000_000_000 + i, 3, "outbound", FRAME, len(FRAME)))
        if self.ended:
            session.end(self.ended)
        self.sessions.append(session)
        return session

    def finish(self, session: Session, why: str) -> None:
        session.end(why)
        self.finished.append((session.id, session.ended))


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    captures: FakeCaptures
    store: CaptureStore
    alerts: AlertCaptures
    clock: Clock

    def handle(self, *alerts: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        result = self.alerts.handle(notification(*alerts))
        for started in result["started"]:  # wait for the writers
            for t in threading.enumerate():
                if t.name == f"capture-{started['capture']}":
                    t.join(timeout=10)
        return result


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    captures, clock = FakeCaptures(), Clock()
    store = CaptureStore(str(tmp_path / "captures"), max_files=10, max_bytes=1 << 20)
    yield Rig(captures, store, AlertCaptures(captures, store, NODE, clock=clock), clock)  # type: ignore[arg-type]


def alert(*, status: str = "firing", labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None, fingerprint: str = "8c5a3b1f2e9d7c40",
          starts_at: str = "2024-05-01T10:00:00.000Z", **extra: Any) -> dict[str, Any]:
    base = {"alertname": "PodDropsHigh", "namespace": "shop", "pod": "web", "podnet_capture": "30s"}
    return {"status": status, "labels": {**base, **(labels or {})}, "annotations": annotations or {},
            "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph", "fingerprint": fingerprint, **extra}


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4)."""
    return {"version": "4", "groupKey": "{}:{alertname=\"PodDropsHigh\"}", "truncatedAlerts": 0,
            "status": "firing", "receiver": "podnetmon", "groupLabels": {"alertname": "PodDropsHigh"},
            "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager:9093",
            "alerts": list(alerts)}


def without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


# -- what starts a capture ----------------------------------------------------------------------

def test_a_firing_alert_starts_one_stored_capture(rig: Rig) -> None:
    result = rig.handle(alert())
    (started,) = result["started"]
    assert result["skipped"] == []
    assert ID_RE.fullmatch(started["capture"])
    assert started == {"alert": "PodDropsHigh", "capture": started["capture"], "namespace": "shop",
                       "pod": "web"}
    assert rig.captures.started == [("shop", "web", TraceRequest(30.0, filter=""), "packets")]
    # written, finished, and its record brought up to date
    assert rig.captures.finished == [(1, "duration reached")]
    path = rig.store.path(started["capture"])
    assert path is not None
    counter = BlockCounter()
    counter.feed(path.read_bytes())
    assert counter.packets == 3
    (record,) = rig.store.captures()
    assert (record.id, record.namespace, record.pod, record.reason) == (
        started["capture"], "shop", "web", "alert PodDropsHigh")
    assert (record.duration, record.filter) == (30.0, "")
    assert (record.packets, record.bytes, record.ended) == (3, path.stat().st_size, "duration reached")
    assert record.bytes > 3 * len(FRAME)


def test_podnet_capture_in_the_annotations(rig: Rig) -> None:
    a = alert(annotations={"podnet_capture": "2m"})
    a["labels"] = without(a["labels"], "podnet_capture")
    (started,) = rig.handle(a)["started"]
    assert rig.captures.started[0][2] == TraceRequest(120.0, filter="")
    assert rig.store.captures()[0].duration == 120.0
    assert started["capture"]


def test_the_label_wins_over_the_annotation(rig: Rig) -> None:
    rig.handle(alert(labels={"podnet_capture": "10s"}, annotations={"podnet_capture": "1h"}))
    assert rig.captures.started[0][2].duration == 10.0


@pytest.mark.parametrize(("labels", "annotations", "expected"), [
    ({}, {"podnet_capture_filter": "udp port 53"}, "udp port 53"),
    ({"podnet_capture_filter": "tcp"}, {}, "tcp"),
    ({"podnet_capture_filter": "tcp"}, {"podnet_capture_filter": "icmp"}, "icmp"),  # annotation first
])
def test_the_filter_is_passed_on(rig: Rig, labels: dict[str, str], annotations: dict[str, str],
                                 expected: str) -> None:
    rig.handle(alert(labels=labels, annotations=annotations))
    assert rig.captures.started[0][2] == TraceRequest(30.0, filter=expected)
    assert rig.store.captures()[0].filter == expected


def test_one_capture_per_alert_of_a_group(rig: Rig) -> None:
    result = rig.handle(alert(fingerprint="a1"), alert(fingerprint="b2", labels={"pod": "db"}),
                        alert(status="resolved", fingerprint="c3"))
    assert [(s["pod"], s["alert"]) for s in result["started"]] == [("web", "PodDropsHigh"),
                                                                  ("db", "PodDropsHigh")]
    assert result["skipped"] == [{"alert": "PodDropsHigh", "why": "not firing"}]
    assert len({s["capture"] for s in result["started"]}) == 2
    assert len(rig.store.captures()) == 2


# -- what is skipped, and why -------------------------------------------------------------------

@pytest.mark.parametrize(("a", "why"), [
    (alert(status="resolved"), "not firing"),
    (without(alert(), "status"), "not firing"),
    (alert(labels={"podnet_capture": ""}), "no capture asked for (podnet_capture)"),
    ({**alert(), "labels": without(alert()["labels"], "podnet_capture")},
     "no capture asked for (podnet_capture)"),
    ({**alert(), "labels": without(alert()["labels"], "pod")}, "no namespace and pod labels"),
    ({**alert(), "labels": without(alert()["labels"], "namespace")}, "no namespace and pod labels"),
    (alert(labels={"pod": ""}), "no namespace and pod labels"),
    (alert(labels={"podnet_capture": "soon"}), "not a duration: 'soon' (e.g. 10s, 2m, 500ms)"),
    (alert(labels={"podnet_capture": "-5s"}), "not a duration: '-5s' (e.g. 10s, 2m, 500ms)"),
    ({**alert(), "labels": "podnet_capture=30s"}, "no capture asked for (podnet_capture)"),
])
def test_skipped_with_the_reason(rig: Rig, a: dict[str, Any], why: str) -> None:
    result = rig.handle(a)
    name = a["labels"].get("alertname", "") if isinstance(a["labels"], dict) else ""
    assert result == {"started": [], "skipped": [{"alert": name, "why": why}]}
    assert rig.captures.started == []
    assert rig.store.captures() == []


def test_a_pod_not_on_this_node_is_skipped(rig: Rig) -> None:
    rig.captures.error = CaptureError(404, "no pod shop/web on node node-1")
    result = rig.handle(alert())
    assert result == {"started": [], "skipped": [{"alert": "PodDropsHigh", "why": "pod not on this node"}]}
    assert len(rig.captures.started) == 1  # asked, and refused
    assert rig.store.captures() == []
    assert not rig.store.dir.exists()  # nothing made for it


@pytest.mark.parametrize(("status", "reason"), [
    (429, "4 traces run on this node already (at most 4)"),
    (409, "pod shop/web is not attached (yet): nothing to trace"),
    (400, "bad filter: can't parse filter expression: syntax error"),
    (400, "duration 3600 s is outside (0, 300] s"),
])
def test_other_refusals_are_skipped_with_the_managers_reason(rig: Rig, status: int, reason: str) -> None:
    rig.captures.error = CaptureError(status, reason)
    assert rig.handle(alert())["skipped"] == [{"alert": "PodDropsHigh", "why": reason}]


def test_an_alert_that_is_not_an_object_is_skipped(rig: Rig) -> None:
    result = rig.alerts.handle(notification("PodDropsHigh", alert()))  # type: ignore[arg-type]
    assert result["skipped"] == [{"alert": "", "why": "not an object"}]
    assert len(result["started"]) == 1


@pytest.mark.parametrize("payload", [
    None, [], "alerts", 4, {}, {"alerts": None}, {"alerts": {"status": "firing"}}, {"Alerts": []},
])
def test_a_payload_that_is_not_a_notification_raises(rig: Rig, payload: Any) -> None:
    with pytest.raises(ValueError, match=r"^not an Alertmanager notification: no 'alerts' list$"):
        rig.alerts.handle(payload)
    assert rig.captures.started == []


def test_an_empty_notification_starts_nothing(rig: Rig) -> None:
    assert rig.alerts.handle(notification()) == {"started": [], "skipped": []}


# -- duplicates ---------------------------------------------------------------------------------

def test_the_same_alert_again_is_a_duplicate(rig: Rig) -> None:
    assert len(rig.handle(alert())["started"]) == 1
    rig.clock.now += 300  # Alertmanager's repeat_interval: the same alert, notified again
    assert rig.handle(alert()) == {"started": [], "skipped": [
        {"alert": "PodDropsHigh", "why": "a capture for this alert was started already"}]}
    assert len(rig.captures.started) == 1  # not even asked


def test_a_new_starts_at_is_a_new_alert(rig: Rig) -> None:
    rig.handle(alert())
    assert len(rig.handle(alert(starts_at="2024-05-01T11:30:00.000Z"))["started"]) == 1
    assert len(rig.handle(alert(fingerprint="other"))["started"]) == 1
    assert len(rig.captures.started) == 3


def test_a_refused_alert_is_not_remembered(rig: Rig) -> None:
    rig.captures.error = CaptureError(404, "no pod")
    rig.handle(alert())
    rig.captures.error = None  # the pod arrived on this node since
    assert len(rig.handle(alert())["started"]) == 1


def test_duplicates_are_remembered_for_a_day(rig: Rig) -> None:
    rig.handle(alert())
    rig.clock.now += REMEMBER - 1
    assert rig.handle(alert())["started"] == []
    rig.clock.now += 2
    assert len(rig.handle(alert())["started"]) == 1


def test_alert_key() -> None:
    a = alert()
    assert alert_key(a) == alert_key(alert(annotations={"summary": "changed"}))
    assert alert_key(a) != alert_key(alert(starts_at="2024-05-01T10:00:01.000Z"))
    assert alert_key(a) != alert_key(alert(fingerprint="other"))
    # without a fingerprint, the labels (in any order) say which alert it is
    bare = without(a, "fingerprint")
    reordered = {**bare, "labels": dict(reversed(list(bare["labels"].items())))}
    assert alert_key(bare) == alert_key(reordered)
    assert alert_key(bare) != alert_key({**bare, "labels": {**bare["labels"], "pod": "db"}})
    assert len(alert_key(a)) == 64  # a SHA-256, not the alert's own text


# -- the record and retention -------------------------------------------------------------------

def test_retention_runs_after_each_capture(tmp_path: Path) -> None:
    captures, clock = FakeCaptures(), Clock()
    store = CaptureStore(str(tmp_path / "captures"), max_files=1, max_bytes=1 << 20)
    old, old_path = store.create("shop", "db", "alert Older", "", 10.0)
    old.started -= 60
    store.save(old)
    rig = Rig(captures, store, AlertCaptures(captures, store, NODE, clock=clock), clock)  # type: ignore[arg-type]
    (started,) = rig.handle(alert())["started"]
    assert [c.id for c in store.captures()] == [started["capture"]]
    assert not old_path.exists()


def test_a_capture_file_that_cannot_be_opened_is_recorded(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import monitor.traces.alertcaptures

    def no_files_left(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(monitor.traces.alertcaptures, "open", no_files_left, raising=False)
    rig.captures.ended = ""  # running: the writer is what ends it
    (started,) = rig.handle(alert())["started"]
    (record,) = rig.store.captures()
    assert (record.ended, record.packets, record.bytes) == ("write failed: Too many open files", 0, 0)
    assert rig.captures.finished == [(1, "write failed: Too many open files")]
    assert json.loads((rig.store.dir / f"{started['capture']}.json").read_text())["ended"] == record.ended


def test_a_store_that_cannot_create_finishes_the_session(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*_args: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(rig.store, "create", read_only)
    rig.captures.ended = ""  # running, as the manager hands it out
    assert rig.alerts.handle(notification(alert())) == {"started": [], "skipped": [
        {"alert": "PodDropsHigh", "why": "cannot store the capture: Read-only file system"}]}
    # the trace is stopped (its kernel switch goes off), not left running for nobody
    assert rig.captures.finished == [(1, "cannot store: Read-only file system")]
    monkeypatch.undo()
    rig.captures.ended = "duration reached"
    assert len(rig.handle(alert())["started"]) == 1  # not a duplicate of one never stored
