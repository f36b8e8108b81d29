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
from pathlib import Path

import pytest
import yaml

from monitor.lab import Lab
from tests.kernel.support import ROOT

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
    assert caps == ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"]
    code, attached, events = _check(lab, caps)
    assert (code, attached) == (0, 3), events


@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE"])
def test_each_listed_capability_is_needed(lab: Lab, missing: str) -> None:
    code, attached, events = _check(lab, [c for c in _capabilities() if c != missing])
    assert code != 0 or attached < 3, (missing, events)
    if missing == "SYS_PTRACE":  # pause processes are unreadable: the log says so
        assert any("cannot be read" in e for e in events), events
