"""Pod metadata from the Kubernetes API: one node-scoped list+watch, nothing else.

The pods of this node (fieldSelector spec.nodeName), listed and watched as
monitor/metadata/reflector.py does for any resource: list, watch from the
list's resourceVersion with bookmarks, list again on 410, back off on failure.
No other call is ever made, and none per pod. The list is not paginated: a
node holds at most a few hundred pods.

Pods are found by UID, and static pods also by their mirror pod's
`kubernetes.io/config.mirror` annotation: the kubelet's own UID for a static
pod (the one in its cgroup path) is that hash, not the mirror pod's UID.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from monitor import log
from monitor.identity import PodMeta
from monitor.metadata.reflector import READ_TIMEOUT, WATCH_SECONDS, Backoff, Reflector

__all__ = ["MIRROR_ANNOTATION", "READ_TIMEOUT", "WATCH_SECONDS", "Backoff", "KubernetesSource",
           "PodCache", "api_client", "pod_meta", "workload"]

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


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


class KubernetesSource(Reflector):
    """A MetadataSource fed by a node-scoped list+watch in a thread of its own."""

    def __init__(self, api: Any, node: str, *, label_allow: Sequence[str] = (),
                 on_change: Callable[[], None] = lambda: None,
                 backoff: Backoff | None = None, watch_seconds: int = WATCH_SECONDS,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self._api, self._node = api, node
        self.api = api  # the CoreV1Api: the peer index (monitor/peers/cluster.py) shares it
        self.cache = PodCache(label_allow)
        super().__init__(api.list_pod_for_all_namespaces, resource="pods",
                         replace=self._replace_pods, apply=self.cache.apply, on_change=on_change,
                         field_selector=f"spec.nodeName={node}", backoff=backoff,
                         watch_seconds=watch_seconds, read_timeout=read_timeout,
                         logger=log.get("kubernetes").bind(node=node), thread_name="kubernetes")

    def _replace_pods(self, pods: Iterable[Mapping[str, Any]]) -> int:
        self.cache.replace(pods)
        return len(self.cache.uids())

    # -- MetadataSource --------------------------------------------------------

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        return self.cache.get(uid) if uid else None

    def refresh(self) -> None:
        return None  # the watch keeps the cache current

    def stats(self) -> dict[str, float]:
        return {"synced": 1.0 if self.synced.is_set() else 0.0, "list": self.lists,
                "watch": self.watches, "error": self.errors}


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
