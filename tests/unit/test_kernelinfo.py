"""What the kernel says of itself: tracefs formats, drop reason names, and probe() over fake trees."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from monitor.kernel import kernelinfo
from monitor.kernel.kernelinfo import KernelInfo, TracepointFormat, read_format, symbols
from tests.unit.test_btf import kernel_like

KFREE_SKB = """name: kfree_skb
ID: 1581
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;

print fmt: "skbaddr=%p rx_sk=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->rx_sk, \
REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, \
{ 3, "NO_SOCKET" }, { 4, "SOCKET_CLOSE" }, { 77, "TC_INGRESS" }, { 128, "MAX" })
"""

RETRANSMIT_SKB = """name: tcp_retransmit_skb
ID: 1416
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;

print fmt: "skbaddr=%p skaddr=%p family=%s sport=%hu dport=%hu saddr=%pI4 daddr=%pI4 \
saddrv6=%pI6c daddrv6=%pI6c state=%s", REC->skbaddr, REC->skaddr, \
__print_symbolic(REC->family, { 2, "AF_INET" }, { 10, "AF_INET6" }), REC->sport, REC->dport, \
REC->saddr, REC->daddr, REC->saddr_v6, REC->daddr_v6, __print_symbolic(REC->state, \
{ TCP_ESTABLISHED, "TCP_ESTABLISHED" }, { TCP_SYN_SENT, "TCP_SYN_SENT" })
"""


def tracefs(root: Path, formats: dict[str, str]) -> str:
    for tracepoint, text in formats.items():
        category, event = tracepoint.split(":")
        d = root / "events" / category / event
        d.mkdir(parents=True)
        (d / "format").write_text(text)
    return str(root)


# -- read_format ----------------------------------------------------------------------------------

def test_read_format_fields(tmp_path: Path) -> None:
    root = tracefs(tmp_path, {"skb:kfree_skb": KFREE_SKB})
    fmt = read_format(root, "skb:kfree_skb")
    assert fmt is not None
    assert fmt.fields == {"common_type", "common_flags", "common_preempt_count", "common_pid",
                          "skbaddr", "location", "rx_sk", "protocol", "reason"}
    assert fmt.print_fmt.startswith('print fmt: "skbaddr=%p rx_sk=%p')
    assert fmt.print_fmt.rstrip().endswith('{ 128, "MAX" })')


def test_read_format_array_fields(tmp_path: Path) -> None:
    root = tracefs(tmp_path, {"tcp:tcp_retransmit_skb": RETRANSMIT_SKB})
    fmt = read_format(root, "tcp:tcp_retransmit_skb")
    assert fmt is not None
    assert {"saddr", "daddr", "saddr_v6", "daddr_v6", "sport", "skaddr", "state"} <= fmt.fields
    assert "err" not in fmt.fields
    assert not any("[" in f or "__u8" in f or f in ("4", "16") for f in fmt.fields)
    assert len(fmt.fields) == 14


def test_read_format_data_loc_and_pointer_fields(tmp_path: Path) -> None:
    text = ("format:\n\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;\n"
            "\tfield:struct sock * sk;\toffset:16;\tsize:8;\tsigned:0;\n"
            "\tfield:unsigned long long ts;\toffset:24;\tsize:8;\tsigned:0;\n")
    root = tracefs(tmp_path, {"x:y": text})
    fmt = read_format(root, "x:y")
    assert fmt == TracepointFormat(frozenset({"name", "sk", "ts"}), "")


def test_read_format_missing(tmp_path: Path) -> None:
    root = tracefs(tmp_path, {"skb:kfree_skb": KFREE_SKB})
    assert read_format(root, "skb:consume_skb") is None
    assert read_format(str(tmp_path / "nowhere"), "skb:kfree_skb") is None


# -- symbols --------------------------------------------------------------------------------------

def test_symbols_of_the_drop_reason() -> None:
    assert symbols(KFREE_SKB, "reason") == {2: "NOT_SPECIFIED", 3: "NO_SOCKET",
                                            4: "SOCKET_CLOSE", 77: "TC_INGRESS", 128: "MAX"}


def test_symbols_of_one_field_among_several() -> None:
    assert symbols(RETRANSMIT_SKB, "family") == {2: "AF_INET", 10: "AF_INET6"}
    # entries named by macro rather than number are not numbers: left out
    assert symbols(RETRANSMIT_SKB, "state") == {}
    assert symbols(RETRANSMIT_SKB, "sport") == {}  # printed, but not symbolically


def test_symbols_stop_at_the_matching_parenthesis() -> None:
    fmt = ('print fmt: "a=%s b=%s c=%s", __print_symbolic(REC->a, { 1, "A_ONE" }), '
           '((REC->flag) ? __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { (3), "PAREN" }, '
           '{ 4, "SOCKET_CLOSE" }) : "none"), __print_symbolic(REC->c, { 5, "C_FIVE" }, '
           '{ 2, "C_TWO" })')
    assert symbols(fmt, "reason") == {2: "NOT_SPECIFIED", 4: "SOCKET_CLOSE"}
    assert symbols(fmt, "a") == {1: "A_ONE"}
    assert symbols(fmt, "c") == {5: "C_FIVE", 2: "C_TWO"}


def test_symbols_of_a_field_with_a_longer_namesake() -> None:
    fmt = ('print fmt: "%s %s", __print_symbolic(REC->reason_code, { 9, "WRONG" }), '
           '__print_symbolic(REC->reason, { 1, "RIGHT" })')
    assert symbols(fmt, "reason") == {1: "RIGHT"}


def test_symbols_without_the_field() -> None:
    assert symbols('print fmt: "x=%d", REC->x', "reason") == {}
    assert symbols("", "reason") == {}


# -- KernelInfo -----------------------------------------------------------------------------------

def info(**kwargs: object) -> KernelInfo:
    return KernelInfo(4026531840, None, "none", **kwargs)  # type: ignore[arg-type]


def test_drop_reason_names_and_fallback() -> None:
    k = info(drop_reasons={2: "NOT_SPECIFIED", 3: "NO_SOCKET"})
    assert k.drop_reason(3) == "NO_SOCKET"
    assert k.drop_reason(2) == "NOT_SPECIFIED"
    assert k.drop_reason(0) == "REASON_0"
    assert k.drop_reason(300) == "REASON_300"
    assert info().drop_reason(3) == "REASON_3"


def test_has_field() -> None:
    k = info(tracepoints={"tcp:tcp_retransmit_skb": TracepointFormat(frozenset({"err", "skaddr"}),
                                                                     "")})
    assert k.has_field("tcp:tcp_retransmit_skb", "err")
    assert not k.has_field("tcp:tcp_retransmit_skb", "rx_sk")
    assert not k.has_field("skb:kfree_skb", "err")


# -- probe() --------------------------------------------------------------------------------------

def proc(tmp_path: Path) -> tuple[str, int]:
    ns = tmp_path / "proc" / "self" / "ns"
    ns.mkdir(parents=True)
    (ns / "net").write_text("")
    return str(tmp_path / "proc"), os.stat(ns / "net").st_ino


def test_probe_without_btf(tmp_path: Path) -> None:
    proc_root, inode = proc(tmp_path)
    root = tracefs(tmp_path / "tracing", {"skb:kfree_skb": KFREE_SKB,
                                          "tcp:tcp_retransmit_skb": RETRANSMIT_SKB})
    missing = str(tmp_path / "no-btf" / "vmlinux")
    k = kernelinfo.probe(proc_root=proc_root, tracefs_root=root, btf_path=missing)
    assert k.host_netns == inode
    assert k.offsets is None
    assert k.offsets_source == "none"
    assert k.offsets_problem == f"{missing}: No such file or directory"
    assert set(k.tracepoints) == {"skb:kfree_skb", "tcp:tcp_retransmit_skb"}
    assert k.drop_reasons == {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 4: "SOCKET_CLOSE",
                              77: "TC_INGRESS", 128: "MAX"}
    assert k.has_field("skb:kfree_skb", "rx_sk")
    assert not k.has_field("tcp:tcp_retransmit_skb", "err")


def test_probe_without_kfree_skb_has_no_reason_names(tmp_path: Path) -> None:
    proc_root, _ = proc(tmp_path)
    root = tracefs(tmp_path / "tracing", {"tcp:tcp_retransmit_skb": RETRANSMIT_SKB,
                                          "skb:consume_skb": KFREE_SKB})  # not one we read
    k = kernelinfo.probe(proc_root=proc_root, tracefs_root=root, btf_path=str(tmp_path / "x"))
    assert set(k.tracepoints) == {"tcp:tcp_retransmit_skb"}
    assert k.drop_reasons == {}
    assert k.drop_reason(3) == "REASON_3"


def test_probe_with_btf_lacking_a_struct(tmp_path: Path) -> None:
    proc_root, _ = proc(tmp_path)
    path = tmp_path / "vmlinux"
    # a valid BTF blob with a single int and no structs: header, one INT record, strings
    strings = b"\0int\0"
    types = struct.pack("<3II", 1, 1 << 24, 4, 32)
    path.write_bytes(struct.pack("<HBBI4I", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                                 len(strings)) + types + strings)
    k = kernelinfo.probe(proc_root=proc_root, tracefs_root=str(tmp_path), btf_path=str(path))
    assert (k.offsets, k.offsets_source) == (None, "none")
    assert k.offsets_problem == "struct sk_buff is not in this kernel's BTF"
    assert k.tracepoints == {}


def test_probe_with_btf(tmp_path: Path) -> None:
    proc_root, _ = proc(tmp_path)
    path = tmp_path / "vmlinux"
    path.write_bytes(kernel_like().blob())
    k = kernelinfo.probe(proc_root=proc_root, tracefs_root=str(tmp_path), btf_path=str(path))
    assert k.offsets_source == "btf"
    assert k.offsets_problem == ""
    assert k.offsets is not None
    assert k.offsets["PNM_OFF_NET_INUM"] == 48
    assert k.offsets["PNM_OFF_SKB_DEV"] == 16


@pytest.mark.skipif(not os.path.exists("/sys/kernel/tracing/events/skb/kfree_skb/format"),
                    reason="needs tracefs")
def test_this_kernel_names_its_drop_reasons() -> None:
    fmt = read_format("/sys/kernel/tracing", "skb:kfree_skb")
    assert fmt is not None
    assert "reason" in fmt.fields
    names = symbols(fmt.print_fmt, "reason")
    assert "NO_SOCKET" in names.values()
    assert "NOT_SPECIFIED" in names.values()
