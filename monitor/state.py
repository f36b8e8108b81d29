"""The daemon's own state, shared between the reconciler (writer) and HTTP (readers).

The reconciler publishes a whole new Snapshot after every pass; readers take
the current one without locks (one attribute read is atomic in CPython).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from monitor.identity import IdentityIndex


@dataclass(frozen=True)
class InterfaceStatus:
    name: str
    ifindex: int
    attach_mode: str  # "tc", "tcx", or "" when not attached
    attached_since: float | None
    last_error: str


@dataclass(frozen=True)
class PodStatus:
    namespace: str
    pod: str
    uid: str
    netns: int
    has_metadata: bool
    pause_pid: int | None
    pinned_netns: str | None
    interfaces: tuple[InterfaceStatus, ...]

    def as_json(self) -> dict[str, object]:
        first = self.interfaces[0] if self.interfaces else None
        return {
            "namespace": self.namespace, "pod": self.pod, "uid": self.uid,
            "netns": self.netns, "has_metadata": self.has_metadata,
            "pause_pid": self.pause_pid, "pinned_netns": self.pinned_netns,
            # the primary interface's fields at top level, for tables and jq one-liners
            "interface": first.name if first else "",
            "ifindex": first.ifindex if first else 0,
            "attach_mode": first.attach_mode if first else "",
            "attached_since": first.attached_since if first else None,
            "last_error": first.last_error if first else "",
            "interfaces": [vars(i) for i in self.interfaces],
        }


@dataclass(frozen=True)
class Snapshot:
    index: IdentityIndex = field(default_factory=IdentityIndex)
    pods: tuple[PodStatus, ...] = ()


class MonitorState:
    """Counters and flags about the monitor itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot = Snapshot()
        self.ready = False
        self.attach_errors = 0
        self.reconciles = 0
        self.reconcile_seconds = 0.0
        self.last_reconcile_error = ""
        self.series_dropped = 0
        self.netlink_overflows = 0  # link event socket overflows (ENOBUFS), each a rescan
        # adopted, fresh, reset or unpinned: see podnet_monitor_maps
        self.maps_state = "unpinned"
        self._lost: dict[str, int] = {}
        self._reattaches: dict[str, int] = {}  # by reason: see Reconciler.verify
        self.bypassed: dict[tuple[str, str], str] = {}  # pod -> why (monitor/bypass.py)

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def count_attach_error(self) -> None:
        with self._lock:
            self.attach_errors += 1

    def count_lost(self, source: str, count: int) -> None:
        with self._lock:
            self._lost[source] = self._lost.get(source, 0) + count

    def lost_events(self) -> dict[str, int]:
        with self._lock:
            return dict(self._lost)

    def count_reattach(self, reason: str) -> None:
        with self._lock:
            self._reattaches[reason] = self._reattaches.get(reason, 0) + 1

    def reattaches(self) -> dict[str, int]:
        with self._lock:
            return dict(self._reattaches)

    def count_series_dropped(self) -> None:
        with self._lock:
            self.series_dropped += 1

    def count_reconcile(self, seconds: float) -> None:
        with self._lock:
            self.reconciles += 1
            self.reconcile_seconds += seconds

    def attached_pods(self) -> int:
        return sum(1 for p in self.snapshot.pods if any(i.attach_mode for i in p.interfaces))

