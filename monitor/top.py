"""`podnetmon top`: the node's pods live in a terminal, for when no Grafana is at hand.

It reads the daemon's /metrics twice per interval and shows rates and
percentiles from the differences, as Prometheus would: never the kernel.
Keys in a terminal: s cycles the sort column, q quits.
"""

from __future__ import annotations

import argparse
import select
import sys
import termios
import time
import tty
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from monitor import client

SORTS = ("bytes", "packets", "drops", "retrans", "handshake", "dns")


@dataclass
class PodSample:
    bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by direction
    packets: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    drops: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # by reason
    retransmits: float = 0.0
    handshake: dict[float, float] = field(default_factory=lambda: defaultdict(float))  # le -> n
    dns: dict[float, float] = field(default_factory=lambda: defaultdict(float))


Snapshot = dict[tuple[str, str], PodSample]


def parse(text: str) -> Snapshot:
    pods: Snapshot = defaultdict(PodSample)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if "namespace" not in labels or "pod" not in labels:
                continue
            pod = pods[(labels["namespace"], labels["pod"])]
            if s.name == "podnet_bytes_total":
                pod.bytes[labels["direction"]] += s.value
            elif s.name == "podnet_packets_total":
                pod.packets[labels["direction"]] += s.value
            elif s.name == "podnet_drops_total":
                pod.drops[labels["reason"]] += s.value
            elif s.name == "podnet_tcp_retransmits_total":
                pod.retransmits += s.value
            elif s.name == "podnet_tcp_handshake_seconds_bucket":
                pod.handshake[float(labels["le"])] += s.value
            elif s.name == "podnet_dns_latency_seconds_bucket":
                pod.dns[float(labels["le"])] += s.value
    return dict(pods)


def quantile(q: float, before: Mapping[float, float], after: Mapping[float, float]) -> float | None:
    """histogram_quantile over the bucket increases, with linear interpolation."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0)
        lower, below = bound, cumulative
    return None


@dataclass
class Row:
    pod: str
    rx_bps: float
    tx_bps: float
    rx_pps: float
    tx_pps: float
    drops: float
    top_reason: str
    retrans: float
    hs_p50: float | None
    hs_p90: float | None
    dns_p50: float | None
    dns_p90: float | None

    def key(self, sort: str) -> float:
        return {"bytes": self.rx_bps + self.tx_bps, "packets": self.rx_pps + self.tx_pps,
                "drops": self.drops, "retrans": self.retrans, "handshake": self.hs_p90 or 0,
                "dns": self.dns_p90 or 0}[sort]


def rows(before: Snapshot, after: Snapshot, seconds: float) -> list[Row]:
    out = []
    for key, now in after.items():
        then = before.get(key, PodSample())

        def rate(a: float, b: float) -> float:
            return max(0.0, (a - b) / seconds)

        drop_rates = {r: rate(v, then.drops.get(r, 0)) for r, v in now.drops.items()}
        top = max(drop_rates.items(), key=lambda kv: kv[1], default=("", 0.0))
        out.append(Row(
            f"{key[0]}/{key[1]}",
            rate(now.bytes["ingress"], then.bytes["ingress"]) * 8,
            rate(now.bytes["egress"], then.bytes["egress"]) * 8,
            rate(now.packets["ingress"], then.packets["ingress"]),
            rate(now.packets["egress"], then.packets["egress"]),
            sum(drop_rates.values()), top[0] if top[1] > 0 else "",
            rate(now.retransmits, then.retransmits),
            quantile(0.5, then.handshake, now.handshake), quantile(0.9, then.handshake, now.handshake),
            quantile(0.5, then.dns, now.dns), quantile(0.9, then.dns, now.dns)))
    return out


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"


def table(all_rows: list[Row], sort: str, limit: int) -> str:
    header = ("POD", "RX", "TX", "RX PKT/S", "TX PKT/S", "DROPS/S", "TOP DROP", "RETRANS/S",
              "HS P50", "HS P90", "DNS P50", "DNS P90")
    lines = [header]
    for r in sorted(all_rows, key=lambda r: r.key(sort), reverse=True)[:limit]:
        lines.append((r.pod, _si(r.rx_bps, "b/s"), _si(r.tx_bps, "b/s"), f"{r.rx_pps:.1f}",
                      f"{r.tx_pps:.1f}", f"{r.drops:.1f}", r.top_reason or "-", f"{r.retrans:.1f}",
                      _ms(r.hs_p50), _ms(r.hs_p90), _ms(r.dns_p50), _ms(r.dns_p90)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


PeerKey = tuple[str, str, str, str]  # direction, peer_kind, peer_namespace, peer_workload
PeerSnapshot = dict[PeerKey, list[float]]  # [packets, bytes]


def parse_peers(text: str, namespace: str, pod: str) -> PeerSnapshot:
    """One pod's podnet_peer_* series."""
    out: PeerSnapshot = defaultdict(lambda: [0.0, 0.0])
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            i = {"podnet_peer_packets_total": 0, "podnet_peer_bytes_total": 1}.get(s.name)
            labels = s.labels
            if i is None or (labels.get("namespace"), labels.get("pod")) != (namespace, pod):
                continue
            out[(labels["direction"], labels["peer_kind"], labels["peer_namespace"],
                 labels["peer_workload"])][i] += s.value
    return dict(out)


def peer_table(before: PeerSnapshot, after: PeerSnapshot, seconds: float, limit: int) -> str:
    """The pod's peers by bytes per second, both directions, as `podnetmon top --peers`."""
    found = []
    for key, (packets, nbytes) in after.items():
        then = before.get(key, [0.0, 0.0])
        found.append((max(0.0, (nbytes - then[1]) / seconds) * 8,
                      max(0.0, (packets - then[0]) / seconds), key))
    header = ("DIRECTION", "PEER KIND", "PEER NAMESPACE", "PEER WORKLOAD", "RATE", "PKT/S")
    lines = [header]
    for bps, pps, (direction, kind, namespace, workload) in sorted(
            found, key=lambda f: (-f[0], f[2]))[:limit]:
        lines.append((direction, kind, namespace or "-", workload or "-", _si(bps, "b/s"),
                      f"{pps:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def fetch_text(daemon: client.Daemon) -> str:
    try:
        with daemon.open("/metrics", timeout=10) as resp:
            return str(resp.read().decode())
    except OSError as exc:  # the answer broke off after it began
        raise client.ClientError(f"{daemon.url}/metrics: {exc}") from None


def fetch(daemon: client.Daemon) -> Snapshot:
    return parse(fetch_text(daemon))


class _Pods:
    """The node's pods, one row each (the default view)."""

    def __init__(self, sort: str, limit: int) -> None:
        self.sort, self.limit = sort, limit

    def parse(self, text: str) -> object:
        return parse(text)

    def table(self, before: object, after: object, seconds: float) -> str:
        return table(rows(before, after, seconds), self.sort, self.limit)  # type: ignore[arg-type]

    def title(self) -> str:
        return f"sorted by {self.sort}  (s: sort, q: quit)"

    def key(self, key: str) -> None:
        if key == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]


class _Peers:
    """One pod's peers, one row each (--peers NAMESPACE/POD)."""

    def __init__(self, target: str, limit: int) -> None:
        namespace, sep, pod = target.partition("/")
        if not sep or not namespace or not pod:
            raise client.ClientError(f"--peers {target!r}: give NAMESPACE/POD")
        self.namespace, self.pod, self.limit = namespace, pod, limit

    def parse(self, text: str) -> object:
        return parse_peers(text, self.namespace, self.pod)

    def table(self, before: object, after: object, seconds: float) -> str:
        if not after:
            return (f"no peer series for {self.namespace}/{self.pod} (not on this node, or "
                    "the peers probe is off)")
        return peer_table(before, after, seconds, self.limit)  # type: ignore[arg-type]

    def title(self) -> str:
        return f"peers of {self.namespace}/{self.pod}  (q: quit)"

    def key(self, key: str) -> None:
        return None


def main(args: argparse.Namespace) -> int:
    try:
        view: _Pods | _Peers = (_Peers(args.peers, args.rows) if getattr(args, "peers", None)
                                else _Pods(args.sort, args.rows))
        daemon = client.from_args(args)
        before, t0 = view.parse(fetch_text(daemon)), time.monotonic()
    except client.ClientError as exc:
        print(f"podnetmon top: {exc}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not args.once
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setcbreak(sys.stdin.fileno())
        while True:
            deadline = time.monotonic() + args.interval
            while interactive and (left := deadline - time.monotonic()) > 0:
                if select.select([sys.stdin], [], [], left)[0]:
                    key = sys.stdin.read(1)
                    if key == "q":
                        return 0
                    view.key(key)
                    if key == "s":
                        break
            if not interactive:
                time.sleep(max(0.0, deadline - time.monotonic()))
            try:
                after, t1 = view.parse(fetch_text(daemon)), time.monotonic()
            except client.ClientError as exc:
                print(f"podnetmon top: {exc}", file=sys.stderr)
                return 1
            text = view.table(before, after, t1 - t0)
            if interactive:
                print("\x1b[H\x1b[2J", end="")
                print(f"podnetmon top  {daemon.url}  {view.title()}")
            print(text, flush=True)
            if args.once:
                return 0
            before, t0 = after, t1
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
