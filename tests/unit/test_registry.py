"""The probe registry: selection by name, and the refusals of duplicates."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest
from prometheus_client.metrics_core import Metric

from monitor.identity import IdentityIndex
from monitor.maps import MapReader
from monitor.probes import REGISTRY, RegistryError, _registry, packets, select
from monitor.probes.base import MapLayout, Probe, u32_key, u32_of


def nothing(_maps: MapReader, _index: IdentityIndex) -> Iterator[Metric]:
    yield from ()


def no_families() -> Iterator[Metric]:
    yield from ()


def probe(name: str, *maps: str) -> Probe:
    return Probe(name=name, summary=f"the {name} probe", c_file=f"{name}.c",
                 maps={m: MapLayout(ctypes.c_uint32, ctypes.c_uint64) for m in maps},
                 collect=nothing, describe=no_families)


def test_registry_holds_the_packets_probe() -> None:
    assert list(REGISTRY) == ["packets"]
    assert REGISTRY["packets"] is packets.PROBE
    assert packets.PROBE.maps["pnm_packets"].per_slot is True


def test_select_empty_means_all() -> None:
    assert select([]) == [packets.PROBE]
    assert select(()) == [packets.PROBE]


def test_select_by_name() -> None:
    assert select(["packets"]) == [packets.PROBE]
    assert select(iter(["packets", "packets"])) == [packets.PROBE]


@pytest.mark.parametrize("names", [["dns"], ["packets", "dns", "conntrack"], ["Packets"]])
def test_select_unknown(names: list[str]) -> None:
    unknown = sorted(set(names) - {"packets"})
    with pytest.raises(RegistryError) as info:
        select(names)
    assert str(info.value) == f"unknown probes {unknown}; known: ['packets']"


def test_registry_keeps_order() -> None:
    assert list(_registry([probe("b", "map_b"), probe("a", "map_a"), probe("c")])) == ["b", "a", "c"]


def test_registry_refuses_a_duplicate_name() -> None:
    with pytest.raises(RegistryError, match=r"^probe 'flows' registered twice$"):
        _registry([probe("flows", "map_1"), probe("dns", "map_2"), probe("flows", "map_3")])


def test_registry_refuses_a_map_claimed_twice() -> None:
    with pytest.raises(RegistryError, match=r"^map 'shared' claimed by 'flows' and 'dns'$"):
        _registry([probe("flows", "own", "shared"), probe("dns", "shared")])


def test_u32_key_round_trip() -> None:
    assert u32_key(7) == (7).to_bytes(4, "little")  # x86-64: native is little-endian
    assert u32_of(u32_key(4_000_000_000)) == 4_000_000_000
    assert u32_of(b"\x2a\x00\x00\x00extra") == 42
