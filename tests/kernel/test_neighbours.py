"""A full neighbour table: the pod that cannot resolve its peers shows why, and the
runbook's advice cures it.

The kernel's ARP table is one for all namespaces. The test lowers its ceiling
(gc_thresh3) to a few entries above what it holds, and a pod sends one datagram to
each of 40 addresses nobody has: each needs a new (incomplete) entry, none can be
collected (incomplete, and fresh), and once the table is full every further datagram
is freed with NEIGH_CREATEFAIL (sendto still succeeds: the sender cannot tell). The
monitor's count of that pod's NEIGH_CREATEFAIL drops must equal the kernel's own
table_fulls count, and the datagrams that got no entry in the pod's neighbour table.
`podnetmon check` then names the refusals and a remedy; the remedy's sysctl commands,
run as the runbook says, let the same pod resolve 40 more addresses with no drop.
The thresholds are put back whatever happens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.neighbours import ENTRIES_PER_POD
from podnetlab.lab import CHURN_ROOM, Lab
from tests.kernel.support import ROOT, LabRun, in_pod, lab_with_daemon, wait_for

THRESHOLDS = [Path(f"/proc/sys/net/ipv4/neigh/default/gc_thresh{i}") for i in (1, 2, 3)]

# One datagram to each of `count` addresses from `first`; prints how many sendto calls
# failed (none: a datagram freed for want of a neighbour entry still returns success).
SPRAY = """
import ipaddress, json, socket, sys
first, count = ipaddress.ip_address(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
failed, errors = 0, set()
for i in range(count):
    try:
        s.sendto(b"anyone?", (str(first + i), 9))
    except OSError as exc:
        failed += 1
        errors.add(exc.strerror)
print(json.dumps({"failed": failed, "errors": sorted(errors)}))
"""


def table_fulls() -> int:
    """The kernel's refusals of new ARP entries (per-CPU rows, summed)."""
    lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
    column = lines[0].split().index("table_fulls")
    return sum(int(line.split()[column], 16) for line in lines[1:] if line.strip())


def arp_entries() -> int:
    lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
    return int(lines[1].split()[lines[0].split().index("entries")], 16)


def spray(run: LabRun, first: str, count: int) -> dict[str, object]:
    out = in_pod(run.a, sys.executable, "-c", SPRAY, first, str(count)).stdout
    return dict(json.loads(out))


def entries_for(run: LabRun, prefix: str) -> int:
    """Neighbour entries the pod holds for addresses starting with `prefix`."""
    found = json.loads(in_pod(run.a, "ip", "-j", "-4", "neigh", "show", "dev", "eth0").stdout)
    return sum(1 for entry in found if str(entry["dst"]).startswith(prefix))


def createfail_drops(run: LabRun) -> float:
    return run.daemon.scrape().sum("podnet_drops_total", pod=run.a.name,
                                   reason="NEIGH_CREATEFAIL")


@pytest.fixture
def run() -> Iterator[LabRun]:
    with lab_with_daemon(2) as lab_run:
        yield lab_run


@pytest.fixture
def thresholds_restored() -> Iterator[None]:
    saved = [p.read_text() for p in THRESHOLDS]
    try:
        yield
    finally:
        for path, value in reversed(list(zip(THRESHOLDS, saved, strict=True))):
            path.write_text(value)  # the ceiling last: it was the one lowered


def test_a_full_neighbour_table_is_the_pods_drops_and_the_runbook_cures_it(
        run: LabRun, thresholds_restored: None) -> None:
    fulls_before = table_fulls()
    THRESHOLDS[2].write_text(str(arp_entries() + 5))
    sent = spray(run, "10.213.200.1", 40)
    refused = table_fulls() - fulls_before
    assert sent["failed"] == 0, sent
    assert refused >= 20, refused  # the table was full for most of them
    assert refused == 40 - entries_for(run, "10.213.200."), refused
    drops = 0.0

    def counted() -> bool:
        nonlocal drops
        drops = createfail_drops(run)
        return drops == refused

    wait_for(counted, 5)
    assert drops == refused, (drops, refused)

    check = subprocess.run([sys.executable, "-m", "monitor", "check"], cwd=ROOT, check=False,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # a warning, not a failure
    finding = re.search(r"^warn neighbours +(.*)\n +remedy: (.*)$", check.stdout, re.M)
    assert finding is not None, check.stdout
    assert "the ipv4 table refused" in finding.group(1), finding.group(1)
    commands = re.findall(r"sysctl -w (net\.ipv4\.neigh\.default\.gc_thresh\d)=(\d+)",
                          finding.group(2))
    assert [key for key, _ in commands] == [f"net.ipv4.neigh.default.gc_thresh{i}"
                                            for i in (1, 2, 3)], finding.group(2)
    for key, value in commands:  # the runbook: run the remedy podnetmon check prints
        subprocess.run(["sysctl", "-q", "-w", f"{key}={value}"], check=True)

    fulls_before = table_fulls()
    again = spray(run, "10.213.201.1", 40)
    assert again["failed"] == 0 and table_fulls() == fulls_before, again
    assert entries_for(run, "10.213.201.") == 40
    assert createfail_drops(run) == drops


def test_the_lab_raises_the_thresholds_its_pods_need_and_puts_them_back(
        thresholds_restored: None) -> None:
    lab = Lab()
    lab.down()
    before = [int(p.read_text()) for p in THRESHOLDS]
    pods = 1030 // ENTRIES_PER_POD - CHURN_ROOM  # one pod more than the ceiling holds
    try:
        lab.up(pods)
        raised = [int(p.read_text()) for p in THRESHOLDS]
        assert raised[2] >= (pods + CHURN_ROOM) * ENTRIES_PER_POD > before[2], raised
        assert raised[0] <= raised[1] <= raised[2], raised
    finally:
        lab.down()
    assert [int(p.read_text()) for p in THRESHOLDS] == before
    # a ceiling someone else set while the lab was up is theirs: down leaves it
    try:
        lab.up(pods)
        THRESHOLDS[2].write_text("5000")
    finally:
        lab.down()
    assert int(THRESHOLDS[2].read_text()) == 5000
