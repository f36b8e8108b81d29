"""What a probe is: one C file in bpf/, one Python module here, one registry entry.

A probe says which hooks it needs (a function the TC programs call for every
packet, tracepoints), which maps it owns with their layouts (checked against
what BCC compiled, so Python never reads a map with the wrong layout), and how
those maps become metric families at scrape time.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric

from monitor.identity import IdentityIndex
from monitor.maps import MapReader


@dataclass(frozen=True)
class MapLayout:
    """A map's key and value types, as C declares them."""

    key: type[ctypes._SimpleCData[int]] | type[ctypes.Structure]
    value: type[ctypes.Structure] | type[ctypes._SimpleCData[int]]
    per_slot: bool = False  # an array indexed by interface slot (monitor/slots.py), with
    #                         max_interfaces entries, zeroed before a slot is handed out


@dataclass(frozen=True)
class Probe:
    """One probe's contract with the kernel adapter and the collector."""

    name: str
    summary: str
    c_file: str
    maps: Mapping[str, MapLayout]
    collect: Callable[[MapReader, IdentityIndex], Iterable[Metric]]
    describe: Callable[[], Iterable[Metric]]
    tc_hook: str = ""  # static inline C function: void f(struct __sk_buff *, const struct pnm_pkt *)
    tracepoints: tuple[str, ...] = field(default=())  # "category:event", for `podnetmon check`


def u32_key(value: int) -> bytes:
    return struct.pack("=I", value)


def u32_of(key: bytes) -> int:
    return int(struct.unpack_from("=I", key)[0])
