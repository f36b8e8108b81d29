"""`make test` leaves nothing in /tmp: tests/conftest.py gives each session a base
directory for tmp_path of its own, removed when every test passed, kept when one failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CASES = '''
def test_writes(tmp_path):
    (tmp_path / "note").write_text("a file of a passing test")

def test_maybe_fails(tmp_path):
    (tmp_path / "evidence").write_text("what a failing test leaves to read")
    assert {fail}
'''


def _session(tmp_path: Path, fail: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "test_cases.py").write_text(CASES.format(fail="False" if fail else "True"))
    temp_root = tmp_path / "tmp"  # the session's /tmp
    temp_root.mkdir()
    env = {**os.environ, "TMPDIR": str(temp_root), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest",
                           "-p", "no:cacheprovider", "--rootdir", str(cases), str(cases),
                           "-o", "tmp_path_retention_policy=failed"],  # as pyproject.toml
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    return proc, temp_root


def test_a_passing_session_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    proc, temp_root = _session(tmp_path, fail=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(temp_root.iterdir()) == []  # no pytest-of-<user>, no pytest-current


def test_a_failing_session_keeps_the_failed_tests_files_and_says_where(tmp_path: Path) -> None:
    proc, temp_root = _session(tmp_path, fail=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (base,) = temp_root.iterdir()
    assert f"temporary files are kept in {base}" in proc.stdout
    assert (base / "test_maybe_fails0" / "evidence").exists()
    assert not (base / "test_writes0" / "note").exists()  # a passing test's: gone
