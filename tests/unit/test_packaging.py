"""The built wheel carries the C programs, and an installed package finds them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="no setuptools")
def test_wheel_ships_every_bpf_source(tmp_path: Path) -> None:
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("monitor", "podnetlab", "bpf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(src)], check=True,
                   capture_output=True)
    (wheel,) = tmp_path.glob("podnetmon-*.whl")
    names = {Path(n).name for n in zipfile.ZipFile(wheel).namelist()
             if "/data/share/podnetmon/bpf/" in n}
    sources = {p.name for p in (ROOT / "bpf").iterdir() if p.suffix in (".c", ".h")}
    assert sources and names == sources


def test_bpf_dir_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.kernel import source

    (tmp_path / "pnm.h").write_text("/* */")
    monkeypatch.setenv("PODNETMON_BPF_DIR", str(tmp_path))
    assert source.find_bpf_dir() == tmp_path
    monkeypatch.setenv("PODNETMON_BPF_DIR", str(tmp_path / "nowhere"))
    assert source.find_bpf_dir() == ROOT / "bpf"  # the checkout's, next in line
