"""The tree keeps its shape: one package talks to the kernel, the daemon never imports the lab.

Read from the sources' syntax trees, not from what happens to be imported at run time,
so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "monitor" / "kernel"
PACKAGES = ("monitor", "podnetlab")
KERNEL_LIBRARIES = ("bcc", "pyroute2")
# names through which Python reaches the kernel without a library: netlink sockets,
# ioctls, and libc's raw syscall(2) and namespace calls
RAW_KERNEL_NAMES = {"AF_NETLINK", "NETLINK_ROUTE", "ioctl", "syscall", "setns", "unshare"}
# ctypes.CDLL(None) is libc: the way to a raw syscall. Outside monitor/kernel it may only
# reach libc's allocator.
LIBC_ALLOWED = {"monitor/traces/capture.py": "malloc_trim hands freed trace buffers back"}


def sources(*packages: str) -> Iterator[tuple[str, ast.Module]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def imported_modules(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def outside_kernel() -> Iterator[tuple[str, ast.Module]]:
    return ((name, tree) for name, tree in sources(*PACKAGES)
            if not name.startswith("monitor/kernel/"))


def is_libc(call: ast.Call) -> bool:
    """ctypes.CDLL(None, ...) or CDLL(None)."""
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "CDLL") or (
        isinstance(func, ast.Name) and func.id == "CDLL")
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and call.args[0].value is None


def test_only_the_kernel_package_imports_bcc_or_pyroute2() -> None:
    found = [f"{name}:{line} imports {module}" for name, tree in outside_kernel()
             for line, module in imported_modules(tree)
             if module.split(".")[0] in KERNEL_LIBRARIES]
    assert not found, found


def raw_kernel_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for each way to the kernel past the kernel package's own wrappers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in RAW_KERNEL_NAMES \
                and not _through_kernel_package(node, tree):
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in RAW_KERNEL_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("monitor"):
            found += [(node.lineno, a.name) for a in node.names if a.name in RAW_KERNEL_NAMES]
        elif isinstance(node, ast.Call) and is_libc(node):
            found.append((node.lineno, "libc"))
    return found


def test_only_the_kernel_package_makes_raw_kernel_calls() -> None:
    found = [f"{name}:{line} uses {what}" for name, tree in outside_kernel()
             for line, what in raw_kernel_uses(tree)
             if not (what == "libc" and name in LIBC_ALLOWED)]
    assert not found, found


def _through_kernel_package(node: ast.Attribute, tree: ast.Module) -> bool:
    """`netns.setns(...)` where netns is monitor.kernel's: the kernel package's own
    wrapper, called by name."""
    if not isinstance(node.value, ast.Name):
        return False
    module = node.value.id
    return any(isinstance(n, ast.ImportFrom) and n.module == "monitor.kernel"
               and any((a.asname or a.name) == module for a in n.names) for n in ast.walk(tree))


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def import_graph() -> dict[str, set[str]]:
    """Each of our modules -> ours it imports (lazily inside a function or not)."""
    trees = {module_name(name): tree for name, tree in sources(*PACKAGES)}
    return {mod: {m for _line, m in imported_modules(tree) if m in trees} for mod, tree in trees.items()}


def test_the_daemon_never_imports_the_lab() -> None:
    """`podnetmon lab` is the CLI's (it imports the lab only for that command); nothing the
    daemon runs, however deep, reaches it."""
    graph = import_graph()
    reached, todo = set(), ["monitor.daemon"]
    while todo:
        mod = todo.pop()
        if mod not in reached:
            reached.add(mod)
            todo += graph.get(mod, ())
    assert "monitor.kernel.programs" in reached  # the walk does follow lazy imports
    assert not {m for m in reached if m.startswith("podnetlab")}
    importers = {mod for mod, deps in graph.items() if not mod.startswith("podnetlab")
                 and any(d.startswith("podnetlab") for d in deps)}
    assert importers == {"monitor.cli"}, importers


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for name, tree in sources(*PACKAGES):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGES):
                found += [f"{name}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not found, found


@pytest.mark.parametrize("code, complaint", [
    ("import pyroute2\n", "imports pyroute2"),
    ("from bcc import BPF\n", "imports bcc"),
    ("def f():\n    from pyroute2.netlink import x\n", "imports pyroute2.netlink"),
])
def test_the_import_check_sees_every_form(code: str, complaint: str) -> None:
    found = [f"imports {m}" for _line, m in imported_modules(ast.parse(code))
             if m.split(".")[0] in KERNEL_LIBRARIES]
    assert complaint in found


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n",
    "import ctypes\nctypes.CDLL(None).syscall(321)\n",
    "import ctypes\nlibc = ctypes.CDLL(None)\n",
    "import fcntl\nfcntl.ioctl(3, 0)\n",
    "from socket import AF_NETLINK\n",
])
def test_the_raw_call_check_sees_every_form(code: str) -> None:
    assert raw_kernel_uses(ast.parse(code))


def test_the_kernel_packages_own_wrapper_is_allowed() -> None:
    assert not raw_kernel_uses(ast.parse("from monitor.kernel import netns\nnetns.setns(3)\n"))


def kernel_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <int literal> of a module: the kernel ABI numbers it defines."""
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper() \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int):
            out[node.targets[0].id] = node.value.value
    return out


def test_each_kernel_constant_is_defined_in_one_module_only() -> None:
    """A bpf(2) command or netlink number written twice can drift apart: one module owns
    it, the others import it."""
    owners: dict[str, list[str]] = {}
    for name, tree in sources("monitor/kernel"):
        for constant in kernel_constants(tree):
            owners.setdefault(constant, []).append(name)
    twice = {constant: where for constant, where in owners.items()
             if len(where) > 1 and not constant.startswith("_")}
    assert not twice, twice


def test_the_constant_check_sees_a_redefinition() -> None:
    assert kernel_constants(ast.parse("BPF_OBJ_PIN = 6\nname = 1\nFLAG: int = 2\n")) == {
        "BPF_OBJ_PIN": 6}


# The trace machinery is the user side of two probes' trace switches: it writes their
# per-slot switches and decodes their perf events, so it knows their layouts by name.
PROBE_IMPORTS_ALLOWED = {"monitor.traces.capture": {"monitor.probes.trace", "monitor.probes.drops"},
                         "monitor.traces.dropevents": {"monitor.probes.drops"}}


def test_no_code_outside_a_probe_names_a_probe() -> None:
    """Outside monitor/probes the registry is read (monitor.probes, its base), never one
    probe's module: what the daemon builds on a probe comes from its Probe record."""
    from monitor.probes import REGISTRY

    probe_modules = {f"monitor.probes.{p.c_file.removesuffix('.c')}" for p in REGISTRY.values()}
    graph = import_graph()
    found = {mod: sorted(deps & probe_modules - PROBE_IMPORTS_ALLOWED.get(mod, set()))
             for mod, deps in graph.items() if mod.startswith("monitor")
             and not mod.startswith("monitor.probes")}
    assert not {mod: deps for mod, deps in found.items() if deps}
    assert "monitor.probes.packets" in probe_modules  # the names are the modules' names


MAX_MODULE_LINES = 400


def test_every_module_is_small_enough_to_read_whole() -> None:
    """A module past 400 lines holds more than one concern; split it where they part."""
    long = {str(path.relative_to(ROOT)): n for package in PACKAGES
            for path in (ROOT / package).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
