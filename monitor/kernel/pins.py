"""What the monitor keeps in bpffs, so that counters outlive a daemon.

    <bpffs>/podnetmon/
        maps-<layout>/<map name>   counter and state maps, by layout version
        links/tp-<category>-<event>  tracepoint links
        links/tcx-<ifindex>-<ingress|egress>  tcx links (classic tc filters need no pin)

The layout version is a digest of everything that shapes what the maps hold
(the C structs and map declarations, the Python layouts that read them, the
sizes from the settings): a daemon whose layout differs from the pinned one
starts fresh in a new directory and never reads the old maps with the wrong
layout. Classic tc filters live in the kernel until removed and are found by
their priority, handle and name.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from monitor import log
from monitor.kernel import syscalls, tracepoints

ROOT_NAME = "podnetmon"
MAPS_PREFIX = "maps-"


class PinError(OSError):
    """bpffs cannot be used at the configured path."""


BPF_FS_MAGIC = 0xCAFE4A11


def on_bpffs(path: str) -> bool:
    """Whether `path` is in a bpf filesystem (its mount point or a directory within)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], sys.byteorder) == BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    """Mount bpffs at `path`, as systemd and most CNIs do at /sys/fs/bpf."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise PinError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


def layout_version(c_sources: Iterable[str], python_layouts: Iterable[str],
                   sizes: Iterable[tuple[str, int]]) -> str:
    """A short digest of every input that decides what the pinned maps' bytes mean.

    C comments and whitespace are left out, so rewording a comment keeps the
    counters; any change to a struct, a map declaration or a #define does not.
    """
    digest = hashlib.sha256()
    for text in c_sources:
        for part in layout_text(text):
            digest.update(part.encode())
    for layout in python_layouts:
        digest.update(layout.encode())
    for name, value in sorted(sizes):
        digest.update(f"{name}={value}".encode())
    return digest.hexdigest()[:16]


_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRUCT = re.compile(r"struct\s+pnm_\w+\s*\{.*?\};", re.S)
_DECL = re.compile(r"^\s*(?:PNM_MAP|BPF_\w+)\s*\(.*?\);|^\s*#define\s+PNM_\w+.*$", re.M)


def layout_text(c_source: str) -> list[str]:
    """The parts of a C file that shape map contents, normalised."""
    text = _COMMENT.sub(" ", c_source)
    parts = _STRUCT.findall(text) + _DECL.findall(text)
    return [" ".join(p.split()) for p in parts]


def ctypes_layout(kind: type) -> str:
    """A ctypes type spelled out (field names, types, offsets), for layout_version."""
    if issubclass(kind, ctypes.Array):
        return f"{ctypes_layout(kind._type_)}[{kind._length_}]"  # type: ignore[arg-type]
    if issubclass(kind, ctypes.Structure):
        fields = ", ".join(f"{name}@{getattr(kind, name).offset}:{ctypes_layout(t)}"
                           for name, t, *_ in kind._fields_)  # type: ignore[misc]
        return f"{{{fields}}}"
    return f"{kind.__name__}/{ctypes.sizeof(kind)}"  # type: ignore[arg-type]


class Pins:
    """The monitor's directory in bpffs."""

    def __init__(self, bpffs: str) -> None:
        self.bpffs = bpffs
        self.root = Path(bpffs) / ROOT_NAME
        self.links = self.root / "links"
        self._log = log.get("pins")

    def prepare(self, *, mount: bool = True) -> None:
        """Make sure bpffs is there (mounting it if need be) and our directories exist."""
        if not on_bpffs(self.bpffs):
            if not mount:
                raise PinError(f"{self.bpffs} is not in a bpf filesystem")
            try:
                mount_bpffs(self.bpffs)
            except PinError as exc:
                raise PinError(f"{self.bpffs} is not in a bpf filesystem, and mounting one "
                               f"there failed ({exc.strerror}); mount it (mount -t bpf bpf "
                               f"{self.bpffs}) or mount the host's into the pod") from None
            self._log.info("mounted bpffs", path=self.bpffs)
        self.links.mkdir(parents=True, exist_ok=True)

    def maps_dir(self, version: str) -> Path:
        return self.root / f"{MAPS_PREFIX}{version}"

    def versions(self) -> list[str]:
        """Layout versions with pinned maps, oldest directory first."""
        try:
            entries = [e for e in self.root.iterdir() if e.name.startswith(MAPS_PREFIX)]
        except OSError:
            return []
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        return [e.name[len(MAPS_PREFIX):] for e in entries]

    def remove_version(self, version: str) -> list[str]:
        """Unpin one layout's maps. Programs still using them keep them alive until replaced."""
        return _remove_tree(self.maps_dir(version))

    def link_path(self, name: str) -> Path:
        return self.links / name

    def remove_empty(self) -> None:
        """Remove our directories if nothing is pinned in them any more."""
        for path in (self.links, self.root):
            try:
                path.rmdir()
            except OSError:
                pass  # not empty (a link left attached on purpose), or gone

    def remove_all(self) -> list[str]:
        """Every pin of ours: links (detached first, so they stop now) and maps."""
        removed = []
        for entry in sorted(self.links.iterdir()) if self.links.is_dir() else []:
            try:
                fd = tracepoints.get_pinned(str(entry))
                try:
                    syscalls.link_detach(fd)
                except OSError:
                    pass  # a link whose device is gone is detached already
                finally:
                    os.close(fd)
            except OSError:
                pass  # not a link (or unreadable): unpinning is all we can do
            entry.unlink(missing_ok=True)
            removed.append(str(entry))
        for version in self.versions():
            removed += self.remove_version(version)
        removed += _remove_tree(self.root)
        return removed


def tcx_link_path(pins: Pins, ifindex: int, direction: str) -> Path:
    return pins.link_path(f"tcx-{ifindex}-{direction}")


def _remove_tree(path: Path) -> list[str]:
    """Unlink pins and remove directories under `path`, deepest first; returns what went."""
    if not path.exists():
        return []
    removed = []
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            Path(dirpath, name).unlink(missing_ok=True)
            removed.append(os.path.join(dirpath, name))
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except OSError:
                pass
    try:
        path.rmdir()
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
    return removed
