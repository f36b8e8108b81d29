"""TCP handshake latency and failed connection attempts, per pod and role (bpf/handshake.c)."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

from monitor.exposition import CounterFamily, Family
from monitor.kernel.maps import decode, word_slice, words
from monitor.probes.base import (
    HIST_BUCKETS,
    CounterSum,
    HistogramSum,
    MapLayout,
    Probe,
    Scrape,
    Setting,
    Sweep,
    sweep_pending,
    u32_key,
    within,
)

ROLES = ("client", "server")  # PNM_ROLE_* order
MAP, PENDING, TIMEOUTS = "pnm_handshake", "pnm_hs_pending", "pnm_hs_timeouts"


class Handshake(ctypes.Structure):
    """struct pnm_handshake."""

    _fields_ = [
        ("buckets", (ctypes.c_uint64 * HIST_BUCKETS) * len(ROLES)),
        ("sum_us", ctypes.c_uint64 * len(ROLES)),
        ("count", ctypes.c_uint64 * len(ROLES)),
        ("resets", ctypes.c_uint64 * len(ROLES)),
    ]


class Timeouts(ctypes.Structure):
    """struct pnm_hs_timeouts."""

    _fields_ = [("count", ctypes.c_uint64 * len(ROLES))]


class Flow(ctypes.Structure):
    """struct pnm_flow."""

    _fields_ = [("slot", ctypes.c_uint32), ("family", ctypes.c_uint8), ("role", ctypes.c_uint8),
                ("lport", ctypes.c_uint16), ("rport", ctypes.c_uint16), ("_pad", ctypes.c_uint16),
                ("laddr", ctypes.c_uint8 * 16), ("raddr", ctypes.c_uint8 * 16)]


def _families() -> tuple[CounterFamily, HistogramSum]:
    failures = CounterFamily(
        "podnet_tcp_connect_failures", "TCP connection attempts that failed: answered by "
        "RST (reason=reset) or not answered within the daemon's timeout (reason=timeout). "
        "role=client: the pod connected out; server: a peer connected to the pod.",
        ["namespace", "pod", "role", "reason"])
    return failures, HistogramSum()


BUCKETS, SUMS, RESETS = (word_slice(Handshake, f) for f in ("buckets", "sum_us", "resets"))


HIST_NAME = "podnet_tcp_handshake_seconds"
HIST_DOC = ("TCP handshake time on the pod's veth: client, from the pod's SYN to the "
            "peer's SYN-ACK; server, from the peer's SYN to the pod's SYN-ACK.")


def collect(scrape: Scrape) -> Iterator[Family]:
    failures, hist = _families()
    sums = CounterSum()
    for (namespace, pod), (raw, timeouts_raw) in scrape.read_slots(MAP, TIMEOUTS):
        if raw is None or timeouts_raw is None:
            continue
        hs, timeouts = words(Handshake, raw), words(Timeouts, timeouts_raw)
        buckets, sum_us, resets = hs[BUCKETS], hs[SUMS], hs[RESETS]
        for r, role in enumerate(ROLES):
            hist.add((namespace, pod, role), buckets[r * HIST_BUCKETS:(r + 1) * HIST_BUCKETS],
                     sum_us[r])
            sums.add((namespace, pod, role, "reset"), resets[r])
            sums.add((namespace, pod, role, "timeout"), timeouts[r])
    for labels, value in sums.items():
        failures.add(labels, value)
    yield hist.family(HIST_NAME, HIST_DOC, ["namespace", "pod", "role"])
    yield failures


def describe() -> Iterator[Family]:
    failures, hist = _families()
    yield hist.family(HIST_NAME, HIST_DOC, ["namespace", "pod", "role"])
    yield failures


TIMEOUT = Setting(
    "tcp_connect_timeout", 5.0,
    "Seconds a SYN may wait for its SYN-ACK before the attempt counts as failed "
    "(reason=timeout). 5 s is past Linux's first two SYN retransmits (1 s, 3 s).",
    within(0.1, 600, " s"))

# Linux gives up on a SYN after tcp_syn_retries (6): about 127 s.
SYN_RETRY_SPAN = 130.0


def sweep(ctx: Sweep) -> None:
    """Count SYNs left unanswered past the timeout, each attempt once."""
    expired: dict[tuple[int, int], int] = {}
    for key in sweep_pending(ctx, PENDING, ctx.settings[TIMEOUT.name], SYN_RETRY_SPAN):
        flow = decode(Flow, key)
        which = (flow.slot, flow.role & 1)
        expired[which] = expired.get(which, 0) + 1
    for (slot, role), n in expired.items():
        raw = ctx.maps.lookup(TIMEOUTS, u32_key(slot))
        if raw is None:
            continue
        timeouts = decode(Timeouts, raw)
        timeouts.count[role] += n
        ctx.maps.put(TIMEOUTS, u32_key(slot), bytes(timeouts))


PROBE = Probe(
    name="handshake",
    summary="TCP handshake latency and failed connection attempts per pod and role (TC)",
    c_file="handshake.c",
    tc_hook="handshake_tc",
    needs_ports=True,
    maps={MAP: MapLayout(ctypes.c_uint32, Handshake, per_slot=True),
          TIMEOUTS: MapLayout(ctypes.c_uint32, Timeouts, per_slot=True),
          PENDING: MapLayout(Flow, ctypes.c_uint64, slot_keyed=True)},
    collect=collect,
    describe=describe,
    sweep=sweep,
    settings=(TIMEOUT,),
)
