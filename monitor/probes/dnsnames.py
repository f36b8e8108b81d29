"""Which DNS names fail, per pod (bpf/dnsnames.c): podnet_dns_name_failures_total.

The kernel counts failing answers by (interface, RCODE, question name), cumulatively,
in a bounded map (a full map's failures count in the interface's rest, so nothing
is lost); the daemon's sweep counts queries left unanswered past --dns-timeout, by
name, marking each so that it counts once. Each scrape turns the kernel's counts
into deltas and keeps, per pod, the top --dns-top names as series of their own and
the rest under qname="_other" (monitor/topn.py): bounded, never going down, and
summing per RCODE to what the pod's failing answers and timeouts are since the
daemon started (the names' split lives in the daemon, so a restart starts them anew).
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from monitor.exposition import CounterFamily, Family
from monitor.kernel import syscalls
from monitor.probes.base import (
    TIMED_OUT,
    MapLayout,
    MapWriter,
    Probe,
    Scrape,
    Setting,
    Start,
    Sweep,
    within,
)
from monitor.probes.dns import RETRY_SPAN, rcode_name
from monitor.topn import TopSeries

PENDING, FAILURES, REST = "pnm_dnsn_pending", "pnm_dnsn_failures", "pnm_dnsn_rest"
SCRATCH = "pnm_dnsn_scratch"
NAME = 64  # bpf/dnsnames.c PNM_DNS_NAME: at most 63 characters of a name are kept
TIMEOUT = 0  # index of timeouts in a name's counts; RCODE r (1..15) is index r
OTHER = "_other"
LABELS = ["namespace", "pod", "qname", "rcode"]


class Query(ctypes.Structure):
    """struct pnm_dnsn_key."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("family", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8), ("id", ctypes.c_uint16), ("lport", ctypes.c_uint16),
                ("rport", ctypes.c_uint16), ("laddr", ctypes.c_uint8 * 16),
                ("raddr", ctypes.c_uint8 * 16)]


class Pending(ctypes.Structure):
    """struct pnm_dnsn_query."""

    _fields_ = [("ts", ctypes.c_uint64), ("name", ctypes.c_char * NAME)]


class Failure(ctypes.Structure):
    """struct pnm_dnsn_failure."""

    _fields_ = [("ifindex", ctypes.c_uint32), ("rcode", ctypes.c_uint32),
                ("name", ctypes.c_char * NAME)]


class Scratch(ctypes.Structure):
    """struct pnm_dnsn_query as the per-CPU scratch map holds it: u64 words only."""

    _fields_ = [("words", ctypes.c_uint64 * (1 + NAME // 8))]


class Rest(ctypes.Structure):
    """struct pnm_dnsn_rest."""

    _fields_ = [("rcodes", ctypes.c_uint64 * 16)]


_FAILURE = struct.Struct(f"=II{NAME}s")
_PENDING = struct.Struct(f"=Q{NAME}s")


MAX_NAME = NAME - 1  # characters of a name kept: a longer one is cut (and ends in "~")


def name_of(question: bytes) -> str:
    """The question name in the first bytes of a DNS question, as the kernel copied them.

    Wire format: labels, each a length byte (1..63) and that many bytes, up to a zero
    byte. Lower-cased (names are case-insensitive, and a resolver may randomise case);
    cut at MAX_NAME characters, marked with a final "~"; a length over 63 (a pointer,
    which a question never holds, or garbage) ends the name where it is, and bytes that
    run out (the kernel copies NAME bytes of the question) end it inside its last label,
    both also marked "~". Bytes that are not UTF-8 show as U+FFFD. Never raises.
    """
    labels: list[bytes] = []
    i, whole = 0, False
    while i < len(question):
        n = question[i]
        if n == 0:
            whole = True
            break
        if n > 63:
            break
        label = question[i + 1:i + 1 + n]
        # cut short by the packet's end (the kernel zero-fills its copy past it) or by the
        # copy's own end: what is there, marked cut
        cut = label.find(b"\0")
        if cut >= 0 or i + 1 + n > len(question):
            labels.append(label[:cut] if cut >= 0 else label)
            break
        labels.append(label)
        i += 1 + n
    text = b".".join(labels).lower().decode("utf-8", errors="replace")
    if not labels:
        return "." if whole else "~"
    if len(text) > MAX_NAME or not whole:
        return text[:MAX_NAME - 1] + "~"
    return text


def _families() -> tuple[CounterFamily]:
    return (CounterFamily(
        "podnet_dns_name_failures", "DNS queries of the pod that failed, by the name asked "
        "for (its top --dns-top names; the rest under qname=\"_other\") and RCODE "
        "(NXDOMAIN, SERVFAIL, ...) or rcode=\"timeout\" (no answer within --dns-timeout).",
        LABELS),)


def describe() -> Iterator[Family]:
    yield from _families()


TOP = Setting(
    "dns_top", 10,
    "Failing DNS names per pod with series of their own in podnet_dns_name_failures; "
    "the rest are summed under qname=_other. A pod that fails on more than ten names "
    "at once has one problem the first ten show.",
    within(0, 1000))


@dataclass(frozen=True)
class NameOptions:
    """The settings that shape the series (from monitor.settings)."""

    top: int = 10
    ttl: float = 3600.0
    timeout: float = 5.0


class NameAccounts:
    """The kernel's failure counts turned into bounded series; one per daemon."""

    def __init__(self, maps: Any, options: NameOptions, *,
                 slots: Callable[[], Mapping[int, int]],
                 clock: Callable[[], float] = time.monotonic,
                 now_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._maps, self._options, self._slots = maps, options, slots
        self._clock, self._now_ns = clock, now_ns
        # width 16: index 0 the timeouts, index r the RCODE r (0 never fails)
        self._series = TopSeries(top=options.top, ttl=options.ttl, width=16)
        self._seen: dict[bytes, int] = {}  # failure key -> the kernel's count at the last read
        self._rest_seen: dict[int, list[int]] = {}  # ifindex -> its rest at the last read
        self._lock = threading.Lock()

    def start(self, adopted: bool) -> None:
        """Counts the last daemon left are its: this one's series begin from them."""
        if adopted:
            with self._lock:
                self._read(baseline=True)

    def _read(self, *, baseline: bool = False) -> None:
        """The kernel's counts since the last read, into the series (lock held)."""
        failures = self._maps.handle(FAILURES)
        items = syscalls.batch_items(failures.fd, failures.key_size, failures.raw_value_size)
        attached = self._slots()
        deltas: dict[int, dict[str, list[int]]] = {}
        seen = {}
        for raw_key, raw_value in items:
            ifindex, rcode, name = _FAILURE.unpack(raw_key)
            count = struct.unpack("=Q", raw_value)[0]
            seen[raw_key] = count
            delta = count - self._seen.get(raw_key, 0)
            if delta <= 0 or ifindex not in attached or not 0 < rcode < 16:
                continue
            per_name = deltas.setdefault(ifindex, {})
            values = per_name.setdefault(name_of(name), [0] * 16)
            values[rcode] += delta
        self._seen = seen
        rest = self._maps.handle(REST)
        slots = sorted(attached.values())
        slot_if = {slot: ifindex for ifindex, slot in attached.items()}
        for slot, raw in zip(slots, rest.lookup_slots(slots), strict=True):
            if raw is None:
                continue
            ifindex = slot_if[slot]
            counts = list(Rest.from_buffer_copy(raw).rcodes)
            before = self._rest_seen.get(ifindex, [0] * 16)
            self._rest_seen[ifindex] = counts
            more = [max(0, a - b) for a, b in zip(counts, before, strict=True)]
            if any(more) and not baseline:
                self._series.add_other(ifindex, more)
        if baseline:
            return  # what happened before this daemon: its split is unknown, not counted anew
        now = self._clock()
        owners = {*deltas, *(cast(int, o) for o in self._series.owners())}
        for ifindex in owners & set(attached):  # quiet ones too: their idle names expire
            self._series.add(ifindex, deltas.get(ifindex, {}), now)

    def sweep(self, ctx: Sweep) -> None:
        """Queries unanswered past the timeout count once under their name."""
        pending = self._maps.handle(PENDING)
        timeout, now = self._options.timeout, ctx.now_ns
        expired: dict[int, dict[str, list[int]]] = {}
        items = syscalls.batch_items(pending.fd, pending.key_size, pending.raw_value_size)
        for raw_key, raw_value in items:
            ts, name = _PENDING.unpack(raw_value)
            age = (now - (ts & ~TIMED_OUT)) / 1e9
            if ts & TIMED_OUT:
                if age > timeout + RETRY_SPAN:
                    pending.delete(raw_key)
            elif age > timeout and pending.replace(raw_key, _PENDING.pack(ts | TIMED_OUT, name)):
                ifindex = struct.unpack_from("=I", raw_key)[0]
                values = expired.setdefault(ifindex, {}).setdefault(name_of(name), [0] * 16)
                values[TIMEOUT] += 1
        with self._lock:
            attached = self._slots()
            at = self._clock()
            for ifindex, names in expired.items():
                if ifindex in attached:
                    self._series.add(ifindex, names, at)

    def forget(self, maps: MapWriter, _netns: int | None, ifindexes: Sequence[int]) -> None:
        """A gone interface's names: its keys in the kernel, and its series."""
        gone = set(ifindexes)
        with self._lock:
            failures = self._maps.handle(FAILURES)
            keys = [k for k, _v in syscalls.batch_items(failures.fd, failures.key_size,
                                                            failures.raw_value_size)
                    if struct.unpack_from("=I", k)[0] in gone]
            if keys:
                syscalls.map_delete_batch(failures.fd, keys)
            for k in keys:
                self._seen.pop(k, None)
            for ifindex in gone:
                self._series.forget(ifindex)
                self._rest_seen.pop(ifindex, None)

    def collect(self, scrape: Scrape) -> Iterator[Family]:
        (failures,) = _families()
        totals: dict[tuple[str, str, str, str], int] = {}
        with self._lock:
            self._read()
            for owner in self._series.owners():
                pod = scrape.index.by_ifindex(cast(int, owner))
                if pod is None:
                    continue
                for key, values in self._series.series(owner):
                    qname = key if isinstance(key, str) else OTHER
                    for code, n in enumerate(values):
                        if n:
                            rcode = "timeout" if code == TIMEOUT else rcode_name(code)
                            labels = (pod.namespace, pod.name, qname, rcode)
                            totals[labels] = totals.get(labels, 0) + n
        for labels, n in sorted(totals.items()):
            failures.add(labels, n)
        yield failures


def _unstarted(_scrape: Scrape) -> Iterable[Family]:
    """Before start() there is no state to read: the family, empty."""
    return describe()


def start(probe: Probe, ctx: Start) -> Probe:
    values = ctx.settings  # the failing names expire as peers do, time out as queries do
    options = NameOptions(values[TOP.name], values["peer_ttl"], values["dns_timeout"])
    accounts = NameAccounts(ctx.maps, options, slots=ctx.slots)
    accounts.start(ctx.adopted)
    return replace(probe, collect=accounts.collect, sweep=accounts.sweep,
                   forget=accounts.forget, state=accounts)


PROBE = Probe(
    name="dnsnames",
    summary="which DNS names fail per pod: NXDOMAIN, SERVFAIL, ... and timeouts (TC, UDP 53)",
    c_file="dnsnames.c",
    tc_hook="dnsnames_tc",
    needs_ports=True,
    maps={PENDING: MapLayout(Query, Pending), FAILURES: MapLayout(Failure, ctypes.c_uint64),
          REST: MapLayout(ctypes.c_uint32, Rest, per_slot=True),
          SCRATCH: MapLayout(ctypes.c_uint32, Scratch)},
    collect=_unstarted,
    describe=describe,
    start=start,
    settings=(TOP,),
)
