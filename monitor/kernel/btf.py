"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against kernel headers, and where those are not the running
kernel's (a VM kernel with stand-in headers, a node whose headers package
lags), every kernel struct offset taken from them is wrong, silently: a read
returns garbage or zero. The offsets the tracepoint programs need (each probe
declares its own: Probe.offsets) come from here instead and reach the C code as
-D cflags.

The format is include/uapi/linux/btf.h: a header, a type section of
variable-length records (type ids count from 1), a string section. Members of
anonymous structs and unions are searched recursively, their offsets added.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF_KIND_*
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# What follows the 12-byte common record: (fixed bytes, bytes per vlen item).
_EXTRA: dict[int, tuple[int, int]] = {
    INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
    FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}


class BtfError(LookupError):
    """BTF is missing or malformed, or lacks a struct or member we need."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class Btf:
    """A parsed BTF blob: find structs by name and members by dotted path."""

    def __init__(self, data: bytes, base: Btf | None = None) -> None:
        """`base`: the vmlinux BTF a module's split BTF builds on (its strings continue
        the base's, its type ids the base's)."""
        self._base_strings = base._strings if base is not None else b""
        try:
            self._parse(data)
        except (struct.error, ValueError, IndexError, UnicodeDecodeError) as exc:
            raise BtfError(f"BTF is truncated or corrupt: {exc}") from None

    def _parse(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
        if max(hdr_len + type_off + type_len, hdr_len + str_off + str_len) > len(data):
            raise BtfError("BTF is truncated: its sections end past the data")
        self._data = data
        self._types_start = hdr_len + type_off
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._records: list[int] = [0]  # type id -> offset of its record; id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = self._types_start, self._types_start + type_len
        while pos < end:
            name_off, info, _size = struct.unpack_from("<3I", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            type_id = len(self._records)
            self._records.append(pos)
            if kind in (STRUCT, UNION) and name_off:
                self._by_name.setdefault((kind, self._string(name_off)), type_id)
            fixed, per_item = _EXTRA.get(kind, (0, 0))
            pos += 12 + fixed + per_item * vlen
        if pos != end:
            raise BtfError("BTF type section does not parse to its end")

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as exc:
            raise BtfError(f"{path}: {exc.strerror}") from None

    def _string(self, off: int) -> str:
        strings = self._strings
        if self._base_strings:  # split BTF: offsets past the base's strings are our own
            if off < len(self._base_strings):
                strings = self._base_strings
            else:
                off -= len(self._base_strings)
        try:
            end = strings.index(b"\0", off)
            return strings[off:end].decode()
        except (ValueError, UnicodeDecodeError):
            raise BtfError(f"BTF string at {off} is cut or not text") from None

    def _header(self, type_id: int) -> tuple[int, int, bool, int, int]:
        """(kind, vlen, kind_flag, size_or_type, record offset)."""
        pos = self._records[type_id]
        _name, info, size_or_type = struct.unpack_from("<3I", self._data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, bool(info >> 31), size_or_type, pos

    def struct_id(self, name: str) -> int:
        for kind in (STRUCT, UNION):
            type_id = self._by_name.get((kind, name))
            if type_id is not None:
                return type_id
        raise BtfError(f"struct {name} is not in this kernel's BTF")

    def resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(32):
            kind, _vlen, _kf, size_or_type, _pos = self._header(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = size_or_type
        raise BtfError("typedef chain too long")

    def members(self, type_id: int) -> Iterator[Member]:
        kind, vlen, kind_flag, _size, pos = self._header(self.resolve(type_id))
        if kind not in (STRUCT, UNION):
            raise BtfError(f"type {type_id} is not a struct or union")
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<3I", self._data, pos + 12 + 12 * i)
            if kind_flag:
                yield Member(self._string(name_off), mtype, offset & 0xFFFFFF, offset >> 24)
            else:
                yield Member(self._string(name_off), mtype, offset, 0)

    def _find(self, type_id: int, name: str) -> tuple[Member, int] | None:
        """A named member, searching anonymous members depth-first; (member, bit offset)."""
        for m in self.members(type_id):
            if m.name == name:
                return m, m.bit_offset
            if not m.name:
                inner_kind = self._header(self.resolve(m.type_id))[0]
                if inner_kind in (STRUCT, UNION):
                    found = self._find(m.type_id, name)
                    if found is not None:
                        return found[0], m.bit_offset + found[1]
        return None

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path (e.g. "__sk_common.skc_net") in a struct."""
        type_id, bits = self.struct_id(struct_name), 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path} in this kernel")
            member, member_bits = found
            if member.bitfield_size:
                raise BtfError(f"{struct_name}.{path} is a bitfield")
            bits += member_bits
            type_id = member.type_id
        if bits % 8:
            raise BtfError(f"{struct_name}.{path} is a bitfield")
        return bits // 8

    def sizeof(self, struct_name: str) -> int:
        return int(self._header(self.struct_id(struct_name))[3])

    def enums(self) -> Iterator[tuple[str, list[tuple[str, int]]]]:
        """(name, [(enumerator, value)]) of every named enum (ENUM and ENUM64)."""
        for type_id in range(1, len(self._records)):
            kind, vlen, signed, _size, pos = self._header(type_id)
            if kind not in (ENUM, ENUM64):
                continue
            name_off = struct.unpack_from("<I", self._data, pos)[0]
            if not name_off:
                continue
            values = []
            for i in range(vlen):
                if kind == ENUM:
                    off, value = struct.unpack_from("<Ii" if signed else "<II", self._data,
                                                    pos + 12 + 8 * i)
                else:
                    off, lo, hi = struct.unpack_from("<3I", self._data, pos + 12 + 12 * i)
                    value = (hi << 32) | lo
                values.append((self._string(off), value))
            yield self._string(name_off), values


def kernel_offsets(btf: Btf, wanted: Mapping[str, tuple[str, str]]) -> dict[str, int]:
    """Each offset wanted (-D name: (struct, member path), as the probes declare them), from
    this BTF; raises BtfError naming what is missing."""
    return {define: btf.offsetof(struct_name, path)
            for define, (struct_name, path) in wanted.items()}


def cflags(offsets: dict[str, int]) -> list[str]:
    return [f"-D{name}={value}" for name, value in sorted(offsets.items())]


# include/net/dropreason.h: SKB_DROP_REASON_SUBSYS_SHIFT; reasons of a subsystem other
# than the core (0) are (subsystem << 16) | n, named by the subsystem's own enum
SUBSYS_SHIFT = 16
SUBSYS_ENUM = "skb_drop_reason_subsys"
SUBSYS_PREFIX = "SKB_DROP_REASON_SUBSYS_"


def subsystem_drop_reasons(btfs: Iterable[Btf]) -> dict[int, str]:
    """Names of the drop reasons of subsystems other than the core (OpenvSwitch's, for
    OVN-Kubernetes and Antrea nodes; mac80211's), from the kernel's own enums: an enum
    named *_drop_reason holding an enumerator (subsystem << 16) of a subsystem that
    skb_drop_reason_subsys lists is that subsystem's reasons (enum ovs_drop_reason:
    OVS_DROP_LAST_ACTION is SKB_DROP_REASON_SUBSYS_OPENVSWITCH << 16). Both tests are
    needed: flag enums hold 1 << 16 too (I_DONTCACHE). A subsystem built as a module
    has its enums in the module's BTF (/sys/kernel/btf/<module>), while it is loaded."""
    all_enums = [e for b in btfs for e in b.enums()]
    subsystems = {value for name, values in all_enums if name == SUBSYS_ENUM
                  for entry, value in values if entry.startswith(SUBSYS_PREFIX) and value > 0
                  and not entry.endswith("_NUM")}
    out: dict[int, str] = {}
    for name, values in all_enums:
        if not name.endswith("_drop_reason"):
            continue
        mine = {value >> SUBSYS_SHIFT for _e, value in values} & subsystems
        owner = next((s for s in mine if any(v == s << SUBSYS_SHIFT for _e, v in values)), None)
        if owner is None:
            continue
        for entry, value in values:
            if value >> SUBSYS_SHIFT == owner:
                out.setdefault(value, entry)
    return out
