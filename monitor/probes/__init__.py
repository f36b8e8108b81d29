"""The probe registry: a literal list, no import side effects.

Adding a probe means one C file in bpf/, one module here, and one line below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from monitor.probes import (
    dns,
    dnsnames,
    drops,
    handshake,
    packets,
    peers,
    retransmits,
    rtt,
    tcpflags,
    trace,
)
from monitor.probes.base import Probe


class RegistryError(ValueError):
    """A probe list names an unknown probe, or two probes claim one name or map."""


def _registry(probes: Iterable[Probe]) -> Mapping[str, Probe]:
    out: dict[str, Probe] = {}
    owners: dict[str, str] = {}
    for probe in probes:
        if probe.name in out:
            raise RegistryError(f"probe {probe.name!r} registered twice")
        for map_name in probe.maps:
            if map_name in owners:
                raise RegistryError(f"map {map_name!r} claimed by {owners[map_name]!r} and {probe.name!r}")
            owners[map_name] = probe.name
        out[probe.name] = probe
    return out


REGISTRY: Mapping[str, Probe] = _registry([
    packets.PROBE,
    peers.PROBE,
    tcpflags.PROBE,
    handshake.PROBE,
    dns.PROBE,
    dnsnames.PROBE,
    drops.PROBE,
    retransmits.PROBE,
    rtt.PROBE,
    trace.PROBE,
])


def select(names: Iterable[str]) -> list[Probe]:
    """The probes named (all of them for an empty list), in registry order."""
    wanted = list(names)
    unknown = sorted(set(wanted) - set(REGISTRY))
    if unknown:
        raise RegistryError(f"unknown probes {unknown}; known: {sorted(REGISTRY)}")
    return [p for name, p in REGISTRY.items() if not wanted or name in wanted]
