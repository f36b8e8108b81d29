"""The daemon's reconciler side: the pass, the loop that runs it, and what runs beside it.

Beside every pass: the probes' sweeps, a wake-up when an edited inventory names
pods, the bypass check, moving devices that have stayed a while from classic tc to
tcx, and new interfaces' first statistics (what their veths carried before our
programs were on them). All of it runs in the reconcile thread.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from monitor.bypass import BypassDetector
from monitor.kernel.netlink import link_events
from monitor.kernelside import KernelSide
from monitor.metadata import MetadataSource
from monitor.probes import provider
from monitor.probes.base import INTERFACE_COUNTS, Sweep
from monitor.reconcile import Discovery, Reconciler
from monitor.reconcileloop import Loop
from monitor.runtime import RuntimeIndex
from monitor.settings import Settings, describe
from monitor.state import MonitorState
from monitor.unseen import BeforeAttach

# Devices moved from classic tc to tcx per second of sweeps. A move waits out four RCU
# grace periods (~10 ms each here): two tcx attaches, which hold the rtnl lock that the
# node's other users (the CNI making veths, the kubelet) then wait for, and two of the
# move's own, which hold nothing; and the reconcile thread, which attaches new pods,
# waits for all four. 2 a second: ~40 ms of rtnl and ~80 ms of the thread a second,
# 110 pods moved in a minute, 500 in four.
MOVES_PER_SECOND = 2


def reconciler(settings: Settings, kernel: KernelSide, metadata: MetadataSource,
               state: MonitorState, *, check_only: bool) -> Reconciler:
    runtime = RuntimeIndex(settings.runtime_dirs)
    return Reconciler(
        discovery=Discovery(settings.proc_root, settings.pause_comm, settings.netns_dirs),
        links=kernel.netlink, attacher=kernel.attacher, slots=kernel.slots, metadata=metadata,
        state=state, forget=kernel.forget(), node=settings.node_name, max_pods=settings.max_pods,
        runtime_uids=runtime.uids, runtime_names=runtime.podman_containers,
        after_first_pass=None if check_only else kernel.after_first_pass)


@dataclass(frozen=True)
class VethWatch:
    """Each pod veth's own statistics against our counts, with the packets probe only:
    whether its traffic bypasses our programs, and what it carried before the attach."""

    bypass: BypassDetector | None
    unseen: BeforeAttach | None

    @classmethod
    def of(cls, kernel: KernelSide, state: MonitorState) -> VethWatch:
        counting = provider(kernel.probes, INTERFACE_COUNTS)
        if counting is None or counting.interface_totals is None:
            return cls(None, None)
        totals = functools.partial(counting.interface_totals, kernel.maps)
        netlink = kernel.netlink
        return cls(BypassDetector(totals, lambda: state.snapshot.index, netlink.link_stats,
                                  netlink.peer_stats, kernel.attacher.explain),
                   BeforeAttach(totals, lambda: state.snapshot.index, netlink.veth_counts))


def loop(settings: Settings, reconciler: Reconciler, kernel: KernelSide,  # noqa: PLR0917
         metadata: MetadataSource, state: MonitorState, watch: VethWatch) -> Loop:
    """The loop, not started: its run() is the reconcile thread's."""
    maps, bypass, unseen = kernel.maps, watch.bypass, watch.unseen
    sweeps = [p.sweep for p in kernel.probes if p.sweep]
    values = describe(settings)  # what the probes' sweeps read (their timeouts)
    next_bypass_check = [0.0]
    moves = kernel.attacher.moves_to_tcx and settings.tcx_move_after > 0
    budget = [0.0]  # moves to tcx allowed now

    inventory_changed = getattr(metadata, "changed", None)

    def sweep() -> None:
        ctx = Sweep(maps, time.monotonic_ns(), values)
        for fn in sweeps:
            fn(ctx)
        if moves:  # on the reconcile thread, which owns the attachments
            # a budget, so the rate holds whatever the sweep interval; saved up for a second
            budget[0] = min(budget[0] + MOVES_PER_SECOND * settings.sweep_interval,
                            float(MOVES_PER_SECOND))
            # the next pass publishes the new attach modes: a pass at once costs ~35 ms
            # of CPU at 500 pods, a move's own work a few
            if budget[0] >= 1:
                budget[0] -= reconciler.move_to_tcx(time.time() - settings.tcx_move_after,
                                                    int(budget[0]))
        if inventory_changed is not None and inventory_changed():
            running.wake()  # an edited inventory names pods now, not at the next rescan
        if bypass is not None and time.monotonic() >= next_bypass_check[0]:
            next_bypass_check[0] = time.monotonic() + settings.bypass_check_interval
            bypass.check()
            state.bypassed = dict(bypass.bypassed)
        elif bypass is not None:
            bypass.observe_new()

    def first_looks() -> None:
        """After every pass: new interfaces' first statistics, as soon after the attach
        as can be (what passed before it, and a start for the bypass check)."""
        if unseen is not None:
            unseen.observe_new()
        if bypass is not None:
            bypass.observe_new()

    running = Loop(reconciler, resync_interval=settings.resync_interval,
                   debounce=settings.event_debounce, events_factory=link_events, state=state,
                   on_exit=kernel.netlink.close, sweep=sweep,
                   sweep_interval=settings.sweep_interval,
                   detach_on_exit=not settings.leave_attached,
                   after_pass=first_looks)
    return running
