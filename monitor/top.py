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


def fetch(daemon: client.Daemon) -> Snapshot:
    try:
        with daemon.open("/metrics", timeout=10) as resp:
            return parse(resp.read().decode())
    except OSError as exc:  # the answer broke off after it began
        raise client.ClientError(f"{daemon.url}/metrics: {exc}") from None


def main(args: argparse.Namespace) -> int:
    try:
        daemon = client.from_args(args)
        before, t0 = fetch(daemon), time.monotonic()
    except client.ClientError as exc:
        print(f"podnetmon top: {exc}", file=sys.stderr)
        return 1
    sort = args.sort
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
                    if key == "s":
                        sort = SORTS[(SORTS.index(sort) + 1) % len(SORTS)]
                        break
            if not interactive:
                time.sleep(max(0.0, deadline - time.monotonic()))
            try:
                after, t1 = fetch(daemon), time.monotonic()
            except client.ClientError as exc:
                print(f"podnetmon top: {exc}", file=sys.stderr)
                return 1
            text = table(rows(before, after, t1 - t0), sort, args.rows)
            if interactive:
                print("\x1b[H\x1b[2J", end="")
                print(f"podnetmon top  {daemon.url}  sorted by {sort}  (s: sort, q: quit)")
            print(text, flush=True)
            if args.once:
                return 0
            before, t0 = after, t1
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
