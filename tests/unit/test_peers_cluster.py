"""monitor.peers.cluster: the cluster-wide address index, through the real client.

ClusterIndex runs its two threads against tests/fakeapi.py with the official
`kubernetes` client in between, as tests/unit/test_kubernetes.py runs the node's
pod source: paginated lists (small pages, so every list has several), watches,
bookmarks, 410s, dropped streams. What each address should resolve to is written
out in each test. The fake's own pagination and services are tested at the end.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from monitor.metadata import kubernetes
from monitor.metadata.reflector import Backoff
from monitor.peers.cluster import ClusterIndex
from monitor.peers.identity import Peer
from tests.fakeapi import PODS_PATH, SERVICES_PATH, FakeApiServer, make_pod, make_service

T = TypeVar("T")
RS = ("ReplicaSet", "web-7d4b9c")
WEB = Peer("pod", "shop", "web")
EARLY, LATER, LATEST = "2024-05-01T10:00:00Z", "2024-05-01T10:05:00Z", "2024-05-01T10:09:00Z"


def eventually(read: Callable[[], T], expected: T, timeout: float = 5.0) -> T:
    """Poll read() until it returns expected or the deadline passes; returns the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        value = read()
    return value


def key(text: str) -> bytes:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return socket.inet_pton(family, text)


def peer(index: ClusterIndex, text: str) -> Peer | None:
    return index.lookup(key(text))


def peers(index: ClusterIndex, *texts: str) -> dict[str, Peer | None]:
    return {t: peer(index, t) for t in texts}


def pod(name: str, ip: str | None, *, namespace: str = "shop", node: str = "node-a",
        host_ip: str = "192.168.0.1", **kwargs: Any) -> dict[str, Any]:
    """A pod with one IP (or none yet) and its node's address; UID from the name."""
    kwargs.setdefault("owner", RS if name.startswith("web-") else None)
    labels = {"pod-template-hash": "7d4b9c"} if name.startswith("web-") else None
    return make_pod(name, namespace, f"uid-{namespace}-{name}", node, labels,
                    kwargs.pop("owner"), pod_ips=[ip] if ip else [], host_ips=[host_ip],
                    **kwargs)


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as entries:
        yield entries


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    s = FakeApiServer(node="node-a").start()
    yield s
    s.stop()


@pytest.fixture
def api(server: FakeApiServer, tmp_path: Path) -> Any:
    return kubernetes.api_client(server.write_kubeconfig(str(tmp_path / "kubeconfig")))


IndexFactory = Callable[..., ClusterIndex]


@pytest.fixture
def start_index(server: FakeApiServer, api: Any) -> Iterator[IndexFactory]:
    """Starts ClusterIndexes (pages of 3 unless told) on the real client; stops them after."""
    started: list[ClusterIndex] = []

    def start(client: Any = None, **kwargs: Any) -> ClusterIndex:
        kwargs.setdefault("page_size", 3)
        kwargs.setdefault("backoff", lambda: Backoff(first=0.01, cap=0.05))
        kwargs.setdefault("watch_seconds", 30)
        kwargs.setdefault("read_timeout", 5.0)
        index = ClusterIndex(client if client is not None else api, **kwargs)
        index.start()
        started.append(index)
        return index

    yield start
    for index in started:
        index.stop()
    server.stop()  # ends the open watches: each thread sees its stop flag and returns
    for index in started:
        assert index.join(timeout=5)


def caught_up(index: ClusterIndex, server: FakeApiServer) -> None:
    """Wait until both watches have applied every change so far (a bookmark is the barrier)."""
    assert index.synced.wait(5)
    assert eventually(lambda: server.open_watches, 2) == 2
    server.bookmark()
    for resource in ("pods", "services"):
        reflector = index.reflector(resource)
        assert eventually(lambda r=reflector: r.resource_version,  # type: ignore[misc]
                          server.resource_version) == server.resource_version


# -- list in pages, then watch ---------------------------------------------------------------------

def test_lists_in_pages_and_resolves_every_kind(server: FakeApiServer, start_index: IndexFactory,
                                                logs: list[dict[str, Any]]) -> None:
    for i in range(1, 9):  # 8 web pods on two nodes
        node, host = ("node-a", "192.168.0.1") if i % 2 else ("node-b", "192.168.0.2")
        server.add(pod(f"web-7d4b9c-{i:05d}", f"10.244.0.{i}", node=node, host_ip=host))
    server.add(pod("db-0", "10.244.1.1", owner=("StatefulSet", "db")))
    server.add(pod("lone", "10.244.1.2", namespace="tools"))  # no controller: its own workload
    server.add(pod("pending", None, phase="Pending"))  # no IP yet: claims only its host
    server.add_service(make_service("web", "shop", "10.96.0.20"))
    server.add_service(make_service("db", "shop", "None"))  # headless: no address
    server.add_service(make_service("kube-dns", "kube-system", "10.96.0.10"))
    index = start_index()
    assert index.synced.wait(5)

    assert peers(index, "10.244.0.1", "10.244.0.8", "10.244.1.1", "10.244.1.2", "10.96.0.20",
                 "10.96.0.10", "192.168.0.1", "192.168.0.2", "10.244.9.9") == {
        "10.244.0.1": WEB, "10.244.0.8": WEB, "10.244.1.1": Peer("pod", "shop", "db"),
        "10.244.1.2": Peer("pod", "tools", "lone"), "10.96.0.20": Peer("service", "shop", "web"),
        "10.96.0.10": Peer("service", "kube-system", "kube-dns"),
        "192.168.0.1": Peer("node", "", "node-a"), "192.168.0.2": Peer("node", "", "node-b"),
        "10.244.9.9": None}
    assert peer(index, "10.244.0.1") is peer(index, "10.244.0.3")  # one Peer per workload

    # 11 pods in pages of 3: four requests, each page asked for from where the last ended
    lists = server.list_requests(PODS_PATH)
    assert [sorted(q) for q in lists] == [["limit"]] + [["continue", "limit"]] * 3
    assert {q["limit"] for q in lists} == {"3"}
    assert len({q["continue"] for q in lists[1:]}) == 3
    assert server.list_requests(SERVICES_PATH) == [{"limit": "3"}]
    stats = index.stats()
    assert {k: stats[k] for k in ("synced", "lists", "pages", "errors", "rejected", "pods",
                                  "services", "objects", "addresses")} == {
        "synced": 1.0, "lists": 2, "pages": 5, "errors": 0, "rejected": 0, "pods": 11,
        "services": 2, "objects": 13, "addresses": 14}
    assert eventually(lambda: index.stats()["watches"], 2) == 2
    listed = {e["event"]: e for e in logs if e["event"].endswith(" listed")}
    assert (listed["pods listed"]["pods"], listed["services listed"]["services"]) == (11, 2)


def test_watch_adds_modifies_and_deletes(server: FakeApiServer, start_index: IndexFactory) -> None:
    index = start_index()
    caught_up(index, server)
    assert index.stats()["addresses"] == 0

    server.add(pod("web-7d4b9c-aaaaa", "10.244.0.5"))
    pending = pod("batch-1", None, phase="Pending", host_ip="192.168.0.3", node="node-c")
    server.add(pending)
    caught_up(index, server)
    assert peers(index, "10.244.0.5", "192.168.0.3") == {
        "10.244.0.5": WEB, "192.168.0.3": Peer("node", "", "node-c")}

    server.update(pod("batch-1", "10.244.3.3", phase="Running", host_ip="192.168.0.3",
                      node="node-c"))  # the sandbox is up: it has an IP
    assert eventually(lambda: peer(index, "10.244.3.3"), Peer("pod", "shop", "batch-1")) == (
        Peer("pod", "shop", "batch-1"))
    server.update(pod("batch-1", "10.244.3.3", phase="Succeeded", host_ip="192.168.0.3",
                      node="node-c"))  # finished: its IP may be handed out again
    assert eventually(lambda: peer(index, "10.244.3.3"), None) is None
    assert peer(index, "192.168.0.3") is None  # nothing on node-c claims its address now
    server.delete("shop", "web-7d4b9c-aaaaa")
    assert eventually(lambda: peer(index, "10.244.0.5"), None) is None
    caught_up(index, server)
    assert index.stats()["addresses"] == 0
    assert index.stats()["lists"] == 2


def test_a_change_between_pages_arrives_by_the_watch(server: FakeApiServer, api: Any,
                                                     start_index: IndexFactory) -> None:
    for i in range(1, 8):
        server.add(pod(f"p{i}", f"10.244.0.{i}"))

    class ChangesAfterTheFirstPage:
        """The real client, with changes made once the first pod page is read."""

        def __init__(self) -> None:
            self.pages = 0

        def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
            answer = api.list_pod_for_all_namespaces(**kwargs)
            if not kwargs.get("watch"):
                self.pages += 1
                if self.pages == 1:
                    server.delete("shop", "p7")  # on the last page: the snapshot still has it
                    server.add(pod("p8", "10.244.0.8"))
                    server.update(pod("p2", "10.244.2.2"))  # on the first page, already read
            return answer

        def list_service_for_all_namespaces(self, **kwargs: Any) -> Any:
            return api.list_service_for_all_namespaces(**kwargs)

    index = start_index(ChangesAfterTheFirstPage())
    caught_up(index, server)
    assert peers(index, *(f"10.244.0.{i}" for i in range(1, 9)), "10.244.2.2") == {
        "10.244.0.1": Peer("pod", "shop", "p1"), "10.244.0.2": None,
        "10.244.0.3": Peer("pod", "shop", "p3"), "10.244.0.4": Peer("pod", "shop", "p4"),
        "10.244.0.5": Peer("pod", "shop", "p5"), "10.244.0.6": Peer("pod", "shop", "p6"),
        "10.244.0.7": None, "10.244.0.8": Peer("pod", "shop", "p8"),
        "10.244.2.2": Peer("pod", "shop", "p2")}
    assert index.stats()["lists"] == 2  # no relist: the watch from the snapshot brought them
    watched_from = server.watch_requests(PODS_PATH)[0]["resourceVersion"]
    assert watched_from == "107"  # the snapshot the list was paged from, before the changes


# -- one address, several claimants ------------------------------------------------------------------

def test_ip_reuse_running_first_then_newest(server: FakeApiServer, start_index: IndexFactory) -> None:
    old = pod("web-7d4b9c-old00", "10.244.0.9", created=EARLY)
    server.add(old)
    index = start_index()
    caught_up(index, server)
    # the successor got the IP while the old pod still runs (its delete not yet seen)
    server.add(pod("next", "10.244.0.9", phase="Pending", created=LATER))
    caught_up(index, server)
    assert peer(index, "10.244.0.9") == WEB  # Running wins over a newer pod not yet Running
    server.update(pod("next", "10.244.0.9", phase="Running", created=LATER))
    assert eventually(lambda: peer(index, "10.244.0.9"), Peer("pod", "shop", "next")) == (
        Peer("pod", "shop", "next"))  # both Running: the most recently created
    server.delete("shop", "next")
    assert eventually(lambda: peer(index, "10.244.0.9"), WEB) == WEB  # the next claimant answers
    server.delete("shop", "web-7d4b9c-old00")
    assert eventually(lambda: peer(index, "10.244.0.9"), None) is None


def test_ip_reuse_the_old_pod_goes_first(server: FakeApiServer, start_index: IndexFactory) -> None:
    server.add(pod("web-7d4b9c-old00", "10.244.0.9", created=EARLY))
    server.add(pod("newer", "10.244.0.9", phase="Pending", created=LATER))
    server.add(pod("newest", "10.244.0.9", phase="Pending", created=LATEST))
    index = start_index()
    assert index.synced.wait(5)
    assert peer(index, "10.244.0.9") == WEB
    server.update(pod("web-7d4b9c-old00", "10.244.0.9", created=EARLY, phase="Failed"))
    # neither is Running: the most recently created
    assert eventually(lambda: peer(index, "10.244.0.9"), Peer("pod", "shop", "newest")) == (
        Peer("pod", "shop", "newest"))
    server.delete("shop", "newest")
    assert eventually(lambda: peer(index, "10.244.0.9"), Peer("pod", "shop", "newer")) == (
        Peer("pod", "shop", "newer"))


# -- services, nodes, IPv6 ----------------------------------------------------------------------------

def test_services(server: FakeApiServer, start_index: IndexFactory) -> None:
    server.add_service(make_service("web", "shop", "10.96.0.20", external_ips=["203.0.113.7"]))
    server.add_service(make_service("ext", "shop", None))  # ExternalName: no address at all
    index = start_index()
    caught_up(index, server)
    svc = Peer("service", "shop", "web")
    assert peers(index, "10.96.0.20", "203.0.113.7") == {"10.96.0.20": svc, "203.0.113.7": svc}

    server.add_service(make_service("edge", "ingress", "10.96.0.30", lb_ips=["198.51.100.1"]))
    edge = Peer("service", "ingress", "edge")
    assert eventually(lambda: peer(index, "198.51.100.1"), edge) == edge
    server.update_service(make_service("edge", "ingress", "10.96.0.30", lb_ips=["198.51.100.2"]))
    assert eventually(lambda: peer(index, "198.51.100.1"), None) is None  # the old LB address goes
    assert peers(index, "198.51.100.2", "10.96.0.30") == {"198.51.100.2": edge, "10.96.0.30": edge}
    server.update_service(make_service("web", "shop", "10.96.0.20"))  # externalIPs removed
    assert eventually(lambda: peer(index, "203.0.113.7"), None) is None
    server.delete_service("ingress", "edge")
    assert eventually(lambda: peer(index, "10.96.0.30"), None) is None
    caught_up(index, server)
    assert peer(index, "198.51.100.2") is None
    assert index.stats()["services"] == 1


def test_host_network_pods_and_node_addresses(server: FakeApiServer, start_index: IndexFactory) -> None:
    # kube-proxy runs in the host's network: its "pod IP" is node-b's address
    server.add(make_pod("kube-proxy-x", "kube-system", "uid-kp", "node-b", owner=("DaemonSet", "kp"),
                        pod_ips=["192.168.0.2"], host_ips=["192.168.0.2"], host_network=True))
    server.add(pod("a1", "10.244.1.1", node="node-b", host_ip="192.168.0.2"))
    server.add(pod("a2", "10.244.1.2", node="node-b", host_ip="192.168.0.2"))
    index = start_index()
    caught_up(index, server)
    node_b = Peer("node", "", "node-b")
    assert peer(index, "192.168.0.2") == node_b
    for name in ("kube-proxy-x", "a1"):  # any pod of the node keeps naming it
        server.delete("kube-system" if name == "kube-proxy-x" else "shop", name)
        caught_up(index, server)
        assert peer(index, "192.168.0.2") == node_b
    server.delete("shop", "a2")
    assert eventually(lambda: peer(index, "192.168.0.2"), None) is None


def test_dual_stack(server: FakeApiServer, start_index: IndexFactory) -> None:
    server.add(make_pod("web-7d4b9c-ds000", "shop", "uid-ds", "node-a",
                        {"pod-template-hash": "7d4b9c"}, RS,
                        pod_ips=["10.244.0.4", "fd00:10:244::4"],
                        host_ips=["192.168.0.1", "fd00:192:168::1"]))
    server.add_service(make_service("web", "shop", "fd00:10:96::20",
                                    cluster_ips=["fd00:10:96::20", "10.96.0.20"]))
    index = start_index()
    assert index.synced.wait(5)
    svc, node = Peer("service", "shop", "web"), Peer("node", "", "node-a")
    assert peers(index, "10.244.0.4", "fd00:10:244::4", "192.168.0.1", "fd00:192:168::1",
                 "fd00:10:96::20", "10.96.0.20", "fd00:10:244::5") == {
        "10.244.0.4": WEB, "fd00:10:244::4": WEB, "192.168.0.1": node, "fd00:192:168::1": node,
        "fd00:10:96::20": svc, "10.96.0.20": svc, "fd00:10:244::5": None}
    assert index.lookup(key("fd00:10:244::4")[:4]) is None  # an IPv6 key's head is no IPv4 key


# -- 410, dropped streams, failures --------------------------------------------------------------------

def test_expired_versions_relist_both(server: FakeApiServer, start_index: IndexFactory,
                                      logs: list[dict[str, Any]]) -> None:
    for i in range(1, 6):
        server.add(pod(f"p{i}", f"10.244.0.{i}"))
    server.add_service(make_service("web", "shop", "10.96.0.20"))
    index = start_index()
    caught_up(index, server)

    server.event_delay = 30  # the open watches hold the next events back...
    server.delete("shop", "p1")
    server.add(pod("p6", "10.244.0.6"))
    server.delete_service("shop", "web")
    server.add_service(make_service("api", "shop", "10.96.0.21"))
    server.compact()  # ...and the log no longer reaches back to what the index has seen
    server.drop_streams()
    server.event_delay = 0

    assert eventually(lambda: peers(index, "10.244.0.1", "10.244.0.6", "10.96.0.20", "10.96.0.21"), {
        "10.244.0.1": None, "10.244.0.6": Peer("pod", "shop", "p6"), "10.96.0.20": None,
        "10.96.0.21": Peer("service", "shop", "api")}) == {
        "10.244.0.1": None, "10.244.0.6": Peer("pod", "shop", "p6"), "10.96.0.20": None,
        "10.96.0.21": Peer("service", "shop", "api")}
    caught_up(index, server)
    stats = index.stats()
    assert (stats["lists"], stats["errors"]) == (4, 2)  # a relist each; the two drops are errors
    assert len([e for e in logs if e["event"] == "watch expired, listing again"]) == 2
    assert len(server.list_requests(PODS_PATH)) == 4  # 5 pods in pages of 3, twice


def test_a_continue_token_compacted_away_lists_again_from_the_start(
        server: FakeApiServer, api: Any, start_index: IndexFactory) -> None:
    for i in range(1, 8):
        server.add(pod(f"p{i}", f"10.244.0.{i}"))

    class CompactsAfterTheFirstPage:
        def __init__(self) -> None:
            self.pages = 0

        def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
            answer = api.list_pod_for_all_namespaces(**kwargs)
            if not kwargs.get("watch"):
                self.pages += 1
                if self.pages == 1:
                    server.delete("shop", "p7")
                    server.compact()  # the first page's snapshot is gone before the second
            return answer

        def list_service_for_all_namespaces(self, **kwargs: Any) -> Any:
            return api.list_service_for_all_namespaces(**kwargs)

    index = start_index(CompactsAfterTheFirstPage())
    caught_up(index, server)
    assert peer(index, "10.244.0.7") is None
    assert peer(index, "10.244.0.6") == Peer("pod", "shop", "p6")
    assert index.stats()["pods"] == 6
    pages = server.list_requests(PODS_PATH)
    # page 1, page 2 (410), then the list again from the start: 6 pods in two pages
    assert ["continue" in q for q in pages] == [False, True, False, True]
    assert index.stats()["errors"] == 0  # a 410 is the protocol, not a failure


def test_synced_only_once_both_are_listed(server: FakeApiServer, api: Any,
                                          start_index: IndexFactory) -> None:
    server.add(pod("p1", "10.244.0.1"))
    release = threading.Event()

    class ServicesDown:
        def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
            return api.list_pod_for_all_namespaces(**kwargs)

        def list_service_for_all_namespaces(self, **kwargs: Any) -> Any:
            if not release.is_set():
                raise ConnectionRefusedError(111, "Connection refused")
            return api.list_service_for_all_namespaces(**kwargs)

    index = start_index(ServicesDown())
    assert index.reflector("pods").synced.wait(5)
    assert eventually(lambda: index.stats()["errors"] >= 2, True) is True
    assert not index.synced.is_set()
    assert peer(index, "10.244.0.1") == Peer("pod", "shop", "p1")  # what is in answers already
    release.set()
    assert index.synced.wait(5)


def test_malformed_objects_are_counted_and_skipped(server: FakeApiServer,
                                                   start_index: IndexFactory) -> None:
    no_uid = pod("no-uid", "10.244.0.1")
    del no_uid["metadata"]["uid"]
    server.add(no_uid)
    bad_ip = pod("bad-ip", "10.244.0.300")
    server.add(bad_ip)
    odd = make_service("odd", "shop", "10.96.0.9", external_ips=["not-an-ip", "203.0.113.9"])
    server.add_service(odd)
    index = start_index()
    caught_up(index, server)
    assert index.stats()["rejected"] == 1
    assert peers(index, "10.244.0.1", "203.0.113.9", "10.96.0.9", "192.168.0.1") == {
        "10.244.0.1": None, "203.0.113.9": Peer("service", "shop", "odd"),
        "10.96.0.9": Peer("service", "shop", "odd"), "192.168.0.1": Peer("node", "", "node-a")}
    server.add(pod("fine", "10.244.0.2"))
    assert eventually(lambda: peer(index, "10.244.0.2"), Peer("pod", "shop", "fine")) == (
        Peer("pod", "shop", "fine"))
    assert index.stats()["errors"] == 0


# -- the index on its own: replace() and apply() as the reflectors call them --------------------------

class NoApi:
    """Never called: these tests feed the index directly."""

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        raise AssertionError("not started")

    list_service_for_all_namespaces = list_pod_for_all_namespaces


def test_a_delete_removes_exactly_what_the_uid_claimed() -> None:
    index = ClusterIndex(NoApi())
    index.apply("pods", "ADDED", pod("p1", "10.244.0.1", host_ip="192.168.0.1"))
    index.apply("pods", "ADDED", pod("p2", "10.244.0.2", host_ip="192.168.0.1"))
    stripped = pod("p1", None, host_ip="192.168.0.9")  # the deleted copy names other addresses
    assert index.apply("pods", "DELETED", stripped) is True
    assert peers(index, "10.244.0.1", "10.244.0.2", "192.168.0.1", "192.168.0.9") == {
        "10.244.0.1": None, "10.244.0.2": Peer("pod", "shop", "p2"),
        "192.168.0.1": Peer("node", "", "node-a"), "192.168.0.9": None}
    assert index.apply("pods", "DELETED", stripped) is False  # nothing left to remove


def test_a_modify_releases_the_addresses_no_longer_claimed() -> None:
    index = ClusterIndex(NoApi())
    index.apply("pods", "ADDED", pod("p1", "10.244.0.1"))
    assert index.apply("pods", "MODIFIED", pod("p1", "10.244.0.1")) is False  # no claim changed
    assert index.apply("pods", "MODIFIED", pod("p1", "10.244.0.7", host_ip="192.168.0.4")) is True
    assert peers(index, "10.244.0.1", "10.244.0.7", "192.168.0.1", "192.168.0.4") == {
        "10.244.0.1": None, "10.244.0.7": Peer("pod", "shop", "p1"), "192.168.0.1": None,
        "192.168.0.4": Peer("node", "", "node-a")}


def test_a_pod_list_leaves_the_services_alone() -> None:
    index = ClusterIndex(NoApi())
    index.apply("services", "ADDED", make_service("web", "shop", "10.96.0.20"))
    index.apply("pods", "ADDED", pod("p1", "10.244.0.1"))
    assert index.replace("pods", iter([pod("p2", "10.244.0.2")])) == 1
    assert peers(index, "10.96.0.20", "10.244.0.1", "10.244.0.2") == {
        "10.96.0.20": Peer("service", "shop", "web"), "10.244.0.1": None,
        "10.244.0.2": Peer("pod", "shop", "p2")}


def test_ranks_across_kinds() -> None:
    """A Running pod's IP, then a node address, then a service's, then a pod not Running."""
    index = ClusterIndex(NoApi())
    shared = "172.16.0.1"
    index.apply("pods", "ADDED", pod("starting", shared, phase="Pending", created=LATEST))
    assert peer(index, shared) == Peer("pod", "shop", "starting")
    index.apply("services", "ADDED", make_service("lb", "shop", "10.96.0.5", lb_ips=[shared]))
    assert peer(index, shared) == Peer("service", "shop", "lb")
    index.apply("pods", "ADDED", pod("on-node", "10.244.0.3", host_ip=shared, created=EARLY))
    assert peer(index, shared) == Peer("node", "", "node-a")
    index.apply("pods", "ADDED", pod("runs", shared, created=EARLY, host_ip="192.168.0.1"))
    assert peer(index, shared) == Peer("pod", "shop", "runs")
    for name, then in (("runs", Peer("node", "", "node-a")), ("on-node", Peer("service", "shop", "lb"))):
        index.apply("pods", "DELETED", pod(name, None))
        assert peer(index, shared) == then
    index.apply("services", "DELETED", make_service("lb", "shop", "10.96.0.5"))
    assert peer(index, shared) == Peer("pod", "shop", "starting")


def test_equal_claims_are_decided_the_same_way_whatever_the_order() -> None:
    a = pod("a", "10.244.0.1", created=EARLY)
    b = pod("b", "10.244.0.1", created=EARLY)
    one, two = ClusterIndex(NoApi()), ClusterIndex(NoApi())
    one.replace("pods", iter([a, b]))
    two.apply("pods", "ADDED", b)
    two.apply("pods", "ADDED", a)
    assert peer(one, "10.244.0.1") == peer(two, "10.244.0.1") == Peer("pod", "shop", "b")  # "uid-shop-b"


def test_lookups_during_relists_and_events() -> None:
    index = ClusterIndex(NoApi())
    first = [pod(f"a{i}", f"10.244.0.{i}") for i in range(1, 120)]
    second = [pod(f"b{i}", f"10.244.0.{i}") for i in range(1, 120)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                index.replace("pods", iter(first))
                for p in second[:20]:
                    index.apply("pods", "ADDED", p)
                index.replace("pods", iter(second))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    seen: set[str] = set()
    try:
        for _ in range(50):
            for i in range(1, 120):
                found = peer(index, f"10.244.0.{i}")
                seen.add(found.workload[0] if found else "-")
                index.stats()
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert seen <= {"a", "b", "-"}


# -- the fake itself: what the tests above rely on ---------------------------------------------------

def raw_list(api: Any, method: str, **kwargs: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(getattr(api, method)(_preload_content=False, **kwargs).data)
    return data


def test_fake_pages_come_from_one_snapshot(server: FakeApiServer, api: Any) -> None:
    for name in ("e", "b", "d", "a", "c"):
        server.add(pod(name, None))
    first = raw_list(api, "list_pod_for_all_namespaces", limit=2)
    assert [p["metadata"]["name"] for p in first["items"]] == ["a", "b"]  # key order
    assert first["metadata"]["resourceVersion"] == "105"
    assert first["metadata"]["remainingItemCount"] == 3
    server.delete("shop", "d")
    server.add(pod("bb", None))
    server.update(pod("c", "10.244.0.3"))
    second = raw_list(api, "list_pod_for_all_namespaces", limit=2,
                      _continue=first["metadata"]["continue"])
    assert [p["metadata"]["name"] for p in second["items"]] == ["c", "d"]  # as at 105
    assert "podIP" not in second["items"][0]["status"]
    assert (second["metadata"]["resourceVersion"], second["metadata"]["remainingItemCount"]) == (
        "105", 1)
    last = raw_list(api, "list_pod_for_all_namespaces", limit=2,
                    _continue=second["metadata"]["continue"])
    assert [p["metadata"]["name"] for p in last["items"]] == ["e"]
    assert last["metadata"] == {"resourceVersion": "105"}  # no continue: the end
    whole = raw_list(api, "list_pod_for_all_namespaces")
    assert [p["metadata"]["name"] for p in whole["items"]] == ["a", "b", "bb", "c", "e"]
    assert whole["metadata"] == {"resourceVersion": "108"}


def test_fake_paged_with_a_field_selector_counts_nothing_left(server: FakeApiServer, api: Any) -> None:
    for name in ("a", "b", "c"):
        server.add(pod(name, None))
    server.add(pod("far", None, node="node-b"))
    page = raw_list(api, "list_pod_for_all_namespaces", limit=2, field_selector="spec.nodeName=node-a")
    assert [p["metadata"]["name"] for p in page["items"]] == ["a", "b"]
    assert "continue" in page["metadata"]
    assert "remainingItemCount" not in page["metadata"]  # as the API server, with a selector


def test_fake_expired_and_bad_continue_tokens(server: FakeApiServer, api: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    for name in ("a", "b", "c"):
        server.add(pod(name, None))
    first = raw_list(api, "list_pod_for_all_namespaces", limit=1)
    server.add(pod("d", None))
    server.compact()
    with pytest.raises(ApiException) as info:
        raw_list(api, "list_pod_for_all_namespaces", limit=1, _continue=first["metadata"]["continue"])
    assert info.value.status == 410
    body = json.loads(info.value.body)
    assert body["reason"] == "Expired"
    assert "continue parameter is too old" in body["message"]
    assert body["metadata"]["continue"]
    with pytest.raises(ApiException) as bad:
        raw_list(api, "list_pod_for_all_namespaces", limit=1, _continue="garbage!")
    assert bad.value.status == 400


def test_fake_services_share_the_version_log_with_pods(server: FakeApiServer, api: Any) -> None:
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    server.add(pod("a", None))  # 101
    server.add_service(make_service("web", "shop", "10.96.0.20"))  # 102
    server.add(pod("b", None))  # 103
    server.update_service(make_service("web", "shop", "10.96.0.21"))  # 104
    server.delete_service("shop", "web")  # 105
    listed = raw_list(api, "list_service_for_all_namespaces")
    assert (listed["kind"], listed["items"], listed["metadata"]["resourceVersion"]) == (
        "ServiceList", [], "105")
    events = list(watch.Watch(return_type="object").stream(
        api.list_service_for_all_namespaces, resource_version="101", timeout_seconds=1))
    assert [(e["type"], e["raw_object"]["metadata"]["resourceVersion"]) for e in events] == [
        ("ADDED", "102"), ("MODIFIED", "104"), ("DELETED", "105")]
    assert events[1]["raw_object"]["spec"]["clusterIP"] == "10.96.0.21"
    with pytest.raises(ApiException) as info:
        raw_list(api, "list_service_for_all_namespaces", field_selector="spec.nodeName=node-a")
    assert info.value.status == 400
    server.compact()
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(api.list_service_for_all_namespaces, resource_version="101",
                                  timeout_seconds=1))
    assert gone.value.status == 410


def test_fake_service_bookmarks_name_the_kind(server: FakeApiServer, api: Any) -> None:
    from kubernetes import watch

    server.bookmark_interval = 0.05
    w = watch.Watch(return_type="object")
    events = []
    for event in w.stream(api.list_service_for_all_namespaces, allow_watch_bookmarks=True,
                          timeout_seconds=2):
        events.append(event)
        if event["type"] == "BOOKMARK":
            w.stop()
    assert events[-1]["raw_object"]["kind"] == "Service"


def test_fake_pod_and_service_shapes() -> None:
    p = make_pod("x", "shop", "u", "node-a", pod_ips=["10.0.0.1", "fd00::1"], host_ips=["192.168.0.1"],
                 host_network=True, phase="Pending", created=LATER)
    assert p["status"] == {"phase": "Pending", "podIP": "10.0.0.1",
                           "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                           "hostIP": "192.168.0.1", "hostIPs": [{"ip": "192.168.0.1"}]}
    assert (p["spec"]["hostNetwork"], p["metadata"]["creationTimestamp"]) == (True, LATER)
    assert make_pod("x", "shop", "u", "node-a")["status"] == {"phase": "Running"}  # as before
    s = make_service("lb", "shop", "10.96.0.5", lb_ips=["198.51.100.1"], external_ips=["203.0.113.1"])
    assert (s["spec"]["type"], s["spec"]["clusterIPs"], s["spec"]["externalIPs"]) == (
        "LoadBalancer", ["10.96.0.5"], ["203.0.113.1"])
    assert s["status"]["loadBalancer"]["ingress"] == [{"ip": "198.51.100.1"}]
    assert "clusterIP" not in make_service("n", "shop", None)["spec"]


# -- the reflector under the index ------------------------------------------------------------------

def test_a_consumer_that_stops_reading_early_takes_no_version(server: FakeApiServer, api: Any) -> None:
    from monitor.metadata.reflector import Reflector

    for name in ("a", "b", "c", "d"):
        server.add(pod(name, None))
    taken: list[str] = []

    def first_only(items: Iterator[dict[str, Any]]) -> int:
        taken.append(next(items)["metadata"]["name"])
        return 1

    reflector = Reflector(api.list_pod_for_all_namespaces, resource="pods", replace=first_only,
                          apply=lambda kind, obj: False, page_size=2,
                          backoff=Backoff(first=10, cap=10))  # one try within the test
    with capture_logs() as entries:
        reflector.start()
        assert eventually(lambda: reflector.errors, 1) == 1
        reflector.stop()
        assert reflector.join(5)
    assert (taken, reflector.resource_version, reflector.lists) == (["a"], None, 0)
    assert not reflector.synced.is_set()
    assert server.list_requests(PODS_PATH) == [{"limit": "2"}]  # the second page never asked for
    (failed,) = [e for e in entries if e["event"] == "kubernetes api call failed"]
    assert failed["error"] == "RuntimeError: the pods list was not read to its end"
