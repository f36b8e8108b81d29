"""Beside other agents' programs: chain politely, remove only what is ours."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from podnetlab.lab import Lab
from tests.kernel.foreign import ForeignPrograms
from tests.kernel.support import (
    Daemon,
    bpftool_json,
    in_pod,
    our_programs,
    quiet_window,
    spawn_in_pod,
    tc_filters,
    tc_qdiscs,
    wait_for,
)


@pytest.fixture
def foreign() -> Iterator[ForeignPrograms]:
    progs = ForeignPrograms()
    try:
        yield progs
    finally:
        progs.close()


def _ours(w: object, pod: str, direction: str) -> int:
    return int(w.metrics.sum("podnet_packets_total", pod=pod, direction=direction))  # type: ignore[attr-defined]


def _our_programs_loaded() -> list[str]:
    progs = bpftool_json("prog", "show")
    assert isinstance(progs, list)
    return [p.get("name", "") for p in progs if str(p.get("name", "")).startswith("pnm_tc_")]


@pytest.mark.parametrize("mode", ["tc", "tcx"])
def test_foreign_filter_before_ours_both_count_everything(
        lab: Lab, foreign: ForeignPrograms, daemons: list[Daemon], mode: str) -> None:
    a, b = lab.up(2)
    # tc: a classic filter before ours (4096) runs first; tcx: ours runs before every
    # classic filter
    foreign.attach_tc(a.host_veth, prio=100)
    daemon = Daemon("--attach-mode", mode, inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
    before, f_before = quiet_window(daemon, [a, b]), foreign.counts()
    in_pod(a, "ping", "-c", "23", "-i", "0.01", "-q", b.ip)
    after, f_after = quiet_window(daemon, [a, b]), foreign.counts()
    sysfs_rx = after.stats[a.host_veth]["rx_packets"] - before.stats[a.host_veth]["rx_packets"]
    sysfs_tx = after.stats[a.host_veth]["tx_packets"] - before.stats[a.host_veth]["tx_packets"]
    assert sysfs_rx >= 23 and sysfs_tx >= 23
    # TC ingress of the host veth = what the pod sends; both programs saw every packet
    ours_out = _ours(after, a.name, "egress") - _ours(before, a.name, "egress")
    ours_in = _ours(after, a.name, "ingress") - _ours(before, a.name, "ingress")
    assert f_after[0] - f_before[0] == sysfs_rx == ours_out
    assert f_after[1] - f_before[1] == sysfs_tx == ours_in

    assert daemon.stop() == 0
    for hook in ("ingress", "egress"):
        listing = tc_filters(a.host_veth, hook)
        assert "pnmtest-" in listing, listing  # theirs stays
    assert our_programs(a.host_veth) == {}  # ours is gone
    assert "clsact" in tc_qdiscs(a.host_veth)
    assert _our_programs_loaded() == []
    # and theirs keeps working after we left
    f_mid = foreign.counts()
    in_pod(a, "ping", "-c", "3", "-i", "0.01", "-q", b.ip)
    assert foreign.counts()[0] - f_mid[0] >= 3


def test_auto_mode_joins_tcx_where_the_device_has_tcx_programs(
        lab: Lab, foreign: ForeignPrograms, daemons: list[Daemon]) -> None:
    a, b = lab.up(2)
    ifindex = int(Path(f"/sys/class/net/{a.host_veth}/ifindex").read_text())
    foreign.attach_tcx(ifindex)
    daemon = Daemon(inventory=str(lab.inventory))
    daemons.append(daemon)
    modes = {p["pod"]: p["attach_mode"] for p in daemon.pods_api()}
    assert modes == {a.name: "tcx", b.name: "tc"}
    assert set(our_programs(a.host_veth)) == {"tcx ingress", "tcx egress"}
    assert set(our_programs(b.host_veth)) == {"tc ingress", "tc egress"}
    in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
    before, f_before = quiet_window(daemon, [a, b]), foreign.counts()
    in_pod(a, "ping", "-c", "23", "-i", "0.01", "-q", b.ip)
    after, f_after = quiet_window(daemon, [a, b]), foreign.counts()
    sysfs_rx = after.stats[a.host_veth]["rx_packets"] - before.stats[a.host_veth]["rx_packets"]
    sysfs_tx = after.stats[a.host_veth]["tx_packets"] - before.stats[a.host_veth]["tx_packets"]
    ours_out = _ours(after, a.name, "egress") - _ours(before, a.name, "egress")
    ours_in = _ours(after, a.name, "ingress") - _ours(before, a.name, "ingress")
    assert f_after[0] - f_before[0] == sysfs_rx == ours_out
    assert f_after[1] - f_before[1] == sysfs_tx == ours_in
    assert daemon.stop() == 0
    assert _our_programs_loaded() == []  # our tcx links went with our programs
    f_mid = foreign.counts()
    in_pod(a, "ping", "-c", "3", "-i", "0.01", "-q", b.ip)
    assert foreign.counts()[0] - f_mid[0] >= 3  # theirs is still attached and running


@pytest.mark.parametrize("mode", ["tc", "tcx"])
def test_forced_mode_counts_exactly_and_leaves_nothing(
        lab: Lab, daemons: list[Daemon], mode: str) -> None:
    pods = lab.up(2)
    daemon = Daemon("--attach-mode", mode, inventory=str(lab.inventory))
    daemons.append(daemon)
    assert {p["attach_mode"] for p in daemon.pods_api()} == {mode}
    for pod in pods:
        assert set(our_programs(pod.host_veth)) == {f"{mode} ingress", f"{mode} egress"}
    in_pod(pods[0], "ping", "-c", "1", "-W", "1", pods[1].ip)
    before = quiet_window(daemon, pods)
    in_pod(pods[0], "ping", "-c", "23", "-i", "0.01", "-q", pods[1].ip)
    after = quiet_window(daemon, pods)
    for pod in pods:
        for direction, stat in (("egress", "rx_packets"), ("ingress", "tx_packets")):
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            assert _ours(after, pod.name, direction) - _ours(before, pod.name, direction) == kernel
    assert daemon.stop() == 0
    for pod in pods:
        assert our_programs(pod.host_veth) == {}
    assert _our_programs_loaded() == []


@pytest.mark.parametrize("mode", ["tc", "auto"])
def test_someone_elses_filter_at_our_priority_and_handle_is_left_alone(
        lab: Lab, foreign: ForeignPrograms, daemons: list[Daemon], mode: str) -> None:
    a, b = lab.up(2)
    # another agent happens to use our priority and handle (4096, 0x504e)
    pin_prio = 4096
    foreign.attach_tc(a.host_veth, prio=pin_prio)
    listing = tc_filters(a.host_veth, "ingress")
    assert "handle 0x1" in listing
    daemon = Daemon("--tc-handle", "1", "--attach-mode", mode, inventory=str(lab.inventory))
    daemons.append(daemon)
    by_pod = {p["pod"]: p for p in daemon.pods_api()}
    if mode == "auto":  # with tcx at hand, ours goes first by tcx, theirs stays as it is
        assert by_pod[a.name]["attach_mode"] == "tcx"
        assert daemon.stop() == 0
        assert "pnmtest-" in tc_filters(a.host_veth, "ingress")
        return
    assert by_pod[a.name]["attach_mode"] == ""  # refused, not overwritten
    assert "another agent" in str(by_pod[a.name]["last_error"])
    assert by_pod[b.name]["attach_mode"] == "tc"
    assert daemon.scrape().sum("podnet_monitor_attach_errors_total") >= 1
    assert daemon.stop() == 0
    assert "pnmtest-" in tc_filters(a.host_veth, "ingress")  # theirs untouched
    events = [e for e in daemon.log_events() if e.get("event") == "attach failed"]
    assert events and events[0]["interface"] == a.host_veth
    json.dumps(events)  # log lines are plain data


def test_a_filter_ending_tc_processing_before_ours_is_noticed(lab: Lab, daemons: list[Daemon]) -> None:
    """With classic tc forced (what a kernel without tcx has): reported, with its reason."""
    a, b = lab.up(2)
    daemon = Daemon("--attach-mode", "tc", "--bypass-check-interval", "1", "--sweep-interval",
                    "0.2", inventory=str(lab.inventory))
    daemons.append(daemon)
    in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
    passer = ForeignPrograms(verdict="TC_ACT_OK")  # ends TC processing: ours never runs
    try:
        passer.attach_tc(a.host_veth, prio=10, hooks=("ingress",))
        pinger = spawn_in_pod(a, "ping", "-i", "0.02", "-c", "150", b.ip)

        def bypassed(pod: str) -> float:
            return daemon.scrape().sum("podnet_monitor_bypassed", pod=pod)

        wait_for(lambda: bypassed(a.name) == 1, timeout=10)
        assert daemon.scrape().has("podnet_monitor_bypassed", pod=a.name,
                                   reason="tc_filter_first")
        assert {p["pod"]: p["bypassed"] for p in daemon.pods_api()}[a.name] == "tc_filter_first"
        assert bypassed(b.name) == 0  # b's traffic still reaches our programs
        pinger.wait(timeout=10)
    finally:
        passer.close()
    pinger = spawn_in_pod(a, "ping", "-i", "0.02", "-c", "150", b.ip)
    wait_for(lambda: daemon.scrape().sum("podnet_monitor_bypassed", pod=a.name) == 0, timeout=10)
    pinger.wait(timeout=10)
    events = [e["event"] for e in daemon.log_events() if e.get("component") == "bypass"
              and e["event"] != "bypass reason changed"]  # (once the filter went: unknown)
    assert events == ["traffic bypasses our programs", "traffic reaches our programs again"]


def test_a_tcx_program_passing_before_ours_is_noticed(
        lab: Lab, foreign: ForeignPrograms, daemons: list[Daemon]) -> None:
    a, b = lab.up(2)
    ifindex = int(Path(f"/sys/class/net/{a.host_veth}/ifindex").read_text())
    foreign.attach_tcx(ifindex)  # tcx on the device: auto mode joins with a tcx link
    daemon = Daemon("--bypass-check-interval", "1", "--sweep-interval", "0.2",
                    inventory=str(lab.inventory))
    daemons.append(daemon)
    assert {p["pod"]: p["attach_mode"] for p in daemon.pods_api()}[a.name] == "tcx"
    in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
    passer = ForeignPrograms(verdict="0")  # TCX_PASS, put ahead of ours: ours never runs
    try:
        passer.attach_tcx(ifindex, first=True)
        pinger = spawn_in_pod(a, "ping", "-i", "0.02", "-c", "150", b.ip)
        wait_for(lambda: daemon.scrape().sum("podnet_monitor_bypassed", pod=a.name) == 1,
                 timeout=10)
        assert daemon.scrape().sum("podnet_monitor_bypassed", pod=b.name) == 0
        pinger.wait(timeout=10)
        assert passer.counts()[0] >= 150  # it saw them; and its verdict stood: ping got through
        assert pinger.returncode == 0
    finally:
        passer.close()
    pinger = spawn_in_pod(a, "ping", "-i", "0.02", "-c", "150", b.ip)
    wait_for(lambda: daemon.scrape().sum("podnet_monitor_bypassed", pod=a.name) == 0, timeout=10)
    pinger.wait(timeout=10)
