"""Captures started by alerts: Alertmanager's webhook, one stored capture per firing alert.

An alert asks for a capture with a label or annotation `podnet_capture`
(a duration such as "30s") and may narrow it with `podnet_capture_filter`
(a pcap filter). It must name the pod with `namespace` and `pod` labels; a
pod that is not on this node is skipped, as every node gets the same
notification. Alertmanager repeats notifications while an alert fires: the
same alert (fingerprint, or its labels, and startsAt) starts one capture.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from monitor import log
from monitor.traces.capture import CaptureManager
from monitor.traces.pcapout import write_pcapng
from monitor.traces.session import CaptureError, TraceRequest, parse_duration
from monitor.traces.store import CaptureStore, StoredCapture

REMEMBER = 24 * 3600.0  # seconds a started alert's key is kept to refuse duplicates


def _text(mapping: Any, key: str) -> str:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, str) else ""


def alert_key(alert: Mapping[str, Any]) -> str:
    """What makes two notifications the same firing alert."""
    labels = alert.get("labels") if isinstance(alert.get("labels"), dict) else {}
    identity = _text(alert, "fingerprint") or json.dumps(labels, sort_keys=True)
    return hashlib.sha256(f"{identity}|{_text(alert, 'startsAt')}".encode()).hexdigest()


class AlertCaptures:
    """Turns webhook payloads into stored captures."""

    def __init__(self, captures: CaptureManager, store: CaptureStore, node: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._captures, self._store, self._node, self._clock = captures, store, node, clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._log = log.get("alerts")

    def handle(self, payload: Any) -> dict[str, list[dict[str, str]]]:
        """Start what the payload asks for; ValueError for a payload that is not one."""
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise ValueError("not an Alertmanager notification: no 'alerts' list")
        started: list[dict[str, str]] = []
        skipped: list[dict[str, str]] = []
        for alert in payload["alerts"]:
            if not isinstance(alert, dict):
                skipped.append({"alert": "", "why": "not an object"})
                continue
            name = _text(alert.get("labels"), "alertname")
            why = self._one(alert, started)
            if why:
                skipped.append({"alert": name, "why": why})
        return {"started": started, "skipped": skipped}

    def _one(self, alert: dict[str, Any], started: list[dict[str, str]]) -> str:
        labels, annotations = alert.get("labels"), alert.get("annotations")
        if _text(alert, "status") != "firing":
            return "not firing"
        spec = _text(labels, "podnet_capture") or _text(annotations, "podnet_capture")
        if not spec:
            return "no capture asked for (podnet_capture)"
        namespace, pod = _text(labels, "namespace"), _text(labels, "pod")
        if not namespace or not pod:
            return "no namespace and pod labels"
        try:
            duration = parse_duration(spec)
        except ValueError as exc:
            return str(exc)
        key = alert_key(alert)
        now = self._clock()
        with self._lock:
            self._seen = {k: t for k, t in self._seen.items() if now - t < REMEMBER}
            if key in self._seen:
                return "a capture for this alert was started already"
            filter_ = (_text(annotations, "podnet_capture_filter")
                       or _text(labels, "podnet_capture_filter"))
            try:
                session = self._captures.start(namespace, pod,
                                               TraceRequest(duration, filter=filter_))
            except CaptureError as exc:
                return "pod not on this node" if exc.status == 404 else exc.reason
            self._seen[key] = now
        name = _text(labels, "alertname")
        try:
            record, path = self._store.create(namespace, pod, f"alert {name}", filter_,
                                              session.request.duration)
        except OSError as exc:  # a full or read-only disk: stop the trace, let a retry try
            self._captures.finish(session, f"cannot store: {exc.strerror}")
            with self._lock:
                self._seen.pop(key, None)
            return f"cannot store the capture: {exc.strerror or exc}"
        threading.Thread(target=self._write, args=(session, record, path), daemon=True,
                         name=f"capture-{record.id}").start()
        started.append({"alert": name, "capture": record.id, "namespace": namespace, "pod": pod})
        self._log.info("capture started by alert", alert=name, capture=record.id,
                       namespace=namespace, pod=pod, duration=duration)
        return ""

    def _write(self, session: Any, record: StoredCapture, path: Any) -> None:
        try:
            with open(path, "wb") as out:
                write_pcapng(session, out, self._node, flush_each=False)
        except OSError as exc:
            session.end(f"write failed: {exc.strerror}")
        finally:
            self._captures.finish(session, "done")
            record.packets, record.ended = session.packets, session.ended
            try:
                record.bytes = path.stat().st_size
                self._store.save(record)
                self._store.enforce()
            except OSError as exc:
                self._log.error("capture record not saved", capture=record.id, error=str(exc))
