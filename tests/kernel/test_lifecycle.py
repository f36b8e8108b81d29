"""Pods come and go while the daemon runs; the lab and the daemon leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from podnetlab.lab import BRIDGE, Lab
from podnetlab.runtimes import CGROUP_PARENT, cgroup2_root
from tests.kernel.support import (
    ROOT,
    Daemon,
    ifslot_of,
    in_pod,
    our_programs,
    quiet_window,
    spawn_in_pod,
    wait_for,
)


def test_new_pod_counted_within_one_second(lab: Lab, daemons: list[Daemon]) -> None:
    first = lab.up(1)[0]
    daemon = Daemon(inventory=str(lab.inventory))
    daemons.append(daemon)
    started = time.monotonic()  # before the veth exists: the bound below is strict
    new = lab.add()
    made = time.monotonic() - started

    def counted() -> bool:
        return ("lab", new.name) in daemon.scrape().pods()

    took = made + wait_for(counted, timeout=5, interval=0.01)
    assert took <= 1.0, f"new pod counted after {took:.3f} s"
    in_pod(new, "ping", "-c", "1", "-W", "1", first.ip)
    before = quiet_window(daemon, [first, new])
    in_pod(new, "ping", "-c", "7", "-i", "0.01", "-q", first.ip)
    after = quiet_window(daemon, [first, new])
    delta = after.metrics.sum("podnet_packets_total", pod=new.name, direction="egress") - \
        before.metrics.sum("podnet_packets_total", pod=new.name, direction="egress")
    kernel = after.stats[new.host_veth]["rx_packets"] - before.stats[new.host_veth]["rx_packets"]
    assert delta == kernel >= 7


def test_removed_pod_loses_its_series_and_map_entry(lab: Lab, daemons: list[Daemon]) -> None:
    keep, gone = lab.up(2)
    daemon = Daemon(inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(gone, "ping", "-c", "3", "-i", "0.01", "-q", keep.ip)
    ifindex = int(Path(f"/sys/class/net/{gone.host_veth}/ifindex").read_text())
    assert ifslot_of(ifindex) is not None
    assert daemon.scrape().sum("podnet_packets_total", pod=gone.name) > 0
    lab.remove(gone.name)

    def vanished() -> bool:
        m = daemon.scrape()
        return not m.has("podnet_packets_total", pod=gone.name) and (
            "lab", gone.name) not in m.pods()

    wait_for(vanished, timeout=5)
    assert ifslot_of(ifindex) is None  # bpftool's view of the kernel's slot table
    assert daemon.scrape().has("podnet_packets_total", pod=keep.name)
    detached = [e for e in daemon.log_events() if e.get("event") == "detached"]
    assert [e["interface"] for e in detached] == [gone.host_veth]


def test_pod_without_metadata_gets_the_fallback_then_its_name(
        lab: Lab, daemons: list[Daemon], tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("pods: []\n")
    a, b = lab.up(2)
    daemon = Daemon(inventory=str(inventory))
    daemons.append(daemon)
    fallback = f"netns-{a.netns}"
    assert ("_unknown", fallback) in daemon.scrape().pods()
    in_pod(a, "ping", "-c", "5", "-i", "0.01", "-q", b.ip)
    counted = daemon.scrape().sum("podnet_packets_total", pod=fallback, direction="egress")
    assert counted >= 5
    inventory.write_text(lab.inventory.read_text())  # the metadata arrives
    wait_for(lambda: ("lab", a.name) in daemon.scrape().pods(), timeout=15)
    m = daemon.scrape()
    assert not m.has("podnet_packets_total", pod=fallback)  # relabelled, not duplicated
    assert m.sum("podnet_packets_total", pod=a.name, direction="egress") >= counted  # no reset


@pytest.mark.parametrize("mode", ["auto", "tcx"])
def test_stop_removes_ours_and_keeps_the_qdisc(lab: Lab, daemons: list[Daemon], mode: str) -> None:
    pods = lab.up(3, pinned=1)
    daemon = Daemon("--attach-mode", mode, inventory=str(lab.inventory))
    hooks = "tc" if mode == "auto" else "tcx"  # auto: classic tc, as no device has tcx
    for pod in pods:
        assert set(our_programs(pod.host_veth)) == {f"{hooks} ingress", f"{hooks} egress"}
    assert daemon.stop() == 0
    for pod in pods:
        assert our_programs(pod.host_veth) == {}
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", pod.host_veth],
                                capture_output=True, text=True, check=True).stdout
        # A clsact we added is never deleted (another agent may have filters on it); tcx
        # needs none, so none is added.
        assert ("clsact" in qdiscs) == (mode == "auto"), qdiscs
    assert ifslot_of(int(Path(f"/sys/class/net/{pods[0].host_veth}/ifindex").read_text())) is None


def test_run_check_attaches_reports_and_detaches(lab: Lab) -> None:
    pods = lab.up(2, pinned=1)
    proc = subprocess.run([sys.executable, "-m", "monitor", "run", "--check", "--inventory",
                           str(lab.inventory), "--log-format", "json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert '"attached": 2' in proc.stderr
    for pod in pods:
        assert our_programs(pod.host_veth) == {}


def test_run_check_prints_a_summary_for_a_person_when_stderr_is_not_a_terminal(lab: Lab) -> None:
    pods = lab.up(2, pinned=1)
    proc = subprocess.run([sys.executable, "-m", "monitor", "run", "--check", "--inventory",
                           str(lab.inventory)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)  # stderr a pipe: the log is JSON
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.lstrip().startswith("{")  # the log itself stays as it was, on stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("podnetmon run --check: 2 pods found, 2 attached"), proc.stdout
    for pod in pods:
        assert any(line.split()[:4] == ["attached", "(tc)", f"lab/{pod.name}", pod.host_veth]
                   for line in lines), proc.stdout
    assert lines[-1] == "result: ok"


def test_bpf_stats_count_every_run_and_pods_table(lab: Lab, daemons: list[Daemon]) -> None:
    pods = lab.up(3)
    daemon = Daemon("--bpf-stats", "true", inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(pods[0], "ping", "-c", "1", "-W", "1", pods[1].ip)
    before = quiet_window(daemon, pods)
    in_pod(pods[0], "ping", "-c", "11", "-i", "0.01", "-q", pods[1].ip)
    after = quiet_window(daemon, pods)
    # Our ingress program runs once per packet any lab pod sends: the kernel's own
    # run count equals the sum of the host veths' rx_packets.
    runs = (after.metrics.sum("podnet_monitor_bpf_runs_total", program="pnm_tc_ingress")
            - before.metrics.sum("podnet_monitor_bpf_runs_total", program="pnm_tc_ingress"))
    rx = sum(after.stats[p.host_veth]["rx_packets"] - before.stats[p.host_veth]["rx_packets"]
             for p in pods)
    assert runs == rx >= 11
    assert after.metrics.sum("podnet_monitor_bpf_run_seconds_total") > 0
    table = subprocess.run([sys.executable, "-m", "monitor", "pods", "--address",
                            f"127.0.0.1:{daemon.port}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=30, check=True).stdout.splitlines()
    assert table[0].split()[:2] == ["NAMESPACE", "POD"]
    assert sorted(line.split()[1] for line in table[1:]) == ["pod-0", "pod-1", "pod-2"]
    assert all(" tc " in line for line in table[1:])


def test_check_command_passes_here() -> None:
    proc = subprocess.run([sys.executable, "-m", "monitor", "check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "podnetmon can run on this host" in proc.stdout
    for name in ("privileges", "bpf", "btf", "headers", "tracefs", "clsact", "cls_bpf", "tcx",
                 "cni", "neighbours"):
        assert any(line.split()[1:2] == [name] for line in proc.stdout.splitlines()), name


def test_bad_inventory_and_settings_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "inv.yaml"
    bad.write_text("pods:\n  - name: x\n")
    for args in (["--inventory", str(bad)], ["--attach-mode", "sideways"],
                 ["--inventory", str(tmp_path / "missing.yaml")]):
        proc = subprocess.run([sys.executable, "-m", "monitor", "run", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2, (args, proc.stderr)


def test_lab_down_leaves_nothing_even_with_processes_inside(lab: Lab) -> None:
    pods = lab.up(3, pinned=1)
    sleeper = spawn_in_pod(pods[2], "sleep", "600")  # keeps the pinned netns busy

    def inside() -> bool:
        try:
            return os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == pods[2].netns
        except OSError:
            return False

    wait_for(inside, timeout=5)  # nsenter has entered the pod's netns
    inodes = {p.netns for p in pods}
    lab.down()
    sleeper.wait(timeout=10)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          check=False).stdout
    assert "pnml" not in links and BRIDGE not in links
    assert not [n for n in os.listdir("/run/netns") if n.startswith("pnmlab-")] \
        if os.path.isdir("/run/netns") else True
    assert subprocess.run(["pgrep", "-x", "pause"], capture_output=True, check=False).returncode == 1
    assert not (cgroup2_root() / CGROUP_PARENT).exists()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:  # exited, or a process even root may not inspect (the VM's init)
            continue
        assert inode not in inodes
    assert lab.down() == []  # idempotent
