"""When the reconciler's passes run: on link events (debounced), on wake-ups from other
threads (the API watch), on a periodic resync and on a failed attach's retry time;
with the probes' sweeps and the attachments' checks in between. One thread, which
detaches everything on exit unless told to leave it for the next daemon.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from monitor import log
from monitor.reconcile import Reconciler
from monitor.state import MonitorState


class EventSource(Protocol):
    def fileno(self) -> int: ...
    def drain(self) -> int: ...
    def close(self) -> None: ...



class Loop:
    """Runs passes on link events and on a timer until stopped; detaches on exit."""

    def __init__(self, reconciler: Reconciler, *, resync_interval: float, debounce: float,
                 events_factory: Callable[[], EventSource], state: MonitorState,
                 on_exit: Callable[[], None] = lambda: None,
                 sweep: Callable[[], None] | None = None, sweep_interval: float = 1.0,
                 detach_on_exit: bool = True,
                 after_pass: Callable[[], None] | None = None) -> None:
        """after_pass: run after every pass, in this thread (new interfaces' first look)."""
        self._reconciler, self._resync, self._debounce = reconciler, resync_interval, debounce
        self._detach_on_exit = detach_on_exit  # False: leave everything for the next daemon
        self._events_factory, self._state, self._on_exit = events_factory, state, on_exit
        self._sweep, self._sweep_interval = sweep, sweep_interval
        self._after_pass = after_pass
        self._log = log.get("reconcile")
        # wake(): another thread (the API watch) asks for a pass, through a self-pipe
        # that select() watches beside the netlink socket.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._wake_open = True  # the fds must not be written once closed (fd numbers get reused)
        self._wanted = False  # set by _drain: a link event or a wake-up asks for a pass

    def wake(self) -> None:
        with self._wake_lock:
            if not self._wake_open:
                return
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # a wake-up is pending already

    def run(self, stop: threading.Event) -> None:
        events = self._events_factory()
        try:
            self._pass()
            self._state.ready = True
            self._log.info("ready", pods=len(self._state.snapshot.pods))
            next_resync = time.monotonic() + self._resync
            next_sweep = time.monotonic() + self._sweep_interval
            while not stop.is_set():
                now = time.monotonic()
                if self._sweep is not None and now >= next_sweep:
                    self._run_sweep()
                    # a tcx link taken away makes no netlink event: checked each sweep (two
                    # BPF_PROG_QUERY a tcx interface)
                    self._verify(mode="tcx")
                    next_sweep = now + self._sweep_interval
                retry = self._reconciler.next_retry()
                if now >= next_resync or (retry is not None and now >= retry):
                    self._pass()
                    if now >= next_resync:
                        self._verify()  # every attachment, once a resync
                    next_resync = time.monotonic() + self._resync
                    continue
                wake = min(w for w in (next_resync, retry,
                                       next_sweep if self._sweep else None) if w is not None)
                timeout = max(0.0, min(wake - now, 0.5))  # 0.5: notice `stop` promptly
                watched: list[Any] = [events, self._wake_r]
                readable, _, _ = select.select(watched, [], [], timeout)
                if readable:
                    self._wanted = False
                    self._drain(readable, events)
                    self._settle(events)
                    if self._wanted:  # a link event or a wake-up: rescan
                        self._pass()
                        next_resync = time.monotonic() + self._resync
                    changed = getattr(events, "tc_changed", None)
                    if changed:  # qdiscs or filters changed on these devices: ours still there?
                        devices = set(changed)
                        changed.clear()
                        self._verify(devices)
        finally:
            try:
                if self._detach_on_exit:
                    self._reconciler.detach_all()
            finally:
                events.close()
                with self._wake_lock:
                    self._wake_open = False
                    os.close(self._wake_r)
                    os.close(self._wake_w)
                self._on_exit()

    def _drain(self, readable: list[Any], events: EventSource) -> None:
        if events in readable:
            if events.drain():
                self._wanted = True
            overflows = getattr(events, "overflows", 0)
            if overflows > self._state.netlink_overflows:
                # the kernel dropped link events for us: the pass that follows rescans
                # everything, which is the whole answer to lost events
                self._state.netlink_overflows = overflows
                self._log.warning("link events were lost (the netlink socket overflowed): "
                                  "rescanning everything", overflows=overflows)
        if self._wake_r in readable:
            self._wanted = True
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _settle(self, events: EventSource) -> None:
        """Wait out a burst of events so it costs one pass."""
        deadline = time.monotonic() + self._debounce
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            watched: list[Any] = [events, self._wake_r]
            readable, _, _ = select.select(watched, [], [], left)
            if readable:
                self._drain(readable, events)

    def _run_sweep(self) -> None:
        if self._sweep is None:
            return
        try:
            self._sweep()
        except Exception as exc:  # noqa: BLE001 - the next sweep retries
            self._log.error("sweep failed", error=str(exc))

    def _verify(self, devices: set[int] | None = None, mode: str = "") -> None:
        """Re-attach where ours went missing; a pass then publishes the new state."""
        try:
            if self._reconciler.verify(devices, mode=mode):
                self._pass()
        except Exception as exc:  # noqa: BLE001 - the next check retries; the thread lives on
            self._log.error("verifying the attachments failed", error=str(exc))

    def _pass(self) -> None:
        try:
            self._reconciler.reconcile()
            self._state.last_reconcile_error = ""
        except Exception as exc:  # noqa: BLE001 - the next pass retries; the thread lives on
            self._state.last_reconcile_error = str(exc)
            self._log.error("reconcile failed", error=str(exc))
        if self._after_pass is not None:
            try:
                self._after_pass()
            except Exception as exc:  # noqa: BLE001 - it runs again after the next pass
                self._log.error("after a pass", error=str(exc))
