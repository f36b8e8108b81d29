"""Kernel tests: root, the real kernel, lab pods; everything made is removed again."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor import cleanup
from monitor.settings import Settings
from podnetlab.lab import Lab
from tests.kernel.support import LOG_DIR, Daemon


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def _root_and_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (run `make test` as root)")
    Lab().down()  # a previous crashed run must not leak into this one
    cleanup.cleanup("/sys/fs/bpf", Settings.tc_priority, Settings.tc_handle)  # a crashed run's
    yield
    if request.session.testsfailed:
        print(f"\nthe daemons' logs are kept in {LOG_DIR}")
    else:
        shutil.rmtree(LOG_DIR, ignore_errors=True)
    Lab().down()
    left = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                          check=False).stdout
    assert "pnml" not in left, f"the tests leaked lab links:\n{left}"
    pinned = sorted(str(p) for p in Path("/sys/fs/bpf/podnetmon").rglob("*"))
    cleanup.cleanup("/sys/fs/bpf", Settings.tc_priority, Settings.tc_handle)
    assert not pinned, f"the tests leaked pinned objects: {pinned}"


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh, empty lab for one test; removed whatever happens."""
    lab = Lab()
    lab.down()
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts go here, and are stopped when it ends."""
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()
