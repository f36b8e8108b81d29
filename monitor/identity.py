"""Who a pod is: plain frozen data, and the index the collector resolves kernel keys with.

Kernel maps are keyed by host-veth ifindex (TC programs) or netns inode
(tracepoints). Both numbers are reused by the kernel, so the index is rebuilt
from scratch by every reconcile and swapped in whole: a scrape sees either
the old picture or the new one, never a mix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# The names Kubernetes gives (k8s.io/apimachinery validation): a namespace is a DNS-1123
# label, a pod name a DNS-1123 subdomain (checked loosely: dots anywhere inside).
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
POD_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# A pod UID as the kubelet writes it into cgroup paths (monitor/discovery.py finds it
# there): an RFC 4122 UUID from the API server, or, for a static pod whose manifest
# names none, the kubelet's config hash (pkg/kubelet/config/common.go: the hex of an
# MD5, 32 characters). Lower case, as both are written.
POD_UID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


# A pod network with no metadata still gets series: under this namespace (a name
# Kubernetes cannot give a namespace, so it never collides with a real one) and a
# pod name made from its netns inode, which is stable for the pod's lifetime.
UNKNOWN_NAMESPACE = "_unknown"


# Pods beyond the series cap (settings.max_pods) are all counted under this one
# identity, namespace and pod alike: nothing is lost, and cardinality is bounded.
OVERFLOW = "_overflow"


def fallback_pod_name(netns_inode: int) -> str:
    return f"netns-{netns_inode}"


@dataclass(frozen=True)
class HostVeth:
    """The host side of a pod's veth pair."""

    ifindex: int
    name: str
    peer_ifindex: int = 0


@dataclass(frozen=True)
class PodMeta:
    """What a metadata source knows about a pod."""

    namespace: str
    name: str
    uid: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    workload: str = ""
    workload_kind: str = ""


@dataclass(frozen=True)
class PodNetwork:
    """A pod network namespace as discovery sees it in the kernel."""

    netns_inode: int
    open_path: str  # a path that opens this netns: /proc/PID/ns/net or a pinned file
    pause_pid: int | None = None
    pinned_path: str | None = None
    uid: str | None = None  # from the pause process's cgroup path, when there is one


@dataclass(frozen=True)
class Pod:
    """A monitored pod: its network as the kernel shows it, joined with its metadata."""

    netns_inode: int
    interfaces: tuple[HostVeth, ...]
    meta: PodMeta
    has_metadata: bool
    network: PodNetwork = field(compare=False)

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def uid(self) -> str:
        return self.meta.uid or (self.network.uid or "")

    @property
    def key(self) -> tuple[str, str]:
        return (self.meta.namespace, self.meta.name)


def identify(network: PodNetwork, interfaces: Iterable[HostVeth], meta: PodMeta | None) -> Pod:
    """Join a pod network with its metadata, or with the documented fallback identity."""
    if meta is None:
        fallback = PodMeta(UNKNOWN_NAMESPACE, fallback_pod_name(network.netns_inode),
                           uid=network.uid or "")
        return Pod(network.netns_inode, tuple(interfaces), fallback, False, network)
    return Pod(network.netns_inode, tuple(interfaces), meta, True, network)


def fold(pod: Pod) -> Pod:
    """The same pod network under the overflow identity."""
    meta = PodMeta(OVERFLOW, OVERFLOW, uid=pod.uid)
    return Pod(pod.netns_inode, pod.interfaces, meta, pod.has_metadata, pod.network)


class IdentityIndex:
    """An immutable lookup from kernel keys (ifindex, netns inode) to pods."""

    def __init__(self, pods: Iterable[Pod] = (), slots: Mapping[int, int] | None = None) -> None:
        """`slots` maps the ifindex of each attached interface to its counter slot."""
        self._pods: tuple[Pod, ...] = tuple(pods)
        self._by_ifindex: Mapping[int, Pod] = {
            veth.ifindex: pod for pod in self._pods for veth in pod.interfaces}
        self._by_netns: Mapping[int, Pod] = {pod.netns_inode: pod for pod in self._pods}
        self._slot_of: Mapping[int, int] = {
            ifindex: slot for ifindex, slot in (slots or {}).items() if ifindex in self._by_ifindex}
        self._slots: tuple[tuple[int, Pod], ...] = tuple(
            (slot, self._by_ifindex[ifindex]) for ifindex, slot in sorted(self._slot_of.items()))

    def pods(self) -> tuple[Pod, ...]:
        return self._pods

    def by_ifindex(self, ifindex: int) -> Pod | None:
        return self._by_ifindex.get(ifindex)

    def by_netns(self, inode: int) -> Pod | None:
        return self._by_netns.get(inode)

    def slot_of(self, ifindex: int) -> int | None:
        """The counter slot of an attached interface."""
        return self._slot_of.get(ifindex)

    def slots(self) -> tuple[tuple[int, Pod], ...]:
        """(slot, pod) for every attached interface: where the TC counters are."""
        return self._slots

    def __len__(self) -> int:
        return len(self._pods)
