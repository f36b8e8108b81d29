"""A start-up never harms what runs: a second daemon, a bad setting and `run --check` beside
a live daemon under traffic, and a start-up that fails after adopting the last daemon's
pinned maps.

The oracles are the kernel's own: the veths' statistics against the live daemon's packets,
closed-port datagrams against its NO_SOCKET drops, and what `bpftool` and `tc` show of our
pinned maps, links and filters (ids, so a replaced object shows as a new one).
Before the fixes (monitor/instance.py, Programs.abort, the check's own tc handle), the
check and the second daemon each left the live daemon counting no packet (its filters
replaced, then removed; the second one's stop also unpinned its maps and detached its
tracepoint links), and the failed start-up unpinned every adopted map and two of the left
tracepoint links.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitor.kernel import kernelinfo
from podnetlab.lab import Lab, LabPod
from tests.kernel.support import (
    ROOT,
    UDP_SENDER,
    Daemon,
    LabRun,
    bpftool_json,
    drop_keys,
    free_port,
    in_pod,
    lab_with_daemon,
    our_programs,
    quiet_window,
    spawn_in_pod,
    wait_for,
)

PINS = Path("/sys/fs/bpf/podnetmon")
DATAGRAMS = 7  # to a closed port: one NO_SOCKET drop each


def kernel_state(pods: list[LabPod]) -> dict[str, object]:
    """Everything of ours in the kernel, by id: each pin's map or link (and its program),
    the tracepoint generation, and our programs on each pod's veth."""
    state: dict[str, object] = {}
    for path in sorted(PINS.rglob("*")) if PINS.exists() else []:
        if path.is_dir():
            continue
        kind = "link" if path.parent.name == "links" else "map"
        info = bpftool_json(kind, "show", "pinned", str(path))
        assert isinstance(info, dict)
        state[str(path.relative_to(PINS))] = (info["id"], info.get("prog_id"))
        if path.name == "pnm_generation":
            state["generation"] = bpftool_json("map", "dump", "pinned", str(path))
    for pod in pods:
        state[pod.host_veth] = our_programs(pod.host_veth)
    return state


def run_second(*args: str, timeout: float = 90) -> tuple[int, list[dict[str, object]], str]:
    """`podnetmon run ARGS` to its end: exit code, its log events, its output. One that is
    still running after `timeout` (it did not refuse to start) is stopped, and fails."""
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--log-format", "json",
                             *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"`run {' '.join(args)}` kept running beside the live daemon:\n"
                             f"{out[-3000:]}") from None
    events = []
    for line in out.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return proc.returncode, events, out


def _event(events: list[dict[str, object]], name: str) -> dict[str, object] | None:
    return next((e for e in events if e.get("event") == name), None)


def no_socket_drops(run: LabRun, pod: LabPod) -> float:
    return run.daemon.scrape().sum("podnet_drops_total", pod=pod.name, reason="NO_SOCKET")


@pytest.fixture(scope="class")
def live() -> Iterator[LabRun]:
    """Two lab pods and their daemon, for TestBesideALiveDaemon (gone before the tests
    after it, which need no daemon to run)."""
    with lab_with_daemon(2, neighbours=True) as run:
        yield run


def beside_the_live_daemon(live: LabRun, attempt: Callable[[], None]) -> None:
    """`attempt` under a 200/s ping between the two pods; then every packet of the whole
    time is in the live daemon's counters exactly as the veths counted it, its drops still
    count one per datagram, and our filters, pins and links are the very same objects."""
    a, b = live.pods
    in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
    state = kernel_state(live.pods)
    before = quiet_window(live.daemon, live.pods)
    ping = spawn_in_pod(a, "ping", "-i", "0.005", "-q", b.ip)
    started = time.monotonic()
    try:
        attempt()
    finally:
        while time.monotonic() - started < 1:  # some traffic whatever the attempt took
            time.sleep(0.05)
        ping.send_signal(signal.SIGINT)
        summary, _ = ping.communicate(timeout=10)
    drops = no_socket_drops(live, b)
    sent = int(in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(DATAGRAMS),
                      "16").stdout)
    assert sent == DATAGRAMS
    wait_for(lambda: no_socket_drops(live, b) - drops >= DATAGRAMS, timeout=3)
    after = quiet_window(live.daemon, live.pods)
    pinged = int(summary.split(" packets transmitted")[0].split()[-1])
    print(f"\n{pinged} pings during the attempt, {DATAGRAMS} drops after it")
    for pod in live.pods:
        for direction, stat in (("egress", "rx_packets"), ("ingress", "tx_packets")):
            ours = (after.metrics.sum("podnet_packets_total", pod=pod.name, direction=direction)
                    - before.metrics.sum("podnet_packets_total", pod=pod.name,
                                         direction=direction))
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            assert ours == kernel >= pinged, (pod.name, direction, ours, kernel)
    assert no_socket_drops(live, b) - drops == DATAGRAMS
    assert kernel_state(live.pods) == state
    assert live.daemon.proc.poll() is None


class TestBesideALiveDaemon:
    """A live daemon under traffic, and beside it what must not harm it."""

    def test_a_second_daemon_on_the_same_port_stops_and_harms_nothing(self, live: LabRun) -> None:
        def attempt() -> None:
            code, events, out = run_second("--listen", f"127.0.0.1:{live.daemon.port}",
                                           "--inventory", str(live.lab.inventory))
            assert code != 0, out
            assert _event(events, "cannot listen") or _event(
                events, "another podnetmon daemon runs on this node: this one stops before "
                        "touching the kernel"), out
            assert _event(events, "bpf programs loaded") is None, out

        beside_the_live_daemon(live, attempt)

    def test_a_second_daemon_on_another_port_names_the_live_one_and_harms_nothing(
            self, live: LabRun) -> None:
        def attempt() -> None:
            started = time.monotonic()
            code, events, out = run_second("--listen", f"127.0.0.1:{free_port()}",
                                           "--inventory", str(live.lab.inventory))
            took = time.monotonic() - started
            print(f"\nthe second daemon exited {code} after {took:.2f} s")
            assert code == 1, out
            refused = _event(events, "another podnetmon daemon runs on this node: this one stops "
                                     "before touching the kernel")
            assert refused is not None, out
            assert refused["daemon"] == live.daemon.proc.pid, refused
            assert _event(events, "bpf programs loaded") is None, out  # no compile, no load

        beside_the_live_daemon(live, attempt)

    def test_bad_auth_settings_exit_2_and_harm_nothing(self, live: LabRun, tmp_path: Path) -> None:
        def attempt() -> None:
            for args in (("--auth", "token"),  # no --auth-token-file
                         ("--auth", "kubernetes", "--kubeconfig", str(tmp_path / "missing"))):
                code, events, out = run_second("--listen", f"127.0.0.1:{free_port()}",
                                               "--inventory", str(live.lab.inventory), *args)
                assert code == 2, (args, out)
                assert _event(events, "bpf programs loaded") is None, out

        beside_the_live_daemon(live, attempt)

    def test_run_check_beside_the_live_daemon_attaches_beside_it(self, live: LabRun) -> None:
        def attempt() -> None:
            code, events, out = run_second("--check", "--inventory", str(live.lab.inventory))
            assert code == 0, out
            beside = _event(events, "a daemon runs on this node: the check leaves its programs, "
                                    "filters and pins alone")
            assert beside is not None and beside["daemon"] == live.daemon.proc.pid, out
            done = _event(events, "check done")
            assert done is not None and done["attached"] == 2 and done["tc_handle"] == "0x504f", out

        beside_the_live_daemon(live, attempt)


# -- a start-up that fails after adopting ----------------------------------------------


def broken_tracefs(root: Path, broken: str) -> Path:
    """tracefs as it is, but for one tracepoint whose id cannot be read: the daemon sees
    it (its format is there) and fails to attach it, after the ones before it attached."""
    real = Path("/sys/kernel/tracing")
    category, event = broken.split(":")
    (root / "events" / category).mkdir(parents=True)
    for entry in real.iterdir():
        if entry.name != "events":
            (root / entry.name).symlink_to(entry)
    for entry in (real / "events").iterdir():
        if entry.name != category:
            (root / "events" / entry.name).symlink_to(entry)
    for entry in (real / "events" / category).iterdir():
        if entry.name != event:
            (root / "events" / category / entry.name).symlink_to(entry)
    (root / "events" / category / event).mkdir()
    (root / "events" / category / event / "format").write_text(
        (real / "events" / category / event / "format").read_text())
    return root


def pinned_no_socket(pod: LabPod) -> int:
    """NO_SOCKET drops of the pod's netns in the kernel's drop map (counted with no daemon)."""
    names = kernelinfo.probe(proc_root="/proc", tracefs_root="/sys/kernel/tracing",
                             btf_path="/sys/kernel/btf/vmlinux").drop_reason
    inode = int(Path(pod.netns_path).stat().st_ino)
    return sum(count for kind, ident, reason, count in drop_keys()
               if kind == 1 and ident == inode and names(reason) == "NO_SOCKET")


@pytest.mark.parametrize("mode", ["tc", "tcx"])
def test_a_start_up_failing_after_adoption_leaves_the_kernel_as_it_found_it(
        lab: Lab, tmp_path: Path, mode: str) -> None:
    a, b = lab.up(2)
    first = Daemon("--leave-attached", "true", "--attach-mode", mode, inventory=str(lab.inventory))
    try:
        _fail_after_adoption(first, a, b, inventory=str(lab.inventory),
                             tracefs_dir=tmp_path / "tracefs", mode=mode)
    finally:
        first.stop()


def _fail_after_adoption(first: Daemon, a: LabPod, b: LabPod, *, inventory: str,
                         tracefs_dir: Path, mode: str) -> None:
    in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(DATAGRAMS), "16")
    wait_for(lambda: first.scrape().sum("podnet_drops_total", pod=b.name,
                                        reason="NO_SOCKET") >= DATAGRAMS, timeout=3)
    assert first.stop() == 0  # leaves everything counting, as for an upgrade
    found = kernel_state([a, b])
    assert any(k.startswith("links/tp-") for k in found) and any(k.startswith("maps-")
                                                                 for k in found)
    # the tracepoint programs broken by the fault are after skb:kfree_skb's and
    # tcp_retransmit_skb's: two links of the new daemon attached before it failed
    tracefs = broken_tracefs(tracefs_dir, "tcp:tcp_retransmit_synack")
    code, events, out = run_second("--listen", f"127.0.0.1:{free_port()}", "--inventory",
                                   inventory, "--attach-mode", mode, "--tracefs-root",
                                   str(tracefs))
    assert code == 1, out
    loaded = _event(events, "bpf programs loaded")
    assert loaded is not None and loaded["adopted"] is True, out  # it failed after adopting
    assert _event(events, "cannot attach the tracepoint programs") is not None, out
    assert kernel_state([a, b]) == found
    # and `run --check` beside what was left leaves it too
    code, events, out = run_second("--check", "--inventory", inventory, "--attach-mode", mode)
    assert code == 0, out
    assert kernel_state([a, b]) == found
    # what was left still counts: the drop tracepoint's program is the last daemon's own
    counted = pinned_no_socket(b)
    in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", str(DATAGRAMS), "16")
    wait_for(lambda: pinned_no_socket(b) - counted >= DATAGRAMS, timeout=3)
    assert pinned_no_socket(b) - counted == DATAGRAMS
    shutil.rmtree(tracefs)
    # the next daemon adopts all of it: the counters went on through both attempts
    nxt = Daemon("--attach-mode", mode, inventory=inventory)
    try:
        m = nxt.scrape()
        assert m.sum("podnet_monitor_maps", maps="core", state="adopted") == 1
        assert m.sum("podnet_monitor_maps", state="adopted") == m.sum("podnet_monitor_maps")
        assert m.sum("podnet_drops_total", pod=b.name, reason="NO_SOCKET") == 2 * DATAGRAMS
    finally:
        assert nxt.stop() == 0
