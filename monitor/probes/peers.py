"""Who each pod talks to: packets and bytes by peer identity (bpf/peers.c).

The kernel counts by peer *address* in two epoch maps; the daemon drains the one no
program writes any more (at every scrape, and every `--peer-interval` so that the
maps do not fill between scrapes), turns addresses into identities (pod, service,
node, external, unknown; monitor/peers) and keeps, per pod interface and direction,
the top `--peer-top` identities as series of their own and the rest in `_other`
(monitor/topn.py): bounded, exact, never going down.

Exact across restarts too: what the daemon drained for each slot is recorded in a
pinned map with the epoch it came from. A restarted daemon's peer series start from
zero (the split by peer lived in the old daemon), and `_other` starts with what the
old one had drained, so the peer series of a pod still sum to its
podnet_packets_total and podnet_bytes_total.

This module declares the probe (its maps, settings and families) and binds it to a
PeerAccounts at start; the drain itself is monitor/probes/peeraccounts.py.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from monitor.exposition import Family
from monitor.probes.base import (
    NODE,
    PEER_RESOLVER,
    SNAPSHOT,
    MapLayout,
    Probe,
    Scrape,
    Setting,
    Start,
    within,
)
from monitor.probes.peeraccounts import (
    DRAINED,
    EPOCH,
    LAST,
    OUTER,
    PEERS,
    REST,
    Drained,
    Epoch,
    PeerAccounts,
    PeerCount,
    PeerKey,
    PeerLast,
    PeerOptions,
    PeerRest,
    families,
)


def describe() -> Iterator[Family]:
    yield from families()


PEER_INDEXES = ("auto", "cluster", "none")


def _cidrs(name: str, value: tuple[str, ...], _values: Mapping[str, Any]) -> list[str]:
    bad = []
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            bad.append(f"{name}: {cidr!r} is not a CIDR (10.244.0.0/16, fd00::/108)")
    return bad


def _peer_index(name: str, value: str, _values: Mapping[str, Any]) -> list[str]:
    if value in PEER_INDEXES:
        return []
    return [f"{name}: {value!r} is not one of {', '.join(PEER_INDEXES)}"]


SETTINGS = (
    Setting("peer_top", 10,
            "Peers (workloads, services, nodes) per pod and direction with series of their own "
            "in podnet_peer_*; the rest are summed under peer_kind=_other. Ten answers 'towards "
            "whom?' for almost every pod and keeps the series bounded; 0 puts every peer in "
            "_other.", within(0, 1000)),
    Setting("peer_ttl", 300.0,
            "Seconds a peer (or a failing DNS name) with a series of its own may be silent "
            "before its series goes (its count joins _other): long enough to outlast a scrape "
            "interval and a retry backoff, short enough that a pod's old peers do not hold "
            "its places.", within(1, 86400, " s")),
    Setting("peer_interval", 10.0,
            "Seconds between drains of the kernel's peer maps besides the scrapes (so they do "
            "not fill between scrapes); also the window peers are ranked over.",
            within(1, 600, " s")),
    Setting("cluster_cidrs", (),
            "The cluster's pod CIDRs (comma-separated, IPv4 and IPv6): a peer address inside "
            "them that no pod holds is `unknown` (a pod just gone) rather than `external`.",
            _cidrs),
    Setting("service_cidrs", (),
            "The cluster's service CIDRs: a peer address inside them that no Service holds is "
            "`unknown` rather than `external`.", _cidrs),
    Setting("peer_index", "auto",
            "Where peer identities come from beyond this node's own pods and addresses: "
            "cluster (a cluster-wide list+watch of pods and services: every node then pays "
            "the whole cluster's pod churn, see the README), none (this node only, the rest "
            "by CIDR), or auto: cluster when pod names come from the Kubernetes API.",
            _peer_index),
)


def _unstarted(_scrape: Scrape) -> Iterable[Family]:
    """Before start() there is no state to read: the families, empty."""
    return describe()


def start(probe: Probe, ctx: Start) -> Probe:
    """The probe bound to a PeerAccounts of this daemon's (state of its own)."""
    from monitor.peers.local import LocalAddresses

    values = ctx.settings
    options = PeerOptions(values["peer_top"], values["peer_ttl"], values["peer_interval"])
    accounts = PeerAccounts(ctx.maps, ctx.services[PEER_RESOLVER], options, slots=ctx.slots,
                            snapshot=ctx.services[SNAPSHOT],
                            local=LocalAddresses(ctx.services[NODE]))
    accounts.start(ctx.adopted)
    return replace(probe, collect=accounts.collect, sweep=accounts.sweep, forget=accounts.forget,
                   state=accounts)


PROBE = Probe(
    name="peers",
    summary="packets and bytes per pod by peer workload, service, node or external (TC)",
    c_file="peers.c",
    tc_hook="peers_tc",
    maps={EPOCH: MapLayout(ctypes.c_uint32, Epoch),
          OUTER: MapLayout(ctypes.c_uint32, ctypes.c_uint32),
          PEERS[0]: MapLayout(PeerKey, PeerCount), PEERS[1]: MapLayout(PeerKey, PeerCount),
          LAST: MapLayout(ctypes.c_uint32, PeerLast, per_slot=True, copies=2),
          REST: MapLayout(ctypes.c_uint32, PeerRest, per_slot=True, copies=2),
          DRAINED: MapLayout(ctypes.c_uint32, Drained, per_slot=True)},
    collect=_unstarted,
    describe=describe,
    cflags=lambda _k: ["-DPNM_WANT_PEER"],
    start=start,
    settings=SETTINGS,
    needs=(PEER_RESOLVER, SNAPSHOT, NODE),
)
