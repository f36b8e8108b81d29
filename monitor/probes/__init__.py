"""The probe registry: a literal list, no import side effects.

Adding a probe means one C file in bpf/, one module here, and one line below: what
the kernel is asked for (tracepoint formats, struct offsets, function addresses), the
daemon's settings and its wiring are derived from the probes listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from monitor.kernel.kernelinfo import KernelNeeds
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
    """A probe list names an unknown probe, or two probes claim one name, map or setting,
    or read one offset name as two struct members."""


def _registry(probes: Iterable[Probe]) -> Mapping[str, Probe]:
    out: dict[str, Probe] = {}
    owners: dict[str, str] = {}
    settings: dict[str, str] = {}
    for probe in probes:
        if probe.name in out:
            raise RegistryError(f"probe {probe.name!r} registered twice")
        for map_name in probe.maps:
            if map_name in owners:
                raise RegistryError(f"map {map_name!r} claimed by {owners[map_name]!r} and {probe.name!r}")
            owners[map_name] = probe.name
        for setting in probe.settings:
            if setting.name in settings:
                raise RegistryError(f"setting {setting.name!r} claimed by "
                                    f"{settings[setting.name]!r} and {probe.name!r}")
            settings[setting.name] = probe.name
        out[probe.name] = probe
    kernel_needs(out.values())  # two probes reading one -D name as two members: refused
    return out


def kernel_needs(probes: Iterable[Probe] | None = None) -> KernelNeeds:
    """What the probes (every registered one for None) ask of the kernel, together: the
    kernel is asked for all of it whichever are loaded, so a probe turned on later finds
    its facts read the same way (and offsets are all trustworthy or none are)."""
    tracepoints: dict[str, None] = {}
    offsets: dict[str, tuple[str, str]] = {}
    functions: dict[str, None] = {}
    for probe in REGISTRY.values() if probes is None else probes:
        tracepoints.update(dict.fromkeys(probe.tracepoints))
        functions.update(dict.fromkeys(probe.functions))
        for define, member in probe.offsets.items():
            if offsets.setdefault(define, member) != member:
                raise RegistryError(f"offset {define} is {offsets[define]} for one probe and "
                                    f"{member} for {probe.name!r}")
    return KernelNeeds(tuple(tracepoints), offsets, tuple(functions))


def providing(probes: Iterable[Probe], what: str) -> bool:
    """Whether one of these probes provides `what` (Probe.provides: CAPTURES...)."""
    return any(what in p.provides for p in probes)


def provider(probes: Iterable[Probe], what: str) -> Probe | None:
    """The first of these probes that provides `what`, if one does."""
    return next((p for p in probes if what in p.provides), None)


def needing(probes: Iterable[Probe], what: str) -> bool:
    """Whether one of these probes takes `what` from the daemon (Probe.needs)."""
    return any(what in p.needs for p in probes)


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
