"""The peers probe's accounts: the kernel's epoch maps drained into bounded series.

The programs of bpf/peers.c count into one of two epoch maps (and per slot, a "last
peer" entry and a rest); PeerAccounts flips them, reads and empties the one no program
writes any more, records what each slot got in a pinned map (so that a restarted
daemon's _other carries on), resolves the addresses and keeps, per pod interface and
direction, the top peers' series (monitor/topn.py). The layouts here mirror
bpf/peers.c; monitor/probes/peers.py declares the probe over them.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from monitor import log
from monitor.exposition import CounterFamily, Family
from monitor.identity import IdentityIndex
from monitor.kernel import syscalls
from monitor.kernel.maps import sum_u64_slots
from monitor.probes.base import MapWriter, Scrape, Sweep
from monitor.topn import TopSeries

EPOCH, OUTER, DRAINED = "pnm_peer_epoch", "pnm_peer_maps", "pnm_peer_drained"
PEERS = ("pnm_peers_0", "pnm_peers_1")
REST, LAST = "pnm_peer_rest", "pnm_peer_last"  # per epoch and slot: idx * slots + slot
TAG = 0x100  # bpf/peers.c PNM_PEER_TAG
DIRECTIONS = ("ingress", "egress")  # PNM_DIR_INGRESS (the pod receives), PNM_DIR_EGRESS
OTHER = "_other"
LABELS = ["namespace", "pod", "direction", "peer_kind", "peer_namespace", "peer_workload"]


class PeerKey(ctypes.Structure):
    """struct pnm_peer_key."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("dir", ctypes.c_uint8),
                ("family", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 2),
                ("addr", ctypes.c_uint8 * 16)]


class PeerCount(ctypes.Structure):
    """struct pnm_peer_count."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class PeerOne(ctypes.Structure):
    """struct pnm_peer_one."""

    _fields_ = [("addr", ctypes.c_uint64 * 2), ("tag", ctypes.c_uint64),
                ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class PeerLast(ctypes.Structure):
    """struct pnm_peer_last: one per slot and CPU, read CPU by CPU (never summed)."""

    _fields_ = [("dir", PeerOne * 2)]


class PeerRest(ctypes.Structure):
    """struct pnm_peer_rest."""

    _fields_ = [("packets", ctypes.c_uint64 * 2), ("bytes", ctypes.c_uint64 * 2)]


class Epoch(ctypes.Structure):
    """struct pnm_peer_epoch."""

    _fields_ = [("idx", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("seq", ctypes.c_uint64)]


class Drained(ctypes.Structure):
    """struct pnm_peer_drained."""

    _fields_ = [("packets", ctypes.c_uint64 * 2), ("bytes", ctypes.c_uint64 * 2),
                ("seq", ctypes.c_uint64)]


_KEY = struct.Struct("=IBB2x16s")
_COUNT = struct.Struct("=QQ")
_REST = struct.Struct("=4Q")  # packets[ingress], packets[egress], bytes[ingress], bytes[egress]
_ONE = struct.Struct("=16sQQQ")  # addr, tag, packets, bytes


class PeerLike(Protocol):
    kind: str
    namespace: str
    workload: str


class Resolver(Protocol):
    """monitor.peers.identity.PeerResolver, as this probe uses it."""

    def resolve(self, family: int, addr: bytes) -> PeerLike: ...
    def set_local(self, mapping: Mapping[tuple[int, bytes], Any]) -> None: ...


class Local(Protocol):
    """monitor.peers.local.LocalAddresses: the node's own pods' and host's addresses."""

    def refresh(self, index: IdentityIndex) -> Mapping[tuple[int, bytes], Any] | None: ...


class EpochMaps(Protocol):
    """What a drain needs of the kernel package's maps (monitor.kernel.maps.KernelMaps)."""

    def handle(self, name: str) -> Any: ...


def families() -> tuple[CounterFamily, CounterFamily]:
    """The two families collect() fills, empty (the probe's describe() declares them)."""
    return (
        CounterFamily("podnet_peer_packets", "Packets the pod sent to (egress) or received "
                      "from (ingress) each of its top peers, by the peer's kind, namespace and "
                      "workload; the rest under peer_kind=\"_other\". They sum to "
                      "podnet_packets_total.", LABELS),
        CounterFamily("podnet_peer_bytes", "Bytes the pod sent to (egress) or received from "
                      "(ingress) each of its top peers, as podnet_peer_packets; they sum to "
                      "podnet_bytes_total.", LABELS),
    )


@dataclass(frozen=True)
class PeerOptions:
    """The settings that shape the series (from monitor.settings)."""

    top: int = 10
    ttl: float = 300.0
    interval: float = 10.0


class PeerAccounts:
    """Drains the epoch maps and keeps the bounded series; one per daemon."""

    def __init__(self, maps: EpochMaps, resolver: Resolver, options: PeerOptions, *,
                 slots: Callable[[], Mapping[int, int]],
                 snapshot: Callable[[], IdentityIndex], local: Local | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._maps, self._resolver, self._options = maps, resolver, options
        self._slots, self._clock = slots, clock  # ifindex -> slot, the slot table's own view
        self._snapshot, self._local = snapshot, local
        self._series = TopSeries(top=options.top, ttl=options.ttl, width=2,
                                 rank=lambda v: v[1])
        self._lock = threading.Lock()
        self._next_window = clock() + options.interval
        self._log = log.get("peers")
        self.drains = 0

    # -- the kernel side ---------------------------------------------------------

    def start(self, adopted: bool) -> None:
        """Point the outer map at both epoch maps; take over what a last daemon left."""
        outer = self._maps.handle(OUTER)
        for i, name in enumerate(PEERS):
            syscalls.map_update(outer.fd, struct.pack("=I", i),
                              struct.pack("=I", self._maps.handle(name).fd))
        if not adopted:
            self._write_epoch(0, 1)
            return
        idx, seq = self._epoch()
        # The map the programs do not write held epoch seq - 1: a daemon killed after its
        # flip and before its drain left it full; one killed after recording its drain
        # but before emptying the map left it counted already (its slots' seq says so).
        per_slot = self._read(1 - idx, seq - 1, record=True)
        slot_if = {slot: ifindex for ifindex, slot in self._slots().items()}
        drained = self._maps.handle(DRAINED)
        for slot, ifindex in slot_if.items():
            raw = drained.lookup(struct.pack("=I", slot))
            if raw is None:
                continue
            d = Drained.from_buffer_copy(raw)
            for di in (0, 1):  # what the last daemons drained is this one's _other
                self._series.add_other((ifindex, di), [d.packets[di], d.bytes[di]])
        self._log.info("adopted the peer counts of the last daemon", slots=len(per_slot),
                       epoch=seq)

    def _epoch(self) -> tuple[int, int]:
        raw = self._maps.handle(EPOCH).lookup(struct.pack("=I", 0))
        e = Epoch.from_buffer_copy(raw) if raw is not None else Epoch()
        return e.idx & 1, e.seq

    def _write_epoch(self, idx: int, seq: int) -> None:
        self._maps.handle(EPOCH).put(struct.pack("=I", 0), bytes(Epoch(idx, 0, seq)))

    def _flip(self) -> tuple[int, int]:
        """Make the programs write the other map; returns the (map, epoch) to drain."""
        idx, seq = self._epoch()
        self._write_epoch(1 - idx, seq + 1)
        # The barrier: a write to an array of maps returns after an RCU grace period,
        # by when no program that read the old epoch is still running.
        outer = self._maps.handle(OUTER)
        syscalls.map_update(outer.fd, struct.pack("=I", idx),
                          struct.pack("=I", self._maps.handle(PEERS[idx]).fd))
        return idx, seq

    def _read(self, idx: int, seq: int, *, record: bool
              ) -> dict[int, tuple[dict[tuple[int, int, bytes], list[int]], list[int]]]:
        """Read epoch map `idx` (which no program writes), record what each slot got in
        the pinned totals, then empty it. Returns {ifindex: ({(dir, family, addr):
        [packets, bytes]}, rest [p_in, p_eg, b_in, b_eg])}."""
        peers = self._maps.handle(PEERS[idx])
        rest, lasts = self._maps.handle(REST), self._maps.handle(LAST)
        base = idx * (lasts.max_entries // 2)  # this epoch's half of each per-slot map
        drained = self._maps.handle(DRAINED)
        by_slot = self._slots()
        slot_if = {slot: ifindex for ifindex, slot in by_slot.items()}
        out: dict[int, tuple[dict[tuple[int, int, bytes], list[int]], list[int]]] = {}
        items = syscalls.batch_items(peers.fd, peers.key_size, peers.raw_value_size)
        for raw_key, raw_value in items:
            ifindex, d, family, addr = _KEY.unpack(raw_key)
            packets, nbytes = _COUNT.unpack(sum_u64_slots(raw_value, peers.value_size,
                                                          peers.ncpus))
            if ifindex not in by_slot:
                continue  # an interface no longer attached: its pod's series are gone
            entry = out.setdefault(ifindex, ({}, [0, 0, 0, 0]))[0]
            counts = entry.setdefault((d & 1, family, addr), [0, 0])
            counts[0] += packets
            counts[1] += nbytes
        slots = sorted(slot_if)
        cleared_lasts = []
        for at, raw in self._raw_slots(lasts, [base + s for s in slots]).items():
            slot = at - base
            stride = ctypes.sizeof(PeerLast)
            used = False
            for cpu in range(lasts.ncpus):
                for di in (0, 1):
                    addr, tag, packets, nbytes = _ONE.unpack_from(
                        raw, cpu * stride + di * ctypes.sizeof(PeerOne))
                    if not tag:
                        continue
                    used = True
                    entry = out.setdefault(slot_if[slot], ({}, [0, 0, 0, 0]))[0]
                    counts = entry.setdefault((di, tag & 0xFF, addr), [0, 0])
                    counts[0] += packets
                    counts[1] += nbytes
            if used:
                cleared_lasts.append(slot)
        for slot, raw in zip(slots, rest.lookup_slots([base + s for s in slots]), strict=True):
            if raw is None:
                continue
            values = list(_REST.unpack(raw))
            if any(values):
                rests = out.setdefault(slot_if[slot], ({}, [0, 0, 0, 0]))[1]
                for i, v in enumerate(values):
                    rests[i] += v
        if record:
            for ifindex, (entries, rests) in out.items():
                slot = by_slot[ifindex]
                raw = drained.lookup(struct.pack("=I", slot))
                d = Drained.from_buffer_copy(raw) if raw is not None else Drained()
                if d.seq >= seq:
                    continue  # this epoch is in the slot's totals already
                for (di, _f, _a), (p, b) in entries.items():
                    d.packets[di] += p
                    d.bytes[di] += b
                for di in (0, 1):
                    d.packets[di] += rests[di]
                    d.bytes[di] += rests[2 + di]
                d.seq = seq
                drained.put(struct.pack("=I", slot), bytes(d))
        if items:
            syscalls.map_delete_batch(peers.fd, [k for k, _v in items])
        for slot in cleared_lasts:
            lasts.put_zero(struct.pack("=I", base + slot))
        for ifindex, (_entries, rests) in out.items():
            if any(rests):
                rest.put_zero(struct.pack("=I", base + by_slot[ifindex]))
        return out

    @staticmethod
    def _raw_slots(handle: Any, slots: Sequence[int]) -> dict[int, bytes]:
        """Each slot's value as the kernel keeps it, every CPU's apart: one batch read
        from the lowest slot to the highest (attached slots are dense)."""
        if not slots:
            return {}
        first, last = min(slots), max(slots)
        size = handle.raw_value_size
        start = struct.pack("=I", first - 1) if first else None
        keys, values = syscalls.map_lookup_batch(handle.fd, 4, size, last - first + 1, start)
        wanted = set(slots)
        return {slot: bytes(values[i * size:(i + 1) * size])
                for i, slot in enumerate(memoryview(keys).cast("I").tolist()) if slot in wanted}

    # -- the daemon's side ---------------------------------------------------------

    def drain(self, forget: Sequence[int] = ()) -> None:
        """One epoch: flipped, read, resolved, added to the series. `forget`: interfaces
        gone, whose counts up to now are dropped with their series (their pod is gone)."""
        with self._lock:
            idx, seq = self._flip()
            per_if = self._read(idx, seq, record=True)
            if self._local is not None:
                mapping = self._local.refresh(self._snapshot())
                if mapping is not None:
                    self._resolver.set_local(mapping)
            now = self._clock()
            for ifindex, (entries, rests) in per_if.items():
                if ifindex in forget:
                    continue
                by_peer: list[dict[Any, list[int]]] = [{}, {}]
                for (di, family, addr), (p, b) in entries.items():
                    peer = self._resolver.resolve(family, addr)
                    key = (peer.kind, peer.namespace, peer.workload)
                    seen = by_peer[di].setdefault(key, [0, 0])
                    seen[0] += p
                    seen[1] += b
                for di in (0, 1):
                    self._series.add((ifindex, di), by_peer[di], now)
                    if rests[di] or rests[2 + di]:
                        self._series.add_other((ifindex, di), [rests[di], rests[2 + di]])
            for owner in self._series.owners():  # quiet ones too: their idle peers expire
                if owner[0] not in per_if:  # type: ignore[index]
                    self._series.add(owner, {}, now)
            for ifindex in forget:
                for di in (0, 1):
                    self._series.forget((ifindex, di))
            if now >= self._next_window:
                self._series.end_window()
                self._next_window = now + self._options.interval
            self.drains += 1

    def sweep(self, _ctx: Sweep) -> None:
        if self._clock() >= self._next_window:
            self.drain()

    def forget(self, _maps: MapWriter, _netns: int | None, ifindexes: Sequence[int]) -> None:
        self.drain(forget=ifindexes)

    def collect(self, scrape: Scrape) -> Iterator[Family]:
        self.drain()
        packets, nbytes = families()
        totals: dict[tuple[str, ...], list[int]] = {}
        with self._lock:
            for owner in self._series.owners():
                ifindex, di = cast(tuple[int, int], owner)
                pod = scrape.index.by_ifindex(ifindex)
                if pod is None:
                    continue  # attached, not yet published: its series come next scrape
                for key, values in self._series.series(owner):
                    peer = key if key is not None else (OTHER, "", "")
                    kind, namespace, workload = cast(tuple[str, str, str], peer)
                    seen = totals.setdefault((pod.namespace, pod.name, DIRECTIONS[di], kind,
                                              namespace, workload), [0, 0])
                    seen[0] += values[0]
                    seen[1] += values[1]
        for series, (p, b) in sorted(totals.items()):
            packets.add(series, p)
            nbytes.add(series, b)
        yield packets
        yield nbytes
