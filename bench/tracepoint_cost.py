"""Cost of the tracepoint probes under storms, and the choice of the RTT hook.

- Drop storm: a pod sends datagrams to a closed port of another; every one is a
  NO_SOCKET drop. The daemon (with --bpf-stats) reports the kfree_skb
  program's runs and run time; its count is checked against the receiving
  pod's own UdpNoPorts (nstat).
- Retransmit storm: iperf3 through nft random loss; the retransmit program's
  cost, its count against TcpRetransSegs.
- RTT hook: the same traffic (an iperf3 run and short connections) seen by a
  minimal program on tcp:tcp_probe (fires on every incoming ACK) and by ours on
  sock:inet_sock_set_state (fires on state changes): runs and time of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bcc import BPF  # type: ignore[import-untyped]

from bench.common import UDP_SENDER, daemon, lab_pods, machine, run_in, spawn_in
from monitor.kernel import syscalls

TCP_PROBE_SRC = r"""
BPF_ARRAY(samples, u64, 32);
TRACEPOINT_PROBE(tcp, tcp_probe) {
    u32 srtt = args->srtt;
    u32 b = bpf_log2l(srtt >> 3) & 31;
    u64 *v = samples.lookup(&b);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""
SHORT_CONNECTIONS = ("import socket,sys\nfor _ in range(int(sys.argv[2])):\n"
                     "  c=socket.create_connection((sys.argv[1],8080),timeout=5); c.close()")
ACCEPTOR = ("import socket\ns=socket.create_server(('0.0.0.0',8080),backlog=512)\n"
            "while True:\n  c,_=s.accept(); c.close()")


def scrape(address: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("podnet_monitor_bpf_run") and 'program="' in line:
            name = line.split("{", 1)[0]
            program = line.split('program="', 1)[1].split('"', 1)[0]
            out[(name, program)] = float(line.rsplit(" ", 1)[1])
    return out


def nstat(pod: object, counter: str) -> int:
    out = run_in(pod, "nstat", "-asz", counter)  # type: ignore[arg-type]
    for line in out.splitlines():
        if line.startswith(counter):
            return int(line.split()[1])
    return 0


def program_cost(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float],
                 program: str) -> tuple[int, float]:
    runs = after.get(("podnet_monitor_bpf_runs_total", program), 0) - before.get(
        ("podnet_monitor_bpf_runs_total", program), 0)
    seconds = after.get(("podnet_monitor_bpf_run_seconds_total", program), 0) - before.get(
        ("podnet_monitor_bpf_run_seconds_total", program), 0)
    return int(runs), (seconds * 1e9 / runs if runs else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--drops", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with lab_pods(2) as (lab, (a, b)), daemon(lab.inventory, "--bpf-stats", "true") as address:
        # drop storm
        before, noports_before = scrape(address), nstat(b, "UdpNoPorts")
        metrics_before = urllib.request.urlopen(f"http://{address}/metrics").read().decode()
        started = time.monotonic()
        run_in(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(args.drops), "16")
        elapsed = time.monotonic() - started
        time.sleep(1)
        after, noports_after = scrape(address), nstat(b, "UdpNoPorts")
        metrics_after = urllib.request.urlopen(f"http://{address}/metrics").read().decode()
        runs, ns = program_cost(before, after, "tracepoint__skb__kfree_skb")
        kernel = noports_after - noports_before
        ours = drops_of(metrics_after, b.name) - drops_of(metrics_before, b.name)
        print(f"RESULT drop storm: {kernel} NO_SOCKET drops in {elapsed:.1f} s; podnetmon counted "
              f"{ours} ({'exact' if ours == kernel else 'MISMATCH'}); kfree_skb program "
              f"{ns:.0f} ns/run over {runs} runs")

        # retransmit storm
        run_in(b, "nft", "-f", "-", stdin="table inet bench {\n chain input {\n  type filter "
               "hook input priority 0;\n  tcp dport 5201 numgen random mod 100 < 5 drop\n }\n}\n")
        server = spawn_in(b, "iperf3", "-s")
        time.sleep(0.5)
        before, segs_before = scrape(address), nstat(a, "TcpRetransSegs")
        metrics_before = urllib.request.urlopen(f"http://{address}/metrics").read().decode()
        run_in(a, "iperf3", "-c", b.ip, "-t", "5")
        time.sleep(1.5)
        after, segs_after = scrape(address), nstat(a, "TcpRetransSegs")
        metrics_after = urllib.request.urlopen(f"http://{address}/metrics").read().decode()
        runs, ns = program_cost(before, after, "tracepoint__tcp__tcp_retransmit_skb")
        kernel = segs_after - segs_before
        ours = retrans_of(metrics_after, a.name) - retrans_of(metrics_before, a.name)
        print(f"RESULT retransmit storm: {kernel} TcpRetransSegs; podnetmon counted {ours} "
              f"({'exact' if ours == kernel else 'MISMATCH'}); retransmit program {ns:.0f} "
              f"ns/run over {runs} runs")
        run_in(b, "nft", "delete", "table", "inet", "bench")

        # RTT hook: tcp_probe (a minimal program) against inet_sock_set_state (ours)
        stats_fd = syscalls.enable_run_stats()
        probe = BPF(text=TCP_PROBE_SRC.encode())
        fn = probe.funcs[b"tracepoint__tcp__tcp_probe"]
        acceptor = spawn_in(b, sys.executable, "-c", ACCEPTOR)
        time.sleep(0.5)
        p0 = syscalls.prog_info(fn.fd)
        before = scrape(address)
        run_in(a, "iperf3", "-c", b.ip, "-t", "3")
        time.sleep(0.3)
        run_in(a, sys.executable, "-c", SHORT_CONNECTIONS, b.ip, "200")
        after = scrape(address)
        p1 = syscalls.prog_info(fn.fd)
        probe.cleanup()
        os.close(stats_fd)
        for proc in (server, acceptor):
            proc.kill()
            proc.wait()
        probe_runs = p1.run_cnt - p0.run_cnt
        probe_ns = (p1.run_time_ns - p0.run_time_ns) / max(probe_runs, 1)
        runs, ns = program_cost(before, after, "tracepoint__sock__inet_sock_set_state")
        print(f"RESULT rtt hook: tcp:tcp_probe {probe_runs} runs x {probe_ns:.0f} ns = "
              f"{probe_runs * probe_ns / 1e6:.2f} ms; sock:inet_sock_set_state {runs} runs x "
              f"{ns:.0f} ns = {runs * ns / 1e6:.2f} ms (same traffic: a 3 s iperf3 run and "
              "200 short connections)")
    return 0


def _metric_sum(text: str, name: str, pod: str, extra: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'pod="{pod}"' in line and extra in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def drops_of(text: str, pod: str) -> int:
    return int(_metric_sum(text, "podnet_drops_total", pod, 'reason="NO_SOCKET"'))


def retrans_of(text: str, pod: str) -> int:
    return int(_metric_sum(text, "podnet_tcp_retransmits_total", pod))


if __name__ == "__main__":
    sys.exit(main())
