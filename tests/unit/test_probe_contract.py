"""The probe contract: what the kernel is asked for comes from the registered probes, and
a probe added to a registry needs nothing else changed to be asked for."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.exposition import Family
from monitor.kernel import btf, kallsyms, kernelinfo
from monitor.probes import REGISTRY, RegistryError, _registry, kernel_needs
from monitor.probes.base import MapLayout, Probe, Scrape, Setting, within
from tests.unit.test_btf import kernel_like
from tests.unit.test_kernelinfo import proc, tracefs


def nothing(_scrape: Scrape) -> Iterator[Family]:
    yield from ()


def no_families() -> Iterator[Family]:
    yield from ()


# A tracepoint probe as a new one would be written: its C file, its module, one line.
FAKE = Probe(
    name="fake", summary="sk_buff lengths at net:netif_receive_skb", c_file="fake.c",
    tracepoints=("net:netif_receive_skb",),
    offsets={"PNM_OFF_SKB_LEN": ("sk_buff", "len")},
    functions=("netif_receive_skb",),
    settings=(Setting("fake_window", 30.0, "Seconds of lengths kept.",
                      within(1, 600, " s")),),
    maps={"pnm_fake": MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_slot=True)},
    collect=nothing, describe=no_families)


class Reads:
    """What kernelinfo.probe() asked for: tracepoint formats, offsets, function ranges."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tracepoints: list[str] = []
        self.offsets: dict[str, tuple[str, str]] = {}
        self.functions: list[str] = []
        read_format = kernelinfo.read_format

        def formats(root: str, tracepoint: str) -> Any:
            self.tracepoints.append(tracepoint)
            return read_format(root, tracepoint)

        def offsets(vmlinux: btf.Btf, wanted: dict[str, tuple[str, str]]) -> dict[str, int]:
            self.offsets.update(wanted)
            return dict.fromkeys(wanted, 8)

        def ranges(names: Any, _path: str = "") -> dict[str, tuple[int, int]]:
            self.functions.extend(names)
            return {}

        monkeypatch.setattr(kernelinfo, "read_format", formats)
        monkeypatch.setattr(btf, "kernel_offsets", offsets)
        monkeypatch.setattr(kallsyms, "function_ranges", ranges)


def kernel_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                needs: kernelinfo.KernelNeeds | None = None) -> Reads:
    reads = Reads(monkeypatch)
    proc_root, _ = proc(tmp_path)
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(kernel_like().blob())
    kernelinfo.probe(proc_root=proc_root, tracefs_root=tracefs(tmp_path / "tracing", {}),
                     btf_path=str(vmlinux), needs=needs)
    return reads


def test_what_the_kernel_is_asked_for_is_what_the_registered_probes_declare(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = kernel_read(tmp_path, monkeypatch)
    declared_tracepoints = {tp for p in REGISTRY.values() for tp in p.tracepoints}
    declared_offsets = {d: m for p in REGISTRY.values() for d, m in p.offsets.items()}
    declared_functions = {f for p in REGISTRY.values() for f in p.functions}
    assert set(reads.tracepoints) == declared_tracepoints  # each read by some probe, and each
    assert len(reads.tracepoints) == len(declared_tracepoints)  # probe's read, once
    assert reads.offsets == declared_offsets
    assert set(reads.functions) == declared_functions
    # as they are today: the tracepoint probes', the structs three of them read
    assert reads.tracepoints == ["skb:kfree_skb", "tcp:tcp_retransmit_skb",
                                 "tcp:tcp_retransmit_synack", "sock:inet_sock_set_state"]
    assert len(reads.offsets) == 14
    assert reads.functions == ["ip6_mc_input"]


def test_each_offset_the_c_code_reads_is_declared_by_a_probe_whose_c_reads_it() -> None:
    from monitor.kernel.source import BPF_DIR

    kstruct = (BPF_DIR / "kstruct.h").read_text()
    for probe in REGISTRY.values():
        source = (BPF_DIR / probe.c_file).read_text()
        for define in probe.offsets:
            assert define in source or define in kstruct, (probe.name, define)
    used = {d for p in REGISTRY.values() for d in p.offsets}
    for path in BPF_DIR.glob("*.[ch]"):
        for name in re.findall(r"\bPNM_OFF_[A-Z0-9_]+\b", path.read_text()):
            assert name in used, (path.name, name)


def test_a_probe_added_to_a_registry_is_asked_for_with_no_other_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _registry([*REGISTRY.values(), FAKE])
    needs = kernel_needs(registry.values())
    assert needs.tracepoints[-1] == "net:netif_receive_skb"
    assert needs.offsets["PNM_OFF_SKB_LEN"] == ("sk_buff", "len")
    assert "netif_receive_skb" in needs.functions
    reads = kernel_read(tmp_path, monkeypatch, needs)
    assert "net:netif_receive_skb" in reads.tracepoints
    assert reads.offsets["PNM_OFF_SKB_LEN"] == ("sk_buff", "len")
    assert "netif_receive_skb" in reads.functions
    assert "net:netif_receive_skb" not in kernel_needs().tracepoints  # the real one unchanged
    from monitor import settings

    fields = dataclasses.fields(settings.settings_class(registry.values()))
    assert [f.name for f in fields][-1] == "fake_window"


def test_two_probes_reading_one_offset_name_as_two_members_are_refused() -> None:
    other = Probe(name="other", summary="", c_file="other.c", maps={},
                  offsets={"PNM_OFF_SKB_LEN": ("sk_buff", "data_len")},
                  collect=nothing, describe=no_families)
    with pytest.raises(RegistryError, match="PNM_OFF_SKB_LEN"):
        _registry([FAKE, other])


def test_two_probes_owning_one_setting_are_refused() -> None:
    other = Probe(name="other", summary="", c_file="other.c", maps={},
                  settings=(Setting("fake_window", 1.0, "again"),),
                  collect=nothing, describe=no_families)
    with pytest.raises(RegistryError, match="setting 'fake_window' claimed by 'fake' and 'other'"):
        _registry([FAKE, other])


# -- settings -------------------------------------------------------------------------------------

def test_the_settings_probes_own_are_declared_by_the_probes() -> None:
    from monitor import settings

    owned = {s.name: (p.name, s) for p in REGISTRY.values() for s in p.settings}
    fields = {f.name: f for f in dataclasses.fields(settings.Settings)}
    for name, (_probe, setting) in owned.items():
        f = fields[name]
        assert (f.default, f.metadata["doc"], f.type) == (setting.default, setting.doc,
                                                          setting.type)
        assert f.metadata["setting"] is setting
    core = {f.name for f in dataclasses.fields(settings.CoreSettings)}
    assert set(fields) == core | set(owned)  # nothing else, and no setting twice
    assert not core & set(owned)
    # the daemon's own table names none of them: they are where the code reading them is
    assert {name: probe for name, (probe, _s) in owned.items()} == {
        "tcp_connect_timeout": "handshake", "dns_timeout": "dns", "dns_top": "dnsnames",
        **dict.fromkeys(("peer_top", "peer_ttl", "peer_interval", "cluster_cidrs",
                         "service_cidrs", "peer_index"), "peers"),
        **dict.fromkeys(("capture_dir", "capture_max_files", "capture_max_bytes",
                         "trace_max_duration", "trace_max_packets", "trace_max_bytes",
                         "trace_snaplen", "trace_max_snaplen", "traces_per_node",
                         "traces_per_pod"), "trace")}


def test_a_probes_setting_is_a_flag_an_env_variable_and_checked_as_it_says() -> None:
    from monitor import settings

    cls = settings.settings_class(_registry([*REGISTRY.values(), FAKE]).values())
    assert cls(node_name="n").fake_window == 30.0  # type: ignore[attr-defined]
    parser = argparse.ArgumentParser()
    for f in dataclasses.fields(cls):  # as add_arguments() does for the real Settings
        parser.add_argument(settings.flag_name(f.name), dest=f.name)
    assert parser.parse_args(["--fake-window", "9"]).fake_window == "9"
    with pytest.raises(settings.SettingsError, match=r"^fake_window: 601.0 s is outside 1..600$"):
        cls(node_name="n", fake_window=601.0)
    assert "fake_window" not in settings.names()  # the real Settings unchanged


def test_a_probe_cannot_take_a_daemon_settings_name() -> None:
    from monitor import settings

    thief = Probe(name="thief", summary="", c_file="thief.c", maps={},
                  settings=(Setting("listen", "", "mine"),),
                  collect=nothing, describe=no_families)
    with pytest.raises(ValueError, match="'listen' of probe 'thief'"):
        settings.settings_class([thief])


# -- what the daemon builds on the probes, and gives them -----------------------------------------

def test_the_daemon_is_wired_by_what_probes_need_and_provide() -> None:
    from monitor.probes import needing, providing, select
    from monitor.probes.base import CAPTURES, INTERFACE_COUNTS, NODE, PEER_RESOLVER, SNAPSHOT

    assert {p.name: p.needs for p in REGISTRY.values() if p.needs} == {
        "peers": (PEER_RESOLVER, SNAPSHOT, NODE)}
    assert {p.name: p.provides for p in REGISTRY.values() if p.provides} == {
        "packets": (INTERFACE_COUNTS,), "trace": (CAPTURES,)}
    assert providing(select(["packets"]), INTERFACE_COUNTS)
    assert not providing(select(["drops", "peers"]), CAPTURES)
    assert needing(select(["peers"]), PEER_RESOLVER)
    assert not needing(select(["dnsnames"]), PEER_RESOLVER)
