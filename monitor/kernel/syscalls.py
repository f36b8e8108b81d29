"""The few bpf(2) commands BCC 0.26 does not wrap, called through ctypes.

BCC knows nothing of tcx links (kernel >= 6.6), of querying what a device
carries, or of the per-program run statistics the kernel keeps. Each of those
is one bpf(2) command with a small attribute block; the layouts below follow
include/uapi/linux/bpf.h (union bpf_attr) and were checked against it with
offsetof() on the build machine.

The syscall's number depends on the architecture (arch.py: x86-64 and arm64). libbpf's
own wrappers (bpf_map_update_elem, bpf_link_create, ...) would know it too, but the
libbpf.so.1 that comes with bcc on Debian 12 is 1.1.2, which predates tcx (1.3) and
would need the same attribute blocks built here for it; each command here is a
handful of lines checked against the uapi, and calling libc's syscall() directly
costs one C call where libbpf's wrappers add an opts struct to fill through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

from monitor.kernel import arch

# enum bpf_cmd
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_ENABLE_STATS = 32
BPF_LINK_DETACH = 34

# enum bpf_attach_type
BPF_PERF_EVENT = 41
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

# attach flags (uapi: BPF_F_BEFORE = 1 << 3)
BPF_F_BEFORE = 1 << 3

BPF_STATS_RUN_TIME = 0
_ATTR_SIZE = 128  # larger than any command we use; the kernel ignores zero tail bytes

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; errno and the command are kept."""


def bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    """One bpf(2) command with an attribute block made by attr(); BpfError on failure."""
    ret = int(_libc.syscall(arch.number("bpf"), cmd, attr, _ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed union bpf_attr with (offset, struct format, value) fields packed in."""
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def tcx_link_create(prog_fd: int, ifindex: int, attach_type: int, *, first: bool) -> int:
    """Attach a SCHED_CLS program to a device's tcx hook; returns the link fd.

    With first=True the program goes ahead of every program already there
    (BPF_F_BEFORE with no relative program means "at the head").
    """
    flags = BPF_F_BEFORE if first else 0
    return bpf(BPF_LINK_CREATE, attr((0, "I", prog_fd), (4, "I", ifindex),
                                        (8, "I", attach_type), (12, "I", flags)))


def link_detach(link_fd: int) -> None:
    """Detach a link now, even if other fds to it remain open."""
    bpf(BPF_LINK_DETACH, attr((0, "I", link_fd)))


def tcx_query(ifindex: int, attach_type: int) -> list[int]:
    """Program ids on a device's tcx hook, in run order (empty if none)."""
    ids = (ctypes.c_uint32 * 64)()
    buf = attr((0, "I", ifindex), (4, "I", attach_type), (24, "I", len(ids)))
    struct.pack_into("Q", buf, 16, ctypes.addressof(ids))
    bpf(BPF_PROG_QUERY, buf)
    count = struct.unpack_from("I", buf, 24)[0]
    return list(ids[: min(count, len(ids))])


def enable_run_stats() -> int:
    """Ask the kernel to keep per-program run time and count.

    Returns an fd: statistics stay on for as long as it is open, so the
    daemon's exit turns them off again without touching the sysctl.
    """
    return bpf(BPF_ENABLE_STATS, attr((0, "I", BPF_STATS_RUN_TIME)))


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel says about one loaded program."""

    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int


_PROG_INFO_SIZE = 232  # sizeof(struct bpf_prog_info) in 6.1 uapi; newer kernels accept it


def prog_info(prog_fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    buf = attr((0, "I", prog_fd), (4, "I", _PROG_INFO_SIZE))
    struct.pack_into("Q", buf, 8, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, buf)
    prog_id = struct.unpack_from("I", info, 4)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    run_time_ns, run_cnt = struct.unpack_from("QQ", info, 192)
    return ProgInfo(prog_id, name, run_time_ns, run_cnt)


BPF_ANY, BPF_EXIST = 0, 2


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> bool:
    """Write one element: create or overwrite (BPF_ANY), or overwrite only (BPF_EXIST,
    False if the element is gone). For per-CPU maps `value` holds one 8-byte-aligned
    slot per possible CPU."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    buf = attr((0, "I", map_fd), (8, "Q", ctypes.addressof(k)), (16, "Q", ctypes.addressof(v)),
                (24, "Q", flags))
    try:
        bpf(BPF_MAP_UPDATE_ELEM, buf)
    except BpfError as exc:
        if flags == BPF_EXIST and exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """One element's value, or None if there is no such key."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    buf = attr((0, "I", map_fd), (8, "Q", ctypes.addressof(k)), (16, "Q", ctypes.addressof(v)))
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, buf)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete one element; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(BPF_MAP_DELETE_ELEM, attr((0, "I", map_fd), (8, "Q", ctypes.addressof(k))))
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_items(map_fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, by walking keys and looking each up.

    An element deleted between the walk and the lookup is skipped. `value_size`
    is the whole value as the syscall returns it (all CPUs for per-CPU maps).
    """
    out: list[tuple[bytes, bytes]] = []
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    val = ctypes.create_string_buffer(value_size)
    first = True
    while True:
        buf = attr((0, "I", map_fd), (8, "Q", 0 if first else ctypes.addressof(cur)),
                    (16, "Q", ctypes.addressof(nxt)))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, buf)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return out
            raise
        first = False
        ctypes.memmove(cur, nxt, key_size)
        look = attr((0, "I", map_fd), (8, "Q", ctypes.addressof(cur)), (16, "Q", ctypes.addressof(val)))
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, look)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                continue
            raise
        out.append((cur.raw, val.raw))


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many value slots a per-CPU map lookup returns ("0-3" or "0,2-5")."""
    with open(path, encoding="ascii") as f:
        spec = f.read().strip()
    highest = 0
    for part in spec.split(","):
        highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about one map (struct bpf_map_info)."""

    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(map_fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    buf = attr((0, "I", map_fd), (4, "I", len(info)))
    struct.pack_into("Q", buf, 8, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, buf)
    map_type, map_id, key_size, value_size, max_entries = struct.unpack_from("5I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(map_type, map_id, key_size, value_size, max_entries, name)


BPF_PROG_TYPE_SCHED_CLS = 3


def load_unspec_program() -> int:
    """Load the smallest SCHED_CLS program, "return TC_ACT_UNSPEC", without BCC.

    For feature probes that must not depend on a compiler or on headers.
    """
    insns = struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    buf = attr((0, "I", BPF_PROG_TYPE_SCHED_CLS), (4, "I", 2))
    struct.pack_into("QQ", buf, 8, ctypes.addressof(code), ctypes.addressof(license_))
    struct.pack_into("16s", buf, 48, b"pnm_probe")
    return bpf(BPF_PROG_LOAD, buf)


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(BPF_PROG_GET_FD_BY_ID, attr((0, "I", prog_id)))


def is_missing(exc: OSError) -> bool:
    """True when an error only says the device or object is already gone."""
    return exc.errno in (errno.ENODEV, errno.ENOENT, errno.ENXIO)


BPF_MAP_LOOKUP_BATCH = 24  # enum bpf_cmd; kernel >= 5.6 for arrays and hashes
ENOTSUPP = 524  # the kernel's "no such operation for this map type" (not EOPNOTSUPP, 95)


def map_lookup_batch(map_fd: int, key_size: int, value_size: int, count: int,
                     start: bytes | None = None) -> tuple[bytearray, bytearray]:
    """Up to `count` elements in one syscall: (keys, values), each packed back to back.

    The batch begins after the key `start` (at the first key with None); for an array
    that is slot start + 1, and elements come in slot order. `value_size` is the whole
    value as the syscall returns it (all CPUs for per-CPU maps). Reaching the end of
    the map is no error: fewer elements come back.
    """
    keys, values = bytearray(key_size * count), bytearray(value_size * count)
    # the kernel writes where the next batch would start; a hash map puts a u32 there
    out_batch = ctypes.create_string_buffer(max(key_size, 4))
    in_batch = ctypes.create_string_buffer(start, key_size) if start is not None else None
    key_buf = (ctypes.c_char * len(keys)).from_buffer(keys)
    value_buf = (ctypes.c_char * len(values)).from_buffer(values)
    # union bpf_attr, batch: in_batch, out_batch, keys, values (u64 pointers), count, map_fd
    buf = attr((0, "Q", ctypes.addressof(in_batch) if in_batch is not None else 0),
                (8, "Q", ctypes.addressof(out_batch)), (16, "Q", ctypes.addressof(key_buf)),
                (24, "Q", ctypes.addressof(value_buf)), (32, "I", count), (36, "I", map_fd))
    try:
        bpf(BPF_MAP_LOOKUP_BATCH, buf)
    except BpfError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the map ended before `count` elements
            raise
    done = struct.unpack_from("I", buf, 32)[0]  # the kernel's count of elements copied
    del key_buf, value_buf  # a bytearray with a live export cannot be resized
    del keys[done * key_size:], values[done * value_size:]
    return keys, values


BPF_MAP_DELETE_BATCH = 27  # enum bpf_cmd; kernel >= 5.6


def batch_items(map_fd: int, key_size: int, value_size: int,
                     count: int = 4096) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a map by BPF_MAP_LOOKUP_BATCH (kernel 5.6), a syscall per
    `count` elements.

    A hash map's batches go bucket by bucket, so a key deleted meanwhile costs nothing
    but itself and no key comes twice; the walk by GET_NEXT_KEY restarts from the first
    bucket when its current key is deleted, and returns keys again (issue 14,
    tests/kernel/test_map_walks.py). For a map no program writes meanwhile (an epoch's map
    after the flip, see bpf/peers.c) it is the whole map exactly. The kernel refuses
    (ENOSPC) a batch smaller than a bucket: `count` is doubled then. `value_size` is the
    whole value (all CPUs for per-CPU maps). Raises BpfError (EINVAL, ENOTSUPP) for a
    map type without batch operations.
    """
    out: list[tuple[bytes, bytes]] = []
    token = ctypes.create_string_buffer(4)  # a hash map's batch position: a bucket index
    nxt = ctypes.create_string_buffer(4)
    first = True
    while True:
        keys, values = bytearray(key_size * count), bytearray(value_size * count)
        key_buf = (ctypes.c_char * len(keys)).from_buffer(keys)
        value_buf = (ctypes.c_char * len(values)).from_buffer(values)
        buf = attr((0, "Q", 0 if first else ctypes.addressof(token)),
                    (8, "Q", ctypes.addressof(nxt)), (16, "Q", ctypes.addressof(key_buf)),
                    (24, "Q", ctypes.addressof(value_buf)), (32, "I", count), (36, "I", map_fd))
        ended = False
        try:
            bpf(BPF_MAP_LOOKUP_BATCH, buf)
        except BpfError as exc:
            if exc.errno == errno.ENOSPC:
                del key_buf, value_buf
                count *= 2
                continue
            if exc.errno != errno.ENOENT:
                raise
            ended = True
        done = struct.unpack_from("I", buf, 32)[0]
        out += [(bytes(keys[i * key_size:(i + 1) * key_size]),
                 bytes(values[i * value_size:(i + 1) * value_size])) for i in range(done)]
        del key_buf, value_buf
        if ended:
            return out
        ctypes.memmove(token, nxt, 4)
        first = False


def map_delete_batch(map_fd: int, keys: list[bytes]) -> int:
    """Delete these keys in one syscall (per 4,096); returns how many were deleted.
    A key that is not there ends its batch with ENOENT: the rest go one by one."""
    deleted = 0
    for start in range(0, len(keys), 4096):
        chunk = keys[start:start + 4096]
        packed = ctypes.create_string_buffer(b"".join(chunk), len(b"".join(chunk)) or 1)
        buf = attr((16, "Q", ctypes.addressof(packed)), (32, "I", len(chunk)), (36, "I", map_fd))
        try:
            bpf(BPF_MAP_DELETE_BATCH, buf)
            deleted += len(chunk)
        except BpfError as exc:
            if exc.errno != errno.ENOENT:
                raise
            done = struct.unpack_from("I", buf, 32)[0]
            deleted += done
            deleted += sum(map_delete(map_fd, k) for k in chunk[done:])
    return deleted
