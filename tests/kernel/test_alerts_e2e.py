"""Dashboards and alerts against a real Prometheus scraping the daemon on lab pods.

Faults are injected for real (an nft drop rule, a DNS server answering SERVFAIL,
the delay line, a pod refusing connections); with `for` shortened to 0s, each
makes its alert fire for the right pods, and no other pod-fault alert fires.
Every dashboard panel's expression, template variables substituted, must
parse and return data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from monitor import alertrules, dashboards
from podnetlab.lab import Lab
from tests.kernel.dnstools import SERVER as DNS_SERVER
from tests.kernel.support import (
    INNER,
    INNER_IP,
    ROOT,
    Daemon,
    delay_line,
    free_port,
    nft_in_pod,
    spawn_in_pod,
)

LOOPS = {
    # a UDP datagram every 20 ms to a port the receiver drops
    "udp": "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
           "while True:\n  s.sendto(b'x',(sys.argv[1],7777)); time.sleep(0.02)",
    # a connection attempt every 100 ms (refused, or slow through the delay line)
    "connect": "import socket,sys,time\nwhile True:\n  try:\n"
               "    socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5).close()\n"
               "  except OSError: pass\n  time.sleep(0.1)",
    # a DNS query every 100 ms for a name the server answers SERVFAIL
    "dns": "import random,socket,struct,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
           "s.settimeout(1)\nwhile True:\n  q=struct.pack('>HHHHHH',random.randrange(65536),0x100,1,0,0,0)"
           "+b'\\x04fail\\x01x\\x00\\x00\\x01\\x00\\x01'\n  s.sendto(q,(sys.argv[1],53))\n"
           "  try: s.recv(512)\n  except OSError: pass\n  time.sleep(0.1)",
}


def query(prom: str, expr: str) -> list[dict[str, object]]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        doc = json.load(resp)
    assert doc["status"] == "success", doc
    return list(doc["data"]["result"])


def firing(prom: str) -> set[tuple[str, str, str]]:
    with urllib.request.urlopen(f"http://{prom}/api/v1/alerts", timeout=10) as resp:
        alerts = json.load(resp)["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("pod", ""), a["state"]) for a in alerts}


def substitute(expr: str, pod: str) -> str:
    for var, value in (("$__rate_interval", "1m"), ("$namespace", ".*"), ("$workload", ".*"),
                       ("$instance", ".*"), ("$pod", pod)):
        expr = expr.replace(var, value)
    return expr


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_faults_fire_their_alerts_and_every_panel_has_data(
        lab: Lab, daemons: list[Daemon], tmp_path: Path) -> None:
    sender, dropper, client, refuser, resolver, slowclient, router = lab.up(7)
    daemon = Daemon("--bpf-stats", "true", "--sweep-interval", "0.5",
                    inventory=str(lab.inventory))
    daemons.append(daemon)
    rules = tmp_path / "rules.yaml"
    rules.write_text(alertrules.prometheus_file(alertrules.configured(["*.for=0s"])))
    prom = f"127.0.0.1:{free_port()}"
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        f"rule_files: [{rules}]\n"
        "scrape_configs:\n  - job_name: podnetmon\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{daemon.port}']}}]\n")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool's lint of a real scrape: names, types, help
    metrics = daemon.get("/metrics")[1]
    linted = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True,
                            check=False)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr

    nft_in_pod(dropper, "table inet e2e {\n chain input {\n  type filter hook input priority 0;\n"
                        "  udp dport 7777 drop\n }\n}\n")
    procs = [spawn_in_pod(sender, sys.executable, "-c", LOOPS["udp"], dropper.ip),
             spawn_in_pod(client, sys.executable, "-c", LOOPS["connect"], refuser.ip, "81"),
             spawn_in_pod(resolver, sys.executable, "-c", DNS_SERVER, "0.001"),
             spawn_in_pod(client, sys.executable, "-c", LOOPS["dns"], resolver.ip)]
    server = prometheus = None
    try:
        with delay_line(slowclient, router, 300):  # a 600 ms handshake for slowclient
            server = subprocess.Popen(
                ["ip", "netns", "exec", INNER, sys.executable, "-c",
                 "import socket\ns=socket.create_server(('0.0.0.0',8080))\n"
                 "while True:\n  c,_=s.accept(); c.close()"])
            procs.append(spawn_in_pod(slowclient, sys.executable, "-c", LOOPS["connect"],
                                      INNER_IP, "8080"))
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address={prom}"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
            expected = {
                ("PodNetDropsHigh", dropper.name),         # NETFILTER_DROP
                ("PodNetDropsHigh", refuser.name),         # NO_SOCKET: the refused SYNs
                ("PodNetTCPConnectFailures", client.name),   # client, reset
                ("PodNetTCPConnectFailures", refuser.name),  # server, reset
                ("PodNetDNSServfail", client.name),
                ("PodNetDNSNameFailing", client.name),  # the name the SERVFAILs are for
                ("PodNetTCPHandshakeSlow", slowclient.name),  # client
                ("PodNetTCPHandshakeSlow", router.name),      # server: its SYN-ACK leaves late
            }
            deadline = time.monotonic() + 150
            seen: set[tuple[str, str, str]] = set()
            while time.monotonic() < deadline:
                try:
                    seen = firing(prom)
                except OSError:
                    seen = set()
                if expected <= {(name, pod) for name, pod, _state in seen}:
                    break
                time.sleep(2)
            got = {(name, pod) for name, pod, state in seen if state in ("pending", "firing")}
            pod_alerts = {a.name for a in alertrules.ALERTS if a.pod_fault}
            assert {g for g in got if g[0] in pod_alerts} == expected, seen
            assert not {g for g in got if g[0] not in pod_alerts}, seen  # the monitor is fine

            # every panel of every dashboard parses and returns data
            empty = []
            for dashboard in dashboards.DASHBOARDS:
                for title, expr in dashboards.expressions(dashboard):
                    if not query(prom, substitute(expr, ".*")):
                        empty.append((dashboard.uid, title))
            assert not empty, empty
            # the recording rules evaluate, and the lab's one workload (StatefulSet lab) has
            # a rate of every family (their sums are promtool's test: tests/promtool)
            with urllib.request.urlopen(f"http://{prom}/api/v1/rules", timeout=10) as resp:
                groups = json.load(resp)["data"]["groups"]
            unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
                         if r["health"] != "ok"]
            assert not unhealthy, unhealthy
            missing = [f"{level}:{r.metric}:rate5m" for r in alertrules.RECORDINGS
                       for level in ("namespace_workload", "namespace")
                       if not query(prom, f'{level}:{r.metric}:rate5m{{namespace="lab"}}')]
            assert not missing, missing
            drops = query(prom, 'namespace_workload:podnet_drops:rate5m{reason="NETFILTER_DROP"}')
            assert [(r["metric"]["workload_kind"], r["metric"]["workload"])  # type: ignore[index]
                    for r in drops] == [("StatefulSet", "lab")], drops
            # and with one pod chosen, its panels are that pod's
            rows = query(prom, substitute(
                'sum by (pod, reason) (rate(podnet_drops_total{namespace=~"$namespace", '
                'pod=~"$pod"}[$__rate_interval]))', dropper.name))
            assert {r["metric"]["pod"] for r in rows} == {dropper.name}  # type: ignore[index]
            # podnetmon top, from the daemon's /metrics, sees the same faults
            table = subprocess.run([sys.executable, "-m", "monitor", "top", "--once", "--interval",
                                    "2", "--sort", "drops", "--address", f"127.0.0.1:{daemon.port}"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=30,
                                   check=True).stdout.splitlines()
            assert table[1].split()[0] in (f"lab/{dropper.name}", f"lab/{refuser.name}"), table
    finally:
        for p in procs:
            p.kill()
        for p in (server, prometheus):
            if p is not None:
                p.kill()
                p.wait()
