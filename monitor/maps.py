"""Kernel maps as the collector and the reconciler see them: bytes in, bytes out.

Probes decode keys and values with their own ctypes structures; this module
only moves bytes and folds per-CPU values. Every per-CPU map of ours holds
u64 counters only, so folding is an element-wise sum of u64 words.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from monitor import bpfsys

S = TypeVar("S", bound=ctypes.Structure)


class MapReader(Protocol):
    """What collectors need of the kernel's maps. Per-CPU values come summed over CPUs."""

    def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
        """Every (key, value) pair of a hash map."""

    def lookup(self, name: str, key: bytes) -> bytes | None:
        """One value (of an array slot, say), or None if there is no such key."""


def sum_u64_slots(raw: bytes, value_size: int, ncpus: int) -> bytes:
    """Sum a per-CPU value (one slot per CPU, each 8-byte aligned) word by word."""
    slot = (value_size + 7) & ~7
    words = value_size // 8
    fmt = f"<{words}Q"
    total = [0] * words
    for cpu in range(ncpus):
        for i, word in enumerate(struct.unpack_from(fmt, raw, cpu * slot)):
            total[i] += word
    return struct.pack(fmt, *(t & 0xFFFFFFFFFFFFFFFF for t in total))


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
        pairs = bpfsys.map_items(self.fd, self.key_size, self.raw_value_size)
        if not self.percpu:
            return pairs
        return [(k, sum_u64_slots(v, self.value_size, self.ncpus)) for k, v in pairs]

    def lookup(self, key: bytes) -> bytes | None:
        raw = bpfsys.map_lookup(self.fd, key, self.raw_value_size)
        if raw is None or not self.percpu:
            return raw
        return sum_u64_slots(raw, self.value_size, self.ncpus)

    def put(self, key: bytes, value: bytes) -> None:
        """Write one value (the same on every CPU for per-CPU maps)."""
        if self.percpu:
            slot = (self.value_size + 7) & ~7
            value = value.ljust(slot, b"\0") * self.ncpus
        bpfsys.map_update(self.fd, key, value)

    def replace(self, key: bytes, value: bytes) -> bool:
        """Overwrite only if the element exists (not per-CPU maps)."""
        return bpfsys.map_update(self.fd, key, value, bpfsys.BPF_EXIST)

    def put_zero(self, key: bytes) -> None:
        bpfsys.map_update(self.fd, key, bytes(self.raw_value_size))

    def delete(self, key: bytes) -> bool:
        return bpfsys.map_delete(self.fd, key)


class KernelMaps:
    """The MapReader over the maps the adapter loaded."""

    def __init__(self, handles: Iterable[MapHandle]) -> None:
        self._handles = {h.name: h for h in handles}

    def handle(self, name: str) -> MapHandle:
        return self._handles[name]

    def items(self, name: str) -> list[tuple[bytes, bytes]]:
        return self._handles[name].items()

    def lookup(self, name: str, key: bytes) -> bytes | None:
        return self._handles[name].lookup(key)

    def delete(self, name: str, key: bytes) -> bool:
        return self._handles[name].delete(key)

    def put(self, name: str, key: bytes, value: bytes) -> None:
        self._handles[name].put(key, value)

    def replace(self, name: str, key: bytes, value: bytes) -> bool:
        return self._handles[name].replace(key, value)
