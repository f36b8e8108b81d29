"""Stored captures: pcapng files started by alerts, with retention, readable by root only.

Each capture is <id>.pcapng beside <id>.json (who, when, why, how big). Ids
are generated here and checked against ID_RE on every lookup, so no request
can name a path. Retention keeps at most `max_files` captures and
`max_bytes` in all, deleting the oldest first; a full disk ends the capture
being written (its file is kept, truncated, and says so in its metadata).
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from monitor import log

ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")


@dataclass
class StoredCapture:
    id: str
    namespace: str
    pod: str
    started: float
    reason: str  # what asked for it: "alert AlertName (fingerprint)"
    filter: str = ""
    duration: float = 0.0
    bytes: int = 0
    packets: int = 0
    ended: str = ""


class CaptureStore:
    """A directory of captures; creates it 0700 and its files 0600."""

    def __init__(self, directory: str, *, max_files: int, max_bytes: int) -> None:
        self.dir = Path(directory)
        self._max_files, self._max_bytes = max_files, max_bytes
        self._lock = threading.Lock()
        self._log = log.get("store").bind(dir=directory)

    def _ready(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def create(self, namespace: str, pod: str, reason: str, filter_: str,
               duration: float) -> tuple[StoredCapture, Path]:
        """A new capture's record and the path to write its pcapng to (already 0600)."""
        self._ready()
        now = time.time()
        cid = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:8]
        record = StoredCapture(cid, namespace, pod, now, reason, filter_, duration)
        path = self.dir / f"{cid}.pcapng"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self.save(record)
        return record, path

    def save(self, record: StoredCapture) -> None:
        """Write a record: a new file replacing the old one, so that a reader never sees
        half of it; on a full disk, over the old one in place (its block is freed by the
        truncation and reused), so that a capture that filled the disk still says so."""
        text = json.dumps(asdict(record))
        final = self.dir / f"{record.id}.json"
        tmp = self.dir / f".{record.id}.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno != errno.ENOSPC or not final.exists():
                raise
            with open(final, "w", encoding="utf-8") as f:  # truncates first: the block is ours
                f.write(text)

    def captures(self) -> list[StoredCapture]:
        out = []
        for meta in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                record = StoredCapture(**json.loads(meta.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a half-written or foreign file: not ours to show
            if not (isinstance(record.id, str) and ID_RE.fullmatch(record.id)
                    and meta.name == f"{record.id}.json"):
                continue  # an id that is ours names a file here, nothing else
            if not isinstance(record.started, (int, float)) or isinstance(record.started, bool):
                continue  # a record we did not write: sorting on it would fail
            out.append(record)
        return sorted(out, key=lambda c: c.started)

    def path(self, capture_id: str) -> Path | None:
        """The file of a capture, or None; ids that are not ours name nothing."""
        if not ID_RE.fullmatch(capture_id):
            return None
        path = self.dir / f"{capture_id}.pcapng"
        return path if path.is_file() else None

    def enforce(self) -> list[str]:
        """Delete the oldest captures until within the limits; returns the ids deleted."""
        with self._lock:
            captures = self.captures()
            sizes = {c.id: self._size(c.id) for c in captures}
            total = sum(sizes.values())
            deleted = []
            while captures and (len(captures) > self._max_files or total > self._max_bytes):
                oldest = captures.pop(0)
                total -= sizes[oldest.id]
                for suffix in (".pcapng", ".json"):
                    (self.dir / f"{oldest.id}{suffix}").unlink(missing_ok=True)
                deleted.append(oldest.id)
            if deleted:
                self._log.info("captures deleted by retention", ids=deleted)
            return deleted

    def _size(self, capture_id: str) -> int:
        try:
            return (self.dir / f"{capture_id}.pcapng").stat().st_size
        except OSError:
            return 0
