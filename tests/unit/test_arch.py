"""Syscall numbers by architecture: the table, the machine's names, the error elsewhere."""

from __future__ import annotations

import ctypes
import errno
import platform
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.kernel import arch, perfevent, syscalls


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    arch.number.cache_clear()
    yield
    arch.number.cache_clear()  # no other test may inherit a monkeypatched machine's numbers


@pytest.mark.parametrize(("machine", "bpf", "perf"), [
    ("x86_64", 321, 298), ("amd64", 321, 298), ("AMD64", 321, 298),
    ("aarch64", 280, 241), ("arm64", 280, 241),
])
def test_numbers_follow_the_machine(monkeypatch: pytest.MonkeyPatch, machine: str, bpf: int,
                                    perf: int) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert arch.syscall_number("bpf") == arch.number("bpf") == bpf
    assert arch.syscall_number("perf_event_open") == arch.number("perf_event_open") == perf


@pytest.mark.parametrize("machine", ["riscv64", "armv7l", "ppc64le", "s390x", "i686", ""])
def test_other_machines_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, machine: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    with pytest.raises(arch.UnsupportedArchitectureError, match=re.escape(repr(machine or "unknown"))) as exc:
        arch.number("bpf")
    assert exc.value.errno == errno.ENOSYS
    assert isinstance(exc.value, OSError)  # so `check` and the callers report it


def test_the_calls_themselves_refuse_before_any_syscall(monkeypatch: pytest.MonkeyPatch) -> None:
    """No number of another architecture's table is ever passed to syscall()."""
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    made: list[int] = []
    monkeypatch.setattr(syscalls, "_libc", type("L", (), {"syscall": lambda *a: made.append(1)})())
    monkeypatch.setattr(perfevent, "_libc", type("L", (), {"syscall": lambda *a: made.append(1)})())
    with pytest.raises(arch.UnsupportedArchitectureError, match="riscv64"):
        syscalls.link_detach(3)
    with pytest.raises(arch.UnsupportedArchitectureError, match="riscv64"):
        perfevent.perf_event_open(perfevent.perf_attr(1, 10), -1, 0, -1, 0)
    assert made == []


def test_bpf_goes_through_the_number_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    calls: list[tuple[object, ...]] = []

    class Libc:
        @staticmethod
        def syscall(*args: object) -> int:
            calls.append(args)
            return 7

    monkeypatch.setattr(syscalls, "_libc", Libc())
    monkeypatch.setattr(perfevent, "_libc", Libc())
    assert syscalls.enable_run_stats() == 7
    assert perfevent.perf_event_open(perfevent.perf_attr(1, 10), -1, 0, -1, 0) == 7
    assert [c[0] for c in calls] == [280, 241]
    assert isinstance(calls[1][2], ctypes.c_int)


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {name: int(m.group(1)) for name in arch.SYSCALLS["x86_64"]
            if (m := re.search(rf"#define __NR_{name}\s+(\d+)\b", text))}


@pytest.mark.parametrize(("machine", "header"), [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    ("aarch64", "/usr/include/asm-generic/unistd.h"),  # arm64's table is the generic one
])
def test_the_table_matches_the_installed_uapi_headers(machine: str, header: str) -> None:
    path = Path(header)
    if not path.exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    assert _header_numbers(path) == arch.SYSCALLS[machine]
