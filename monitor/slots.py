"""Interface slots: the index of each attached host veth in the per-CPU counter arrays.

The TC programs find an interface's slot through a direct-mapped table keyed
by ifindex (bpf/pnm.h explains why: array lookups are inlined, hash lookups
cost ~35 ns per packet). This module is the only writer of that table and of
its overflow hash, and it zeroes a slot's counters in every per-slot map
before handing the slot out.

Freed slots are reused oldest-first: a program run that was already in
flight when an interface was detached can still touch its old slot, and by
the time that slot is handed out again such runs are long over.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Protocol


class SlotMap(Protocol):
    """The operations slots need of a kernel map (monitor.maps.MapHandle has them)."""

    def put(self, key: bytes, value: bytes) -> None: ...
    def put_zero(self, key: bytes) -> None: ...
    def delete(self, key: bytes) -> bool: ...


class SlotsExhaustedError(RuntimeError):
    """Every slot is taken: max_interfaces is too small for this node."""


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


class SlotTable:
    """Assigns and releases slots; mirrors the kernel's table in Python."""

    def __init__(self, *, ifslots: SlotMap, spill: SlotMap, netns: SlotMap,
                 per_slot: Iterable[SlotMap], capacity: int, buckets: int) -> None:
        if buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self._ifslots, self._spill, self._per_slot = ifslots, spill, list(per_slot)
        self._netns = netns
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

    def assign(self, ifindex: int) -> int:
        """A zeroed slot for an interface, visible to the programs when this returns."""
        if ifindex in self._slot_of:
            return self._slot_of[ifindex]
        if not self._free:
            raise SlotsExhaustedError(f"all {len(self._slot_of)} interface slots are in use; "
                                 "raise max_interfaces")
        slot = self._free.popleft()
        try:
            for m in self._per_slot:  # zero first: the programs must never see old counts
                m.put_zero(u32(slot))
            bucket = ifindex & (self._buckets - 1)
            if bucket not in self._bucket_owner:
                self._ifslots.put(u32(bucket), struct.pack("=II", ifindex, slot))
                self._bucket_owner[bucket] = ifindex
            else:
                self._spill.put(u32(ifindex), u32(slot))
                self._spilled.add(ifindex)
        except OSError:
            self._free.appendleft(slot)
            raise
        self._slot_of[ifindex] = slot
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
        bucket = ifindex & (self._buckets - 1)
        try:
            if ifindex in self._spilled:
                self._spilled.discard(ifindex)
                self._spill.delete(u32(ifindex))
            elif self._bucket_owner.get(bucket) == ifindex:
                del self._bucket_owner[bucket]
                self._ifslots.put(u32(bucket), bytes(8))
        finally:
            # Even if the kernel write failed: the entry names an ifindex that is gone,
            # and a slot kept out of the free list would be lost for good.
            self._free.append(slot)
