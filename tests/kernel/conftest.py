"""Kernel tests: root, the real kernel, lab pods; everything made is removed again."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from monitor.lab import Lab
from tests.kernel.support import Daemon


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session", autouse=True)
def _root_and_clean() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (run `make test` as root)")
    Lab().down()  # a previous crashed run must not leak into this one
    yield
    Lab().down()
    left = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                          check=False).stdout
    assert "pnml" not in left, f"the tests leaked lab links:\n{left}"


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
