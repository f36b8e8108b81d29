"""`make demo` end to end: lab pods, traffic, the monitor over TLS, Debian's Prometheus scraping it."""

from __future__ import annotations

import re
import shlex
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.kernel.support import ROOT, free_port

READY = "Ctrl-C tears everything down."


def test_demo_runs_prometheus_sees_the_traffic_and_nothing_is_left() -> None:
    listen, prom = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "scripts/demo.py", "--duration", "36", "--listen",
                             listen, "--prometheus", prom], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(READY in line for line in lines) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any(READY in line for line in lines), "".join(lines)
        # The commands it prints work as printed: over https, verified with the demo's CA
        printed = "".join(lines)
        ca = re.search(r"--ca-file (\S+)", printed)
        assert ca, printed
        assert f"curl -s --cacert {ca[1]} https://{listen}/metrics" in printed
        pods = re.search(r"^\s+pods\s+(.+)$", printed, re.M)
        assert pods and f"--address https://{listen} --ca-file {ca[1]}" in pods[1], printed
        table = subprocess.run(shlex.split(pods[1]), cwd=ROOT, capture_output=True, text=True,
                               timeout=30, check=False)
        assert table.returncode == 0 and re.search(r"^lab\s+pod-0\s", table.stdout, re.M), \
            table.stdout + table.stderr
        curl = subprocess.run(["curl", "-sf", "--cacert", ca[1], f"https://{listen}/metrics"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert curl.returncode == 0 and "podnet_bytes_total{" in curl.stdout, curl.stderr
        # Every link it prints answers, as printed (a client's --address is not a link: the
        # pods command above used it). Debian's Prometheus 2.42 serves /classic/alerts,
        # and its /alerts is a 404.
        links = [u.rstrip(").,'") for u in re.findall(r"(?<!--address )(https?://\S+)", printed)]
        assert any(u.endswith("/alerts") for u in links), printed
        context = ssl.create_default_context(cafile=ca[1])
        for link in links:
            with urllib.request.urlopen(link, timeout=10,
                                        context=context if link.startswith("https") else None) as r:
                page = r.read()
                assert r.status == 200, link
            if link.endswith("/alerts"):
                assert b"PodNetDropsHigh" in page, link  # the page of the rules it loaded
        assert proc.wait(timeout=300) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the demo tears its lab down on SIGTERM
            proc.wait(timeout=60)
        reader.join(timeout=10)
    out = "".join(lines)
    # The last table Prometheus answered: the TCP client sends ~200 Mbit/s, the server gets it.
    # Prometheus scraped over https with the demo's CA, or it would have no rates at all.
    units = {"bit/s": 1.0, "kbit/s": 1e3, "Mbit/s": 1e6, "Gbit/s": 1e9}
    rates = {(m[0], m[1]): float(m[2]) * units[m[3]] / 1e6 for m in re.findall(
        r"^\s+(pod-\d+)\s+(ingress|egress)\s+([\d.]+) ((?:k|M|G)?bit/s)$", out, re.M)}
    assert 150 < rates[("pod-1", "egress")] < 260, out
    assert 150 < rates[("pod-0", "ingress")] < 260, out
    assert 1.0 < rates[("pod-3", "egress")] < 4.0, out  # UDP at 2 Mbit/s of payload
    # the pod that only pings, 5 a second: 98-byte frames each way, 3.92 kbit/s, shown as
    # such (in Mbit/s it read 0.00)
    assert re.search(r"^\s+pod-2\s+egress\s+[\d.]+ kbit/s$", out, re.M), out
    assert 3.0e-3 < rates[("pod-2", "egress")] < 6.0e-3, out
    assert "nothing left behind" in out
    assert not Path(ca[1]).parent.exists()  # the throwaway CA and its key went with the demo
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert "pnml" not in links
    assert subprocess.run(["pgrep", "-f", f"web.listen-address={prom}"],
                          capture_output=True, check=False).returncode == 1
