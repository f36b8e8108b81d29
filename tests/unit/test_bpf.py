"""The kernel package's pure parts (monitor.kernel.source): cflags, which probes can load,
the composed C source.

Nothing here compiles or loads.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.exposition import Family
from monitor.kernel import source as c_source
from monitor.probes import REGISTRY, kernel_needs, select
from monitor.probes.base import MapLayout, Probe, Scrape
from tests.unit.fakes import HOST_NETNS, OFFSETS, kernel, no_offsets_kernel

ALL_TRACEPOINTS = {"skb:kfree_skb": {"skbaddr", "reason", "rx_sk"},
                   "tcp:tcp_retransmit_skb": {"skaddr", "skbaddr", "err"},
                   "tcp:tcp_retransmit_synack": {"skaddr", "req"},
                   "sock:inet_sock_set_state": {"skaddr", "oldstate", "protocol"}}


def nothing(_scrape: Scrape) -> Iterator[Family]:
    yield from ()


def no_families() -> Iterator[Family]:
    yield from ()


def probe(name: str, **kwargs: object) -> Probe:
    return Probe(name=name, summary=name, c_file=f"{name}.c",  # type: ignore[arg-type]
                 maps={f"pnm_{name}": MapLayout(ctypes.c_uint32, ctypes.c_uint64)},
                 collect=nothing, describe=no_families, **kwargs)


# -- build_cflags ---------------------------------------------------------------------------------

def test_cflags_with_offsets() -> None:
    flags = c_source.build_cflags([probe("a")], kernel(), 256)
    assert flags == [
        "-DPNM_MAX_INTERFACES=256", "-DPNM_IFSLOT_BUCKETS=65536", f"-DPNM_HOST_NETNS={HOST_NETNS}",
        "-Wno-macro-redefined",
        "-DPNM_OFF_DEV_IFINDEX=224", "-DPNM_OFF_DEV_NET=264", "-DPNM_OFF_NET_INUM=176",
        "-DPNM_OFF_SHINFO_DATAREF=32",
        "-DPNM_OFF_SKB_CB=40", "-DPNM_OFF_SKB_DEV=16", "-DPNM_OFF_SKB_END=188",
        "-DPNM_OFF_SKB_HEAD=192", "-DPNM_OFF_SKB_NETWORK_HEADER=180", "-DPNM_OFF_SKB_SK=24",
        "-DPNM_OFF_SK_FAMILY=16", "-DPNM_OFF_SK_NET=48", "-DPNM_OFF_TCB_GSO_SEGS=8",
        "-DPNM_OFF_TCP_SRTT=1680"]
    assert len([f for f in flags if f.startswith("-DPNM_OFF_")]) == len(OFFSETS)


def test_the_fake_kernel_has_every_offset_the_c_code_reads() -> None:
    # A fake kernel "with BTF" must define every -D the C code uses, as the real one does.
    assert set(OFFSETS) == set(kernel_needs().offsets)


def test_cflags_without_offsets() -> None:
    flags = c_source.build_cflags([probe("a")], no_offsets_kernel(), 1024)
    assert "-DPNM_NO_KSTRUCT" in flags
    assert not [f for f in flags if f.startswith("-DPNM_OFF_")]


def test_cflags_with_offsets_has_no_no_kstruct() -> None:
    assert "-DPNM_NO_KSTRUCT" not in c_source.build_cflags([probe("a")], kernel(), 1024)


def test_ports_parsed_only_if_a_probe_needs_them() -> None:
    assert "-DPNM_WANT_PORTS" not in c_source.build_cflags([probe("a"), probe("b")], kernel(), 1024)
    flags = c_source.build_cflags([probe("a"), probe("b", needs_ports=True)], kernel(), 1024)
    assert flags.count("-DPNM_WANT_PORTS") == 1
    real = c_source.build_cflags(select(["packets", "drops"]), kernel(), 1024)
    assert "-DPNM_WANT_PORTS" not in real
    assert "-DPNM_WANT_PORTS" in c_source.build_cflags(select(["dns"]), kernel(), 1024)


def test_probe_cflags_appended_in_probe_order() -> None:
    seen = []

    def flags_of(tag: str) -> object:
        def cflags(k: object) -> list[str]:
            seen.append(k)
            return [f"-DPNM_{tag}=1"]
        return cflags

    k = kernel()
    flags = c_source.build_cflags([probe("a", cflags=flags_of("A")), probe("b"),
                              probe("c", cflags=flags_of("C"))], k, 1024)
    assert flags[-2:] == ["-DPNM_A=1", "-DPNM_C=1"]
    assert seen == [k, k]  # each probe sees the kernel's facts


def test_real_probe_cflags_follow_the_tracepoint_fields() -> None:
    k = kernel(tracepoints=ALL_TRACEPOINTS)
    flags = c_source.build_cflags(select([]), k, 1024)
    assert "-DPNM_HAVE_RX_SK" in flags
    assert "-DPNM_RETRANS_HAS_ERR" in flags
    old = kernel(tracepoints={"skb:kfree_skb": {"skbaddr", "reason"},
                              "tcp:tcp_retransmit_skb": {"skaddr", "skbaddr"}})
    flags = c_source.build_cflags(select([]), old, 1024)
    assert "-DPNM_HAVE_RX_SK" not in flags
    assert "-DPNM_RETRANS_HAS_ERR" not in flags


# -- loadable -------------------------------------------------------------------------------------

def test_everything_loads_on_a_kernel_with_offsets_and_tracepoints() -> None:
    keep, notes = c_source.loadable(select([]), kernel(tracepoints=ALL_TRACEPOINTS))
    assert [p.name for p in keep] == list(REGISTRY)
    assert notes == {}


def test_without_offsets() -> None:
    problem = "/sys/kernel/btf/vmlinux: No such file or directory"
    keep, notes = c_source.loadable(select([]), no_offsets_kernel(tracepoints=ALL_TRACEPOINTS))
    # trace needs no offsets (it copies from the TC programs), so it loads too
    assert [p.name for p in keep] == ["packets", "peers", "tcpflags", "handshake", "dns",
                                      "dnsnames", "drops", "trace"]
    assert notes == {
        "drops": "degraded: without kernel struct offsets every drop counts under the node "
                 f"({problem})",
        "retransmits": f"not loaded: no kernel struct offsets ({problem})",
        "rtt": f"not loaded: no kernel struct offsets ({problem})",
    }


def test_synthetic_needs_offsets() -> None:
    plain = probe("plain")
    strict = probe("strict", offsets={"PNM_OFF_X": ("sk_buff", "dev")})
    lenient = probe("lenient", offsets={"PNM_OFF_X": ("sk_buff", "dev")}, degraded="counts less")
    keep, notes = c_source.loadable([plain, strict, lenient], no_offsets_kernel())
    assert keep == [plain, lenient]
    assert notes["strict"].startswith("not loaded: no kernel struct offsets")
    assert notes["lenient"].startswith("degraded: counts less (")
    assert "plain" not in notes
    keep, notes = c_source.loadable([plain, strict, lenient], kernel())
    assert keep == [plain, strict, lenient]
    assert notes == {}


def test_a_missing_tracepoint_drops_the_probe() -> None:
    tps = {k: v for k, v in ALL_TRACEPOINTS.items() if k != "tcp:tcp_retransmit_synack"}
    keep, notes = c_source.loadable(select([]), kernel(tracepoints=tps))
    assert "retransmits" not in [p.name for p in keep]
    assert notes == {"retransmits": "not loaded: this kernel has no tracepoint "
                                    "tcp:tcp_retransmit_synack"}


def test_a_missing_tracepoint_beats_degraded() -> None:
    keep, notes = c_source.loadable(select(["drops"]), no_offsets_kernel())
    assert keep == []
    assert notes == {"drops": "not loaded: this kernel has no tracepoint skb:kfree_skb"}


def test_several_missing_tracepoints_are_named() -> None:
    p = probe("t", tracepoints=("a:b", "c:d", "e:f"))
    _, notes = c_source.loadable([p], kernel(tracepoints={"c:d": {"x"}}))
    assert notes == {"t": "not loaded: this kernel has no tracepoint a:b, e:f"}


# -- compose_source -------------------------------------------------------------------------------

@pytest.fixture
def bpf_dir(tmp_path: Path) -> Path:
    for name, text in {"pnm.h": "/* PNM_H */", "kstruct.h": "/* KSTRUCT_H */",
                       "tc_packet.h": "/* TC_PACKET_H */", "tc_main.c": "/* TC_MAIN */",
                       "a.c": "/* A_C */", "b.c": "/* B_C */", "c.c": "/* C_C */"}.items():
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


def dispatcher_calls(source: str) -> list[str]:
    body = source.split("static __always_inline void pnm_tc_probes(", 1)[1].split("\n}\n", 1)[0]
    return re.findall(r"^\s+(\w+)\(skb, pkt\);$", body, re.MULTILINE)


def test_compose_source_order_and_dispatcher(bpf_dir: Path) -> None:
    probes = [probe("a", tc_hook="a_tc"), probe("b"), probe("c", tc_hook="c_tc")]
    source = c_source.compose_source(probes, bpf_dir)
    marks = ["/* PNM_H */", "/* KSTRUCT_H */", "/* TC_PACKET_H */", "/* A_C */", "/* B_C */", "/* C_C */",
             "pnm_tc_probes(", "/* TC_MAIN */"]
    positions = [source.index(m) for m in marks]
    assert positions == sorted(positions)
    assert dispatcher_calls(source) == ["a_tc", "c_tc"]
    for name in ("pnm.h", "kstruct.h", "tc_packet.h", "a.c", "b.c", "c.c", "tc_main.c"):
        assert f'#line 1 "{name}"\n' in source


def test_compose_source_without_tc_hooks(bpf_dir: Path) -> None:
    source = c_source.compose_source([probe("b")], bpf_dir)
    assert dispatcher_calls(source) == []
    assert "/* A_C */" not in source
    assert "pnm_tc_probes(struct __sk_buff *skb," in source  # tc_main.c calls it regardless


def test_compose_source_of_the_real_probes() -> None:
    probes = select(["tcpflags", "dns", "drops", "rtt"])
    source = c_source.compose_source(probes)
    for p in probes:
        assert (c_source.BPF_DIR / p.c_file).read_text() in source
    for absent in ("packets.c", "handshake.c", "retransmits.c"):
        assert f'#line 1 "{absent}"' not in source
    assert dispatcher_calls(source) == ["tcpflags_tc", "dns_tc"]
    assert (c_source.BPF_DIR / "pnm.h").read_text() in source
    assert (c_source.BPF_DIR / "tc_main.c").read_text() in source


def test_compose_source_calls_every_tc_hook_of_the_registry() -> None:
    source = c_source.compose_source(select([]))
    hooks = ["packets_tc", "peers_tc", "tcpflags_tc", "handshake_tc", "dns_tc", "dnsnames_tc",
             "trace_tc"]
    assert dispatcher_calls(source) == hooks
    for hook in hooks:
        assert f"static __always_inline void {hook}(struct __sk_buff *skb" in source


def test_each_probe_pins_its_maps_in_its_own_directory(bpf_dir: Path) -> None:
    source = c_source.compose_source([probe("a"), probe("b")], bpf_dir,
                                pin_dirs={"a": Path("/pins/maps-a-1"), "b": Path("/pins/maps-b-2")})
    a_dir = source.index('#define PNM_PIN_DIR "/pins/maps-a-1"')
    b_dir = source.index('#define PNM_PIN_DIR "/pins/maps-b-2"')
    assert a_dir < source.index("/* A_C */") < b_dir < source.index("/* B_C */")
    assert "PNM_PIN_DIR" not in c_source.compose_source([probe("a")], bpf_dir)


def test_a_probes_change_moves_its_layout_only_and_the_cores_moves_every_one(
        tmp_path: Path) -> None:
    import shutil

    shutil.copytree(c_source.BPF_DIR, tmp_path / "bpf")
    before = c_source.maps_layout_versions(64, tmp_path / "bpf")
    assert before["core"].startswith("core-") and before["dns"].startswith("dns-")
    assert "trace" not in before  # it pins no map
    dns = tmp_path / "bpf" / "dns.c"
    dns.write_text(dns.read_text() + "\n/* a comment changes nothing */\n")
    assert c_source.maps_layout_versions(64, tmp_path / "bpf") == before
    dns.write_text(dns.read_text() + "\n#define PNM_DNS_SOMETHING_NEW 1\n")
    changed = c_source.maps_layout_versions(64, tmp_path / "bpf")
    assert [o for o in before if changed[o] != before[o]] == ["dns"]
    resized = c_source.maps_layout_versions(128, tmp_path / "bpf")
    assert all(resized[o] != changed[o] for o in before)  # the core's sizes: all of them


def test_the_packet_parser_versions_no_pinned_map(tmp_path: Path) -> None:
    """tc_packet.h (the parse of the packet in hand, the daemon's unpinned switches) can
    change in any release without starting a single counter afresh at the upgrade."""
    import shutil

    shutil.copytree(c_source.BPF_DIR, tmp_path / "bpf")
    before = c_source.maps_layout_versions(64, tmp_path / "bpf")
    parser = tmp_path / "bpf" / "tc_packet.h"
    parser.write_text(parser.read_text() + "\n#define PNM_PARSE_SOMETHING_NEW 1\n"
                      "struct pnm_parse_scratch { __u64 word; };\n")
    assert c_source.maps_layout_versions(64, tmp_path / "bpf") == before


def test_the_switches_are_numbered_alike_in_c_and_python() -> None:
    text = (c_source.BPF_DIR / "tc_packet.h").read_text()
    defined = dict(re.findall(r"#define PNM_SWITCH_(\w+) (\d+)", text))
    assert {name: int(v) for name, v in defined.items()} == {
        "MOVING": c_source.SWITCH_MOVING, "TRACING": c_source.SWITCH_TRACING}
    size = re.search(r"BPF_ARRAY\(pnm_switches, __u32, (\d+)\)", text)
    assert size is not None
    assert max(c_source.SWITCH_MOVING, c_source.SWITCH_TRACING) < int(size.group(1))


def test_the_switches_share_one_cache_line_on_this_kernel() -> None:
    """Both are read on every packet: two lines would be one more miss a packet. Where
    the array's values begin is the running kernel's struct bpf_array (BTF)."""
    from monitor.kernel.btf import Btf

    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if not vmlinux.exists():
        pytest.skip("no kernel BTF here")
    values = Btf(vmlinux.read_bytes()).offsetof("bpf_array", "value")
    lines = {(values + 8 * i) // 64 for i in (c_source.SWITCH_MOVING, c_source.SWITCH_TRACING)}
    assert len(lines) == 1, f"values at {values}: entries in lines {sorted(lines)}"
