"""Plain data the kernel package returns, importable without bcc."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class VethLink:
    """A veth in the host namespace whose peer lives in another namespace."""

    ifindex: int
    name: str
    link_netnsid: int
    peer_ifindex: int


# Attacher.verify()'s answer where a classic filter of another agent now runs before
# ours and tcx can go first: the move keeps ours on the old hook until the new one
# counts (attach.py), so the device is not detached first.
FILTER_RUNS_FIRST = "a filter runs before ours"


@dataclass
class Attachment:
    """Our programs on one interface."""

    ifindex: int
    ifname: str
    netns: int
    mode: str  # "tc" or "tcx"
    since: float = field(default_factory=time.time)
    link_fds: list[int] = field(default_factory=list)  # tcx only


@dataclass(frozen=True)
class ProgramStats:
    """The kernel's run statistics of one of our programs."""

    name: str
    prog_id: int
    run_time_ns: int
    run_cnt: int


@dataclass(frozen=True)
class HostSide:
    """A host veth's statistics, and where its peer is (from one link dump)."""

    rx_packets: int
    tx_packets: int
    tx_bytes: int
    nsid: int | None
    peer_ifindex: int


@dataclass(frozen=True)
class VethCounts:
    """A host veth's own statistics."""

    rx_packets: int  # what the pod sent
    rx_bytes: int
    tx_packets: int  # what the pod received
    tx_bytes: int
    tx_dropped: int = 0  # handed to the veth for the pod, not delivered (counted by us)
