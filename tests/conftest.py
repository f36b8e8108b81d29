"""What every test session shares: where its temporary files go, and that they go.

pytest's default base for tmp_path is /tmp/pytest-of-<user>/pytest-<n>; with
`tmp_path_retention_policy = "failed"` a passing run empties it, but leaves the
directories themselves (and a `pytest-current` link) in /tmp for good. Each session
here gets a directory of its own instead (unique, so that two sessions at once never
share or clear each other's, as a fixed --basetemp would: pytest empties a given
basetemp when it starts), removed when every test passed and kept, with its path
printed, when one failed: a failed test's files are the ones worth reading.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

_OURS = pytest.StashKey[Path]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # before the tmp_path plugin reads the option (its own pytest_configure)
    if config.option.basetemp is None:
        base = Path(tempfile.mkdtemp(prefix="podnetmon-pytest-"))
        config.option.basetemp = str(base)
        config.stash[_OURS] = base


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = session.config.stash.get(_OURS, None)
    if base is None:  # a --basetemp the caller chose is the caller's
        return
    if exitstatus == 0 or not any(base.iterdir()):
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"\nthe failed tests' temporary files are kept in {base}")
