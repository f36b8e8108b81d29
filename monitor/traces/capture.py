"""On-demand per-pod packet traces and drop traces: sessions, limits, the perf reader.

A trace switches a pod's slots on in pnm_trace (with a kernel prefilter, a
superset of the user's pcap filter); one thread reads the perf buffers and
hands each packet to the sessions of its slot, which apply the exact filter
(libpcap) and queue it; the consumer of a session (an HTTP response, a
stored capture) writes pcapng from that queue, so a slow client never holds
up the reader: a full queue loses packets, and says how many. Sessions end
at their first limit (duration, packets, bytes), when their pod goes away,
or when their consumer does. The moment a session ends, whatever ends it, its
slots' switches are set again from the sessions still running (off, if none):
a consumer that still writes out what was queued, or one stuck on a client
that stopped reading, keeps no packets coming. The perf buffers are open only
while a trace runs.

Drop traces work alike on pnm_drop_trace / pnm_drop_events, as NDJSON.

A session and its request are in monitor/traces/session.py; writing one out, in
monitor/traces/pcapout.py (pcapng) and monitor/traces/dropevents.py (NDJSON).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

from monitor import log
from monitor.identity import IdentityIndex, Pod
from monitor.kernel.maps import decode
from monitor.kernel.source import SWITCH_TRACING, SWITCHES_MAP
from monitor.probes import drops as drops_probe
from monitor.probes import trace as trace_probe
from monitor.probes.base import u32_key
from monitor.traces.dropevents import drop_record
from monitor.traces.pcapfilter import FilterError, PacketFilter, Prefilter, prefilter
from monitor.traces.reorder import SLACK_NS
from monitor.traces.session import CaptureError, Limits, Session, TraceRequest

# Pages of each CPU's packet ring (drop events get a quarter): 1 MiB holds ~700 full-size
# frames between two reads. Halved while the kernel refuses to map it (_open_rings).
RING_PAGES = 256
RING_PAGES_MIN = 8
# The kernel copies at least this much of each packet whatever the snap length, so
# that the exact filter sees the headers it tests (a filter run on a copy cut
# short would reject packets tcpdump keeps); the copy is cut to the snap length
# after filtering.
FILTER_BYTES = 256
DIRECTION = {0: "inbound", 1: "outbound"}  # PNM_DIR_INGRESS: the pod receives


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where the C library has none (musl).

    The packets a session queues are bytes objects of up to 64 KB, allocated by
    the perf reader thread from its own malloc arena; freed, glibc keeps them for
    reuse (a 32 MB queue stayed in the daemon's RSS for good). malloc_trim hands
    the free pages of every arena back to the kernel."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def give_back() -> None:
        trim(0)
    return give_back


give_back_memory = _malloc_trim()

class EventReader(Protocol):
    """The kernel package's perf buffers (monitor.kernel.programs.Programs)."""

    def open_perf(self, name: str, callback: Callable[[bytes], None],
                  lost: Callable[[int], None], pages: int) -> None: ...
    def poll_perf(self, timeout_ms: int) -> None: ...
    def close_perf(self) -> None: ...


class SlotWriter(Protocol):
    def put(self, name: str, key: bytes, value: bytes) -> None: ...

class CaptureManager:
    """Starts and ends sessions, programs the kernel switches, reads the perf buffers."""

    def __init__(self, events: EventReader, maps: SlotWriter, limits: Limits,
                 snapshot: Callable[[], IdentityIndex], node: str, *,
                 drop_reason: Callable[[int], str] = str,
                 symbol: Callable[[int], str] = hex,
                 on_lost: Callable[[str, int], None] = lambda _s, _n: None) -> None:
        self._events, self._maps, self.limits = events, maps, limits
        self._snapshot, self._node = snapshot, node
        self._drop_reason, self._symbol, self._on_lost = drop_reason, symbol, on_lost
        # re-entrant: a session ended while it is held switches its slots under it again
        self._lock = threading.RLock()
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.ring_pages = 0  # of the rings open now, or last (each CPU's packet ring)
        self._reader_lock = threading.Lock()
        self._stop = threading.Event()
        self._log = log.get("capture")
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; pcapng wants wall-clock time.
        self._wall_offset = time.time_ns() - time.monotonic_ns()

    # -- sessions ----------------------------------------------------------------

    def start(self, namespace: str, name: str, request: TraceRequest, kind: str = "packets") -> Session:
        index = self._snapshot()
        pod = self._find(index, namespace, name)
        interfaces = tuple((v.ifindex, v.name, slot) for v in pod.interfaces
                           if (slot := index.slot_of(v.ifindex)) is not None)
        slots = frozenset(slot for _i, _n, slot in interfaces)
        if not slots:
            raise CaptureError(409, f"pod {namespace}/{name} is not attached (yet): nothing to trace")
        req = self._checked(request)
        packet_filter = None
        if kind == "packets":
            try:
                packet_filter = PacketFilter(req.filter, snaplen=req.snaplen)
            except FilterError as exc:
                raise CaptureError(400, f"bad filter: {exc}") from None
        # the buffers are open before a switch goes on, and the reader cannot close them
        # (no trace running) between the two: it decides that under _reader_lock too
        with self._reader_lock, self._lock:
            running = [s for s in self._sessions.values() if not s.ended]
            if len(running) >= self.limits.per_node:
                raise CaptureError(429, f"{len(running)} traces run on this node already "
                                        f"(at most {self.limits.per_node})")
            same_pod = [s for s in running if s.pod.netns_inode == pod.netns_inode]
            if len(same_pod) >= self.limits.per_pod:
                raise CaptureError(429, f"{len(same_pod)} traces of {namespace}/{name} run "
                                        f"already (at most {self.limits.per_pod})")
            self._ensure_reader()
            now = time.monotonic()
            session = Session(id=next(self._ids), kind=kind, pod=pod, slots=slots,
                              interfaces=interfaces, request=req, started=now,
                              deadline=now + req.duration, filter=packet_filter,
                              on_end=self._switch_off, wall_offset=self._wall_offset)
            self._sessions[session.id] = session
            self._program(slots)
        self._log.info("trace started", id=session.id, kind=kind, namespace=namespace, pod=name,
                       duration=req.duration, filter=req.filter)
        return session

    def finish(self, session: Session, why: str) -> None:
        """End a session (idempotent) and switch its slots off if nothing else traces them."""
        with self._lock:
            known = self._sessions.pop(session.id, None) is not None
            session.end(why)  # (its on_end finds it gone: the slots are programmed once)
            if not known:
                return
            self._program(session.slots)
            idle = not self._sessions
        if session.filter is not None:
            session.filter.close()
        _discard(session)
        if idle:
            give_back_memory()
        self._log.info("trace ended", id=session.id, kind=session.kind, reason=session.ended,
                       packets=session.packets, bytes=session.bytes,
                       lost=session.lost_kernel + session.lost_queue, out_of_order=session.late)

    def _switch_off(self, session: Session) -> None:
        """A session has just ended (its deadline, a limit, its pod or its client): its
        slots' switches follow the sessions still running at once, not when its consumer
        is done (that may be a write timeout away)."""
        with self._lock:
            if session.id in self._sessions:
                self._program(session.slots)

    def active(self) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if not s.ended]

    def _find(self, index: IdentityIndex, namespace: str, name: str) -> Pod:
        for pod in index.pods():
            if (pod.namespace, pod.name) == (namespace, name):
                return pod
        raise CaptureError(404, f"no pod {namespace}/{name} on node {self._node}")

    def _checked(self, r: TraceRequest) -> TraceRequest:
        lim = self.limits
        duration = r.duration or lim.default_duration
        if not 0 < duration <= lim.max_duration:
            raise CaptureError(400, f"duration {duration:g} s is outside (0, {lim.max_duration:g}] s")
        if not 0 <= r.packets <= lim.max_packets:
            raise CaptureError(400, f"packets {r.packets} is outside 0..{lim.max_packets}")
        if not 0 <= r.bytes <= lim.max_bytes:
            raise CaptureError(400, f"bytes {r.bytes} is outside 0..{lim.max_bytes}")
        snaplen = r.snaplen or lim.default_snaplen
        if not 14 <= snaplen <= lim.max_snaplen:
            raise CaptureError(400, f"snaplen {snaplen} is outside 14..{lim.max_snaplen}")
        if len(r.filter) > 4096:
            raise CaptureError(400, "the filter is longer than 4096 characters")
        return TraceRequest(duration, r.packets or lim.max_packets, r.bytes or lim.max_bytes,
                            snaplen, r.filter)

    def _program(self, slots: frozenset[int]) -> None:
        """Set each slot's kernel switches from the sessions that want it, and the node's
        tracing switch, which lets packets skip their slot's settings while no packet
        trace runs (bpf/trace.c): on before any slot's, off after every slot's (lock held)."""
        tracing = any(s.kind == "packets" and not s.ended for s in self._sessions.values())
        if tracing:
            self._set_tracing(True)
        for slot in slots:
            wanting = [s for s in self._sessions.values() if slot in s.slots and not s.ended]
            packets = [s for s in wanting if s.kind == "packets"]
            cfg = trace_probe.TraceConfig()
            if packets:
                cfg.on = 1
                cfg.snaplen = max(FILTER_BYTES, *(s.request.snaplen for s in packets))
                if len(packets) == 1:  # several sessions: copy everything, filter in userspace
                    _apply_prefilter(cfg, prefilter(packets[0].request.filter))
            self._maps.put(trace_probe.MAP, u32_key(slot), bytes(cfg))
            on = any(s.kind == "drops" for s in wanting)
            self._maps.put(drops_probe.TRACE, u32_key(slot), struct.pack("=I", on))
        if not tracing:
            self._set_tracing(False)

    def _set_tracing(self, on: bool) -> None:
        self._maps.put(SWITCHES_MAP, u32_key(SWITCH_TRACING), struct.pack("=I", on))

    # -- the perf reader ------------------------------------------------------------

    def _ensure_reader(self) -> None:
        """Open the perf buffers and start their reader, unless they are (_reader_lock held:
        two first traces at once must open the buffers once)."""
        if self._thread is not None:
            return
        self._open_rings()
        self._thread = threading.Thread(target=self._read, name="perf", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for session in self.active():
            self.finish(session, "the daemon is stopping")

    def _read(self) -> None:
        while not self._stop.is_set():
            # Every frame stamped before now is in its CPU's ring by the time this poll
            # drains the rings (monitor/reorder.py): after it, none stamped before this
            # mark (less the slack) is still to come, and writers may put theirs in order.
            mark = time.monotonic_ns() - SLACK_NS + self._wall_offset
            self._events.poll_perf(100)
            for session in self.active():
                session.watermark = mark
            self._expire()
            if self._close_when_idle():
                return

    def _open_rings(self) -> None:
        """Open the packet and drop-event rings, as large as the kernel lets us map.

        Without CAP_IPC_LOCK (the DaemonSet does not grant it) a perf ring's pages are
        charged to the user's perf_event_mlock_kb allowance and then to RLIMIT_MEMLOCK,
        and a container's limit can be small: a ring that the kernel refuses (EPERM) is
        halved until it maps, down to RING_PAGES_MIN. A smaller ring holds fewer packets
        before it overruns, and overruns are counted as lost, never hidden.
        """
        pages = RING_PAGES
        while True:
            try:
                self._events.open_perf(trace_probe.EVENTS, self._on_packet,
                                       self._lost("capture"), pages)
                self._events.open_perf(drops_probe.EVENTS, self._on_drop,
                                       self._lost("drop_events"), max(1, pages // 4))
            except OSError as exc:
                self._events.close_perf()
                if exc.errno == errno.EPERM and pages > RING_PAGES_MIN:
                    pages //= 2
                    continue
                self._log.error("perf buffers refused", error=str(exc), pages=pages)
                raise CaptureError(503, f"the kernel refused the trace buffers ({exc}): "
                                        "grant the daemon CAP_IPC_LOCK or raise its "
                                        "RLIMIT_MEMLOCK") from None
            if pages < RING_PAGES:
                self._log.warning("perf buffers smaller than wanted", pages=pages,
                                  wanted=RING_PAGES, why="the memlock limit")
            self.ring_pages = pages
            return

    def _close_when_idle(self) -> bool:
        """No trace running: close the perf buffers (a page ring per CPU each, in the
        kernel and mapped here) and let this thread end; the next trace opens them again."""
        with self._reader_lock:
            if self._stop.is_set() or self.active():
                return False
            self._events.close_perf()
            self._thread = None
            return True

    def _expire(self) -> None:
        index = self._snapshot()
        live = {pod.netns_inode for pod in index.pods()}
        now = time.monotonic()
        for session in self.active():
            if session.pod.netns_inode not in live:
                session.end("the pod went away")
            elif now >= session.deadline:
                session.end("duration reached")

    def _lost(self, source: str) -> Callable[[int], None]:
        def lost(count: int) -> None:
            self._on_lost(source, count)
            kind = "drops" if source == "drop_events" else "packets"
            for session in self.active():
                if session.kind == kind:
                    session.lost_kernel += count
        return lost

    def _on_packet(self, raw: bytes) -> None:
        size = struct.calcsize("=QIIIB3x")
        if len(raw) < size:
            return
        meta = decode(trace_probe.TraceMeta, raw[:size])
        data = raw[size: size + meta.caplen]
        for session in self.active():
            if session.kind != "packets" or meta.slot not in session.slots:
                continue
            try:
                if session.filter is not None and not session.filter.matches(data, meta.len):
                    continue
            except ValueError:  # finished (its filter closed) since active() was read
                continue
            if not session.reserve(len(data)):
                session.lost_queue += 1
                continue
            item = (meta.ts + self._wall_offset, meta.slot, DIRECTION.get(meta.dir, "inbound"),
                    data, meta.len)
            try:
                session.queue.put_nowait(item)
            except queue.Full:
                session.release(len(data))
                session.lost_queue += 1

    def _on_drop(self, raw: bytes) -> None:
        size = len(bytes(drops_probe.DropEvent()))
        if len(raw) < size:
            return
        ev = decode(drops_probe.DropEvent, raw[:size])
        for session in self.active():
            if session.kind != "drops" or ev.slot not in session.slots:
                continue
            record = drop_record(ev, self._wall_offset, reason=self._drop_reason,
                                 symbol=self._symbol, pod=session.pod, node=self._node)
            try:
                session.queue.put_nowait(record)
            except queue.Full:
                session.lost_queue += 1


def _discard(session: Session) -> None:
    """Let go of what a finished session still has queued (its consumer is done)."""
    while True:
        try:
            item = session.queue.get_nowait()
        except queue.Empty:
            return
        if session.kind == "packets":
            session.release(len(item[3]))


def _apply_prefilter(cfg: trace_probe.TraceConfig, pre: Prefilter) -> None:
    cfg.protocol = pre.protocol
    cfg.port = struct.unpack("=H", struct.pack("!H", pre.port))[0]  # network order
    if pre.address:
        cfg.family = 4 if len(pre.address) == 4 else 6
        raw = pre.address.ljust(16, b"\0")
        for i in range(16):
            cfg.addr[i] = raw[i]
