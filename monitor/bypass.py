"""Noticing traffic that bypasses our programs, saying why, and counting what we can.

Our per-interface counters equal the veth's own statistics exactly (the tests prove
it), so when the interface's packet counters move and ours fall well short, something
ahead of us is ending the packets' TC processing: a classic filter before ours
returning TC_ACT_OK or redirecting (Cilium's legacy tc programs, Calico's eBPF
dataplane: on a kernel with tcx the daemon moves such an interface to tcx, which runs
before every classic filter), a tcx program put ahead of ours returning TCX_PASS, or our
filter gone (re-attached by the reconciler).

One bypass no host-side count can see: a CNI that delivers traffic into the pod with
bpf_redirect_peer() (Cilium's host routing, netkit) skips the host veth's egress, so
neither our programs nor the veth's tx statistics see it. The pod-side device's rx
statistics do (kernel 6.7 counts redirect_peer in them), read over rtnetlink with
IFLA_TARGET_NETNSID, without entering the pod: what they gained beyond the host side's
tx is what was redirected past us. Its volume is counted per pod
(podnet_redirected_{packets,bytes}_total), but not by protocol or peer: no program of
ours sees those packets.

Checked on the daemon's sweep, every --bypass-check-interval; the verdict is
podnet_monitor_bypassed{namespace,pod,reason}, /api/v1/pods' "bypassed", and one log
line per change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor import log
from monitor.identity import IdentityIndex
from monitor.kernel.records import HostSide

MIN_PACKETS = 20  # the interface must have moved this much for a verdict
SHORTFALL = 0.5  # ours below this share of the interface's: bypassed (reads are not atomic)
REDIRECT_PEER = "redirect_peer"
UNKNOWN = "unknown"


@dataclass
class _Seen:
    rx: int
    tx: int
    tx_bytes: int
    egress: int  # ours: what the pod sent (the veth received)
    ingress: int
    peer_rx: int | None  # the pod-side device's rx, None if unreadable
    peer_rx_bytes: int


# ifindex -> HostSide of every veth, from one netlink dump
LinkStats = Callable[[], dict[int, HostSide]]
# our counts by slot, (egress packets, egress bytes, ingress packets, ingress bytes), from
# the probe that provides them (Probe.interface_totals, bound to the maps)
SlotTotals = Callable[[list[int]], dict[int, tuple[int, int, int, int]]]
# (nsid, ifindex) -> (rx_packets, rx_bytes) of a pod-side device, None if unreadable
PeerStats = Callable[[int, int], tuple[int, int] | None]
# why our programs miss an interface's packets: tc_filter_first, tcx_program_first, ...
Explain = Callable[[int], str]


class BypassDetector:
    """Compares, per attached interface, the veth's packet counts (both sides) with ours."""

    def __init__(self, totals: SlotTotals, snapshot: Callable[[], IdentityIndex],
                 stats: LinkStats, peer_stats: PeerStats | None = None,
                 explain: Explain | None = None) -> None:
        self._totals, self._snapshot, self._stats = totals, snapshot, stats
        self._peer_stats, self._explain = peer_stats, explain
        self._seen: dict[int, _Seen] = {}
        self.bypassed: dict[tuple[str, str], str] = {}  # pod -> reason, "" if not bypassed
        self.redirected: dict[tuple[str, str], list[int]] = {}  # pod -> [packets, bytes]
        self._log = log.get("bypass")

    def _ours(self, slots: list[int]) -> dict[int, tuple[int, int]]:
        """(egress, ingress) packets we counted, by slot, in one batch read."""
        return {slot: (t[0], t[2]) for slot, t in self._totals(slots).items()}

    def _peer(self, host: HostSide) -> tuple[int | None, int]:
        if self._peer_stats is None or host.nsid is None or not host.peer_ifindex:
            return None, 0
        found = self._peer_stats(host.nsid, host.peer_ifindex)
        return (found[0], found[1]) if found is not None else (None, 0)

    def observe_new(self) -> None:
        """The first statistics of interfaces not seen yet (after every pass, and every
        sweep between checks): what is redirected past a new pod counts from its attach."""
        index = self._snapshot()
        new = [veth.ifindex for pod in index.pods() for veth in pod.interfaces
               if veth.ifindex not in self._seen]
        if not new:
            return
        all_stats = self._stats()
        slot_of = {i: s for i in new if (s := index.slot_of(i)) is not None}
        counted = self._ours(sorted(set(slot_of.values())))
        for ifindex in new:
            host = all_stats.get(ifindex)
            ours = counted.get(slot_of[ifindex]) if ifindex in slot_of else None
            if host is not None and ours is not None:
                peer_rx, peer_rx_bytes = self._peer(host)
                self._seen[ifindex] = _Seen(host.rx_packets, host.tx_packets, host.tx_bytes,
                                            ours[0], ours[1], peer_rx, peer_rx_bytes)

    def check(self) -> None:
        index = self._snapshot()
        verdicts: dict[tuple[str, str], str] = {}
        seen_now: dict[int, _Seen] = {}
        all_stats = self._stats()
        slot_of = {veth.ifindex: slot for pod in index.pods() for veth in pod.interfaces
                   if (slot := index.slot_of(veth.ifindex)) is not None}
        counted = self._ours(sorted(set(slot_of.values())))
        live = set()
        for pod in index.pods():
            key = (pod.namespace, pod.name)
            live.add(key)
            for veth in pod.interfaces:
                host = all_stats.get(veth.ifindex)
                slot = slot_of.get(veth.ifindex)
                ours = counted.get(slot) if slot is not None else None
                if host is None or ours is None:
                    continue
                peer_rx, peer_rx_bytes = self._peer(host)
                now = _Seen(host.rx_packets, host.tx_packets, host.tx_bytes, ours[0], ours[1],
                            peer_rx, peer_rx_bytes)
                seen_now[veth.ifindex] = now
                before = self._seen.get(veth.ifindex)
                verdicts.setdefault(key, "")
                if before is None:
                    continue
                reason = self._verdict(veth.ifindex, before, now, key)
                if reason and not verdicts[key]:
                    verdicts[key] = reason
        self._seen = seen_now
        for key, reason in verdicts.items():
            was = self.bypassed.get(key, "")
            if reason and not was:
                self._log.warning("traffic bypasses our programs", namespace=key[0],
                                  pod=key[1], reason=reason)
            elif was and not reason:
                self._log.warning("traffic reaches our programs again", namespace=key[0],
                                  pod=key[1])
            elif reason != was:
                self._log.info("bypass reason changed", namespace=key[0], pod=key[1],
                               reason=reason, was=was)
        self.bypassed = verdicts
        for gone in set(self.redirected) - live:
            del self.redirected[gone]  # its series go with the pod

    def _verdict(self, ifindex: int, before: _Seen, now: _Seen, pod: tuple[str, str]) -> str:
        reason = ""
        if now.peer_rx is not None and before.peer_rx is not None:
            # what the pod's own device received beyond what the host side sent it
            extra = (now.peer_rx - before.peer_rx) - (now.tx - before.tx)
            extra_bytes = (now.peer_rx_bytes - before.peer_rx_bytes) - (now.tx_bytes -
                                                                         before.tx_bytes)
            if extra > 0:
                total = self.redirected.setdefault(pod, [0, 0])
                total[0] += extra
                total[1] += max(0, extra_bytes)
                if extra >= MIN_PACKETS:
                    reason = REDIRECT_PEER
        short = any(moved >= MIN_PACKETS and ours < SHORTFALL * moved
                    for moved, ours in ((now.rx - before.rx, now.egress - before.egress),
                                        (now.tx - before.tx, now.ingress - before.ingress)))
        if short and not reason:
            reason = (self._explain(ifindex) if self._explain else "") or UNKNOWN
        return reason
