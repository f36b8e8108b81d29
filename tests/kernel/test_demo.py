"""`make demo` end to end: lab pods, traffic, the monitor, Debian's Prometheus scraping it."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.kernel.support import ROOT, free_port


def test_demo_runs_prometheus_sees_the_traffic_and_nothing_is_left() -> None:
    listen, prom = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--duration", "36", "--listen",
                           listen, "--prometheus", prom], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"curl -s http://{listen}/metrics" in out
    assert "PromQL" in out
    # The last table Prometheus answered: the TCP client sends ~200 Mbit/s, the server gets it.
    rates = {(m[0], m[1]): float(m[2]) for m in
             re.findall(r"^\s+(pod-\d+)\s+(ingress|egress)\s+([\d.]+)$", out, re.M)}
    assert 150 < rates[("pod-1", "egress")] < 260, out
    assert 150 < rates[("pod-0", "ingress")] < 260, out
    assert 1.0 < rates[("pod-3", "egress")] < 4.0, out  # UDP at 2 Mbit/s of payload
    assert "nothing left behind" in out
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert "pnml" not in links
    assert subprocess.run(["pgrep", "-f", f"web.listen-address={prom}"],
                          capture_output=True, check=False).returncode == 1
