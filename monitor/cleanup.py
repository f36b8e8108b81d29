"""`podnetmon cleanup`: remove everything the monitor ever attached or pinned on this node.

For a node where the daemon is gone for good (the DaemonSet deleted while it
left its programs attached for upgrades), or after a crash. It removes our
classic tc filters (by priority, handle and name, on every interface of the
host netns; a killed `run --check`'s too, under its handle beside the
daemon's), our pinned tcx and tracepoint links (detached first, so they
stop at once) and our pinned maps; another agent's filters and pins are
never touched. Run it only when no podnetmon daemon runs on the node: a
running one would attach again on its next pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from monitor.kernel import pins
from monitor.kernel.attach import check_handle
from monitor.kernel.netlink import Netlink, all_links, remove_our_filters


def daemons_running(proc: str = "/proc") -> list[int]:
    """Pids of `podnetmon run` processes (by their command line)."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(proc, entry, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if "run" in words and any(w.endswith(("podnetmon", "monitor")) for w in words):
            found.append(int(entry))
    return found


def cleanup(bpffs_root: str, tc_priority: int, tc_handle: int) -> list[str]:
    """Remove it all; returns what was removed, one line each."""
    removed: list[str] = []
    netlink = Netlink()
    try:
        for ifindex, name in all_links(netlink):
            # the daemon's filters, and those of a `run --check` that was killed mid-way
            count = sum(remove_our_filters(netlink, ifindex, tc_priority, handle)
                        for handle in (tc_handle, check_handle(tc_handle)))
            if count:
                removed.append(f"tc filters ({count}) on {name}")
    finally:
        netlink.close()
    if bpffs_root:
        removed += [f"pin {path}" for path in pins.Pins(bpffs_root).remove_all()]
    return removed
