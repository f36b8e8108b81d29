"""Pod UIDs from container runtimes' OCI bundles, for pods with no pause process.

CRI-O without an infra container (and any runtime where the sandbox runs no
process) leaves only a pinned netns file, whose name is a random UUID. The
runtime's OCI bundles tie it to the pod: each container's config.json names
the netns it joins (linux.namespaces, type network, path) and carries the pod
UID in an annotation:

    containerd   <state>/k8s.io/<id>/config.json        io.kubernetes.cri.sandbox-uid
    CRI-O        <storage>/overlay-containers/<id>/userdata/config.json
                                                        io.kubernetes.pod.uid

Containers no orchestrator runs (podman's, on a host without Kubernetes) have no
pod UID: their bundle says `io.container.manager: libpod`, and the container's name
is in containers/storage's `containers.json` beside the bundles. Such a container's
netns is named after it: namespace `_podman` (a name Kubernetes cannot give), pod and
workload the container's name, workload kind `Container`, uid the container's ID.

Files are parsed once and remembered by (path, mtime, size): a node with
hundreds of containers costs a directory listing per pass, not a JSON parse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from monitor import log
from monitor.identity import PodMeta

UID_ANNOTATIONS = ("io.kubernetes.pod.uid", "io.kubernetes.cri.sandbox-uid")
MANAGER_ANNOTATION = "io.container.manager"
LIBPOD = "libpod"  # podman's containers
PODMAN_NAMESPACE = "_podman"
_BUNDLE_FILES = ("config.json", os.path.join("userdata", "config.json"))
_STORAGE_INDEX = "containers.json"  # containers/storage's list of containers, with names


def _netns_path(doc: dict[str, object]) -> str | None:
    linux = doc.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    if not isinstance(namespaces, list):
        return None
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network" and isinstance(ns.get("path"), str):
            return str(ns["path"])
    return None


def bundle_netns_uid(doc: object) -> tuple[str, str] | None:
    """(netns path, pod UID) from an OCI runtime config, or None."""
    if not isinstance(doc, dict):
        return None
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict):
        return None
    uid = next((annotations[k] for k in UID_ANNOTATIONS
                if isinstance(annotations.get(k), str) and annotations[k]), None)
    netns = _netns_path(doc)
    if uid is None or netns is None:
        return None
    return netns, uid


def bundle_podman_netns(doc: object) -> str | None:
    """The netns path of a podman container no pod owns, from its OCI runtime config."""
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), dict):
        return None
    annotations = doc["annotations"]
    if annotations.get(MANAGER_ANNOTATION) != LIBPOD or bundle_netns_uid(doc) is not None:
        return None
    netns = _netns_path(doc)
    # a container joining another's netns names it by /proc/<pid>/ns/net: the owner is
    # the one whose bundle names the pinned file
    return netns if netns and not netns.startswith("/proc/") else None


def storage_names(doc: object) -> dict[str, str]:
    """container ID -> its first name, from containers/storage's containers.json."""
    out = {}
    for entry in doc if isinstance(doc, list) else []:
        names = entry.get("names") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(names, list) \
                and names and isinstance(names[0], str) and names[0]:
            out[entry["id"]] = names[0]
    return out


@dataclass(frozen=True)
class _Bundle:
    """What one container's OCI bundle tells: a pod's UID, or a podman container's netns."""

    uid: tuple[str, str] | None  # (netns path, pod UID)
    podman_netns: str | None


class RuntimeIndex:
    """netns path (links resolved) -> pod UID, from the bundles under some directories;
    and netns path -> the metadata of a podman container no pod owns."""

    def __init__(self, dirs: Iterable[str]) -> None:
        self._dirs = list(dirs)
        self._parsed: dict[str, tuple[tuple[int, int], object]] = {}
        self._log = log.get("runtime")

    def _bundles(self) -> Iterator[tuple[str, str, str]]:
        """(runtime dir, container ID, path of its config.json)."""
        for d in self._dirs:
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            for entry in entries:
                for name in _BUNDLE_FILES:
                    path = os.path.join(d, entry, name)
                    if os.path.isfile(path):
                        yield d, entry, path
                        break

    def _scan(self) -> list[tuple[str, str, _Bundle]]:
        found, seen = [], set()
        for d, container, path in self._bundles():
            seen.add(path)
            bundle = self._cached(path, _read_bundle)
            if isinstance(bundle, _Bundle):
                found.append((d, container, bundle))
        for gone in set(self._parsed) - seen - {os.path.join(d, _STORAGE_INDEX) for d in self._dirs}:
            del self._parsed[gone]
        return found

    def uids(self) -> dict[str, str]:
        return {os.path.realpath(b.uid[0]): b.uid[1]
                for _d, _c, b in self._scan() if b.uid is not None}

    def podman_containers(self) -> dict[str, PodMeta]:
        """netns path (links resolved) -> metadata, for podman's containers."""
        out = {}
        for d, container, bundle in self._scan():
            if bundle.podman_netns is None:
                continue
            names = self._cached(os.path.join(d, _STORAGE_INDEX), storage_names)
            name = names.get(container) if isinstance(names, dict) else None
            name = name or container[:12]  # as `podman ps` shows a nameless one
            out[os.path.realpath(bundle.podman_netns)] = PodMeta(
                namespace=PODMAN_NAMESPACE, name=name, uid=container, workload=name,
                workload_kind="Container")
        return out

    def _cached(self, path: str, parse: Callable[[object], object]) -> object:
        """parse(the JSON at path), read again only when its mtime or size changed."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._parsed.get(path)
        if cached is None or cached[0] != stamp:
            try:
                cached = (stamp, parse(self._load(path)))
            except (OSError, ValueError) as exc:
                self._log.debug("runtime file unreadable", path=path, error=str(exc))
                cached = (stamp, None)
            self._parsed[path] = cached
        return cached[1]

    @staticmethod
    def _load(path: str) -> object:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def uid_of(self, netns_path: str) -> str | None:
        return self.uids().get(os.path.realpath(netns_path))


def _read_bundle(doc: object) -> _Bundle:
    return _Bundle(bundle_netns_uid(doc), bundle_podman_netns(doc))
