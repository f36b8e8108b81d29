"""Waiting out an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL), or a sleep where
the kernel refuses it."""

from __future__ import annotations

import time

import pytest

from monitor.kernel import arch, rcu


def test_the_kernel_waits_for_a_grace_period() -> None:
    assert rcu.grace_period() is True


def test_a_kernel_without_the_command_gets_the_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arch, "number", lambda name: 1_000_000)  # no such syscall: ENOSYS
    started = time.monotonic()
    assert rcu.grace_period() is False
    assert time.monotonic() - started >= rcu.FALLBACK_SECONDS
