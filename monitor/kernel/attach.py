"""Putting the TC programs on host veths and taking them off: classic tc (cls_bpf on
clsact) or tcx links, chosen per device. Polite on a shared node: the programs return
TC_ACT_UNSPEC/TCX_NEXT, a clsact qdisc is never deleted, and only filters that carry our
priority, handle and name (or links we pinned) are ever removed.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from monitor import log
from monitor.kernel import pins, rcu, syscalls, tracepoints
from monitor.kernel.errors import AttachError, KernelError
from monitor.kernel.netlink import (
    FILTER_NAME,
    Netlink,
    filter_name_at,
    filters_before,
    remove_our_filters,
)
from monitor.kernel.programs import Programs
from monitor.kernel.records import FILTER_RUNS_FIRST, Attachment
from monitor.kernel.rtnltc import TC_PARENT_EGRESS, TC_PARENT_INGRESS
from monitor.kernel.rtnlwire import RtnlError
from monitor.kernel.source import SWITCH_MOVING, SWITCHES_MAP


def tcx_supported() -> bool:
    """Probe tcx by trying a harmless query on lo: kernels without it answer EINVAL."""
    try:
        syscalls.tcx_query(1, syscalls.BPF_TCX_INGRESS)
    except OSError:
        return False
    return True

def check_handle(tc_handle: int) -> int:
    """The classic tc handle of `run --check`'s filters: beside the daemon's, never it, so
    that a check never replaces (and then removes) the filters a daemon counts with."""
    return tc_handle + 1 if tc_handle < 0xFFFFFFFF else tc_handle - 1

class Attacher:
    """Puts the compiled TC programs on host veths and takes them off again."""

    def __init__(self, programs: Programs, netlink: Netlink, *, mode: str,
                 tc_priority: int, tc_handle: int, pin: pins.Pins | None = None) -> None:
        self._programs, self._nl, self._pins = programs, netlink, pin
        self._mode, self._prio, self._handle = mode, tc_priority, tc_handle
        self.tcx_available = tcx_supported()
        self._moves, self._moves_lock = 0, threading.Lock()
        self._log = log.get("attach")
        if mode == "tcx" and not self.tcx_available:
            raise KernelError("attach_mode=tcx but this kernel has no tcx (needs 6.6 and "
                              "CONFIG_NET_XGRESS); use attach_mode=auto or tc")
        self._log.info("attach mode chosen", setting=mode, tcx_available=self.tcx_available)

    def choose_mode(self, ifindex: int) -> str:
        if self._mode != "auto":
            return self._mode
        if not self.tcx_available:
            return "tc"
        # A device that already carries tcx programs may pass packets with TCX_PASS,
        # which ends processing before classic tc filters run: join them on tcx.
        for hook in (syscalls.BPF_TCX_INGRESS, syscalls.BPF_TCX_EGRESS):
            try:
                if syscalls.tcx_query(ifindex, hook):
                    return "tcx"
            except OSError:
                pass
        # A classic filter that runs before ours (Cilium's legacy tc programs, Calico's
        # eBPF dataplane) may end TC processing (TC_ACT_OK, a redirect): ours would never
        # run. tcx runs before every classic filter, and ours passes on (TCX_NEXT).
        if self.filters_before_ours(ifindex):
            return "tcx"
        return "tc"

    def filters_before_ours(self, ifindex: int) -> list[str]:
        """Other agents' classic filters that run before ours on a device."""
        return filters_before(self._nl, ifindex, self._prio)

    def explain(self, ifindex: int) -> str:
        """Why our programs may miss a device's packets, as a podnet_monitor_bypassed reason:
        another agent's classic filter runs first (tc_filter_first), or a tcx program sits
        ahead of ours (tcx_program_first); "" if neither is to be seen."""
        if self.filters_before_ours(ifindex):
            return "tc_filter_first"
        mine = {syscalls.prog_info(self._programs.ingress_fd).prog_id,
                syscalls.prog_info(self._programs.egress_fd).prog_id}
        for hook in (syscalls.BPF_TCX_INGRESS, syscalls.BPF_TCX_EGRESS):
            try:
                ids = syscalls.tcx_query(ifindex, hook)
            except OSError:
                continue
            ahead = ids[:next((i for i, p in enumerate(ids) if p in mine), len(ids))]
            if ahead and (set(ids) & mine or self.choose_mode(ifindex) == "tc"):
                return "tcx_program_first"
        return ""

    def verify(self, att: Attachment) -> str:
        """Why an attachment is not what it should be, or "" if it is: our filter or
        link gone (someone removed it: an admin, a CNI recreating its qdisc, a killed
        `run --check`), or, on tc, another agent's filter now running before ours."""
        if att.mode == "tcx":
            mine = {syscalls.prog_info(self._programs.ingress_fd).prog_id: syscalls.BPF_TCX_INGRESS,
                    syscalls.prog_info(self._programs.egress_fd).prog_id: syscalls.BPF_TCX_EGRESS}
            for prog_id, hook in mine.items():
                try:
                    if prog_id not in syscalls.tcx_query(att.ifindex, hook):
                        return "link gone"
                except OSError:
                    return ""  # the device is gone: the next pass detaches it
            return ""
        for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
            try:
                if self._our_filter(att.ifindex, parent) != FILTER_NAME:
                    return "filter gone"
            except RtnlError:
                return ""
        if self._mode == "auto" and self.tcx_available and self.filters_before_ours(att.ifindex):
            return FILTER_RUNS_FIRST
        return ""

    @property
    def moves_to_tcx(self) -> bool:
        """Whether devices attached by classic tc move to tcx later (mode auto, tcx here)."""
        return self._mode == "auto" and self.tcx_available

    def attach(self, ifindex: int, ifname: str, netns: int, *,
               mode: str | None = None) -> Attachment:
        """Ours on both hooks of a device, by `mode` or the one choose_mode() gives; ours
        already on the other hook moves over, every packet counted once."""
        mode = mode or self.choose_mode(ifindex)
        att = Attachment(ifindex, ifname, netns, mode)
        try:
            if mode == "tcx":
                self._attach_tcx(att)
            else:
                self._attach_tc(att)
        except (OSError, KernelError) as exc:  # RtnlError is an OSError
            self.detach(att)  # undo the half that may have worked
            code = getattr(exc, "errno", None)
            raise AttachError(f"attach by {mode} failed: {exc}", interface=ifname,
                              netns=netns, err=code) from None
        return att

    def _attach_tcx(self, att: Attachment) -> None:
        classic = self._our_filter_parents(att.ifindex)  # a move from tc (or a restart)
        with self._moving(bool(classic), lambda: self._point_filters_at_ours(att.ifindex, classic)):
            for fd, hook, direction in self._tcx_hooks():
                if self._update_pinned_link(att.ifindex, hook, direction, fd):
                    continue  # the last daemon's: its program swapped in place, atomically
                link = syscalls.tcx_link_create(fd, att.ifindex, hook, first=True)
                if self._pins is None:
                    att.link_fds.append(link)  # the link lives as long as this fd
                    continue
                try:
                    tracepoints.pin(link, str(self._link_pin(att.ifindex, direction)))
                finally:
                    os.close(link)  # the pin holds it: no fd per interface
            self._remove_our_filters(att.ifindex)  # left by a daemon that attached by tc

    @contextmanager
    def _moving(self, moving: bool, make_ours: Callable[[], None]) -> Iterator[None]:
        """The move of a device from one hook to the other (bpf/tc_main.c; pnm_switches,
        SWITCH_MOVING):
        with the switch on and after a grace period, every pass through a hook that
        runs our program on both sees the switch on, and counts once; the switch goes off
        only a grace period after the old hook lost ours. make_ours points the old hook
        at this daemon's programs first: the last daemon's may know no mark."""
        if not moving:
            yield
            return
        self._switch(+1)
        try:
            make_ours()
            rcu.grace_period()
            yield
        finally:
            rcu.grace_period()
            self._switch(-1)

    def _switch(self, step: int) -> None:
        with self._moves_lock:
            self._moves += step
            self._programs.maps.put(SWITCHES_MAP, struct.pack("=I", SWITCH_MOVING),
                                    struct.pack("=I", self._moves))

    def _our_filter_parents(self, ifindex: int) -> list[int]:
        found = []
        for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
            try:
                if self._our_filter(ifindex, parent) == FILTER_NAME:
                    found.append(parent)
            except RtnlError:
                pass
        return found

    def _point_filters_at_ours(self, ifindex: int, parents: list[int]) -> None:
        fds = {TC_PARENT_INGRESS: self._programs.ingress_fd,
               TC_PARENT_EGRESS: self._programs.egress_fd}
        for parent in parents:
            self._nl.tc().replace_bpf_filter(ifindex, parent=parent, prio=self._prio,
                                             handle=self._handle, fd=fds[parent],
                                             name=FILTER_NAME, direct_action=True, classid=1)

    def _point_links_at_ours(self, ifindex: int) -> None:
        for fd, hook, direction in self._tcx_hooks():
            self._update_pinned_link(ifindex, hook, direction, fd)

    def _tcx_hooks(self) -> tuple[tuple[int, int, str], ...]:
        """(our program, tcx attach type, pin name) for each hook."""
        return ((self._programs.ingress_fd, syscalls.BPF_TCX_INGRESS, "ingress"),
                (self._programs.egress_fd, syscalls.BPF_TCX_EGRESS, "egress"))

    def _update_pinned_link(self, ifindex: int, hook: int, direction: str, fd: int) -> bool:
        """Swap our program into the tcx link pinned for this hook, if there is one."""
        link = self._pinned_link(ifindex, hook, direction)
        if link is None:
            return False
        try:
            tracepoints.link_update(link, fd)
        finally:
            os.close(link)
        return True

    def _has_pinned_links(self, ifindex: int) -> bool:
        return self._pins is not None and any(
            self._link_pin(ifindex, direction).exists() for direction in ("ingress", "egress"))

    def _link_pin(self, ifindex: int, direction: str) -> Path:
        return pins.tcx_link_path(self._pins, ifindex, direction) if self._pins else Path()

    def _pinned_link(self, ifindex: int, hook: int, direction: str) -> int | None:
        """Our pinned tcx link on this device and hook, if a daemon left one; stale pins
        (the device is gone, so the link is detached) are removed."""
        if self._pins is None:
            return None
        path = self._link_pin(ifindex, direction)
        fd = tracepoints.open_pinned(path)
        if fd is None:
            return None
        try:
            info = tracepoints.link_info(fd)
        except OSError:
            info = None
        if info is not None and info.ifindex == ifindex and info.attach_type == hook:
            return fd
        os.close(fd)
        path.unlink(missing_ok=True)
        return None

    def _unpin_links(self, ifindex: int) -> None:
        """Detach and unpin our tcx links on a device (a no-op without pins)."""
        if self._pins is None:
            return
        for direction in ("ingress", "egress"):
            path = self._link_pin(ifindex, direction)
            fd = tracepoints.open_pinned(path)
            if fd is not None:
                tracepoints.detach_quietly(fd, close=True)
            path.unlink(missing_ok=True)

    def _our_filter(self, ifindex: int, parent: int) -> str | None:
        return filter_name_at(self._nl, ifindex, parent, self._prio, self._handle)

    def _attach_tc(self, att: Attachment) -> None:
        tc = self._nl.tc()
        try:
            tc.add_clsact(att.ifindex)
        except RtnlError as exc:
            if exc.errno != errno.EEXIST:  # a clsact the CNI (or we, before) added is fine
                raise
        for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
            taken = self._our_filter(att.ifindex, parent)
            if taken is not None and taken != FILTER_NAME:
                raise KernelError(f"priority {self._prio} handle {self._handle:#x} holds "
                                  f"another agent's filter {taken!r}; set tc_priority")
        # a move from tcx: the links a daemon that attached by tcx left pinned
        with self._moving(self._has_pinned_links(att.ifindex),
                          lambda: self._point_links_at_ours(att.ifindex)):
            # replace: atomic swap if ours is there from before (a restart), create otherwise
            self._point_filters_at_ours(att.ifindex, [TC_PARENT_INGRESS, TC_PARENT_EGRESS])
            self._unpin_links(att.ifindex)

    def detach(self, att: Attachment) -> None:
        """Remove ours from one interface. Idempotent; a vanished interface is fine."""
        for fd in att.link_fds:
            tracepoints.detach_quietly(fd, close=True)  # the device may have taken the hook with it
        att.link_fds.clear()
        if att.mode == "tcx":
            self._unpin_links(att.ifindex)
        else:
            self._remove_our_filters(att.ifindex)

    def _remove_our_filters(self, ifindex: int) -> int:
        return remove_our_filters(self._nl, ifindex, self._prio, self._handle)

    def remove_stale(self, keep: set[int]) -> list[str]:
        """Our filters and pinned links on host veths we no longer attach to (left by
        a daemon before us for pods that went while none ran)."""
        removed = [f"tc filters on {veth.name}" for veth in self._nl.veths()
                   if veth.ifindex not in keep and self._remove_our_filters(veth.ifindex)]
        if self._pins is not None and self._pins.links.is_dir():
            for entry in self._pins.links.iterdir():
                parts = entry.name.split("-")
                if (parts[0] == "tcx" and len(parts) == 3 and parts[1].isdigit()
                        and int(parts[1]) not in keep):
                    fd = tracepoints.open_pinned(entry)
                    if fd is not None:
                        tracepoints.detach_quietly(fd, close=True)
                    entry.unlink(missing_ok=True)
                    removed.append(f"tcx link pin {entry.name}")
        return removed
