"""The probe contract: what the kernel is asked for comes from the registered probes, and
a probe added to a registry needs nothing else changed to be asked for."""

from __future__ import annotations

import ctypes
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
