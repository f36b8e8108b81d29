"""The node's instance lock (monitor/instance.py): abstract unix sockets, no root needed.

Names carry this test process's pid, so that a daemon running on the machine (or another
test run) never meets them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from monitor import instance


def _names(tag: str) -> list[tuple[str, str]]:
    return [(f"podnetmon-test:{os.getpid()}:{tag}:a", "thing a"),
            (f"podnetmon-test:{os.getpid()}:{tag}:b", "thing b")]


def test_a_second_holder_is_refused_with_the_first_ones_pid() -> None:
    first = instance.InstanceLock(_names("second"))
    first.acquire()
    try:
        second = instance.InstanceLock(_names("second"))
        with pytest.raises(instance.Taken) as caught:
            second.acquire()
        assert caught.value.holder.pid == os.getpid()
        assert caught.value.holder.what == "thing a"
        assert "another podnetmon daemon runs on this node: pid" in str(caught.value)
        assert second.holder() == caught.value.holder  # asked without taking
    finally:
        first.release()
    second.acquire()  # released: free again at once
    second.release()


def test_none_of_the_names_is_kept_when_one_is_taken() -> None:
    names = _names("partial")
    other = instance.InstanceLock(names[1:])  # someone holds only the second name
    other.acquire()
    try:
        with pytest.raises(instance.Taken) as caught:
            instance.InstanceLock(names).acquire()
        assert caught.value.holder.what == "thing b"
        free = instance.InstanceLock(names[:1])  # the first was given back
        free.acquire()
        free.release()
    finally:
        other.release()


def test_the_kernel_releases_the_lock_of_a_killed_holder() -> None:
    names = _names("killed")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from monitor import instance; "
         f"lock = instance.InstanceLock({names!r}); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        holder = instance.InstanceLock(names).holder()
        assert holder is not None and holder.pid == child.pid
        assert "instance.InstanceLock" in holder.command
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 5
    while instance.InstanceLock(names).holder() is not None:  # no file, nothing stale
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_lock_names_cover_the_tc_identity_and_the_pin_directory() -> None:
    names = dict(instance.lock_names("/sys/fs/bpf", 4096, 0x504E))
    assert set(names) == {"podnetmon:tc:4096:0x504e", "podnetmon:pins:/sys/fs/bpf/podnetmon"}
    assert [n for n, _ in instance.lock_names("", 4096, 0x504E)] == ["podnetmon:tc:4096:0x504e"]
    long = instance.lock_names("/" + "x" * 200, 1, 1)[1][0]
    assert len(long.encode()) <= 107 and long != instance.lock_names("/" + "y" * 200, 1, 1)[1][0]
    lock = instance.InstanceLock([(long, "long")])
    lock.acquire()  # the kernel takes it: the name fits sun_path
    lock.release()
