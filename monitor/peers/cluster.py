"""Every pod, service and node address of the cluster, from two list+watches of the API.

Pods and services of all namespaces are listed (in pages of 500, each page
reduced before the next is read) and watched by monitor/metadata/reflector.py,
one thread each. Of each object only its claims are kept: (address, rank, Peer, UID).

- A pod's IPs (status.podIPs, else status.podIP) are the pod, as its workload
  (monitor.metadata.kubernetes.workload(); a pod with no controller is its own
  workload). A pod that has finished (Succeeded, Failed) holds no address any
  more: it claims nothing. A hostNetwork pod's IPs are its node's.
- Every pod's status.hostIPs (else hostIP) are its node (spec.nodeName). Every
  node runs a podnetmon pod, so this names every node without watching Node
  objects, which are large and change often (status heartbeats).
- A service's spec.clusterIPs (else clusterIP; not "None", headless), its
  spec.externalIPs and status.loadBalancer.ingress[].ip are the service.

One address may be claimed by several objects at once: a pod being deleted and
the successor that got its IP, a node address that a LoadBalancer also
announces (k3s's ServiceLB does), every pod of a node claiming its host IP. The
claim with the highest rank answers: a Running pod's own IP first, then a node
address, then a service address, then the IP of a pod not (or not yet) Running;
between equals, the most recently created; between those, the greater UID (any
fixed order will do, as long as every node picks the same). When the answering
object goes, the next claimant answers. Claims are remembered per object UID,
so a delete removes exactly what that object claimed, whatever the delete
event's copy of the object says.

Memory, for 10,000 pods and 1,000 services: no raw objects are kept; strings
(namespaces, workloads, node names) are interned and Peers shared between
every pod of a workload; addresses are 4- or 16-byte keys. What costs most is
transient: a page of 500 pods parses into ~25 MB of dicts, and CPython's
allocator keeps a 1 MiB arena for as long as one object in it lives, so a
page's peak stays resident. List pages are therefore parsed with a hook that
drops, as soon as each is built, the subtrees no claim is made from
(managedFields, containers, volumes, conditions, ...): the page's peak shrinks
to little more than what is kept (measured on 10,000 pods' list in pages of 500:
18.5 MiB resident after it without the hook, 4.9 MiB with it, and a faster
parse). bench/peer_index.py measures the whole, from outside the process.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from monitor import log
from monitor.metadata.kubernetes import workload
from monitor.metadata.reflector import READ_TIMEOUT, WATCH_SECONDS, Backoff, Reflector
from monitor.peers.identity import Peer, text_key

PAGE_SIZE = 500  # objects per list page: ~3 MB of pod JSON, parsed and dropped a page at a time

# Claim ranks: the tier in the high bits, the creation time (seconds) in the low ones.
RUNNING_POD, NODE, SERVICE, OTHER_POD = 3, 2, 1, 0
_TIER_SHIFT = 40  # 2**40 s is 34,000 years: creation times never reach the tier bits
FINISHED = ("Succeeded", "Failed")

Claim = tuple[bytes, int, Peer, str]  # (address key, rank, who, the claiming object's UID)
Reduced = tuple[str, tuple[Claim, ...]]  # (object UID, its claims)


# Keys whose values no claim is made from, wherever they appear in a pod or service
# (none of them is also the name of a field that is read: see the reducers below).
UNREAD = frozenset({
    "managedFields", "annotations", "containers", "initContainers", "ephemeralContainers",
    "volumes", "conditions", "containerStatuses", "initContainerStatuses",
    "ephemeralContainerStatuses", "resourceClaimStatuses", "tolerations", "affinity",
    "topologySpreadConstraints", "readinessGates", "resourceClaims", "ports", "selector"})


def _pruned(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if k not in UNREAD}


def decode_slim(data: bytes) -> Any:
    """A list page, parsed with every UNREAD subtree dropped as soon as it is built."""
    return json.loads(data, object_pairs_hook=_pruned)


def _created(meta: Mapping[str, Any]) -> int:
    """metadata.creationTimestamp (RFC 3339, UTC) in whole seconds; 0 if absent or odd."""
    stamp = meta.get("creationTimestamp")
    if not isinstance(stamp, str):
        return 0
    try:
        return max(0, int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()))
    except ValueError:
        return 0


def _ips(status: Mapping[str, Any], plural: str, singular: str) -> list[str]:
    """status.<plural>[].ip, else status.<singular> (older API servers, single-stack)."""
    listed = status.get(plural)
    if isinstance(listed, list):
        ips = [str(i["ip"]) for i in listed if isinstance(i, dict) and i.get("ip")]
        if ips:
            return ips
    one = status.get(singular)
    return [one] if isinstance(one, str) and one else []


def _dict(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


class _Interner:
    """One shared Peer per (kind, namespace, workload), and one copy of each string.

    Weak values: a Peer no claim holds any more (a finished Job's pods) is freed,
    so pod churn does not grow the table. sys.intern'ed strings are freed the
    same way once nothing refers to them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # two watch threads intern at once
        self._peers: weakref.WeakValueDictionary[tuple[str, str, str], Peer] = (
            weakref.WeakValueDictionary())

    def peer(self, kind: str, namespace: str, name: str) -> Peer:
        key = (kind, namespace, name)
        with self._lock:
            peer = self._peers.get(key)
            if peer is None:
                peer = Peer(kind, sys.intern(namespace), sys.intern(name))
                self._peers[key] = peer
            return peer

    def __len__(self) -> int:
        return len(self._peers)


def _claims(uid: str, *groups: tuple[list[str], int, Peer]) -> Reduced:
    """An object's claims from (addresses, rank, peer) groups: valid addresses only, each
    once (its highest-ranked claim: a hostNetwork pod's IP is also its host IP)."""
    uid = sys.intern(uid)
    best: dict[bytes, Claim] = {}
    for texts, rank, peer in groups:
        for text in texts:
            key = text_key(text)
            if key is not None and (key not in best or best[key][1] < rank):
                best[key] = (key, rank, peer, uid)
    return uid, tuple(best.values())


def _best_first(claims: Iterable[Claim]) -> tuple[Claim, ...]:
    """Claims on one address, the one that answers first: by rank, then by UID."""
    return tuple(sorted(claims, key=_order, reverse=True))


def _order(claim: Claim) -> tuple[int, str]:
    return claim[1], claim[3]


class ClusterIndex:
    """Address -> Peer for the whole cluster, kept by list+watch of pods and services."""

    def __init__(self, api: Any, *, page_size: int = PAGE_SIZE,
                 backoff: Callable[[], Backoff] = Backoff, watch_seconds: int = WATCH_SECONDS,
                 read_timeout: float = READ_TIMEOUT) -> None:
        """`api` is a CoreV1Api (monitor.metadata.kubernetes.api_client); `backoff`
        makes one Backoff per watch."""
        self._lock = threading.Lock()  # writers only: lookups read without it
        self._intern = _Interner()
        self._objects: dict[str, dict[str, tuple[Claim, ...]]] = {"pods": {}, "services": {}}
        # address -> every claim on it, the answering one first. A tuple, not a dict: most
        # addresses have one claimant, and a 1-tuple is a quarter of the smallest dict.
        self._claims: dict[bytes, tuple[Claim, ...]] = {}
        self.synced = threading.Event()  # set once pods and services have both been listed
        self.rejected = 0  # objects without a UID: nothing to remove them by later
        self.changes = 0
        self._reducers: dict[str, Callable[[Mapping[str, Any]], Reduced | None]] = {
            "pods": self._reduce_pod, "services": self._reduce_service}
        logger = log.get("peers")
        self._reflectors = {
            resource: Reflector(
                call, resource=resource, page_size=page_size, backoff=backoff(),
                replace=functools.partial(self.replace, resource),
                apply=functools.partial(self.apply, resource), on_change=self._on_change,
                watch_seconds=watch_seconds, read_timeout=read_timeout,
                logger=logger.bind(resource=resource), thread_name=f"peers-{resource}",
                decode=decode_slim)
            for resource, call in (("pods", api.list_pod_for_all_namespaces),
                                   ("services", api.list_service_for_all_namespaces))}

    # -- lookups (any thread, no lock) ------------------------------------------------------

    def lookup(self, key: bytes) -> Peer | None:
        """The Peer of an address key (4 bytes IPv4, 16 bytes IPv6), or None."""
        # The dict is changed one key at a time (each value a new tuple), or replaced whole
        # on a relist; a single get is atomic either way.
        claims = self._claims.get(key)
        return claims[0][2] if claims else None

    def stats(self) -> dict[str, float]:
        pods, services = self._reflectors["pods"], self._reflectors["services"]
        # len() of a dict is atomic: no lock, so a scrape never waits for a relist.
        held = (len(self._objects["pods"]), len(self._objects["services"]), len(self._claims))
        return {"synced": 1.0 if self.synced.is_set() else 0.0,
                "lists": pods.lists + services.lists, "pages": pods.pages + services.pages,
                "watches": pods.watches + services.watches,
                "errors": pods.errors + services.errors, "rejected": self.rejected,
                "pods": held[0], "services": held[1], "objects": held[0] + held[1],
                "addresses": held[2], "peers": len(self._intern), "changes": self.changes}

    # -- the threads ------------------------------------------------------------------------

    def start(self) -> None:
        for reflector in self._reflectors.values():
            reflector.start()

    def stop(self) -> None:
        for reflector in self._reflectors.values():
            reflector.stop()

    def join(self, timeout: float | None = None) -> bool:
        """After stop(): wait for both threads; True if both have ended."""
        ended = [r.join(timeout) for r in self._reflectors.values()]  # each joined, none skipped
        return all(ended)

    def reflector(self, resource: str) -> Reflector:
        """The pods or services list+watch (its resourceVersion and counters)."""
        return self._reflectors[resource]

    def _on_change(self) -> None:
        if all(r.synced.is_set() for r in self._reflectors.values()):
            self.synced.set()

    # -- objects to claims ------------------------------------------------------------------

    def _reduce_pod(self, pod: Mapping[str, Any]) -> Reduced | None:
        meta, spec, status = _dict(pod, "metadata"), _dict(pod, "spec"), _dict(pod, "status")
        uid = meta.get("uid")
        if not isinstance(uid, str) or not uid:
            return None
        phase = status.get("phase")
        if phase in FINISHED:
            return uid, ()  # its IP may already be another pod's: it claims nothing
        created = _created(meta)
        pod_ips = _ips(status, "podIPs", "podIP")
        groups: list[tuple[list[str], int, Peer]] = []
        node = str(spec.get("nodeName") or "")
        if node:  # a pod not yet scheduled has no host address (nor, yet, an IP)
            node_peer, node_rank = self._intern.peer("node", "", node), NODE << _TIER_SHIFT | created
            groups.append((_ips(status, "hostIPs", "hostIP"), node_rank, node_peer))
            if spec.get("hostNetwork") is True:
                groups.append((pod_ips, node_rank, node_peer))
        if spec.get("hostNetwork") is not True:
            namespace = str(meta.get("namespace") or "")
            owner = workload(pod)[0] or str(meta.get("name") or "")
            tier = RUNNING_POD if phase == "Running" else OTHER_POD
            groups.append((pod_ips, tier << _TIER_SHIFT | created,
                           self._intern.peer("pod", namespace, owner)))
        return _claims(uid, *groups)

    def _reduce_service(self, service: Mapping[str, Any]) -> Reduced | None:
        meta, spec = _dict(service, "metadata"), _dict(service, "spec")
        uid = meta.get("uid")
        if not isinstance(uid, str) or not uid:
            return None
        cluster_ips = spec.get("clusterIPs")
        if not isinstance(cluster_ips, list) or not cluster_ips:
            cluster_ips = [spec.get("clusterIP")]
        addresses = [ip for ip in cluster_ips if isinstance(ip, str) and ip and ip != "None"]
        external = spec.get("externalIPs")
        if isinstance(external, list):
            addresses += [ip for ip in external if isinstance(ip, str)]
        ingress = _dict(_dict(service, "status"), "loadBalancer").get("ingress")
        if isinstance(ingress, list):
            addresses += [str(i["ip"]) for i in ingress if isinstance(i, dict) and i.get("ip")]
        peer = self._intern.peer("service", str(meta.get("namespace") or ""),
                                 str(meta.get("name") or ""))
        return _claims(uid, (addresses, SERVICE << _TIER_SHIFT | _created(meta), peer))

    # -- applying lists and events (the reflectors call these; so may anyone) ----------------

    def replace(self, resource: str, items: Iterable[Mapping[str, Any]]) -> int:
        """Every object of `resource` ("pods", "services") anew, as a list gives them;
        returns how many claim an address."""
        reduce = self._reducers[resource]
        # Reduced as the pages arrive (no lock held: only one thread writes one resource),
        # then swapped in at once: lookups see the old picture until then.
        fresh: dict[str, tuple[Claim, ...]] = {}
        rejected = 0
        for item in items:
            reduced = reduce(item)
            if reduced is None:
                rejected += 1
            elif reduced[1]:
                fresh[reduced[0]] = reduced[1]
        with self._lock:
            self.rejected += rejected
            self._objects[resource] = fresh
            self._rebuild()
            self.changes += 1
        return len(fresh)

    def apply(self, resource: str, kind: str, obj: Mapping[str, Any]) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED); True if any claim changed."""
        reduced = self._reducers[resource](obj)
        if reduced is None:
            with self._lock:
                self.rejected += 1
            return False
        uid, claims = reduced
        if kind == "DELETED":
            claims = ()  # whatever the deleted copy says: what this UID claimed goes
        with self._lock:
            held = self._objects[resource]
            old = held.get(uid, ())
            if old == claims:
                return False
            if claims:
                held[uid] = claims
            else:
                held.pop(uid, None)
            touched: dict[bytes, list[Claim]] = {c[0]: [] for c in old}
            for claim in claims:
                touched.setdefault(claim[0], []).append(claim)
            for key, mine in touched.items():
                others = [c for c in self._claims.get(key, ()) if c[3] != uid]
                if others or mine:
                    self._claims[key] = _best_first(others + mine)
                else:
                    self._claims.pop(key, None)
            self.changes += 1
        return True

    def _rebuild(self) -> None:
        """Every address's claims afresh from the objects held (after a list)."""
        grouped: dict[bytes, list[Claim]] = {}
        for held in self._objects.values():
            for owned in held.values():
                for claim in owned:
                    grouped.setdefault(claim[0], []).append(claim)
        # one assignment: lookups switch from the old picture to the new one here
        self._claims = {key: _best_first(claims) for key, claims in grouped.items()}
