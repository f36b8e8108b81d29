"""The BTF parser over small blobs built here, byte by byte, and against bpftool on this kernel.

The synthetic blobs are encoded by a tiny encoder written from include/uapi/linux/btf.h
(not from monitor/btf.py), and every expected offset below is computed by hand from the
bit offsets given to the encoder.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from monitor.kernel import btf
from monitor.kernel.btf import Btf, BtfError
from monitor.probes import kernel_needs

OFFSETS = kernel_needs().offsets  # every registered probe's

# BTF_KIND_* from include/uapi/linux/btf.h, spelled out again on purpose
K_INT, K_PTR, K_ARRAY, K_STRUCT, K_UNION, K_ENUM, K_FWD, K_TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
K_VOLATILE, K_CONST, K_RESTRICT, K_FUNC, K_FUNC_PROTO, K_VAR, K_DATASEC = 9, 10, 11, 12, 13, 14, 15
K_FLOAT, K_DECL_TAG, K_TYPE_TAG, K_ENUM64 = 16, 17, 18, 19


@dataclass
class Encoder:
    """Builds a BTF blob: `struct btf_header`, the type section, the string section."""

    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    records: list[bytes] = field(default_factory=list)

    def name(self, text: str) -> int:
        if not text:
            return 0
        at = len(self.strings)
        self.strings += text.encode() + b"\0"
        return at

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", *,
             kind_flag: bool = False) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self.records.append(struct.pack("<3I", self.name(name), info, size_or_type) + extra)
        return len(self.records)  # type ids count from 1

    def int_(self, name: str, size: int, signed: bool = False) -> int:
        encoding = 1 if signed else 0  # BTF_INT_SIGNED
        return self._add(name, K_INT, 0, size, struct.pack("<I", (encoding << 24) | size * 8))

    def ptr(self, target: int) -> int:
        return self._add("", K_PTR, 0, target)

    def typedef(self, name: str, target: int) -> int:
        return self._add(name, K_TYPEDEF, 0, target)

    def const(self, target: int) -> int:
        return self._add("", K_CONST, 0, target)

    def volatile(self, target: int) -> int:
        return self._add("", K_VOLATILE, 0, target)

    def fwd(self, name: str) -> int:
        return self._add(name, K_FWD, 0, 0)

    def array(self, elem: int, index: int, n: int) -> int:
        return self._add("", K_ARRAY, 0, 0, struct.pack("<3I", elem, index, n))

    def enum(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<Ii", self.name(k), v) for k, v in values.items())
        return self._add(name, K_ENUM, len(values), 4, extra)

    def enum64(self, name: str, values: dict[str, int]) -> int:
        extra = b"".join(struct.pack("<3I", self.name(k), v & 0xFFFFFFFF, v >> 32)
                         for k, v in values.items())
        return self._add(name, K_ENUM64, len(values), 8, extra)

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<2I", self.name(n), t) for n, t in params)
        return self._add("", K_FUNC_PROTO, len(params), ret, extra)

    def func(self, name: str, proto: int) -> int:
        return self._add(name, K_FUNC, 0, proto)

    def var(self, name: str, type_id: int) -> int:
        return self._add(name, K_VAR, 0, type_id, struct.pack("<I", 1))

    def datasec(self, name: str, vars_: list[tuple[int, int, int]]) -> int:
        extra = b"".join(struct.pack("<3I", *v) for v in vars_)
        return self._add(name, K_DATASEC, len(vars_), sum(v[2] for v in vars_), extra)

    def float_(self, name: str, size: int) -> int:
        return self._add(name, K_FLOAT, 0, size)

    def decl_tag(self, name: str, type_id: int, component: int) -> int:
        return self._add(name, K_DECL_TAG, 0, type_id, struct.pack("<i", component))

    def type_tag(self, name: str, type_id: int) -> int:
        return self._add(name, K_TYPE_TAG, 0, type_id)

    def struct(self, name: str, size: int,
               members: list[tuple[str, int, int] | tuple[str, int, int, int]], *,
               union: bool = False) -> int:
        """members: (name, type id, bit offset[, bitfield size]); "" for an anonymous member."""
        kind_flag = any(len(m) == 4 and m[3] for m in members)
        extra = b""
        for m in members:
            bits = m[3] if len(m) == 4 else 0
            offset = (bits << 24) | m[2] if kind_flag else m[2]
            extra += struct.pack("<3I", self.name(m[0]), m[1], offset)
        return self._add(name, K_UNION if union else K_STRUCT, len(members), size, extra,
                         kind_flag=kind_flag)

    def union(self, name: str, size: int, members: list[tuple[str, int, int]]) -> int:
        return self.struct(name, size, members, union=True)

    def blob(self, *, magic: int = 0xEB9F, hdr_len: int = 24, type_off: int = 0,
             gap: int = 0) -> bytes:
        """The whole blob; `gap` bytes of padding between the types and the strings."""
        types = b"".join(self.records)
        header = struct.pack("<HBBI4I", magic, 1, 0, hdr_len, type_off, len(types),
                             type_off + len(types) + gap, len(self.strings))
        header = header.ljust(hdr_len, b"\0")
        return header + bytes(type_off) + types + bytes(gap) + bytes(self.strings)


def kernel_like() -> Encoder:
    """sk_buff, net_device, net, sock, tcp_sock and tcp_skb_cb, shaped like Linux's (smaller)."""
    e = Encoder()
    u8 = e.int_("unsigned char", 1)
    u16 = e.int_("short unsigned int", 2)
    u32 = e.int_("unsigned int", 4)
    ulong = e.int_("long unsigned int", 8)
    s32 = e.int_("int", 4, signed=True)
    typedef_u32 = e.typedef("__u32", u32)
    typedef_u16 = e.typedef("u16", u16)
    const_u32 = e.const(typedef_u32)

    net_device_fwd = e.fwd("net_device")
    dev_ptr = e.ptr(net_device_fwd)
    sk_buff_fwd = e.fwd("sk_buff")
    skb_ptr = e.ptr(sk_buff_fwd)
    sock_fwd = e.fwd("sock")
    sk_ptr = e.ptr(sock_fwd)
    net_fwd = e.fwd("net")
    net_ptr = e.ptr(net_fwd)
    cb = e.array(u8, u32, 48)

    # sk_buff: union { struct { next, prev; union { dev; dev_scratch } }; rbnode } at 0
    dev_union = e.union("", 8, [("dev", dev_ptr, 0), ("dev_scratch", ulong, 0)])
    list_part = e.struct("", 24, [("next", skb_ptr, 0), ("prev", skb_ptr, 64), ("", dev_union, 128)])
    rb_node = e.struct("rb_node", 24, [("rb_parent_color", ulong, 0), ("rb_right", ulong, 64),
                                       ("rb_left", ulong, 128)])
    head_union = e.union("", 24, [("", list_part, 0), ("rbnode", rb_node, 0)])
    sk_union = e.union("", 8, [("sk", sk_ptr, 0), ("ip_defrag_offset", s32, 0)])
    # network_header sits in Linux's struct_group_tagged(sk_buff_members, headers, ...):
    # an anonymous union of an anonymous struct and the same members as `headers`.
    header_fields = [("transport_header", u16, 0), ("network_header", u16, 16)]
    headers_union = e.union("", 4, [("", e.struct("", 4, header_fields), 0),
                                    ("headers", e.struct("sk_buff_members", 4, header_fields), 0)])
    uchar_ptr = e.ptr(u8)
    e.struct("sk_buff", 120, [
        ("", head_union, 0),          # dev at 0 + 0 + 128 bits = 16 bytes
        ("", sk_union, 192),          # sk at 24
        ("cb", cb, 256),              # cb at 32
        ("len", typedef_u32, 640),    # 80
        ("cloned", u8, 672, 1),       # bitfield at byte 84, bit 0
        ("nohdr", u8, 673, 1),        # bitfield at byte 84, bit 1
        ("users", const_u32, 704),    # 88
        ("", headers_union, 736),     # network_header at 92 + 2 = 94
        ("head", uchar_ptr, 768),     # 96
        ("data", uchar_ptr, 832),     # 104
        ("end", typedef_u32, 896),    # 112: sk_buff_data_t, an offset from head on 64-bit
    ])
    atomic = e.struct("", 4, [("counter", s32, 0)])
    e.struct("skb_shared_info", 40, [("flags", u8, 0), ("nr_frags", u8, 16),
                                     ("frag_list", skb_ptr, 64), ("dataref", atomic, 256)])

    possible_net_t = e.typedef("possible_net_t", e.struct("", 8, [("net", net_ptr, 0)]))
    e.struct("net_device", 64, [("name", e.array(u8, u32, 16), 0), ("ifindex", s32, 128),
                                ("flags", u32, 160), ("nd_net", possible_net_t, 256)])

    ns_common = e.struct("ns_common", 24, [("stashed", ulong, 0), ("ops", ulong, 64),
                                           ("inum", u32, 128)])
    ns_typedef = e.typedef("ns_common_t", ns_common)
    e.struct("net", 64, [("passive", u32, 0), ("count", u32, 32), ("list", ulong, 64),
                         ("ns", e.volatile(ns_typedef), 256)])  # ns.inum: 32 + 16 = 48

    sock_common = e.struct("sock_common", 56, [
        ("skc_daddr", u32, 0), ("skc_rcv_saddr", u32, 32), ("skc_hash", u32, 64),
        ("skc_family", u16, 128), ("skc_net", possible_net_t, 192)])  # 24
    e.struct("sock", 128, [("__sk_common", sock_common, 0), ("sk_rcvbuf", s32, 448)])
    e.struct("tcp_sock", 256, [("inet_conn", e.array(u8, u32, 160), 0), ("srtt_us", u32, 1344),
                               ("mdev_us", u32, 1376)])  # srtt_us at 168
    gso = e.struct("", 4, [("tcp_gso_segs", typedef_u16, 0), ("tcp_gso_size", u16, 16)])
    e.struct("tcp_skb_cb", 48, [("seq", u32, 0), ("end_seq", u32, 32),
                                ("", e.union("", 4, [("tcp_tw_isn", u32, 0), ("", gso, 0)]), 64)])
    e.union("tcp_word_hdr", 20, [("th", e.array(u8, u32, 20), 0), ("words", e.array(u32, u32, 5), 0)])
    return e


@pytest.fixture(scope="module")
def parsed() -> Btf:
    return Btf(kernel_like().blob())


# -- offsets --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("struct_name", "path", "expected"), [
    ("sk_buff", "dev", 16),  # in an anonymous struct inside an anonymous union, inside another
    ("sk_buff", "dev_scratch", 16),
    ("sk_buff", "next", 0),
    ("sk_buff", "prev", 8),
    ("sk_buff", "rbnode", 0),
    ("sk_buff", "rbnode.rb_left", 16),  # a named member, then into it
    ("sk_buff", "sk", 24),
    ("sk_buff", "ip_defrag_offset", 24),
    ("sk_buff", "cb", 32),
    ("sk_buff", "len", 80),  # typedef'd type: the offset is the member's
    ("sk_buff", "users", 88),
    ("sk_buff", "transport_header", 92),
    ("sk_buff", "network_header", 94),  # in an anonymous struct in an anonymous union
    ("sk_buff", "headers.network_header", 94),  # the same bytes, through the named group
    ("sk_buff", "head", 96),
    ("sk_buff", "data", 104),
    ("net_device", "ifindex", 16),
    ("net_device", "nd_net", 32),
    ("net_device", "nd_net.net", 32),  # through a typedef of an anonymous struct
    ("net", "ns", 32),
    ("net", "ns.inum", 48),  # through volatile -> typedef -> struct
    ("sock", "__sk_common.skc_net", 24),
    ("sock", "__sk_common.skc_family", 16),
    ("sock", "sk_rcvbuf", 56),
    ("tcp_sock", "srtt_us", 168),
    ("tcp_skb_cb", "tcp_gso_segs", 8),  # anonymous struct in an anonymous union
    ("tcp_skb_cb", "tcp_gso_size", 10),
    ("tcp_word_hdr", "words", 0),  # a named union is found like a struct
])
def test_offsetof(parsed: Btf, struct_name: str, path: str, expected: int) -> None:
    assert parsed.offsetof(struct_name, path) == expected


def test_kernel_offsets_of_the_synthetic_kernel(parsed: Btf) -> None:
    assert btf.kernel_offsets(parsed, OFFSETS) == {
        "PNM_OFF_SKB_DEV": 16, "PNM_OFF_SKB_SK": 24, "PNM_OFF_SKB_CB": 32,
        "PNM_OFF_SKB_HEAD": 96, "PNM_OFF_SKB_NETWORK_HEADER": 94, "PNM_OFF_SKB_END": 112,
        "PNM_OFF_SHINFO_DATAREF": 32,
        "PNM_OFF_DEV_NET": 32, "PNM_OFF_DEV_IFINDEX": 16, "PNM_OFF_NET_INUM": 48,
        "PNM_OFF_SK_NET": 24, "PNM_OFF_SK_FAMILY": 16, "PNM_OFF_TCP_SRTT": 168, "PNM_OFF_TCB_GSO_SEGS": 8}


def test_cflags_sorted_by_name() -> None:
    assert btf.cflags({"PNM_OFF_B": 8, "PNM_OFF_A": 176}) == ["-DPNM_OFF_A=176", "-DPNM_OFF_B=8"]


def test_sizeof(parsed: Btf) -> None:
    assert parsed.sizeof("sk_buff") == 120
    assert parsed.sizeof("net") == 64
    assert parsed.sizeof("tcp_word_hdr") == 20
    with pytest.raises(BtfError, match=r"^struct nope is not in this kernel's BTF$"):
        parsed.sizeof("nope")


def test_members_read_back(parsed: Btf) -> None:
    members = list(parsed.members(parsed.struct_id("sk_buff")))
    assert [(m.name, m.bit_offset, m.bitfield_size) for m in members] == [
        ("", 0, 0), ("", 192, 0), ("cb", 256, 0), ("len", 640, 0), ("cloned", 672, 1),
        ("nohdr", 673, 1), ("users", 704, 0), ("", 736, 0), ("head", 768, 0), ("data", 832, 0),
        ("end", 896, 0)]


# -- refusals -------------------------------------------------------------------------------------

def test_missing_struct(parsed: Btf) -> None:
    with pytest.raises(BtfError, match=r"^struct nope is not in this kernel's BTF$"):
        parsed.offsetof("nope", "x")


def test_a_forward_declaration_is_not_a_struct() -> None:
    e = Encoder()
    e.fwd("only_declared")
    with pytest.raises(BtfError, match="only_declared"):
        Btf(e.blob()).offsetof("only_declared", "x")


@pytest.mark.parametrize(("struct_name", "path"), [
    ("sk_buff", "nope"), ("sk_buff", "rbnode.nope"), ("net", "ns.nope"), ("net", "inum"),
    ("sock", "skc_net"),  # only under __sk_common, which is named: no search into it
])
def test_missing_member(parsed: Btf, struct_name: str, path: str) -> None:
    with pytest.raises(BtfError, match=rf"^struct {struct_name} has no member {re.escape(path)} "
                                       r"in this kernel$"):
        parsed.offsetof(struct_name, path)


def test_path_through_a_pointer_is_refused(parsed: Btf) -> None:
    with pytest.raises(BtfError, match="is not a struct or union"):
        parsed.offsetof("sk_buff", "sk.anything")
    with pytest.raises(BtfError, match="is not a struct or union"):
        parsed.offsetof("sk_buff", "len.anything")


def test_misaligned_bitfield_is_refused(parsed: Btf) -> None:
    with pytest.raises(BtfError, match=r"^sk_buff\.nohdr is a bitfield$"):
        parsed.offsetof("sk_buff", "nohdr")


def test_byte_aligned_bitfield_is_refused(parsed: Btf) -> None:
    with pytest.raises(BtfError, match=r"is a bitfield"):
        parsed.offsetof("sk_buff", "cloned")


def test_bad_magic() -> None:
    with pytest.raises(BtfError, match=r"^bad BTF magic 0x9feb$"):
        Btf(kernel_like().blob(magic=0x9FEB))  # big-endian BTF read as little-endian


@pytest.mark.parametrize("length", [0, 1, 12, 23])
def test_shorter_than_a_header(length: int) -> None:
    with pytest.raises(BtfError, match=r"^BTF blob too short$"):
        Btf(kernel_like().blob()[:length])


def test_type_section_ending_inside_a_record() -> None:
    blob = bytearray(kernel_like().blob())
    type_len = struct.unpack_from("<I", blob, 12)[0]
    struct.pack_into("<I", blob, 12, type_len - 4)  # the header says 4 bytes less
    with pytest.raises(BtfError, match=r"^BTF type section does not parse to its end$"):
        Btf(bytes(blob))


def cuts() -> list[pytest.param]:  # type: ignore[valid-type]
    blob = kernel_like().blob()
    type_len = struct.unpack_from("<I", blob, 12)[0]
    return [pytest.param(n, id=name) for name, n in (
        ("in-the-first-type-record", 30),
        ("mid-type-section", 24 + type_len // 2),
        ("end-of-type-section", 24 + type_len),
        ("mid-string-section", len(blob) - 40),
        ("last-byte", len(blob) - 1))]


@pytest.mark.parametrize("length", cuts())
def test_truncated_blob(length: int) -> None:
    with pytest.raises(BtfError):
        Btf(kernel_like().blob()[:length]).offsetof("tcp_word_hdr", "words")


# -- layout of the blob ---------------------------------------------------------------------------

def test_every_kind_is_skipped_by_its_record_length() -> None:
    e = Encoder()
    u32 = e.int_("unsigned int", 4)
    e.enum("color", {"RED": 0, "GREEN": 1, "BLUE": 2})
    e.enum64("big", {"HUGE": 1 << 40, "SMALL": 1})
    proto = e.func_proto(u32, [("a", u32), ("b", u32), ("c", u32)])
    e.func("f", proto)
    e.var("v", u32)
    e.datasec(".data", [(6, 0, 4), (6, 4, 4)])
    e.float_("double", 8)
    e.decl_tag("tag", u32, -1)
    tagged = e.type_tag("user", u32)
    restrict = e._add("", K_RESTRICT, 0, tagged)
    arr = e.array(u32, u32, 3)
    e.struct("after", 24, [("a", u32, 0), ("arr", arr, 32), ("r", restrict, 128)])
    parsed = Btf(e.blob())
    assert parsed.offsetof("after", "arr") == 4
    assert parsed.offsetof("after", "r") == 16
    assert parsed.sizeof("after") == 24


def test_a_longer_header_and_offset_sections() -> None:
    """Future headers may be longer; sections are found from hdr_len and their offsets."""
    blob = kernel_like().blob(hdr_len=32, type_off=8, gap=12)
    parsed = Btf(blob)
    assert parsed.offsetof("net", "ns.inum") == 48
    assert parsed.offsetof("sk_buff", "dev") == 16


def test_first_struct_of_a_name_wins_and_structs_before_unions() -> None:
    e = Encoder()
    u32 = e.int_("unsigned int", 4)
    e.union("dup", 4, [("x", u32, 0)])
    e.struct("dup", 8, [("pad", u32, 0), ("x", u32, 32)])
    e.struct("dup", 12, [("pad", u32, 0), ("pad2", u32, 32), ("x", u32, 64)])
    assert Btf(e.blob()).offsetof("dup", "x") == 4


def test_typedef_loop_is_refused() -> None:
    e = Encoder()
    u32 = e.int_("unsigned int", 4)
    a = e.typedef("a_t", 3)  # id 2 -> id 3 -> id 2: a cycle
    assert e.typedef("b_t", a) == 3
    e.struct("s", 8, [("x", u32, 0), ("loop", a, 32)])
    with pytest.raises(BtfError, match="typedef chain too long"):
        Btf(e.blob()).offsetof("s", "loop.y")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match=r"vmlinux: No such file or directory$"):
        Btf.load(str(tmp_path / "vmlinux"))


def test_load_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(kernel_like().blob())
    assert Btf.load(str(path)).offsetof("sock", "__sk_common.skc_net") == 24


def test_kernel_offsets_name_what_is_missing() -> None:
    blob = kernel_like().blob().replace(b"tcp_sock\0", b"tcp_sick\0")  # no tcp_sock any more
    with pytest.raises(BtfError, match=r"^struct tcp_sock is not in this kernel's BTF$"):
        btf.kernel_offsets(Btf(blob), OFFSETS)


def test_kernel_offsets_name_a_missing_member() -> None:
    # both network_header's (the group's and the anonymous struct's): no such member at all
    blob = kernel_like().blob().replace(b"network_header\0", b"network_heaver\0")
    with pytest.raises(BtfError, match=r"^struct sk_buff has no member network_header in this kernel$"):
        btf.kernel_offsets(Btf(blob), OFFSETS)


# -- this machine's kernel, read by bpftool -------------------------------------------------------

VMLINUX = "/sys/kernel/btf/vmlinux"
_TYPE_RE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER_RE = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?")


@dataclass
class RawType:
    kind: str
    name: str
    target: int  # type_id= of modifiers and pointers
    size: int
    members: list[tuple[str, int, int]] = field(default_factory=list)


def bpftool_types(path: str) -> dict[int, RawType]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", path, "format", "raw"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    types: dict[int, RawType] = {}
    current: RawType | None = None
    for line in out.splitlines():
        m = _TYPE_RE.match(line)
        if m:
            target = re.search(r"\btype_id=(\d+)", m.group(4))
            size = re.search(r"\bsize=(\d+)", m.group(4))
            current = RawType(m.group(2), m.group(3), int(target.group(1)) if target else 0,
                              int(size.group(1)) if size else 0)
            types[int(m.group(1))] = current
            continue
        m = _MEMBER_RE.match(line)
        if m and current is not None and current.kind in ("STRUCT", "UNION"):
            current.members.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return types


def bpftool_offsetof(types: dict[int, RawType], struct_name: str, path: str) -> int:
    def resolve(type_id: int) -> RawType:
        t = types[type_id]
        while t.kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            t = types[t.target]
        return t

    def find(t: RawType, name: str) -> tuple[int, int] | None:  # (type id, bits)
        for member, type_id, bits in t.members:
            if member == name:
                return type_id, bits
            if member == "(anon)" and resolve(type_id).kind in ("STRUCT", "UNION"):
                inner = find(resolve(type_id), name)
                if inner is not None:
                    return inner[0], bits + inner[1]
        return None

    t = next(t for kind in ("STRUCT", "UNION") for t in types.values()
             if t.kind == kind and t.name == struct_name)
    total = 0
    for part in path.split("."):
        found = find(t, part)
        assert found is not None, f"{struct_name}.{path}: no {part} in bpftool's dump"
        total += found[1]
        t = resolve(found[0])
    assert total % 8 == 0
    return total // 8


@pytest.mark.skipif(not os.access(VMLINUX, os.R_OK) or shutil.which("bpftool") is None,
                    reason="needs a readable /sys/kernel/btf/vmlinux and bpftool")
def test_kernel_offsets_agree_with_bpftool() -> None:
    types = bpftool_types(VMLINUX)
    ours = btf.kernel_offsets(Btf.load(VMLINUX), OFFSETS)
    theirs = {define: bpftool_offsetof(types, struct_name, path)
              for define, (struct_name, path) in OFFSETS.items()}
    assert ours == theirs
    # the ones the brief names, spelled out, so a change to the probes' offsets cannot hide them
    assert ours["PNM_OFF_SKB_DEV"] == bpftool_offsetof(types, "sk_buff", "dev")
    assert ours["PNM_OFF_DEV_NET"] == bpftool_offsetof(types, "net_device", "nd_net")
    assert ours["PNM_OFF_DEV_IFINDEX"] == bpftool_offsetof(types, "net_device", "ifindex")
    assert ours["PNM_OFF_NET_INUM"] == bpftool_offsetof(types, "net", "ns.inum")
    assert ours["PNM_OFF_SKB_HEAD"] == bpftool_offsetof(types, "sk_buff", "head")
    assert ours["PNM_OFF_SKB_NETWORK_HEADER"] == bpftool_offsetof(types, "sk_buff", "network_header")
    sk_buff = next(t for t in types.values() if t.kind == "STRUCT" and t.name == "sk_buff")
    assert Btf.load(VMLINUX).sizeof("sk_buff") == sk_buff.size


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="needs bpftool")
@pytest.mark.parametrize("layout", [{}, {"hdr_len": 32, "type_off": 8, "gap": 12}])
def test_the_encoder_writes_what_bpftool_reads(tmp_path: Path, layout: dict[str, int]) -> None:
    """The test encoder checked by bpftool: the hand-computed offsets hold for both readers."""
    path = tmp_path / "synthetic.btf"
    path.write_bytes(kernel_like().blob(**layout))
    types = bpftool_types(str(path))
    assert bpftool_offsetof(types, "sk_buff", "dev") == 16
    assert bpftool_offsetof(types, "net", "ns.inum") == 48
    assert bpftool_offsetof(types, "tcp_skb_cb", "tcp_gso_segs") == 8
    assert bpftool_offsetof(types, "sock", "__sk_common.skc_net") == 24
    assert bpftool_offsetof(types, "sk_buff", "network_header") == 94
    assert bpftool_offsetof(types, "sk_buff", "head") == 96
    assert bpftool_offsetof(types, "sk_buff", "end") == 112
    assert bpftool_offsetof(types, "skb_shared_info", "dataref") == 32
    sk_buff = next(t for t in types.values() if t.kind == "STRUCT" and t.name == "sk_buff")
    assert sk_buff.size == 120
    assert [m[0] for m in sk_buff.members] == ["(anon)", "(anon)", "cb", "len", "cloned", "nohdr",
                                               "users", "(anon)", "head", "data", "end"]


# -- drop reasons of subsystems other than the core (issue 14) ----------------------------

SUBSYS = {"SKB_DROP_REASON_SUBSYS_CORE": 0, "SKB_DROP_REASON_SUBSYS_MAC80211_UNUSABLE": 1,
          "SKB_DROP_REASON_SUBSYS_OPENVSWITCH": 2, "SKB_DROP_REASON_SUBSYS_NUM": 3}
OVS = {"OVS_DROP_LAST_ACTION": 2 << 16, "OVS_DROP_ACTION_ERROR": (2 << 16) + 1,
       "OVS_DROP_EXPLICIT": (2 << 16) + 2}


def test_enums_read_back_with_their_values() -> None:
    enc = Encoder()
    enc.enum("skb_drop_reason_subsys", SUBSYS)
    enc.enum64("big", {"HIGH": 1 << 40, "LOW": 3})
    enc.enum("", {"ANON": 1})  # anonymous enums are skipped
    assert list(Btf(enc.blob()).enums()) == [("skb_drop_reason_subsys", list(SUBSYS.items())),
                                             ("big", [("HIGH", 1 << 40), ("LOW", 3)])]


def test_subsystem_reasons_named_from_the_subsystems_own_enum() -> None:
    enc = Encoder()
    enc.enum("skb_drop_reason_subsys", SUBSYS)
    enc.enum("ovs_drop_reason", OVS)
    enc.enum("inode_state_bits", {"I_NEW": 1, "I_DONTCACHE": 1 << 16})  # a flag, not a reason
    assert btf.subsystem_drop_reasons([Btf(enc.blob())]) == {v: k for k, v in OVS.items()}


def test_subsystem_reasons_from_a_modules_split_btf() -> None:
    """openvswitch built as a module: its enum is in /sys/kernel/btf/openvswitch, whose
    string offsets continue the base's (split BTF)."""
    base = Encoder()
    base.enum("skb_drop_reason_subsys", SUBSYS)
    vmlinux = Btf(base.blob())
    module = Encoder(strings=bytearray(b"\0"))
    shift = len(base.strings)
    module.name = lambda text: (0 if not text else  # type: ignore[method-assign]
                                shift + Encoder.name(module, text))
    module.enum("ovs_drop_reason", OVS)
    assert btf.subsystem_drop_reasons([vmlinux, Btf(module.blob(), base=vmlinux)]) == {
        v: k for k, v in OVS.items()}


def test_without_the_subsystems_enum_reasons_get_numbered_names() -> None:
    from monitor.kernel.kernelinfo import KernelInfo

    kernel = KernelInfo(1, None, "none", drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"})
    assert kernel.drop_reason(3) == "NO_SOCKET"
    assert kernel.drop_reason((2 << 16) | 5) == "SUBSYS_2_5"  # was cut to 5: REASON_5
    assert kernel.drop_reason(999) == "REASON_999"


def test_the_drops_program_knows_ip6_mc_input_where_kallsyms_named_it() -> None:
    from monitor.kernel.kernelinfo import KernelInfo
    from monitor.probes import drops

    kernel = KernelInfo(1, None, "none", drop_reasons={2: "NOT_SPECIFIED"},
                        functions={"ip6_mc_input": (0xffffffff821decd0, 0xffffffff821dee00)})
    assert drops.cflags(kernel) == ["-DPNM_REASON_NOT_SPECIFIED=2",
                                    "-DPNM_IP6_MC_INPUT=0xffffffff821decd0ULL",
                                    "-DPNM_IP6_MC_INPUT_END=0xffffffff821dee00ULL"]
    assert drops.cflags(KernelInfo(1, None, "none", drop_reasons={2: "NOT_SPECIFIED"})) == [
        "-DPNM_REASON_NOT_SPECIFIED=2"]
