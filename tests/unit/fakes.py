"""Fakes shared by the probe, collector and sweep tests: maps as dicts of bytes, a KernelInfo."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from monitor.exposition import CounterFamily, Family, GaugeFamily, HistogramFamily
from monitor.kernel.kernelinfo import KernelInfo, TracepointFormat

HOST_NETNS = 4026531840  # the host's netns inode on most machines; any number will do

OFFSETS = {"PNM_OFF_SKB_DEV": 16, "PNM_OFF_SKB_SK": 24, "PNM_OFF_SKB_CB": 40,
           "PNM_OFF_SKB_HEAD": 192, "PNM_OFF_SKB_NETWORK_HEADER": 180,
           "PNM_OFF_SKB_END": 188, "PNM_OFF_SHINFO_DATAREF": 32,
           "PNM_OFF_DEV_NET": 264, "PNM_OFF_DEV_IFINDEX": 224, "PNM_OFF_NET_INUM": 176,
           "PNM_OFF_SK_NET": 48, "PNM_OFF_SK_FAMILY": 16, "PNM_OFF_TCP_SRTT": 1680, "PNM_OFF_TCB_GSO_SEGS": 8}


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


class DictMaps:
    """A MapReader and MapWriter over {map name: {key bytes: value bytes}}; logs every op.

    items() returns a copy, as monitor.kernel.maps.KernelMaps does (a list), so callers may
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

    def lookup_slots(self, name: str, slots: Sequence[int]) -> list[bytes | None]:
        """One op in the log (a batch read), its key the u32 slots asked for, in order."""
        self.log.append(("lookup_slots", name, b"".join(u32(s) for s in slots)))
        values = self.maps.get(name, {})
        return [values.get(u32(s)) for s in slots]

    def slots_read(self, name: str) -> list[int]:
        """The slots of every batch read of `name`, in order."""
        return [slot for op, n, key in self.log if op == "lookup_slots" and n == name
                for (slot,) in struct.iter_unpack("=I", key)]

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


def to_prometheus(family: Family) -> Metric:
    """The same family built with prometheus_client, from the same data: the oracle that
    monitor.exposition's output is checked against, and what the tests read samples from."""
    metric: Metric
    if isinstance(family, HistogramFamily):
        metric = HistogramMetricFamily(family.name, family.documentation, labels=family.labels)
        for values, counts, sum_value in family.series:
            buckets = [(le, float(n)) for le, n in zip(family.bounds, accumulate(counts), strict=True)]
            metric.add_metric(list(values), buckets, sum_value)
    elif isinstance(family, CounterFamily):
        metric = CounterMetricFamily(family.name, family.documentation, labels=family.labels)
        for values, value in family.series:
            metric.add_metric(list(values), value)
    elif isinstance(family, GaugeFamily):
        metric = GaugeMetricFamily(family.name, family.documentation, labels=family.labels)
        for values, value in family.series:
            metric.add_metric(list(values), value)
    else:
        raise TypeError(family)
    return metric


class Bridge:
    """A prometheus_client collector over an exposition collector (or a callable yielding
    families), converting with to_prometheus at every read."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        if hasattr(self._source, "describe"):
            yield from map(to_prometheus, self._source.describe())

    def collect(self) -> Iterator[Metric]:
        families = self._source.collect() if hasattr(self._source, "collect") else self._source()
        yield from map(to_prometheus, families)


def registry_of(collect: Any, *, auto_describe: bool = False) -> CollectorRegistry:
    """A prometheus_client registry over `collect` (an exposition collector, or a callable
    yielding families afresh at every read), for get_sample_value() and generate_latest()."""
    registry = CollectorRegistry(auto_describe=auto_describe)
    registry.register(Bridge(collect))
    return registry


def sample_names(registry: CollectorRegistry, family: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() if m.name == family
            for s in m.samples]
