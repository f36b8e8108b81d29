"""`--bpffs-root ''` and `PODNETMON_BPFFS_ROOT=`: the documented "pin nothing", reached.

The daemon runs, counts exactly (against the veths' own statistics), says
`podnet_monitor_maps{state="unpinned"}`, and leaves nothing in bpffs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from podnetlab.lab import Lab
from tests.kernel.support import Daemon, assert_pings_counted_exactly

PINS = Path("/sys/fs/bpf/podnetmon")


def _pinned() -> list[str]:
    return sorted(str(p) for p in PINS.rglob("*")) if PINS.exists() else []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_empty_bpffs_root_runs_unpinned_and_pins_nothing(lab: Lab, daemons: list[Daemon],
                                                            how: str) -> None:
    a, b = lab.up(2)
    before = _pinned()
    args, env = (("--bpffs-root", ""), {}) if how == "flag" else ((), {"PODNETMON_BPFFS_ROOT": ""})
    daemon = Daemon(*args, inventory=str(lab.inventory), env=env)
    daemons.append(daemon)
    assert daemon.scrape().sum("podnet_monitor_maps", maps="core", state="unpinned") == 1
    assert_pings_counted_exactly(daemon, a, b, 7)
    assert _pinned() == before  # nothing of this daemon's in bpffs
    assert daemon.stop() == 0
    assert _pinned() == before
