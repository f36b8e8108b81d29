"""What a probe is: one C file in bpf/, one Python module here, one registry entry.

A probe says which hooks it needs (a function the TC programs call for every
packet, tracepoints), which maps it owns with their layouts (checked against
the kernel's view of each map, so Python never reads one with the wrong
layout), what it needs of the kernel (parsed ports, struct offsets, function
addresses), which daemon settings it owns, what it takes from the daemon and
what the daemon builds on it, and how its maps become metric families at scrape
time. Everything else is derived from the registry of these (monitor/probes/
__init__.py): the tracepoint formats and offsets the kernel is asked for, the
settings' flags, and the daemon's wiring.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from monitor.exposition import Family, HistogramFamily
from monitor.identity import IdentityIndex
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import MapReader

# The node's own series: events no pod owns (a drop on the host's eth0, the
# retransmits of a host process). A name Kubernetes cannot give a namespace.
NODE_NAMESPACE = "_node"
HIST_BUCKETS = 28  # bpf/pnm.h PNM_HIST_BUCKETS: le = 2^i us for i < 27, then +Inf
# The le values as written: 2^i us in seconds, as Python's repr() prints them ("1e-06"...)
LE = (*(repr((2**i) / 1e6) for i in range(HIST_BUCKETS - 1)), "+Inf")


@dataclass(frozen=True)
class MapLayout:
    """A map's key and value types, as C declares them."""

    key: type[ctypes._SimpleCData[int]] | type[ctypes.Structure]
    value: type[ctypes.Structure] | type[ctypes._SimpleCData[int]]
    per_slot: bool = False  # an array indexed by slot (monitor/slots.py), max_interfaces + 1
    #                         entries (the last is the node's), zeroed before a slot is reused
    slot_keyed: bool = False  # a hash whose keys begin with a u32 slot: its entries of a
    #                           slot are deleted before the slot is handed out again
    copies: int = 1  # per_slot: that many such arrays back to back in one map (slot s at
    #                  s + k * (max_interfaces + 1)): one map the programs index by epoch
    #                  is one map pointer, which the verifier can inline (two cannot be)


@dataclass(frozen=True)
class Scrape:
    """What a probe's collector reads: the maps, who owns which key, the kernel's facts."""

    maps: MapReader
    index: IdentityIndex
    kernel: KernelInfo
    node: str
    node_slot: int

    def slots(self, with_node: bool = False) -> Iterator[tuple[int, tuple[str, str]]]:
        """(slot, (namespace, pod)) for every attached interface, and the node's slot."""
        for slot, pod in self.index.slots():
            yield slot, (pod.namespace, pod.name)
        if with_node:
            yield self.node_slot, (NODE_NAMESPACE, self.node)

    def read_slots(self, *maps: str, with_node: bool = False
                   ) -> list[tuple[tuple[str, str], list[bytes | None]]]:
        """(owner, [value in each of `maps`]) for every slot of slots(): one batch read per
        map, not a lookup per slot and map."""
        owners = list(self.slots(with_node))
        numbers = [slot for slot, _ in owners]
        columns = [self.maps.lookup_slots(name, numbers) for name in maps]
        return [(owner, [column[i] for column in columns]) for i, (_, owner) in enumerate(owners)]


class MapWriter(MapReader, Protocol):
    def delete(self, name: str, key: bytes) -> bool: ...
    def put(self, name: str, key: bytes, value: bytes) -> None: ...

    def replace(self, name: str, key: bytes, value: bytes) -> bool:
        """Overwrite an existing element only; False if it is gone (never re-creates it)."""


@dataclass(frozen=True)
class Sweep:
    """A periodic pass of the daemon over a probe's pending state (unanswered SYNs...)."""

    maps: MapWriter
    now_ns: int  # CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads
    settings: Mapping[str, Any]  # every setting's value by name, the probes' own among them


@dataclass(frozen=True)
class Start:
    """What a probe with state of its own (Probe.start) gets when the daemon starts it,
    after the programs are loaded and the slot table adopted, before anything attaches."""

    maps: Any  # monitor.kernel.maps.KernelMaps: handles with fds, for batch and map-in-map work
    adopted: bool  # the last daemon's pinned maps are in use: take over what it left
    slots: Callable[[], Mapping[int, int]]  # ifindex -> slot, the slot table's own view
    settings: Mapping[str, Any]  # every setting's value by name, the probes' own among them
    services: Mapping[str, Any]  # what the daemon shares, by name: those in Probe.needs


def _no_problems(_name: str, _value: Any, _values: Mapping[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True)
class Setting:
    """A daemon setting a probe owns: monitor/settings.py makes it a field of Settings,
    with its --flag and PODNETMON_ variable, and the probe reads it by name."""

    name: str
    default: Any  # int, float, bool, str or a tuple of str: the setting's type too
    doc: str  # why the default is what it is, as every setting says
    # the problems with a value (given every setting's value, for checks of two), each
    # naming its setting first as monitor/settingscheck.py's do; none: []
    check: Callable[[str, Any, Mapping[str, Any]], list[str]] = _no_problems

    @property
    def type(self) -> str:
        """The type as monitor/settings.py converts a flag's or variable's text to it."""
        if isinstance(self.default, tuple):
            return "tuple[str, ...]"
        return type(self.default).__name__


def within(low: float, high: float, unit: str = ""
           ) -> Callable[[str, Any, Mapping[str, Any]], list[str]]:
    """A check: low <= value <= high (NaN is outside)."""
    def check(name: str, value: Any, _values: Mapping[str, Any]) -> list[str]:
        return [] if low <= value <= high else [f"{name}: {value}{unit} is outside {low}..{high}"]
    return check


def at_least_one(name: str, value: Any, _values: Mapping[str, Any]) -> list[str]:
    return [] if value >= 1 else [f"{name}: {value} must be at least 1"]


# The services a probe's start() can take from the daemon (Probe.needs, Start.services)
PEER_RESOLVER = "peer_resolver"  # monitor.peers.identity.PeerResolver: addresses to identities
SNAPSHOT = "snapshot"  # () -> the IdentityIndex of the current pods
NODE = "node"  # this node's name
# What the daemon builds on a loaded probe (Probe.provides)
CAPTURES = "captures"  # on-demand packet copies: the trace API drives the probe's switch
INTERFACE_COUNTS = "interface_counts"  # packets counted per slot: the bypass and
#                                        before-attach checks compare them with the veths'
#                                        (Probe.interface_totals reads them)
# (egress packets, egress bytes, ingress packets, ingress bytes) by slot, all protocols
InterfaceTotals = Callable[[MapReader, list[int]], dict[int, tuple[int, int, int, int]]]


@dataclass(frozen=True)
class Probe:
    """One probe's contract with the kernel package, the daemon and the collector."""

    name: str
    summary: str
    c_file: str
    maps: Mapping[str, MapLayout]
    collect: Callable[[Scrape], Iterable[Family]]
    describe: Callable[[], Iterable[Family]]  # the same families, empty: reads no map
    tc_hook: str = ""  # static inline C function: void f(struct __sk_buff *, const struct pnm_pkt *)
    tracepoints: tuple[str, ...] = field(default=())  # "category:event"
    needs_ports: bool = False  # the TC parse must read ports and TCP flags
    # the kernel struct members it reads, as the -D names its C uses: (struct, member path),
    # resolved from BTF (monitor/kernel/btf.py) with every other probe's
    offsets: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    degraded: str = ""  # without offsets: "" means not loaded; else what it still does
    functions: tuple[str, ...] = ()  # kernel functions whose [start, end) it is told (kallsyms)
    settings: tuple[Setting, ...] = ()  # the daemon settings it owns (flags, env, checks)
    needs: tuple[str, ...] = ()  # services its start() takes from the daemon (PEER_RESOLVER...)
    provides: tuple[str, ...] = ()  # what the daemon builds on it when loaded (CAPTURES...)
    interface_totals: InterfaceTotals | None = None  # with INTERFACE_COUNTS: how to read them
    cflags: Callable[[KernelInfo], list[str]] = field(default=lambda _k: [])
    sweep: Callable[[Sweep], None] | None = None
    # delete keys of a gone pod's netns (None: the pod lives on) and of detached ifindexes
    forget: Callable[[MapWriter, int | None, Sequence[int]], None] | None = None
    # delete keys of every netns and ifindex not in the live sets: run once when a daemon
    # adopts pinned maps, for pods that went while no daemon was there to forget them
    prune: Callable[[MapWriter, set[int], set[int]], None] | None = None
    # events the probe could not count, by source (podnet_monitor_lost_events_total)
    lost: Callable[[Scrape], Mapping[str, int]] | None = None
    # a probe with state of its own: returns the probe with its callables bound to it
    start: Callable[[Probe, Start], Probe] | None = None
    state: Any = None  # what start() made (for tests and the daemon's shutdown)

    @property
    def needs_offsets(self) -> bool:
        """Reads kernel structs: without BTF's offsets it is degraded or not loaded."""
        return bool(self.offsets)


# bpf/kstruct.h's pnm_sock_netns() and pnm_net_inum(), which every probe that reads kernel
# structs goes through to find a socket's or a device's netns
KSTRUCT_OFFSETS: Mapping[str, tuple[str, str]] = {
    "PNM_OFF_NET_INUM": ("net", "ns.inum"),
    "PNM_OFF_SK_NET": ("sock", "__sk_common.skc_net"),
}


TIMED_OUT = 1 << 63  # bpf/pnm.h PNM_TIMED_OUT


def sweep_pending(ctx: Sweep, pending: str, timeout: float, keep_for: float) -> list[bytes]:
    """Mark pending entries older than `timeout` timed out; return their keys.

    A marked entry stays `keep_for` seconds more, so that the retries of the same
    attempt (SYN retransmits, a resolver asking again) find it and count nothing;
    then it is deleted.
    """
    expired = []
    for key, value in ctx.maps.items(pending):
        stamp = struct.unpack("=Q", value)[0]
        started = stamp & ~TIMED_OUT
        age = (ctx.now_ns - started) / 1e9
        if stamp & TIMED_OUT:
            if age > timeout + keep_for:
                ctx.maps.delete(pending, key)
        elif age > timeout and ctx.maps.replace(pending, key, struct.pack("=Q", stamp | TIMED_OUT)):
            expired.append(key)  # not if the answer came (and deleted it) since items()
    return expired


def u32_key(value: int) -> bytes:
    return struct.pack("=I", value)


def u32_of(key: bytes) -> int:
    return int(struct.unpack_from("=I", key)[0])


class HistogramSum:
    """Adds kernel histograms of several slots (a pod's interfaces) into one series."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, ...], tuple[list[int], int]] = {}

    def add(self, labels: tuple[str, ...], buckets: Sequence[int], sum_us: int) -> None:
        seen = self._series.get(labels)
        if seen is None:  # the common case: one interface, one series
            self._series[labels] = (list(buckets), sum_us)
            return
        counts, total = seen
        self._series[labels] = ([a + b for a, b in zip(counts, buckets, strict=True)],
                                total + sum_us)

    def family(self, name: str, doc: str, labels: list[str]) -> HistogramFamily:
        fam = HistogramFamily(name, doc, labels, LE)
        for key, (counts, sum_us) in sorted(self._series.items()):
            fam.add(key, counts, sum_us / 1e6)
        return fam


class CounterSum:
    """Adds counters of several slots or keys that map to the same label set."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.values[labels] = self.values.get(labels, 0) + value

    def items(self) -> list[tuple[tuple[str, ...], float]]:
        return sorted(self.values.items())
