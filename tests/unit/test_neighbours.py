"""The neighbour tables as /proc shows them, and what `podnetmon check` says of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor import neighbours
from monitor.check import check_neighbours

HEADER = ("entries  allocs   destroys hash_grows lookups  hits     res_failed rcv_probes_mcast "
          "rcv_probes_ucast periodic_gc_runs forced_gc_runs unresolved_discards table_fulls")


def fake_proc(root: Path, family: str, entries: int, fulls_per_cpu: list[int],
              thresholds: tuple[int, int, int] = (128, 512, 1024)) -> None:
    stat = {"ipv4": "arp_cache", "ipv6": "ndisc_cache"}[family]
    rows = [" ".join(f"{v:08x}" for v in (entries, 5, 4, 1, 9, 8, 0, 0, 0, 2, 0, 0, fulls))
            for fulls in fulls_per_cpu]
    path = root / "net" / "stat" / stat
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    sys_dir = root / "sys" / "net" / family / "neigh" / "default"
    sys_dir.mkdir(parents=True, exist_ok=True)
    for i, value in enumerate(thresholds, 1):
        (sys_dir / f"gc_thresh{i}").write_text(f"{value}\n")


def test_entries_are_the_tables_and_refusals_are_summed_over_cpus(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 0x3e8, [2, 0, 17])
    table = neighbours.read_table("ipv4", str(tmp_path))
    assert table == neighbours.NeighbourTable("ipv4", 1000, 19, (128, 512, 1024))


def test_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "net" / "stat").mkdir(parents=True)
    (tmp_path / "net" / "stat" / "arp_cache").write_text("entries allocs\n00000001 00000002\n")
    with pytest.raises(ValueError, match="unexpected layout"):
        neighbours.read_table("ipv4", str(tmp_path))


def test_thresholds_only_rise_in_the_kernels_proportions() -> None:
    table = neighbours.NeighbourTable("ipv4", 10, 0, (128, 512, 1024))
    assert neighbours.sufficient_thresholds(table, 4000) == (500, 2000, 4000)
    assert neighbours.sufficient_thresholds(table, 100) == (128, 512, 1024)
    custom = neighbours.NeighbourTable("ipv6", 10, 0, (4096, 512, 1024))
    assert neighbours.sufficient_thresholds(custom, 8000) == (4096, 4000, 8000)


def test_raising_writes_the_ceiling_first(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 1, [0])
    neighbours.write_thresholds("ipv4", (500, 2000, 4000), str(tmp_path))
    assert neighbours.read_table("ipv4", str(tmp_path)).thresholds == (500, 2000, 4000)
    neighbours.write_thresholds("ipv4", (128, 512, 1024), str(tmp_path))
    assert neighbours.read_table("ipv4", str(tmp_path)).thresholds == (128, 512, 1024)


def test_a_table_with_room_is_ok(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 30, [0, 0])
    fake_proc(tmp_path, "ipv6", 12, [0])
    finding = check_neighbours(110, str(tmp_path))
    assert finding.ok and not finding.required
    assert "440 entries" in finding.sentence


def test_a_ceiling_below_the_pods_needs_is_a_warning_with_the_sysctls(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 30, [0])
    fake_proc(tmp_path, "ipv6", 12, [0])
    finding = check_neighbours(500, str(tmp_path))
    assert not finding.ok and not finding.required
    assert "ipv4 gc_thresh3 is 1024, below the 2000 that 500 pods need" in finding.sentence
    assert "ipv6 gc_thresh3 is 1024" in finding.sentence
    assert ("sysctl -w net.ipv4.neigh.default.gc_thresh1=250; sysctl -w "
            "net.ipv4.neigh.default.gc_thresh2=1000; sysctl -w "
            "net.ipv4.neigh.default.gc_thresh3=2000") in finding.remedy
    assert "net.ipv6.neigh.default.gc_thresh3=2000" in finding.remedy


def test_refusals_since_boot_are_named_and_the_ceiling_doubled(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 100, [3, 4])
    finding = check_neighbours(110, str(tmp_path))  # no IPv6 in this fake kernel
    assert not finding.ok
    assert "the ipv4 table refused 7 new entries since boot" in finding.sentence
    assert "NEIGH_CREATEFAIL" in finding.sentence
    assert "net.ipv4.neigh.default.gc_thresh3=2048" in finding.remedy
    assert "ipv6" not in finding.remedy


def test_a_nearly_full_table_is_a_warning(tmp_path: Path) -> None:
    fake_proc(tmp_path, "ipv4", 950, [0])
    finding = check_neighbours(110, str(tmp_path))
    assert not finding.ok
    assert "holds 950 of its 1024 entries" in finding.sentence
    assert "net.ipv4.neigh.default.gc_thresh3=1900" in finding.remedy
