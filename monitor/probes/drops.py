"""Packets the kernel dropped, by its drop reason, per pod (bpf/drops.c)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator, Sequence

from monitor.exposition import CounterFamily, Family
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import decode
from monitor.probes.base import (
    KSTRUCT_OFFSETS,
    NODE_NAMESPACE,
    CounterSum,
    MapLayout,
    MapWriter,
    Probe,
    Scrape,
)

MAP, LOST, EXCLUDED = "pnm_drops", "pnm_drops_lost", "pnm_drops_excluded"
TRACE, EVENTS = "pnm_drop_trace", "pnm_drop_events"  # the per-slot switch, the perf buffer
KIND_NODE, KIND_NETNS, KIND_IFINDEX = 0, 1, 2
# pnm_drops_excluded's entries (PNM_EXCLUDED_* in drops.c), by the `why` they are shown with
EXCLUDED_WHYS = ("echo_reply_to_raw_socket", "packet_socket_copy", "multicast_not_joined")
# the drop reasons drops.c tells apart, by the running kernel's values (-D PNM_REASON_*)
REASONS_NEEDED = ("NO_SOCKET", "PACKET_SOCK_ERROR", "NOT_SPECIFIED")
# what drops.c reads of the kernel's structs: a drop's device, socket and headers
OFFSETS = {
    "PNM_OFF_SKB_DEV": ("sk_buff", "dev"),
    "PNM_OFF_SKB_SK": ("sk_buff", "sk"),
    "PNM_OFF_SKB_HEAD": ("sk_buff", "head"),
    "PNM_OFF_SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "PNM_OFF_SKB_END": ("sk_buff", "end"),  # an offset from head on 64-bit: the shared info
    "PNM_OFF_SHINFO_DATAREF": ("skb_shared_info", "dataref"),
    "PNM_OFF_DEV_NET": ("net_device", "nd_net"),
    "PNM_OFF_DEV_IFINDEX": ("net_device", "ifindex"),
    **KSTRUCT_OFFSETS,
    "PNM_OFF_SK_FAMILY": ("sock", "__sk_common.skc_family"),
}
# ip6_mc_input() frees, with no reason, multicast to a group nobody on the device joined
IP6_MC_INPUT = "ip6_mc_input"


class DropEvent(ctypes.Structure):
    """struct pnm_drop_event."""

    _fields_ = [("ts", ctypes.c_uint64), ("location", ctypes.c_uint64),
                ("slot", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
                ("reason", ctypes.c_uint32), ("protocol", ctypes.c_uint16),
                ("hdr_len", ctypes.c_uint16), ("hdr", ctypes.c_uint8 * 64)]


class DropKey(ctypes.Structure):
    """struct pnm_drop_key."""

    _fields_ = [("id", ctypes.c_uint32), ("reason", ctypes.c_uint32), ("kind", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8 * 3)]


def _family() -> CounterFamily:
    return CounterFamily(
        "podnet_drops", "Packets the kernel dropped, by its drop reason (the running "
        "kernel's names). namespace=_node: drops that belong to no pod.",
        ["namespace", "pod", "reason"])


def _excluded_family() -> CounterFamily:
    return CounterFamily(
        "podnet_monitor_drops_excluded", "Packets the kernel freed with a drop reason that "
        "are not drops of pod traffic, so not in podnet_drops_total: why=echo_reply_to_raw_"
        "socket, an ICMP echo reply no ping socket claimed (NO_SOCKET) but a raw socket "
        "(root's ping) received; why=packet_socket_copy, a capture's own copy "
        "(PACKET_SOCK_ERROR: tcpdump fell behind); why=multicast_not_joined, IPv6 "
        "multicast to a group the pod did not join (a bridge floods every pod's MLD "
        "reports to all the others), freed by ip6_mc_input().", ["why"])


def collect(scrape: Scrape) -> Iterator[Family]:
    drops = _family()
    sums = CounterSum()
    node = (NODE_NAMESPACE, scrape.node)
    for raw_key, raw_value in scrape.maps.items(MAP):
        key = decode(DropKey, raw_key)
        count = struct.unpack("=Q", raw_value)[0]
        owner = node
        if key.kind == KIND_NETNS:
            pod = scrape.index.by_netns(key.id)
            owner = (pod.namespace, pod.name) if pod else node
        elif key.kind == KIND_IFINDEX:
            pod = scrape.index.by_ifindex(key.id)
            owner = (pod.namespace, pod.name) if pod else node
        sums.add((*owner, scrape.kernel.drop_reason(key.reason)), count)
    for labels, value in sums.items():
        drops.add(labels, value)
    yield drops
    excluded = _excluded_family()
    for index, why in enumerate(EXCLUDED_WHYS):
        raw = scrape.maps.lookup(EXCLUDED, struct.pack("=I", index))
        excluded.add((why,), struct.unpack("=Q", raw)[0] if raw else 0)
    yield excluded


def lost(scrape: Scrape) -> dict[str, int]:
    """Drops not counted because the map was full (podnet_monitor_lost_events_total)."""
    raw = scrape.maps.lookup(LOST, struct.pack("=I", 0))
    return {"drops": struct.unpack("=Q", raw)[0] if raw else 0}


def describe() -> Iterator[Family]:
    yield _family()
    yield _excluded_family()


def forget(maps: MapWriter, netns: int | None, ifindexes: Sequence[int]) -> None:
    """Delete a gone pod's netns keys and detached interfaces' keys: both are reused."""
    gone = {(KIND_IFINDEX, i) for i in ifindexes}
    if netns is not None:
        gone.add((KIND_NETNS, netns))
    for raw_key, _value in maps.items(MAP):
        key = decode(DropKey, raw_key)
        if (key.kind, key.id) in gone:
            maps.delete(MAP, raw_key)


def prune(maps: MapWriter, live_netns: set[int], live_ifindexes: set[int]) -> None:
    """Delete the keys of pods gone while no daemon ran (left in adopted pinned maps)."""
    for raw_key, _value in maps.items(MAP):
        key = decode(DropKey, raw_key)
        if ((key.kind == KIND_NETNS and key.id not in live_netns) or
                (key.kind == KIND_IFINDEX and key.id not in live_ifindexes)):
            maps.delete(MAP, raw_key)


def cflags(kernel: KernelInfo) -> list[str]:
    flags = ["-DPNM_HAVE_RX_SK"] if kernel.has_field("skb:kfree_skb", "rx_sk") else []
    values = {name: value for value, name in kernel.drop_reasons.items()}
    flags += [f"-DPNM_REASON_{name}={values[name]}" for name in REASONS_NEEDED if name in values]
    if IP6_MC_INPUT in kernel.functions:
        start, end = kernel.functions[IP6_MC_INPUT]
        flags += [f"-DPNM_IP6_MC_INPUT={start:#x}ULL", f"-DPNM_IP6_MC_INPUT_END={end:#x}ULL"]
    return flags


PROBE = Probe(
    name="drops",
    summary="packets the kernel dropped, by drop reason, per pod (tracepoint skb:kfree_skb)",
    c_file="drops.c",
    tracepoints=("skb:kfree_skb",),
    offsets=OFFSETS,
    functions=(IP6_MC_INPUT,),
    degraded="without kernel struct offsets every drop counts under the node",
    maps={MAP: MapLayout(DropKey, ctypes.c_uint64), LOST: MapLayout(ctypes.c_uint32, ctypes.c_uint64),
          EXCLUDED: MapLayout(ctypes.c_uint32, ctypes.c_uint64),
          TRACE: MapLayout(ctypes.c_uint32, ctypes.c_uint32, per_slot=True)},
    collect=collect,
    describe=describe,
    cflags=cflags,
    forget=forget,
    prune=prune,
    lost=lost,
)
