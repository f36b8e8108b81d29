"""A static inventory file: pod UID (or pinned netns path) to namespace, name, labels, owner.

For hosts without a Kubernetes API, and for the lab. The file is YAML:

    pods:
      - uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427
        namespace: shop
        name: web-7c9f-abcde
        labels: {app: web}
        owner: {kind: Deployment, name: web}
      - netns: /run/netns/cni-7f3c...   # a pod with no pause process (CRI-O style)
        namespace: shop
        name: db-0

A file with any bad entry is refused as a whole, with every problem listed:
at start-up that stops the daemon (exit 2); a bad edit while running keeps the
last good inventory, so nothing already labelled is lost.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from monitor import log
from monitor.identity import NAMESPACE_RE, POD_NAME_RE, POD_UID_RE, PodMeta

_KNOWN_KEYS = {"uid", "netns", "namespace", "name", "labels", "owner"}


class InventoryError(ValueError):
    """The inventory file cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class Inventory:
    by_uid: dict[str, PodMeta]
    by_netns: dict[str, PodMeta]


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _label_value(value: object) -> str:
    """YAML reads `true` as a bool; Kubernetes label values are strings ("true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def netns_key(path: str) -> str:
    """One spelling per pinned netns: /var/run is usually a link to /run, and runtimes
    and discovery may each use either."""
    return os.path.realpath(path)


def _entry(index: int, raw: Any, problems: list[str]) -> tuple[PodMeta, str] | None:
    where = f"pods[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: is a {type(raw).__name__}, expected a mapping")
        return None
    before = len(problems)
    unknown = sorted(set(map(str, raw)) - _KNOWN_KEYS)
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (known: {sorted(_KNOWN_KEYS)})")
    for key in ("namespace", "name"):
        if not _text(raw.get(key)):
            problems.append(f"{where}: '{key}' must be a non-empty string")
    # Names Kubernetes could not give would make series no real pod can have (and a
    # namespace such as _unknown would pass for the fallback identity's).
    if _text(raw.get("namespace")) and not NAMESPACE_RE.fullmatch(raw["namespace"]):
        problems.append(f"{where}: namespace {raw['namespace'][:70]!r} is not a Kubernetes "
                        "namespace name (a DNS-1123 label: a-z, 0-9 and '-', at most 63)")
    if _text(raw.get("name")) and not POD_NAME_RE.fullmatch(raw["name"]):
        problems.append(f"{where}: name {raw['name'][:70]!r} is not a Kubernetes pod name "
                        "(a DNS-1123 subdomain: a-z, 0-9, '-' and '.', at most 253)")
    uid, netns = raw.get("uid"), raw.get("netns")
    if uid is None and netns is None:
        problems.append(f"{where}: needs 'uid' or 'netns' to be matched to a pod network")
    for key, value in (("uid", uid), ("netns", netns)):
        if value is not None and not _text(value):
            problems.append(f"{where}: '{key}' must be a non-empty string")
    if isinstance(uid, str) and uid:
        # RFC 4122: a UUID's hex digits are case-insensitive on input; cgroup paths have
        # them in lower case, so that is the form kept
        if not POD_UID_RE.fullmatch(uid.lower()):
            problems.append(f"{where}: uid {uid[:70]!r} is not a pod UID (a UUID such as "
                            "1b4e28ba-2fa1-11d2-883f-0016d3cca427, or a static pod's 32 hex "
                            "digits): it would never match a pod")
        uid = uid.lower()
    if isinstance(netns, str) and netns and not os.path.isabs(netns):
        problems.append(f"{where}: netns {netns[:70]!r} must be an absolute path (a pinned "
                        "netns file, such as /run/netns/cni-...)")
    labels = raw.get("labels")
    labels = {} if labels is None else labels
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in labels.items()):
        problems.append(f"{where}: 'labels' must map strings to strings")
        labels = {}
    owner = raw.get("owner")
    owner = {} if owner is None else owner
    if not isinstance(owner, dict) or any(k not in ("kind", "name") for k in owner) or not all(
            isinstance(v, str) for v in owner.values()):
        problems.append(f"{where}: 'owner' must be {{kind: ..., name: ...}}")
        owner = {}
    if len(problems) > before:
        return None
    meta = PodMeta(namespace=raw["namespace"], name=raw["name"], uid=str(uid or ""),
                   labels=tuple(sorted((k, _label_value(v)) for k, v in labels.items())),
                   workload=owner.get("name", ""), workload_kind=owner.get("kind", ""))
    return meta, str(netns or "")


def parse(text: str, source: str = "inventory") -> Inventory:
    """Parse and validate an inventory; raises InventoryError listing every problem."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{source}: not valid YAML: {exc}") from None
    if doc is None:  # also what a file read halfway through a rewrite can look like
        raise InventoryError(f"{source}: the file is empty; an inventory of no pods is "
                             "'pods: []'")
    if not isinstance(doc, dict) or "pods" not in doc or not isinstance(doc["pods"], list | None):
        raise InventoryError(f"{source}: expected a mapping with a 'pods' list")
    unknown = sorted(set(map(str, doc)) - {"pods"})
    if unknown:
        raise InventoryError(f"{source}: unknown top-level keys {unknown} (known: ['pods'])")
    problems: list[str] = []
    by_uid: dict[str, PodMeta] = {}
    by_netns: dict[str, PodMeta] = {}
    for index, raw in enumerate(doc.get("pods") or []):
        parsed = _entry(index, raw, problems)
        if parsed is None:
            continue
        meta, netns = parsed
        if meta.uid:
            if meta.uid in by_uid:
                problems.append(f"pods[{index}]: uid {meta.uid} is listed twice")
            by_uid[meta.uid] = meta
        if netns:
            key = netns_key(netns)
            if key in by_netns:
                problems.append(f"pods[{index}]: netns {netns} is listed twice")
            by_netns[key] = meta
    if problems:
        raise InventoryError(f"{source}: " + "; ".join(problems))
    return Inventory(by_uid, by_netns)


def load(path: str) -> Inventory:
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None


class StaticInventory:
    """A MetadataSource over an inventory file, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._log = log.get("inventory").bind(path=path)
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._inventory = load(path)  # a bad file at start-up is the caller's to refuse

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        """Whether the file changed since it was last read: one stat(), cheap enough to
        ask every second, so an edit is picked up at once rather than at the next rescan."""
        return self._file_stamp() != self._stamp

    def refresh(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            inventory = load(self._path)
        except InventoryError as exc:
            self._log.error("inventory rejected, keeping the last good one", error=str(exc))
            return
        with self._lock:
            self._inventory = inventory
        pods = len(set(inventory.by_uid.values()) | set(inventory.by_netns.values()))
        self._log.info("inventory reloaded", pods=pods)

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        with self._lock:
            inventory = self._inventory
        if uid and uid in inventory.by_uid:
            return inventory.by_uid[uid]
        for path in netns_paths:
            meta = inventory.by_netns.get(netns_key(path))
            if meta is not None:
                return meta
        return None


class NoMetadata:
    """The source used without inventory or API: every pod gets the fallback identity."""

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        return None

    def refresh(self) -> None:
        return None
