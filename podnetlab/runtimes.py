"""How each runtime lays a lab pod out on the node: its kubelet-shaped cgroup, its pause
process, and the OCI bundle CRI-O would leave, so that podnetmon meets each layout it
must cope with (STYLES)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from monitor.kernel import netns
from podnetlab.errors import LabError

CGROUP_PARENT = "podnetmon-lab"

# How each runtime lays a pod out (what podnetmon must cope with):
STYLES = {
    # dockershim: a pause process in a cgroupfs-driver cgroup, netns not pinned
    "docker": "pause process, cgroupfs cgroup, no pinned netns",
    # containerd: netns pinned first (/run/netns/cni-*), pause runs in it, systemd cgroup
    "containerd": "pinned netns, pause process in it, systemd cgroup cri-containerd-*.scope",
    # CRI-O with its infra container: like containerd, plus an OCI bundle carrying the UID
    "crio": "pinned netns, pause process, crio-*.scope, OCI bundle with the pod UID",
    # CRI-O without an infra container: no pause process; only the bundle of an app
    # container ties the pinned netns to the pod UID
    "crio-noinfra": "pinned netns, no pause process, OCI bundle with the pod UID",
    # a pinned netns and nothing else: named through the inventory's netns key only
    "pinned": "pinned netns, no pause process, no bundle",
}


def cgroup2_root() -> Path:
    """The unified (v2) hierarchy's mount point, wherever this host put it."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise LabError("no cgroup2 hierarchy is mounted; the lab places pause processes in one")


def make_cgroup(style: str, uid: str, container: str) -> str:
    """A kubelet-shaped cgroup: cgroupfs driver for docker, systemd for the others."""
    if style == "docker":
        rel = f"{CGROUP_PARENT}/kubepods/burstable/pod{uid}/{container}"
    else:
        scope = "crio" if style == "crio" else "cri-containerd"
        rel = (f"{CGROUP_PARENT}/kubepods.slice/kubepods-besteffort.slice/"
               f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice/"
               f"{scope}-{container}.scope")
    path = cgroup2_root() / rel
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def rmdir_up(path: Path, *, stop: Path) -> None:
    """Remove a cgroup and its now-empty parents, up to (not including) `stop`."""
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def write_bundle(runtime_dir: Path, container: str, uid: str, netns: str) -> None:
    """The part of a CRI-O OCI bundle podnetmon reads (userdata/config.json)."""
    path = runtime_dir / container / "userdata" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "ociVersion": "1.0.2",
        "annotations": {"io.kubernetes.pod.uid": uid, "io.kubernetes.container.name": "app"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": netns}]}}))


def start_pause(pause_bin: Path, cgroup: str, pinned: str | None) -> int:
    """The pause process: it joins its pod's cgroup and makes its netns (or joins the
    pinned one, as containerd's pause does) between fork and exec, so it is never seen
    outside its pod. One fork and one exec: the churn benchmarks make 20 pods a second."""
    procs = os.path.join(cgroup, "cgroup.procs")
    target = os.open(pinned, os.O_RDONLY | os.O_CLOEXEC) if pinned else -1

    def enter() -> None:  # in the child, between fork and exec (Popen raises its OSError)
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
        if target >= 0:
            netns.setns(target)
        else:
            netns.unshare()

    try:
        proc = subprocess.Popen([str(pause_bin), "infinity"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=enter)  # noqa: PLW1509
    except (OSError, subprocess.SubprocessError) as exc:
        raise LabError(f"the pause process did not start: {exc}") from None
    finally:
        if target >= 0:
            os.close(target)
    return proc.pid
