"""`podnetmon check`: the findings that need no kernel to be judged."""

from __future__ import annotations

from monitor import check
from monitor.settings import Settings


def test_an_empty_bpffs_root_is_pinning_switched_off_not_a_missing_mount() -> None:
    finding = check.check_bpffs(Settings(bpffs_root=""))
    assert finding.ok, finding
    assert "pinning is off" in finding.sentence
