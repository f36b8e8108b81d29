"""Peers at scale: scrape time and memory with 500 pods each talking to ten peers, the
API knowing 10,000 pods and 1,000 services of the cluster, in one run.

The daemon names pods from tests/fakeapi.py (the real client) with --peer-index cluster:
the lab's 500 pods on this node, and 10,000 pods of 500 other nodes (10,000 workloads)
with 1,000 services. Each lab pod sends one datagram to each of ten cluster pods (routed
through the host, so no neighbour entry is made per peer), then scrapes are timed and the
daemon's memory read from /proc. The same is measured with the peers probe off, in the
same run, for the difference.

Goals (issue 17): a scrape at 500 pods with peers on within 120 ms; resident memory at 500
pods with peers and 10,000 cluster pods known within 120 MiB. RESULT lines are the figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import lab_pods, machine, median, run_in, running_daemon
from monitor.probes import REGISTRY
from podnetlab.lab import LabPod
from tests.fakeapi import FakeApiServer, make_pod, make_service

NODE = "bench-node"
HOST = "10.213.255.254"  # the host's address on the lab bridge, the pods' next hop
SENDER = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          "for dst in sys.argv[1:]:\n    s.sendto(b'x' * 58, (dst, 9))\n")


def far_ip(i: int) -> str:
    return f"10.216.{i // 250}.{i % 250 + 1}"


def fill_api(api: FakeApiServer, pods: list[LabPod], far: int, services: int) -> None:
    for p in pods:
        api.add(make_pod(p.name, "lab", p.uid, NODE, owner=("StatefulSet", f"app-{p.index}"),
                         pod_ips=[p.ip]))
    for i in range(far):
        api.add(make_pod(f"far{i}-0", f"ns{i % 300}", str(uuid.uuid4()), f"node-{i % 500}",
                         owner=("StatefulSet", f"far{i}"), pod_ips=[far_ip(i)],
                         host_ips=[f"192.0.{2 + i % 500 // 250}.{i % 250 + 1}"]))
    for i in range(services):
        api.add_service(make_service(f"svc{i}", f"ns{i % 300}", f"10.96.{i // 250}.{i % 250 + 1}"))


def talk(pods: list[LabPod], bridge_mac: str, peers: int, far: int) -> None:
    for n, p in enumerate(pods):
        run_in(p, "ip", "neigh", "replace", HOST, "lladdr", bridge_mac, "dev", "eth0", "nud",
               "permanent")
        run_in(p, "ip", "route", "replace", "10.216.0.0/16", "via", HOST)
        run_in(p, sys.executable, "-c", SENDER, *(far_ip((n * peers + k) % far)
                                                  for k in range(peers)))


def scrape_ms(address: str, n: int) -> tuple[float, int]:
    times, lines = [], 0
    for _ in range(n):
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as r:
            body = r.read()
        times.append(time.monotonic() - t0)
        lines = body.count(b"\n")
    return median(times) * 1000, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--peers", type=int, default=10, help="peers each pod sends to")
    parser.add_argument("--far", type=int, default=10_000, help="pods of other nodes in the API")
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--scrapes", type=int, default=15)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with lab_pods(args.pods) as (lab, pods), FakeApiServer(node=NODE) as api, \
            tempfile.TemporaryDirectory(prefix="podnetmon-bench-peers-") as tmp:  # goes with it
        fill_api(api, pods, args.far, args.services)
        kubeconfig = api.write_kubeconfig(str(Path(tmp) / "kubeconfig"))
        subprocess.run(["ip", "addr", "add", f"{HOST}/16", "dev", "pnmlab0"], check=True)
        try:
            bridge_mac = Path("/sys/class/net/pnmlab0/address").read_text().strip()
            without = ",".join(n for n in REGISTRY if n not in ("peers", "dnsnames"))
            for label, probes in (("peers off", without), ("peers on", "")):
                extra = ("--probes", probes) if probes else ()
                with running_daemon(lab.inventory, "--metadata", "kubernetes", "--kubeconfig",
                                    kubeconfig, "--node-name", NODE, "--peer-index", "cluster",
                                    "--runtime-dirs", str(lab.runtime_dir), *extra) as daemon:
                    time.sleep(5)  # the cluster index's first lists
                    t0 = time.monotonic()
                    talk(pods, bridge_mac, args.peers, args.far)
                    print(f"traffic: {args.pods} pods x {args.peers} peers in "
                          f"{time.monotonic() - t0:.1f} s", flush=True)
                    ms, lines = scrape_ms(daemon.address, args.scrapes)
                    rss = daemon.status("VmRSS") / 1024
                    hwm = daemon.status("VmHWM") / 1024
                    print(f"RESULT peers {label}: scrape median {ms:.0f} ms ({lines} lines), "
                          f"VmRSS {rss:.1f} MiB, VmHWM {hwm:.1f} MiB (goals with peers on: "
                          "scrape <= 120 ms, RSS <= 120 MiB)", flush=True)
        finally:
            subprocess.run(["ip", "addr", "del", f"{HOST}/16", "dev", "pnmlab0"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
