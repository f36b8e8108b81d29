"""Discovery on fake /proc trees and fake pinned netns directories.

A "network namespace" here is a plain file under <tmp>/nsfs; its inode stands
for the netns inode. /proc/PID/ns/net and pinned files are hard links to it, so
they share its inode exactly as the kernel's nsfs files do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from monitor.discovery import discover, pod_uid_from_cgroup, scan_pinned
from monitor.identity import PodNetwork

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
UUID_SYSTEMD = UUID.replace("-", "_")
STATIC_UID = "6f2c1a8e9b0d4c3e8f7a6b5c4d3e2f1a"
CTR = "9d2a6c3b" * 8  # a 64-hex container id


# -- pod_uid_from_cgroup --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(  # cgroup v1, cgroupfs driver: one line per hierarchy
        f"12:pids:/kubepods/burstable/pod{UUID}/{CTR}\n"
        f"11:memory:/kubepods/burstable/pod{UUID}/{CTR}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UUID}/{CTR}\n",
        UUID, id="v1-cgroupfs"),
    pytest.param(
        f"12:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UUID_SYSTEMD}"
        f".slice/cri-containerd-{CTR}.scope\n",
        UUID, id="v1-systemd"),
    pytest.param(f"0::/kubepods/burstable/pod{UUID}/{CTR}\n", UUID, id="v2-cgroupfs"),
    pytest.param(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UUID_SYSTEMD}.slice/"
        f"cri-containerd-{CTR}.scope\n",
        UUID, id="v2-systemd"),
    pytest.param(f"0::/kubepods/pod{UUID}/{CTR}\n", UUID, id="guaranteed-cgroupfs"),
    pytest.param(f"0::/kubepods.slice/kubepods-pod{UUID_SYSTEMD}.slice/cri-containerd-{CTR}.scope\n",
                 UUID, id="guaranteed-systemd"),
    pytest.param(f"0::/kubepods/besteffort/pod{UUID}/{CTR}\n", UUID, id="besteffort-cgroupfs"),
    pytest.param(
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UUID_SYSTEMD}.slice/"
        f"crio-{CTR}.scope\n",
        UUID, id="besteffort-systemd-crio"),
    pytest.param(
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UUID_SYSTEMD}.slice/"
        f"docker-{CTR}.scope\n",
        UUID, id="docker"),
    pytest.param(f"0::/kubepods/burstable/pod{STATIC_UID}/{CTR}\n", STATIC_UID, id="static-cgroupfs"),
    pytest.param(f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}"
                 f".slice/crio-{CTR}.scope\n", STATIC_UID, id="static-systemd"),
    pytest.param(f"0::/kubepods/burstable/pod{UUID}\n", UUID, id="pod-dir-last"),
])
def test_pod_uid_from_cgroup(text: str, expected: str) -> None:
    assert pod_uid_from_cgroup(text) == expected


def test_pod_uid_underscores_become_dashes() -> None:
    text = "0::/kubepods.slice/kubepods-pod0a1b2c3d_4e5f_6071_8293_a4b5c6d7e8f9.slice/x.scope\n"
    assert pod_uid_from_cgroup(text) == "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty"),
    pytest.param("0::/\n", id="root-cgroup"),
    pytest.param("0::/system.slice/containerd.service\n", id="host-service"),
    pytest.param("0::/user.slice/user-1000.slice/session-2.scope\n", id="user-session"),
    pytest.param("0::/kubepods/burstable/podnotauid/x\n", id="not-a-uid"),
    pytest.param(f"0::/kubepods/burstable/pod{UUID[:-1]}/x\n", id="truncated-uid"),
    pytest.param(f"0::/kubepods/burstable/pod{UUID}x/y\n", id="uid-with-trailing-junk"),
    pytest.param(f"kubepods/burstable/pod{UUID}\n", id="garbage-no-colons"),
    pytest.param(f"12:pids\nrandom garbage pod{UUID}\n\n", id="garbage-lines"),
])
def test_pod_uid_from_cgroup_none(text: str) -> None:
    assert pod_uid_from_cgroup(text) is None


def test_pod_uid_skips_garbage_before_a_good_line() -> None:
    text = f"garbage\n12:pids\n0::/\n0::/kubepods/besteffort/pod{UUID}/{CTR}\n"
    assert pod_uid_from_cgroup(text) == UUID


# -- fake trees ----------------------------------------------------------------------------------

class Host:
    """A fake host: <tmp>/proc, <tmp>/nsfs (the namespaces), <tmp>/run/netns (pins)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        self.nsfs = root / "nsfs"
        self.pins = root / "run" / "netns"
        for d in (self.proc / "self" / "ns", self.nsfs, self.pins):
            d.mkdir(parents=True)
        self.host_ns = self.netns("host")
        os.link(self.host_ns, self.proc / "self" / "ns" / "net")

    def netns(self, name: str) -> Path:
        path = self.nsfs / name
        path.write_text("")
        return path

    def process(self, pid: int, comm: str | None, ns: Path | None, cgroup: str | None = "") -> Path:
        base = self.proc / str(pid)
        (base / "ns").mkdir(parents=True)
        if comm is not None:
            (base / "comm").write_text(comm)
        if cgroup is not None:
            (base / "cgroup").write_text(cgroup)
        if ns is not None:
            os.link(ns, base / "ns" / "net")
        return base

    def pin(self, name: str, ns: Path, directory: Path | None = None) -> Path:
        path = (directory or self.pins) / name
        os.link(ns, path)
        return path

    def discover(self, *dirs: Path, comm: str = "pause") -> list[PodNetwork]:
        return discover(str(self.proc), comm, [str(d) for d in dirs or (self.pins,)])


def ino(path: Path) -> int:
    return os.stat(path).st_ino


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def cgroup_of(uid: str) -> str:
    return f"0::/kubepods/besteffort/pod{uid}/{CTR}\n"


# -- discover ------------------------------------------------------------------------------------

def test_pause_process_found_with_uid(host: Host) -> None:
    ns = host.netns("a")
    host.process(100, "pause\n", ns, cgroup_of(UUID))
    assert host.discover() == [
        PodNetwork(ino(ns), str(host.proc / "100" / "ns" / "net"), pause_pid=100, uid=UUID)]


def test_comm_must_match_exactly(host: Host) -> None:
    kept = host.netns("kept")
    host.process(100, "pause\n", kept)
    host.process(101, "pause", host.netns("no-newline"))  # a newline is optional
    for pid, comm in ((102, "pause2\n"), (103, "xpause\n"), (104, "Pause\n"), (105, "bash\n"),
                      (106, "pause \n"), (107, "")):
        host.process(pid, comm, host.netns(f"other-{pid}"))
    found = host.discover()
    assert sorted(n.pause_pid or 0 for n in found) == [100, 101]


def test_uid_cache_reads_each_cgroup_once_and_forgets_the_gone(host: Host) -> None:
    ns_a, ns_b = host.netns("a"), host.netns("b")
    a = host.process(100, "pause\n", ns_a, cgroup_of(UUID))
    host.process(101, "pause\n", ns_b, cgroup_of(UUID.replace("1b4e", "2c5f")))
    uids: dict[tuple[int, int], str | None] = {}
    first = discover(str(host.proc), "pause", [], uids=uids)
    assert sorted(uids) == [(100, ino(ns_a)), (101, ino(ns_b))]
    (a / "cgroup").write_text("")  # were it read again, the UID would be gone
    assert discover(str(host.proc), "pause", [], uids=uids) == first
    shutil.rmtree(a)  # the process exits: its entry goes
    assert [n.pause_pid for n in discover(str(host.proc), "pause", [], uids=uids)] == [101]
    assert sorted(uids) == [(101, ino(ns_b))]
    # another process under the same pid in another netns is read afresh
    host.process(100, "pause\n", host.netns("c"), "")
    assert {n.pause_pid: n.uid for n in discover(str(host.proc), "pause", [], uids=uids)}[100] is None


def test_custom_comm(host: Host) -> None:
    host.process(100, "pause\n", host.netns("a"))
    host.process(101, "infra\n", host.netns("b"))
    assert [n.pause_pid for n in host.discover(comm="infra")] == [101]


def test_non_pid_entries_are_ignored(host: Host) -> None:
    ns = host.netns("a")
    (host.proc / "sys").mkdir()
    (host.proc / "sys" / "comm").write_text("pause\n")
    (host.proc / "100abc").mkdir()
    (host.proc / "100abc" / "comm").write_text("pause\n")
    host.process(100, "pause\n", ns)
    assert [n.pause_pid for n in host.discover()] == [100]


def test_host_netns_skipped(host: Host) -> None:
    host.process(100, "pause\n", host.host_ns, cgroup_of(UUID))  # a host-network pod
    host.pin("cni-host", host.host_ns)
    assert host.discover() == []


def test_pause_and_pin_of_one_netns_merge(host: Host) -> None:
    ns = host.netns("a")
    host.process(100, "pause\n", ns, cgroup_of(UUID))
    pin = host.pin("cni-1234", ns)
    assert host.discover() == [
        PodNetwork(ino(ns), str(host.proc / "100" / "ns" / "net"), pause_pid=100,
                   pinned_path=str(pin), uid=UUID)]


def test_pinned_only_netns_found(host: Host) -> None:
    ns = host.netns("crio")
    pin = host.pin("0f7e3c2a-crio", ns)
    assert host.discover() == [PodNetwork(ino(ns), str(pin), pinned_path=str(pin))]


def test_first_pin_kept_when_two_pins_name_one_netns(host: Host) -> None:
    ns = host.netns("a")
    other = host.root / "other-pins"
    other.mkdir()
    first = host.pin("cni-a", ns)
    host.pin("cni-a-again", ns, other)
    assert host.discover(host.pins, other) == [
        PodNetwork(ino(ns), str(first), pinned_path=str(first))]


def test_symlinked_directory_read_once(host: Host) -> None:
    ns = host.netns("a")
    pin = host.pin("cni-a", ns)
    (host.root / "var").mkdir()
    (host.root / "var" / "run").symlink_to(host.root / "run")
    var_pins = host.root / "var" / "run" / "netns"
    assert list(scan_pinned([str(host.pins), str(var_pins)], None)) == [(str(pin), ino(ns))]
    assert host.discover(host.pins, var_pins) == [
        PodNetwork(ino(ns), str(pin), pinned_path=str(pin))]


def test_missing_netns_dirs_are_fine(host: Host) -> None:
    ns = host.netns("a")
    pin = host.pin("cni-a", ns)
    assert host.discover(host.root / "nope", host.pins) == [
        PodNetwork(ino(ns), str(pin), pinned_path=str(pin))]


def test_vanished_processes_skipped(host: Host) -> None:
    host.process(100, None, host.netns("no-comm"))  # exited before comm was read
    host.process(101, "pause\n", None)  # exited before ns/net was read
    kept = host.netns("kept")
    host.process(102, "pause\n", kept, cgroup=None)  # no cgroup file: no UID, still a pod
    assert host.discover() == [PodNetwork(ino(kept), str(host.proc / "102" / "ns" / "net"),
                                          pause_pid=102)]


def test_missing_proc_root(tmp_path: Path) -> None:
    assert discover(str(tmp_path / "no-proc"), "pause", [str(tmp_path / "no-pins")]) == []


def test_result_sorted_by_inode(host: Host) -> None:
    namespaces = [host.netns(f"ns{i}") for i in range(8)]
    for i, ns in enumerate(namespaces[:4]):
        host.process(200 - i, "pause\n", ns)
    for i, ns in enumerate(namespaces[4:]):
        host.pin(f"cni-{9 - i}", ns)
    found = host.discover()
    assert [n.netns_inode for n in found] == sorted(ino(ns) for ns in namespaces)


def test_scan_pinned_skips_other_devices(host: Host) -> None:
    ns = host.netns("a")
    pin = host.pin("cni-a", ns)
    dev = os.stat(host.proc / "self" / "ns" / "net").st_dev
    assert list(scan_pinned([str(host.pins)], dev)) == [(str(pin), ino(ns))]
    assert list(scan_pinned([str(host.pins)], None)) == [(str(pin), ino(ns))]
    assert list(scan_pinned([str(host.pins)], dev + 1)) == []


def test_scan_pinned_sorted_by_name_and_skips_dangling(host: Host) -> None:
    b, a = host.netns("b"), host.netns("a")
    pin_b = host.pin("cni-b", b)
    pin_a = host.pin("cni-a", a)
    (host.pins / "cni-dangling").symlink_to(host.root / "gone")
    assert list(scan_pinned([str(host.pins)], None)) == [(str(pin_a), ino(a)), (str(pin_b), ino(b))]
