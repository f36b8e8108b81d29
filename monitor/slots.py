"""Interface slots: the index of each attached host veth in the per-CPU counter arrays.

The TC programs find an interface's slot through a direct-mapped table keyed
by ifindex (bpf/pnm.h explains why: array lookups are inlined, hash lookups
cost ~35 ns per packet). This module is the only writer of that table and of
its overflow hash, and it zeroes a slot's counters in every per-slot map
before handing the slot out.

Freed slots are reused oldest-first: a program run that was already in
flight when an interface was detached can still touch its old slot, and by
the time that slot is handed out again such runs are long over.

The tables outlive a daemon when its maps are pinned. The next daemon adopts
them: every slot held (pnm_slot_owner says by which interface of which netns)
stays with its interface if that interface still belongs to the same netns,
so the counts in it carry on; the rest are released after the first pass.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol


class SlotMap(Protocol):
    """The operations slots need of a kernel map (monitor.kernel.maps.MapHandle has them)."""

    def put(self, key: bytes, value: bytes) -> None: ...
    def put_zero(self, key: bytes) -> None: ...
    def delete(self, key: bytes) -> bool: ...
    def items(self) -> list[tuple[bytes, bytes]]: ...


class SlotsExhaustedError(RuntimeError):
    """Every slot is taken: max_interfaces is too small for this node."""


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


class SlotTable:
    """Assigns and releases slots; mirrors the kernel's table in Python."""

    def __init__(self, *, ifslots: SlotMap, spill: SlotMap, netns: SlotMap, owners: SlotMap,
                 per_slot: Iterable[SlotMap], capacity: int, buckets: int,
                 slot_keyed: Iterable[SlotMap] = ()) -> None:
        """slot_keyed: hash maps whose keys begin with a u32 slot (pending handshakes and
        DNS queries): a slot's entries in them go before the slot is handed out again."""
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self._ifslots, self._spill, self._per_slot = ifslots, spill, list(per_slot)
        self._slot_keyed = list(slot_keyed)
        self._netns, self._owners, self._capacity = netns, owners, capacity
        self._owner_netns: dict[int, int] = {}  # ifindex -> the netns it was assigned for
        self._unclaimed: set[int] = set()  # adopted ifindexes not assigned again yet
        self._netns_slot: dict[int, int] = {}  # what pnm_netns holds
        self._buckets = buckets
        self._free: deque[int] = deque(range(capacity))
        self._slot_of: dict[int, int] = {}
        self._bucket_owner: dict[int, int] = {}  # bucket -> ifindex holding it
        self._spilled: set[int] = set()

    def slot_of(self, ifindex: int) -> int | None:
        return self._slot_of.get(ifindex)

    def assigned(self) -> dict[int, int]:
        return dict(self._slot_of)

    def spilled(self) -> int:
        """How many interfaces use the slower overflow hash (their bucket was taken)."""
        return len(self._spilled)

    def adopt(self) -> int:
        """Take over the tables a previous daemon left in pinned maps; returns how
        many slots were held. Entries that disagree with pnm_slot_owner are cleared."""
        for raw_key, raw in self._owners.items():
            slot = struct.unpack("=I", raw_key)[0]
            ifindex, netns = struct.unpack("=II", raw)
            if ifindex and slot < self._capacity and ifindex not in self._slot_of:
                self._slot_of[ifindex] = slot
                self._owner_netns[ifindex] = netns
        held = set(self._slot_of.values())
        self._free = deque(s for s in range(self._capacity) if s not in held)
        for raw_key, raw in self._ifslots.items():
            bucket = struct.unpack("=I", raw_key)[0]
            ifindex, slot = struct.unpack("=II", raw)
            if not ifindex:
                continue
            if self._slot_of.get(ifindex) == slot:
                self._bucket_owner[bucket] = ifindex
            else:
                self._ifslots.put(raw_key, bytes(8))
        for raw_key, raw in self._spill.items():
            ifindex, slot = struct.unpack("=I", raw_key)[0], struct.unpack("=I", raw)[0]
            if self._slot_of.get(ifindex) == slot and ifindex not in self._bucket_owner.values():
                self._spilled.add(ifindex)
            else:
                self._spill.delete(raw_key)
        for ifindex in [i for i in self._slot_of if i not in self._spilled
                        and self._bucket_owner.get(i & (self._buckets - 1)) != i]:
            self._forget(ifindex)  # the programs cannot find it: not worth keeping
        for raw_key, raw in self._netns.items():
            self._netns_slot[struct.unpack("=I", raw_key)[0]] = struct.unpack("=I", raw)[0]
        self._unclaimed = set(self._slot_of)
        return len(self._slot_of)

    def _forget(self, ifindex: int) -> None:
        slot = self._slot_of.pop(ifindex)
        self._owner_netns.pop(ifindex, None)
        self._owners.put_zero(u32(slot))
        self._free.append(slot)

    def release_unclaimed(self) -> list[int]:
        """Release adopted slots no interface claimed (pods gone while no daemon ran)."""
        gone = sorted(self._unclaimed)
        for ifindex in gone:
            self.release(ifindex)
        self._unclaimed.clear()
        return gone

    def assign(self, ifindex: int, netns: int = 0) -> int:
        """A zeroed slot for an interface, visible to the programs when this returns.
        An adopted slot is kept (its counts carry on) if it was held for this netns."""
        if ifindex in self._slot_of:
            if ifindex in self._unclaimed and self._owner_netns.get(ifindex) != netns:
                self.release(ifindex)  # the ifindex was reused by another pod meanwhile
            else:
                self._unclaimed.discard(ifindex)
                return self._slot_of[ifindex]
        if not self._free:
            raise SlotsExhaustedError(f"all {len(self._slot_of)} interface slots are in use; "
                                 "raise max_interfaces")
        slot = self._free.popleft()
        try:
            for m in self._per_slot:  # zero first: the programs must never see old counts
                m.put_zero(u32(slot))
            # ... nor an old owner's pending state: a query of a pod gone since would
            # time out into the new owner's counts
            for m in self._slot_keyed:
                for key, _value in m.items():
                    if key[:4] == u32(slot):
                        m.delete(key)
            bucket = ifindex & (self._buckets - 1)
            if bucket not in self._bucket_owner:
                self._ifslots.put(u32(bucket), struct.pack("=II", ifindex, slot))
                self._bucket_owner[bucket] = ifindex
            else:
                self._spill.put(u32(ifindex), u32(slot))
                self._spilled.add(ifindex)
            self._owners.put(u32(slot), struct.pack("=II", ifindex, netns))
        except OSError:
            self._free.appendleft(slot)
            raise
        self._slot_of[ifindex] = slot
        self._owner_netns[ifindex] = netns
        return slot

    def sync_netns(self, wanted: dict[int, int]) -> None:
        """Make pnm_netns map each pod netns (inode) to the slot of the given ifindex.

        Tracepoint programs count a pod's events in that slot; netns that are no
        longer wanted are removed, so their events count under the node.
        """
        target = {netns: self._slot_of[ifindex] for netns, ifindex in wanted.items()
                  if ifindex in self._slot_of}
        for netns in list(self._netns_slot):
            if netns not in target:
                self._netns.delete(u32(netns))
                del self._netns_slot[netns]
        for netns, slot in target.items():
            if self._netns_slot.get(netns) != slot:
                self._netns.put(u32(netns), u32(slot))
                self._netns_slot[netns] = slot

    def release(self, ifindex: int) -> None:
        """Take an interface's slot away from the programs; idempotent."""
        slot = self._slot_of.pop(ifindex, None)
        if slot is None:
            return
        self._owner_netns.pop(ifindex, None)
        self._unclaimed.discard(ifindex)
        bucket = ifindex & (self._buckets - 1)
        try:
            if ifindex in self._spilled:
                self._spilled.discard(ifindex)
                self._spill.delete(u32(ifindex))
            elif self._bucket_owner.get(bucket) == ifindex:
                del self._bucket_owner[bucket]
                self._ifslots.put(u32(bucket), bytes(8))
            self._owners.put_zero(u32(slot))
        finally:
            # Even if the kernel write failed: the entry names an ifindex that is gone,
            # and a slot kept out of the free list would be lost for good.
            self._free.append(slot)


class SlotCopies:
    """A per-slot map holding `copies` arrays back to back (MapLayout.copies): zeroing a
    slot zeroes it in each."""

    def __init__(self, handle: SlotMap, copies: int, slots: int) -> None:
        self._handle, self._copies, self._slots = handle, copies, slots

    def put(self, key: bytes, value: bytes) -> None:
        self._handle.put(key, value)

    def put_zero(self, key: bytes) -> None:
        slot = struct.unpack("=I", key)[0]
        for k in range(self._copies):
            self._handle.put_zero(u32(slot + k * self._slots))

    def delete(self, key: bytes) -> bool:
        return self._handle.delete(key)

    def items(self) -> list[tuple[bytes, bytes]]:
        return self._handle.items()


def slot_keyed_maps(probes: Iterable[object], handle: Callable[[str], SlotMap]) -> list[SlotMap]:
    """The hash maps whose keys begin with a slot (MapLayout.slot_keyed)."""
    return [handle(name) for probe in probes
            for name, layout in getattr(probe, "maps", {}).items() if layout.slot_keyed]


def per_slot_maps(probes: Iterable[object], handle: Callable[[str], SlotMap],
                  max_interfaces: int) -> list[SlotMap]:
    """The maps SlotTable zeroes for a new slot: every probe's per-slot map, each copy."""
    out: list[SlotMap] = []
    for probe in probes:
        for name, layout in getattr(probe, "maps", {}).items():
            if layout.per_slot:
                h = handle(name)
                out.append(h if layout.copies == 1
                           else SlotCopies(h, layout.copies, max_interfaces + 1))
    return out
