"""Finding pod network namespaces: pause processes and pinned netns files.

Pure file reading, so it runs on fake /proc and cgroup trees in unit tests.
Finding the host veth of each namespace needs netlink and lives in the
kernel package; the reconciler joins the two.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from monitor.identity import PodNetwork

# Pod UIDs in cgroup paths, as the kubelet writes them:
#   cgroupfs driver:  /kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/<ctr>
#   systemd driver:   /kubepods.slice/kubepods-burstable.slice/
#                     kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/...
# (systemd unit names cannot hold '-' inside a component, so the kubelet writes '_').
# Static pods have a UID that is a 32-digit hex hash rather than a UUID.
_UID_RE = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32})(?:\.slice)?(?:/|$)")


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID in a /proc/PID/cgroup file (v1 or v2, either driver), or None."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        match = _UID_RE.search(parts[2])
        if match:
            return match.group(1).replace("_", "-")
    return None


@dataclass(frozen=True)
class PauseProcess:
    pid: int
    netns_inode: int
    uid: str | None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:  # the process exited, or we may not read it: both mean "not here"
        return None


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def host_netns_inode(proc_root: str) -> int | None:
    """The daemon's own (the host's) netns, which is never a pod's."""
    return netns_inode(os.path.join(proc_root, "self", "ns", "net"))


def _read_comm(path: str) -> bytes | None:
    # Raw os.open/os.read: this runs for every process on the node each pass, and
    # the text-mode open() costs three times as much.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)


def scan_pause_processes(proc_root: str, comm: str, denied: list[int] | None = None,
                         uids: dict[tuple[int, int], str | None] | None = None,
                         ) -> Iterator[PauseProcess]:
    """Every process whose comm is `comm`, with its netns inode and pod UID.

    A process may exit between listing and reading: it is skipped, not an error.
    One whose netns we may not see (no CAP_SYS_PTRACE) is skipped too, and its
    pid added to `denied`, so the caller can say why pods are missing.

    `uids` caches each pause process's pod UID by (pid, netns inode) across scans:
    a process's cgroup does not change, and a pid reused by another process in
    the same netns would be another pause process of the same pod. Entries for
    processes gone are removed.
    """
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return
    wanted = comm.encode()
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if not entry.isdigit():
            continue
        base = os.path.join(proc_root, entry)
        name = _read_comm(os.path.join(base, "comm"))
        if name is None or name.rstrip(b"\n") != wanted:
            continue
        try:
            inode = os.stat(os.path.join(base, "ns", "net")).st_ino
        except PermissionError:
            if denied is not None:
                denied.append(int(entry))
            continue
        except OSError:
            continue
        key = (int(entry), inode)
        if uids is not None and key in uids:
            uid = uids[key]
        else:
            uid = pod_uid_from_cgroup(_read(os.path.join(base, "cgroup")) or "")
            if uids is not None:
                uids[key] = uid
        seen.add(key)
        yield PauseProcess(int(entry), inode, uid)
    if uids is not None:
        for gone in uids.keys() - seen:
            del uids[gone]


def scan_pinned(dirs: Iterable[str], nsfs_dev: int | None) -> Iterator[tuple[str, int]]:
    """(path, inode) of each pinned netns file in the directories.

    A pinned netns is an nsfs bind mount; a stale pin (the runtime died before
    unmounting) is a plain empty file whose inode means nothing, so files whose
    device is not nsfs's are skipped. Directories reached twice (/var/run is
    often a link to /run) are read once.
    """
    seen_dirs: set[str] = set()
    for d in dirs:
        real = os.path.realpath(d)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if nsfs_dev is not None and st.st_dev != nsfs_dev:
                continue
            yield path, st.st_ino


def discover(proc_root: str, comm: str, netns_dirs: Iterable[str],
             denied: list[int] | None = None,
             uids: dict[tuple[int, int], str | None] | None = None) -> list[PodNetwork]:
    """Every pod network namespace on this host, one entry per netns inode.

    Where a pause process and a pinned file name the same namespace (containerd
    does both) they merge; the pause process gives the UID. The host's own
    namespace is skipped: a host-network pod has nothing of its own to monitor.
    """
    host_inode = host_netns_inode(proc_root)
    try:
        nsfs_dev: int | None = os.stat(os.path.join(proc_root, "self", "ns", "net")).st_dev
    except OSError:
        nsfs_dev = None
    found: dict[int, PodNetwork] = {}
    for proc in scan_pause_processes(proc_root, comm, denied, uids):
        if proc.netns_inode == host_inode or proc.netns_inode in found:
            continue
        found[proc.netns_inode] = PodNetwork(
            proc.netns_inode, os.path.join(proc_root, str(proc.pid), "ns", "net"),
            pause_pid=proc.pid, uid=proc.uid)
    for path, inode in scan_pinned(netns_dirs, nsfs_dev):
        if inode == host_inode:
            continue
        known = found.get(inode)
        if known is None:
            found[inode] = PodNetwork(inode, path, pinned_path=path)
        elif known.pinned_path is None:
            found[inode] = PodNetwork(inode, known.open_path, known.pause_pid, path, known.uid)
    return sorted(found.values(), key=lambda n: n.netns_inode)
