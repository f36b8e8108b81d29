"""Simulated pods on one machine, for the demo, the tests and the benchmarks.

A lab pod is what a node shows the monitor of a real pod: a network namespace
held by a real process whose comm is `pause` (a link named pause to
sleep(1), sleeping forever as the real one does), placed in a kubepods-style
cgroup whose path carries a generated pod UID; a veth pair whose host side
hangs on the lab bridge; addresses on a private lab subnet. Each pod has the
style of one runtime (STYLES): where the netns is pinned, which cgroup the
pause process is in, whether there is one at all, and what OCI bundle the
runtime would leave (under LAB_DIR/runtime, in that runtime's layout).

Everything the lab makes carries a name the lab alone uses (bridge pnmlab0,
host veths pnml<N>, netns pnmlab-<N>, cgroups under podnetmon-lab/), and
`down` finds it by those names as well as by its state file, so it works
after a crash. The bridge has no address and pods have no default route:
lab traffic stays among the lab's namespaces.

The lab drives the kernel through the `ip` command, not through the monitor's
own adapter, so that tests do not check the monitor with itself.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from podnetlab.errors import LabError
from podnetlab.neighbourtables import restore_neighbour_tables, size_neighbour_tables
from podnetlab.netsetup import Quiet, configure_inside, in_netns, ip_batch, sysctl
from podnetlab.runtimes import (
    CGROUP_PARENT,
    STYLES,
    cgroup2_root,
    make_cgroup,
    rmdir_up,
    start_pause,
    write_bundle,
)

LAB_DIR = Path(os.environ.get("PODNETMON_LAB_DIR", "/run/podnetmon-lab"))
BRIDGE = "pnmlab0"
VETH_PREFIX = "pnml"
NETNS_PREFIX = "pnmlab-"
NETNS_DIR = Path("/run/netns")
NAMESPACE = "lab"
# Pods beyond those made by `up` that the neighbour tables are sized for: the live pods
# of a churn benchmark (20 a second living 2 s) beside the idle ones
CHURN_ROOM = 100


@dataclass(frozen=True)
class LabPod:
    """One simulated pod, as `lab up --json` prints it."""

    index: int
    namespace: str
    name: str
    uid: str
    netns: int
    netns_path: str
    pause_pid: int | None
    pinned: str | None
    host_veth: str
    ip: str
    ip6: str
    cgroup: str
    inventory: str
    style: str = "docker"
    bundle: str = ""  # the OCI bundle directory the runtime would have left, if any

    def exec_prefix(self) -> list[str]:
        """A command prefix that runs a program inside this pod's network namespace."""
        return ["nsenter", f"--net={self.netns_path}", "--"]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc




def pod_ips(index: int) -> tuple[str, str]:
    return (f"10.213.{index // 250}.{index % 250 + 2}", f"fd00:213::{index + 2:x}")


class Lab:
    """Builds and removes lab pods; state lives in LAB_DIR/state.json."""

    def __init__(self, lab_dir: Path = LAB_DIR) -> None:
        self.dir = lab_dir
        self.state_file = lab_dir / "state.json"
        self.inventory = lab_dir / "inventory.yaml"
        self.pause_bin = lab_dir / "pause"
        self._last_unsaved = -1  # the last index given to a pod made with save=False

    # -- state ------------------------------------------------------------------

    def pods(self) -> list[LabPod]:
        try:
            raw = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        return [LabPod(**p) for p in raw.get("pods", [])]

    def pod(self, name: str) -> LabPod:
        for p in self.pods():
            if p.name == name:
                return p
        raise LabError(f"no lab pod named {name}")

    def _save(self, pods: Sequence[LabPod]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pods": [asdict(p) for p in pods]}, indent=1))
        os.replace(tmp, self.state_file)
        self._write_inventory(pods)

    def _write_inventory(self, pods: Sequence[LabPod]) -> None:
        entries = []
        for p in pods:
            entry: dict[str, object] = {"namespace": p.namespace, "name": p.name,
                                        "labels": {"app": "lab", "lab-index": str(p.index)},
                                        "owner": {"kind": "StatefulSet", "name": "lab"}}
            entry["uid"] = p.uid
            if p.style == "pinned":  # nothing on the node ties this netns to the UID
                entry["netns"] = p.pinned
            entries.append(entry)
        tmp = self.inventory.with_suffix(".tmp")
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: 4x faster at 500 pods
        tmp.write_text("# written by `podnetmon lab`\n" + yaml.dump({"pods": entries}, Dumper=dumper))
        os.replace(tmp, self.inventory)

    # -- up ---------------------------------------------------------------------

    def up(self, count: int, *, pinned: int = 0, styles: Sequence[str] = ("docker",)) -> list[LabPod]:
        """Make `count` pods beside any there are: styles in turn, the last `pinned` of
        them in the "pinned" style. Built in bulk (a few `ip -batch` runs for all of
        them), so hundreds of pods take seconds."""
        if count < 0 or pinned < 0 or pinned > count:
            raise LabError("need 0 <= pinned <= pods")
        unknown = sorted(set(styles) - set(STYLES))
        if unknown or not styles:
            raise LabError(f"unknown styles {unknown}; known: {', '.join(STYLES)}")
        self._prepare()
        pods = self.pods()
        first = max((p.index for p in pods), default=-1) + 1
        made: list[LabPod] = []
        try:
            for i in range(count):
                style = "pinned" if i >= count - pinned else styles[i % len(styles)]
                made.append(self._create(first + i, style, None, None))
        finally:
            self._save([*pods, *made])  # before wiring: a crash from here on is cleaned up
        size_neighbour_tables(self._thresholds_file, len(pods) + len(made) + CHURN_ROOM)
        self._wire(made)
        return made

    @property
    def _thresholds_file(self) -> Path:
        """The node's neighbour thresholds as they were and as the lab raised them."""
        return self.dir / "neighbour-thresholds.json"

    @property
    def runtime_dir(self) -> Path:
        """Where lab pods' OCI bundles are (podnetmon run --runtime-dirs)."""
        return self.dir / "runtime"

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.pause_bin.exists():
            sleep = shutil.which("sleep") or "/bin/sleep"
            os.symlink(sleep, self.pause_bin)  # comm comes from the name exec'd: "pause"
        if not Path(f"/sys/class/net/{BRIDGE}").exists():
            _run("ip", "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
                 "forward_delay", "0")
            # No IPv6 on the host side: no router solicitations or MLD from the host
            # into the lab, so what pods see is what the lab's traffic sends.
            sysctl(f"net.ipv6.conf.{BRIDGE}.disable_ipv6", "1")
            _run("ip", "link", "set", BRIDGE, "up")
        if not self.state_file.exists():
            self._save([])

    def add(self, *, style: str = "docker", pinned: bool = False,
            name: str | None = None, uid: str | None = None, save: bool = True,
            quiet: Quiet | None = None) -> LabPod:
        """One more pod; the state file is updated as soon as the pod exists, unless
        `save` is False (churn benchmarks: `down` finds lab objects by name anyway)."""
        style = "pinned" if pinned else style
        if style not in STYLES:
            raise LabError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
        self._prepare()
        pods = self.pods() if save else []
        index = max((p.index for p in pods), default=-1) + 1 if save else self._next_unsaved()
        pod = self._create(index, style, name, uid)
        if save:
            self._save([*pods, pod])
        self._wire([pod], quiet)
        return pod

    def _next_unsaved(self) -> int:
        """An index no pod uses, without reading the state (pods made with save=False)."""
        taken = {int(n[len(VETH_PREFIX):]) for n in _lab_links() if n != BRIDGE}
        taken |= {p.index for p in self.pods()}
        self._last_unsaved = max(self._last_unsaved, max(taken, default=-1)) + 1
        return self._last_unsaved

    def _create(self, index: int, style: str, name: str | None, uid: str | None) -> LabPod:
        """The pod's netns, pause process and bundle: everything but its interfaces."""
        uid = uid or str(uuid.uuid4())
        container = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex, as runtimes name them
        cgroup, pause_pid, pinned_path = "", None, None
        if style != "docker":
            pinned_path = str(NETNS_DIR / f"{NETNS_PREFIX}{index}")
            _run("ip", "netns", "add", f"{NETNS_PREFIX}{index}")
        if style in ("docker", "containerd", "crio"):
            cgroup = make_cgroup(style, uid, container)
            pause_pid = start_pause(self.pause_bin, cgroup, pinned_path)
        if style in ("crio", "crio-noinfra"):
            write_bundle(self.runtime_dir, container, uid, str(pinned_path))
        netns_path = str(pinned_path) if pause_pid is None else f"/proc/{pause_pid}/ns/net"
        bundle = str(self.runtime_dir / container) if style in ("crio", "crio-noinfra") else ""
        ip4, ip6 = pod_ips(index)
        return LabPod(index, NAMESPACE, name or f"pod-{index}", uid, os.stat(netns_path).st_ino,
                      netns_path, pause_pid, pinned_path, f"{VETH_PREFIX}{index}", ip4, ip6,
                      cgroup, str(self.inventory), style, bundle)

    def _wire(self, pods: Sequence[LabPod], quiet: Quiet | None = None) -> None:
        """Veth pairs into the pods, host sides on the bridge, addresses inside."""
        if not pods:
            return
        ip_batch(f"link add {p.host_veth} type veth peer name eth0 netns "
                 f"{p.pause_pid if p.pinned is None else Path(p.pinned).name}" for p in pods)
        for p in pods:
            sysctl(f"net.ipv6.conf.{p.host_veth}.disable_ipv6", "1")
        ip_batch(f"link set {p.host_veth} master {BRIDGE} up" for p in pods)
        for p in pods:
            in_netns(p.netns_path, functools.partial(configure_inside, p.ip, p.ip6, quiet),
                     f"lab-{p.name}")

    # -- down -------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Remove one pod as its runtime would: processes, veth, netns, cgroup."""
        pods = self.pods()
        pod = next((p for p in pods if p.name == name), None)
        if pod is None:
            raise LabError(f"no lab pod named {name}")
        self.remove_pod(pod)
        self._save([p for p in pods if p.name != name])

    def remove_pod(self, pod: LabPod) -> None:
        """Remove a pod without touching the state file (for pods made with save=False)."""
        self._kill_in_netns({pod.netns})
        _run("ip", "link", "del", pod.host_veth, check=False)
        if pod.pinned:
            _run("ip", "netns", "del", Path(pod.pinned).name, check=False)
        if pod.cgroup:
            rmdir_up(Path(pod.cgroup), stop=cgroup2_root() / CGROUP_PARENT)
        if pod.bundle:
            shutil.rmtree(pod.bundle, ignore_errors=True)

    def down(self) -> list[str]:
        """Remove everything the lab ever made. Idempotent; works after a crash."""
        removed: list[str] = []
        inodes = {p.netns for p in self.pods()}
        for entry in _list_dir(NETNS_DIR):
            if entry.startswith(NETNS_PREFIX):
                try:
                    inodes.add(os.stat(NETNS_DIR / entry).st_ino)
                except OSError:
                    pass
        inodes |= self._pause_netns()
        removed += [f"process {pid}" for pid in self._kill_in_netns(inodes)]
        for link in _lab_links():
            if _run("ip", "link", "del", link, check=False).returncode == 0:
                removed.append(f"link {link}")
        for entry in _list_dir(NETNS_DIR):
            if entry.startswith(NETNS_PREFIX):
                _run("ip", "netns", "del", entry, check=False)
                removed.append(f"netns {entry}")
        try:
            root = cgroup2_root() / CGROUP_PARENT
        except LabError:
            root = None
        if root is not None and root.exists():
            for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            removed.append(f"cgroup {root}")
        removed += restore_neighbour_tables(self._thresholds_file)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed.append(f"dir {self.dir}")
        return removed

    def _pause_netns(self) -> set[int]:
        """Netns of processes running our pause link (found even without state)."""
        found = set()
        marker = str(self.pause_bin).encode()
        for pid in _pids():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == marker:
                    found.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                pass
        return found

    def _kill_in_netns(self, inodes: set[int]) -> list[int]:
        """Kill every process living in one of these namespaces (pause, traffic tools)."""
        if not inodes:
            return []
        victims = []
        for pid in _pids():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                    os.kill(pid, signal.SIGKILL)
                    victims.append(pid)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for pid in victims:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.005)
        return victims


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()]


def _list_dir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _lab_links() -> list[str]:
    names = []
    for entry in _list_dir(Path("/sys/class/net")):
        if entry == BRIDGE or (entry.startswith(VETH_PREFIX) and entry[len(VETH_PREFIX):].isdigit()):
            names.append(entry)
    return sorted(names, key=lambda n: n == BRIDGE)  # veths first, then the bridge

