"""Keeps what is attached equal to what the kernel shows, by set difference.

One pass: discover pod netns (pause processes, pinned files), find each one's
host veths through the host's nsid for it, look up metadata, then attach to
new interfaces and detach from vanished ones (or ones whose ifindex now
belongs to another netns: ifindexes are reused). Passes run on netlink link
events (debounced) and on a periodic resync. Failure is contained per
interface: logged, counted, retried with backoff. Detaching a vanished
interface is normal. When passes run (events, timers, wake-ups) is
monitor/reconcileloop.py's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from monitor import discovery, log
from monitor.identity import HostVeth, IdentityIndex, Pod, PodMeta, PodNetwork, fold, identify
from monitor.kernel.records import FILTER_RUNS_FIRST, Attachment, VethLink
from monitor.metadata import MetadataSource
from monitor.state import InterfaceStatus, MonitorState, PodStatus, Snapshot

RETRY_FIRST = 1.0  # seconds before the first retry of a failed attach
RETRY_MAX = 60.0
MOVED_TO_TCX = "moved to tcx"  # podnet_monitor_reattaches_total's reason for a move


class Links(Protocol):
    def veths(self) -> Sequence[VethLink]: ...
    def netnsid(self, netns_path: str) -> int | None: ...


class AttachPort(Protocol):
    def attach(self, ifindex: int, ifname: str, netns: int, *,
               mode: str | None = None) -> Attachment: ...
    def detach(self, att: Attachment) -> None: ...

    def verify(self, att: Attachment) -> str:
        """Why the attachment is not what it should be; "" when it is."""


# A probe deleting its keys for a gone pod's netns (None: the pod lives on) and for
# detached interfaces: netns inodes and ifindexes are both reused by the kernel.
Forget = Callable[[int | None, Sequence[int]], None]


class Slots(Protocol):
    """monitor.slots.SlotTable: counter slots for attached interfaces."""

    def assign(self, ifindex: int, netns: int) -> int: ...
    def release_unclaimed(self) -> list[int]: ...
    def release(self, ifindex: int) -> None: ...
    def assigned(self) -> dict[int, int]: ...
    def sync_netns(self, wanted: dict[int, int]) -> None: ...


@dataclass
class Discovery:
    """Where and how to look for pod networks (and what earlier scans learnt)."""

    proc_root: str
    pause_comm: str
    netns_dirs: Sequence[str]
    # pod UIDs of pause processes by (pid, netns inode): their cgroup files are read once
    _uids: dict[tuple[int, int], str | None] = field(default_factory=dict, repr=False)

    def scan(self, denied: list[int] | None = None) -> list[PodNetwork]:
        return discovery.discover(self.proc_root, self.pause_comm, self.netns_dirs, denied,
                                  self._uids)


@dataclass
class _Failure:
    error: str
    attempts: int
    retry_at: float
    netns: int  # an ifindex reused by another pod's veth starts afresh


class Reconciler:
    """Owns every attachment; runs in one thread (netlink sockets are per thread)."""

    def __init__(self, *, discovery: Discovery, links: Links, attacher: AttachPort,
                 slots: Slots, metadata: MetadataSource, state: MonitorState,
                 forget: Sequence[Forget] = (), node: str = "", max_pods: int = 1000,
                 runtime_uids: Callable[[], dict[str, str]] | None = None,
                 runtime_names: Callable[[], dict[str, PodMeta]] | None = None,
                 after_first_pass: Callable[[set[int], set[int]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._discovery, self._links, self._attacher = discovery, links, attacher
        self._slots, self._forget, self._node = slots, list(forget), node
        self._detached: list[Attachment] = []  # in this pass, for the probes to forget
        self._max_pods, self._runtime_uids = max_pods, runtime_uids
        # names of containers no pod owns (podman's): for a pinned netns no source names
        self._runtime_names = runtime_names
        self._own_series: set[int] = set()  # netns inodes of pods with series of their own
        self._folded: set[int] = set()  # netns inodes of pods counted under _overflow
        self._cap_logged = False
        self._denied_logged = False
        self._metadata, self._state, self._clock = metadata, state, clock
        # Called once, after the first pass, with the attached ifindexes and live pod
        # netns: what a previous daemon left for pods gone since is removed then.
        self._after_first_pass = after_first_pass
        self._attached: dict[int, Attachment] = {}
        self._unmovable: set[int] = set()  # ifindexes whose move to tcx failed
        self._failures: dict[int, _Failure] = {}
        # The host's nsid of each pod netns, by (inode, the path it was opened by): an nsid
        # stays while its netns lives, and a path (/proc/<pause pid>/ns/net, a runtime's
        # pin with a random name) with the same inode again is the same netns. Asking the
        # kernel for 500 of them each pass was a third of an idle pass's cost.
        self._nsids: dict[tuple[int, str], int] = {}
        self._netns_owners: dict[int, tuple[str, int | None, str | None]] = {}  # see reconcile
        self._log = log.get("reconcile")

    # -- one pass -------------------------------------------------------------

    def reconcile(self) -> None:
        started = self._clock()
        self._metadata.refresh()
        pods = self._current_pods()
        desired = {veth.ifindex: (pod, veth) for pod in pods for veth in pod.interfaces}
        for ifindex, att in list(self._attached.items()):
            want = desired.get(ifindex)
            if want is None or want[0].netns_inode != att.netns or want[1].name != att.ifname:
                self._detach(att, reason="gone" if want is None else "reused")
        for ifindex, failure in list(self._failures.items()):
            want = desired.get(ifindex)
            if want is None or want[0].netns_inode != failure.netns:
                del self._failures[ifindex]
        for ifindex, (pod, veth) in sorted(desired.items()):
            if ifindex not in self._attached:
                self._try_attach(pod, veth)
        live = {pod.netns_inode: attached[0] for pod in pods
                if (attached := [v.ifindex for v in pod.interfaces if v.ifindex in self._attached])}
        self._slots.sync_netns(live)  # first: a gone netns stops counting before it is forgotten
        # A netns inode freed by a gone pod is the next netns's at once (the kernel hands
        # out the lowest free one): a new pod in the same pass must not keep the old one's
        # keys (its drops by netns), so an inode whose pod changed counts as gone.
        owners = {pod.netns_inode: _netns_owner(pod) for pod in pods}
        reused = {inode for inode, who in owners.items()
                  if self._netns_owners.get(inode, who) != who}
        self._netns_owners = owners
        self._forget_detached(set(live) - reused)
        if self._after_first_pass is not None:
            self._first_pass_done(set(live))
        self._publish(pods)
        self._state.count_reconcile(self._clock() - started)

    def _current_pods(self) -> list[Pod]:
        by_nsid: dict[int, list[HostVeth]] = {}
        for link in self._links.veths():
            by_nsid.setdefault(link.link_netnsid, []).append(
                HostVeth(link.ifindex, link.name, link.peer_ifindex))
        pods = []
        runtime_uids: dict[str, str] | None = None
        runtime_names: dict[str, PodMeta] | None = None
        denied: list[int] = []
        networks = self._discovery.scan(denied)
        if bool(denied) != self._denied_logged:  # log the change, not every pass
            self._denied_logged = bool(denied)
            if denied:
                self._log.error("pause processes whose netns cannot be read: their pods are not "
                                "watched (is CAP_SYS_PTRACE missing?)", pids=denied[:10],
                                count=len(denied))
        nsids: dict[tuple[int, str], int] = {}
        for network in networks:
            nsid_key = (network.netns_inode, network.open_path)
            nsid = self._nsids.get(nsid_key)
            if nsid is None:
                nsid = self._links.netnsid(network.open_path)
            if nsid is not None:  # none yet: the kernel numbers it when a veth is wired
                nsids[nsid_key] = nsid
            interfaces = by_nsid.get(nsid, []) if nsid is not None else []
            if not interfaces:
                continue  # not wired yet, or host networking: nothing of its own to watch
            known = network
            if network.uid is None and network.pinned_path and self._runtime_uids:
                if runtime_uids is None:  # read the runtimes' bundles once a pass, if needed
                    runtime_uids = self._runtime_uids()
                uid = runtime_uids.get(os.path.realpath(network.pinned_path))
                if uid:
                    known = dataclasses.replace(network, uid=uid)
            paths = [p for p in (known.pinned_path,) if p]
            meta = self._metadata.lookup(known.uid, paths)
            if meta is None and known.uid is None and known.pinned_path and self._runtime_names:
                if runtime_names is None:
                    runtime_names = self._runtime_names()
                meta = runtime_names.get(os.path.realpath(known.pinned_path))
            pods.append(identify(known, sorted(interfaces, key=lambda v: v.ifindex), meta))
        self._nsids = nsids  # only the namespaces still here
        seen = {p.netns_inode for p in pods}
        self._own_series &= seen  # first: a pod gone frees its place for one arriving now
        self._folded &= seen
        return [self._cap(pod) for pod in pods]

    def _cap(self, pod: Pod) -> Pod:
        """Pods beyond max_pods share the overflow identity, for their whole life."""
        if pod.netns_inode in self._own_series:
            return pod
        if pod.netns_inode not in self._folded and len(self._own_series) < self._max_pods:
            self._own_series.add(pod.netns_inode)
            return pod
        if pod.netns_inode not in self._folded:
            self._folded.add(pod.netns_inode)
            self._state.count_series_dropped()
            if not self._cap_logged:
                self._cap_logged = True
                self._log.warning("pod series cap reached: further pods count under _overflow",
                                  max_pods=self._max_pods, namespace=pod.namespace, pod=pod.name)
        return fold(pod)

    def _try_attach(self, pod: Pod, veth: HostVeth) -> None:
        failure = self._failures.get(veth.ifindex)
        if failure is not None and self._clock() < failure.retry_at:
            return
        bound = self._log.bind(namespace=pod.namespace, pod=pod.name, interface=veth.name,
                               ifindex=veth.ifindex, netns=pod.netns_inode)
        try:
            self._slots.assign(veth.ifindex, pod.netns_inode)  # before attaching: the first packet counts
            att = self._attacher.attach(veth.ifindex, veth.name, pod.netns_inode)
        except Exception as exc:  # noqa: BLE001 - contained per interface by design
            self._release(veth.ifindex)
            if not _link_exists(veth.name):
                bound.debug("interface vanished while attaching")
                return
            attempts = failure.attempts + 1 if failure else 1
            delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
            self._failures[veth.ifindex] = _Failure(str(exc), attempts, self._clock() + delay,
                                                    pod.netns_inode)
            self._state.count_attach_error()
            bound.error("attach failed", error=str(exc), attempts=attempts, retry_in=delay)
            return
        self._failures.pop(veth.ifindex, None)
        self._attached[veth.ifindex] = att
        bound.info("attached", mode=att.mode)

    def verify(self, ifindexes: Iterable[int] | None = None, *, mode: str = "") -> int:
        """Re-attach wherever ours is not what we believe (our filter or link removed by
        someone else, or a classic filter now running before ours where tcx can go
        first); `mode`: only attachments of that mode. Returns how many were re-attached.
        The slot stays: the counts carry on, and what passed meanwhile is the gap."""
        done = 0
        wanted = list(self._attached) if ifindexes is None else ifindexes
        for ifindex in sorted(set(wanted)):
            att = self._attached.get(ifindex)
            if att is None or (mode and att.mode != mode):
                continue
            try:
                reason = self._attacher.verify(att)
            except OSError as exc:
                self._log.debug("attachment not verified", ifindex=ifindex, error=str(exc))
                continue
            if not reason:
                continue
            bound = self._log.bind(interface=att.ifname, ifindex=ifindex, netns=att.netns)
            try:
                if reason != FILTER_RUNS_FIRST:  # a move counts on the old hook until the new one does
                    self._attacher.detach(att)  # whatever is left of ours
                new = self._attacher.attach(att.ifindex, att.ifname, att.netns)
            except Exception as exc:  # noqa: BLE001 - contained per interface by design
                del self._attached[ifindex]  # the next pass attaches it again, with backoff
                self._failures[ifindex] = _Failure(str(exc), 1, self._clock() + RETRY_FIRST,
                                                   att.netns)
                self._state.count_attach_error()
                bound.error("re-attach failed", reason=reason, error=str(exc))
                continue
            self._attached[ifindex] = new
            self._state.count_reattach(reason)
            bound.warning("re-attached", reason=reason, mode=new.mode, was=att.mode)
            done += 1
        return done

    def move_to_tcx(self, attached_before: float, limit: int) -> int:
        """Move up to `limit` devices attached by classic tc since before `attached_before`
        (wall clock) to tcx, the longest-attached first; the attacher counts every packet
        once through a move. One that fails stays on classic tc, still counting, and is
        not tried again. Returns how many moved."""
        due = sorted((att for att in self._attached.values()
                      if att.mode == "tc" and att.since <= attached_before
                      and att.ifindex not in self._unmovable), key=lambda a: a.since)
        moved = 0
        for att in due[:limit]:
            bound = self._log.bind(interface=att.ifname, ifindex=att.ifindex, netns=att.netns)
            try:
                new = self._attacher.attach(att.ifindex, att.ifname, att.netns, mode="tcx")
            except Exception as exc:  # noqa: BLE001 - contained per interface by design
                self._unmovable.add(att.ifindex)
                bound.warning("move to tcx failed: stays on classic tc", error=str(exc))
                continue
            new.since = att.since
            self._attached[att.ifindex] = new
            self._state.count_reattach(MOVED_TO_TCX)
            bound.info("moved to tcx")
            moved += 1
        return moved

    def _detach(self, att: Attachment, *, reason: str) -> None:
        self._unmovable.discard(att.ifindex)  # the ifindex may come back as another device's
        self._attacher.detach(att)
        self._release(att.ifindex)
        self._detached.append(att)
        del self._attached[att.ifindex]
        self._log.info("detached", interface=att.ifname, ifindex=att.ifindex,
                       netns=att.netns, reason=reason)

    def _first_pass_done(self, live_netns: set[int]) -> None:
        """Release what a previous daemon held for pods that went while none ran."""
        callback, self._after_first_pass = self._after_first_pass, None
        if callback is None:
            return
        gone = self._slots.release_unclaimed()
        if gone:
            self._log.info("released slots of interfaces gone while no daemon ran",
                           ifindexes=gone[:20], count=len(gone))
        try:
            callback(set(self._attached), live_netns)
        except OSError as exc:
            self._log.warning("cleaning up after the previous daemon failed", error=str(exc))

    def _forget_detached(self, live_netns: set[int]) -> None:
        """Let probes delete keys of this pass's detached interfaces, and of gone netns."""
        by_netns: dict[int, list[int]] = {}
        for att in self._detached:
            by_netns.setdefault(att.netns, []).append(att.ifindex)
        self._detached.clear()
        for netns, ifindexes in by_netns.items():
            gone = None if netns in live_netns else netns
            for forget in self._forget:
                try:
                    forget(gone, ifindexes)
                except OSError as exc:
                    self._log.warning("probe keys not deleted", netns=netns, error=str(exc))

    def _release(self, ifindex: int) -> None:
        try:
            self._slots.release(ifindex)
        except OSError as exc:
            self._log.warning("slot not released", ifindex=ifindex, error=str(exc))

    def _publish(self, pods: list[Pod]) -> None:
        statuses = []
        for pod in pods:
            ifs = []
            for veth in pod.interfaces:
                att = self._attached.get(veth.ifindex)
                failure = self._failures.get(veth.ifindex)
                ifs.append(InterfaceStatus(veth, att.mode if att else "",
                                           att.since if att else None,
                                           failure.error if failure else ""))
            statuses.append(PodStatus(pod, tuple(ifs)))
        self._state.publish(Snapshot(IdentityIndex(pods, self._slots.assigned()),
                                     tuple(statuses)))

    def next_retry(self) -> float | None:
        return min((f.retry_at for f in self._failures.values()), default=None)

    def detach_all(self) -> None:
        for att in list(self._attached.values()):
            self._detach(att, reason="shutdown")
        self._slots.sync_netns({})
        self._forget_detached(set())
        self._state.publish(Snapshot())


def _netns_owner(pod: Pod) -> tuple[str, int | None, str | None]:
    """Who holds a netns: what tells two pods apart when one's inode is the other's."""
    return (pod.uid, pod.network.pause_pid, pod.network.pinned_path)


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")
