"""DNS over UDP port 53 as the pod's resolver sees it (bpf/dns.c)."""

from __future__ import annotations

import ctypes
import struct
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

MAP, PENDING, TIMEOUTS = "pnm_dns", "pnm_dns_pending", "pnm_dns_timeouts"
# RFC 1035 and RFC 6895 names of the 4-bit RCODE; the rest by number.
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
          5: "REFUSED", 6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE"}


class Dns(ctypes.Structure):
    """struct pnm_dns."""

    _fields_ = [("buckets", ctypes.c_uint64 * HIST_BUCKETS), ("sum_us", ctypes.c_uint64),
                ("count", ctypes.c_uint64), ("queries", ctypes.c_uint64),
                ("rcodes", ctypes.c_uint64 * 16)]


class Query(ctypes.Structure):
    """struct pnm_dns_key."""

    _fields_ = [("slot", ctypes.c_uint32), ("family", ctypes.c_uint8), ("_pad", ctypes.c_uint8),
                ("id", ctypes.c_uint16), ("lport", ctypes.c_uint16), ("rport", ctypes.c_uint16),
                ("laddr", ctypes.c_uint8 * 16), ("raddr", ctypes.c_uint8 * 16)]


def rcode_name(value: int) -> str:
    return RCODES.get(value, f"RCODE{value}")


HIST = ("podnet_dns_latency_seconds", "Time from a DNS query the pod sent to the answer "
        "it received, on its veth.")


def _families() -> tuple[CounterFamily, CounterFamily, CounterFamily]:
    labels = ["namespace", "pod"]
    return (
        CounterFamily("podnet_dns_responses", "DNS answers the pod received to its "
                      "queries, by RCODE.", [*labels, "rcode"]),
        CounterFamily("podnet_dns_queries", "DNS queries the pod sent over UDP.", labels),
        CounterFamily("podnet_dns_timeouts", "DNS queries the pod sent that had no "
                      "answer within the daemon's timeout.", labels),
    )


BUCKETS, RCODE_COUNTS = word_slice(Dns, "buckets"), word_slice(Dns, "rcodes")
SUM, QUERIES = Dns.sum_us.offset // 8, Dns.queries.offset // 8


def collect(scrape: Scrape) -> Iterator[Family]:
    responses, queries, timeouts = _families()
    hist, rcodes, sent, lost = HistogramSum(), CounterSum(), CounterSum(), CounterSum()
    for (namespace, pod), (raw, timeouts_raw) in scrape.read_slots(MAP, TIMEOUTS):
        if raw is None or timeouts_raw is None:
            continue
        dns = words(Dns, raw)
        hist.add((namespace, pod), dns[BUCKETS], dns[SUM])
        sent.add((namespace, pod), dns[QUERIES])
        lost.add((namespace, pod), struct.unpack("=Q", timeouts_raw)[0])
        for code, n in enumerate(dns[RCODE_COUNTS]):
            if n or code in (0, 2, 3):  # the usual three always, so rate() has a baseline
                rcodes.add((namespace, pod, rcode_name(code)), n)
    for family, sums in ((responses, rcodes), (queries, sent), (timeouts, lost)):
        for labels, value in sums.items():
            family.add(labels, value)
    yield hist.family(*HIST, ["namespace", "pod"])
    yield from (responses, queries, timeouts)


def describe() -> Iterator[Family]:
    yield HistogramSum().family(*HIST, ["namespace", "pod"])
    yield from _families()


TIMEOUT = Setting(
    "dns_timeout", 5.0,
    "Seconds a DNS query may wait for its answer before it counts as a timeout; glibc's "
    "resolver gives up on a server after 5 s by default.",
    within(0.1, 600, " s"))

# A resolver's retries of one query (glibc: attempts x timeout) end well within this.
RETRY_SPAN = 60.0


def sweep(ctx: Sweep) -> None:
    """Count queries left unanswered past the timeout, each once."""
    expired: dict[int, int] = {}
    for key in sweep_pending(ctx, PENDING, ctx.settings[TIMEOUT.name], RETRY_SPAN):
        slot = decode(Query, key).slot
        expired[slot] = expired.get(slot, 0) + 1
    for slot, n in expired.items():
        raw = ctx.maps.lookup(TIMEOUTS, u32_key(slot))
        if raw is not None:
            total = struct.unpack("=Q", raw)[0] + n
            ctx.maps.put(TIMEOUTS, u32_key(slot), struct.pack("=Q", total))


PROBE = Probe(
    name="dns",
    summary="DNS latency, answers by RCODE, queries and timeouts per pod (TC, UDP port 53)",
    c_file="dns.c",
    tc_hook="dns_tc",
    needs_ports=True,
    maps={MAP: MapLayout(ctypes.c_uint32, Dns, per_slot=True),
          TIMEOUTS: MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_slot=True),
          PENDING: MapLayout(Query, ctypes.c_uint64, slot_keyed=True)},
    collect=collect,
    describe=describe,
    sweep=sweep,
    settings=(TIMEOUT,),
)
