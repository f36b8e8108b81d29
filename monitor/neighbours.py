"""The kernel's neighbour tables (ARP for IPv4, ND for IPv6), as a node with many pods
needs them.

Each table is one for all network namespaces: every pod's entries (its gateway, the
peers it resolves on its link) and the host's entries for its pods count against one
ceiling, `net.ipv4.neigh.default.gc_thresh3` (1,024 by default; IPv6 has its own).
At the ceiling, the kernel first collects entries unused for 5 s; when none can go, it
refuses the new entry (`table_fulls` in /proc/net/stat/arp_cache counts each refusal)
and frees the packet that needed it with the drop reason NEIGH_CREATEFAIL: a pod that
starts beside hundreds of others sends nothing on the wire. The monitor counts those
drops against the pod; `podnetmon check` warns before it happens, and the lab raises
the thresholds it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Entries a pod can hold on a node: its gateway in its netns and the host's entry for
# it (routed CNIs: Calico, Cilium), with room for the peers a pod resolves directly on a
# bridge CNI (flannel, kubenet, the lab). Measured: 500 lab pods each pinging one peer
# took 1,000 IPv4 entries and filled the default table (bench/RESULTS.md, issue 7).
ENTRIES_PER_POD = 4
KUBELET_MAX_PODS = 110  # the kubelet's default maxPods: what a node must be ready for

# family -> /proc/net/stat file, /proc/sys directory
_FILES = {"ipv4": ("arp_cache", "ipv4"), "ipv6": ("ndisc_cache", "ipv6")}


@dataclass(frozen=True)
class NeighbourTable:
    family: str  # "ipv4" or "ipv6"
    entries: int  # in the table now, every namespace's
    table_fulls: int  # new entries refused since boot (each one a packet dropped)
    thresholds: tuple[int, int, int]  # gc_thresh1, 2, 3

    @property
    def ceiling(self) -> int:
        return self.thresholds[2]


def needed(pods: int) -> int:
    """gc_thresh3 a node with `pods` pods needs."""
    return ENTRIES_PER_POD * max(pods, 1)


def threshold_keys(family: str) -> list[str]:
    """The sysctl names of a family's gc_thresh1..3."""
    return [f"net.{_FILES[family][1]}.neigh.default.gc_thresh{i}" for i in (1, 2, 3)]


def _sysctl_path(key: str, proc_root: str) -> Path:
    return Path(proc_root) / "sys" / key.replace(".", "/")


def read_table(family: str, proc_root: str = "/proc") -> NeighbourTable:
    """A table's size and refusals (/proc/net/stat: one row per CPU; `entries` is the
    table's own count on every row, the other columns are the CPU's share) and its
    thresholds. Raises OSError or ValueError when the kernel has no such table."""
    stat_name, _ = _FILES[family]
    lines = (Path(proc_root) / "net" / "stat" / stat_name).read_text().split("\n")
    header = lines[0].split()
    rows = [[int(v, 16) for v in line.split()] for line in lines[1:] if line.strip()]
    if not rows or "entries" not in header or "table_fulls" not in header:
        raise ValueError(f"/proc/net/stat/{stat_name}: unexpected layout {header}")
    entries = rows[0][header.index("entries")]
    fulls = sum(row[header.index("table_fulls")] for row in rows)
    thresholds = tuple(int(_sysctl_path(k, proc_root).read_text()) for k in threshold_keys(family))
    return NeighbourTable(family, entries, fulls, (thresholds[0], thresholds[1], thresholds[2]))


def sufficient_thresholds(table: NeighbourTable, need: int) -> tuple[int, int, int]:
    """Thresholds for a ceiling of at least `need`, never lower than the table's own:
    gc_thresh1 (no collection below it) an eighth, gc_thresh2 (collection after 5 s
    above it) a half of the ceiling, in the proportions of the kernel's defaults (128,
    512, 1024)."""
    ceiling = max(table.ceiling, need)
    return (min(max(table.thresholds[0], ceiling // 8), ceiling),
            min(max(table.thresholds[1], ceiling // 2), ceiling), ceiling)


def write_thresholds(family: str, values: tuple[int, int, int], proc_root: str = "/proc") -> None:
    """Set a family's gc_thresh1..3, the ceiling first when it rises (the kernel takes
    any order, but a reader between the writes never sees thresh2 above thresh3)."""
    pairs = list(zip(threshold_keys(family), values, strict=True))
    current = int(_sysctl_path(pairs[2][0], proc_root).read_text())
    for key, value in (reversed(pairs) if values[2] >= current else pairs):
        _sysctl_path(key, proc_root).write_text(str(value))


def sysctl_commands(family: str, values: tuple[int, int, int]) -> str:
    return "; ".join(f"sysctl -w {key}={value}"
                     for key, value in zip(threshold_keys(family), values, strict=True))
