"""Faults the daemon meets on a node, each answered without losing what it already knows.

Lost link events (the netlink socket overflowed), the Kubernetes API unreachable at
start, and the disk for captures full. (bpffs missing: test_restart.py; no BTF:
test_degraded.py; a veth deleted mid-attach and pods vanishing mid-discovery: the
churn test, where that happens hundreds of times.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from podnetlab.lab import Lab
from tests.fakeapi import FakeApiServer, make_pod
from tests.kernel.support import Daemon, free_port, in_pod, spawn_in_pod, wait_for

NODE = "fault-node"


def test_lost_link_events_are_answered_by_a_rescan(lab: Lab) -> None:
    (first,) = lab.up(1)
    # no periodic rescan to fall back on: only the overflow itself can find the new pod
    daemon = Daemon("--resync-interval", "3600", inventory=str(lab.inventory))
    try:
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            late = lab.add()  # its link events queue up...
            # ...behind thousands more than the socket holds (veths named as lab links,
            # so that `lab down` would remove any left behind)
            batch = "".join(f"link add pnml{900000 + i} type veth peer name pnml{950000 + i}\n"
                            f"link del pnml{900000 + i}\n" for i in range(3000))
            subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        took = wait_for(lambda: daemon.scrape().has("podnet_packets_total", pod=late.name), 5)
        assert took < 2
        assert daemon.scrape().sum("podnet_monitor_netlink_overflows_total") >= 1
        assert any(str(e.get("event", "")).startswith("link events were lost")
                   for e in daemon.log_events())
        assert daemon.scrape().has("podnet_packets_total", pod=first.name)
    finally:
        assert daemon.stop() == 0


def _kubeconfig(path: Path, port: int) -> str:
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
              "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
              "users": [{"name": "fake", "user": {}}],
              "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}
    path.write_text(json.dumps(config))
    return str(path)


def test_api_unreachable_at_start_runs_with_what_is_known_then_catches_up(
        lab: Lab, tmp_path: Path) -> None:
    pods = lab.up(2)
    port = free_port()  # nothing listens there yet
    daemon = Daemon("--metadata", "kubernetes", "--kubeconfig", _kubeconfig(tmp_path / "kc", port),
                    "--node-name", NODE)
    api = FakeApiServer(node=NODE)
    try:
        metrics = daemon.scrape()  # ready without the API: counting under fallback names
        assert metrics.sum("podnet_monitor_api_synced") == 0
        assert metrics.sum("podnet_monitor_api_requests_total", kind="error") >= 1
        assert {p for p in metrics.pods() if p[0] == "_unknown"} == {
            ("_unknown", f"netns-{p.netns}") for p in pods}
        in_pod(pods[1], "ping", "-c", "3", "-i", "0.01", pods[0].ip)
        for i, pod in enumerate(pods):
            api.add(make_pod(f"app-{i}", "shop", pod.uid, NODE))
        api.start(port)
        named = {("shop", "app-0"), ("shop", "app-1")}
        wait_for(lambda: daemon.scrape().pods() == named, 45)
        metrics = daemon.scrape()
        assert metrics.sum("podnet_monitor_api_synced") == 1
        # the counts made under the fallback name were the pod's all along: not lost
        assert metrics.sum("podnet_packets_total", pod="app-1", direction="egress",
                           protocol="icmp") >= 3
    finally:
        assert daemon.stop() == 0
        api.stop()


TOKEN = "t0ken-for-the-fault-tests"


def test_a_full_capture_disk_ends_the_capture_and_nothing_else(lab: Lab, tmp_path: Path) -> None:
    a, b = lab.up(2)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    daemon = None
    try:
        daemon = Daemon("--auth-token-file", str(token), "--capture-dir", str(disk / "captures"),
                        inventory=str(lab.inventory))
        flood = spawn_in_pod(a, "ping", "-c", "400", "-i", "0.005", "-s", "1000", b.ip)
        alert = {"alerts": [{"status": "firing", "fingerprint": "full", "annotations": {},
                             "startsAt": "2026-11-27T00:00:00Z",
                             "labels": {"alertname": "X", "namespace": "lab", "pod": a.name,
                                        "podnet_capture": "5s"}}]}
        status, body = _post(daemon, "/api/v1/alertmanager", alert)
        assert status == 200 and len(json.loads(body)["started"]) == 1, body
        flood.wait(timeout=30)

        def ended() -> list[dict[str, object]]:
            _status, body = _get(daemon, "/api/v1/captures")
            return [c for c in json.loads(body)["captures"] if c["ended"]]

        wait_for(ended, 15)
        (capture,) = ended()
        assert "No space left on device" in str(capture["ended"]), capture
        # the daemon goes on: metrics, and a new trace streamed to the client
        assert daemon.scrape().sum("podnet_packets_total", pod=a.name) > 400
        status, pcap = _get(daemon, f"/api/v1/namespaces/lab/pods/{b.name}/capture?duration=1s")
        assert status == 200 and pcap[:4] == b"\x0a\x0d\x0d\x0a", pcap[:64]
    finally:
        if daemon is not None:
            assert daemon.stop() == 0
        time.sleep(0.2)
        subprocess.run(["umount", str(disk)], check=False)


def _get(daemon: Daemon, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(daemon.base + path, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(daemon: Daemon, path: str, doc: object) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(daemon.base + path, data=json.dumps(doc).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
