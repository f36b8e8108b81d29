"""Drop events as users read them: one NDJSON line each, the pod's interface and the
dropped packet's addresses and ports decoded from the bytes the kernel copied.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

from monitor.identity import Pod
from monitor.probes import drops as drops_probe
from monitor.traces.session import Session


def drop_record(ev: drops_probe.DropEvent, wall_offset: int, *, reason: Callable[[int], str],
                symbol: Callable[[int], str], pod: Pod, node: str) -> dict[str, Any]:
    """One drop event as the NDJSON line users read."""
    ts = ev.ts + wall_offset
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1_000_000_000))
                + f".{ts % 1_000_000_000:09d}Z",
        "node": node, "namespace": pod.namespace, "pod": pod.name,
        "reason": reason(ev.reason), "function": symbol(ev.location),
        "interface": "", "ifindex": ev.ifindex,
    }
    interface, side = drop_interface(pod, ev.ifindex)
    if interface:
        record.update(interface=interface, side=side)
    record.update(parse_headers(ev.protocol, bytes(ev.hdr)[: ev.hdr_len]))
    return record


LOOPBACK_IFINDEX = 1  # every netns registers lo first (include/net/flow.h LOOPBACK_IFINDEX)


def drop_interface(pod: Pod, ifindex: int) -> tuple[str, str]:
    """(interface, side) of the device a pod's packet was dropped on, ("", "") if unknown.

    The kernel reports the skb's device, from whichever netns it is in: a drop in the
    host's path (a TC program, the bridge) names the host veth; one in the pod's own
    stack (a firewall rule, no socket) names the pod's end of the pair, an ifindex of
    the pod's netns that the identity index knows as the veth's peer. Either way the
    interface is named as everywhere else (`pods`, the trace's interfaces): by its host
    veth, and `side` says which end. The host veth is tried first: pod ifindexes are
    small numbers of another namespace, which a host ifindex may equal."""
    for veth in pod.interfaces:
        if veth.ifindex == ifindex:
            return veth.name, "host"
    for veth in pod.interfaces:
        if veth.peer_ifindex and veth.peer_ifindex == ifindex:
            return veth.name, "pod"
    if ifindex == LOOPBACK_IFINDEX:  # the pod's loopback: a drop of its traffic to itself
        return "lo", "pod"
    return "", ""


def parse_headers(ethertype: int, data: bytes) -> dict[str, Any]:
    """Protocol, addresses and ports from the bytes at a packet's network header."""
    out: dict[str, Any] = {}
    l4, rest = None, b""
    if ethertype == 0x0800 and len(data) >= 20 and data[0] >> 4 == 4:
        ihl = (data[0] & 0x0F) * 4
        out["family"] = "ipv4"
        out["src"] = str(ipaddress.IPv4Address(data[12:16]))
        out["dst"] = str(ipaddress.IPv4Address(data[16:20]))
        fragment = struct.unpack("!H", data[6:8])[0] & 0x1FFF
        l4, rest = data[9], data[ihl:] if ihl >= 20 and not fragment else b""
    elif ethertype == 0x86DD and len(data) >= 40 and data[0] >> 4 == 6:
        out["family"] = "ipv6"
        out["src"] = str(ipaddress.IPv6Address(data[8:24]))
        out["dst"] = str(ipaddress.IPv6Address(data[24:40]))
        l4, rest = data[6], data[40:]  # extension headers: the protocol says which
    elif ethertype:
        out["ethertype"] = f"0x{ethertype:04x}"
    if l4 is not None:
        out["protocol"] = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(l4, str(l4))
        if l4 in (6, 17) and len(rest) >= 4:
            out["sport"], out["dport"] = struct.unpack("!HH", rest[:4])
    return out

def ndjson_drops(session: Session) -> Iterator[bytes]:
    """Drop events as NDJSON lines until the session ends."""
    while True:
        try:
            record = session.queue.get(timeout=0.5)
        except queue.Empty:
            if session.done.is_set():
                return
            yield b""  # a chance for the caller to notice a client gone
            continue
        session.packets += 1
        yield (json.dumps(record) + "\n").encode()
        if session.packets >= session.request.packets:
            session.end("event limit reached")
            return
