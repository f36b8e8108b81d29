"""`make demo`: lab pods with real traffic, the monitor, and Debian's Prometheus scraping it.

The monitor serves TLS, as it should in a cluster: a throwaway CA (openssl, in
the demo's temporary directory) signs its serving certificate, Prometheus
scrapes it with that CA, and the commands printed verify it with --ca-file.
Runs until Ctrl-C (or --duration seconds), then tears everything down: the
traffic, the monitor, Prometheus, the lab and the certificates. Run as root.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor import alertrules
from podnetlab.lab import Lab, LabPod
from tests.pki import Pair, leaf, new_ca  # the tests' throwaway PKI: one way to make one

RATE_QUERY = 'sum by (pod, direction) (rate(podnet_bytes_total{namespace="lab"}[15s])) * 8'


def _in_pod(pod: LabPod, *cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*pod.exec_prefix(), *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _pki(d: Path, listen: str) -> tuple[Pair, Pair]:
    """A CA and the monitor's serving certificate, valid for the address clients dial."""
    d.mkdir(mode=0o700)
    host = listen.rsplit(":", 1)[0].strip("[]")
    try:
        dialled = f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        dialled = f"DNS:{host}"
    ca = new_ca(d, "ca", "podnetmon-demo-ca")
    sans = ",".join(dict.fromkeys(["IP:127.0.0.1", "DNS:localhost", dialled]))
    return ca, leaf(d, ca, "monitor", "/CN=podnetmon-demo", usage="serverAuth", sans=sans)


def _wait_http(url: str, timeout: float, context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {timeout:.0f} s")


def _log_tail(path: Path, lines: int = 20) -> None:
    """The end of a log to stderr: the demo's directory, logs and all, goes at teardown."""
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    print(f"demo: the last lines of {path.name}:", *text, sep="\n  ", file=sys.stderr)


def _query(prom: str, expr: str) -> list[dict[str, object]]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc = json.load(resp)
    return list(doc.get("data", {}).get("result", []))


def rate_text(bits_per_second: float) -> str:
    """A rate in the unit that shows it: a ping's few kbit/s as well as iperf3's 200 Mbit/s
    (in Mbit/s alone a pinging pod read 0.00)."""
    for factor, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits_per_second >= factor:
            return f"{bits_per_second / factor:7.2f} {unit}"
    return f"{bits_per_second:7.2f} bit/s"


def _print_rates(prom: str) -> int:
    rows = _query(prom, RATE_QUERY)
    if not rows:
        print("  (Prometheus has no rates yet: it needs two scrapes)")
        return 0
    print(f"  {'pod':10} {'direction':9} {'rate':>14}")
    for row in sorted(rows, key=lambda r: (r["metric"]["pod"], r["metric"]["direction"])):  # type: ignore[index]
        metric, value = row["metric"], row["value"]
        print(f"  {metric['pod']:10} {metric['direction']:9} {rate_text(float(value[1]))}")  # type: ignore[index]
    return len(rows)


def _ui(prom: str) -> str:
    """The path under which this Prometheus serves its pages: "" for upstream's, or
    "/classic" for Debian's build (2.42 has no React UI: /alerts is a 404 there, and
    /classic/alerts the page). Asked, not assumed from a version."""
    for prefix in ("", "/classic"):
        try:
            with urllib.request.urlopen(f"http://{prom}{prefix}/alerts", timeout=5) as resp:
                if resp.status == 200:
                    return prefix
        except OSError:
            continue
    raise SystemExit(f"demo: Prometheus at {prom} serves neither /alerts nor /classic/alerts")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--duration", type=float, default=0, help="seconds; 0: until Ctrl-C")
    parser.add_argument("--listen", default="127.0.0.1:9655", help="the monitor's address")
    parser.add_argument("--prometheus", default="127.0.0.1:9090", help="Prometheus' address")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it makes network namespaces and loads BPF)")
    if args.pods < 4:
        raise SystemExit("demo: needs at least 4 pods (a server, TCP, ping and UDP clients)")
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise SystemExit("demo: prometheus is not installed (make setup installs it)")
    if shutil.which("openssl") is None:
        raise SystemExit("demo: openssl is not installed (make setup installs it)")

    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    lab = Lab()
    lab.down()
    work = Path(tempfile.mkdtemp(prefix="podnetmon-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    monitor: subprocess.Popen[bytes] | None = None
    prom: subprocess.Popen[bytes] | None = None
    try:
        print(f"demo: making {args.pods} lab pods (the last one CRI-O style, pinned netns)")
        pods = lab.up(args.pods, pinned=1)
        server, tcp_client, pinger, udp_client = pods[0], pods[1], pods[2], pods[-1]
        procs += [_in_pod(server, "iperf3", "-s", "-p", "5201"),
                  _in_pod(server, "iperf3", "-s", "-p", "5202")]
        time.sleep(0.5)
        procs += [_in_pod(tcp_client, "iperf3", "-c", server.ip, "-p", "5201", "-t", "0",
                          "-b", "200M"),
                  _in_pod(pinger, "ping", "-i", "0.2", server.ip),
                  _in_pod(udp_client, "iperf3", "-u", "-c", server.ip, "-p", "5202", "-t", "0",
                          "-b", "2M")]
        print(f"demo: traffic: {tcp_client.name} -> {server.name} TCP 200 Mbit/s, "
              f"{pinger.name} pings, {udp_client.name} -> {server.name} UDP 2 Mbit/s")

        token = work / "token"  # traces need a bearer token; this one lives as long as the demo
        token.write_text(os.urandom(16).hex())
        token.chmod(0o600)
        ca, serving = _pki(work / "pki", args.listen)
        url = f"https://{args.listen}"
        log = (work / "monitor.log").open("wb")
        monitor = subprocess.Popen(
            [sys.executable, "-m", "monitor", "run", "--inventory", str(lab.inventory),
             "--listen", args.listen, "--bpf-stats", "true", "--auth-token-file", str(token),
             "--tls-cert-file", str(serving.cert), "--tls-key-file", str(serving.key),
             "--capture-dir", str(work / "captures")], cwd=ROOT, stdout=log, stderr=log)
        try:
            _wait_http(f"{url}/readyz", 60, ssl.create_default_context(cafile=str(ca.cert)))
        except SystemExit:
            _log_tail(work / "monitor.log")
            raise
        print(f"demo: podnetmon is up, serving TLS (CA {ca.cert}); its log: {work / 'monitor.log'}")

        rules = work / "podnet-rules.yaml"  # the shipped rules, `for` shortened for a demo
        rules.write_text(alertrules.prometheus_file(alertrules.configured(["*.for=1m"])))
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n"
            f"rule_files: ['{rules}']\n"
            "scrape_configs:\n  - job_name: podnetmon\n    scheme: https\n"
            f"    tls_config:\n      ca_file: '{ca.cert}'\n"
            f"    static_configs:\n      - targets: ['{args.listen}']\n")
        prom_log = (work / "prometheus.log").open("wb")
        prom = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address={args.prometheus}"], stdout=prom_log, stderr=prom_log)
        _wait_http(f"http://{args.prometheus}/-/ready", 60)
        ui = f"http://{args.prometheus}{_ui(args.prometheus)}"
        graph = f"{ui}/graph?" + urllib.parse.urlencode({"g0.expr": RATE_QUERY, "g0.tab": "0"})

        print(f"""
demo: everything runs. Where to look:
  metrics     curl -s --cacert {ca.cert} {url}/metrics | grep '^podnet_bytes_total'
  pods        .venv/bin/podnetmon pods --address {url} --ca-file {ca.cert}
  Prometheus  {graph}
  alerts      {ui}/alerts
  targets     {ui}/targets   (podnetmon, scraped over https)
  PromQL      {RATE_QUERY}
  Grafana     import grafana/podnet-node.json, podnet-pod.json, podnet-monitor.json and pick
              http://{args.prometheus} as their Prometheus; no Grafana? watch it live:
  top         .venv/bin/podnetmon top --address {url} --ca-file {ca.cert}
  trace       .venv/bin/podnetmon trace lab/{pinger.name} -d 5s -f icmp --address {url} \\
                --ca-file {ca.cert} --token-file {token} -w - | tshark -r -
Ctrl-C tears everything down.
""", flush=True)
        started = time.monotonic()
        next_print = started + 20
        while not stop and (not args.duration or time.monotonic() - started < args.duration):
            if monitor.poll() is not None:
                print("demo: the monitor exited", file=sys.stderr)
                _log_tail(work / "monitor.log")
                return 1
            if time.monotonic() >= next_print:
                print(f"demo: from Prometheus, {RATE_QUERY}", flush=True)
                _print_rates(args.prometheus)
                sys.stdout.flush()
                next_print = time.monotonic() + 10
            time.sleep(0.2)
        return 0
    finally:
        print("demo: tearing down", flush=True)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()
        for p in (monitor, prom):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
        print("demo: done, nothing left behind")


if __name__ == "__main__":
    sys.exit(main())
