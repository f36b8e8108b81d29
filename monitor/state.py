"""The daemon's own state, shared between the reconciler (writer) and HTTP (readers).

The reconciler publishes a whole new Snapshot after every pass; readers take
the current one without locks (one attribute read is atomic in CPython).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.identity import HostVeth, IdentityIndex, Pod


@dataclass(frozen=True)
class InterfaceStatus:
    """Where one of a pod's host veths stands: attached (how, since when) or not (why)."""

    veth: HostVeth
    attach_mode: str  # "tc", "tcx", or "" when not attached
    attached_since: float | None
    last_error: str

    @property
    def name(self) -> str:
        return self.veth.name

    @property
    def ifindex(self) -> int:
        return self.veth.ifindex

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "ifindex": self.ifindex, "attach_mode": self.attach_mode,
                "attached_since": self.attached_since, "last_error": self.last_error}


@dataclass(frozen=True)
class PodStatus:
    """A pod as the last pass published it, with each interface's attach status."""

    pod: Pod
    interfaces: tuple[InterfaceStatus, ...]

    def as_json(self) -> dict[str, object]:
        """/api/v1/pods' record of the pod (its field names are the API's)."""
        pod, first = self.pod, self.interfaces[0] if self.interfaces else None
        return {
            "namespace": pod.namespace, "pod": pod.name, "uid": pod.uid,
            "netns": pod.netns_inode, "has_metadata": pod.has_metadata,
            "pause_pid": pod.network.pause_pid, "pinned_netns": pod.network.pinned_path,
            # the primary interface's fields at top level, for tables and jq one-liners
            "interface": first.name if first else "",
            "ifindex": first.ifindex if first else 0,
            "attach_mode": first.attach_mode if first else "",
            "attached_since": first.attached_since if first else None,
            "last_error": first.last_error if first else "",
            "interfaces": [i.as_json() for i in self.interfaces],
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
        # by owner of maps ("core", each probe): adopted, fresh, reset or unpinned (see
        # podnet_monitor_maps); none before the programs are loaded
        self.maps_states: dict[str, str] = {}
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


def check_report(pods: Sequence[PodStatus], attach_errors: int, handle: int) -> str:
    """What `run --check` found, for a person: one line per pod interface, attached (and
    how) or not (and why), then the verdict, which is the exit status's. The daemon's log
    says the same as JSON events, and that is all a reader gets when stderr is not a
    terminal (a CI job, a pipe) unless this is printed too."""
    rows = []
    for status in pods:
        name = f"{status.pod.namespace}/{status.pod.name}"
        for i in status.interfaces:
            state = f"attached ({i.attach_mode})" if i.attach_mode else "NOT ATTACHED"
            rows.append((state, name, i.name, i.last_error))
        if not status.interfaces:
            rows.append(("NOT ATTACHED", name, "-", "no host veth"))
    attached = sum(1 for p in pods if any(i.attach_mode for i in p.interfaces))
    # the daemon's verdict (_check_once): any interface with an error, any failed attempt
    ok = not any(i.last_error for p in pods for i in p.interfaces) and not attach_errors
    lines = [f"podnetmon run --check: {len(pods)} pod{'' if len(pods) == 1 else 's'} found, "
             f"{attached} attached (this check's own programs, tc handle {handle:#x}, "
             "detached again)"]
    widths = [max((len(r[c]) for r in rows), default=0) for c in range(3)]
    for row in rows:
        cells = "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
        lines.append(f"  {cells}  {row[3]}".rstrip())
    if attach_errors:
        lines.append(f"  {attach_errors} attach attempt{'' if attach_errors == 1 else 's'} "
                     "failed: the log on stderr says why")
    lines.append("result: ok" if ok else "result: FAILED (exit 1)")
    return "\n".join(lines)
