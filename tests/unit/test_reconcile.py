"""The reconciler with fakes for discovery, links, attacher, slots, metadata and the clock."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from monitor import reconcile, reconcileloop
from monitor.identity import HostVeth, PodMeta, PodNetwork
from monitor.kernel.records import FILTER_RUNS_FIRST, Attachment, VethLink
from monitor.metadata.static import NoMetadata
from monitor.reconcile import RETRY_MAX, Reconciler
from monitor.state import MonitorState

UID_WEB = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UID_DB = "6f2c1a8e-9b0d-4c3e-8f7a-6b5c4d3e2f1a"

Event = tuple[object, ...]


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDiscovery:
    def __init__(self) -> None:
        self.networks: list[PodNetwork] = []
        self.denied: list[int] = []  # pause pids whose netns "cannot be read"

    def scan(self, denied: list[int] | None = None) -> list[PodNetwork]:
        if denied is not None:
            denied.extend(self.denied)
        return list(self.networks)


class FakeLinks:
    def __init__(self) -> None:
        self.links: list[VethLink] = []
        self.nsids: dict[str, int] = {}
        self.asked: list[str] = []

    def veths(self) -> Sequence[VethLink]:
        return list(self.links)

    def netnsid(self, netns_path: str) -> int | None:
        self.asked.append(netns_path)
        return self.nsids.get(netns_path)


class FakeAttacher:
    def __init__(self, events: list[Event], clock: Clock) -> None:
        self.events, self.clock = events, clock
        self.failing: set[int] = set()
        self.broken: dict[int, str] = {}  # ifindex -> why ours is not what it should be there

    def attach(self, ifindex: int, ifname: str, netns: int, *,
               mode: str | None = None) -> Attachment:
        self.events.append(("attach", ifindex, ifname, netns, *([mode] if mode else [])))
        if ifindex in self.failing:
            raise OSError(f"no room on {ifname}")
        return Attachment(ifindex, ifname, netns, mode or "tc", since=self.clock())

    def detach(self, att: Attachment) -> None:
        self.events.append(("detach", att.ifindex, att.ifname, att.netns))

    def verify(self, att: Attachment) -> str:
        return self.broken.get(att.ifindex, "")


class FakeSlots:
    """Hands out counter slots 0, 1, 2... (never reused); can fail on chosen ifindexes.

    sync_netns goes to `calls` (with the probes' forget calls), not to `events`, so the
    attach/detach sequences below stay as they were.
    """

    def __init__(self, events: list[Event], calls: list[Event]) -> None:
        self.events, self.calls = events, calls
        self.netns: dict[int, int] = {}  # what pnm_netns would hold: netns -> ifindex
        self.slots: dict[int, int] = {}
        self.next_slot = 0
        self.assign_errors: dict[int, Exception] = {}  # ifindex -> what assign raises
        self.release_errors: dict[int, Exception] = {}

    def assign(self, ifindex: int, netns: int = 0) -> int:
        self.events.append(("assign", ifindex))
        if ifindex in self.assign_errors:
            raise self.assign_errors[ifindex]
        if ifindex not in self.slots:
            self.slots[ifindex], self.next_slot = self.next_slot, self.next_slot + 1
        return self.slots[ifindex]

    def release(self, ifindex: int) -> None:
        self.events.append(("release", ifindex))
        if ifindex in self.release_errors:
            raise self.release_errors[ifindex]
        self.slots.pop(ifindex, None)

    def assigned(self) -> dict[int, int]:
        return dict(self.slots)

    def release_unclaimed(self) -> list[int]:
        return []

    def sync_netns(self, wanted: dict[int, int]) -> None:
        self.calls.append(("sync_netns", dict(wanted)))
        self.netns = dict(wanted)


class FakeMetadata:
    def __init__(self, by_uid: dict[str, PodMeta], by_path: dict[str, PodMeta] | None = None) -> None:
        self.by_uid, self.by_path = by_uid, by_path or {}
        self.lookups: list[tuple[str | None, list[str]]] = []
        self.refreshes = 0

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        self.lookups.append((uid, list(netns_paths)))
        if uid and uid in self.by_uid:
            return self.by_uid[uid]
        return next((self.by_path[p] for p in netns_paths if p in self.by_path), None)

    def refresh(self) -> None:
        self.refreshes += 1


WEB = PodMeta("shop", "web-1", uid=UID_WEB, workload="web", workload_kind="Deployment")
DB = PodMeta("shop", "db-0", uid=UID_DB)


class World:
    """The fakes, wired into one Reconciler; events in order, across attacher and slots."""

    def __init__(self, metadata: object = None, forget_errors: dict[int, Exception] | None = None,
                 *, max_pods: int = 1000, runtime_uids: Callable[[], dict[str, str]] | None = None,
                 runtime_names: Callable[[], dict[str, PodMeta]] | None = None,
                 after_first_pass: Callable[[set[int], set[int]], None] | None = None,
                 ) -> None:
        self.events: list[Event] = []
        self.calls: list[Event] = []  # sync_netns and forget, in order
        self.clock = Clock()
        self.discovery = FakeDiscovery()
        self.links = FakeLinks()
        self.attacher = FakeAttacher(self.events, self.clock)
        self.slots = FakeSlots(self.events, self.calls)
        self.metadata = metadata if metadata is not None else FakeMetadata({UID_WEB: WEB, UID_DB: DB})
        self.state = MonitorState()
        self.forget_errors = forget_errors or {}  # ifindex -> what the first forget raises
        self.reconciler = Reconciler(
            discovery=self.discovery, links=self.links, attacher=self.attacher,  # type: ignore[arg-type]
            slots=self.slots, metadata=self.metadata, state=self.state,  # type: ignore[arg-type]
            forget=[self.forget_first, self.forget_second], node="node-1", clock=self.clock,
            max_pods=max_pods, runtime_uids=runtime_uids, runtime_names=runtime_names,
            after_first_pass=after_first_pass)

    def forget_first(self, netns: int, ifindexes: Sequence[int]) -> None:
        # what pnm_netns and the slots hold at the moment keys are forgotten
        self.calls.append(("forget", netns, list(ifindexes), dict(self.slots.netns),
                           dict(self.slots.slots)))
        for ifindex in ifindexes:
            if ifindex in self.forget_errors:
                raise self.forget_errors[ifindex]

    def forget_second(self, netns: int, ifindexes: Sequence[int]) -> None:
        self.calls.append(("forget2", netns, list(ifindexes)))

    def forgets(self) -> list[tuple[int, list[int]]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "forget"]  # type: ignore[misc]

    def last_sync(self) -> dict[int, int]:
        return [c[1] for c in self.calls if c[0] == "sync_netns"][-1]  # type: ignore[return-value]

    def pod(self, netns: int, nsid: int, veths: Sequence[tuple[int, str]], *, uid: str | None = None,
            pause_pid: int | None = None, pinned: str | None = None) -> PodNetwork:
        """A pod network with its host veths (ifindex, name), wired through nsid."""
        open_path = f"/proc/{pause_pid}/ns/net" if pause_pid else (pinned or "")
        network = PodNetwork(netns, open_path, pause_pid=pause_pid, pinned_path=pinned, uid=uid)
        self.discovery.networks.append(network)
        self.links.nsids[open_path] = nsid
        for ifindex, name in veths:
            self.links.links.append(VethLink(ifindex, name, nsid, 2))
        return network

    def remove(self, netns: int) -> None:
        gone = [n for n in self.discovery.networks if n.netns_inode == netns]
        self.discovery.networks = [n for n in self.discovery.networks if n.netns_inode != netns]
        nsids = {self.links.nsids.pop(n.open_path) for n in gone}
        self.links.links = [v for v in self.links.links if v.link_netnsid not in nsids]

    def take(self) -> list[Event]:
        events, self.events[:] = list(self.events), []
        return events

    def run(self) -> list[Event]:
        self.reconciler.reconcile()
        return self.take()


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def links_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "_link_exists", lambda name: True)


def attach_events(ifindex: int, name: str, netns: int) -> list[Event]:
    """A (zeroed) counter slot first, so the first packet already counts; then the programs."""
    return [("assign", ifindex), ("attach", ifindex, name, netns)]


def failed_attach_events(ifindex: int, name: str, netns: int) -> list[Event]:
    """The slot is assigned, the attach fails, the slot is released again."""
    return [*attach_events(ifindex, name, netns), ("release", ifindex)]


def detach_events(ifindex: int, name: str, netns: int) -> list[Event]:
    """The programs off first, so nothing counts into the slot after it is released."""
    return [("detach", ifindex, name, netns), ("release", ifindex)]


# -- attach and detach ----------------------------------------------------------------------------

def test_new_pod_attached_once_slot_first(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    assert world.run() == attach_events(7, "veth7", 4026532001)
    assert world.run() == []  # nothing changed: nothing done
    assert world.state.reconciles == 2
    assert world.slots.assigned() == {7: 0}


def test_nsid_asked_once_per_netns_until_it_goes(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    unwired = PodNetwork(4026532002, "/proc/101/ns/net", pause_pid=101, uid=UID_DB)
    world.discovery.networks.append(unwired)  # no nsid yet: no veth wired
    world.run()
    world.run()
    assert sorted(world.links.asked) == ["/proc/100/ns/net", "/proc/101/ns/net",
                                         "/proc/101/ns/net"]  # none yet: asked again
    world.links.asked.clear()
    world.links.nsids["/proc/101/ns/net"] = 4
    world.links.links.append(VethLink(8, "veth8", 4, 2))
    assert world.run() == attach_events(8, "veth8", 4026532002)
    world.run()
    assert world.links.asked == ["/proc/101/ns/net"]
    world.remove(4026532001)
    world.run()
    # the netns is back under the same pause pid (a new netns with a reused inode would
    # be a new pause pid too): forgotten while gone, so asked afresh
    world.links.asked.clear()
    world.pod(4026532001, 5, [(9, "veth9")], uid=UID_WEB, pause_pid=100)
    assert world.run() == attach_events(9, "veth9", 4026532001)
    assert world.links.asked == ["/proc/100/ns/net"]


def test_after_first_pass_runs_once_with_what_is_attached() -> None:
    seen: list[tuple[set[int], set[int]]] = []
    world = World(after_first_pass=lambda attached, live: seen.append((attached, live)))
    world.slots.release_unclaimed = lambda: [42]  # type: ignore[method-assign]
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=101)
    world.run()
    assert seen == [({7}, {4026532001})]


def test_published_status(world: World) -> None:
    world.clock.now = 50.0
    world.pod(4026532001, 3, [(9, "veth9"), (7, "veth7")], uid=UID_WEB, pause_pid=100,
              pinned="/run/netns/cni-a")
    world.run()
    (status,) = world.state.snapshot.pods
    assert status.pod is world.state.snapshot.index.by_netns(4026532001)  # the pod, not a copy
    assert status.as_json() == {
        "namespace": "shop", "pod": "web-1", "uid": UID_WEB, "netns": 4026532001,
        "has_metadata": True, "pause_pid": 100, "pinned_netns": "/run/netns/cni-a",
        "interface": "veth7", "ifindex": 7, "attach_mode": "tc", "attached_since": 50.0,
        "last_error": "", "interfaces": [
            {"name": "veth7", "ifindex": 7, "attach_mode": "tc", "attached_since": 50.0,
             "last_error": ""},
            {"name": "veth9", "ifindex": 9, "attach_mode": "tc", "attached_since": 50.0,
             "last_error": ""}]}
    assert world.state.attached_pods() == 1


def test_identity_index_resolves_ifindex_and_netns(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7"), (9, "veth9")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.pod(4026532003, 5, [(11, "veth11")], uid="00000000-0000-0000-0000-000000000000",
              pause_pid=300)
    world.run()
    index = world.state.snapshot.index
    assert len(index) == 3
    web = index.by_ifindex(9)
    assert web is not None
    assert (web.namespace, web.name, web.uid, web.has_metadata) == ("shop", "web-1", UID_WEB, True)
    assert web.interfaces == (HostVeth(7, "veth7", 2), HostVeth(9, "veth9", 2))
    assert index.by_ifindex(7) is web
    assert index.by_netns(4026532001) is web
    db = index.by_netns(4026532002)
    assert db is not None
    assert (db.namespace, db.name) == ("shop", "db-0")
    assert index.by_ifindex(8) is db
    anon = index.by_ifindex(11)
    assert anon is not None
    assert (anon.namespace, anon.name, anon.has_metadata) == ("_unknown", "netns-4026532003", False)
    assert index.by_ifindex(10) is None
    assert index.by_netns(4026532099) is None
    assert index.slots() == ((0, web), (1, db), (2, web), (3, anon))  # by ifindex 7, 8, 9, 11


def test_metadata_refreshed_and_looked_up_by_uid_and_pinned_path() -> None:
    metadata = FakeMetadata({}, {"/run/netns/cni-db": DB})
    world = World(metadata)
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], pinned="/run/netns/cni-db")
    world.run()
    assert metadata.refreshes == 1
    assert metadata.lookups == [(UID_WEB, []), (None, ["/run/netns/cni-db"])]
    db = world.state.snapshot.index.by_ifindex(8)
    assert db is not None
    assert (db.namespace, db.name, db.network.pinned_path) == ("shop", "db-0", "/run/netns/cni-db")


def test_no_metadata_source() -> None:
    world = World(NoMetadata())
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    (status,) = world.state.snapshot.pods
    assert (status.pod.namespace, status.pod.name, status.pod.uid, status.pod.has_metadata) == (
        "_unknown", "netns-4026532001", UID_WEB, False)


def test_gone_pod_detached_then_slot_released(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.remove(4026532001)
    assert world.run() == detach_events(7, "veth7", 4026532001)
    assert world.slots.assigned() == {8: 1}
    assert world.state.snapshot.index.slots() == ((1, world.state.snapshot.index.by_ifindex(8)),)
    assert [p.pod.name for p in world.state.snapshot.pods] == ["db-0"]
    assert world.state.snapshot.index.by_ifindex(7) is None


def test_vanished_veth_of_a_living_netns_detached(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7"), (9, "veth9")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.links.links = [v for v in world.links.links if v.ifindex != 9]
    assert world.run() == detach_events(9, "veth9", 4026532001)


def test_reused_ifindex_detached_then_attached(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.remove(4026532001)
    world.pod(4026532002, 4, [(7, "vethnew")], uid=UID_DB, pause_pid=200)
    assert world.run() == (detach_events(7, "veth7", 4026532001)
                           + attach_events(7, "vethnew", 4026532002))
    db = world.state.snapshot.index.by_ifindex(7)
    assert db is not None
    assert db.name == "db-0"


def test_renamed_interface_reattached(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.links.links = [VethLink(7, "eth-renamed", 3, 2)]
    assert world.run() == detach_events(7, "veth7", 4026532001) + attach_events(
        7, "eth-renamed", 4026532001)


def test_netns_without_nsid_or_veth_is_not_a_pod(world: World) -> None:
    network = PodNetwork(4026532001, "/proc/100/ns/net", pause_pid=100, uid=UID_WEB)
    world.discovery.networks.append(network)  # no nsid: not wired to the host
    world.links.links.append(VethLink(7, "veth7", 3, 2))  # a veth to some other namespace
    world.pod(4026532002, 4, [], uid=UID_DB, pause_pid=200)  # an nsid but no veth to it
    assert world.run() == []
    assert world.state.snapshot.pods == ()
    assert len(world.state.snapshot.index) == 0


def test_pod_wired_later_is_attached_then(world: World) -> None:
    network = world.pod(4026532001, 3, [], uid=UID_WEB, pause_pid=100)
    assert world.run() == []
    world.links.links.append(VethLink(7, "veth7", 3, 2))
    assert world.run() == attach_events(7, "veth7", network.netns_inode)


def test_reconcile_time_counted(world: World) -> None:
    class SlowDiscovery(FakeDiscovery):
        def scan(self, denied: list[int] | None = None) -> list[PodNetwork]:
            world.clock.now += 0.25
            return []

    world.reconciler._discovery = SlowDiscovery()  # type: ignore[assignment]
    world.run()
    world.run()
    assert world.state.reconciles == 2
    assert world.state.reconcile_seconds == 0.5


# -- failures and backoff -------------------------------------------------------------------------

@pytest.mark.usefixtures("links_exist")
def test_failed_attach_counted_recorded_and_backed_off(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.attacher.failing.add(7)

    assert world.run() == failed_attach_events(7, "veth7", 4026532001)  # slot given back
    assert world.slots.assigned() == {}
    assert world.state.snapshot.index.slots() == ()
    assert world.state.attach_errors == 1
    (status,) = world.state.snapshot.pods
    assert [i.as_json() for i in status.interfaces] == [{
        "name": "veth7", "ifindex": 7, "attach_mode": "", "attached_since": None,
        "last_error": "no room on veth7"}]
    assert world.state.attached_pods() == 0
    assert world.reconciler.next_retry() == 1001.0

    world.clock.now = 1000.9
    assert world.run() == []  # not before the first delay (1 s)

    world.clock.now = 1001.0
    assert world.run() == failed_attach_events(7, "veth7", 4026532001)
    assert world.state.attach_errors == 2
    assert world.reconciler.next_retry() == 1003.0  # the delay doubled: 2 s

    world.clock.now = 1002.9
    assert world.run() == []
    world.clock.now = 1003.0
    world.run()
    assert world.state.attach_errors == 3
    assert world.reconciler.next_retry() == 1007.0  # 4 s

    world.attacher.failing.clear()
    world.clock.now = 1007.0
    assert world.run() == attach_events(7, "veth7", 4026532001)
    (status,) = world.state.snapshot.pods
    assert [i.as_json() for i in status.interfaces] == [{
        "name": "veth7", "ifindex": 7, "attach_mode": "tc", "attached_since": 1007.0,
        "last_error": ""}]
    assert world.reconciler.next_retry() is None
    assert world.state.attach_errors == 3


@pytest.mark.usefixtures("links_exist")
def test_backoff_capped(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.attacher.failing.add(7)
    for _ in range(10):
        world.run()
        retry = world.reconciler.next_retry()
        assert retry is not None
        world.clock.now = retry
    assert world.state.attach_errors == 10
    world.run()
    assert world.reconciler.next_retry() == world.clock.now + RETRY_MAX


@pytest.mark.usefixtures("links_exist")
def test_failure_of_one_interface_does_not_stop_others(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.attacher.failing.add(7)
    world.run()
    by_pod = {p.pod.name: p.interfaces[0] for p in world.state.snapshot.pods}
    assert by_pod["web-1"].attach_mode == ""
    assert by_pod["db-0"].attach_mode == "tc"
    assert world.state.attached_pods() == 1


@pytest.mark.usefixtures("links_exist")
def test_no_slot_counts_as_a_failed_attach(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.slots.assign_errors[7] = RuntimeError("all 1024 interface slots are in use")
    assert world.run() == [("assign", 7), ("release", 7)]  # never attached without a slot
    assert world.state.attach_errors == 1
    assert world.state.snapshot.pods[0].interfaces[0].last_error == (
        "all 1024 interface slots are in use")


def test_release_error_is_contained(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.slots.release_errors[7] = OSError(9, "Bad file descriptor")
    world.remove(4026532001)
    assert world.run() == detach_events(7, "veth7", 4026532001)
    assert [p.pod.name for p in world.state.snapshot.pods] == ["db-0"]
    world.pod(4026532003, 5, [(9, "veth9")], uid=None, pause_pid=300)
    assert world.run() == attach_events(9, "veth9", 4026532003)  # passes go on


@pytest.mark.usefixtures("links_exist")
def test_failure_forgotten_when_the_pod_goes(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.attacher.failing.add(7)
    world.run()
    world.remove(4026532001)
    world.run()
    assert world.reconciler.next_retry() is None
    assert world.state.snapshot.pods == ()


def test_attach_failing_because_the_link_vanished_is_no_error(world: World,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "_link_exists", lambda name: False)
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.attacher.failing.add(7)
    world.run()
    assert world.state.attach_errors == 0
    assert world.reconciler.next_retry() is None
    assert world.state.snapshot.pods[0].interfaces[0].last_error == ""
    assert world.run() == failed_attach_events(7, "veth7", 4026532001)  # tried again at once


@pytest.mark.usefixtures("links_exist")
def test_reused_ifindex_does_not_inherit_a_failure(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.attacher.failing.add(7)
    world.run()
    world.attacher.failing.clear()
    world.remove(4026532001)
    world.pod(4026532002, 4, [(7, "vethnew")], uid=UID_DB, pause_pid=200)
    world.clock.now += 0.5
    assert world.run() == attach_events(7, "vethnew", 4026532002)
    assert world.state.snapshot.pods[0].interfaces[0].last_error == ""


# -- shutdown -------------------------------------------------------------------------------------

def test_detach_all(world: World) -> None:
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.reconciler.detach_all()
    assert world.take() == detach_events(7, "veth7", 4026532001) + detach_events(
        8, "veth8", 4026532002)
    assert world.state.snapshot.pods == ()
    assert len(world.state.snapshot.index) == 0
    assert world.state.attached_pods() == 0
    assert world.slots.assigned() == {}
    assert world.run() == attach_events(7, "veth7", 4026532001) + attach_events(
        8, "veth8", 4026532002)  # a later pass starts from nothing


def test_detach_all_with_nothing_attached(world: World) -> None:
    world.reconciler.detach_all()
    assert world.take() == []
    assert world.state.snapshot.pods == ()


# -- pnm_netns and the probes' forget callbacks ---------------------------------------------------

NS_WEB, NS_DB = 4026532001, 4026532002


def test_sync_netns_maps_each_pod_to_its_first_attached_interface(world: World) -> None:
    world.pod(NS_WEB, 3, [(9, "veth9"), (7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    assert world.calls == [("sync_netns", {NS_WEB: 7, NS_DB: 8})]  # once per pass, after attaching
    world.run()
    assert world.calls[-1] == ("sync_netns", {NS_WEB: 7, NS_DB: 8})
    assert len(world.calls) == 2


@pytest.mark.usefixtures("links_exist")
def test_sync_netns_skips_interfaces_that_failed_to_attach(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7"), (9, "veth9")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.attacher.failing.update({7, 8})
    world.run()
    assert world.last_sync() == {NS_WEB: 9}  # web's first *attached* one; db has none


def test_sync_netns_drops_a_gone_pod(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.remove(NS_WEB)
    world.run()
    assert world.last_sync() == {NS_DB: 8}


def test_forget_called_for_each_detached_interface_after_its_slot_is_released(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    assert world.forgets() == []
    world.remove(NS_WEB)
    world.run()
    forgets = [c for c in world.calls if c[0].startswith("forget")]
    # every callback, in order; slot 7 released, and NS_WEB already out of pnm_netns
    assert forgets == [("forget", NS_WEB, [7], {NS_DB: 8}, {8: 1}),
                       ("forget2", NS_WEB, [7])]


def test_forget_error_is_contained(world: World) -> None:
    world.forget_errors[7] = OSError(9, "Bad file descriptor")
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.remove(NS_WEB)
    world.remove(NS_DB)
    assert world.run() == detach_events(7, "veth7", NS_WEB) + detach_events(8, "veth8", NS_DB)
    assert [c[:3] for c in world.calls if c[0].startswith("forget")] == [
        ("forget", NS_WEB, [7]), ("forget2", NS_WEB, [7]),  # the second callback still runs
        ("forget", NS_DB, [8]), ("forget2", NS_DB, [8])]
    assert world.state.snapshot.pods == ()
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    assert world.run() == attach_events(7, "veth7", NS_WEB)  # 7 was dropped from the attached set


def test_detach_all_forgets_every_interface(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7"), (9, "veth9")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.reconciler.detach_all()
    assert world.forgets() == [(NS_WEB, [7, 9])]  # one call per gone netns


def test_reused_ifindex_forgets_the_old_netns(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.remove(NS_WEB)
    world.pod(NS_DB, 4, [(7, "vethnew")], uid=UID_DB, pause_pid=200)
    world.run()
    assert world.forgets() == [(NS_WEB, [7])]
    assert world.last_sync() == {NS_DB: 7}


def test_a_netns_inode_taken_by_another_pod_in_the_same_pass_is_forgotten(world: World) -> None:
    # The kernel hands a freed netns inode to the next netns at once: a pod replacing
    # another within one pass, under the same inode, used to keep the old pod's keys
    # (its drops by netns) because the inode was still live (issue 14)
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.remove(NS_WEB)
    world.pod(NS_WEB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)  # the same inode
    world.run()
    assert world.forgets() == [(NS_WEB, [7])]
    assert world.last_sync() == {NS_WEB: 8}


def test_a_living_pod_keeps_its_netns_keys_when_one_interface_goes(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7"), (9, "veth9")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.links.links = [v for v in world.links.links if v.ifindex != 9]  # a secondary veth goes
    assert world.run() == detach_events(9, "veth9", NS_WEB)
    assert [p.pod.name for p in world.state.snapshot.pods] == ["web-1"]  # the pod lives on
    assert all(netns != NS_WEB for netns, _ in world.forgets())


def test_a_gone_pod_netns_leaves_pnm_netns_before_its_keys_are_forgotten(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.remove(NS_WEB)
    world.run()
    (forget,) = [c for c in world.calls if c[0] == "forget"]
    netns_at_forget = forget[3]
    assert NS_WEB not in netns_at_forget  # type: ignore[operator]


# -- the loop's sweep -----------------------------------------------------------------------------

class PipeEvents:
    """An EventSource that never fires: the read end of a pipe nobody writes to."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.closed = False

    def fileno(self) -> int:
        return self.r

    def drain(self) -> int:
        return 0

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)
        self.closed = True


def run_loop(world: World, sweep: Callable[[], None] | None, stop: threading.Event,
             sweep_interval: float = 0.02) -> PipeEvents:
    events = PipeEvents()
    exits: list[bool] = []
    loop = reconcileloop.Loop(world.reconciler, resync_interval=3600.0, debounce=0.0,
                          events_factory=lambda: events, state=world.state,
                          on_exit=lambda: exits.append(True), sweep=sweep,
                          sweep_interval=sweep_interval)
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    worker.join(timeout=10)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert exits == [True]
    return events


def test_loop_sweeps_between_passes(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    stop = threading.Event()
    sweeps: list[int] = []

    def sweep() -> None:
        sweeps.append(world.state.reconciles)
        if len(sweeps) == 3:
            stop.set()

    events = run_loop(world, sweep, stop)
    assert sweeps == [1, 1, 1]  # after the first pass; no resync due in between
    assert events.closed
    assert world.take() == attach_events(7, "veth7", NS_WEB) + detach_events(7, "veth7", NS_WEB)


def test_loop_survives_a_failing_sweep(world: World) -> None:
    stop = threading.Event()
    calls: list[int] = []

    def sweep() -> None:
        calls.append(1)
        if len(calls) == 3:
            stop.set()
        raise OSError(9, "Bad file descriptor")

    run_loop(world, sweep, stop)
    assert len(calls) == 3
    assert world.state.ready is True


# -- the series cap (max_pods) --------------------------------------------------------------------

def capped(max_pods: int = 2) -> World:
    metas = {f"uid-{i}": PodMeta("shop", f"pod-{i}", uid=f"uid-{i}") for i in range(10)}
    return World(FakeMetadata(metas), max_pods=max_pods)


def add_pod(world: World, i: int) -> None:
    world.pod(4026532100 + i, 100 + i, [(10 + i, f"veth{10 + i}")], uid=f"uid-{i}", pause_pid=1000 + i)


def identities(world: World) -> list[tuple[str, str, str]]:
    return [(p.pod.namespace, p.pod.name, p.pod.uid) for p in world.state.snapshot.pods]


OVER = ("_overflow", "_overflow")


def test_cap_holds_and_folded_pods_are_still_attached() -> None:
    world = capped(2)
    for i in range(4):
        add_pod(world, i)
    events = world.run()
    assert identities(world) == [("shop", "pod-0", "uid-0"), ("shop", "pod-1", "uid-1"),
                                 (*OVER, "uid-2"), (*OVER, "uid-3")]
    assert world.state.series_dropped == 2
    assert [e for e in events if e[0] == "attach"] == [  # nothing lost: every pod is counted
        ("attach", 10, "veth10", 4026532100), ("attach", 11, "veth11", 4026532101),
        ("attach", 12, "veth12", 4026532102), ("attach", 13, "veth13", 4026532103)]
    folded = world.state.snapshot.index.by_ifindex(12)
    assert folded is not None
    assert (folded.namespace, folded.name, folded.uid, folded.has_metadata) == (*OVER, "uid-2", True)
    assert world.state.snapshot.index.by_netns(4026532103).key == OVER  # type: ignore[union-attr]


def test_folded_pods_stay_folded_while_they_live() -> None:
    world = capped(2)
    for i in range(4):
        add_pod(world, i)
    world.run()
    world.remove(4026532100)  # a place frees up...
    world.run()
    world.run()
    assert identities(world) == [("shop", "pod-1", "uid-1"), (*OVER, "uid-2"), (*OVER, "uid-3")]
    assert world.state.series_dropped == 2  # each folded pod counted once, whatever the passes


def test_a_freed_place_goes_to_a_new_pod_not_to_a_folded_one() -> None:
    world = capped(2)
    for i in range(3):
        add_pod(world, i)
    world.run()
    world.remove(4026532100)
    world.run()
    add_pod(world, 4)
    world.run()
    assert identities(world) == [("shop", "pod-1", "uid-1"), (*OVER, "uid-2"), ("shop", "pod-4", "uid-4")]
    assert world.state.series_dropped == 1
    add_pod(world, 5)  # full again
    world.run()
    world.run()
    assert identities(world)[-1] == (*OVER, "uid-5")
    assert world.state.series_dropped == 2


def test_a_folded_pod_that_goes_is_forgotten() -> None:
    world = capped(1)
    add_pod(world, 0)
    add_pod(world, 1)
    world.run()
    world.remove(4026532100)
    world.remove(4026532101)
    world.run()
    assert identities(world) == []
    add_pod(world, 1)  # the same netns inode back (inodes are reused): a new pod, with a place
    world.run()
    assert identities(world) == [("shop", "pod-1", "uid-1")]
    assert world.state.series_dropped == 1


def test_one_overflow_pod_info_for_all_folded_pods() -> None:
    from monitor.probes import packets
    from tests.unit.fakes import DictMaps, kernel, registry_of, sample_names
    from tests.unit.test_collector import DaemonCollectors

    world = capped(1)
    for i in range(4):
        add_pod(world, i)
    world.run()
    collector = DaemonCollectors(probes=[packets.PROBE], maps=DictMaps(), state=world.state,
                                 node="node-1", kernel=kernel(), node_slot=1024)
    samples = sample_names(registry_of(collector.collect), "podnet_pod_info")
    assert sorted((labels["namespace"], labels["pod"]) for _n, labels, _v in samples) == [
        OVER, ("shop", "pod-0")]
    assert registry_of(collector.collect).get_sample_value(
        "podnet_monitor_series_dropped_total") == 3


def test_a_pod_replacing_another_in_the_same_pass_gets_its_place() -> None:
    world = capped(2)
    add_pod(world, 0)
    add_pod(world, 1)
    world.run()
    world.remove(4026532100)
    add_pod(world, 2)  # a rollout: one goes, one comes, within one debounce window
    world.run()
    assert identities(world) == [("shop", "pod-1", "uid-1"), ("shop", "pod-2", "uid-2")]
    assert world.state.series_dropped == 0


# -- pod UIDs from the runtimes' bundles, for pinned netns without one ----------------------------

class RuntimeUids:
    def __init__(self, uids: dict[str, str]) -> None:
        self.uids, self.calls = uids, 0

    def __call__(self) -> dict[str, str]:
        self.calls += 1
        return dict(self.uids)


def test_runtime_uid_for_a_pinned_netns_without_one(tmp_path: Path) -> None:
    (tmp_path / "run" / "netns").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to(tmp_path / "run")
    pinned = str(tmp_path / "var" / "run" / "netns" / "5f1c7e2a")  # spelt through the link
    runtime = RuntimeUids({str(tmp_path / "run" / "netns" / "5f1c7e2a"): UID_DB})
    metadata = FakeMetadata({UID_WEB: WEB, UID_DB: DB})
    world = World(metadata, runtime_uids=runtime)
    world.pod(4026532002, 4, [(8, "veth8")], pinned=pinned)
    world.run()
    assert runtime.calls == 1
    assert metadata.lookups == [(UID_DB, [pinned])]
    (status,) = world.state.snapshot.pods
    assert (status.pod.namespace, status.pod.name, status.pod.uid, status.pod.has_metadata) == (
        "shop", "db-0", UID_DB, True)
    pod = world.state.snapshot.index.by_ifindex(8)
    assert pod is not None
    assert pod.network.uid == UID_DB


def test_runtime_uids_not_read_when_every_netns_has_a_uid() -> None:
    runtime = RuntimeUids({"/run/netns/cni-a": "other"})
    world = World(runtime_uids=runtime)
    world.pod(4026532001, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(4026532002, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200, pinned="/run/netns/cni-a")
    world.pod(4026532003, 5, [(9, "veth9")], uid=None, pause_pid=300)  # no UID, but not pinned
    world.run()
    assert runtime.calls == 0
    assert [p.pod.uid for p in world.state.snapshot.pods] == [UID_WEB, UID_DB, ""]


def test_a_podman_container_names_a_pinned_netns_no_source_names() -> None:
    podman = PodMeta("_podman", "web", uid="9dfe1d358170", workload="web",
                     workload_kind="Container")
    calls: list[int] = []

    def names() -> dict[str, PodMeta]:
        calls.append(1)
        return {os.path.realpath("/run/netns/netns-1"): podman,
                os.path.realpath("/run/netns/netns-2"): podman}

    metadata = FakeMetadata({UID_WEB: WEB}, by_path={"/run/netns/netns-2": DB})
    world = World(metadata, runtime_names=names)
    world.pod(4026532001, 3, [(7, "veth7")], pinned="/run/netns/netns-1")
    world.pod(4026532002, 4, [(8, "veth8")], pinned="/run/netns/netns-2")  # the inventory's
    world.pod(4026532003, 5, [(9, "veth9")], uid=UID_WEB, pause_pid=300)
    world.run()
    assert len(calls) == 1  # once a pass, for every pinned netns the sources do not name
    assert sorted((p.pod.namespace, p.pod.name, p.pod.uid) for p in world.state.snapshot.pods) == [
        ("_podman", "web", "9dfe1d358170"), ("shop", "db-0", UID_DB), ("shop", "web-1", UID_WEB)]


def test_runtime_uids_read_once_a_pass() -> None:
    runtime = RuntimeUids({os.path.realpath("/run/netns/uuid-1"): UID_WEB})
    metadata = FakeMetadata({UID_WEB: WEB})
    world = World(metadata, runtime_uids=runtime)
    world.pod(4026532001, 3, [(7, "veth7")], pinned="/run/netns/uuid-1")
    world.pod(4026532002, 4, [(8, "veth8")], pinned="/run/netns/uuid-2")  # no bundle names it
    world.run()
    assert runtime.calls == 1
    world.run()
    assert runtime.calls == 2
    assert metadata.lookups[:2] == [(UID_WEB, ["/run/netns/uuid-1"]), (None, ["/run/netns/uuid-2"])]
    assert [(p.pod.namespace, p.pod.name, p.pod.uid) for p in world.state.snapshot.pods] == [
        ("shop", "web-1", UID_WEB), ("_unknown", "netns-4026532002", "")]


# -- the loop's wake-up pipe ---------------------------------------------------------------------

def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_wake_runs_a_pass(world: World) -> None:
    events = PipeEvents()
    stop = threading.Event()
    loop = reconcileloop.Loop(world.reconciler, resync_interval=3600.0, debounce=0.0,
                          events_factory=lambda: events, state=world.state)
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    try:
        assert wait_until(lambda: world.state.reconciles == 1)
        world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
        time.sleep(0.1)
        assert world.state.reconciles == 1  # nothing else asks for a pass
        loop.wake()
        assert wait_until(lambda: world.state.reconciles == 2)
        assert [p.pod.name for p in world.state.snapshot.pods] == ["web-1"]
    finally:
        stop.set()
        worker.join(timeout=5)
    assert not worker.is_alive()


def test_wakes_in_a_burst_cost_one_pass(world: World) -> None:
    events = PipeEvents()
    stop = threading.Event()
    loop = reconcileloop.Loop(world.reconciler, resync_interval=3600.0, debounce=0.05,
                          events_factory=lambda: events, state=world.state)
    for _ in range(10):
        loop.wake()
    worker = threading.Thread(target=loop.run, args=(stop,))
    worker.start()
    try:
        assert wait_until(lambda: world.state.reconciles == 2)  # the first pass, then the wakes'
        time.sleep(0.2)
        assert world.state.reconciles == 2
    finally:
        stop.set()
        worker.join(timeout=5)


def test_wake_after_the_loop_ended_writes_nowhere(world: World) -> None:
    stop = threading.Event()
    stop.set()
    loop = reconcileloop.Loop(world.reconciler, resync_interval=3600.0, debounce=0.0,
                          events_factory=PipeEvents, state=world.state)
    loop.run(stop)  # one pass, then out: its pipe is closed
    r, w = os.pipe()  # likely the numbers the loop's pipe had
    try:
        loop.wake()
        readable, _, _ = select.select([r], [], [], 0)
        assert readable == []
    finally:
        os.close(r)
        os.close(w)


# -- what the reconciler says once, not every pass -----------------------------------------------

def test_unreadable_pause_netns_logged_when_it_changes(world: World) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        world.discovery.denied = [4242, 4243]
        world.run()
        world.run()
        world.discovery.denied = []
        world.run()
        world.discovery.denied = [4242]
        world.run()
    said = [(e["pids"], e["count"], e["log_level"]) for e in logs
            if e["event"].startswith("pause processes whose netns cannot be read")]
    assert said == [([4242, 4243], 2, "error"), ([4242], 1, "error")]


def test_cap_reached_logged_once() -> None:
    from structlog.testing import capture_logs

    world = capped(1)
    with capture_logs() as logs:
        for i in range(3):
            add_pod(world, i)
            world.run()
    said = [e for e in logs if e["event"].startswith("pod series cap reached")]
    assert [(e["max_pods"], e["pod"], e["log_level"]) for e in said] == [(1, "pod-1", "warning")]


def test_verify_reattaches_where_ours_went_missing_and_keeps_the_slot(world: World) -> None:
    # Our filter removed under a running daemon (a CNI recreating its qdisc, an admin, a
    # killed `run --check`) used never to come back: attached_pods still said 4 (issue 21)
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.events.clear()
    world.attacher.broken = {7: "filter gone"}
    assert world.reconciler.verify() == 1
    assert world.events == [("detach", 7, "veth7", NS_WEB), ("attach", 7, "veth7", NS_WEB)]
    assert world.state.reattaches() == {"filter gone": 1}
    world.attacher.broken = {}
    assert world.reconciler.verify([7, 8, 99]) == 0  # fine now; 99 is nobody's
    assert world.slots.slots == {7: 0, 8: 1}  # the slot stayed: the counts carry on


def test_devices_attached_long_enough_move_to_tcx_oldest_first_within_the_limit(
        world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.clock.now += 30
    world.pod(NS_DB, 4, [(8, "veth8")], uid=UID_DB, pause_pid=200)
    world.run()
    world.clock.now += 30
    world.events.clear()
    # both attached before now - 10 s; the limit lets one go: the one attached first
    assert world.reconciler.move_to_tcx(world.clock() - 10, 1) == 1
    assert world.events == [("attach", 7, "veth7", NS_WEB, "tcx")]
    # only veth8 is still on tc, and it was attached 30 s ago: not before now - 40 s
    assert world.reconciler.move_to_tcx(world.clock() - 40, 5) == 0
    assert world.reconciler.move_to_tcx(world.clock() - 10, 5) == 1
    assert world.events[-1] == ("attach", 8, "veth8", NS_DB, "tcx")
    assert world.reconciler.move_to_tcx(world.clock(), 5) == 0  # nothing left on tc
    assert world.state.reattaches() == {"moved to tcx": 2}
    assert world.slots.slots == {7: 0, 8: 1}  # the slots stayed: the counts carry on
    world.take()
    # the next pass publishes the new mode, and attaches nothing again
    assert not [e for e in world.run() if e[0] in ("attach", "detach")]
    assert {i.ifindex: i.attach_mode for p in world.state.snapshot.pods
            for i in p.interfaces} == {7: "tcx", 8: "tcx"}


def test_a_move_that_fails_stays_on_tc_and_is_not_tried_again(world: World) -> None:
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.attacher.failing = {7}
    world.events.clear()
    assert world.reconciler.move_to_tcx(world.clock() + 1, 5) == 0
    assert world.events == [("attach", 7, "veth7", NS_WEB, "tcx")]  # no detach: tc counts on
    world.attacher.failing = set()
    assert world.reconciler.move_to_tcx(world.clock() + 1, 5) == 0
    assert len(world.events) == 1
    assert world.state.reattaches() == {}


def test_a_move_to_tcx_is_not_detached_first(world: World) -> None:
    # Another agent's classic filter now runs before ours: the attacher moves the device
    # to tcx while our filter still counts (attach.py's move); detaching first would
    # lose what passes between the two calls.
    world.pod(NS_WEB, 3, [(7, "veth7")], uid=UID_WEB, pause_pid=100)
    world.run()
    world.events.clear()
    world.attacher.broken = {7: FILTER_RUNS_FIRST}
    assert world.reconciler.verify() == 1
    assert world.events == [("attach", 7, "veth7", NS_WEB)]
    assert world.state.reattaches() == {FILTER_RUNS_FIRST: 1}
