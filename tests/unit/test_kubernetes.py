"""monitor.metadata.kubernetes: the node-scoped list+watch, through the real client.

KubernetesSource runs in its thread against tests/fakeapi.py, a local fake of the
API server's pod list and watch, with the official `kubernetes` client in between,
so what is tested is what the client really sends and how the source really reads
what the client makes of the answers. Backoff, workload(), pod_meta() and PodCache
are also tested on their own, without a server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from monitor.identity import PodMeta
from monitor.metadata import kubernetes
from monitor.metadata.kubernetes import MIRROR_ANNOTATION, Backoff, KubernetesSource, PodCache
from tests.fakeapi import FakeApiServer, make_pod

NODE, OTHER_NODE = "node-a", "node-b"
U_WEB, U_DB, U_DNS, U_NEW = (f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5))
U_FAR = "00000000-0000-4000-8000-0000000000ff"  # on the other node
T = TypeVar("T")


def eventually(read: Callable[[], T], expected: T, timeout: float = 5.0) -> T:
    """Poll read() until it returns expected or the deadline passes; returns the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        value = read()
    return value


def web(**kwargs: Any) -> dict[str, Any]:
    return make_pod("web-7d4b9c-x2x2x", "shop", U_WEB, NODE, labels={"app": "web",
                    "pod-template-hash": "7d4b9c"}, owner=("ReplicaSet", "web-7d4b9c"), **kwargs)


def db() -> dict[str, Any]:
    return make_pod("db-0", "shop", U_DB, NODE, labels={"app": "db"}, owner=("StatefulSet", "db"))


def dns() -> dict[str, Any]:
    return make_pod("coredns-abc", "kube-system", U_DNS, NODE)


def far() -> dict[str, Any]:
    return make_pod("far-away", "shop", U_FAR, OTHER_NODE, labels={"app": "web"})


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[dict[str, Any]]]:
    """What the source logs, kept here rather than printed (its thread logs every retry)."""
    with capture_logs() as entries:
        yield entries


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    s = FakeApiServer(node=NODE).start()
    yield s
    s.stop()


SourceFactory = Callable[..., KubernetesSource]


@pytest.fixture
def start_source(server: FakeApiServer, tmp_path: Path) -> Iterator[SourceFactory]:
    """Starts KubernetesSources on the real client pointed at the fake; stops them after."""
    kubeconfig = server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    sources: list[KubernetesSource] = []

    def start(**kwargs: Any) -> KubernetesSource:
        kwargs.setdefault("backoff", Backoff(first=0.01, cap=0.05))
        kwargs.setdefault("watch_seconds", 30)
        kwargs.setdefault("read_timeout", 5.0)
        source = KubernetesSource(kubernetes.api_client(kubeconfig), NODE, **kwargs)
        source.start()
        sources.append(source)
        return source

    yield start
    for source in sources:
        source.stop()
    server.stop()  # ends the open watches: each thread sees its stop flag and returns
    for source in sources:
        assert source._thread is not None
        source._thread.join(timeout=5)
        assert not source._thread.is_alive()


def synced(source: KubernetesSource, server: FakeApiServer) -> None:
    """Wait until the source has seen every event so far: a bookmark is the barrier.

    Events reach a watch in order, so once the source's resourceVersion is the
    server's current one (a bookmark carries it), everything before it is applied.
    """
    assert source.synced.wait(5)
    assert eventually(lambda: server.open_watches, 1) == 1
    server.bookmark()
    assert eventually(lambda: source.resource_version, server.resource_version) == (
        server.resource_version)


def meta(source: KubernetesSource, uid: str) -> PodMeta | None:
    return source.cache.get(uid)


# -- list, then watch -----------------------------------------------------------------------------

def test_initial_list(server: FakeApiServer, start_source: SourceFactory) -> None:
    server.add(web())
    server.add(db())
    server.add(far())
    server.add(dns())
    source = start_source(label_allow=["app"])
    assert source.synced.wait(5)
    assert source.cache.uids() == {U_WEB, U_DB, U_DNS}
    assert meta(source, U_WEB) == PodMeta("shop", "web-7d4b9c-x2x2x", uid=U_WEB,
                                          labels=(("app", "web"),), workload="web",
                                          workload_kind="Deployment")
    assert meta(source, U_DB) == PodMeta("shop", "db-0", uid=U_DB, labels=(("app", "db"),),
                                         workload="db", workload_kind="StatefulSet")
    assert meta(source, U_DNS) == PodMeta("kube-system", "coredns-abc", uid=U_DNS)
    assert source.lists == 1
    assert source.resource_version == server.resource_version == "104"
    assert eventually(lambda: source.watches, 1) == 1
    assert source.errors == 0
    assert source.stats() == {"synced": 1.0, "list": 1, "watch": 1, "error": 0}


def test_adds_updates_and_deletes_after_the_list(server: FakeApiServer,
                                                 start_source: SourceFactory) -> None:
    server.add(web())
    server.add(db())
    source = start_source(label_allow=["app", "tier"])
    synced(source, server)

    server.add(dns())
    changed = db()
    changed["metadata"]["labels"] = {"app": "db", "tier": "storage"}
    server.update(changed)
    server.delete("shop", "web-7d4b9c-x2x2x")

    assert eventually(source.cache.uids, {U_DB, U_DNS}) == {U_DB, U_DNS}
    assert eventually(lambda: meta(source, U_DB), PodMeta(
        "shop", "db-0", uid=U_DB, labels=(("app", "db"), ("tier", "storage")), workload="db",
        workload_kind="StatefulSet")) == PodMeta(
        "shop", "db-0", uid=U_DB, labels=(("app", "db"), ("tier", "storage")), workload="db",
        workload_kind="StatefulSet")
    assert meta(source, U_WEB) is None
    assert source.resource_version == server.resource_version == "105"
    assert (source.lists, source.errors) == (1, 0)


def test_a_pod_of_another_node_is_never_seen(server: FakeApiServer,
                                             start_source: SourceFactory) -> None:
    ever: set[str] = set()
    holder: list[KubernetesSource] = []
    server.add(far())
    source = start_source(on_change=lambda: ever.update(holder[0].cache.uids()) if holder else None)
    holder.append(source)
    synced(source, server)
    moved = far()
    moved["metadata"]["labels"] = {"app": "moved"}
    server.update(moved)
    server.add(make_pod("far-2", "shop", "far-2-uid", OTHER_NODE))
    server.delete("shop", "far-away")
    server.add(db())  # after the others: once it is in, they have all gone by
    assert eventually(source.cache.uids, {U_DB}) == {U_DB}
    synced(source, server)
    assert ever == {U_DB}
    assert meta(source, U_FAR) is None


def test_a_pod_bound_to_this_node_arrives_and_one_leaving_it_goes(server: FakeApiServer,
                                                                  start_source: SourceFactory) -> None:
    pending = make_pod("batch-1", "jobs", U_NEW, "")  # not scheduled yet: spec.nodeName empty
    server.add(pending)
    server.add(db())
    source = start_source()
    synced(source, server)
    assert source.cache.uids() == {U_DB}
    pending["spec"]["nodeName"] = NODE  # bound: the filtered watch sends ADDED
    server.update(pending)
    assert eventually(source.cache.uids, {U_DB, U_NEW}) == {U_DB, U_NEW}
    gone = db()
    gone["spec"]["nodeName"] = OTHER_NODE  # no longer matches: the watch sends DELETED
    server.update(gone)
    assert eventually(source.cache.uids, {U_NEW}) == {U_NEW}
    assert source.lists == 1


def test_bookmarks_move_the_resource_version_and_nothing_else(server: FakeApiServer,
                                                              start_source: SourceFactory) -> None:
    changes: list[int] = []
    server.add(web())
    source = start_source(on_change=lambda: changes.append(1))
    synced(source, server)
    before = source.resource_version
    assert changes == [1]  # the list

    server.add(far())  # another node's pod: the version moves on, this watch sees nothing
    time.sleep(0.2)
    assert source.resource_version == before == "101"
    server.bookmark()
    assert eventually(lambda: source.resource_version, "102") == "102"
    assert server.resource_version == "102"
    assert source.cache.uids() == {U_WEB}
    assert changes == [1]  # no on_change for a bookmark
    assert (source.lists, source.errors) == (1, 0)
    assert len(server.list_requests()) == 1


def test_periodic_bookmarks(server: FakeApiServer, start_source: SourceFactory) -> None:
    server.bookmark_interval = 0.05
    source = start_source()
    assert source.synced.wait(5)
    assert source.resource_version == "100"
    server.add(far())
    server.add(make_pod("far-2", "shop", "u-far-2", OTHER_NODE))
    assert eventually(lambda: source.resource_version, "102") == "102"
    assert (source.lists, source.cache.uids()) == (1, set())


def test_watch_timeout_rewatches_from_the_last_version_without_a_relist(
        server: FakeApiServer, start_source: SourceFactory) -> None:
    server.add(web())
    source = start_source(watch_seconds=1)
    assert source.synced.wait(5)
    assert eventually(lambda: source.watches >= 2, True, timeout=5) is True  # the server ended one
    server.add(db())
    assert eventually(source.cache.uids, {U_WEB, U_DB}) == {U_WEB, U_DB}
    assert (source.lists, source.errors) == (1, 0)  # a watch the server ends is no error
    watches = server.watch_requests()
    assert [q["resourceVersion"] for q in watches[:2]] == ["101", "101"]
    assert {q["timeoutSeconds"] for q in watches} == {"1"}


# -- 410 Gone, dropped and slow streams, server errors ------------------------------------------

def test_expired_version_is_answered_by_exactly_one_relist(server: FakeApiServer,
                                                           start_source: SourceFactory) -> None:
    server.add(web())
    server.add(db())
    server.add(dns())
    source = start_source(label_allow=["app"])
    synced(source, server)
    assert source.lists == 1
    seen = source.resource_version

    server.event_delay = 30  # the open watch holds the next events back...
    server.delete("shop", "web-7d4b9c-x2x2x")  # ...a delete the source must still notice
    server.add(make_pod("new-1", "shop", U_NEW, NODE, labels={"app": "new"}))
    changed = db()
    changed["metadata"]["labels"] = {"app": "db-v2"}
    server.update(changed)
    server.compact()  # ...and the log no longer reaches back to what the source has seen
    server.drop_streams()
    server.event_delay = 0

    assert eventually(source.cache.uids, {U_DB, U_DNS, U_NEW}) == {U_DB, U_DNS, U_NEW}
    assert meta(source, U_DB) == PodMeta("shop", "db-0", uid=U_DB, labels=(("app", "db-v2"),),
                                         workload="db", workload_kind="StatefulSet")
    assert meta(source, U_NEW) == PodMeta("shop", "new-1", uid=U_NEW, labels=(("app", "new"),))
    assert source.lists == 2
    assert source.resource_version == server.resource_version
    synced(source, server)
    assert source.lists == 2  # exactly one relist
    assert source.errors == 1  # the dropped stream; the 410 itself is no error
    # list, watch from `seen`, (drop) watch from `seen` -> 410, list, watch from the new list
    assert [("watch" in q, q.get("resourceVersion")) for q in
            [q for _m, _p, q in server.requests]][:5] == [
        (False, None), (True, seen), (True, seen), (False, None), (True, "106")]


def test_http_410_on_a_watch_request_also_relists(server: FakeApiServer,
                                                  start_source: SourceFactory) -> None:
    server.add(web())
    source = start_source()
    synced(source, server)
    server.fail_next(1, status=410)  # some API servers answer the request itself with 410
    server.drop_streams()
    server.add(db())
    assert eventually(source.cache.uids, {U_WEB, U_DB}) == {U_WEB, U_DB}
    assert eventually(lambda: source.lists, 2) == 2
    assert source.errors == 1  # the drop


def test_dropped_stream_rewatches_from_the_last_version(server: FakeApiServer, start_source: SourceFactory,
                                                        logs: list[dict[str, Any]]) -> None:
    server.add(web())
    server.add(db())
    source = start_source()
    synced(source, server)
    seen = source.resource_version
    watches_before = len(server.watch_requests())

    server.event_delay = 30  # these happen while the stream delivers nothing
    server.delete("shop", "db-0")
    server.add(dns())
    server.add(make_pod("new-1", "shop", U_NEW, NODE))
    server.drop_streams()
    server.event_delay = 0

    assert eventually(source.cache.uids, {U_WEB, U_DNS, U_NEW}) == {U_WEB, U_DNS, U_NEW}
    assert source.lists == 1  # no relist
    assert source.errors == 1  # the broken stream
    (failed,) = [e for e in logs if e["event"] == "kubernetes api call failed"]
    assert (failed["log_level"], failed["status"]) == ("warning", None)
    assert failed["error"].startswith("ProtocolError: ")
    rewatch = server.watch_requests()[watches_before]
    assert rewatch["resourceVersion"] == seen
    assert source.resource_version == server.resource_version


def test_slow_stream_still_converges(server: FakeApiServer, start_source: SourceFactory) -> None:
    server.add(web())
    source = start_source(read_timeout=0.3)
    synced(source, server)
    server.event_delay = 0.8  # longer than the read timeout: the client gives up on the stream
    server.add(db())
    server.delete("shop", "web-7d4b9c-x2x2x")
    assert eventually(source.cache.uids, {U_DB}) == {U_DB}
    assert source.lists == 1
    assert source.errors == 0  # a read timeout is an ordinary end of a watch, not an error
    assert source.watches >= 2  # ... and the client watched again from where it was
    assert all(q["resourceVersion"] in {"101", "102", "103"} for q in server.watch_requests())


class RecordingBackoff(Backoff):
    def __init__(self) -> None:
        super().__init__(first=0.01, cap=0.05, rand=lambda: 1.0)  # no jitter: the full delay
        self.delays: list[float] = []
        self.resets = 0

    def next(self) -> float:
        delay = super().next()
        self.delays.append(delay)
        return delay

    def reset(self) -> None:
        self.resets += 1
        super().reset()


def test_server_errors_are_retried_with_backoff(server: FakeApiServer,
                                                start_source: SourceFactory) -> None:
    server.add(web())
    server.fail_next(4, status=500)
    backoff = RecordingBackoff()
    source = start_source(backoff=backoff)
    assert eventually(source.cache.uids, {U_WEB}) == {U_WEB}
    assert source.errors == 4
    assert backoff.delays == [0.01, 0.02, 0.04, 0.05]  # doubling, capped
    assert source.lists == 1
    assert len(server.list_requests()) == 5  # four failed, one answered


def test_errors_on_rewatch_back_off_and_keep_the_version(server: FakeApiServer,
                                                         start_source: SourceFactory) -> None:
    server.add(web())
    backoff = RecordingBackoff()
    source = start_source(backoff=backoff)
    synced(source, server)
    seen = source.resource_version
    watches_before = len(server.watch_requests())
    server.fail_next(2, status=503)
    server.drop_streams()
    server.add(db())
    assert eventually(source.cache.uids, {U_WEB, U_DB}) == {U_WEB, U_DB}
    assert source.errors == 3  # the drop and two 503s
    assert backoff.delays == [0.01, 0.02, 0.04]
    assert source.lists == 1
    assert [q["resourceVersion"] for q in server.watch_requests()[watches_before:][:3]] == [seen] * 3


def test_a_watch_the_server_ends_resets_the_backoff(server: FakeApiServer,
                                                    start_source: SourceFactory) -> None:
    backoff = RecordingBackoff()
    server.fail_next(3)
    source = start_source(backoff=backoff, watch_seconds=1)
    assert source.synced.wait(5)
    assert backoff.delays == [0.01, 0.02, 0.04]
    assert eventually(lambda: backoff.resets >= 1, True) is True  # the first watch ended at 1 s
    server.fail_next(2)  # the watch after the next one the server ends
    assert eventually(lambda: len(backoff.delays), 5) == 5
    assert backoff.delays == [0.01, 0.02, 0.04, 0.01, 0.02]
    assert (source.errors, source.lists) == (5, 1)


# -- on_change, malformed objects -----------------------------------------------------------------

def test_on_change_when_the_cache_changes_and_not_for_bookmarks(server: FakeApiServer,
                                                                start_source: SourceFactory) -> None:
    changes: list[int] = []
    server.add(web())
    source = start_source(label_allow=["app"], on_change=lambda: changes.append(1))
    synced(source, server)
    assert len(changes) == 1  # the list

    server.add(db())
    synced(source, server)
    assert len(changes) == 2

    same = db()  # a change the cache does not keep: an annotation, a label not allowed
    same["metadata"]["annotations"] = {"note": "x"}
    same["metadata"]["labels"] = {"app": "db", "team": "storage"}
    server.update(same)
    server.add(far())
    synced(source, server)  # a bookmark, too
    assert len(changes) == 2

    server.delete("shop", "db-0")
    synced(source, server)
    assert len(changes) == 3
    server.delete("shop", "far-away")  # not ours
    synced(source, server)
    assert len(changes) == 3


def test_malformed_objects_are_rejected_without_breaking_the_watch(
        server: FakeApiServer, start_source: SourceFactory) -> None:
    no_uid = make_pod("no-uid", "shop", "", NODE)
    del no_uid["metadata"]["uid"]
    server.add(no_uid)
    source = start_source()
    assert source.synced.wait(5)
    assert source.cache.rejected == 1  # in the list

    no_namespace = make_pod("no-namespace", "", "uid-no-ns", NODE)
    no_name = make_pod("", "shop", "uid-no-name", NODE)
    empty_uid = make_pod("empty-uid", "shop", "", NODE)
    for pod in (no_namespace, no_name, empty_uid):
        server.add(pod)
    server.add(web())
    assert eventually(source.cache.uids, {U_WEB}) == {U_WEB}
    assert source.cache.rejected == 4
    assert source.errors == 0
    assert source.lists == 1
    assert source.resource_version == server.resource_version  # rejected events move it too


def test_an_object_the_client_model_rejects_does_not_wedge_the_watch(
        server: FakeApiServer, start_source: SourceFactory, logs: list[dict[str, Any]]) -> None:
    source = start_source()
    synced(source, server)
    odd = make_pod("odd", "shop", "uid-odd", NODE,
                   owner=[{"kind": "ReplicaSet", "name": "odd-rs"}])  # no apiVersion, no uid
    server.add(odd)
    server.add(web())
    converged = eventually(source.cache.uids, {"uid-odd", U_WEB}, timeout=3)
    assert [e for e in logs if "ValidationError" in e.get("error", "")] == []  # says why, again and again
    assert converged == {"uid-odd", U_WEB}


def test_the_list_accepts_what_the_client_model_would_reject(server: FakeApiServer,
                                                              start_source: SourceFactory) -> None:
    server.add(make_pod("odd", "shop", "uid-odd", NODE, owner=[{"kind": "ReplicaSet", "name": "odd-rs"}]))
    source = start_source()
    assert source.synced.wait(5)
    assert meta(source, "uid-odd") == PodMeta("shop", "odd", uid="uid-odd", workload="odd-rs",
                                              workload_kind="ReplicaSet")


# -- static pods, workloads, labels ----------------------------------------------------------------

STATIC_HASH = "8e9b4d6c2a1f0e3d5c7b9a8f6e4d2c1b"
U_MIRROR = "11111111-2222-4333-8444-555555555555"


def mirror_pod(name: str = f"kube-proxy-{NODE}") -> dict[str, Any]:
    return make_pod(name, "kube-system", U_MIRROR, NODE, labels={"k8s-app": "kube-proxy"},
                    owner=("Node", NODE),
                    annotations={MIRROR_ANNOTATION: STATIC_HASH, "kubernetes.io/config.hash": STATIC_HASH,
                                 "kubernetes.io/config.source": "file"})


MIRROR_META = PodMeta("kube-system", f"kube-proxy-{NODE}", uid=U_MIRROR, workload=NODE,
                      workload_kind="Node")


def test_static_pod_found_by_its_config_hash_and_its_mirror_uid(server: FakeApiServer,
                                                                start_source: SourceFactory) -> None:
    server.add(mirror_pod())
    source = start_source()
    assert source.synced.wait(5)
    assert meta(source, STATIC_HASH) == MIRROR_META  # the UID in the pod's cgroup path
    assert meta(source, U_MIRROR) == MIRROR_META
    assert source.lookup(STATIC_HASH, []) == MIRROR_META
    assert source.cache.uids() == {U_MIRROR}

    server.delete("kube-system", f"kube-proxy-{NODE}")
    assert eventually(lambda: meta(source, STATIC_HASH), None) is None
    assert meta(source, U_MIRROR) is None


def test_static_pod_added_by_the_watch(server: FakeApiServer, start_source: SourceFactory) -> None:
    source = start_source()
    synced(source, server)
    server.add(mirror_pod())
    assert eventually(lambda: meta(source, STATIC_HASH), MIRROR_META) == MIRROR_META
    assert meta(source, U_MIRROR) == MIRROR_META


def test_workloads_through_the_api(server: FakeApiServer, start_source: SourceFactory) -> None:
    pods = {
        "u-deploy": (("ReplicaSet", "shop-web-5f6d8c9b7"), {"pod-template-hash": "5f6d8c9b7"}),
        "u-rs-other-hash": (("ReplicaSet", "legacy-rs"), {"pod-template-hash": "abc123"}),
        "u-rs-no-label": (("ReplicaSet", "plain-rs-x1"), {}),
        "u-sts": (("StatefulSet", "db"), {}),
        "u-ds": (("DaemonSet", "node-exporter"), {}),
        "u-job": (("Job", "backup-28547"), {}),
        "u-static": (("Node", NODE), {}),
        "u-bare": (None, {}),
    }
    for uid, (owner, labels) in pods.items():
        server.add(make_pod(f"pod-{uid}", "shop", uid, NODE, labels=labels, owner=owner))
    source = start_source()
    assert source.synced.wait(5)
    got = {uid: (m.workload, m.workload_kind) for uid in pods if (m := meta(source, uid))}
    assert got == {
        "u-deploy": ("shop-web", "Deployment"),
        "u-rs-other-hash": ("legacy-rs", "ReplicaSet"),
        "u-rs-no-label": ("plain-rs-x1", "ReplicaSet"),
        "u-sts": ("db", "StatefulSet"),
        "u-ds": ("node-exporter", "DaemonSet"),
        "u-job": ("backup-28547", "Job"),
        "u-static": (NODE, "Node"),
        "u-bare": ("", ""),
    }


def test_label_allow_list(server: FakeApiServer, start_source: SourceFactory) -> None:
    labels = {"app": "web", "app.kubernetes.io/name": "shop-web", "pod-template-hash": "7d4b9c",
              "team": "payments"}
    server.add(make_pod("web-1", "shop", U_WEB, NODE, labels=labels))
    allowing = start_source(label_allow=["team", "app.kubernetes.io/name", "absent"])
    nothing = start_source()
    assert allowing.synced.wait(5)
    assert nothing.synced.wait(5)
    server.add(make_pod("web-2", "shop", U_NEW, NODE, labels=labels))
    expected = (("app.kubernetes.io/name", "shop-web"), ("team", "payments"))
    assert eventually(lambda: (m := meta(allowing, U_NEW)) and m.labels, expected) == expected
    held = meta(allowing, U_WEB)
    assert held is not None
    assert held.labels == expected
    none_kept = meta(nothing, U_WEB)
    assert none_kept is not None
    assert none_kept.labels == ()


# -- what the client asks the API server for -------------------------------------------------------

def test_only_node_scoped_list_and_watch_requests(server: FakeApiServer,
                                                  start_source: SourceFactory) -> None:
    server.add(web())
    server.add(far())
    source = start_source(watch_seconds=7)
    synced(source, server)
    server.add(db())
    server.delete("shop", "web-7d4b9c-x2x2x")
    server.drop_streams()
    server.add(dns())
    assert eventually(source.cache.uids, {U_DB, U_DNS}) == {U_DB, U_DNS}
    synced(source, server)

    requests = list(server.requests)
    assert len(requests) >= 3
    assert {(method, path) for method, path, _q in requests} == {("GET", "/api/v1/pods")}
    assert all(q["fieldSelector"] == f"spec.nodeName={NODE}" for _m, _p, q in requests)
    lists = server.list_requests()
    watches = server.watch_requests()
    assert len(lists) == 1
    assert lists[0] == {"fieldSelector": f"spec.nodeName={NODE}"}
    assert len(watches) == len(requests) - 1 == source.watches
    for q in watches:
        assert q.keys() == {"watch", "fieldSelector", "resourceVersion", "allowWatchBookmarks",
                            "timeoutSeconds"}
        assert (q["watch"], q["allowWatchBookmarks"], q["timeoutSeconds"]) == ("true", "true", "7")
        assert q["resourceVersion"].isdigit()


def test_source_interface(server: FakeApiServer, start_source: SourceFactory) -> None:
    server.add(web())
    source = start_source()
    assert source.synced.wait(5)
    assert source.lookup(None, ["/run/netns/cni-1"]) is None  # by UID only
    assert source.lookup("", []) is None
    assert source.lookup(U_WEB, []) == meta(source, U_WEB)
    assert source.lookup("no-such-uid", []) is None
    assert source.refresh() is None


def test_api_client_reads_the_kubeconfig(server: FakeApiServer, tmp_path: Path) -> None:
    api = kubernetes.api_client(server.write_kubeconfig(str(tmp_path / "kc")))
    assert api.api_client.configuration.host == server.url
    server.add(web())
    pods = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert [p.metadata.uid for p in pods.items] == [U_WEB]
    assert pods.metadata.resource_version == "101"


def test_api_client_without_kubeconfig_outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    from kubernetes.config.config_exception import ConfigException

    with pytest.raises(ConfigException):
        kubernetes.api_client("")


# -- the fake itself: what the tests above rely on -----------------------------------------------

def test_fake_rejects_other_field_selectors(server: FakeApiServer, tmp_path: Path) -> None:
    from kubernetes.client.exceptions import ApiException

    api = kubernetes.api_client(server.write_kubeconfig(str(tmp_path / "kc")))
    with pytest.raises(ApiException) as info:
        api.list_pod_for_all_namespaces(field_selector="status.phase=Running")
    assert info.value.status == 400
    server.add(far())
    assert [p.metadata.uid for p in api.list_pod_for_all_namespaces().items] == [U_FAR]


def test_fake_watch_from_a_compacted_version_is_expired(server: FakeApiServer, tmp_path: Path) -> None:
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    api = kubernetes.api_client(server.write_kubeconfig(str(tmp_path / "kc")))
    server.add(web())
    server.add(db())
    server.compact()
    with pytest.raises(ApiException) as info:
        list(watch.Watch().stream(api.list_pod_for_all_namespaces, resource_version="101",
                                  timeout_seconds=1))
    assert info.value.status == 410
    assert "too old resource version: 101 (102)" in str(info.value)
    events = list(watch.Watch().stream(api.list_pod_for_all_namespaces, timeout_seconds=1))
    assert [(e["type"], e["raw_object"]["metadata"]["uid"]) for e in events] == [
        ("ADDED", U_WEB), ("ADDED", U_DB)]


# -- Backoff ------------------------------------------------------------------------------------------

def test_backoff_doubles_up_to_the_cap() -> None:
    full = Backoff(first=0.5, cap=30.0, rand=lambda: 1.0)
    assert [full.next() for _ in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    half = Backoff(first=0.5, cap=30.0, rand=lambda: 0.0)
    assert [half.next() for _ in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]


def test_backoff_jitter_stays_within_half_and_all_of_the_delay() -> None:
    values = iter([0.0, 0.25, 0.5, 0.999, 0.1])
    b = Backoff(first=1.0, cap=8.0, rand=lambda: next(values))
    assert [b.next() for _ in range(5)] == pytest.approx([0.5, 1.25, 3.0, 7.996, 4.4])


def test_backoff_reset() -> None:
    b = Backoff(first=0.5, cap=30.0, rand=lambda: 1.0)
    for _ in range(5):
        b.next()
    b.reset()
    assert [b.next(), b.next()] == [0.5, 1.0]


def test_backoff_defaults() -> None:
    b = Backoff(rand=lambda: 1.0)
    assert [b.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_backoff_survives_a_long_outage() -> None:
    b = Backoff(first=0.5, cap=30.0, rand=lambda: 1.0)
    delays = [b.next() for _ in range(1100)]
    assert delays[-1] == 30.0


class DownApi:
    """An API whose every call fails, as during an outage; stops the source after `calls`."""

    def __init__(self, calls: int) -> None:
        self.calls, self.limit = 0, calls
        self.source: KubernetesSource | None = None

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls >= self.limit and self.source is not None:
            self.source.stop()
        raise ConnectionRefusedError(111, "Connection refused")


def test_source_keeps_trying_while_the_api_is_down() -> None:
    api = DownApi(calls=5)
    source = KubernetesSource(api, NODE, backoff=Backoff(first=0.001, cap=0.002))
    api.source = source
    source.run()  # returns once stopped
    assert (api.calls, source.errors, source.lists) == (5, 5, 0)
    assert not source.synced.is_set()


def test_source_thread_survives_a_long_outage() -> None:
    backoff = Backoff(first=0.001, cap=0.002)
    for _ in range(1024):  # the outage so far
        backoff.next()
    api = DownApi(calls=3)
    source = KubernetesSource(api, NODE, backoff=backoff)
    api.source = source
    source.run()
    assert source.errors == 3


# -- workload() and pod_meta() ----------------------------------------------------------------------

def owned(*refs: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"ownerReferences": list(refs), "labels": labels or {}}}


@pytest.mark.parametrize(("pod", "expected"), [
    pytest.param(owned({"kind": "ReplicaSet", "name": "web-7d4b9c", "controller": True},
                       labels={"pod-template-hash": "7d4b9c"}), ("web", "Deployment"), id="deployment"),
    pytest.param(owned({"kind": "ReplicaSet", "name": "my-app-v2-7d4b9c", "controller": True},
                       labels={"pod-template-hash": "7d4b9c"}), ("my-app-v2", "Deployment"),
                 id="deployment-name-with-dashes"),
    pytest.param(owned({"kind": "ReplicaSet", "name": "web-7d4b9c", "controller": True},
                       labels={"pod-template-hash": "other"}), ("web-7d4b9c", "ReplicaSet"),
                 id="rs-hash-mismatch"),
    pytest.param(owned({"kind": "ReplicaSet", "name": "web-7d4b9c", "controller": True}),
                 ("web-7d4b9c", "ReplicaSet"), id="rs-no-hash-label"),
    pytest.param(owned({"kind": "ReplicaSet", "name": "web7d4b9c", "controller": True},
                       labels={"pod-template-hash": "7d4b9c"}), ("web7d4b9c", "ReplicaSet"),
                 id="rs-hash-without-dash"),
    pytest.param(owned({"kind": "StatefulSet", "name": "db", "controller": True}), ("db", "StatefulSet"),
                 id="statefulset"),
    pytest.param(owned({"kind": "DaemonSet", "name": "agent", "controller": True}), ("agent", "DaemonSet"),
                 id="daemonset"),
    pytest.param(owned({"kind": "Job", "name": "backup-28547", "controller": True}),
                 ("backup-28547", "Job"), id="job"),
    pytest.param(owned({"kind": "Node", "name": "node-a", "controller": True}), ("node-a", "Node"),
                 id="static-pod"),
    pytest.param({"metadata": {}}, ("", ""), id="no-owner"),
    pytest.param({}, ("", ""), id="no-metadata"),
    pytest.param(owned({"kind": "ConfigMap", "name": "cm"}, {"kind": "Job", "name": "j", "controller": True}),
                 ("j", "Job"), id="controller-wins"),
    pytest.param(owned({"kind": "Foo", "name": "first"}, {"kind": "Bar", "name": "second"}),
                 ("first", "Foo"), id="no-controller-first-ref"),
    pytest.param(owned({"kind": "Job"}), ("", ""), id="owner-without-name"),
    pytest.param(owned({"name": "x", "controller": True}), ("x", ""), id="owner-without-kind"),
    pytest.param({"metadata": {"ownerReferences": ["junk", {"kind": "Job", "name": "j"}]}}, ("j", "Job"),
                 id="non-dict-ref-skipped"),
])
def test_workload(pod: dict[str, Any], expected: tuple[str, str]) -> None:
    assert kubernetes.workload(pod) == expected


def api_pod(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"uid": "u1", "namespace": "shop", "name": "web", **meta}}


def test_pod_meta() -> None:
    pod = api_pod(labels={"app": "web", "tier": 1, "team": "x"},
                  ownerReferences=[{"kind": "StatefulSet", "name": "web", "controller": True}])
    assert kubernetes.pod_meta(pod, ["tier", "app", "nope"]) == PodMeta(
        "shop", "web", uid="u1", labels=(("app", "web"), ("tier", "1")), workload="web",
        workload_kind="StatefulSet")
    assert kubernetes.pod_meta(pod, []) == PodMeta("shop", "web", uid="u1", workload="web",
                                                   workload_kind="StatefulSet")


@pytest.mark.parametrize("pod", [
    pytest.param({}, id="no-metadata"),
    pytest.param({"metadata": None}, id="metadata-null"),
    pytest.param({"metadata": "x"}, id="metadata-str"),
    pytest.param({"metadata": {"namespace": "shop", "name": "web"}}, id="no-uid"),
    pytest.param(api_pod(uid=""), id="empty-uid"),
    pytest.param(api_pod(uid=7), id="int-uid"),
    pytest.param(api_pod(namespace=None), id="null-namespace"),
    pytest.param(api_pod(name=""), id="empty-name"),
])
def test_pod_meta_rejects(pod: dict[str, Any]) -> None:
    assert kubernetes.pod_meta(pod, ["app"]) is None


def test_pod_meta_tolerates_odd_labels() -> None:
    assert kubernetes.pod_meta(api_pod(labels=["app=web"]), ["app"]) == PodMeta("shop", "web", uid="u1")
    assert kubernetes.pod_meta(api_pod(labels=None), ["app"]) == PodMeta("shop", "web", uid="u1")


# -- PodCache on its own -----------------------------------------------------------------------------

def test_pod_cache_apply_reports_changes() -> None:
    cache = PodCache(["app"])
    pod = make_pod("web", "shop", "u1", NODE, labels={"app": "web"})
    assert cache.apply("ADDED", pod) is True
    assert cache.apply("ADDED", pod) is False  # the same again
    assert cache.apply("MODIFIED", make_pod("web", "shop", "u1", NODE, labels={"app": "web",
                                                                              "x": "y"})) is False
    assert cache.apply("MODIFIED", make_pod("web", "shop", "u1", NODE, labels={"app": "v2"})) is True
    assert cache.get("u1") == PodMeta("shop", "web", uid="u1", labels=(("app", "v2"),))
    assert cache.apply("DELETED", pod) is True
    assert cache.apply("DELETED", pod) is False
    assert cache.uids() == set()
    assert cache.apply("ADDED", {"metadata": {"name": "x"}}) is False
    assert cache.rejected == 1


def test_pod_cache_replace_forgets_what_the_list_lacks() -> None:
    cache = PodCache()
    cache.apply("ADDED", make_pod("a", "shop", "ua", NODE))
    cache.apply("ADDED", mirror_pod())
    cache.replace([make_pod("b", "shop", "ub", NODE), {"metadata": {}}])
    assert cache.uids() == {"ub"}
    assert cache.get(STATIC_HASH) is None
    assert cache.rejected == 1


def test_pod_cache_mirror_of_a_recreated_mirror_pod() -> None:
    cache = PodCache()
    old = mirror_pod()
    cache.apply("ADDED", old)
    new = mirror_pod()
    new["metadata"]["uid"] = "mirror-2"
    cache.apply("ADDED", new)  # the kubelet recreated the mirror pod before the delete arrived
    cache.apply("DELETED", old)
    got = cache.get(STATIC_HASH)
    assert got is not None
    assert got.uid == "mirror-2"


def test_pod_cache_is_safe_across_threads() -> None:
    cache = PodCache()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                cache.get("u5")
                cache.uids()
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(2000):
        cache.apply("ADDED", make_pod(f"p{i}", "shop", f"u{i}", NODE))
        if i % 100 == 0:
            cache.replace([])
    stop.set()
    t.join()
    assert errors == []
    assert len(cache.uids()) == 99
