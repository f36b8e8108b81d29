"""Kernel maps as the collector and the reconciler see them: bytes in, bytes out.

Probes decode keys and values with their own ctypes structures; this module
only moves bytes and folds per-CPU values. Every per-CPU map of ours holds
u64 counters only, so folding is an element-wise sum of u64 words.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from monitor import log
from monitor.kernel import syscalls

S = TypeVar("S", bound=ctypes.Structure)


class MapReader(Protocol):
    """What collectors need of the kernel's maps. Per-CPU values come summed over CPUs."""

    def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
        """Every (key, value) pair of a hash map."""

    def lookup(self, name: str, key: bytes) -> bytes | None:
        """One value (of an array slot, say), or None if there is no such key."""

    def lookup_slots(self, name: str, slots: Sequence[int]) -> list[bytes | None]:
        """The values of several slots of a per-slot array (u32 keys), in the order asked;
        None for a slot the map does not have."""


def sum_u64_slots(raw: bytes | memoryview, value_size: int, ncpus: int) -> bytes:
    """Sum a per-CPU value (one slot per CPU, each 8-byte aligned) word by word, mod 2^64.

    Words are native-endian, as the kernel hands them over (x86-64: little-endian).
    """
    stride = ((value_size + 7) & ~7) // 8
    view = memoryview(raw)[: stride * 8 * ncpus]
    if len(view) != stride * 8 * ncpus:
        raise ValueError(f"a per-CPU value of {len(raw)} bytes, expected {stride * 8 * ncpus}")
    return _fold(view.cast("Q").tolist(), 0, stride * ncpus, stride, value_size // 8)


def _fold(flat: list[int], base: int, end: int, stride: int, words: int) -> bytes:
    """The per-CPU value in flat[base:end] (one `stride`-word slot per CPU), summed."""
    if end - base == stride:  # one CPU
        return array("Q", flat[base:base + words]).tobytes()
    # word i of every CPU is one slice: the adding happens in C
    totals = [sum(flat[base + i:end:stride]) for i in range(words)]
    if max(totals, default=0) > _U64:
        totals = [t & _U64 for t in totals]  # as the u64 words themselves would wrap
    return array("Q", totals).tobytes()


_U64 = (1 << 64) - 1


def words(kind: type[ctypes.Structure], raw: bytes) -> list[int]:
    """A value of u64 words only (a counter struct) as a list of ints: what decode() gives,
    without a ctypes object and an attribute read per field. Fields by word_slice()."""
    if len(raw) != ctypes.sizeof(kind):
        raise ValueError(f"{kind.__name__}: got {len(raw)} bytes, expected {ctypes.sizeof(kind)}")
    return memoryview(raw).cast("Q").tolist()


def word_slice(kind: type[ctypes.Structure], field: str) -> slice:
    """Where a u64 field (or array of them) of `kind` is in words(kind, raw)."""
    desc = getattr(kind, field)
    return slice(desc.offset // 8, (desc.offset + desc.size) // 8)


def decode(kind: type[S], raw: bytes) -> S:
    if len(raw) != ctypes.sizeof(kind):
        raise ValueError(f"{kind.__name__}: got {len(raw)} bytes, expected {ctypes.sizeof(kind)}")
    return kind.from_buffer_copy(raw)


def only_u64(kind: type) -> bool:
    """True if a type is made of u64 words only (the condition for summing per-CPU values)."""
    if kind is ctypes.c_uint64:
        return True
    if issubclass(kind, ctypes.Array):
        return only_u64(kind._type_)  # type: ignore[arg-type]
    if issubclass(kind, ctypes.Structure):
        fields: list[tuple[str, type]] = list(kind._fields_)  # type: ignore[arg-type]
        return all(only_u64(t) for _, t in fields)
    return False


@dataclass(frozen=True)
class MapHandle:
    """One loaded map: its fd and sizes, as the kernel reports them."""

    name: str
    fd: int
    key_size: int
    value_size: int
    percpu: bool
    ncpus: int
    max_entries: int = 0

    @property
    def raw_value_size(self) -> int:
        return ((self.value_size + 7) & ~7) * self.ncpus if self.percpu else self.value_size

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every element, each key once even while others delete (syscalls.batch_items)."""
        try:
            pairs = syscalls.batch_items(self.fd, self.key_size, self.raw_value_size)
        except syscalls.BpfError as exc:
            if exc.errno not in (errno.EINVAL, syscalls.ENOTSUPP, errno.EOPNOTSUPP):
                raise
            # no batch operations for this map type: the walk, its repeats dropped
            pairs = list(dict(syscalls.map_items(self.fd, self.key_size,
                                               self.raw_value_size)).items())
        if not self.percpu:
            return pairs
        return [(k, sum_u64_slots(v, self.value_size, self.ncpus)) for k, v in pairs]

    def lookup(self, key: bytes) -> bytes | None:
        raw = syscalls.map_lookup(self.fd, key, self.raw_value_size)
        if raw is None or not self.percpu:
            return raw
        return sum_u64_slots(raw, self.value_size, self.ncpus)

    def lookup_slots(self, slots: Sequence[int]) -> list[bytes | None]:
        """Values of array slots (u32 keys) by BPF_MAP_LOOKUP_BATCH: one syscall for each
        run of nearby slots, which is one in all for a node's attached interfaces.

        Raises BpfError as the kernel answers (KernelMaps falls back to lookup() where
        the kernel has no batch lookups for the map).
        """
        if self.key_size != 4:
            raise ValueError(f"{self.name}: slots are u32 keys, this map's are {self.key_size} bytes")
        limit = self.max_entries or 1 << 32
        wanted = {s for s in slots if 0 <= s < limit}
        size, stride = self.raw_value_size, ((self.value_size + 7) & ~7) // 8
        found: dict[int, bytes] = {}
        for first, last in _runs(sorted(wanted), _BATCH_GAP):
            start = struct.pack("=I", first - 1) if first else None  # the batch starts after it
            keys, values = syscalls.map_lookup_batch(self.fd, 4, size, last - first + 1, start)
            # per-CPU values: the whole batch as ints at once, then each wanted slot folded
            flat = memoryview(values).cast("Q").tolist() if self.percpu else []
            for i, slot in enumerate(memoryview(keys).cast("I").tolist()):
                if slot not in wanted:  # a gap inside the run
                    continue
                if self.percpu:
                    base = i * size // 8
                    found[slot] = _fold(flat, base, base + size // 8, stride, self.value_size // 8)
                else:
                    found[slot] = bytes(values[i * size:(i + 1) * size])
        return [found.get(s) for s in slots]

    def put(self, key: bytes, value: bytes) -> None:
        """Write one value (the same on every CPU for per-CPU maps)."""
        if self.percpu:
            slot = (self.value_size + 7) & ~7
            value = value.ljust(slot, b"\0") * self.ncpus
        syscalls.map_update(self.fd, key, value)

    def replace(self, key: bytes, value: bytes) -> bool:
        """Overwrite only if the element exists (not per-CPU maps)."""
        return syscalls.map_update(self.fd, key, value, syscalls.BPF_EXIST)

    def put_zero(self, key: bytes) -> None:
        syscalls.map_update(self.fd, key, bytes(self.raw_value_size))

    def delete(self, key: bytes) -> bool:
        return syscalls.map_delete(self.fd, key)


# Slots this far apart or more are read by separate batches: a syscall costs a few us,
# as does copying a dozen values no pod owns (each once per CPU, for per-CPU maps). At
# hundreds of pods the attached slots are dense and one batch reads them all; however
# sparse, it is never more syscalls than a lookup per slot.
_BATCH_GAP = 16


def _runs(slots: Sequence[int], gap: int) -> list[tuple[int, int]]:
    """Sorted slots as (first, last) runs with no hole of `gap` slots or more inside."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and slot - runs[-1][1] < gap:
            runs[-1] = (runs[-1][0], slot)
        else:
            runs.append((slot, slot))
    return runs


# Kernels before 5.6 do not know the command (EINVAL); map types without batch
# operations answer ENOTSUPP, the kernel's own errno 524 (not EOPNOTSUPP).
_NO_BATCH = (errno.EINVAL, syscalls.ENOTSUPP)


class KernelMaps:
    """The MapReader over the maps the adapter loaded."""

    def __init__(self, handles: Iterable[MapHandle]) -> None:
        self._handles = {h.name: h for h in handles}
        self._no_batch: set[str] = set()  # maps the kernel reads one key at a time only

    def handle(self, name: str) -> MapHandle:
        return self._handles[name]

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        return self._handles[name].items()

    def lookup(self, name: str, key: bytes) -> bytes | None:
        return self._handles[name].lookup(key)

    def lookup_slots(self, name: str, slots: Sequence[int]) -> list[bytes | None]:
        handle = self._handles[name]
        if name not in self._no_batch:
            try:
                return handle.lookup_slots(slots)
            except syscalls.BpfError as exc:
                if exc.errno not in _NO_BATCH:
                    raise
                self._no_batch.add(name)  # for good: the kernel will not learn it
                log.get("maps").info("no batch lookups: one syscall per slot", map=name,
                                     error=exc.strerror)
        return [handle.lookup(struct.pack("=I", s)) for s in slots]

    def delete(self, name: str, key: bytes) -> bool:
        return self._handles[name].delete(key)

    def put(self, name: str, key: bytes, value: bytes) -> None:
        self._handles[name].put(key, value)

    def replace(self, name: str, key: bytes, value: bytes) -> bool:
        return self._handles[name].replace(key, value)
