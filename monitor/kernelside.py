"""The daemon's kernel side: programs loaded, the attacher, the slot table, probes started.

Imported once the configuration is known to be good (it brings in the kernel
adapter). A failure here is fatal and leaves what the last daemon left as it was:
build() and attach_tracepoints() log why and return None or False, and the daemon
exits 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monitor import log
from monitor.kernel import kernelinfo, pins, source
from monitor.kernel.attach import Attacher, check_handle
from monitor.kernel.errors import KernelError
from monitor.kernel.maps import KernelMaps
from monitor.kernel.netlink import Netlink
from monitor.kernel.programs import Programs
from monitor.probes import needing
from monitor.probes.base import NODE, PEER_RESOLVER, SNAPSHOT, Probe, Start
from monitor.reconcile import Forget
from monitor.settings import Settings, describe
from monitor.slots import SlotTable, per_slot_maps, slot_keyed_maps
from monitor.state import MonitorState


@dataclass
class KernelSide:
    """What the daemon holds in the kernel, built in this order by build()."""

    kernel: kernelinfo.KernelInfo
    programs: Programs
    netlink: Netlink
    attacher: Attacher
    slots: SlotTable
    pin: pins.Pins | None  # None: `run --check`, or pinning off or impossible

    @property
    def maps(self) -> KernelMaps:
        return self.programs.maps

    @property
    def probes(self) -> list[Probe]:
        """The probes loaded and started (what the settings asked for, less those this
        kernel cannot run)."""
        return self.programs.probes

    def forget(self) -> list[Forget]:
        """Each probe's deleting of a gone pod's keys, for the reconciler."""
        return [functools.partial(p.forget, self.maps) for p in self.probes if p.forget]

    def after_first_pass(self, attached: set[int], live_netns: set[int]) -> None:
        """What the last daemon left for pods that went while none ran, and maps of
        another layout, go once this daemon holds everything it needs."""
        removed = self.attacher.remove_stale(attached)
        for probe in self.probes:
            if probe.prune is not None and self.programs.adopted_probe(probe.name):
                probe.prune(self.maps, live_netns, attached)
        if self.pin is not None:
            removed += self.programs.remove_unloaded()  # other layouts' maps, unloaded probes'

        if removed:
            log.get("daemon").info("removed what an earlier daemon left", count=len(removed),
                                   items=removed[:20])

    def attach_tracepoints(self) -> bool:
        try:
            self.programs.attach_tracepoints()
        except KernelError as exc:
            log.get("daemon").error("cannot attach the tracepoint programs", error=str(exc))
            self.programs.abort()  # what the last daemon left stays as it was
            return False
        return True


def build(settings: Settings, probes: Sequence[Probe], state: MonitorState, cluster: Any, *,
          check_only: bool) -> KernelSide | None:
    """Load, make the attacher and the slot table, adopt the last daemon's slots, start the
    probes; None (said in the log) if the programs cannot be loaded or attached."""
    logger = log.get("daemon")
    # `run --check` pins nothing: it must never adopt, or remove, a running daemon's maps
    pin = None if check_only else _pins(settings)
    try:
        kernel = kernelinfo.probe(proc_root=settings.proc_root, tracefs_root=settings.tracefs_root,
                                  btf_path=settings.btf_path)
        programs = Programs(probes, kernel, max_interfaces=settings.max_interfaces,
                            bpf_stats=settings.bpf_stats, pin=pin, tracefs=settings.tracefs_root)
    except (KernelError, OSError) as exc:
        from monitor.check import missing_headers

        missing = missing_headers()  # the likeliest cause, with its remedy
        logger.error("cannot load the BPF programs", error=str(exc),
                     **({"cause": missing.sentence, "remedy": missing.remedy} if missing else {}))
        return None
    netlink = Netlink()
    try:
        attacher = Attacher(programs, netlink, mode=settings.attach_mode,
                            tc_priority=settings.tc_priority,
                            tc_handle=(check_handle(settings.tc_handle) if check_only
                                       else settings.tc_handle),
                            pin=pin)
    except KernelError as exc:
        logger.error("cannot attach", error=str(exc))
        programs.abort()  # what the last daemon left stays as it was
        return None
    state.maps_states = dict(programs.maps_states)
    maps = programs.maps
    slots = SlotTable(ifslots=maps.handle(source.IFSLOTS_MAP), spill=maps.handle(source.IFSLOT_SPILL_MAP),
                      netns=maps.handle(source.NETNS_MAP), owners=maps.handle(source.SLOT_OWNER_MAP),
                      per_slot=per_slot_maps(programs.probes, maps.handle,
                                             settings.max_interfaces),
                      slot_keyed=slot_keyed_maps(programs.probes, maps.handle),
                      capacity=settings.max_interfaces, buckets=source.IFSLOT_BUCKETS)
    if programs.adopted:
        logger.info("adopted the pinned maps of the last daemon: counters continue",
                    slots=slots.adopt(), maps=str(programs.pin_dir))
    programs.probes[:] = start_probes(programs.probes, settings, maps,
                                      adopted=programs.adopted_probe, slots=slots.assigned,
                                      snapshot=lambda: state.snapshot.index, cluster=cluster)
    return KernelSide(kernel, programs, netlink, attacher, slots, pin)


def _pins(settings: Settings) -> pins.Pins | None:
    """Where maps and links are pinned, or None (said in the log) if they cannot be."""
    logger = log.get("daemon")
    if not settings.bpffs_root:
        logger.info("pinning is off (bpffs_root is empty): counters restart with the daemon")
        return None
    pin = pins.Pins(settings.bpffs_root)
    try:
        pin.prepare()
    except OSError as exc:
        logger.warning("maps are not pinned: counters restart with the daemon",
                       error=str(exc))
        return None
    return pin


def start_probes(probes: Sequence[Probe], settings: Settings, maps: Any, *,
                 adopted: Callable[[str], bool],
                 slots: Any, snapshot: Any, cluster: Any = None) -> list[Probe]:
    """Probes with state of their own (peers) are bound to it here, before any attach,
    given every setting and the services they need (Probe.needs)."""
    if not any(p.start for p in probes):
        return list(probes)
    services: dict[str, Any] = {SNAPSHOT: snapshot, NODE: settings.node_name}
    if needing(probes, PEER_RESOLVER):
        from monitor.peers.identity import PeerResolver

        services[PEER_RESOLVER] = PeerResolver(cluster_cidrs=settings.cluster_cidrs,
                                               service_cidrs=settings.service_cidrs, index=cluster)
    values = describe(settings)
    return [p.start(p, Start(maps=maps, adopted=adopted(p.name), slots=slots, settings=values,
                             services=services)) if p.start else p for p in probes]

