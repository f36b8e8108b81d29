"""What the running kernel tells us before anything is compiled.

Struct offsets come from BTF (monitor/btf.py). Tracepoint fields and the drop
reasons' names come from tracefs, where the running kernel describes its own
tracepoints: reasons are renumbered between kernel versions (NO_SOCKET is 2
on 6.1 and 3 on 6.18), so names are never taken from headers or a table of
our own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from monitor import log
from monitor.kernel import btf, kallsyms

_FIELD_RE = re.compile(r"field:[^;]*?(\w+)(?:\[\d+\])?;")
_SYMBOL_RE = re.compile(r'\{\s*(\d+)\s*,\s*"([A-Za-z0-9_]+)"\s*\}')


@dataclass(frozen=True)
class TracepointFormat:
    fields: frozenset[str]
    print_fmt: str


@dataclass(frozen=True)
class KernelInfo:
    """Facts about the running kernel that the programs and the collectors need."""

    host_netns: int
    offsets: dict[str, int] | None  # None: no trustworthy struct offsets
    offsets_source: str  # "btf", or "none" with the reason in offsets_problem
    offsets_problem: str = ""
    tracepoints: dict[str, TracepointFormat] = field(default_factory=dict)
    drop_reasons: dict[int, str] = field(default_factory=dict)
    # kernel functions the programs tell apart by where they free a packet: [start, end)
    functions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def has_field(self, tracepoint: str, name: str) -> bool:
        fmt = self.tracepoints.get(tracepoint)
        return fmt is not None and name in fmt.fields

    def drop_reason(self, value: int) -> str:
        """The kernel's name of a drop reason: the core's from tracefs, another
        subsystem's ((subsystem << 16) | n) from BTF, else a name that says what it is."""
        name = self.drop_reasons.get(value)
        if name is not None:
            return name
        if value >> btf.SUBSYS_SHIFT:
            return f"SUBSYS_{value >> btf.SUBSYS_SHIFT}_{value & 0xFFFF}"
        return f"REASON_{value}"


def read_format(tracefs_root: str, tracepoint: str) -> TracepointFormat | None:
    category, event = tracepoint.split(":", 1)
    path = os.path.join(tracefs_root, "events", category, event, "format")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    fields = frozenset(m.group(1) for m in _FIELD_RE.finditer(text))
    fmt_at = text.find("print fmt:")
    return TracepointFormat(fields, text[fmt_at:] if fmt_at >= 0 else "")


def symbols(print_fmt: str, field_name: str) -> dict[int, str]:
    """The {value: name} table of `__print_symbolic(REC->field, ...)` in a print fmt."""
    start = print_fmt.find(f"__print_symbolic(REC->{field_name},")
    if start < 0:
        return {}
    depth, end = 0, start
    for end in range(start, len(print_fmt)):  # the matching parenthesis
        if print_fmt[end] == "(":
            depth += 1
        elif print_fmt[end] == ")":
            depth -= 1
            if depth == 0:
                break
    return {int(v): name for v, name in _SYMBOL_RE.findall(print_fmt[start:end])}


@dataclass(frozen=True)
class KernelNeeds:
    """What the probes ask of the kernel, every registered probe's together
    (monitor.probes.kernel_needs): the formats of their tracepoints, the struct offsets
    they read, the address ranges of functions they tell apart."""

    tracepoints: tuple[str, ...] = ()
    offsets: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    functions: tuple[str, ...] = ()


# The kernel names its core drop reasons in this tracepoint's print fmt (and only there)
DROP_REASONS_TRACEPOINT = "skb:kfree_skb"


def probe(*, proc_root: str, tracefs_root: str, btf_path: str,
          needs: KernelNeeds | None = None) -> KernelInfo:
    """`needs`: what to read; None: what every registered probe needs."""
    if needs is None:
        from monitor.probes import kernel_needs  # late: the probes import this module

        needs = kernel_needs()
    logger = log.get("kernel")
    host_netns = os.stat(os.path.join(proc_root, "self", "ns", "net")).st_ino
    subsystem_reasons: dict[int, str] = {}
    try:
        vmlinux = btf.Btf.load(btf_path)
        offsets: dict[str, int] | None = btf.kernel_offsets(vmlinux, needs.offsets)
        source, problem = "btf", ""
        subsystem_reasons = btf.subsystem_drop_reasons([vmlinux, *_module_btfs(btf_path,
                                                                              vmlinux)])
    except btf.BtfError as exc:
        offsets, source, problem = None, "none", str(exc)
        logger.warning("no kernel struct offsets: drops count under the node only, and "
                       "retransmits and RTT are off", reason=problem)
    formats = {tp: fmt for tp in needs.tracepoints
               if (fmt := read_format(tracefs_root, tp)) is not None}
    kfree = formats.get(DROP_REASONS_TRACEPOINT)
    reasons = {**subsystem_reasons, **(symbols(kfree.print_fmt, "reason") if kfree else {})}
    functions = kallsyms.function_ranges(needs.functions, os.path.join(proc_root, "kallsyms"))
    return KernelInfo(host_netns, offsets, source, problem, formats, reasons, functions)


def _module_btfs(vmlinux_path: str, base: btf.Btf) -> list[btf.Btf]:
    """The BTF of every loaded module (beside vmlinux in /sys/kernel/btf); unreadable or
    malformed ones are skipped (their reasons then get SUBSYS_<n>_<m> names)."""
    out: list[btf.Btf] = []
    directory = os.path.dirname(vmlinux_path)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        if name == os.path.basename(vmlinux_path):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                out.append(btf.Btf(f.read(), base=base))
        except (OSError, btf.BtfError):
            continue
    return out
