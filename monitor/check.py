"""`podnetmon check`: can this host run the daemon? One sentence and a remedy per gap.

Features are probed by trying them (a map created, a program loaded and
attached in a throwaway netns, a trivial program compiled), never by asking
a library what it believes.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from monitor import neighbours
from monitor.kernel import syscalls
from monitor.settings import Settings

# Capability bits (include/uapi/linux/capability.h)
CAP_SYS_PTRACE, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 19, 12, 21, 38, 39


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    required: bool
    sentence: str
    remedy: str = ""


def _effective_caps(proc_root: str = "/proc") -> int:
    with open(os.path.join(proc_root, "self", "status"), encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> Finding:
    caps = _effective_caps()
    need = {"CAP_BPF or CAP_SYS_ADMIN": (CAP_BPF, CAP_SYS_ADMIN),
            "CAP_PERFMON or CAP_SYS_ADMIN": (CAP_PERFMON, CAP_SYS_ADMIN),
            "CAP_NET_ADMIN": (CAP_NET_ADMIN,),
            "CAP_SYS_PTRACE": (CAP_SYS_PTRACE,)}
    missing = [name for name, bits in need.items() if not any(caps >> b & 1 for b in bits)]
    if not missing:
        return Finding("privileges", True, True, "running with the capabilities BPF, tc and "
                       "reading other processes' namespaces need")
    return Finding("privileges", False, True, f"missing capabilities: {', '.join(missing)}",
                   "run as root, or grant these capabilities (see deploy/ for the DaemonSet's list)")


def check_bpf_syscall() -> Finding:
    try:
        os.close(syscalls.load_unspec_program())
    except OSError as exc:
        return Finding("bpf", False, True, f"the bpf() syscall refused to load a program: "
                       f"{exc.strerror}", "run as root with CONFIG_BPF_SYSCALL; check "
                       "kernel.unprivileged_bpf_disabled and seccomp/AppArmor profiles")
    return Finding("bpf", True, True, "the bpf() syscall loads programs")


def check_btf() -> Finding:
    path = "/sys/kernel/btf/vmlinux"
    if os.access(path, os.R_OK):
        return Finding("btf", True, False, f"{path} is readable: struct offsets come from "
                       "the running kernel")
    return Finding("btf", False, False, f"{path} is missing: kernel struct offsets cannot "
                   "be read from the running kernel",
                   "use a kernel built with CONFIG_DEBUG_INFO_BTF=y; without it, probes that "
                   "read kernel structs degrade to what needs no offsets")


def missing_headers() -> Finding | None:
    """The headers finding if there are no kernel headers at all (no compile tried)."""
    build = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{platform.release()}/build"
    if os.path.isdir(os.path.join(build, "include")):
        return None
    return Finding("headers", False, True, f"no kernel headers at {build}: BCC compiles "
                   "the probes against them",
                   "install the headers of this kernel (Debian: linux-headers-$(uname -r)); "
                   "where none exist, link /lib/modules/$(uname -r) to another version's "
                   "(make setup does this): uapi types stay right and struct offsets "
                   "come from BTF")


def check_headers() -> Finding:
    release = platform.release()
    build = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{release}/build"
    missing = missing_headers()
    if missing is not None:
        return missing
    from monitor.kernel import (
        features,  # imports bcc: only once we know there are headers
        )

    error = features.compile_trivial()
    if error:
        return Finding("headers", False, True, f"BCC could not compile a trivial program "
                       f"with the headers at {build}: {error}",
                       "check the headers match an installed kernel and that clang/libbcc work")
    target = os.path.realpath(build)
    note = "" if release in target else (f" ({os.path.basename(target)}, not this kernel's: "
                                         "struct offsets come from BTF)")
    return Finding("headers", True, True, f"BCC compiles against {build}{note}")


def check_tracefs(settings: Settings) -> Finding:
    events = os.path.join(settings.tracefs_root, "events")
    if os.path.isdir(events):
        return Finding("tracefs", True, True, f"tracefs is mounted at {settings.tracefs_root}")
    return Finding("tracefs", False, True, f"tracefs is not mounted at {settings.tracefs_root}: "
                   "BCC reads tracepoint formats there",
                   f"mount -t tracefs tracefs {settings.tracefs_root}")


def check_tracepoints(settings: Settings) -> Finding:
    from monitor.kernel import kernelinfo
    from monitor.probes import kernel_needs

    missing = [tp for tp in kernel_needs().tracepoints
               if kernelinfo.read_format(settings.tracefs_root, tp) is None]
    if not missing:
        return Finding("tracepoints", True, False, "the tracepoints the drop, retransmit and "
                       "RTT probes use are there")
    return Finding("tracepoints", False, False, f"missing tracepoints: {', '.join(missing)}; "
                   "the probes that need them are not loaded",
                   "mount tracefs; skb:kfree_skb needs kernel 5.17 for drop reasons")


def check_bpffs(settings: Settings) -> Finding:
    if not settings.bpffs_root:  # asked for: nothing is missing
        return Finding("bpffs", True, False, "pinning is off (bpffs root empty): counters "
                       "restart with the daemon")
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounted = any(line.split()[1] == settings.bpffs_root and line.split()[2] == "bpf"
                          for line in f if len(line.split()) > 2)
    except OSError:
        mounted = False
    if mounted:
        return Finding("bpffs", True, False, f"bpffs is mounted at {settings.bpffs_root}")
    return Finding("bpffs", False, False, f"bpffs is not mounted at {settings.bpffs_root}: "
                   "nothing can be pinned, so counters restart with the daemon",
                   f"mount -t bpf bpf {settings.bpffs_root}")


def check_attach() -> Iterator[Finding]:
    from monitor.kernel import features

    result = features.probe_attach_features()
    clsact, cls_bpf, tcx = result.get("clsact", "?"), result.get("cls_bpf", "?"), result.get("tcx", "?")
    if not clsact:
        yield Finding("clsact", True, True, "a clsact qdisc can be added (in a scratch netns)")
    else:
        yield Finding("clsact", False, True, f"adding a clsact qdisc failed: {clsact}",
                      "use a kernel with CONFIG_NET_SCH_INGRESS (clsact) and CONFIG_NET_CLS_BPF")
    if not cls_bpf:
        yield Finding("cls_bpf", True, True, "a BPF tc filter attaches (in a scratch netns)")
    else:
        yield Finding("cls_bpf", False, True, f"attaching a BPF tc filter failed: {cls_bpf}",
                      "use a kernel with CONFIG_NET_CLS_BPF")
    if not tcx:
        yield Finding("tcx", True, False, "tcx links attach (kernel >= 6.6): used where a "
                      "device carries tcx programs, or tc filters that run before ours")
    else:
        yield Finding("tcx", False, False, f"tcx is not available: {tcx}",
                      "nothing to do unless the CNI uses tcx (Cilium >= 1.16 on kernel >= 6.6); "
                      "then a kernel with CONFIG_NET_XGRESS is needed for traffic not to "
                      "bypass podnetmon")


def check_cni(settings: Settings, tcx_error: str) -> Finding:
    """Would another agent's classic tc filter (Cilium's legacy tc programs, Calico's eBPF
    dataplane) end pod traffic before our programs see it? Read from the host veths as
    they are now: tcx runs before every classic filter, so with tcx and attach_mode auto
    the daemon attaches those veths by tcx and counts them whole."""
    from monitor.kernel.netlink import Netlink, filters_before

    netlink = Netlink()
    try:
        ahead = {veth.name: found for veth in netlink.veths()
                 if (found := filters_before(netlink, veth.ifindex, settings.tc_priority))}
    finally:
        netlink.close()
    if not ahead:
        return Finding("cni", True, False, "no other agent's tc filter runs before ours on "
                       "the host's veths")
    example = ", ".join(f"{name} ({'; '.join(found)})" for name, found in sorted(ahead.items())[:3])
    many = f"{len(ahead)} veth{'' if len(ahead) == 1 else 's'} carr{'ies' if len(ahead) == 1 else 'y'}"
    if not tcx_error and settings.attach_mode == "auto":
        return Finding("cni", True, False, f"{many} another agent's tc filters that run before "
                       f"ours, e.g. {example}: podnetmon attaches those by tcx, which runs first")
    why = (f"this kernel has no tcx ({tcx_error})" if tcx_error
           else f"attach_mode is {settings.attach_mode}")
    remedy = ("a kernel with tcx (6.6+, CONFIG_NET_XGRESS) and attach_mode auto" if tcx_error
              else "attach_mode auto (the default): those veths are then attached by tcx")
    return Finding("cni", False, False, f"{many} another agent's tc filters that run before "
                   f"ours, e.g. {example}, and {why}: what those filters end (TC_ACT_OK, a "
                   "redirect) is not counted; podnet_monitor_bypassed{reason=\"tc_filter_first\"} "
                   "names the pods", remedy)


def check_neighbours(pods: int, proc_root: str = "/proc") -> Finding:
    """Can the kernel's neighbour tables (one per family for every namespace) hold the
    entries `pods` pods need, and have they ever refused one?"""
    need = neighbours.needed(pods)
    problems, remedies = [], []
    for family in ("ipv4", "ipv6"):
        try:
            table = neighbours.read_table(family, proc_root)
        except (OSError, ValueError):
            continue  # no IPv6 in this kernel: nothing to fill
        if table.table_fulls:
            problems.append(f"the {family} table refused {table.table_fulls} new entries since "
                            "boot (each one a packet dropped as NEIGH_CREATEFAIL)")
        if table.ceiling < need:
            problems.append(f"{family} gc_thresh3 is {table.ceiling}, below the {need} that "
                            f"{pods} pods need ({neighbours.ENTRIES_PER_POD} each)")
        elif table.entries * 10 >= table.ceiling * 9:
            problems.append(f"the {family} table holds {table.entries} of its "
                            f"{table.ceiling} entries")
        if table.table_fulls or table.ceiling < need or table.entries * 10 >= table.ceiling * 9:
            # a table that overflowed at this ceiling needs more than it: twice
            room = max(need, 2 * table.entries, 2 * table.ceiling if table.table_fulls else 0)
            values = neighbours.sufficient_thresholds(table, room)
            remedies.append(neighbours.sysctl_commands(family, values))
    if not problems:
        return Finding("neighbours", True, False, f"the neighbour tables hold what {pods} pods "
                       f"need ({need} entries)")
    return Finding("neighbours", False, False, "; ".join(problems) + ": new pods beside "
                   "these cannot resolve their peers, and send nothing", "; ".join(remedies) +
                   " (and in /etc/sysctl.d to keep it)")


def run_checks(settings: Settings, max_pods: int | None = None) -> list[Finding]:
    findings = [check_privileges(), check_bpf_syscall(), check_btf()]
    steps: list[Callable[[], Finding]] = [check_headers, lambda: check_tracefs(settings),
                                          lambda: check_tracepoints(settings),
                                          lambda: check_bpffs(settings)]
    for step in steps:
        findings.append(step())
    if findings[1].ok:
        attach = list(check_attach())
        findings.extend(attach)
        tcx = next(f for f in attach if f.name == "tcx")
        tcx_error = "" if tcx.ok else tcx.sentence.removeprefix("tcx is not available: ")
        findings.append(check_cni(settings, tcx_error))
    findings.append(check_neighbours(max(max_pods or neighbours.KUBELET_MAX_PODS,
                                         _host_veths())))
    return findings


def _host_veths() -> int:
    """Veths in this netns: one per pod on a veth CNI, the pods the node has now."""
    from monitor.kernel import rtnl

    try:
        with rtnl.Rtnl() as r:
            return len(list(r.links("veth")))
    except OSError:
        return 0


def report(findings: list[Finding]) -> tuple[str, int]:
    lines = []
    for f in findings:
        mark = "ok  " if f.ok else ("FAIL" if f.required else "warn")
        lines.append(f"{mark} {f.name:11} {f.sentence}")
        if not f.ok and f.remedy:
            lines.append(f"     {'':11} remedy: {f.remedy}")
    failed = [f for f in findings if f.required and not f.ok]
    lines.append("podnetmon can run on this host" if not failed else
                 f"podnetmon cannot run here: {len(failed)} required check(s) failed")
    return "\n".join(lines), 1 if failed else 0
