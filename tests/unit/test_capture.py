"""monitor.traces.capture: starting and ending traces, the kernel switches, the perf callbacks, pcapng.

The kernel is faked at its two edges: FakeEvents records the perf buffers the manager
opens (the tests call the callbacks with raw bytes laid out as bpf/trace.c and
bpf/drops.c submit them, built from the probes' own ctypes structures), and a DictMaps
records what goes into pnm_trace and pnm_drop_trace. Frames are built with scapy; the
pcapng written is read back by tshark.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import queue
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Ether

from monitor.identity import HostVeth, IdentityIndex, Pod, PodMeta, PodNetwork, identify
from monitor.kernel.source import SWITCH_TRACING, SWITCHES_MAP
from monitor.probes import drops as drops_probe
from monitor.probes import trace as trace_probe
from monitor.probes.base import u32_key
from monitor.probes.drops import DropEvent
from monitor.probes.trace import TraceConfig, TraceMeta
from monitor.traces import pcapout
from monitor.traces import session as sessions
from monitor.traces.capture import FILTER_BYTES, CaptureManager
from monitor.traces.cli import BlockCounter
from monitor.traces.dropevents import drop_record, ndjson_drops, parse_headers
from monitor.traces.pcapfilter import PacketFilter
from monitor.traces.pcapout import write_pcapng
from monitor.traces.session import (
    QUEUE_BYTES,
    QUEUE_PACKETS,
    CaptureError,
    Limits,
    Session,
    TraceRequest,
    parse_duration,
)
from tests.unit.fakes import DictMaps

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
# Wireshark's tools print this whenever they run as root; it says nothing about the file.
ROOT_BANNER = 'Running as user "root" and group "root". This could be dangerous.'
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "base" / "daemonset.yaml"

NODE = "node-1"
NS_WEB, NS_DB, NS_COLD = 4026532001, 4026532002, 4026532003
SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
LIMITS = Limits(max_duration=60.0, default_duration=10.0, max_packets=100, max_bytes=100_000,
                max_snaplen=9000, default_snaplen=1500, per_node=3, per_pod=2)


def pod(netns: int, name: str, veths: list[tuple[int, str]]) -> Pod:
    return identify(PodNetwork(netns, f"/proc/{netns % 1000}/ns/net"),
                    [HostVeth(i, n) for i, n in veths], PodMeta("shop", name))


WEB = pod(NS_WEB, "web", [(7, "veth7"), (9, "veth9")])  # two interfaces: slots 3 and 5
DB = pod(NS_DB, "db", [(8, "veth8")])  # slot 4
COLD = pod(NS_COLD, "cold", [(10, "veth10")])  # found, but not attached: no slot
SLOTS = {7: 3, 9: 5, 8: 4}


def everyone() -> IdentityIndex:
    return IdentityIndex([WEB, DB, COLD], SLOTS)


# -- the fakes -----------------------------------------------------------------------------------

class FakeEvents:
    """An EventReader: records what is opened; poll_perf parks the reader thread."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []
        self.max_pages = 1 << 30  # a ring larger than this is refused with EPERM (memlock)
        self.callbacks: dict[str, Callable[[bytes], None]] = {}
        self.lost: dict[str, Callable[[int], None]] = {}
        self.gate = threading.Event()  # set at teardown: the reader thread then sees stop
        self.closed = 0  # close_perf() calls

    def open_perf(self, name: str, callback: Callable[[bytes], None],
                  lost: Callable[[int], None], pages: int) -> None:
        if pages > self.max_pages:
            raise OSError(errno.EPERM, f"mmap of the cpu 0 perf ring: {pages} pages refused")
        self.opened.append((name, pages))
        self.callbacks[name] = callback
        self.lost[name] = lost

    def poll_perf(self, timeout_ms: int) -> None:
        self.gate.wait()
        time.sleep(0.001)  # a gate left open: the reader loops, but not flat out

    def close_perf(self) -> None:
        self.closed += 1

    def packet(self, raw: bytes) -> None:
        self.callbacks[trace_probe.EVENTS](raw)

    def drop(self, raw: bytes) -> None:
        self.callbacks[drops_probe.EVENTS](raw)


@dataclass
class Rig:
    manager: CaptureManager
    events: FakeEvents
    maps: DictMaps
    index: list[IdentityIndex]
    lost: list[tuple[str, int]] = field(default_factory=list)

    def start(self, name: str = "web", kind: str = "packets", **request: Any) -> Session:
        request.setdefault("duration", 30.0)
        return self.manager.start("shop", name, TraceRequest(**request), kind)

    def cfg(self, slot: int) -> TraceConfig:
        return TraceConfig.from_buffer_copy(self.maps.maps[trace_probe.MAP][u32_key(slot)])

    def tracing_switch(self) -> int:
        value = self.maps.maps.get(SWITCHES_MAP, {}).get(u32_key(SWITCH_TRACING), bytes(4))
        return int(struct.unpack("=I", value)[0])

    def drop_switch(self, slot: int) -> int:
        return int(struct.unpack("=I", self.maps.maps[drops_probe.TRACE][u32_key(slot)])[0])

    def written_slots(self) -> set[tuple[str, int]]:
        return {(name, struct.unpack("=I", key)[0]) for _op, name, key in self.maps.writes()}


@pytest.fixture
def rig() -> Iterator[Rig]:
    events, maps = FakeEvents(), DictMaps()
    index = [everyone()]
    reasons = {3: "NO_SOCKET", 77: "NETFILTER_DROP"}
    lost: list[tuple[str, int]] = []
    manager = CaptureManager(events, maps, LIMITS, lambda: index[0], NODE,
                             drop_reason=lambda r: reasons.get(r, f"REASON_{r}"),
                             symbol=lambda a: "kfree_skb_reason+0x4c" if a == 0xFFFFFFFF81A0B2CC else hex(a),
                             on_lost=lambda source, n: lost.append((source, n)))
    r = Rig(manager, events, maps, index, lost)
    yield r
    manager.stop()
    events.gate.set()
    if manager._thread is not None:
        manager._thread.join(timeout=5)


# -- raw events, as the kernel submits them -----------------------------------------------------

def udp(dport: int = 53, size: int = 0, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    frame = bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src=src, dst=dst) / UDP(sport=40000, dport=dport))
    return frame + b"u" * max(0, size - len(frame))


def tcp(dport: int = 80, size: int = 0) -> bytes:
    frame = bytes(Ether(src=SRC_MAC, dst=DST_MAC) / IP(src="10.0.0.1", dst="10.0.0.2")
                  / TCP(sport=40000, dport=dport))
    return frame + b"t" * max(0, size - len(frame))


def packet_event(frame: bytes, slot: int, *, direction: int = 1, ts: int = 1_000_000_000,
                 snaplen: int = 0) -> bytes:
    """struct pnm_trace_meta, then the copied bytes, then the padding perf adds to a record."""
    copied = frame[:snaplen] if snaplen else frame
    meta = TraceMeta(ts=ts, slot=slot, len=len(frame), caplen=len(copied), dir=direction)
    return bytes(meta) + copied + b"\0" * 4


def drop_event(*, slot: int = 4, ifindex: int = 8, reason: int = 3, protocol: int = 0x0800,
               header: bytes = b"", ts: int = 5_000_000_000,
               location: int = 0xFFFFFFFF81A0B2CC) -> bytes:
    ev = DropEvent(ts=ts, location=location, slot=slot, ifindex=ifindex, reason=reason,
                   protocol=protocol, hdr_len=len(header))
    ctypes.memmove(ev.hdr, header, len(header))
    return bytes(ev)


def drained(session: Session) -> list[Any]:
    out = []
    while True:
        try:
            out.append(session.queue.get_nowait())
        except queue.Empty:
            return out


# -- the layouts the C code submits --------------------------------------------------------------

def test_layouts_match_the_c_structs() -> None:
    # struct pnm_trace_meta: u64 ts, u32 slot, u32 len, u32 caplen, u8 dir, u8 _pad[3]
    assert ctypes.sizeof(TraceMeta) == 24 == struct.calcsize("=QIIIB3x")
    # struct pnm_trace_cfg: u32 on, u32 snaplen, u8 protocol, u8 family, be16 port, u8 addr[16]
    assert ctypes.sizeof(TraceConfig) == 28
    assert (TraceConfig.port.offset, TraceConfig.addr.offset) == (10, 12)
    # struct pnm_drop_event: u64 ts, location; u32 slot, ifindex, reason (all 32 bits: a
    # subsystem's reasons are (subsystem << 16) | n); u16 protocol, hdr_len; u8 hdr[64]
    assert ctypes.sizeof(DropEvent) == 96
    assert (DropEvent.reason.offset, DropEvent.hdr_len.offset, DropEvent.hdr.offset) == (24, 30, 32)
    assert DropEvent.reason.size == 4


# -- start(): what is refused ---------------------------------------------------------------------

def test_an_unknown_pod_is_404(rig: Rig) -> None:
    with pytest.raises(CaptureError) as info:
        rig.manager.start("shop", "nope", TraceRequest(10.0))
    assert (info.value.status, info.value.reason) == (404, "no pod shop/nope on node node-1")
    with pytest.raises(CaptureError) as info:
        rig.manager.start("other", "web", TraceRequest(10.0))  # the name, in another namespace
    assert info.value.status == 404


def test_a_pod_without_attached_interfaces_is_409(rig: Rig) -> None:
    with pytest.raises(CaptureError) as info:
        rig.start("cold")
    assert (info.value.status, info.value.reason) == (
        409, "pod shop/cold is not attached (yet): nothing to trace")


@pytest.mark.parametrize(("request_", "reason"), [
    ({"duration": 60.5}, "duration 60.5 s is outside (0, 60] s"),
    ({"duration": -1.0}, "duration -1 s is outside (0, 60] s"),
    ({"packets": 101}, "packets 101 is outside 0..100"),
    ({"packets": -1}, "packets -1 is outside 0..100"),
    ({"bytes": 100_001}, "bytes 100001 is outside 0..100000"),
    ({"snaplen": 13}, "snaplen 13 is outside 14..9000"),
    ({"snaplen": 9001}, "snaplen 9001 is outside 14..9000"),
    ({"filter": "udp or " * 700 + "udp"}, "the filter is longer than 4096 characters"),
])
def test_limits_are_400(rig: Rig, request_: dict[str, Any], reason: str) -> None:
    with pytest.raises(CaptureError) as info:
        rig.start(**request_)
    assert (info.value.status, info.value.reason) == (400, reason)
    assert rig.maps.writes() == []  # nothing switched on
    assert rig.manager.active() == []


@pytest.mark.parametrize(("expression", "message"), [
    ("tcp port", "bad filter: can't parse filter expression: syntax error"),
    ("tcp and udp", "bad filter: expression rejects all packets"),
    ("port 99999", "bad filter: illegal port number 99999 > 65535"),
])
def test_a_filter_libpcap_refuses_is_400_with_its_message(rig: Rig, expression: str,
                                                          message: str) -> None:
    with pytest.raises(CaptureError) as info:
        rig.start(filter=expression)
    assert (info.value.status, info.value.reason) == (400, message)
    assert rig.maps.writes() == []


def test_drop_traces_compile_no_filter(rig: Rig) -> None:
    session = rig.start("db", kind="drops", filter="tcp port")  # not a packet trace: unused
    assert session.filter is None


def test_defaults_fill_what_the_request_leaves_out(rig: Rig) -> None:
    session = rig.start(duration=0.0)
    assert session.request == TraceRequest(duration=10.0, packets=100, bytes=100_000,
                                           snaplen=1500, filter="")
    assert session.deadline - session.started == pytest.approx(10.0)
    assert session.kind == "packets"
    assert session.slots == frozenset({3, 5})
    assert session.interfaces == ((7, "veth7", 3), (9, "veth9", 5))
    assert session.pod == WEB


def test_per_pod_and_per_node_concurrency_is_429(rig: Rig) -> None:
    rig.start("web")
    rig.start("web", kind="drops")  # drop traces count too
    with pytest.raises(CaptureError) as info:
        rig.start("web")
    assert (info.value.status, info.value.reason) == (
        429, "2 traces of shop/web run already (at most 2)")
    db = rig.start("db")  # the third on the node
    with pytest.raises(CaptureError) as info:
        rig.start("db", kind="drops")
    assert (info.value.status, info.value.reason) == (
        429, "3 traces run on this node already (at most 3)")
    rig.manager.finish(db, "done")  # a finished trace frees its place
    rig.start("db", kind="drops")


def test_an_ended_session_no_longer_counts(rig: Rig) -> None:
    first = rig.start("web")
    rig.start("web")
    first.end("duration reached")  # its consumer has not finished it yet
    rig.start("web")


# -- start() and finish(): the kernel switches ------------------------------------------------

def test_a_packet_trace_switches_on_every_slot_of_the_pod_with_its_prefilter(rig: Rig) -> None:
    session = rig.start(filter="udp port 53", snaplen=300)
    for slot in (3, 5):
        cfg = rig.cfg(slot)
        assert (cfg.on, cfg.snaplen, cfg.protocol, cfg.family) == (1, 300, 17, 0)
        assert bytes(cfg)[10:12] == b"\x00\x35"  # __be16 port: 53 in network order
        assert bytes(cfg.addr) == bytes(16)
        assert rig.drop_switch(slot) == 0
    assert rig.written_slots() == {(trace_probe.MAP, 3), (trace_probe.MAP, 5),
                                   (drops_probe.TRACE, 3), (drops_probe.TRACE, 5),
                                   (SWITCHES_MAP, SWITCH_TRACING)}  # not db's 4
    rig.manager.finish(session, "done")
    for slot in (3, 5):
        assert bytes(rig.cfg(slot)) == bytes(TraceConfig())  # off, and no prefilter left
        assert rig.drop_switch(slot) == 0


def test_the_node_tracing_switch_is_on_while_any_packet_trace_runs(rig: Rig) -> None:
    """With it off, no packet looks up its slot's trace settings (bpf/trace.c): so it is on
    before any slot's settings are, and off only once no packet trace is left."""
    assert rig.tracing_switch() == 0
    drops = rig.start("db", kind="drops")
    assert rig.tracing_switch() == 0  # drop traces need no packet's settings
    before = len(rig.maps.writes())
    first = rig.start("web")
    ops = [(name, key) for _op, name, key in rig.maps.writes()]
    assert ops[before] == (SWITCHES_MAP, u32_key(SWITCH_TRACING))  # before any slot's settings
    second = rig.start("db")
    assert rig.tracing_switch() == 1
    rig.manager.finish(first, "done")
    assert rig.tracing_switch() == 1  # the other still runs
    rig.manager.finish(second, "done")
    assert rig.tracing_switch() == 0
    ops = [(name, key) for _op, name, key in rig.maps.writes()]
    assert ops[-1] == (SWITCHES_MAP, u32_key(SWITCH_TRACING))  # after every slot's
    rig.manager.finish(drops, "done")
    assert rig.tracing_switch() == 0


@pytest.mark.parametrize(("expression", "expected"), [
    # (protocol, __be16 port as it lies in memory, family, addr[16])
    ("tcp and host 10.0.0.2", (6, b"\x00\x00", 4, bytes([10, 0, 0, 2]) + bytes(12))),
    ("tcp dst port 8443 and dst host 2001:db8::1",
     (6, b"\x20\xfb", 6, bytes.fromhex("20010db8000000000000000000000001"))),
    ("icmp", (1, b"\x00\x00", 0, bytes(16))),
    ("port 1 and port 2", (0, b"\x00\x00", 0, bytes(16))),  # not provable: copy everything
])
def test_prefilter_fields_in_the_kernels_byte_order(rig: Rig, expression: str,
                                                   expected: tuple[int, bytes, int, bytes]) -> None:
    rig.start("db", filter=expression)
    cfg = rig.cfg(4)
    assert cfg.on == 1
    assert (cfg.protocol, bytes(cfg)[10:12], cfg.family, bytes(cfg.addr)) == expected


def test_the_kernel_copies_enough_for_the_exact_filter(rig: Rig) -> None:
    # a small snap length is cut by the writer, after the filter saw the headers
    rig.start("db", snaplen=64, filter="udp")
    assert FILTER_BYTES == 256
    assert rig.cfg(4).snaplen == FILTER_BYTES


def test_a_drop_trace_switches_pnm_drop_trace_only(rig: Rig) -> None:
    session = rig.start("db", kind="drops")
    assert rig.drop_switch(4) == 1
    assert rig.cfg(4).on == 0
    rig.manager.finish(session, "done")
    assert rig.drop_switch(4) == 0


def test_two_packet_traces_of_one_pod_share_the_slot(rig: Rig) -> None:
    dns = rig.start(filter="udp port 53", snaplen=300)
    web = rig.start(filter="tcp port 80", snaplen=1000)
    for slot in (3, 5):  # both want it: every packet, at the larger snaplen; libpcap sorts them
        cfg = rig.cfg(slot)
        assert (cfg.on, cfg.snaplen, cfg.protocol, cfg.family) == (1, 1000, 0, 0)
        assert bytes(cfg)[10:12] == b"\x00\x00"
    rig.manager.finish(web, "done")
    for slot in (3, 5):  # back to the one left, and its prefilter
        cfg = rig.cfg(slot)
        assert (cfg.on, cfg.snaplen, cfg.protocol) == (1, 300, 17)
        assert bytes(cfg)[10:12] == b"\x00\x35"
    rig.manager.finish(dns, "done")
    assert rig.cfg(3).on == rig.cfg(5).on == 0


def test_packet_and_drop_traces_of_one_pod_keep_each_others_switch(rig: Rig) -> None:
    packets = rig.start("db", snaplen=400)
    drops = rig.start("db", kind="drops")
    assert (rig.cfg(4).on, rig.drop_switch(4)) == (1, 1)
    rig.manager.finish(packets, "done")
    assert (rig.cfg(4).on, rig.drop_switch(4)) == (0, 1)
    packets = rig.start("db", snaplen=400)
    rig.manager.finish(drops, "done")
    assert (rig.cfg(4).on, rig.cfg(4).snaplen, rig.drop_switch(4)) == (1, 400, 0)
    rig.manager.finish(packets, "done")
    assert (rig.cfg(4).on, rig.drop_switch(4)) == (0, 0)


def test_finish_is_idempotent_and_keeps_the_first_reason(rig: Rig) -> None:
    session = rig.start("db")
    session.end("packet limit reached")
    rig.manager.finish(session, "the client went away")
    writes = len(rig.maps.writes())
    rig.manager.finish(session, "again")
    assert session.ended == "packet limit reached"
    assert session.done.is_set()
    assert len(rig.maps.writes()) == writes  # the second finish programs nothing
    assert rig.manager.active() == []


def test_a_session_that_ends_switches_its_slots_off_before_it_is_finished(rig: Rig) -> None:
    """Its consumer may be stuck on a client that reads nothing: the kernel does not wait."""
    due = rig.start("db", duration=30.0)
    due.deadline = time.monotonic() - 0.001
    rig.manager._expire()
    assert due.ended == "duration reached" and due.done.is_set()
    assert rig.cfg(4).on == 0
    assert due.id in rig.manager._sessions  # not finished: that is its consumer's to do
    writes = len(rig.maps.writes())
    rig.manager.finish(due, "the client went away")
    # programmed once more: both maps, and the node's tracing switch off, no more
    assert len(rig.maps.writes()) == writes + 3


@pytest.mark.parametrize("how", ["deadline", "limit", "pod"])
def test_an_ended_session_leaves_the_switch_to_the_others_of_its_pod(rig: Rig, how: str) -> None:
    def end(session: Session) -> None:
        if how == "deadline":
            session.deadline = time.monotonic() - 0.001
            rig.manager._expire()
            assert session.ended == "duration reached"
        else:  # as write_pcapng ends it, or the pod's removal
            session.end("packet limit reached" if how == "limit" else "the pod went away")

    packets, other = rig.start("db", snaplen=2000), rig.start("db", snaplen=400, filter="udp")
    end(packets)
    cfg = rig.cfg(4)  # the one left: its snaplen, its prefilter
    assert (cfg.on, cfg.snaplen, cfg.protocol) == (1, 400, 17)
    end(other)
    packets, drops = rig.start("db"), rig.start("db", kind="drops")
    end(packets)
    assert (rig.cfg(4).on, rig.drop_switch(4)) == (0, 1)
    end(drops)
    assert (rig.cfg(4).on, rig.drop_switch(4)) == (0, 0)


def test_finish_lets_go_of_what_is_still_queued(rig: Rig) -> None:
    session = rig.start("db")
    for _ in range(3):
        rig.events.packet(packet_event(udp(size=500), 4))
    assert session.queued_bytes == 1500
    rig.manager.finish(session, "the client stopped reading")
    assert session.queue.qsize() == 0 and session.queued_bytes == 0


def test_the_perf_buffers_close_with_the_last_trace_and_open_for_the_next(rig: Rig) -> None:
    first = rig.start("web")
    second = rig.start("db", kind="drops")
    rig.events.gate.set()  # the reader runs: it must keep the buffers while a trace does
    time.sleep(0.05)
    assert rig.events.closed == 0
    rig.manager.finish(first, "done")
    time.sleep(0.05)
    assert rig.events.closed == 0
    rig.manager.finish(second, "done")
    deadline = time.monotonic() + 5
    while rig.manager._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.manager._thread is None and rig.events.closed == 1
    rig.start("db")
    assert len(rig.events.opened) == 4 and rig.manager._thread is not None


def test_a_client_that_stops_reading_ends_the_session_with_that_reason(rig: Rig) -> None:
    session = rig.start("db")
    rig.events.packet(packet_event(udp(), 4))
    write_pcapng(session, Failing(TimeoutError("timed out"), 1), NODE)  # type: ignore[arg-type]
    assert session.ended == "the client stopped reading"
    assert rig.cfg(4).on == 0  # off at once, before anyone finishes it


def test_the_perf_buffers_are_opened_once(rig: Rig) -> None:
    rig.start("web")
    rig.start("db", kind="drops")
    assert rig.events.opened == [(trace_probe.EVENTS, 256), (drops_probe.EVENTS, 64)]


def test_rings_the_memlock_limit_refuses_are_halved_until_they_map(rig: Rig) -> None:
    # A container without CAP_IPC_LOCK and with a small RLIMIT_MEMLOCK: the full rings
    # are refused (found under the DaemonSet's own security context: the trace request
    # got no answer at all)
    rig.events.max_pages = 40
    rig.start("web")
    assert rig.events.opened[-2:] == [(trace_probe.EVENTS, 32), (drops_probe.EVENTS, 8)]
    assert rig.manager.ring_pages == 32
    assert rig.events.closed == 3  # each refused attempt released what it had opened


def test_rings_refused_at_any_size_answer_503_with_the_remedy(rig: Rig) -> None:
    rig.events.max_pages = 4
    with pytest.raises(CaptureError) as info:
        rig.start("web")
    assert info.value.status == 503
    assert "CAP_IPC_LOCK" in info.value.reason and "RLIMIT_MEMLOCK" in info.value.reason
    assert not rig.written_slots() and not rig.manager.active()  # nothing switched on


# -- _on_packet -----------------------------------------------------------------------------------

def test_packets_go_to_the_sessions_of_their_slot_only(rig: Rig) -> None:
    web, db = rig.start("web"), rig.start("db")
    frame = udp()
    rig.events.packet(packet_event(frame, 4))
    rig.events.packet(packet_event(frame, 5))
    rig.events.packet(packet_event(frame, 6))  # nobody's slot
    assert [item[1] for item in drained(db)] == [4]
    assert [item[1] for item in drained(web)] == [5]


def test_packets_do_not_go_to_drop_traces(rig: Rig) -> None:
    drops = rig.start("db", kind="drops")
    rig.events.packet(packet_event(udp(), 4))
    assert drained(drops) == []


def test_the_exact_filter_applies_in_userspace(rig: Rig) -> None:
    dns = rig.start("db", filter="udp dst port 53")
    rig.start("db", filter="tcp")  # both on slot 4: the kernel copies everything
    rig.events.packet(packet_event(udp(dport=53), 4))
    rig.events.packet(packet_event(udp(dport=5353), 4))
    rig.events.packet(packet_event(tcp(dport=53), 4))
    assert [item[3] for item in drained(dns)] == [udp(dport=53)]


def test_an_item_is_wall_time_slot_direction_bytes_and_length(rig: Rig) -> None:
    session = rig.start("db", snaplen=64)
    frame = udp(size=300)
    mono = time.monotonic_ns()
    rig.events.packet(packet_event(frame, 4, direction=1, ts=mono, snaplen=rig.cfg(4).snaplen))
    rig.events.packet(packet_event(frame, 4, direction=0, ts=mono + 1, snaplen=rig.cfg(4).snaplen))
    (ts, slot, direction, data, length), second = drained(session)
    assert ts == mono + rig.manager._wall_offset
    assert abs(ts - time.time_ns()) < 2_000_000_000  # CLOCK_MONOTONIC became wall time
    # what the kernel copied; the writer cuts it to the snap length
    assert (slot, direction, data, length) == (4, "outbound", frame[:256], 300)
    assert second[0] == ts + 1
    assert second[2] == "inbound"  # PNM_DIR_INGRESS: the pod receives


def test_a_short_event_is_ignored(rig: Rig) -> None:
    session = rig.start("db")
    rig.events.packet(packet_event(udp(), 4)[:23])
    assert drained(session) == []


def test_a_full_queue_counts_lost_queue(rig: Rig) -> None:
    session = rig.start("db")
    session.queue = queue.Queue(2)
    for _ in range(5):
        rig.events.packet(packet_event(udp(), 4))
    assert len(drained(session)) == 2
    assert (session.lost_queue, session.lost_kernel) == (3, 0)


def test_lost_events_count_for_every_active_session_of_their_kind(rig: Rig) -> None:
    ended = rig.start("web")
    ended.end("duration reached")
    web, db = rig.start("web"), rig.start("db")
    drops = rig.start("db", kind="drops")
    rig.events.lost[trace_probe.EVENTS](7)
    rig.events.lost[drops_probe.EVENTS](3)
    rig.events.lost[trace_probe.EVENTS](1)
    assert (web.lost_kernel, db.lost_kernel, drops.lost_kernel, ended.lost_kernel) == (8, 8, 3, 0)
    assert rig.lost == [("capture", 7), ("drop_events", 3), ("capture", 1)]


# -- _on_drop ---------------------------------------------------------------------------------------

def test_drops_go_to_drop_traces_of_their_slot_as_records(rig: Rig) -> None:
    drops = rig.start("db", kind="drops")
    web_drops = rig.start("web", kind="drops")
    packets = rig.start("db")
    header = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=53))
    rig.events.drop(drop_event(slot=4, ifindex=8, reason=3, header=header, ts=5_000_000_000))
    rig.events.drop(drop_event()[:95])  # short: ignored
    assert drained(web_drops) == drained(packets) == []
    (record,) = drained(drops)
    wall = 5_000_000_000 + rig.manager._wall_offset
    assert record == {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall // 10**9))
        + f".{wall % 10**9:09d}Z",
        "node": NODE, "namespace": "shop", "pod": "db", "reason": "NO_SOCKET",
        "function": "kfree_skb_reason+0x4c", "interface": "veth8", "ifindex": 8, "side": "host",
        "family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "udp",
        "sport": 40000, "dport": 53}


def test_ndjson_drops_ends_at_the_event_limit(rig: Rig) -> None:
    session = rig.start("db", kind="drops", packets=2)
    for reason in (3, 77):
        rig.events.drop(drop_event(reason=reason))
    lines = [line for line in ndjson_drops(session) if line]
    assert [line.endswith(b"\n") for line in lines] == [True, True]
    assert [json.loads(line)["reason"] for line in lines] == ["NO_SOCKET", "NETFILTER_DROP"]
    assert session.ended == "event limit reached"
    assert session.packets == 2


def test_ndjson_drops_yields_not_one_event_past_the_limit(rig: Rig) -> None:
    session = rig.start("db", kind="drops", packets=2)
    for reason in (3, 77, 3, 3):
        rig.events.drop(drop_event(reason=reason))
    lines = [line for line in ndjson_drops(session) if line]
    assert session.ended == "event limit reached"
    assert len(lines) == 2


def test_ndjson_drops_ends_with_the_session(rig: Rig) -> None:
    session = rig.start("db", kind="drops")
    rig.events.drop(drop_event())
    session.end("duration reached")
    assert len([line for line in ndjson_drops(session) if line]) == 1


# -- _expire ----------------------------------------------------------------------------------------

def test_a_session_ends_when_its_pod_leaves_the_snapshot(rig: Rig) -> None:
    web, db = rig.start("web"), rig.start("db")
    rig.index[0] = IdentityIndex([WEB, COLD], SLOTS)  # db's netns is gone
    rig.manager._expire()
    assert (db.ended, db.done.is_set()) == ("the pod went away", True)
    assert (web.ended, web.done.is_set()) == ("", False)
    assert rig.manager.active() == [web]


def test_a_renamed_pod_is_still_the_same_netns(rig: Rig) -> None:
    session = rig.start("db")
    renamed = identify(DB.network, DB.interfaces, PodMeta("shop", "db-renamed"))
    rig.index[0] = IdentityIndex([WEB, renamed], SLOTS)
    rig.manager._expire()
    assert session.ended == ""


def test_a_session_ends_at_its_deadline(rig: Rig) -> None:
    due, later = rig.start("web", duration=30.0), rig.start("db", duration=30.0)
    due.deadline = time.monotonic() - 0.001
    rig.manager._expire()
    assert (due.ended, later.ended) == ("duration reached", "")


# -- write_pcapng ---------------------------------------------------------------------------------

def run_tshark(*args: str) -> str:
    assert TSHARK is not None
    proc = subprocess.run([TSHARK, *args], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in proc.stderr.splitlines() if line.strip() and line != ROOT_BANNER]
    assert proc.returncode == 0 and not complaints, (args, proc.returncode, proc.stderr)
    return proc.stdout


def fields(path: Path, *names: str, file_dissector: bool = False) -> list[list[str]]:
    args = ["-r", str(path), "-T", "fields", "-E", "separator=\t", "-E", "occurrence=a",
            "-E", "aggregator=\x1f"]
    if file_dissector:  # the pcapng blocks and options themselves, as one frame
        args = ["-X", "read_format:MIME Files Format", *args]
    for name in names:
        args += ["-e", name]
    return [line.split("\t") for line in run_tshark(*args).splitlines()]


def traced(rig: Rig, tmp_path: Path, name: str, slots: tuple[int, int]) -> tuple[Session, Path, int]:
    """A trace of two UDP frames (one per slot given) and a TCP one its filter drops, written out."""
    session = rig.start(name, snaplen=100, filter="udp")
    mono = time.monotonic_ns()
    copy = rig.cfg(slots[0]).snaplen  # what the kernel copies: more than the snap length
    rig.events.packet(packet_event(udp(dport=53, size=80), slots[0], direction=1, ts=mono, snaplen=copy))
    rig.events.packet(packet_event(udp(dport=54, size=400), slots[1], direction=0, ts=mono + 1000,
                                   snaplen=copy))
    rig.events.packet(packet_event(tcp(), slots[0], ts=mono + 2000))  # filtered out
    rig.events.lost[trace_probe.EVENTS](7)
    session.lost_queue = 2
    session.end("duration reached")
    path = tmp_path / f"{name}.pcapng"
    with path.open("wb") as out:
        write_pcapng(session, out, NODE)
    return session, path, mono + rig.manager._wall_offset


def block_options(path: Path) -> tuple[list[str], ...]:
    (row,) = fields(path, "pcapng.interface_description.snap_length",
                    "pcapng.options.option.data.interface.received",
                    "pcapng.options.option.data.interface.dropped",
                    "pcapng.options.option.data.comment", "_ws.expert.message", file_dissector=True)
    return tuple(v.split("\x1f") if v else [] for v in row)


ENDED = ("ended: duration reached; lost 7 in the kernel's buffer, 2 waiting for the writer; "
         "0 written out of time order (they came after the reorder window)")


@needs_tshark
def test_write_pcapng_is_read_by_tshark(rig: Rig, tmp_path: Path) -> None:
    session, path, wall = traced(rig, tmp_path, "web", (3, 5))
    assert (session.packets, session.bytes) == (2, 80 + 100)
    rows = fields(path, "frame.interface_name", "frame.interface_description",
                  "frame.packet_flags_direction", "frame.len", "frame.cap_len", "frame.time_epoch",
                  "udp.dstport")
    assert rows == [
        ["shop/web/veth7", f"node={NODE} netns={NS_WEB} host_veth=veth7", "0x00000002", "80", "80",
         f"{wall // 10**9}.{wall % 10**9:09d}", "53"],
        ["shop/web/veth9", f"node={NODE} netns={NS_WEB} host_veth=veth9", "0x00000001", "400", "100",
         f"{(wall + 1000) // 10**9}.{(wall + 1000) % 10**9:09d}", "54"],
    ]
    snaplens, _received, _dropped, comments, expert = block_options(path)
    assert snaplens == ["100", "100"]
    assert comments == [
        f"podnetmon trace of shop/web on node {NODE}",
        "filter: udp; snaplen 100; limits: 30 s, 100 packets, 100000 bytes", ENDED, ENDED]
    assert expert == []


@needs_tshark
def test_the_statistics_block_says_what_came_and_what_was_lost(rig: Rig, tmp_path: Path) -> None:
    session, path, _wall = traced(rig, tmp_path, "db", (4, 4))
    assert session.packets == 2
    (name,) = {row[0] for row in fields(path, "frame.interface_name")}
    assert name == "shop/db"  # one interface: named by the pod alone
    snaplens, received, dropped, comments, expert = block_options(path)
    assert (snaplens, received, dropped) == (["100"], ["2"], ["9"])  # 7 in the kernel, 2 queued
    assert comments[-1] == ENDED
    assert expert == []


@needs_tshark
def test_each_interfaces_statistics_count_its_own_packets(rig: Rig, tmp_path: Path) -> None:
    _session, path, _wall = traced(rig, tmp_path, "web", (3, 5))
    _snaplens, received, dropped, _comments, _expert = block_options(path)
    assert received == ["1", "1"]  # isb_ifrecv is per interface
    assert dropped == ["9", "9"]  # the kernel's losses cannot be told apart by interface


def pcapng_of(session: Session, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    write_pcapng(session, out, NODE, **kwargs)
    return out.getvalue()


def epbs(data: bytes) -> int:
    counter = BlockCounter()
    counter.feed(data)
    return counter.packets


def test_one_interface_is_named_by_the_pod_alone(rig: Rig) -> None:
    session = rig.start("db")
    session.end("duration reached")
    data = pcapng_of(session)
    assert b"shop/db" in data
    assert b"shop/db/veth8" not in data
    assert f"node={NODE} netns={NS_DB} host_veth=veth8".encode() in data


def test_write_pcapng_stops_at_exactly_the_packet_limit(rig: Rig) -> None:
    session = rig.start("db", packets=3)
    for _ in range(5):
        rig.events.packet(packet_event(udp(), 4))
    progress: list[int] = []
    data = pcapng_of(session, progress=lambda s: progress.append(s.packets))
    assert epbs(data) == 3
    assert (session.packets, session.ended) == (3, "packet limit reached")
    assert progress == [1, 2, 3]
    assert session.queued_bytes == 0  # the two more that came are let go, not written


def test_write_pcapng_stops_at_the_byte_limit(rig: Rig) -> None:
    session = rig.start("db", bytes=1000)
    for _ in range(6):
        rig.events.packet(packet_event(udp(size=250), 4))
    assert epbs(pcapng_of(session)) == 4
    assert (session.packets, session.bytes, session.ended) == (4, 1000, "byte limit reached")


def test_the_byte_limit_is_never_exceeded(rig: Rig) -> None:
    session = rig.start("db", bytes=1000)
    for _ in range(6):
        rig.events.packet(packet_event(udp(size=300), 4))
    assert epbs(pcapng_of(session)) == 3  # a fourth would make 1200
    assert (session.packets, session.bytes, session.ended) == (3, 900, "byte limit reached")


def test_the_byte_limit_counts_bytes_after_the_snap_length(rig: Rig) -> None:
    session = rig.start("db", bytes=1000, snaplen=100)
    for _ in range(12):
        rig.events.packet(packet_event(udp(size=300), 4, snaplen=rig.cfg(4).snaplen))
    assert epbs(pcapng_of(session)) == 10
    assert (session.packets, session.bytes, session.ended) == (10, 1000, "byte limit reached")


def test_write_pcapng_drains_the_queue_after_the_session_ends(rig: Rig) -> None:
    session = rig.start("db")
    for _ in range(3):
        rig.events.packet(packet_event(udp(), 4))
    session.end("duration reached")
    assert epbs(pcapng_of(session)) == 3
    assert session.ended == "duration reached"


class Failing(io.RawIOBase):
    def __init__(self, error: OSError, after: int = 0) -> None:
        self.error, self.after = error, after

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.after <= 0:
            raise self.error
        self.after -= 1
        return len(b)


@pytest.mark.parametrize(("error", "after", "ended"), [
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 0, "the client went away"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 3, "the client went away"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "write failed: No space left on device"),
])
def test_a_failing_output_ends_the_session_with_the_reason(rig: Rig, error: OSError, after: int,
                                                          ended: str) -> None:
    session = rig.start("db")
    for _ in range(3):
        rig.events.packet(packet_event(udp(), 4))
    write_pcapng(session, Failing(error, after), NODE)  # type: ignore[arg-type]
    assert (session.ended, session.done.is_set()) == (ended, True)


def test_a_trace_sharing_its_slot_keeps_its_own_snaplen(rig: Rig) -> None:
    small = rig.start("db", snaplen=100)
    big = rig.start("db", snaplen=1000)
    frame = udp(size=500)
    rig.events.packet(packet_event(frame, 4, snaplen=rig.cfg(4).snaplen))  # the kernel copies 500
    for session in (small, big):
        session.end("duration reached")
        pcapng_of(session)
    assert (small.packets, small.bytes) == (1, 100)  # cut to its own snaplen, as asked
    assert (big.packets, big.bytes) == (1, 500)


def test_a_sessions_queue_fits_in_the_daemons_memory_limit() -> None:
    ds = next(d for d in yaml.safe_load_all(DEPLOY.read_text()) if d and d["kind"] == "DaemonSet")
    limit = ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit == "320Mi"
    # bounded in bytes too: 10,000 frames at the allowed snaplen would be 650 MB
    assert QUEUE_PACKETS * Limits().max_snaplen > 320 << 20
    assert QUEUE_BYTES * Limits().per_node < 320 << 20


def test_the_queue_is_bounded_in_bytes(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "QUEUE_BYTES", 1000)
    session = rig.start("db", snaplen=1500)
    frame = udp(size=300)
    for _ in range(5):
        rig.events.packet(packet_event(frame, 4))
    assert (session.queue.qsize(), session.queued_bytes, session.lost_queue) == (3, 900, 2)
    assert session.queue.get_nowait()[3] == frame  # the writer takes one...
    session.queued_bytes -= len(frame)
    rig.events.packet(packet_event(frame, 4))  # ... and there is room again
    assert (session.queue.qsize(), session.queued_bytes, session.lost_queue) == (3, 900, 2)


CAPINFOS = shutil.which("capinfos")


def strict_time_order(path: Path) -> bool:
    """What capinfos, Wireshark's own tool, says of the file."""
    assert CAPINFOS is not None
    proc = subprocess.run([CAPINFOS, "-o", "-M", str(path)], capture_output=True, text=True,
                          check=True)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("Strict time order:")]
    return line.split(":", 1)[1].strip() == "True"


@pytest.mark.skipif(CAPINFOS is None or TSHARK is None, reason="capinfos and tshark not installed")
def test_frames_of_several_cpus_are_written_in_time_order(rig: Rig, tmp_path: Path) -> None:
    # the reader drains one CPU's ring, then the other's: each in order, the two
    # interleaved in time, and a trace of both of the pod's interfaces
    session = rig.start("web")  # slots 3 and 5
    base = time.monotonic_ns()
    arrival = [(0, 3), (20, 3), (40, 5), (10, 5), (30, 3), (50, 5), (45, 3)]
    for us, slot in arrival:
        rig.events.packet(packet_event(udp(dport=1000 + us), slot, ts=base + us * 1000))
    session.end("duration reached")
    path = tmp_path / "cpus.pcapng"
    path.write_bytes(pcapng_of(session))
    assert strict_time_order(path)
    ports = [int(p) for (p,) in fields(path, "udp.dstport")]
    assert ports == [1000 + us for us in sorted(us for us, _slot in arrival)]
    assert session.late == 0


@pytest.mark.skipif(CAPINFOS is None, reason="capinfos not installed")
def test_a_frame_that_comes_after_the_window_is_written_marked_and_counted(
        rig: Rig, tmp_path: Path) -> None:
    session = rig.start("db")
    base = time.monotonic_ns()
    out = io.BytesIO()
    writer = threading.Thread(target=write_pcapng, args=(session, out, NODE))
    writer.start()
    rig.events.packet(packet_event(udp(dport=2), 4, ts=base + 2_000_000))
    session.watermark = base + 2_000_000 + rig.manager._wall_offset  # the reader's, after a poll
    deadline = time.monotonic() + 5
    while session.packets < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.packets == 1  # out once the watermark passed it, before the trace ends
    rig.events.packet(packet_event(udp(dport=1), 4, ts=base + 1_000_000))  # 1 ms before it
    session.end("duration reached")
    writer.join(timeout=5)
    path = tmp_path / "late.pcapng"
    path.write_bytes(out.getvalue())
    assert (session.packets, session.late) == (2, 1)  # written all the same, and counted
    assert b"out of time order: stamped 1000 us before the frame written before it" in path.read_bytes()
    assert b"; 1 written out of time order" in path.read_bytes()  # the statistics block
    assert not strict_time_order(path)  # the file says what it is


def test_frames_wait_no_longer_than_the_window_bounds_when_no_watermark_comes(rig: Rig) -> None:
    session = rig.start("db")
    out = io.BytesIO()
    writer = threading.Thread(target=write_pcapng, args=(session, out, NODE))
    writer.start()
    # stamped 1.5 s ago and the reader never set a watermark (stalled): out after MAX_HOLD
    rig.events.packet(packet_event(udp(), 4, ts=time.monotonic_ns() - 1_500_000_000))
    deadline = time.monotonic() + 5
    while session.packets < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.packets == 1 and not session.ended
    session.end("duration reached")
    writer.join(timeout=5)


def test_the_writer_gives_the_queued_bytes_back(rig: Rig) -> None:
    session = rig.start("db", snaplen=100)
    for _ in range(4):
        rig.events.packet(packet_event(udp(size=300), 4, snaplen=rig.cfg(4).snaplen))
    assert session.queued_bytes == 4 * 256  # what the kernel copied, until it is written
    session.end("duration reached")
    pcapng_of(session)
    assert (session.packets, session.queued_bytes) == (4, 0)


def test_queued_bytes_survive_the_reader_and_the_writer_at_once(rig: Rig) -> None:
    session = rig.start("db")

    def reader() -> None:
        for _ in range(20_000):
            assert session.reserve(100)

    def writer() -> None:
        for _ in range(20_000):
            session.release(100)

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.queued_bytes == 0  # no update lost between the two threads


def test_a_session_finished_during_delivery_is_skipped(rig: Rig) -> None:
    first = rig.start("db", filter="udp")
    second = rig.start("db", filter="udp")
    assert first.filter is not None
    real: PacketFilter = first.filter

    class FinishingOnMatch:
        """Stands for the other thread: `second` is finished while `first` is matched."""

        def matches(self, data: bytes, length: int) -> bool:
            rig.manager.finish(second, "the client went away")
            return real.matches(data, length)

        def close(self) -> None:
            real.close()

    first.filter = FinishingOnMatch()  # type: ignore[assignment]
    rig.events.packet(packet_event(udp(), 4))  # no "filter is closed" out of the perf callback
    assert len(drained(first)) == 1
    assert drained(second) == []


def test_two_first_traces_at_once_open_the_perf_buffers_once(rig: Rig) -> None:
    second_opening = threading.Event()
    real_open = rig.events.open_perf

    def slow_open(name: str, callback: Any, lost: Any, pages: int) -> None:
        if not rig.events.opened:  # the first call waits (half a second at most) for another
            real_open(name, callback, lost, pages)
            second_opening.wait(timeout=0.5)
            return
        second_opening.set()
        real_open(name, callback, lost, pages)

    rig.events.open_perf = slow_open  # type: ignore[method-assign]
    threads = [threading.Thread(target=rig.start, args=(name,)) for name in ("web", "db")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert sorted(rig.events.opened) == [(drops_probe.EVENTS, 64), (trace_probe.EVENTS, 256)]


# -- parse_duration ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("2m", 120.0), ("500ms", 0.5), ("1h", 3600.0), ("1.5", 1.5), ("30", 30.0),
    (" 45s ", 45.0), ("0.25s", 0.25), ("1.5m", 90.0), ("0s", 0.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "s", "ms", "10x", "ten", "-5s", "+5s", "1e3", "10 s", "1..5", "1.5.2s", "5ms2", "inf", "nan",
    "10sec", "1d", ".", "5s5",
])
def test_parse_duration_refuses_junk(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a duration: "):
        parse_duration(text)


def test_parse_duration_quotes_at_most_40_characters() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("x" * 100)
    assert str(info.value) == f"not a duration: {'x' * 40!r} (e.g. 10s, 2m, 500ms)"


# -- parse_headers and drop_record ----------------------------------------------------------------

@pytest.mark.parametrize(("ethertype", "packet", "expected"), [
    pytest.param(0x0800, IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5353, dport=53),
                 {"family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "udp",
                  "sport": 5353, "dport": 53}, id="ipv4-udp"),
    pytest.param(0x0800, IP(src="192.168.1.9", dst="10.0.0.2", options=b"\x01\x01\x01\x00")
                 / TCP(sport=40000, dport=443),
                 {"family": "ipv4", "src": "192.168.1.9", "dst": "10.0.0.2", "protocol": "tcp",
                  "sport": 40000, "dport": 443}, id="ipv4-tcp-with-options"),
    pytest.param(0x86DD, IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1234, dport=80),
                 {"family": "ipv6", "src": "2001:db8::1", "dst": "2001:db8::2", "protocol": "tcp",
                  "sport": 1234, "dport": 80}, id="ipv6-tcp"),
    pytest.param(0x86DD, IPv6(src="fd00::a", dst="fd00::b") / UDP(sport=53, dport=33000),
                 {"family": "ipv6", "src": "fd00::a", "dst": "fd00::b", "protocol": "udp",
                  "sport": 53, "dport": 33000}, id="ipv6-udp"),
    pytest.param(0x0800, IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", frag=0) / UDP(sport=1, dport=2),
                 {"family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "udp",
                  "sport": 1, "dport": 2}, id="ipv4-first-fragment-has-ports"),
    pytest.param(0x0800, IP(src="10.0.0.1", dst="10.0.0.2", proto=17, frag=185) / (b"\x00\x35" * 8),
                 {"family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "udp"},
                 id="ipv4-later-fragment-no-ports"),
    pytest.param(0x86DD, IPv6(src="fd00::a", dst="fd00::b") / IPv6ExtHdrFragment(offset=10, nh=17)
                 / (b"\x00\x35" * 8),
                 {"family": "ipv6", "src": "fd00::a", "dst": "fd00::b", "protocol": "44"},
                 id="ipv6-fragment-header"),
    pytest.param(0x0800, IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(),
                 {"family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "icmp"},
                 id="icmp"),
    pytest.param(0x86DD, IPv6(src="fd00::a", dst="fd00::b") / ICMPv6EchoRequest(),
                 {"family": "ipv6", "src": "fd00::a", "dst": "fd00::b", "protocol": "icmpv6"},
                 id="icmpv6"),
    pytest.param(0x0800, IP(src="10.0.0.1", dst="10.0.0.2", proto=132) / (b"\x00" * 12),
                 {"family": "ipv4", "src": "10.0.0.1", "dst": "10.0.0.2", "protocol": "132"},
                 id="sctp-by-number"),
    pytest.param(0x0806, ARP(pdst="10.0.0.1"), {"ethertype": "0x0806"}, id="arp"),
    pytest.param(0x88CC, b"\x02\x07" + bytes(20), {"ethertype": "0x88cc"}, id="lldp"),
    pytest.param(0, b"", {}, id="no-ethertype"),
    pytest.param(0x0800, bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP())[:19],
                 {"ethertype": "0x0800"}, id="ipv4-cut-short"),
    pytest.param(0x0800, IPv6(src="fd00::a", dst="fd00::b") / UDP(), {"ethertype": "0x0800"},
                 id="not-what-the-ethertype-says"),
])
def test_parse_headers(ethertype: int, packet: Any, expected: dict[str, Any]) -> None:
    assert parse_headers(ethertype, bytes(packet)) == expected


def test_parse_headers_reads_no_ports_from_a_short_transport_header() -> None:
    data = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))[:22]
    assert "sport" not in parse_headers(0x0800, data)


def test_drop_record_time_is_rfc3339_utc_with_nanoseconds() -> None:
    ev = DropEvent.from_buffer_copy(drop_event(ts=123_456_789, reason=77, ifindex=99, protocol=0x0806))
    symbols: list[int] = []

    def symbol(address: int) -> str:
        symbols.append(address)
        return "nf_hook_slow+0x9a"

    record = drop_record(ev, 1_700_000_000_000_000_000, reason={77: "NETFILTER_DROP"}.__getitem__,
                         symbol=symbol, pod=DB, node=NODE)
    assert record == {"time": "2023-11-14T22:13:20.123456789Z", "node": NODE, "namespace": "shop",
                      "pod": "db", "reason": "NETFILTER_DROP", "function": "nf_hook_slow+0x9a",
                      "interface": "", "ifindex": 99,  # not one of the pod's veths
                      "ethertype": "0x0806"}
    assert symbols == [0xFFFFFFFF81A0B2CC]


@pytest.mark.parametrize(("ifindex", "interface", "side"), [
    pytest.param(57, "pnml1-h", "host", id="the-host-veth"),
    # a drop in the pod's own stack: the skb's device is the pod's end of the veth pair,
    # an ifindex of the pod's netns, which the identity index knows as the veth's peer
    pytest.param(2, "pnml1-h", "pod", id="the-pods-end-of-the-veth"),
    pytest.param(3, "pnml1-x", "pod", id="the-pods-second-interface"),
    pytest.param(1, "lo", "pod", id="loopback-is-ifindex-1-in-every-netns"),
    pytest.param(0, "", "", id="no-device"),
    pytest.param(99, "", "", id="not-the-pods"),
])
def test_drop_record_names_the_interface_from_either_end(ifindex: int, interface: str,
                                                         side: str) -> None:
    two = identify(PodNetwork(NS_WEB, "/proc/1/ns/net"),
                   [HostVeth(57, "pnml1-h", peer_ifindex=2), HostVeth(60, "pnml1-x", peer_ifindex=3)],
                   PodMeta("shop", "web"))
    ev = DropEvent.from_buffer_copy(drop_event(ifindex=ifindex))
    record = drop_record(ev, 0, reason=str, symbol=hex, pod=two, node=NODE)
    assert (record["interface"], record["ifindex"], record.get("side", "")) == (
        interface, ifindex, side)


def test_drop_record_reads_only_hdr_len_bytes() -> None:
    header = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2))
    ev = DropEvent.from_buffer_copy(drop_event(header=header))
    ev.hdr_len = 20  # the IP header only: no ports
    record = drop_record(ev, 0, reason=str, symbol=hex, pod=DB, node=NODE)
    assert (record["time"], record["protocol"], "sport" in record) == (
        "1970-01-01T00:00:05.000000000Z", "tcp", False)
    assert record["function"] == "0xffffffff81a0b2cc"
    assert record["interface"] == "veth8"


def test_the_window_never_holds_more_than_its_bound(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # no watermark comes (a stalled reader): frames leave early, oldest first, and in order
    monkeypatch.setattr(pcapout, "REORDER_FRAMES", 4)
    session = rig.start("db")
    base = time.monotonic_ns()
    for us in (5, 1, 4, 2, 3, 9, 7, 8, 6):
        rig.events.packet(packet_event(udp(dport=us), 4, ts=base + us * 1000))
    seen: list[int] = []
    out = io.BytesIO()
    writer = threading.Thread(target=write_pcapng, args=(session, out, NODE),
                              kwargs={"progress": lambda s: seen.append(s.packets)})
    writer.start()
    deadline = time.monotonic() + 5
    while len(seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 5 and not session.ended  # 9 came, 4 may wait: 5 left early
    session.end("duration reached")
    writer.join(timeout=5)
    assert (session.packets, session.late, session.queued_bytes) == (9, 0, 0)
