"""The `podnetmon` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from monitor import __version__, client, log, settings

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podnetmon", description="Per-pod network monitor for Kubernetes nodes (BCC eBPF).")
    parser.add_argument("--version", action="version", version=f"podnetmon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the node daemon",
                         description="Find every pod network on this node, attach to its host "
                         "veth and serve per-pod metrics. Every flag also reads from the "
                         "environment variable named in its help.")
    run.add_argument("--check", action="store_true",
                     help="load, attach to every pod found, report and exit (non-zero on any "
                          "failure)")
    settings.add_arguments(run)

    check = sub.add_parser("check", help="preflight of this host: can the daemon run here?")
    check.add_argument("--tracefs-root", default="/sys/kernel/tracing")
    check.add_argument("--bpffs-root", default="/sys/fs/bpf")
    check.add_argument("--attach-mode", default="auto", choices=settings.ATTACH_MODES,
                       help="the daemon's attach mode, to judge other agents' tc filters by")
    check.add_argument("--tc-priority", type=int, default=settings.Settings().tc_priority,
                       help="the daemon's tc priority (default %(default)s)")
    check.add_argument("--max-pods", type=int, default=None,
                       help="pods the node may run, to size the neighbour tables for (default: "
                       "the kubelet's default maxPods, 110, or the veths there are now if more)")

    cleanup = sub.add_parser(
        "cleanup", help="remove everything podnetmon attached or pinned on this node",
        description="Remove our tc filters (by priority, handle and name) from every "
        "interface, and our pinned links and maps from bpffs. For a node where no daemon "
        "runs any more (it left its programs attached for an upgrade, or crashed).")
    cleanup.add_argument("--bpffs-root", default="/sys/fs/bpf")
    cleanup.add_argument("--tc-priority", type=int, default=settings.Settings.tc_priority)
    cleanup.add_argument("--tc-handle", type=lambda v: int(v, 0), default=settings.Settings.tc_handle)
    cleanup.add_argument("--force", action="store_true",
                         help="even though a podnetmon daemon seems to be running")

    pods = sub.add_parser("pods", help="the pods the daemon sees, as a table")
    pods.add_argument("--json", action="store_true", help="print the daemon's JSON as it is")

    trace = sub.add_parser("trace", help="a pod's packets as pcapng, from the daemon",
                           description="Ask the daemon on this node for a trace of one pod; "
                           "the pcapng goes to FILE (or stdout with -w -, e.g. | tshark -r -), "
                           "progress to stderr.")
    trace.add_argument("target", metavar="NAMESPACE/POD")
    trace.add_argument("-w", "--write", default="-", metavar="FILE", help="where to write (- stdout)")
    trace.add_argument("-d", "--duration", default="10s")
    trace.add_argument("-f", "--filter", default="", help="a tcpdump (pcap-filter) expression")
    trace.add_argument("-s", "--snaplen", type=int, default=0)
    trace.add_argument("-c", "--count", type=int, default=0, help="stop after this many packets")
    drops = sub.add_parser("drops", help="a pod's drop events as NDJSON, from the daemon")
    drops.add_argument("target", metavar="NAMESPACE/POD")
    drops.add_argument("-d", "--duration", default="60s")
    drops.add_argument("-c", "--count", type=int, default=0, help="stop after this many events")

    top = sub.add_parser("top", help="the node's pods live: rates, drops, latency")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--sort", default="bytes", choices=("bytes", "packets", "drops", "retrans",
                                                         "handshake", "dns"))
    top.add_argument("--rows", type=int, default=40)
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--peers", metavar="NAMESPACE/POD",
                     help="one pod's peers (who it talks to, by workload, service, node or "
                          "external) instead of the node's pods")
    for p in (pods, trace, drops, top):  # the daemon's clients: --address, TLS, token
        client.add_arguments(p)

    rules = sub.add_parser("rules", help="the Prometheus alert rules, with your thresholds",
                           description="Print the alert rules: a Prometheus rule file, or a "
                           "PrometheusRule for the Prometheus Operator.")
    rules.add_argument("--format", default="prometheus", choices=("prometheus", "operator"))
    rules.add_argument("--set", action="append", default=[], metavar="ALERT.FIELD=VALUE",
                       help="FIELD: threshold, for, severity, capture, capture_filter, "
                            "min_rate, summary, description, enabled or label.KEY; e.g. "
                            "PodNetDropsHigh.threshold=5, '*.for=2m', "
                            "'PodNetDNS*.label.team=dns' (repeatable, in order)")
    rules.add_argument("--runbook-url", default="", metavar="URL",
                       help="where you host docs/runbook.md: each alert links to its section "
                            "(URL#anchor, or {anchor} in the URL replaced); none by default")
    rules.add_argument("--job", default="podnetmon", help="the scrape job of the daemons")

    dashboards = sub.add_parser("dashboards", help="write the Grafana dashboards (JSON)",
                                description="Write the Grafana dashboards as JSON files, one "
                                "per dashboard, and print their paths.")
    dashboards.add_argument("--out", default="grafana",
                            help="directory to write them to, made if missing (default: "
                                 "./%(default)s, under the current directory)")

    lab = sub.add_parser("lab", help="simulated pods on this machine")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", help="make N lab pods (beside any there are)")
    up.add_argument("--pods", type=int, default=4)
    up.add_argument("--pinned", type=int, default=0,
                    help="of those, how many have only a pinned netns (no pause process)")
    up.add_argument("--styles", default="docker",
                    help="runtime styles to cycle through: docker, containerd, crio, "
                         "crio-noinfra, pinned (see monitor/lab.py)")
    up.add_argument("--json", action="store_true", help="print the pods made as JSON")
    lab_sub.add_parser("down", help="remove everything the lab made (idempotent)")
    lab_sub.add_parser("status", help="the lab's pods as JSON")
    add = lab_sub.add_parser("add", help="one more lab pod")
    add.add_argument("--pinned", action="store_true")
    add.add_argument("--name")
    rm = lab_sub.add_parser("rm", help="remove one lab pod")
    rm.add_argument("name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    log.configure("info", "auto")
    if args.command == "check":
        return _check(args)
    if args.command == "pods":
        return _pods(args)
    if args.command == "cleanup":
        return _cleanup(args)
    if args.command in ("trace", "drops"):
        from monitor.traces import cli as tracecli

        return tracecli.main(args)
    if args.command == "top":
        from monitor import top

        return top.main(args)
    if args.command == "rules":
        return _rules(args)
    if args.command == "dashboards":
        return _dashboards(args)
    return _lab(args)


def _rules(args: argparse.Namespace) -> int:
    from monitor import alertrules

    try:
        alerts = alertrules.configured(args.set)
        runbook_url = alertrules.check_runbook_url(args.runbook_url)
    except alertrules.RuleError as exc:
        print(f"podnetmon rules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    render = alertrules.operator_resource if args.format == "operator" else alertrules.prometheus_file
    print(render(alerts, args.job, runbook_url), end="")
    return 0


def _dashboards(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor import dashboards

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in dashboards.rendered():
        (out / name).write_text(text)
        print(out / name)
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        conf = settings.from_sources(args)
    except settings.SettingsError as exc:
        for problem in exc.problems:  # every one, so that one edit fixes them all
            print(f"podnetmon: bad setting: {problem}", file=sys.stderr)
        return EXIT_USAGE
    log.configure(conf.log_level, conf.log_format)
    from monitor import daemon

    return daemon.run(conf, check_only=args.check)


def _check(args: argparse.Namespace) -> int:
    from monitor import check

    conf = settings.Settings(tracefs_root=args.tracefs_root, bpffs_root=args.bpffs_root,
                             attach_mode=args.attach_mode, tc_priority=args.tc_priority)
    text, code = check.report(check.run_checks(conf, args.max_pods))
    print(text)
    return code


def _cleanup(args: argparse.Namespace) -> int:
    from monitor import cleanup

    running = cleanup.daemons_running()
    if running and not args.force:
        print(f"podnetmon cleanup: a podnetmon daemon is running (pids {running}); stop it "
              "first, or pass --force", file=sys.stderr)
        return 1
    removed = cleanup.cleanup(args.bpffs_root, args.tc_priority, args.tc_handle)
    for line in removed:
        print(f"removed {line}")
    print(f"podnetmon cleanup: {len(removed)} removed" if removed else
          "podnetmon cleanup: nothing of podnetmon's was left on this node")
    return 0


def _pods(args: argparse.Namespace) -> int:
    try:
        daemon = client.from_args(args)
        with daemon.open("/api/v1/pods", timeout=10) as resp:
            doc = json.load(resp)
    except client.ClientError as exc:
        print(f"podnetmon pods: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # the answer broke off, or is not JSON
        print(f"podnetmon pods: {daemon.url}/api/v1/pods: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(format_pods(doc.get("pods", [])))
    return 0


def format_pods(pods: list[dict[str, object]]) -> str:
    columns = ("namespace", "pod", "interface", "ifindex", "attach_mode", "netns", "uid",
               "last_error")
    rows = [[str(p.get(c, "") if p.get(c) is not None else "") for c in columns] for p in pods]
    header = [c.upper().replace("_", " ") for c in columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def _lab(args: argparse.Namespace) -> int:
    from podnetlab.errors import LabError
    from podnetlab.lab import Lab

    lab = Lab()
    try:
        if args.lab_command == "up":
            made = lab.up(args.pods, pinned=args.pinned, styles=args.styles.split(","))
            if args.json:
                print(json.dumps([asdict(p) for p in made], indent=1))
            else:
                for p in made:
                    kind = f"pause pid {p.pause_pid}" if p.pause_pid else "no pause"
                    print(f"{p.namespace}/{p.name}  {p.ip}  {p.host_veth}  netns {p.netns}  "
                          f"{p.style}: {kind}{', pinned ' + p.pinned if p.pinned else ''}")
                print(f"inventory: {lab.inventory}")
        elif args.lab_command == "down":
            removed = lab.down()
            print(f"lab down: removed {len(removed)} objects")
        elif args.lab_command == "status":
            print(json.dumps([asdict(p) for p in lab.pods()], indent=1))
        elif args.lab_command == "add":
            print(json.dumps(asdict(lab.add(pinned=args.pinned, name=args.name)), indent=1))
        elif args.lab_command == "rm":
            lab.remove(args.name)
    except LabError as exc:
        print(f"podnetmon lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
