"""One daemon per node: an instance lock that the kernel holds for us.

Two `podnetmon run` on one node fight over the same kernel objects, and the second one
wins: it adopts the first one's pinned maps, `tc filter replace`s its filters and takes
over its tracepoint links (`pnm_generation`), and when it stops it detaches and unpins
all of it, leaving the live daemon counting nothing. So `run` takes this lock before it
touches the kernel, and a second one stops there, naming the daemon that holds it.

The lock is an abstract unix socket, bound (never listened on) under a name for each
thing two daemons would share:

    podnetmon:tc:<priority>:<handle>        our classic tc filters on the node's veths
    podnetmon:pins:<bpffs root>/podnetmon   our pinned maps and links (when pinning)

Abstract names live in the network namespace, not on disk: nothing can go stale, and the
kernel releases the name when the holder's last descriptor closes, however it died
(SIGKILL and OOM included). The daemon runs with host networking, in the namespace of the
veths it attaches to, so two daemons on one node always meet here. (Any process of the
host network namespace could take a name first; the error then says which one has it.)
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_MAX_NAME = 107  # sun_path is 108 bytes; an abstract name starts with a NUL


def lock_names(bpffs_root: str, tc_priority: int, tc_handle: int) -> list[tuple[str, str]]:
    """(abstract name, what it guards) for a daemon with these settings."""
    names = [(f"podnetmon:tc:{tc_priority}:{tc_handle:#x}",
              f"tc priority {tc_priority} handle {tc_handle:#x}")]
    if bpffs_root:
        pin_root = os.path.join(os.path.realpath(bpffs_root), "podnetmon")
        names.append((f"podnetmon:pins:{pin_root}", f"the pins under {pin_root}"))
    return [(_fit(name), what) for name, what in names]


def _fit(name: str) -> str:
    """The name itself where it fits in sun_path, else its start and a digest."""
    if len(name.encode()) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return name.encode()[:_MAX_NAME - 17].decode(errors="ignore") + "#" + digest


@dataclass(frozen=True)
class Holder:
    """Who holds a name: a pid and its command line, where /proc shows them."""

    what: str
    pid: int | None
    command: str

    def describe(self) -> str:
        who = f"pid {self.pid} ({self.command})" if self.pid else "a process this one cannot see"
        return f"{who} holds {self.what}"


class Taken(Exception):  # noqa: N818 - the lock is taken; "TakenError" says nothing more
    """Another process holds the node's instance lock."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        super().__init__(f"another podnetmon daemon runs on this node: {holder.describe()}")


class InstanceLock:
    """The node's instance lock for one set of names; acquire() or holder()."""

    def __init__(self, names: Sequence[tuple[str, str]], *, proc: str = "/proc") -> None:
        self._names = list(names)
        self._proc = proc
        self._socks: list[socket.socket] = []

    def acquire(self) -> None:
        """Take every name, or none (raising Taken with the holder of the first one held)."""
        for name, what in self._names:
            sock = self._bind(name)
            if sock is None:
                holder = self._holder_of(name, what)
                if holder is None:  # it went between the bind and the look: once more
                    sock = self._bind(name)
                if sock is None:
                    self.release()
                    raise Taken(holder or Holder(what, None, ""))
            self._socks.append(sock)

    def holder(self) -> Holder | None:
        """Who holds the lock now (None: nobody), without keeping it."""
        for name, what in self._names:
            sock = self._bind(name)
            if sock is not None:
                sock.close()
                continue
            holder = self._holder_of(name, what)
            if holder is not None:
                return holder
        return None

    def release(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    @staticmethod
    def _bind(name: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind("\0" + name)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return None
            raise
        return sock

    def _holder_of(self, name: str, what: str) -> Holder | None:
        """The process holding `name`: its socket's inode from /proc/net/unix, then the
        process with a descriptor on that inode. None if the name is free by now."""
        inodes = _abstract_inodes(self._proc, name)
        if not inodes:
            time.sleep(0.05)  # a bind in progress shows a moment later, a release stays gone
            inodes = _abstract_inodes(self._proc, name)
            if not inodes:
                return None
        targets = {f"socket:[{inode}]" for inode in inodes}
        for entry in os.listdir(self._proc):
            if not entry.isdigit():
                continue
            fd_dir = Path(self._proc, entry, "fd")
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(fd_dir / fd) in targets:
                        return Holder(what, int(entry), _command(self._proc, entry))
                except OSError:
                    continue
        return Holder(what, None, "")


def _abstract_inodes(proc: str, name: str) -> set[int]:
    """Inodes of the sockets bound to abstract `name` in this network namespace."""
    wanted = "@" + name
    found = set()
    try:
        with open(os.path.join(proc, "net", "unix"), encoding="utf-8", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and parts[7].rstrip("\n") == wanted:
                    found.add(int(parts[6]))
    except OSError:
        pass
    return found


def _command(proc: str, pid: str) -> str:
    try:
        argv = Path(proc, pid, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(a.decode(errors="replace") for a in argv if a)[:300]
