"""The DaemonSet's capability list is enough, and each capability in it is needed.

`setpriv --bounding-set` gives the daemon exactly the capabilities
deploy/base/daemonset.yaml adds (as root, the process gets what its bounding
set allows), on the real kernel: with all of them `run --check` attaches to
every lab pod; without any one, it fails or misses pods.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from podnetlab.lab import Lab
from tests.kernel.support import ROOT, Daemon, in_pod, our_programs, wait_for

DAEMONSET = ROOT / "deploy" / "base" / "daemonset.yaml"


def _capabilities() -> list[str]:
    doc = yaml.safe_load(DAEMONSET.read_text())
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return list(container["securityContext"]["capabilities"]["add"])


def _check(lab: Lab, caps: list[str]) -> tuple[int, int, list[str]]:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
    proc = subprocess.run(
        ["setpriv", "--bounding-set", bounding, "--inh-caps", "-all",
         sys.executable, "-m", "monitor", "run", "--check", "--log-format", "json",
         "--inventory", str(lab.inventory), "--runtime-dirs", str(lab.runtime_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    attached = sum(1 for e in events if e.get("event") == "attached")
    return proc.returncode, attached, [str(e.get("event")) for e in events]


@pytest.fixture(scope="module")
def lab() -> Path:
    lab = Lab()
    lab.down()
    try:
        lab.up(3, styles=("docker", "containerd", "crio-noinfra"))
        yield lab  # type: ignore[misc]
    finally:
        lab.down()


def test_the_listed_capabilities_are_enough(lab: Lab) -> None:
    caps = _capabilities()
    assert caps == ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYSLOG"]
    code, attached, events = _check(lab, caps)
    assert (code, attached) == (0, 3), events


@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"])  # SYSLOG: below
def test_each_listed_capability_is_needed(lab: Lab, missing: str) -> None:
    code, attached, events = _check(lab, [c for c in _capabilities() if c != missing])
    assert code != 0 or attached < 3, (missing, events)
    if missing == "SYS_PTRACE":  # pause processes are unreadable: the log says so
        assert any("cannot be read" in e for e in events), events


NAMES = """
from monitor.kernel.kallsyms import Symbols
s = Symbols(); s.open()
addr = int(next(l for l in open("/proc/kallsyms") if " kfree_skb_reason" in l or " sk_skb_reason_drop" in l
                or " kfree_skb" in l).split()[0], 16)
print(s.resolve(addr + 1))
"""


def test_syslog_is_needed_for_function_names_in_drop_traces() -> None:
    def resolve(caps: str) -> str:
        return subprocess.run(["setpriv", "--bounding-set", caps, "--inh-caps", "-all",
                               sys.executable, "-c", NAMES], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert resolve("-all,+syslog").endswith("+0x1")  # a function name and the offset
    assert resolve("-all").startswith("0x")  # no names: the addresses read as zero


def _thread_caps(pid: int) -> set[tuple[str, str]]:
    """(CapEff, CapPrm) of every thread of a process, as /proc shows them."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                      if ":\t" in line)
        out.add((fields["CapEff"].strip(), fields["CapPrm"].strip()))
    return out


def test_a_root_daemon_drops_what_it_needs_only_to_start(lab: Lab) -> None:
    runtime = (1 << 39) | (1 << 38) | (1 << 12) | (1 << 19)  # BPF, PERFMON, NET_ADMIN, SYS_PTRACE
    daemon = Daemon("--runtime-dirs", str(lab.runtime_dir), inventory=str(lab.inventory))
    try:
        assert _thread_caps(daemon.proc.pid) == {(f"{runtime:016x}", f"{runtime:016x}")}
        dropped = [e for e in daemon.log_events()
                   if e.get("event") == "dropped capabilities not needed after start-up"]
        assert dropped and "SYS_ADMIN" in dropped[0]["dropped"], dropped  # type: ignore[operator]
        pod = lab.add(style="containerd")  # what it kept is enough for a pod arriving now
        wait_for(lambda: daemon.scrape().has("podnet_packets_total", pod=pod.name), 10)
    finally:
        assert daemon.stop() == 0  # and to clean up on the way out
    assert our_programs(pod.host_veth) == {}


def test_a_trace_works_with_the_listed_capabilities_and_a_small_memlock_limit(
        lab: Lab, tmp_path: Path) -> None:
    """Without CAP_IPC_LOCK a perf ring is charged to RLIMIT_MEMLOCK, which a container
    may have small (64 KiB is common): the trace still runs, on smaller rings, and says
    so. Before, the request got no answer at all (found running the DaemonSet's pod)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in _capabilities())])
    daemon = Daemon("--runtime-dirs", str(lab.runtime_dir), "--auth", "token",
                    "--auth-token-file", str(token), inventory=str(lab.inventory),
                    wrapper=["prlimit", "--memlock=65536", "setpriv", "--bounding-set",
                             bounding, "--inh-caps", "-all"])
    try:
        sender, receiver = lab.pods()[:2]
        result: list[tuple[int, bytes]] = []
        path = f"/api/v1/namespaces/{receiver.namespace}/pods/{receiver.name}/capture" \
               "?duration=3s&filter=icmp"
        reader = threading.Thread(target=lambda: result.append(daemon.get(
            path, timeout=20, headers={"Authorization": "Bearer s3cret"})))
        reader.start()
        time.sleep(1.0)
        in_pod(sender, "ping", "-c", "5", "-i", "0.1", "-q", receiver.ip)
        reader.join(30)
        status, body = result[0]
        assert status == 200, body[-300:]
        out = tmp_path / "t.pcapng"
        out.write_bytes(body)
        icmp = subprocess.run(["tshark", "-r", str(out), "-Y", "icmp", "-T", "fields",
                               "-e", "icmp.type"], capture_output=True, text=True,
                              check=True).stdout.split()
        assert sorted(icmp) == ["0"] * 5 + ["8"] * 5, icmp
        smaller = [e for e in daemon.log_events()
                   if e.get("event") == "perf buffers smaller than wanted"]
        assert smaller and int(smaller[0]["pages"]) < 256, smaller  # type: ignore[call-overload]
    finally:
        assert daemon.stop() == 0
