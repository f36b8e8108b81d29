"""Without BTF: nothing read from kernel structs, drops under the node, said in metrics and log.
Without kernel headers: a refusal that names the cause and the remedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from podnetlab.lab import Lab
from tests.kernel.support import (
    ROOT,
    UDP_SENDER,
    Daemon,
    free_port,
    in_pod,
    our_programs,
    quiet_window,
    wait_for,
)


def test_no_btf_degrades_as_stated(lab: Lab, daemons: list[Daemon]) -> None:
    a, b = lab.up(2)
    daemon = Daemon("--btf-path", "/nonexistent/vmlinux", inventory=str(lab.inventory))
    daemons.append(daemon)
    m = daemon.scrape()
    assert m.sum("podnet_monitor_kernel_offsets", source="none") == 1
    states = {dict(ls)["probe"]: dict(ls)["state"] for (n, ls) in m.samples
              if n == "podnet_monitor_probe_state"}
    assert states == {"packets": "loaded", "peers": "loaded", "tcpflags": "loaded",
                      "handshake": "loaded", "dns": "loaded", "dnsnames": "loaded",
                      "drops": "degraded", "retransmits": "off", "rtt": "off",
                      "trace": "loaded"}
    assert not m.has("podnet_tcp_retransmits_total")
    warnings = [e for e in daemon.log_events() if e.get("event") == "probe limited on this kernel"]
    assert {e["probe"] for e in warnings} == {"drops", "retransmits", "rtt"}
    # drops still count, by reason, under the node: never under a pod from a guess
    before = daemon.scrape()
    in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", "17", "8")

    def node_drops() -> float:
        return (daemon.scrape().sum("podnet_drops_total", namespace="_node", reason="NO_SOCKET")
                - before.sum("podnet_drops_total", namespace="_node", reason="NO_SOCKET"))

    wait_for(lambda: node_drops() >= 17, timeout=3)
    time.sleep(0.2)
    after = daemon.scrape()
    assert node_drops() == 17
    assert after.sum("podnet_drops_total", namespace="lab") == 0
    # and what needs no offsets stays exact
    w0 = quiet_window(daemon, [a, b])
    in_pod(a, "ping", "-c", "5", "-i", "0.01", "-q", b.ip)
    w1 = quiet_window(daemon, [a, b])
    sent = (w1.metrics.sum("podnet_packets_total", pod=a.name, direction="egress")
            - w0.metrics.sum("podnet_packets_total", pod=a.name, direction="egress"))
    assert sent == w1.stats[a.host_veth]["rx_packets"] - w0.stats[a.host_veth]["rx_packets"]


def test_no_kernel_headers_refuses_with_a_remedy(lab: Lab) -> None:
    lab.up(1)
    proc = subprocess.run(
        [sys.executable, "-m", "monitor", "run", "--inventory", str(lab.inventory), "--listen",
         f"127.0.0.1:{free_port()}", "--log-format", "json"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "BCC_KERNEL_SOURCE": "/nonexistent/build"},
        check=False)
    assert proc.returncode == 1, proc.stderr
    (failed,) = [json.loads(line) for line in proc.stderr.splitlines()
                 if '"cannot load the BPF programs"' in line]
    assert "no kernel headers at /nonexistent/build" in failed["cause"]
    assert "linux-headers" in failed["remedy"]
    assert our_programs(lab.pods()[0].host_veth) == {}
