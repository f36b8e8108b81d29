"""What a pod's veth carried before our programs were on it.

A pod's first packets can pass before the daemon attaches: the CNI brings the veth up
and the pod may send at once (a gratuitous ARP, DNS, a client that starts in
milliseconds), while the daemon hears of the veth by a link event, waits out the burst
(--event-debounce) and makes a pass. Under churn beside 500 pods half the pods that sent
50 ms after their veth appeared were short by those packets. No program can count them
after the fact, but the veth's own statistics did: at the first look after the attach,
the statistics less what our programs counted since are the packets (and bytes) that
passed before, by direction. They are exported as podnet_packets_before_attach_total
and podnet_bytes_before_attach_total, so that for every pod

    podnet_packets_total (all protocols) + podnet_packets_before_attach_total
        = the host veth's own packet count, in each direction.

The two counts cannot be read at one instant, and packets in flight between the
statistics and our hook would make a baseline off by those packets, so the reads are
ordered to err one known way and repeated (READS times), keeping the best:

- what the pod sends (the host veth's rx): veth_xmit() counts it in the statistics,
  then our ingress program sees it. Reading our count first and the statistics after
  can only include a packet in flight in the statistics and not in ours: the difference
  is never too small; the smallest of the reads is taken.
- what the pod receives (the host veth's tx): our egress program sees it, then
  veth_xmit() counts it. Reading the statistics first and our count after errs the
  other way: the largest is taken.

A read during which no packet passed our programs (ours the same before and after the
statistics) is exact, and ends the reads; otherwise the best of READS is kept. At a pod's
start packets are seldom in flight, but a noisy one (ARP and MLD floods from pods being
made beside it) had one through each of three reads in a CI run: hence up to eight.
The baseline is taken once per attachment, keyed by (ifindex, netns): an ifindex reused
by another pod's veth starts afresh. A gone interface's baseline is kept for
FORGET_AFTER seconds: a scrape reads the identity snapshot it started with, which can
still hold the pod while the reconciler has already let it go (its series must not drop
to zero in that scrape's last moments).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from monitor import log
from monitor.identity import IdentityIndex
from monitor.kernel.records import VethCounts

READS = 8  # at most: the first quiet read ends them
FORGET_AFTER = 60.0  # seconds: far longer than any scrape holds its snapshot


# ifindex -> the veth's statistics now, None if it is gone
ReadVeth = Callable[[int], VethCounts | None]
# our counts by slot, (egress packets, egress bytes, ingress packets, ingress bytes), from
# the probe that provides them (Probe.interface_totals, bound to the maps)
SlotTotals = Callable[[list[int]], dict[int, tuple[int, int, int, int]]]


@dataclass(frozen=True)
class Baseline:
    egress_packets: int
    egress_bytes: int
    ingress_packets: int
    ingress_bytes: int


class BeforeAttach:
    """Baselines of attached veths: what passed before our programs were on them."""

    def __init__(self, totals: SlotTotals, snapshot: Callable[[], IdentityIndex],
                 read_veth: ReadVeth, clock: Callable[[], float] = time.monotonic) -> None:
        self._totals, self._snapshot, self._read_veth = totals, snapshot, read_veth
        self._clock = clock
        self._baselines: dict[tuple[int, int], Baseline] = {}  # (ifindex, netns) -> baseline
        self._gone_since: dict[tuple[int, int], float] = {}  # detached: kept a while
        self._log = log.get("unseen")

    def observe_new(self) -> None:
        """Take the baselines of interfaces attached since the last call (after every
        pass: the sooner after the attach, the fewer packets can be in flight)."""
        index = self._snapshot()
        live: dict[tuple[int, int], int] = {}  # (ifindex, netns) -> slot
        for pod in index.pods():
            for veth in pod.interfaces:
                slot = index.slot_of(veth.ifindex)
                if slot is not None:
                    live[(veth.ifindex, pod.netns_inode)] = slot
        now = self._clock()
        for key in set(self._baselines) - set(live):
            since = self._gone_since.setdefault(key, now)
            if now - since > FORGET_AFTER:  # no scrape can still hold its pod
                del self._baselines[key], self._gone_since[key]
        for key in set(self._gone_since) & set(live):
            del self._gone_since[key]  # attached again (re-attached by us): it stays
        for key, slot in live.items():
            if key not in self._baselines:
                baseline = self._measure(key[0], slot)
                if baseline is not None:
                    self._baselines[key] = baseline

    def _measure(self, ifindex: int, slot: int) -> Baseline | None:
        egress: list[tuple[int, int]] = []
        ingress: list[tuple[int, int]] = []
        for _ in range(READS):
            first = self._totals([slot]).get(slot)  # ours, then ...
            veth = self._read_veth(ifindex)  # ... the statistics, then ...
            then = self._totals([slot]).get(slot)  # ... ours again
            if first is None or veth is None or then is None:
                return None  # gone meanwhile, or not counting yet: the next pass retries
            egress.append((veth.rx_packets - first[0], veth.rx_bytes - first[1]))
            # our egress program sees what veth_xmit() then fails to hand to the pod (its
            # CPU's backlog full): the veth counts those in tx_dropped, not tx_packets
            ingress.append((veth.tx_packets + veth.tx_dropped - then[2],
                            veth.tx_bytes - then[3]))
            if first == then:
                break  # nothing passed our programs while the statistics were read: exact
        (out_packets, out_bytes), (in_packets, in_bytes) = min(egress), max(ingress)
        baseline = Baseline(max(0, out_packets), max(0, out_bytes), max(0, in_packets),
                            max(0, in_bytes))
        if baseline.egress_packets or baseline.ingress_packets:
            self._log.info("packets passed before the attach", ifindex=ifindex,
                           egress=baseline.egress_packets, ingress=baseline.ingress_packets)
        return baseline

    def by_pod(self, index: IdentityIndex) -> dict[tuple[str, str], Baseline]:
        """Each pod's baselines summed over its interfaces, by (namespace, pod), under the
        identity snapshot the rest of a scrape is read with."""
        out: dict[tuple[str, str], Baseline] = {}
        for pod in index.pods():
            total = [0, 0, 0, 0]
            for veth in pod.interfaces:
                found = self._baselines.get((veth.ifindex, pod.netns_inode))
                if found is not None:
                    for i, value in enumerate((found.egress_packets, found.egress_bytes,
                                               found.ingress_packets, found.ingress_bytes)):
                        total[i] += value
            key = (pod.namespace, pod.name)
            if key in out:  # a name shared (folded pods): their sums add
                prev = out[key]
                total = [a + b for a, b in zip(total, (prev.egress_packets, prev.egress_bytes,
                                                       prev.ingress_packets, prev.ingress_bytes),
                                               strict=True)]
            out[key] = Baseline(*total)
        return out
