"""The C structs of bpf/ against the Python layouts that read them, field by field.

Every `struct pnm_*` in bpf/ is compiled by the C compiler (with the constants it is
sized by) into a program that prints each field's offset and size as C lays it out;
every ctypes Structure in monitor/ whose docstring begins `struct pnm_<name>` must
have the same fields, in the same order, at the same offsets, of the same sizes. A
layout that is another view of the same bytes (its docstring says `struct pnm_<name>
as ...`) must have the same size. A field added on one side only, a reordering or a
type widened in C fails here rather than as wrong counts on a node.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import monitor

ROOT = Path(__file__).resolve().parents[2]
BPF = ROOT / "bpf"

_STRUCT = re.compile(r"^struct (pnm_\w+) \{(.*?)^\};", re.S | re.M)
_DEFINE = re.compile(r"^#define (PNM_\w+) (\d+)\s*$", re.M)
_FIELD = re.compile(r"^\s*(?:struct\s+)?[\w ]+?\s+(\w+)((?:\[\w+\])*);\s*$")
_DOC = re.compile(r"struct (pnm_\w+)(\s+as\b)?")

TYPES = """
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32;
typedef unsigned long long __u64; typedef __u16 __be16; typedef __u32 __be32;
#include <stddef.h>
#include <stdio.h>
#define PNM_WANT_PEER 1
"""


def c_structs() -> tuple[list[str], dict[str, list[str]]]:
    """The structs' definitions in file order (pnm.h first: the others use its
    constants), the integer constants they may be sized by, and each struct's fields."""
    files = [BPF / "pnm.h", *sorted(p for p in BPF.glob("*.c"))]
    defines: list[str] = []
    bodies: list[str] = []
    fields: dict[str, list[str]] = {}
    for path in files:
        source = path.read_text()
        defines += [f"#define {name} {value}" for name, value in _DEFINE.findall(source)]
        for name, body in _STRUCT.findall(source):
            text = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
            bodies.append(f"struct {name} {{{text}}};")
            fields[name] = [m.group(1) for line in text.splitlines()
                            if (m := _FIELD.match(line))]
    return [*dict.fromkeys(defines), *bodies], fields


def c_layouts(tmp_path: Path) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
    """struct -> (sizeof, [(field, offsetof, sizeof)]) as the C compiler lays them out."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    declarations, fields = c_structs()
    prints = []
    for struct, names in fields.items():
        prints.append(f'printf("S {struct} %zu\\n", sizeof(struct {struct}));')
        prints += [f'printf("F {struct} {f} %zu %zu\\n", offsetof(struct {struct}, {f}), '
                   f'sizeof(((struct {struct} *)0)->{f}));' for f in names]
    source = TYPES + "\n".join(declarations) + "\nint main(void) {\n" + "\n".join(prints) + \
        "\nreturn 0;\n}\n"
    (tmp_path / "layouts.c").write_text(source)
    subprocess.run([compiler, "-o", str(tmp_path / "layouts"), str(tmp_path / "layouts.c")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp_path / "layouts")], check=True, capture_output=True,
                         text=True).stdout
    layouts: dict[str, tuple[int, list[tuple[str, int, int]]]] = {}
    for line in out.splitlines():
        kind, struct, *rest = line.split()
        if kind == "S":
            layouts[struct] = (int(rest[0]), [])
        else:
            layouts[struct][1].append((rest[0], int(rest[1]), int(rest[2])))
    return layouts


def python_layouts() -> list[tuple[str, bool, type[ctypes.Structure]]]:
    """(struct, another view?, class) for every ctypes Structure in monitor/ that says
    which bpf/ struct it is."""
    found = []
    for module_info in pkgutil.walk_packages(monitor.__path__, "monitor."):
        if module_info.name.endswith("__main__"):
            continue  # runs the CLI
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:
            continue  # a module needing what a unit test host lacks (bcc)
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, ctypes.Structure) and cls.__module__ == module.__name__
                    and (match := _DOC.match(inspect.getdoc(cls) or ""))):
                found.append((match.group(1), bool(match.group(2)), cls))
    return found


def test_every_python_layout_is_its_c_struct_field_by_field(tmp_path: Path) -> None:
    c = c_layouts(tmp_path)
    checked = set()
    for struct, other_view, cls in python_layouts():
        assert struct in c, f"{cls.__module__}.{cls.__name__} names {struct}, not in bpf/"
        size, c_fields = c[struct]
        assert ctypes.sizeof(cls) == size, (cls.__name__, ctypes.sizeof(cls), size)
        if other_view:
            continue
        py_fields = [(name, getattr(cls, name).offset, getattr(cls, name).size)
                     for name, *_ in cls._fields_]
        assert py_fields == c_fields, (cls.__name__, py_fields, c_fields)
        checked.add(struct)
    # the maps the collectors read and the events the traces decode: each has a layout
    assert {"pnm_counts", "pnm_drop_key", "pnm_drop_event", "pnm_flow", "pnm_peer_key",
            "pnm_trace_meta", "pnm_trace_cfg", "pnm_dnsn_key"} <= checked, checked


def test_the_parser_sees_every_field_of_a_struct() -> None:
    _declarations, fields = c_structs()
    assert fields["pnm_drop_event"] == ["ts", "location", "slot", "ifindex", "reason",
                                        "protocol", "hdr_len", "hdr"]
    assert fields["pnm_peer_last"] == ["dir"]
    assert fields["pnm_counts"] == ["packets", "bytes", "tcp_segments"]
