"""The BPF module, compiled and loaded: its programs' and maps' descriptors, pinned map
layouts (adopted, fresh or reset), tracepoint links, perf buffer readers, run statistics.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import select
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from monitor import log
from monitor.kernel import loader, perfring, pins, syscalls, tracepoints
from monitor.kernel.errors import CompileError, KernelError
from monitor.kernel.kernelinfo import KernelInfo
from monitor.kernel.maps import KernelMaps, MapHandle, only_u64
from monitor.kernel.records import ProgramStats
from monitor.kernel.source import (
    CORE_MAPS,
    CORE_OWNER,
    GENERATION_MAP,
    IFSLOT_SPILL_MAP,
    IFSLOTS_MAP,
    NETNS_MAP,
    PROG_EGRESS,
    PROG_INGRESS,
    SLOT_OWNER_MAP,
    SWITCHES_MAP,
    build_cflags,
    compose_source,
    loadable,
    maps_layout_versions,
    tracepoint_function,
)
from monitor.probes.base import Probe

_PERCPU_MAP_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
WAKEUP_EVENTS = 32  # perf events per reader wake-up
_PERF_OUTPUT = re.compile(r"^BPF_PERF_OUTPUT\((\w+)\);", re.M)


class Programs:
    """The BPF module, compiled and loaded by a child (monitor.kernel.loader): its programs'
    and maps' descriptors, tracepoint links, and perf buffer readers.

    With `pin` (a Pins), counter maps live in bpffs, each owner's (the core's slot
    table, each probe's) in a directory named after its layout version: a daemon that
    finds one there adopts it (`adopted_owners`; `adopted`: the core's, whose slots the
    others are keyed by), one that finds only other versions of an owner starts that
    owner fresh and says so (`maps_states`, `reset_from`).
    """

    def __init__(self, probes: Sequence[Probe], kernel: KernelInfo, *, max_interfaces: int,
                 bpf_stats: bool, pin: pins.Pins | None = None,
                 tracefs: str = "/sys/kernel/tracing") -> None:
        self._log = log.get("bpf")
        self.probes, self.notes = loadable(probes, kernel)
        for name, note in self.notes.items():
            self._log.warning("probe limited on this kernel", probe=name, note=note)
        self.max_interfaces, self._pins, self._tracefs = max_interfaces, pin, tracefs
        # Nonzero and different from the last daemon's: see pnm_generation in pnm.h.
        self.generation = secrets.randbelow(0xFFFFFFFE) + 1
        every_layout = maps_layout_versions(max_interfaces)
        owners = [CORE_OWNER, *(p.name for p in self.probes if p.name in every_layout)]
        self.layouts = {owner: every_layout[owner] for owner in owners}
        self.pin_dirs = ({owner: pin.maps_dir(version) for owner, version in self.layouts.items()}
                         if pin is not None else {})
        self.pin_dir = self.pin_dirs.get(CORE_OWNER)
        self.adopted_owners = {owner for owner, path in self.pin_dirs.items()
                               if path.is_dir() and any(path.iterdir())}
        self.adopted = CORE_OWNER in self.adopted_owners
        self.reset_from = ([v for v in pin.versions() if v not in self.layouts.values()]
                           if pin else [])
        self.maps_states = {owner: self._maps_state(owner, pin) for owner in owners}
        # What the last daemon left pinned, as found: a start-up that fails removes only
        # what it pinned itself (abort()), never this.
        self._found_pins = {owner: ({e.name for e in path.iterdir()} if path.is_dir() else None)
                            for owner, path in self.pin_dirs.items()}
        self._committed = False  # set by the take-over in attach_tracepoints()
        for path in self.pin_dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        source = compose_source(self.probes, pin_dirs=self.pin_dirs if pin is not None else None)
        cflags = [*build_cflags(self.probes, kernel, max_interfaces),
                  f"-DPNM_GENERATION={self.generation}u"]
        if self.pin_dir is not None:
            cflags.append(f'-DPNM_PIN_DIR="{self.pin_dir}"')
        programs = [(PROG_INGRESS, "sched_cls"), (PROG_EGRESS, "sched_cls")]
        programs += [(tracepoint_function(tp), "tracepoint")
                     for p in self.probes for tp in p.tracepoints]
        map_names = [*CORE_MAPS, SWITCHES_MAP, *(m for p in self.probes for m in p.maps),
                     *_PERF_OUTPUT.findall(source)]
        spec = loader.Spec(source, tuple(cflags), tuple(programs), tuple(map_names))
        started = time.monotonic()
        try:
            self._loaded = loader.load(spec)
        except loader.LoadError as exc:
            self._unpin_new()
            raise CompileError(str(exc), probe=",".join(p.name for p in self.probes)) from None
        self.compile_seconds = time.monotonic() - started
        self.bcc_version = self._loaded.bcc_version
        self.ingress_fd = self._loaded.programs[PROG_INGRESS]
        self.egress_fd = self._loaded.programs[PROG_EGRESS]
        self._tp_links: list[tuple[str, int]] = []
        self._readers: list[perfring.PerfReader] = []
        try:
            self.maps = KernelMaps(self._check_maps())
        except CompileError:
            self._loaded.close()
            self._unpin_new()
            raise
        self._stats_fd = self._enable_stats() if bpf_stats else None
        self._log.info("bpf programs loaded", probes=[p.name for p in self.probes],
                       seconds=round(self.compile_seconds, 3), bpf_stats=self.stats_enabled(),
                       offsets=kernel.offsets_source, maps=str(self.pin_dir or "not pinned"),
                       adopted=self.adopted)
        reset = sorted(owner for owner, state in self.maps_states.items() if state == "reset")
        if reset:
            self._log.warning("pinned maps of another layout found: counters start from zero",
                              maps=reset, previous=self.reset_from,
                              layouts=[self.layouts[owner] for owner in reset])

    def _maps_state(self, owner: str, pin: pins.Pins | None) -> str:
        """Where an owner's counters start: unpinned; adopted (the last daemon's); reset
        (it left this owner's maps, or the whole set, in another layout); fresh."""
        if pin is None:
            return "unpinned"
        if owner in self.adopted_owners:
            return "adopted"
        # "<owner>-<digest>"; a bare digest is a daemon's from before per-owner layouts,
        # and the core's slots key every probe's maps: either resets every owner
        left = {version.rsplit("-", 1)[0] if "-" in version else "" for version in self.reset_from}
        return "reset" if left & {owner, "", CORE_OWNER} else "fresh"

    def adopted_probe(self, name: str) -> bool:
        """Whether a probe's maps are the last daemon's (its own and the core's)."""
        return self.adopted and name in self.adopted_owners

    def _enable_stats(self) -> int | None:
        try:
            return syscalls.enable_run_stats()
        except OSError as exc:
            self._log.warning("bpf run statistics unavailable", error=str(exc))
            return None

    def _check_maps(self) -> list[MapHandle]:
        """Each probe's declared layouts against the kernel's own view of the map.

        The sizes come from the kernel (BPF_OBJ_GET_INFO_BY_FD): a pinned map
        adopted from a previous daemon is checked like a new one.
        """
        ncpus = syscalls.possible_cpus()
        handles = [self._handle(IFSLOTS_MAP, 4, 8, ncpus, "core"),
                   self._handle(IFSLOT_SPILL_MAP, 4, 4, ncpus, "core"),
                   self._handle(NETNS_MAP, 4, 4, ncpus, "core"),
                   self._handle(SLOT_OWNER_MAP, 4, 8, ncpus, "core"),
                   self._handle(GENERATION_MAP, 4, 4, ncpus, "core"),
                   self._handle(SWITCHES_MAP, 4, 4, ncpus, "core")]
        for probe in self.probes:
            for name, layout in probe.maps.items():
                handle = self._handle(name, ctypes.sizeof(layout.key), ctypes.sizeof(layout.value),
                                      ncpus, probe.name)
                if handle.percpu and not only_u64(layout.value):
                    raise CompileError(f"map {name}: per-CPU values must be u64 counters only, "
                                       "to be summed over CPUs", probe=probe.name)
                wanted = (self.max_interfaces + 1) * layout.copies
                if layout.per_slot and handle.max_entries != wanted:
                    raise CompileError(f"map {name}: a per-slot map needs {wanted} entries "
                                       f"({layout.copies} x PNM_SLOTS), it has "
                                       f"{handle.max_entries}", probe=probe.name)
                handles.append(handle)
        for name in self._loaded.maps:
            if not any(h.name == name for h in handles):  # perf buffers: no layout to check
                info = syscalls.map_info(self._loaded.maps[name])
                handles.append(MapHandle(name, self._loaded.maps[name], info.key_size,
                                         info.value_size, False, ncpus, info.max_entries))
        return handles

    def _handle(self, name: str, key_size: int, value_size: int, ncpus: int,
                owner: str) -> MapHandle:
        fd = self._loaded.maps[name]
        info = syscalls.map_info(fd)
        if (info.key_size, info.value_size) != (key_size, value_size):
            raise CompileError(f"map {name}: the kernel has key/value sizes {info.key_size}/"
                               f"{info.value_size}, Python expects {key_size}/{value_size}",
                               probe=owner)
        return MapHandle(name, fd, info.key_size, info.value_size,
                         info.map_type in _PERCPU_MAP_TYPES, ncpus, info.max_entries)

    # -- tracepoints ------------------------------------------------------------------

    def attach_tracepoints(self) -> None:
        """Attach every tracepoint program by a bpf link, then take over from the last
        daemon's programs in one map write, then pin the links in place of its own."""
        for probe in self.probes:
            for tp in probe.tracepoints:
                category, event = tp.split(":", 1)
                fd = self._loaded.programs[tracepoint_function(tp)]
                try:
                    link = tracepoints.attach_tracepoint(fd, category, event, self._tracefs)
                except OSError as exc:
                    raise KernelError(f"cannot attach to tracepoint {tp}: {exc}",
                                      probe=probe.name) from None
                self._tp_links.append((tp, link))
        # The take-over: from this write on, the last daemon's tracepoint programs count
        # nothing. Before it, a failed start-up changed nothing they use (abort()).
        self._committed = True
        self.maps.put(GENERATION_MAP, struct.pack("=I", 0), struct.pack("=I", self.generation))
        if self._pins is None:
            return
        for tp, link in self._tp_links:
            path = self._pins.link_path(f"tp-{tp.replace(':', '-')}")
            old = tracepoints.open_pinned(path)
            path.unlink(missing_ok=True)  # the old link (if any) now counts nothing
            if old is not None:
                tracepoints.detach_quietly(old, close=True)
            tracepoints.pin(link, str(path))

    def remove_unloaded(self) -> list[str]:
        """Pins this daemon does not use: maps of other layouts (counters restarted), of
        probes it did not load (a probe switched on again later must not hand new pods
        the counts of slots its maps kept from pods long gone: no per-slot zeroing reached
        them meanwhile), and those probes' tracepoint links (the last daemon's, attached
        and counting nothing since the take-over). Called once this daemon holds
        everything it needs."""
        if self._pins is None:
            return []
        removed = []
        for version in self._pins.versions():
            if version not in self.layouts.values():
                removed += [f"pinned map {path}" for path in self._pins.remove_version(version)]
        wanted = {f"tp-{tp.replace(':', '-')}" for p in self.probes for tp in p.tracepoints}
        links = self._pins.links
        for entry in sorted(links.glob("tp-*")) if links.is_dir() else []:
            if entry.name in wanted:
                continue
            old = tracepoints.open_pinned(entry)
            entry.unlink(missing_ok=True)
            if old is not None:
                tracepoints.detach_quietly(old, close=True)
            removed.append(f"tracepoint link {entry}")
        return removed

    # -- perf buffers -----------------------------------------------------------------

    def open_perf(self, name: str, callback: Callable[[bytes], None],
                  lost: Callable[[int], None], pages: int) -> None:
        """Read a BPF_PERF_OUTPUT map: each event's bytes to `callback`, overruns to `lost`.

        Events are delivered by poll_perf(), from the one thread that calls it.
        The reader is woken once per WAKEUP_EVENTS events, not for each: a wake-up
        per packet cost ~7 us of the traced packet's time (bench/RESULTS.md);
        poll_perf() drains what is left on each timeout, so a slow trace is not held back.
        """
        self._readers.append(perfring.PerfReader(
            self.maps.handle(name).fd, pages=pages, on_event=callback, on_lost=lost,
            wakeup_events=WAKEUP_EVENTS))

    def poll_perf(self, timeout_ms: int) -> None:
        """Deliver events: wait for a wake-up (or the timeout), then drain every buffer."""
        if not self._readers:
            time.sleep(timeout_ms / 1000)
            return
        select.select(self._readers, [], [], timeout_ms / 1000)
        for reader in self._readers:
            reader.drain()

    def close_perf(self) -> None:
        """Close every perf buffer opened (their rings are unmapped and freed, their map
        entries cleared); from the thread that polls them. open_perf() may follow."""
        readers, self._readers = self._readers, []
        for reader in readers:
            reader.close()

    # -- statistics -------------------------------------------------------------------

    def stats_enabled(self) -> bool:
        if self._stats_fd is not None:
            return True
        try:
            return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
        except OSError:
            return False

    def program_stats(self) -> list[ProgramStats]:
        """Every loaded program of ours: the TC pair and each tracepoint program."""
        out = []
        for name, fd in self._loaded.programs.items():
            info = syscalls.prog_info(fd)
            out.append(ProgramStats(name, info.prog_id, info.run_time_ns, info.run_cnt))
        return sorted(out, key=lambda s: s.name)

    # -- the end ----------------------------------------------------------------------

    def close(self, *, leave_attached: bool = False) -> None:
        """Release everything. Unless `leave_attached`, also detach the tracepoint
        links and unpin the maps: nothing of ours stays in the kernel (the TC
        attachments are the reconciler's to remove, before this)."""
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        for tp, link in self._tp_links:
            if not leave_attached:
                tracepoints.detach_quietly(link)
                if self._pins is not None:
                    self._pins.link_path(f"tp-{tp.replace(':', '-')}").unlink(missing_ok=True)
            os.close(link)
        self._tp_links.clear()
        if not leave_attached and self._pins is not None:
            for version in self.layouts.values():
                self._pins.remove_version(version)
            self._pins.remove_empty()
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None
        self._loaded.close()


    def abort(self) -> None:
        """Release everything after a start-up that failed, leaving the kernel as this
        daemon found it: the maps, tracepoint links and programs the last daemon left
        (pinned, and counting with --leave-attached) stay exactly as they were; only what
        this start-up made goes (its unpinned tracepoint links, maps it pinned new).
        After the take-over in attach_tracepoints() there is nothing to go back to: then
        ours stay, counting into the same maps, as with leave_attached."""
        if self._committed:
            self.close(leave_attached=True)
            return
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        for _tp, link in self._tp_links:
            tracepoints.detach_quietly(link, close=True)  # ours, not pinned: the old ones still count
        self._tp_links.clear()
        if self._stats_fd is not None:
            os.close(self._stats_fd)
            self._stats_fd = None
        self._loaded.close()
        self._unpin_new()

    def _unpin_new(self) -> None:
        """Unpin the maps this daemon pinned itself (none, where it adopted them all)."""
        if self._pins is None:
            return
        for owner, path in self.pin_dirs.items():
            found = self._found_pins.get(owner)
            for entry in list(path.iterdir()) if path.is_dir() else []:
                if found is None or entry.name not in found:
                    entry.unlink(missing_ok=True)
            if found is None:
                try:
                    path.rmdir()
                except OSError:
                    pass
        self._pins.remove_empty()
