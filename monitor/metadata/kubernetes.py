"""Pod metadata from the Kubernetes API: one node-scoped list+watch, nothing else.

The protocol, as the API server means it to be used (kopf's watching.py and
the client's watch_recovery example are the models): list the pods of this
node (fieldSelector spec.nodeName), remember the list's resourceVersion,
watch from it with bookmarks (which move the resourceVersion on without any
change), and keep the resourceVersion of every event. A watch ends for many
ordinary reasons (the server's timeout, a dropped connection, a read timeout
on a quiet or slow stream): watch again from the last resourceVersion. A 410
Gone means that version was compacted away: list again. Failures back off
with jitter. No other call is ever made, and none per pod.

Pods are found by UID, and static pods also by their mirror pod's
`kubernetes.io/config.mirror` annotation: the kubelet's own UID for a static
pod (the one in its cgroup path) is that hash, not the mirror pod's UID.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from monitor import log
from monitor.identity import PodMeta

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
WATCH_SECONDS = 300  # the server ends each watch after this; we then watch again
READ_TIMEOUT = 90.0  # no byte for this long (bookmarks come every minute): reconnect


class Backoff:
    """Exponential backoff with full jitter: 0.5 s doubling to 30 s."""

    def __init__(self, first: float = 0.5, cap: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._first, self._cap, self._rand, self._n = first, cap, rand, 0

    def next(self) -> float:
        delay = min(self._cap, self._first * float(2 ** self._n))
        if delay < self._cap:
            self._n += 1  # no further once capped: 2 ** n would overflow a float in time
        return delay / 2 + self._rand() * delay / 2

    def reset(self) -> None:
        self._n = 0


def workload(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(name, kind) of the pod's controller, without asking the API for it.

    A ReplicaSet created by a Deployment is named <deployment>-<pod-template-hash>,
    and its pods carry that hash as a label: the Deployment's name follows.
    """
    meta = pod.get("metadata") or {}
    refs = [r for r in meta.get("ownerReferences") or [] if isinstance(r, dict)]
    owner = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if not owner or not isinstance(owner.get("name"), str):
        return "", ""
    name, kind = owner["name"], str(owner.get("kind") or "")
    if kind == "ReplicaSet":
        template_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if isinstance(template_hash, str) and name.endswith("-" + template_hash):
            return name[: -len(template_hash) - 1], "Deployment"
    return name, kind


def pod_meta(pod: Mapping[str, Any], label_allow: Iterable[str]) -> PodMeta | None:
    """A PodMeta from an API pod object; None when it lacks what identifies a pod."""
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return None
    uid, namespace, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
    if not all(isinstance(v, str) and v for v in (uid, namespace, name)):
        return None
    raw_labels = meta.get("labels")
    labels: dict[str, Any] = raw_labels if isinstance(raw_labels, dict) else {}
    kept = tuple(sorted((k, str(labels[k])) for k in label_allow if k in labels))
    owner, kind = workload(pod)
    return PodMeta(namespace=str(namespace), name=str(name), uid=str(uid), labels=kept,
                   workload=owner, workload_kind=kind)


def _mirror_of(pod: Mapping[str, Any]) -> str | None:
    annotations = (pod.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        value = annotations.get(MIRROR_ANNOTATION)
        if isinstance(value, str) and value:
            return value
    return None


class PodCache:
    """The node's pods as the last list and the events since describe them."""

    def __init__(self, label_allow: Sequence[str] = ()) -> None:
        self._allow = tuple(label_allow)
        self._lock = threading.Lock()
        self._by_uid: dict[str, PodMeta] = {}
        self._mirrors: dict[str, str] = {}  # static pod UID (config hash) -> mirror pod UID
        self.rejected = 0  # objects that could not be used (no uid, name or namespace)

    def replace(self, pods: Iterable[Mapping[str, Any]]) -> None:
        by_uid, mirrors = {}, {}
        for pod in pods:
            meta = pod_meta(pod, self._allow)
            if meta is None:
                self.rejected += 1
                continue
            by_uid[meta.uid] = meta
            mirror = _mirror_of(pod)
            if mirror:
                mirrors[mirror] = meta.uid
        with self._lock:
            self._by_uid, self._mirrors = by_uid, mirrors

    def apply(self, kind: str, pod: Mapping[str, Any]) -> bool:
        """One watch event; True if the cache changed."""
        meta = pod_meta(pod, self._allow)
        if meta is None:
            self.rejected += 1
            return False
        mirror = _mirror_of(pod)
        with self._lock:
            if kind == "DELETED":
                gone = self._by_uid.pop(meta.uid, None) is not None
                if mirror and self._mirrors.get(mirror) == meta.uid:
                    del self._mirrors[mirror]
                return gone
            changed = self._by_uid.get(meta.uid) != meta
            self._by_uid[meta.uid] = meta
            if mirror:
                self._mirrors[mirror] = meta.uid
            return changed

    def get(self, uid: str) -> PodMeta | None:
        with self._lock:
            meta = self._by_uid.get(uid)
            if meta is None and uid in self._mirrors:
                meta = self._by_uid.get(self._mirrors[uid])
            return meta

    def uids(self) -> set[str]:
        with self._lock:
            return set(self._by_uid)


class KubernetesSource:
    """A MetadataSource fed by a node-scoped list+watch in a thread of its own."""

    def __init__(self, api: Any, node: str, *, label_allow: Sequence[str] = (),
                 on_change: Callable[[], None] = lambda: None,
                 backoff: Backoff | None = None, watch_seconds: int = WATCH_SECONDS,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self._api, self._node = api, node
        self.on_change = on_change  # set by the daemon to wake its reconciler
        self.cache = PodCache(label_allow)
        self._backoff = backoff or Backoff()
        self._watch_seconds, self._read_timeout = watch_seconds, read_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.get("kubernetes").bind(node=node)
        self.resource_version: str | None = None
        self.synced = threading.Event()  # the first list is in
        self.lists = 0
        self.watches = 0
        self.errors = 0

    # -- MetadataSource --------------------------------------------------------

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        return self.cache.get(uid) if uid else None

    def refresh(self) -> None:
        return None  # the watch keeps the cache current

    def stats(self) -> dict[str, float]:
        return {"synced": 1.0 if self.synced.is_set() else 0.0, "list": self.lists,
                "watch": self.watches, "error": self.errors}

    # -- the loop --------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="kubernetes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        selector = f"spec.nodeName={self._node}"
        relisted = False  # the last list came from a 410: a second 410 at once backs off
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._list(selector)
                self._watch(selector)
                self._backoff.reset()
                relisted = False
            except Exception as exc:  # noqa: BLE001 - every failure means: wait, then go on
                status = getattr(exc, "status", None)
                if status == 410:  # our resourceVersion was compacted away: list again
                    self._log.info("watch expired, listing again",
                                   resource_version=self.resource_version)
                    self.resource_version = None
                    if relisted:
                        self._stop.wait(self._backoff.next())
                    relisted = True
                    continue
                if _is_read_timeout(exc):  # a quiet stream: an ordinary end of a watch
                    continue
                self.errors += 1
                delay = self._backoff.next()
                self._log.warning("kubernetes api call failed",
                                  error=f"{type(exc).__name__}: {exc}", status=status,
                                  retry_in=round(delay, 2))
                self._stop.wait(delay)

    def _list(self, selector: str) -> None:
        resp = self._api.list_pod_for_all_namespaces(
            field_selector=selector, _preload_content=False,
            _request_timeout=(10, self._read_timeout))
        doc = json.loads(resp.data)
        items = doc.get("items") or []
        self.cache.replace(i for i in items if isinstance(i, dict))
        self.resource_version = str((doc.get("metadata") or {}).get("resourceVersion") or "") or None
        self.lists += 1
        if not self.synced.is_set():
            self._log.info("pods listed", pods=len(self.cache.uids()))
        self.synced.set()
        self.on_change()

    def _watch(self, selector: str) -> None:
        from kubernetes import watch  # type: ignore[import-untyped]

        # Plain dicts, not the client's V1Pod models: the model refuses objects that do
        # not fit its schema exactly, which would stop the watch at that event for good.
        w = watch.Watch(return_type="object")
        self.watches += 1
        for event in w.stream(self._api.list_pod_for_all_namespaces, field_selector=selector,
                              resource_version=self.resource_version,
                              allow_watch_bookmarks=True, timeout_seconds=self._watch_seconds,
                              _request_timeout=(10, self._read_timeout)):
            if self._stop.is_set():
                w.stop()
                return
            kind, raw = event.get("type"), event.get("raw_object")
            if not isinstance(raw, dict):
                continue
            version = (raw.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED", "DELETED") and self.cache.apply(kind, raw):
                self.on_change()
            if isinstance(version, str) and version:
                self.resource_version = version  # bookmarks too: they move it on


def _is_read_timeout(exc: BaseException) -> bool:
    """A read timeout on the watch (urllib3 raises it, sometimes wrapped)."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__name__ in ("ReadTimeoutError", "TimeoutError", "socket.timeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def api_client(kubeconfig: str) -> Any:
    """A CoreV1Api: from a kubeconfig file if given, else the in-cluster service account."""
    from kubernetes import client, config  # type: ignore[import-untyped]

    if kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
    else:
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        api = client.ApiClient(cfg)
    return client.CoreV1Api(api)
