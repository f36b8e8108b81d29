"""Fakes shared by the probe, collector and sweep tests: maps as dicts of bytes, a KernelInfo."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from monitor.kernelinfo import KernelInfo, TracepointFormat

HOST_NETNS = 4026531840  # the host's netns inode on most machines; any number will do

OFFSETS = {"PNM_OFF_SKB_DEV": 16, "PNM_OFF_SKB_SK": 24, "PNM_OFF_SKB_CB": 40,
           "PNM_OFF_SKB_HEAD": 192, "PNM_OFF_SKB_NETWORK_HEADER": 180,
           "PNM_OFF_DEV_NET": 264, "PNM_OFF_DEV_IFINDEX": 224, "PNM_OFF_NET_INUM": 176,
           "PNM_OFF_SK_NET": 48, "PNM_OFF_TCP_SRTT": 1680, "PNM_OFF_TCB_GSO_SEGS": 8}


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


class DictMaps:
    """A MapReader and MapWriter over {map name: {key bytes: value bytes}}; logs every op.

    items() returns a copy, as monitor.maps.KernelMaps does (a list), so callers may
    delete and put while they walk it.
    """

    def __init__(self, maps: Mapping[str, Mapping[bytes, bytes]] | None = None) -> None:
        self.maps: dict[str, dict[bytes, bytes]] = {k: dict(v) for k, v in (maps or {}).items()}
        self.log: list[tuple[str, str, bytes]] = []

    def items(self, name: str) -> Iterable[tuple[bytes, bytes]]:
        self.log.append(("items", name, b""))
        return list(self.maps.get(name, {}).items())

    def lookup(self, name: str, key: bytes) -> bytes | None:
        self.log.append(("lookup", name, key))
        return self.maps.get(name, {}).get(key)

    def delete(self, name: str, key: bytes) -> bool:
        self.log.append(("delete", name, key))
        return self.maps.get(name, {}).pop(key, None) is not None

    def put(self, name: str, key: bytes, value: bytes) -> None:
        self.log.append(("put", name, key))
        self.maps.setdefault(name, {})[key] = value

    def replace(self, name: str, key: bytes, value: bytes) -> bool:
        self.log.append(("replace", name, key))
        if key not in self.maps.get(name, {}):
            return False
        self.maps[name][key] = value
        return True

    def writes(self) -> list[tuple[str, str, bytes]]:
        return [op for op in self.log if op[0] in ("put", "delete", "replace")]


def kernel(*, offsets: dict[str, int] | None = None, source: str = "btf", problem: str = "",
           tracepoints: Mapping[str, Iterable[str]] | None = None,
           drop_reasons: dict[int, str] | None = None, host_netns: int = HOST_NETNS) -> KernelInfo:
    """A KernelInfo built by hand: tracepoints as {name: field names}."""
    formats = {tp: TracepointFormat(frozenset(fields), "print fmt: \"\"")
               for tp, fields in (tracepoints or {}).items()}
    return KernelInfo(host_netns, dict(OFFSETS) if offsets is None and source == "btf" else offsets,
                      source, problem, formats, dict(drop_reasons or {}))


def no_offsets_kernel(**kwargs: Any) -> KernelInfo:
    return kernel(offsets=None, source="none", problem="/sys/kernel/btf/vmlinux: No such file or "
                  "directory", **kwargs)


class _Families:
    def __init__(self, collect: Any) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def registry_of(collect: Any) -> CollectorRegistry:
    """A registry whose only collector yields what `collect()` yields, afresh at every read."""
    registry = CollectorRegistry()
    registry.register(_Families(collect))
    return registry


def sample_names(registry: CollectorRegistry, family: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() if m.name == family
            for s in m.samples]
