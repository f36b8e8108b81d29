"""The node's neighbour tables, sized for the lab's pods and put back by `down`.

One table serves every namespace, so the lab's pods share the node's thresholds. What
they were, and what the lab wrote, is kept in a file of the lab's directory: `down` (a
later process, perhaps after a crash) puts back only what nobody changed since.
"""

from __future__ import annotations

import json
from pathlib import Path

from monitor import neighbours


def size_neighbour_tables(kept_file: Path, pods: int) -> None:
    """Raise the node's neighbour-table thresholds to what `pods` pods need (one
    table for all namespaces: 500 lab pods fill the default 1,024), keeping what
    they were, and what the lab wrote, for `down` to put back."""
    try:
        kept = json.loads(kept_file.read_text())
    except (OSError, ValueError):
        kept = {}
    for family in ("ipv4", "ipv6"):
        try:
            table = neighbours.read_table(family)
        except (OSError, ValueError):
            continue
        wanted = neighbours.sufficient_thresholds(table, neighbours.needed(pods))
        if wanted == table.thresholds:
            continue
        neighbours.write_thresholds(family, wanted)
        original = kept.get(family, {}).get("original", list(table.thresholds))
        kept[family] = {"original": original, "lab": list(wanted)}
    if kept:
        kept_file.write_text(json.dumps(kept))


def restore_neighbour_tables(kept_file: Path) -> list[str]:
    """Put back the thresholds the lab raised, unless someone changed them since."""
    try:
        kept = json.loads(kept_file.read_text())
    except (OSError, ValueError):
        return []
    restored = []
    for family, values in kept.items():
        try:
            now = neighbours.read_table(family).thresholds
        except (OSError, ValueError):
            continue
        if list(now) == values["lab"]:
            original = tuple(values["original"])
            neighbours.write_thresholds(family, (original[0], original[1], original[2]))
            restored.append(f"{family} neighbour thresholds {original}")
    return restored
