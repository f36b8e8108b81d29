"""Attach loaded BPF programs to tracepoints with bpf links, pin and inspect links, without bcc.

A tracepoint program is attached through a perf event of type
PERF_TYPE_TRACEPOINT: BPF_LINK_CREATE with attach_type BPF_PERF_EVENT ties the
program to that event and makes a bpf link, which holds the perf event. The
link can be pinned in bpffs, so the attachment outlives the process that made
it; it ends when the last fd and the last pin are gone.

The bpf(2) attribute offsets below follow include/uapi/linux/bpf.h (union
bpf_attr, struct bpf_link_info) and were checked with offsetof() against the
running kernel's BTF.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from monitor.kernel import syscalls
from monitor.kernel.perfevent import (
    PERF_FLAG_FD_CLOEXEC,
    PERF_TYPE_TRACEPOINT,
    perf_attr,
    perf_event_open,
)
from monitor.kernel.syscalls import (
    BPF_LINK_CREATE,
    BPF_LINK_UPDATE,
    BPF_OBJ_GET,
    BPF_OBJ_GET_INFO_BY_FD,
    BPF_OBJ_PIN,
    BPF_PERF_EVENT,
    BpfError,
    attr,
    bpf,
)

# enum bpf_link_type (the ones this project makes)
BPF_LINK_TYPE_PERF_EVENT = 7
BPF_LINK_TYPE_TCX = 11

# sizeof(struct bpf_link_info) on 6.18. A kernel whose struct is smaller accepts the
# longer buffer because its tail is zero, and fills only what it knows.
_LINK_INFO_SIZE = 64
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class TracepointError(OSError):
    """A tracepoint could not be found or attached; the message names it."""


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says about a bpf link (struct bpf_link_info).

    ifindex and attach_type are those of tcx links; 0 for other link types.
    """

    type: int
    id: int
    prog_id: int
    ifindex: int = 0
    attach_type: int = 0


def _reraise(exc: OSError, what: str, path: str | None = None) -> OSError:
    err = exc.errno or errno.EINVAL
    if path is None:
        return BpfError(err, f"{what}: {os.strerror(err)}")
    return BpfError(err, f"{what}: {os.strerror(err)}", path)


def tracepoint_id(category: str, event: str, tracefs: str = "/sys/kernel/tracing") -> int:
    """The kernel's id of tracepoint category:event, from tracefs."""
    name = f"{category}:{event}"
    if not (_NAME.fullmatch(category) and _NAME.fullmatch(event)) or ".." in name:
        raise TracepointError(errno.EINVAL, f"not a tracepoint name: {name!r}")
    path = os.path.join(tracefs, "events", category, event, "id")
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except FileNotFoundError:
        where = (f"no {tracefs}/events: is tracefs mounted there?"
                 if not os.path.isdir(os.path.join(tracefs, "events"))
                 else f"no {path}")
        raise TracepointError(errno.ENOENT, f"this kernel has no tracepoint {name} ({where})",
                              path) from None
    except (OSError, ValueError) as exc:
        err = getattr(exc, "errno", None) or errno.EINVAL
        raise TracepointError(err, f"cannot read the id of tracepoint {name} from {path}: "
                              f"{exc}") from None


def attach_tracepoint(prog_fd: int, category: str, event: str,
                      tracefs: str = "/sys/kernel/tracing") -> int:
    """Attach a loaded BPF_PROG_TYPE_TRACEPOINT program; returns the bpf link's fd.

    The perf event is opened on CPU 0 only, as BCC does: a tracepoint runs the
    programs attached to it on whatever CPU hits it. Its fd is closed here; the
    link keeps the event.

    One program can be attached to a tracepoint once (EEXIST the second time),
    and a perf event link cannot swap its program: to replace a program, attach
    the new one and then close or unpin the old link (both run in between).
    """
    name = f"{category}:{event}"
    tp_id = tracepoint_id(category, event, tracefs)
    perf_event = perf_attr(PERF_TYPE_TRACEPOINT, tp_id, sample_period=1)
    try:
        perf_fd = perf_event_open(perf_event, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    except OSError as exc:
        err = exc.errno or errno.EINVAL
        raise TracepointError(err, f"perf_event_open for tracepoint {name} (id {tp_id}): "
                              f"{os.strerror(err)}") from None
    try:
        return bpf(BPF_LINK_CREATE, attr((0, "I", prog_fd), (4, "I", perf_fd),
                                         (8, "I", BPF_PERF_EVENT)))
    except OSError as exc:
        err = exc.errno or errno.EINVAL
        hint = {errno.EINVAL: " (is it a TRACEPOINT program?)",
                errno.EACCES: " (the program reads past this tracepoint's record)",
                errno.EEXIST: " (this program is already attached to this tracepoint)"}.get(err, "")
        raise TracepointError(err, f"BPF_LINK_CREATE of prog fd {prog_fd} on tracepoint "
                              f"{name}: {os.strerror(err)}{hint}") from None
    finally:
        os.close(perf_fd)


def pin(fd: int, path: str) -> None:
    """Pin a bpf object (link, map, program) at a path in bpffs."""
    raw = os.fsencode(path)
    name = ctypes.create_string_buffer(raw, len(raw) + 1)
    try:
        bpf(BPF_OBJ_PIN, attr((0, "Q", ctypes.addressof(name)), (8, "I", fd)))
    except OSError as exc:
        hint = " (only inside a bpffs mount)" if exc.errno == errno.EPERM else ""
        raise _reraise(exc, f"pinning fd {fd}{hint}", path) from None


def get_pinned(path: str) -> int:
    """Open the bpf object pinned at path (read-write); returns a new fd."""
    raw = os.fsencode(path)
    name = ctypes.create_string_buffer(raw, len(raw) + 1)
    try:
        return bpf(BPF_OBJ_GET, attr((0, "Q", ctypes.addressof(name))))
    except OSError as exc:
        raise _reraise(exc, "opening the pinned bpf object", path) from None


def link_info(link_fd: int) -> LinkInfo:
    """Type, id and program of a link, plus device and hook for tcx links."""
    info = ctypes.create_string_buffer(_LINK_INFO_SIZE)
    buf = attr((0, "I", link_fd), (4, "I", _LINK_INFO_SIZE), (8, "Q", ctypes.addressof(info)))
    try:
        bpf(BPF_OBJ_GET_INFO_BY_FD, buf)
    except OSError as exc:
        raise _reraise(exc, f"BPF_OBJ_GET_INFO_BY_FD on link fd {link_fd}") from None
    link_type, link_id, prog_id = struct.unpack_from("<III", info, 0)
    if link_type == BPF_LINK_TYPE_TCX:
        ifindex, attach_type = struct.unpack_from("<II", info, 16)
        return LinkInfo(link_type, link_id, prog_id, ifindex, attach_type)
    return LinkInfo(link_type, link_id, prog_id)


def link_update(link_fd: int, new_prog_fd: int) -> None:
    """Swap the program behind a link (atomically for tcx links).

    Not every link type can: a perf event link (a tracepoint) answers EINVAL on 6.18.
    """
    try:
        bpf(BPF_LINK_UPDATE, attr((0, "I", link_fd), (4, "I", new_prog_fd)))
    except OSError as exc:
        raise _reraise(exc, f"BPF_LINK_UPDATE of link fd {link_fd} to prog fd "
                            f"{new_prog_fd}") from None


def open_pinned(path: Path) -> int | None:
    """A pinned link's fd, or None where nothing (usable) is pinned there."""
    try:
        return get_pinned(str(path))
    except OSError:
        return None


def detach_quietly(link_fd: int, *, close: bool = False) -> None:
    """Detach a link whose hook may be gone already (with its device), then maybe close it."""
    try:
        syscalls.link_detach(link_fd)
    except OSError:
        pass  # detached already (its hook went away)
    if close:
        os.close(link_fd)
