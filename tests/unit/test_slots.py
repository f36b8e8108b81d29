"""The interface slot table over fake kernel maps: which writes, in which order."""

from __future__ import annotations

import struct

import pytest

from monitor.slots import SlotTable

Op = tuple[object, ...]
BUCKETS = 16


class FakeMap:
    """Records put/put_zero/delete as (map, op, key, value) in a log shared by all maps."""

    def __init__(self, name: str, log: list[Op]) -> None:
        self.name, self.log = name, log
        self.data: dict[int, bytes] = {}
        self.fail: set[str] = set()  # ops that raise OSError

    def _key(self, op: str, key: bytes) -> int:
        if op in self.fail:
            raise OSError(28, f"{self.name}: {op} failed")
        return int(struct.unpack("=I", key)[0])

    def put(self, key: bytes, value: bytes) -> None:
        k = self._key("put", key)
        self.log.append((self.name, "put", k, value))
        self.data[k] = value

    def put_zero(self, key: bytes) -> None:
        k = self._key("put_zero", key)
        self.log.append((self.name, "put_zero", k))
        self.data[k] = b"\0"

    def delete(self, key: bytes) -> bool:
        k = self._key("delete", key)
        self.log.append((self.name, "delete", k))
        return self.data.pop(k, None) is not None

    def items(self) -> list[tuple[bytes, bytes]]:
        return [(struct.pack("=I", k), v) for k, v in sorted(self.data.items())]


class Maps:
    def __init__(self, capacity: int = 4) -> None:
        self.log: list[Op] = []
        self.ifslots = FakeMap("ifslots", self.log)
        self.spill = FakeMap("spill", self.log)
        self.packets = FakeMap("packets", self.log)
        self.other = FakeMap("other", self.log)
        self.netns = FakeMap("netns", self.log)
        self.owner_log: list[Op] = []  # apart: the write order tests below are about the rest
        self.owners = FakeMap("owners", self.owner_log)
        self.table = SlotTable(ifslots=self.ifslots, spill=self.spill, netns=self.netns,
                               owners=self.owners, per_slot=[self.packets, self.other],
                               capacity=capacity, buckets=BUCKETS)

    def take(self) -> list[Op]:
        ops, self.log[:] = list(self.log), []
        return ops


def entry(ifindex: int, slot: int) -> bytes:
    return struct.pack("=II", ifindex, slot)


@pytest.fixture
def maps() -> Maps:
    return Maps()


def test_assign_zeroes_the_slot_before_publishing_it(maps: Maps) -> None:
    assert maps.table.assign(7) == 0
    assert maps.take() == [("packets", "put_zero", 0), ("other", "put_zero", 0),
                           ("ifslots", "put", 7, entry(7, 0))]
    assert maps.table.assign(9) == 1
    assert maps.take() == [("packets", "put_zero", 1), ("other", "put_zero", 1),
                           ("ifslots", "put", 9, entry(9, 1))]
    assert maps.table.assigned() == {7: 0, 9: 1}
    assert (maps.table.slot_of(7), maps.table.slot_of(8)) == (0, None)


def test_assign_twice_is_one_slot(maps: Maps) -> None:
    maps.table.assign(7)
    maps.take()
    assert maps.table.assign(7) == 0
    assert maps.take() == []


def test_bucket_is_ifindex_modulo_buckets(maps: Maps) -> None:
    maps.table.assign(BUCKETS * 3 + 5)
    assert maps.take()[-1] == ("ifslots", "put", 5, entry(BUCKETS * 3 + 5, 0))


def test_taken_bucket_spills(maps: Maps) -> None:
    maps.table.assign(5)
    maps.take()
    assert maps.table.assign(5 + BUCKETS) == 1
    assert maps.take() == [("packets", "put_zero", 1), ("other", "put_zero", 1),
                           ("spill", "put", 5 + BUCKETS, struct.pack("=I", 1))]
    assert maps.table.spilled() == 1


def test_release_empties_the_bucket(maps: Maps) -> None:
    maps.table.assign(7)
    maps.take()
    maps.table.release(7)
    assert maps.take() == [("ifslots", "put", 7, bytes(8))]
    assert maps.table.assigned() == {}
    maps.table.release(7)  # idempotent
    maps.table.release(99)  # never assigned
    assert maps.take() == []


def test_release_of_a_spilled_interface(maps: Maps) -> None:
    maps.table.assign(5)
    maps.table.assign(5 + BUCKETS)
    maps.take()
    maps.table.release(5 + BUCKETS)
    assert maps.take() == [("spill", "delete", 5 + BUCKETS)]
    assert maps.table.spilled() == 0
    assert maps.ifslots.data[5] == entry(5, 0)  # the bucket's owner is untouched


def test_released_bucket_is_taken_by_the_next_interface(maps: Maps) -> None:
    maps.table.assign(5)
    maps.table.assign(5 + BUCKETS)  # spilled
    maps.table.release(5)
    maps.take()
    assert maps.table.assign(5 + 2 * BUCKETS) == 2  # fresh slots before the freed slot 0
    assert maps.take()[-1] == ("ifslots", "put", 5, entry(5 + 2 * BUCKETS, 2))
    assert maps.table.spilled() == 1


def test_freed_slots_reused_oldest_first(maps: Maps) -> None:
    for ifindex in (10, 11, 12, 13):
        maps.table.assign(ifindex)
    maps.table.release(12)
    maps.table.release(10)
    assert maps.table.assign(20) == 2  # freed first
    assert maps.table.assign(21) == 0


def test_fresh_slots_before_freed_ones(maps: Maps) -> None:
    maps.table.assign(10)
    maps.table.release(10)
    assert maps.table.assign(11) == 1
    assert maps.table.assign(12) == 2
    assert maps.table.assign(13) == 3
    assert maps.table.assign(14) == 0


def test_exhausted(maps: Maps) -> None:
    for ifindex in (10, 11, 12, 13):
        maps.table.assign(ifindex)
    maps.take()
    with pytest.raises(RuntimeError, match=r"^all 4 interface slots are in use; raise max_interfaces$"):
        maps.table.assign(14)
    assert maps.take() == []
    maps.table.release(11)
    assert maps.table.assign(14) == 1


@pytest.mark.parametrize(("map_name", "op"), [("packets", "put_zero"), ("other", "put_zero"),
                                              ("ifslots", "put")])
def test_failed_assign_gives_the_slot_back(maps: Maps, map_name: str, op: str) -> None:
    getattr(maps, map_name).fail.add(op)
    with pytest.raises(OSError, match="failed"):
        maps.table.assign(7)
    assert maps.table.assigned() == {}
    getattr(maps, map_name).fail.clear()
    assert maps.table.assign(7) == 0  # the same slot, and the bucket is free
    assert maps.ifslots.data[7] == entry(7, 0)


def test_failed_spill_gives_the_slot_back(maps: Maps) -> None:
    maps.table.assign(5)
    maps.spill.fail.add("put")
    with pytest.raises(OSError):
        maps.table.assign(5 + BUCKETS)
    assert maps.table.spilled() == 0
    maps.spill.fail.clear()
    assert maps.table.assign(5 + BUCKETS) == 1


def test_buckets_must_be_a_power_of_two() -> None:
    log: list[Op] = []
    with pytest.raises(ValueError, match="power of two"):
        SlotTable(ifslots=FakeMap("a", log), spill=FakeMap("b", log), netns=FakeMap("c", log),
                  owners=FakeMap("d", log), per_slot=[], capacity=4, buckets=24)


# -- pnm_netns: a pod's netns inode -> the slot its tracepoint events count in ---------------------

NS_A, NS_B, NS_C = 4026532001, 4026532002, 4026532003


def netns_ops(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op[0] == "netns"]


def test_sync_netns_adds_entries_for_assigned_interfaces(maps: Maps) -> None:
    maps.table.assign(7)  # slot 0
    maps.table.assign(9)  # slot 1
    maps.take()
    maps.table.sync_netns({NS_A: 9, NS_B: 7})
    assert sorted(maps.take(), key=str) == sorted([
        ("netns", "put", NS_A, struct.pack("=I", 1)),
        ("netns", "put", NS_B, struct.pack("=I", 0))], key=str)
    assert maps.netns.data == {NS_A: struct.pack("=I", 1), NS_B: struct.pack("=I", 0)}


def test_sync_netns_writes_nothing_when_nothing_changed(maps: Maps) -> None:
    maps.table.assign(7)
    maps.table.sync_netns({NS_A: 7})
    maps.take()
    maps.table.sync_netns({NS_A: 7})
    assert maps.take() == []


def test_sync_netns_updates_a_changed_slot(maps: Maps) -> None:
    maps.table.assign(7)  # slot 0
    maps.table.assign(9)  # slot 1
    maps.table.sync_netns({NS_A: 7, NS_B: 9})
    maps.take()
    maps.table.sync_netns({NS_A: 9, NS_B: 9})  # NS_A's first interface is now ifindex 9
    assert maps.take() == [("netns", "put", NS_A, struct.pack("=I", 1))]
    assert maps.netns.data[NS_A] == struct.pack("=I", 1)


def test_sync_netns_removes_what_is_no_longer_wanted(maps: Maps) -> None:
    maps.table.assign(7)
    maps.table.assign(9)
    maps.table.sync_netns({NS_A: 7, NS_B: 9})
    maps.take()
    maps.table.sync_netns({NS_B: 9})
    assert maps.take() == [("netns", "delete", NS_A)]
    assert maps.netns.data == {NS_B: struct.pack("=I", 1)}
    maps.table.sync_netns({})
    assert maps.take() == [("netns", "delete", NS_B)]
    assert maps.netns.data == {}


def test_sync_netns_ignores_interfaces_without_a_slot(maps: Maps) -> None:
    maps.table.assign(7)
    maps.take()
    maps.table.sync_netns({NS_A: 7, NS_B: 8, NS_C: 99})  # 8, 99: never assigned
    assert maps.take() == [("netns", "put", NS_A, struct.pack("=I", 0))]
    assert set(maps.netns.data) == {NS_A}


def test_sync_netns_drops_a_netns_whose_interface_lost_its_slot(maps: Maps) -> None:
    maps.table.assign(7)
    maps.table.sync_netns({NS_A: 7})
    maps.table.release(7)
    maps.take()
    maps.table.sync_netns({NS_A: 7})  # still wanted, but 7 has no slot any more
    assert maps.take() == [("netns", "delete", NS_A)]
    assert maps.netns.data == {}


def test_sync_netns_follows_a_reassigned_slot(maps: Maps) -> None:
    maps.table.assign(7)  # slot 0
    maps.table.sync_netns({NS_A: 7})
    maps.table.release(7)
    maps.table.assign(11)  # slot 1
    maps.table.assign(7)  # slot 2: fresh slots before freed ones
    maps.take()
    maps.table.sync_netns({NS_A: 7})
    assert maps.take() == [("netns", "put", NS_A, struct.pack("=I", 2))]


def test_assign_and_release_leave_pnm_netns_alone(maps: Maps) -> None:
    maps.table.assign(7)
    maps.table.release(7)
    assert netns_ops(maps.take()) == []


# -- adoption: the tables a previous daemon left pinned --------------------------------------------

def owner(ifindex: int, netns: int) -> bytes:
    return struct.pack("=II", ifindex, netns)


def test_owners_record_who_holds_each_slot(maps: Maps) -> None:
    maps.table.assign(7, NS_A)
    maps.table.assign(9, NS_B)
    assert maps.owners.data == {0: owner(7, NS_A), 1: owner(9, NS_B)}
    maps.table.release(7)
    assert maps.owners.data[0] == b"\0"  # zeroed: slot 0 is nobody's


def left_by_a_previous_daemon(capacity: int = 4) -> Maps:
    """Maps as a daemon leaves them: 7 (netns A) in slot 0, 9 (B) in slot 1, 7+16 (C)
    spilled in slot 2 (its bucket is 7's); then a new daemon's table over them."""
    before = Maps(capacity)
    before.table.assign(7, NS_A)
    before.table.assign(9, NS_B)
    before.table.assign(7 + BUCKETS, NS_C)
    before.table.sync_netns({NS_A: 7, NS_B: 9, NS_C: 7 + BUCKETS})
    after = Maps(capacity)
    for name in ("ifslots", "spill", "netns", "owners"):
        getattr(after, name).data = dict(getattr(before, name).data)
    return after


def test_adopt_keeps_slots_whose_interface_is_still_the_same_pods() -> None:
    maps = left_by_a_previous_daemon()
    assert maps.table.adopt() == 3
    maps.take()
    assert maps.table.assign(7, NS_A) == 0
    assert maps.table.assign(7 + BUCKETS, NS_C) == 2
    assert maps.take() == []  # nothing zeroed, nothing rewritten: the counts carry on
    assert maps.table.spilled() == 1
    assert maps.table.release_unclaimed() == [9]  # 9's pod went while no daemon ran
    assert maps.table.assign(11, NS_B) == 3  # slot 1 was freed after the never-used one
    assert maps.table.slot_of(9) is None


def test_adopt_does_not_hand_a_reused_ifindex_the_old_pods_counts() -> None:
    maps = left_by_a_previous_daemon()
    maps.table.adopt()
    maps.take()
    slot = maps.table.assign(9, NS_C)  # ifindex 9 now belongs to another netns
    ops = maps.take()
    assert ("packets", "put_zero", slot) in ops  # a fresh, zeroed slot
    assert maps.owners.data[slot] == owner(9, NS_C)


def test_adopt_drops_entries_the_owner_table_does_not_vouch_for() -> None:
    maps = left_by_a_previous_daemon()
    maps.ifslots.data[3] = entry(3, 3)  # a bucket pointing at a slot nobody owns
    maps.table.adopt()
    assert maps.ifslots.data[3] == bytes(8)
    assert maps.table.slot_of(3) is None
    assert maps.table.assign(3, NS_A) == 3  # the only free slot


class PendingMap:
    """A hash whose keys begin with the slot (struct pnm_flow, pnm_dns_key), by raw key."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def put_zero(self, key: bytes) -> None:
        raise AssertionError("a pending map is no per-slot array")

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.data.items())


def test_a_reused_slot_starts_without_the_old_owners_pending_entries() -> None:
    # A query of a pod gone since, still pending when its slot went to another pod, used to
    # time out into the new pod's counts (issue 14)
    pending = PendingMap()
    log: list[Op] = []
    table = SlotTable(ifslots=FakeMap("ifslots", log), spill=FakeMap("spill", log),
                      netns=FakeMap("netns", log), owners=FakeMap("owners", log),
                      per_slot=[], capacity=1, buckets=BUCKETS, slot_keyed=[pending])
    slot = table.assign(7)
    mine = struct.pack("=I", slot) + b"query-of-pod-7"
    pending.put(mine, b"t0")
    pending.put(struct.pack("=I", slot + 1) + b"another-slot", b"t1")
    table.release(7)
    assert mine in pending.data  # still there while the slot is free: nobody can inherit it
    assert table.assign(8) == slot
    assert set(pending.data) == {struct.pack("=I", slot + 1) + b"another-slot"}
