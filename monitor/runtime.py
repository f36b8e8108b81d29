"""Pod UIDs from container runtimes' OCI bundles, for pods with no pause process.

CRI-O without an infra container (and any runtime where the sandbox runs no
process) leaves only a pinned netns file, whose name is a random UUID. The
runtime's OCI bundles tie it to the pod: each container's config.json names
the netns it joins (linux.namespaces, type network, path) and carries the pod
UID in an annotation:

    containerd   <state>/k8s.io/<id>/config.json        io.kubernetes.cri.sandbox-uid
    CRI-O        <storage>/overlay-containers/<id>/userdata/config.json
                                                        io.kubernetes.pod.uid

Files are parsed once and remembered by (path, mtime, size): a node with
hundreds of containers costs a directory listing per pass, not a JSON parse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from monitor import log

UID_ANNOTATIONS = ("io.kubernetes.pod.uid", "io.kubernetes.cri.sandbox-uid")
_BUNDLE_FILES = ("config.json", os.path.join("userdata", "config.json"))


def bundle_netns_uid(doc: object) -> tuple[str, str] | None:
    """(netns path, pod UID) from an OCI runtime config, or None."""
    if not isinstance(doc, dict):
        return None
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict):
        return None
    uid = next((annotations[k] for k in UID_ANNOTATIONS
                if isinstance(annotations.get(k), str) and annotations[k]), None)
    namespaces = (doc.get("linux") or {}).get("namespaces") if isinstance(doc.get("linux"), dict) else None
    if uid is None or not isinstance(namespaces, list):
        return None
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network" and isinstance(ns.get("path"), str):
            return ns["path"], uid
    return None


class RuntimeIndex:
    """netns path (links resolved) -> pod UID, from the bundles under some directories."""

    def __init__(self, dirs: Iterable[str]) -> None:
        self._dirs = list(dirs)
        self._parsed: dict[str, tuple[tuple[int, int], tuple[str, str] | None]] = {}
        self._log = log.get("runtime")

    def _bundles(self) -> Iterator[str]:
        for d in self._dirs:
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            for entry in entries:
                for name in _BUNDLE_FILES:
                    path = os.path.join(d, entry, name)
                    if os.path.isfile(path):
                        yield path
                        break

    def uids(self) -> dict[str, str]:
        found: dict[str, str] = {}
        seen = set()
        for path in self._bundles():
            seen.add(path)
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._parsed.get(path)
            if cached is None or cached[0] != stamp:
                cached = (stamp, self._read(path))
                self._parsed[path] = cached
            if cached[1] is not None:
                netns, uid = cached[1]
                found[os.path.realpath(netns)] = uid
        for gone in set(self._parsed) - seen:
            del self._parsed[gone]
        return found

    def _read(self, path: str) -> tuple[str, str] | None:
        try:
            with open(path, encoding="utf-8") as f:
                return bundle_netns_uid(json.load(f))
        except (OSError, ValueError) as exc:
            self._log.debug("bundle unreadable", path=path, error=str(exc))
            return None

    def uid_of(self, netns_path: str) -> str | None:
        return self.uids().get(os.path.realpath(netns_path))
