"""500 pods on one node: start-up, scrape, memory, idle CPU, and new pods under churn.

One run, one daemon (every probe on), measured from outside the daemon where
there is an outside: attachments are counted with `bpftool net`, memory and
CPU read from /proc/<pid>, scrapes timed by the client. The start-up time comes
from the daemon's own log (from "bpf programs loaded" to "ready"), as nothing
outside can see the compile finish.

Churn (issue 15): the kernel is the oracle for every churned pod. Just before a pod
goes, its host veth's own statistics are read, then a scrape, then the statistics
again, until the two reads agree (podnetlab.churn.observer): the packets the daemon
counted plus those it reports as before the attach must equal what the veth carried.
One `pod` line per churned pod gives the wire and counted packets by direction, the
before-attach packets, the drops by reason, when the daemon attached and detached (from
its own log) and a verdict: exact (equal, read at rest), consistent (within the two
reads: packets crossed during the scrape), MISSED or OVER (outside them), unread. So a
miss names its cause: a late attach, a drop, a pod never seen. By default churned pods
are noisy (ARP resolution, IPv6 with its MLD reports, ICMP back from the peer);
--quiet-pods makes them quiet (no IPv6, the peer a permanent neighbour listening on
the port), so their veths carry only their own datagrams.

Goals (issue 7): all attached within 10 s of the programs being loaded; a scrape
within 250 ms; resident memory within 150 MiB; idle CPU within 1% of a core with a
scrape every 15 s; a new pod counted within 1 s (p99) under 20 pods/s of churn.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RunningDaemon, lab_pods, machine, median, percentile, run_in, running_daemon, stamp
from podnetlab.churn import SINK_PORT, UDP_SINK, Churn, ChurnPod, Wire, observer
from podnetlab.lab import LabPod
from podnetlab.netsetup import Quiet

DIRECTIONS = ("egress", "ingress")
VERDICTS = ("exact", "consistent", "MISSED", "OVER", "unread")


def attached_by_bpftool(prefix: str = "pnml") -> int:
    """Lab veths carrying our programs on both hooks, as bpftool lists them."""
    out = json.loads(subprocess.run(["bpftool", "-j", "net", "show"], capture_output=True,
                                    text=True, check=True).stdout)
    hooks: dict[str, set[str]] = {}
    for section in out:
        for key in ("tc",):  # bpftool 7.1 lists classic filters only (the daemon's default)
            for entry in section.get(key, []):
                name = str(entry.get("devname", ""))
                if name.startswith(prefix) and entry.get("name") == "podnetmon":  # the filter's
                    hooks.setdefault(name, set()).add(str(entry.get("kind", "")))
    return sum(1 for kinds in hooks.values() if len(kinds) >= 2)


@contextmanager
def quiet_peer(peer: LabPod, wanted: bool) -> Iterator[Quiet | None]:
    """What makes churned pods quiet, or None (noisy pods) when not `wanted`: the peer
    listens on the churn's port (no ICMP back) and is their permanent neighbour (no ARP)."""
    if not wanted:
        yield None
        return
    mac = str(json.loads(run_in(peer, "ip", "-j", "link", "show", "eth0"))[0]["address"])
    sink = subprocess.Popen([*peer.exec_prefix(), sys.executable, "-c", UDP_SINK, str(SINK_PORT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout is None or sink.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the UDP sink in {peer.name} did not start")
        yield Quiet({peer.ip: mac})
    finally:
        sink.terminate()
        sink.wait(timeout=10)


def veth_dropped(name: str) -> Wire | None:
    """What a host veth itself dropped: from the pod (its rx_dropped), to the pod (its
    tx_dropped, e.g. the pod's backlog full). Packets our hooks saw but the veth's packet
    counts do not hold: the kernel's word on a pod counted over its wire."""
    stats = Path("/sys/class/net") / name / "statistics"
    try:
        return Wire(int((stats / "rx_dropped").read_text()), int((stats / "tx_dropped").read_text()))
    except OSError:
        return None  # already gone


class ChurnWatch:
    """The churn's `count`: podnetlab.churn.observer's reads of the monitor and each veth,
    then the veth's own drop counters (still at rest, the pod not yet deleted); and how
    long the bench spent reading, as the churn neither makes pods nor sends meanwhile."""

    def __init__(self, scrape: Callable[[], str]) -> None:
        self._scrape = scrape
        self._observe = observer(self._counted_scrape)
        self.dropped: dict[tuple[str, int], Wire | None] = {}  # (host veth, netns) -> drops
        self.turns = self.scrapes = 0
        self.seconds = 0.0

    def _counted_scrape(self) -> str:
        self.scrapes += 1
        return self._scrape()

    def __call__(self, finished: list[ChurnPod]) -> None:
        started = time.monotonic()
        self._observe(finished)
        for cp in finished:
            self.dropped[cp.pod.host_veth, cp.pod.netns] = veth_dropped(cp.pod.host_veth)
        self.turns += 1
        self.seconds += time.monotonic() - started


@dataclass(frozen=True)
class LogEvent:
    """One of the daemon's per-interface log lines, on the bench's monotonic clock."""

    interface: str
    netns: int | None  # None if the line does not name it
    at: float


def interface_events(daemon: RunningDaemon, name: str, to_monotonic: float) -> dict[str, list[LogEvent]]:
    """The daemon's `name` events ("attached", "detached") by interface, in log order. Its
    stamps are wall-clock; less `to_monotonic` (time.time() - time.monotonic(), taken
    once) they compare with the churn's monotonic times."""
    out: dict[str, list[LogEvent]] = {}
    for event in daemon.events(name):
        netns = event.get("netns")
        interface = str(event.get("interface", ""))
        out.setdefault(interface, []).append(
            LogEvent(interface, netns if isinstance(netns, int) else None, stamp(event) - to_monotonic))
    return out


# The log's stamps are to the microsecond and the clock offset is read once: an event a
# hair before the moment it follows is the same moment.
CLOCK_SLACK = 0.001


def first_event(cp: ChurnPod, events: dict[str, list[LogEvent]], after: float) -> float | None:
    """When the first event for this pod's veth came, at or after `after`. Matched by the
    veth's name and, where the log gives it, the netns inode: the lab reuses names (and the
    kernel inodes), the pair is this pod's."""
    for event in events.get(cp.pod.host_veth, []):
        if event.netns not in (None, cp.pod.netns):
            continue
        if event.at >= after - CLOCK_SLACK:
            return event.at
    return None


def detached_events(daemon: RunningDaemon, pods: Sequence[ChurnPod], to_monotonic: float,
                    timeout: float = 5.0) -> dict[str, list[LogEvent]]:
    """The "detached" events once every churned veth has one or `timeout` passed: the daemon
    detaches when a pass finds the veth gone, a little after the last pod was deleted."""
    deadline = time.monotonic() + timeout
    while True:
        events = interface_events(daemon, "detached", to_monotonic)
        if time.monotonic() > deadline or all(
                first_event(cp, events, cp.created) is not None for cp in pods):
            return events
        time.sleep(0.2)


def verdict(cp: ChurnPod) -> str:
    """How the daemon's account of a pod compares with its veth's statistics."""
    if cp.seen is None or cp.wire is None or cp.wire_before is None:
        return "unread"
    if cp.exact():
        return "exact"
    if cp.consistent():
        return "consistent"  # right within the two reads, but packets crossed during the scrape
    if any(cp.told(d) < getattr(cp.wire_before, d) for d in DIRECTIONS):
        return "MISSED"
    return "OVER"


def both(values: dict[str, int] | Wire | None) -> str:
    """egress/ingress of a pair of counts, "-" if unknown."""
    if values is None:
        return "-"
    if isinstance(values, Wire):
        return f"{values.egress}/{values.ingress}"
    return f"{values['egress']}/{values['ingress']}"


def after_ms(moment: float | None, since: float | None) -> str:
    """Milliseconds from `since` to `moment`, "-" if either is unknown."""
    return "-" if moment is None or since is None else f"{(moment - since) * 1000:.0f} ms"


def pod_line(cp: ChurnPod, attached: float | None, detached: float | None,
             veth_drops: Wire | None) -> str:
    """One churned pod, the kernel's figures beside the daemon's and when it watched."""
    wire = both(cp.wire) if cp.wire == cp.wire_before else f"{both(cp.wire_before)}..{both(cp.wire)}"
    seen = cp.seen
    drops = ", ".join(f"{r} {n}" for r, n in sorted(seen.drops.items()) if n) if seen else ""
    last_sent = cp.sent[-1] if cp.sent else None
    return (f"pod {cp.pod.name} {cp.pod.host_veth}: made in {after_ms(cp.ready, cp.created)}, "
            f"attached {after_ms(attached, cp.created)} after creation, detached "
            f"{after_ms(detached, last_sent)} after its last datagram; egress/ingress: wire {wire}, "
            f"counted {both(seen.packets if seen else None)}, before attach "
            f"{both(seen.before_attach if seen else None)}, veth dropped {both(veth_drops)}; "
            f"drops {drops or 'none'}; sent {len(cp.sent)}: {verdict(cp)}")


def spread_ms(values: Sequence[float]) -> str:
    """p50, p99 and max of durations in seconds, in ms."""
    if not values:
        return "none"
    return (f"p50 {percentile(values, 0.5) * 1000:.0f} ms, p99 {percentile(values, 0.99) * 1000:.0f} "
            f"ms, max {max(values) * 1000:.0f} ms")


def report_churn(daemon: RunningDaemon, pods: Sequence[ChurnPod], watch: ChurnWatch,
                 to_monotonic: float) -> str:
    """Prints a line per churned pod; returns the summary's figures on them."""
    attached_log = interface_events(daemon, "attached", to_monotonic)
    detached_log = detached_events(daemon, pods, to_monotonic)
    verdicts: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    to_count, to_attach, early, dropping, never, over = [], [], 0, 0, 0, 0
    made = [cp.ready - cp.created for cp in pods]
    for cp in pods:
        attached = first_event(cp, attached_log, cp.created)
        detached = first_event(cp, detached_log, attached if attached is not None else cp.created)
        print(pod_line(cp, attached, detached, watch.dropped.get((cp.pod.host_veth, cp.pod.netns))),
              flush=True)
        verdicts[verdict(cp)] += 1
        if attached is not None:
            to_attach.append(attached - cp.created)
        first = cp.first_counted()
        if first is None:
            never += 1
        else:
            to_count.append(first - cp.created)
        over += (cp.counted or 0) > len(cp.sent)
        if cp.seen is not None:
            early += any(cp.seen.before_attach.values())
            dropping += any(cp.seen.drops.values())
            drops.update(cp.seen.drops)
    by_reason = ", ".join(f"{r} {n}" for r, n in drops.most_common() if n) or "none"
    return (f"first datagram counted after {spread_ms(to_count)} (goal p99 1 s); attached after "
            f"{spread_ms(to_attach)} ({len(pods) - len(to_attach)} never); never counted: {never}; "
            f"over-counted: {over}; verdicts: " + ", ".join(f"{v} {verdicts[v]}" for v in VERDICTS)
            + f"; before-attach packets in {early} pods; drops in {dropping} pods ({by_reason})"
            + f"; the lab made each pod in {spread_ms(made)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=120)
    parser.add_argument("--churn-seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20, help="pods created (and deleted) per s")
    parser.add_argument("--lifetime", type=float, default=2.0)
    parser.add_argument("--daemon-arg", action="append", default=[],
                        help="an argument for `podnetmon run` (repeat it), e.g. "
                             "--daemon-arg=--tcx-move-after=1")
    parser.add_argument("--quiet-pods", action="store_true",
                        help="churned pods send nothing but their datagrams (no ARP, no IPv6, "
                             "no ICMP back); default noisy")
    args = parser.parse_args()
    # the daemon's log is stamped by the wall clock, the churn by the monotonic one
    to_monotonic = time.time() - time.monotonic()
    print(f"machine: {machine()}")
    started = time.monotonic()
    with lab_pods(args.pods) as (lab, pods):
        print(f"lab: {args.pods} pods in {time.monotonic() - started:.1f} s", flush=True)
        with running_daemon(lab.inventory, *args.daemon_arg) as daemon:
            loaded = stamp(daemon.events("bpf programs loaded")[0])
            ready = stamp(daemon.events("ready")[0])
            on_hooks = attached_by_bpftool()
            print(f"RESULT start {args.pods} pods: all attached {ready - loaded:.2f} s after "
                  f"the programs were loaded (goal 10 s); bpftool: {on_hooks} of "
                  f"{args.pods} lab veths carry our programs on both hooks", flush=True)

            times, lines = [], 0
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                text = daemon.scrape()
                times.append(time.perf_counter() - t0)
                lines = text.count("\n")
            print(f"RESULT scrape {args.pods} pods, every probe: median {median(times) * 1000:.0f} ms, "
                  f"max {max(times) * 1000:.0f} ms, {lines} lines (goal 250 ms)", flush=True)
            rss = daemon.status("VmRSS") / 1024
            print(f"RESULT memory {args.pods} pods, steady: VmRSS {rss:.1f} MiB, peak VmHWM "
                  f"{daemon.status('VmHWM') / 1024:.1f} MiB (goal 150 MiB)", flush=True)

            cpu0, wall0 = daemon.cpu_seconds(), time.monotonic()
            while time.monotonic() - wall0 < args.idle_seconds:
                daemon.scrape()
                time.sleep(max(0.0, min(15.0, args.idle_seconds - (time.monotonic() - wall0))))
            share = (daemon.cpu_seconds() - cpu0) / (time.monotonic() - wall0)
            print(f"RESULT idle cpu {args.pods} pods, scraped every 15 s: {share * 100:.2f}% of "
                  f"one core over {time.monotonic() - wall0:.0f} s (goal 1%)", flush=True)

            with quiet_peer(pods[0], args.quiet_pods) as quiet:
                churn = Churn(lab, pods[0].ip, rate=args.rate, lifetime=args.lifetime, quiet=quiet)
                watch = ChurnWatch(daemon.scrape)
                cpu0, wall0 = daemon.cpu_seconds(), time.monotonic()
                try:
                    churn.run(args.churn_seconds, count=watch)
                finally:
                    churn.stop()
                churned = time.monotonic() - wall0
                churn_cpu = (daemon.cpu_seconds() - cpu0) / churned
            figures = report_churn(daemon, churn.done, watch, to_monotonic)
            print(f"RESULT churn {len(churn.done)} {'quiet' if quiet else 'noisy'} pods at "
                  f"{args.rate:g}/s beside {args.pods}: {figures}; reading the monitor: "
                  f"{watch.turns} turns, {watch.scrapes} scrapes, {watch.seconds:.1f} s of the "
                  f"churn's {churned:.1f} s; daemon CPU {churn_cpu * 100:.0f}% of a core", flush=True)
            print(f"RESULT memory after churn: VmRSS {daemon.status('VmRSS') / 1024:.1f} MiB",
                  flush=True)
            moved = daemon.events("moved to tcx")
            print(f"RESULT moved to tcx: {len(moved)} devices (of {args.pods} idle pods), "
                  f"{time.time() - ready:.0f} s after ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
