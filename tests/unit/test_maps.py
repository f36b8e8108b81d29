"""Batch reads of per-slot arrays (KernelMaps.lookup_slots) over a fake bpf(2), and words()."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from monitor.kernel import syscalls
from monitor.kernel.maps import KernelMaps, MapHandle, _runs, word_slice, words
from monitor.probes.dns import Dns
from monitor.probes.packets import Counts


class FakeArray:
    """A kernel array map behind bpfsys' batch and single lookups; counts the syscalls."""

    def __init__(self, max_entries: int, value_size: int, *, ncpus: int = 1,
                 batch_errno: int = 0) -> None:
        self.max_entries, self.ncpus, self.value_size = max_entries, ncpus, value_size
        self.raw_size = ((value_size + 7) & ~7) * ncpus
        # slot s, CPU c: every word of the slot's value holds s * 1000 + c
        self.values = [b"".join(struct.pack("=Q", s * 1000 + c) * (self.raw_size // 8 // ncpus)
                                for c in range(ncpus)) for s in range(max_entries)]
        self.batch_errno = batch_errno
        self.batches: list[tuple[int, int]] = []  # (first slot, count asked)
        self.lookups = 0

    def lookup_batch(self, fd: int, key_size: int, value_size: int, count: int,
                     start: bytes | None = None) -> tuple[bytearray, bytearray]:
        assert (fd, key_size, value_size) == (3, 4, self.raw_size)
        if self.batch_errno:
            raise syscalls.BpfError(self.batch_errno, "bpf(cmd=24): failed")
        first = struct.unpack("=I", start)[0] + 1 if start is not None else 0
        self.batches.append((first, count))
        slots = range(first, min(first + count, self.max_entries))
        return (bytearray(b"".join(struct.pack("=I", s) for s in slots)),
                bytearray(b"".join(self.values[s] for s in slots)))

    def lookup(self, fd: int, key: bytes, value_size: int) -> bytes | None:
        self.lookups += 1
        (slot,) = struct.unpack("=I", key)
        return self.values[slot] if slot < self.max_entries else None


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeArray:
    array = FakeArray(1025, 16)
    monkeypatch.setattr(syscalls, "map_lookup_batch", array.lookup_batch)
    monkeypatch.setattr(syscalls, "map_lookup", array.lookup)
    return array


def maps_over(array: FakeArray, percpu: bool = False) -> KernelMaps:
    return KernelMaps([MapHandle("pnm_x", 3, 4, array.value_size, percpu, array.ncpus,
                                 array.max_entries)])


def value(slot: int, ncpus: int = 1, words_: int = 2) -> bytes:
    return struct.pack("=Q", sum(slot * 1000 + c for c in range(ncpus))) * words_


def test_one_batch_for_a_nodes_slots_in_the_order_asked(fake: FakeArray) -> None:
    slots = [*range(1024, 0, -3), 7, 0]  # the node's slot is the array's last
    assert maps_over(fake).lookup_slots("pnm_x", slots) == [value(s) for s in slots]
    assert fake.batches == [(0, 1025)]  # all of them in one syscall...
    assert fake.lookups == 0  # ...and no lookup per slot


def test_far_apart_slots_are_separate_batches(fake: FakeArray) -> None:
    got = maps_over(fake).lookup_slots("pnm_x", [900, 3, 5, 915, 1024, 18])  # 18 - 5 < 16
    assert got == [value(s) for s in (900, 3, 5, 915, 1024, 18)]
    assert fake.batches == [(3, 16), (900, 16), (1024, 1)]


def test_slots_beyond_the_array_are_none(fake: FakeArray) -> None:
    assert maps_over(fake).lookup_slots("pnm_x", [1025, 2, 99999]) == [None, value(2), None]
    assert maps_over(fake).lookup_slots("pnm_x", []) == []


def test_per_cpu_values_are_summed(monkeypatch: pytest.MonkeyPatch) -> None:
    array = FakeArray(64, 12, ncpus=4)  # a 12-byte value sits in a 16-byte slot per CPU
    monkeypatch.setattr(syscalls, "map_lookup_batch", array.lookup_batch)
    got = maps_over(array, percpu=True).lookup_slots("pnm_x", [5, 63])
    assert got == [value(5, 4, 1), value(63, 4, 1)]


@pytest.mark.parametrize("err", [errno.EINVAL, syscalls.ENOTSUPP])
def test_no_batch_support_falls_back_to_lookups_for_good(monkeypatch: pytest.MonkeyPatch,
                                                         err: int) -> None:
    array = FakeArray(16, 16, batch_errno=err)
    calls: list[int] = []

    def batch(*args: object) -> tuple[bytearray, bytearray]:
        calls.append(1)
        return array.lookup_batch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(syscalls, "map_lookup_batch", batch)
    monkeypatch.setattr(syscalls, "map_lookup", array.lookup)
    maps = maps_over(array)
    assert maps.lookup_slots("pnm_x", [3, 1]) == [value(3), value(1)]
    assert maps.lookup_slots("pnm_x", [2]) == [value(2)]
    assert (len(calls), array.lookups) == (1, 3)  # asked once; then one lookup per slot


def test_other_errors_are_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    array = FakeArray(16, 16, batch_errno=errno.EBADF)
    monkeypatch.setattr(syscalls, "map_lookup_batch", array.lookup_batch)
    with pytest.raises(OSError, match="failed") as info:
        maps_over(array).lookup_slots("pnm_x", [1])
    assert info.value.errno == errno.EBADF  # the collector counts it against the probe


def test_only_u32_keyed_maps() -> None:
    handle = MapHandle("pnm_h", 3, 8, 8, False, 1, 16)
    with pytest.raises(ValueError, match="u32"):
        handle.lookup_slots([1])


@pytest.mark.parametrize(("slots", "runs"), [
    ([], []), ([4], [(4, 4)]), ([0, 1, 2, 17], [(0, 17)]), ([0, 16], [(0, 0), (16, 16)]),
    ([1, 5, 200, 215, 1024], [(1, 5), (200, 215), (1024, 1024)]),
])
def test_runs(slots: list[int], runs: list[tuple[int, int]]) -> None:
    assert _runs(slots, 16) == runs


def test_words_and_word_slices() -> None:
    c = Counts()
    c.packets[1][2], c.bytes[0][3], c.tcp_segments[1] = 5, 6, 7
    w = words(Counts, bytes(c))
    assert w[word_slice(Counts, "packets")][1 * 4 + 2] == 5
    assert w[word_slice(Counts, "bytes")][3] == 6
    assert w[word_slice(Counts, "tcp_segments")] == [0, 7]
    assert word_slice(Dns, "rcodes") == slice(31, 47)
    with pytest.raises(ValueError, match="expected"):
        words(Counts, bytes(ctypes.sizeof(Counts) - 8))
