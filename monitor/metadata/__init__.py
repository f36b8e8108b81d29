"""Metadata sources: who a pod is, given its UID or its pinned netns path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from monitor.identity import PodMeta


class MetadataSource(Protocol):
    """Answers what the kernel cannot: a pod's namespace, name, labels and workload."""

    def lookup(self, uid: str | None, netns_paths: Sequence[str]) -> PodMeta | None:
        """The pod's metadata by UID, else by a pinned netns path; None if unknown."""

    def refresh(self) -> None:
        """Pick up changes (a re-read file); must not raise for a bad new version."""
