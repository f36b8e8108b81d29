"""A local fake of the Kubernetes API server's pod and service lists and watches, for the real client.

Only what a node-scoped pod watcher, a cluster-wide pod and service watcher and an
authenticating proxy use is here, each piece as the API server does it:

    GET /api/v1/pods[?fieldSelector=spec.nodeName=N][&limit=L[&continue=C]]
                                                                   -> a PodList
    GET /api/v1/pods?watch=true[&resourceVersion=R][&allowWatchBookmarks=true]
                    [&timeoutSeconds=T][&fieldSelector=...]        -> a chunked event stream
    GET /api/v1/services[?limit=L[&continue=C]]                    -> a ServiceList
    GET /api/v1/services?watch=true[&...as for pods, no fieldSelector] -> a chunked event stream
    POST /apis/authentication.k8s.io/v1/tokenreviews               -> the TokenReview, with status
    POST /apis/authorization.k8s.io/v1/subjectaccessreviews        -> the SubjectAccessReview, with status

Every change bumps one global resourceVersion (as etcd's revision does for every
object kind) and goes to an event log; `compact()` forgets the log as etcd
compaction does, after which a watch from an older version gets 410 Expired.

Lists are in key order (namespace/name), as etcd keeps them. With `limit` a list is
paginated: each page but the last carries `metadata.continue` (and, without a
selector, `remainingItemCount`), and every page is served from the snapshot at the
first page's resourceVersion, which every page reports, whatever changed since (the
fake rebuilds that snapshot from its event log). A continue token whose snapshot was
compacted away gets 410 Expired, as the API server answers, with a token that would
continue inconsistently in its metadata.

A watch filtered on spec.nodeName gets ADDED when a pod starts matching (bound to the
node) and DELETED when it stops, as the API server's watch filter does. A watch that
starts from a version gets the logged changes after it at once, then live changes.

Services: add_service(), update_service(), delete_service(), made by make_service();
their changes share the one resourceVersion and log with the pods.

Test controls beyond the API: bookmark(), compact(), drop_streams(), event_delay (each
live event waits that long before it is written; what a watch starts with does not, so
a client that reconnects from its last version catches up at once), fail_next(),
requests. Nothing validates pods on purpose: add() takes objects a real API server
would refuse, so clients can be tested against them.

Reviews: add_token() makes a token known (as a user with groups; any other token is
not authenticated), grant() allows a (user or group, verb, namespace, resource,
subresource, name), "" or "*" in a field meaning any, as a SubjectAccessReview sees
it; deny_reason is the reason a denial gives. fail_next() fails reviews too. Every
POST body is kept in `bodies`; token_reviews() and access_reviews() list them.

    server = FakeApiServer(node="node-a")
    server.start()
    server.write_kubeconfig(path)   # for kubernetes.config.new_client_from_config
    server.add(make_pod("web-1", "shop", "uid-1", "node-a", labels={"app": "web"}))
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PODS_PATH = "/api/v1/pods"
SERVICES_PATH = "/api/v1/services"
RESOURCES = {PODS_PATH: "pods", SERVICES_PATH: "services"}  # path -> the store's resource
KINDS = {"pods": "Pod", "services": "Service"}
CREATED = "2024-05-01T10:00:00Z"  # creationTimestamp of objects made without one
AUTHN_REVIEWS_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCE = "https://kubernetes.default.svc"  # what a TokenReview naming none asks for
AUTHZ_REVIEWS_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"
NON_RESOURCE = "<non-resource URL>"  # how grant_path() grants are told apart from pods
FIRST_RESOURCE_VERSION = 100  # any start will do; not 0, which means "any version" to the API
POLL = 0.05  # how often a waiting watch checks whether its client went away

# The reason the API server gives with each HTTP status in a Status object.
REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
           405: "MethodNotAllowed", 409: "AlreadyExists", 410: "Expired", 429: "TooManyRequests",
           500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}

# ownerReferences[].apiVersion of the usual pod owners.
OWNER_API_VERSIONS = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
                      "Deployment": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1",
                      "Node": "v1", "ReplicationController": "v1"}

Pod = dict[str, Any]
Obj = dict[str, Any]  # a pod or a service
Grant = tuple[str, str, str, str, str, str]  # (user or group, verb, namespace, resource, subresource, name)


def status(code: int, message: str) -> dict[str, Any]:
    """A metav1.Status, the body of every API error (and the object of watch ERROR events)."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": REASONS.get(code, "Unknown"), "code": code}


def make_pod(name: str, namespace: str, uid: str, node: str,  # noqa: PLR0917 - the signature tests use
             labels: Mapping[str, str] | None = None,
             owner: tuple[str, str] | Sequence[Mapping[str, Any]] | None = None,
             annotations: Mapping[str, str] | None = None, *,
             pod_ips: Sequence[str] = (), host_ips: Sequence[str] = (), host_network: bool = False,
             phase: str = "Running", created: str = CREATED) -> Pod:
    """A pod object as the API serves it (the fields the client's model requires included).

    `owner` is (kind, name) for one controller reference, or a list of raw
    ownerReferences (which may be malformed on purpose). `pod_ips` and `host_ips`
    become status.podIP(s) and status.hostIP(s) as the kubelet writes them (the
    first is the singular field), only when given.
    """
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid,
                            "creationTimestamp": created}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    if isinstance(owner, tuple):
        kind, owner_name = owner
        meta["ownerReferences"] = [{
            "apiVersion": OWNER_API_VERSIONS.get(kind, "v1"), "kind": kind, "name": owner_name,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}/{owner_name}")),
            "controller": True, "blockOwnerDeletion": True}]
    elif owner is not None:
        meta["ownerReferences"] = [dict(r) for r in owner]
    spec: dict[str, Any] = {"nodeName": node,
                            "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]}
    if host_network:
        spec["hostNetwork"] = True
    pod_status: dict[str, Any] = {"phase": phase}
    if host_ips:
        pod_status["hostIP"] = host_ips[0]
        pod_status["hostIPs"] = [{"ip": ip} for ip in host_ips]
    if pod_ips:
        pod_status["podIP"] = pod_ips[0]
        pod_status["podIPs"] = [{"ip": ip} for ip in pod_ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": pod_status}


def make_service(name: str, namespace: str, cluster_ip: str | None, *,
                 uid: str | None = None, cluster_ips: Sequence[str] | None = None,
                 external_ips: Sequence[str] = (), lb_ips: Sequence[str] = (),
                 service_type: str | None = None, created: str = CREATED) -> Obj:
    """A service object as the API serves it.

    `cluster_ip` "None" makes a headless service, None one without a cluster IP (an
    ExternalName service); `cluster_ips` (dual-stack) defaults to [cluster_ip].
    `lb_ips` become status.loadBalancer.ingress[].ip (and the type LoadBalancer).
    """
    spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                       "targetPort": 8080}],
                            "selector": {"app": name}}
    if cluster_ip is None:
        spec.update({"type": "ExternalName", "externalName": f"{name}.example.com"})
        del spec["selector"]
    else:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = list(cluster_ips if cluster_ips is not None else [cluster_ip])
        spec["type"] = "LoadBalancer" if lb_ips else "ClusterIP"
    if service_type:
        spec["type"] = service_type
    if external_ips:
        spec["externalIPs"] = list(external_ips)
    meta = {"name": name, "namespace": namespace,
            "uid": uid or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"service/{namespace}/{name}")),
            "creationTimestamp": created}
    svc_status: dict[str, Any] = {"loadBalancer": {}}
    if lb_ips:
        svc_status["loadBalancer"]["ingress"] = [{"ip": ip} for ip in lb_ips]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec,
            "status": svc_status}


def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _etcd_key(key: tuple[str, str]) -> str:
    """The order etcd keeps objects in (/registry/<resource>/<namespace>/<name>)."""
    return f"{key[0]}/{key[1]}"


def _token(rv: int, start: str) -> str:
    """A continue token as the API server makes one: base64 of the snapshot's version and
    the key to go on from."""
    doc = {"v": "meta.k8s.io/v1", "rv": rv, "start": start}
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()


def _untoken(token: str) -> tuple[int, str] | None:
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode()))
        rv, start = doc["rv"], doc["start"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if not isinstance(rv, int) or not isinstance(start, str) or rv <= 0:
        return None
    return rv, start


def _node_of(pod: Mapping[str, Any] | None) -> str | None:
    if pod is None:
        return None
    return str((pod.get("spec") or {}).get("nodeName") or "")


def _seen_as(kind: str, obj: Pod, prev: Pod | None, node: str | None) -> str | None:
    """The event a watch filtered on spec.nodeName=node gets for a change, if any.

    Like the API server's watch filter: an object that starts matching arrives as
    ADDED, one that stops matching leaves as DELETED (with its new state).
    """
    if node is None:
        return kind
    now = _node_of(obj) == node
    before = _node_of(prev) == node
    if kind == "ADDED":
        return "ADDED" if now else None
    if kind == "DELETED":
        return "DELETED" if now else None
    if now and before:
        return "MODIFIED"
    if now:
        return "ADDED"
    return "DELETED" if before else None


class _Watch:
    """One open watch: the events queued for it since it started, and its controls."""

    def __init__(self, node: str | None, bookmarks: bool, resource: str = "pods") -> None:
        self.node, self.bookmarks, self.resource = node, bookmarks, resource
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.cut = threading.Event()  # drop_streams(): close abruptly
        self.last_write = time.monotonic()


class FakeApiServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 (a port the OS picks) serving pods and services."""

    def __init__(self, node: str = "node-a", *, bookmark_interval: float | None = None) -> None:
        self.node = node  # the node the client under test runs on (for pod() and tests)
        self.bookmark_interval = bookmark_interval  # send bookmarks this often when idle; None: never
        self.event_delay = 0.0  # seconds to sleep before writing each live event: a slow stream
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self._cond = threading.Condition()
        self._rv = FIRST_RESOURCE_VERSION
        self._compacted = 0  # the log holds every change with a resourceVersion above this
        self._store: dict[str, dict[tuple[str, str], Obj]] = {"pods": {}, "services": {}}
        self._pods = self._store["pods"]
        # (rv, resource, type, object, previous)
        self._log: list[tuple[int, str, str, Obj, Obj | None]] = []
        self._watches: set[_Watch] = set()
        self._failures: collections.deque[int] = collections.deque()
        self._sockets: set[socket.socket] = set()
        self._stopping = False
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # token -> (user, groups, the audiences it was minted for)
        self.tokens: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
        # True: answer as an authenticator webhook that ignores spec.audiences would
        self.ignore_audiences = False
        self.grants: set[Grant] = set()
        self.deny_reason: str | None = None  # None: a sentence naming what was asked
        self.bodies: list[tuple[str, Any]] = []  # (path, JSON body) of every review POSTed

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeApiServer:
        """Listen on `port` (0: one the OS picks; a fixed one to come up where a client
        has been failing to connect)."""
        handler = type("Handler", (_Handler,), {"api": self})
        self._http = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every watch, close every connection, stop listening. Safe to call twice."""
        with self._cond:
            self._stopping = True
            for w in self._watches:
                w.cut.set()
            self._cond.notify_all()
            sockets = list(self._sockets)
        for sock in sockets:  # keep-alive connections whose handlers wait for a next request
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:  # started, and not stopped yet
            assert self._http is not None
            self._http.shutdown()
            self._http.server_close()
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._http is not None, "start() first"
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str) -> str:
        """A kubeconfig for this server: plain http, no credentials. Returns the path."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                  "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                  "users": [{"name": "fake", "user": {}}],
                  "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)  # JSON is YAML: the client's loader reads it
        return path

    # -- the store: every change bumps the resourceVersion and is logged ------------------

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._rv)

    def pods(self) -> list[Pod]:
        with self._cond:
            return [copy.deepcopy(p) for p in self._pods.values()]

    def pod(self, name: str, namespace: str = "default", uid: str | None = None, **kwargs: Any) -> Pod:
        """make_pod() on this server's node, with a UID made from the name unless given."""
        return make_pod(name, namespace, uid or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}/{name}")),
                        self.node, **kwargs)

    def add(self, pod: Mapping[str, Any]) -> Pod:
        """Create a pod (ADDED); returns it as stored, with its resourceVersion."""
        with self._cond:
            if _key(pod) in self._pods:
                raise ValueError(f"pod {_key(pod)} exists already")
            return self._change("ADDED", pod, None)

    def update(self, pod: Mapping[str, Any]) -> Pod:
        """Replace a pod (MODIFIED), found by namespace and name."""
        with self._cond:
            prev = self._pods.get(_key(pod))
            if prev is None:
                raise KeyError(f"no pod {_key(pod)}")
            return self._change("MODIFIED", pod, prev)

    def delete(self, namespace: str, name: str) -> Pod:
        """Delete a pod (DELETED, carrying its last state with a new resourceVersion)."""
        with self._cond:
            prev = self._pods.get((namespace, name))
            if prev is None:
                raise KeyError(f"no pod {(namespace, name)}")
            return self._change("DELETED", prev, prev)

    def services(self) -> list[Obj]:
        with self._cond:
            return [copy.deepcopy(s) for s in self._store["services"].values()]

    def add_service(self, service: Mapping[str, Any]) -> Obj:
        """Create a service (ADDED); returns it as stored, with its resourceVersion."""
        with self._cond:
            if _key(service) in self._store["services"]:
                raise ValueError(f"service {_key(service)} exists already")
            return self._change("ADDED", service, None, "services")

    def update_service(self, service: Mapping[str, Any]) -> Obj:
        """Replace a service (MODIFIED), found by namespace and name."""
        with self._cond:
            prev = self._store["services"].get(_key(service))
            if prev is None:
                raise KeyError(f"no service {_key(service)}")
            return self._change("MODIFIED", service, prev, "services")

    def delete_service(self, namespace: str, name: str) -> Obj:
        """Delete a service (DELETED, carrying its last state with a new resourceVersion)."""
        with self._cond:
            prev = self._store["services"].get((namespace, name))
            if prev is None:
                raise KeyError(f"no service {(namespace, name)}")
            return self._change("DELETED", prev, prev, "services")

    def _change(self, kind: str, pod: Mapping[str, Any], prev: Obj | None,
                resource: str = "pods") -> Obj:
        self._rv += 1
        obj = copy.deepcopy(dict(pod))
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        store = self._store[resource]
        if kind == "DELETED":
            del store[_key(obj)]
        else:
            store[_key(obj)] = obj
        self._log.append((self._rv, resource, kind, obj, prev))
        for w in self._watches:  # the API server fans each change out to every open watch
            if w.resource != resource:
                continue
            seen = _seen_as(kind, obj, prev, w.node)
            if seen:
                w.queue.append({"type": seen, "object": obj})
        self._cond.notify_all()
        return copy.deepcopy(obj)

    # -- test controls ---------------------------------------------------------------------

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current resourceVersion to every watch that allows them."""
        with self._cond:
            for w in self._watches:
                if w.bookmarks:
                    w.queue.append(self._bookmark(w.resource))
            self._cond.notify_all()

    def _bookmark(self, resource: str = "pods") -> dict[str, Any]:
        # An object of the watched kind with only metadata.resourceVersion set.
        return {"type": "BOOKMARK", "object": {"kind": KINDS[resource], "apiVersion": "v1",
                                               "metadata": {"resourceVersion": str(self._rv)}}}

    def compact(self) -> None:
        """Forget the event log up to now: a watch from an older version gets 410 Expired.

        Open watches are not affected (the API server feeds them from memory).
        """
        with self._cond:
            self._compacted = self._rv
            self._log.clear()

    def drop_streams(self) -> None:
        """Cut every open watch connection, mid-event, without the final chunk."""
        with self._cond:
            for w in self._watches:
                w.cut.set()
            self._cond.notify_all()

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next n requests, whatever they ask, get this HTTP status and a Status body."""
        with self._cond:
            self._failures.extend([status] * n)

    def add_token(self, token: str, user: str, groups: Sequence[str] = (),
                  audiences: Sequence[str] = ("podnetmon",)) -> None:
        """A TokenReview of `token` answers: authenticated as `user`, in `groups`, when it
        asks for one of `audiences` (as a token from `kubectl create token --audience`)."""
        with self._cond:
            self.tokens[token] = (user, tuple(groups), tuple(audiences))

    def grant(self, subject: str, verb: str = "", namespace: str = "", resource: str = "pods",  # noqa: PLR0917
              subresource: str = "", name: str = "") -> None:
        """Allow a user or group something; "" or "*" in any field allows any value there."""
        with self._cond:
            self.grants.add((subject, verb, namespace, resource, subresource, name))

    def grant_path(self, subject: str, path: str, verb: str = "get") -> None:
        """Allow a user or group a non-resource URL (a ClusterRole's nonResourceURLs)."""
        self.grant(subject, verb, "", NON_RESOURCE, "", path)

    def token_reviews(self) -> list[dict[str, Any]]:
        return [b for p, b in list(self.bodies) if p == AUTHN_REVIEWS_PATH]

    def access_reviews(self) -> list[dict[str, Any]]:
        return [b for p, b in list(self.bodies) if p == AUTHZ_REVIEWS_PATH]

    @property
    def open_watches(self) -> int:
        with self._cond:
            return len(self._watches)

    def watch_requests(self, path: str | None = None) -> list[dict[str, str]]:
        """The query of every watch request so far (of `path` only, if given)."""
        return [q for _m, p, q in list(self.requests)
                if q.get("watch") in ("true", "1") and (path is None or p == path)]

    def list_requests(self, path: str = PODS_PATH) -> list[dict[str, str]]:
        """The query of every list request (every page) of `path` so far."""
        return [q for _m, p, q in list(self.requests)
                if p == path and q.get("watch") not in ("true", "1")]

    # -- serving (called by the handler) ---------------------------------------------------

    def _next_failure(self) -> int | None:
        with self._cond:
            return self._failures.popleft() if self._failures else None

    def _token_review(self, review: dict[str, Any]) -> dict[str, Any]:
        """The review with its status, as the API server answers (the spec is echoed)."""
        token = str((review.get("spec") or {}).get("token") or "")
        with self._cond:
            known = self.tokens.get(token)
        answer = {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                  "metadata": {"creationTimestamp": None}, "spec": review.get("spec") or {}}
        # As kube-apiserver: the review's audiences, or the API server's own if it names
        # none; the token must be meant for one of them, and the answer names those.
        wanted = list((review.get("spec") or {}).get("audiences") or [API_AUDIENCE])
        granted = [] if known is None else [a for a in wanted if a in known[2]]
        if known is not None and self.ignore_audiences:
            granted = list(known[2])
        if known is None:
            answer["status"] = {"authenticated": False, "user": {}, "error": "invalid bearer token"}
        elif not granted:
            answer["status"] = {"authenticated": False, "user": {}, "error": (
                f"[invalid bearer token, token audiences {list(known[2])} is invalid for the "
                f"target audiences {wanted}]")}
        else:
            user, groups, _ = known
            answer["status"] = {"authenticated": True, "audiences": granted,
                                "user": {"username": user, "groups": list(groups),
                                         "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"user/{user}"))}}
        return answer

    def _access_review(self, review: dict[str, Any]) -> dict[str, Any]:
        """Allowed when some grant matches the user or one of the groups, and every field."""
        spec = review.get("spec") or {}
        attrs = spec.get("resourceAttributes")
        url = spec.get("nonResourceAttributes")
        if isinstance(url, dict) and not isinstance(attrs, dict):  # as a grant_path() names it
            attrs = {"verb": url.get("verb"), "resource": NON_RESOURCE, "name": url.get("path")}
        subjects = {str(spec.get("user") or "")} | {str(g) for g in spec.get("groups") or []}
        allowed = False
        if isinstance(attrs, dict):
            asked = [str(attrs.get(f) or "") for f in ("verb", "namespace", "resource", "subresource",
                                                         "name")]
            with self._cond:
                grants = list(self.grants)
            allowed = any(_grant_allows(g, subjects, asked) for g in grants)
        answer = {"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                  "metadata": {"creationTimestamp": None}, "spec": spec}
        if allowed:
            answer["status"] = {"allowed": True, "reason": "allowed by a fake grant"}
        else:
            reason = self.deny_reason
            if reason is None and isinstance(attrs, dict):
                reason = (f"no grant allows {attrs.get('verb')} {attrs.get('resource')}/"
                          f"{attrs.get('subresource')} in namespace \"{attrs.get('namespace') or ''}\"")
            answer["status"] = {"allowed": False, **({"reason": reason} if reason else {})}
        return answer

    def _state_at(self, resource: str, rv: int) -> dict[tuple[str, str], Obj] | None:
        """The objects of `resource` as they were at version rv, undoing the logged
        changes after it (etcd reads a past revision); None if compacted away."""
        if rv < self._compacted or rv > self._rv:
            return None
        state = dict(self._store[resource])
        for erv, res, kind, obj, prev in reversed(self._log):
            if erv <= rv:
                break
            if res != resource:
                continue
            if kind == "ADDED":
                state.pop(_key(obj), None)
            elif prev is not None:  # MODIFIED, DELETED: what it was before
                state[_key(obj)] = prev
        return state

    def _list(self, node: str | None, resource: str = "pods", limit: int = 0,
              token: str | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of a list: whole, or the page `limit` and `token` ask for."""
        with self._cond:
            if token is None:
                rv, start, state = self._rv, "", self._store[resource]
            else:
                parsed = _untoken(token)
                if parsed is None:
                    return 400, status(400, f"continue key is not valid: {token!r}")
                rv, start = parsed
                past = self._state_at(resource, rv)
                if past is None:
                    gone = status(410, "The provided continue parameter is too old to display a "
                                       "consistent list result. You can start a new list without "
                                       "the continue parameter, or use the continue token in this "
                                       "response to retrieve the remainder of the results. "
                                       "Continuing with the provided token results in an "
                                       "inconsistent list - objects that were created, modified, "
                                       "or deleted between the time the first chunk was returned "
                                       "and now may show up in the list.")
                    gone["metadata"] = {"continue": _token(self._rv, start)}
                    return 410, gone
                state = past
            keys = sorted((k for k, o in state.items() if node is None or _node_of(o) == node),
                          key=_etcd_key)
            keys = [k for k in keys if _etcd_key(k) >= start]
            page = keys[:limit] if limit > 0 else keys
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if len(page) < len(keys):
                meta["continue"] = _token(rv, _etcd_key(page[-1]) + "\x00")
                if node is None:  # the API server counts what is left only without a selector
                    meta["remainingItemCount"] = len(keys) - len(page)
            return 200, {"kind": KINDS[resource] + "List", "apiVersion": "v1", "metadata": meta,
                         "items": [copy.deepcopy(state[k]) for k in page]}

    def _open_watch(self, node: str | None, since: int | None, bookmarks: bool,
                    resource: str = "pods") -> tuple[list[dict[str, Any]], _Watch | None]:
        """What a new watch starts with, and the watch, registered for what follows.

        Without a resourceVersion (or "0"): ADDED for every current pod, then changes.
        From version R: every logged change after R, then changes; if the log no longer
        reaches back to R, one ERROR event with a 410 Status and no watch.
        """
        with self._cond:
            if since is None:
                start = [{"type": "ADDED", "object": copy.deepcopy(p)}
                         for p in self._store[resource].values()
                         if node is None or _node_of(p) == node]
            elif since < self._compacted:
                gone = status(410, f"too old resource version: {since} ({self._compacted})")
                return [{"type": "ERROR", "object": gone}], None
            else:
                start = []
                for rv, res, kind, obj, prev in self._log:
                    seen = _seen_as(kind, obj, prev, node) if rv > since and res == resource else None
                    if seen:
                        start.append({"type": seen, "object": copy.deepcopy(obj)})
            w = _Watch(node, bookmarks, resource)
            self._watches.add(w)
            return start, w

    def _close_watch(self, w: _Watch) -> None:
        with self._cond:
            self._watches.discard(w)

    def _next_event(self, w: _Watch, deadline: float, peer: socket.socket) -> dict[str, Any] | str:
        """Block until the watch has something to send: an event, or "cut", "end"."""
        with self._cond:
            while True:
                if w.cut.is_set():
                    return "cut"
                if self._stopping:
                    return "end"
                if w.queue:
                    return w.queue.popleft()
                now = time.monotonic()
                if now >= deadline:
                    return "end"  # timeoutSeconds: the server ends the watch cleanly
                if (w.bookmarks and self.bookmark_interval is not None
                        and now - w.last_write >= self.bookmark_interval):
                    return self._bookmark(w.resource)  # nothing queued: every change so far was sent
                if _peer_gone(peer):
                    return "end"
                self._cond.wait(min(POLL, deadline - now))


def _grant_allows(grant: Grant, subjects: set[str], asked: Sequence[str]) -> bool:
    """Whether a grant covers a review: its subject is the user or a group, every field fits."""
    subject, *fields = grant
    return ((subject in ("", "*") or subject in subjects)
            and all(want in ("", "*") or want == got for want, got in zip(fields, asked, strict=True)))


def _peer_gone(sock: socket.socket) -> bool:
    """True once the client has closed its end (a watch client gives up by closing)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer encoding, as the API server
    api: FakeApiServer

    def setup(self) -> None:
        super().setup()
        with self.api._cond:
            self.api._sockets.add(self.connection)

    def finish(self) -> None:
        with self.api._cond:
            self.api._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            self.close_connection = True  # the client went away between requests: nothing to say

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.api.requests.append(("GET", url.path, query))
        failure = self.api._next_failure()
        if failure is not None:
            self._send_json(failure, status(failure, f"injected failure {failure}"))
            return
        resource = RESOURCES.get(url.path)
        if resource is None:
            self._send_json(404, status(404, f"the server could not find the requested resource "
                                             f"({url.path})"))
            return
        node: str | None = None
        selector = query.get("fieldSelector")
        if selector and resource != "pods":
            self._send_json(400, status(400, f"unsupported fieldSelector {selector!r} on {resource}"))
            return
        if selector:  # only the one form a node-scoped watcher uses
            field, sep, value = selector.partition("=")
            if field != "spec.nodeName" or not sep or "," in value or value.startswith("="):
                self._send_json(400, status(400, f"unsupported fieldSelector {selector!r}: "
                                                 "only spec.nodeName=<node>"))
                return
            node = value
        if query.get("watch", "").lower() in ("true", "1"):
            self._watch(query, node, resource)
            return
        raw_limit = query.get("limit", "")
        if raw_limit and not raw_limit.lstrip("-").isdigit():
            self._send_json(400, status(400, f"invalid limit {raw_limit!r}"))
            return
        self._send_json(*self.api._list(node, resource, int(raw_limit or 0),
                                        query.get("continue") or None))

    def _not_served(self) -> None:
        self.api.requests.append((self.command, urlsplit(self.path).path, {}))
        self._send_json(405, status(405, "the fake API server only serves GET"))

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        review = {AUTHN_REVIEWS_PATH: self.api._token_review,
                  AUTHZ_REVIEWS_PATH: self.api._access_review}.get(url.path)
        if review is None:
            self._not_served()
            return
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.api.requests.append(("POST", url.path, query))
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.api.bodies.append((url.path, body))
        failure = self.api._next_failure()
        if failure is not None:
            self._send_json(failure, status(failure, f"injected failure {failure}"))
            return
        if not isinstance(body, dict):
            self._send_json(400, status(400, "the body is not a JSON object"))
            return
        self._send_json(201, review(body))  # created, as every create answers

    def do_PUT(self) -> None:
        self._not_served()

    def do_PATCH(self) -> None:
        self._not_served()

    def do_DELETE(self) -> None:
        self._not_served()

    def _send_json(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, query: dict[str, str], node: str | None, resource: str = "pods") -> None:
        raw_rv = query.get("resourceVersion", "")
        if raw_rv not in ("", "0") and not raw_rv.isdigit():
            self._send_json(400, status(400, f"invalid resourceVersion {raw_rv!r}"))
            return
        since = int(raw_rv) if raw_rv not in ("", "0") else None
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else 3600.0
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        start, w = self.api._open_watch(node, since, bookmarks, resource)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for event in start:  # what the watch starts with is written at once
                self._chunk(event)
            while w is not None:
                item = self.api._next_event(w, deadline, self.connection)
                if item == "cut":
                    self._cut()
                    return
                if item == "end":
                    break
                assert isinstance(item, dict)
                if self.api.event_delay > 0:  # a slow stream: each live event waits
                    w.cut.wait(min(self.api.event_delay, max(0.0, deadline - time.monotonic())))
                    if w.cut.is_set():
                        self._cut()
                        return
                    if time.monotonic() >= deadline:
                        break  # the event stays unsent: a new watch from the last version gets it
                self._chunk(item)
                w.last_write = time.monotonic()
            self.wfile.write(b"0\r\n\r\n")  # the end of a watch the server closes on purpose
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away
        finally:
            if w is not None:
                self.api._close_watch(w)

    def _chunk(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(event).encode() + b"\n"  # one JSON event per line
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _cut(self) -> None:
        """Half a chunk, then the connection goes: what a dropped connection looks like."""
        self.close_connection = True
        try:
            self.wfile.write(b'80\r\n{"type":"MODIF')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
