"""A node whose kubelet died leaves nothing behind either (tests/cluster/node.py's force path).

The other real-node tests stop their node the polite way (pods deleted through the API,
the kubelet tearing them down); here the kubelet is killed first, as a crashed test run
would leave it, and stop() must end containers, shims, netns pins, mounts and cgroups
itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import fixtures
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node import BRIDGE, CGROUP_FS, CGROUP_ROOT, NETNS_DIR, SHIM_SOCKETS, started_node


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from fixtures.start()


def test_stop_after_the_kubelet_died_leaves_nothing(cluster: ControlPlane) -> None:
    netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set()
    sockets_before = set(os.listdir(SHIM_SOCKETS)) if SHIM_SOCKETS.exists() else set()
    node = started_node(cluster)
    try:
        pod = node.run_pod("orphan-0", "default")
        node.kill_kubelet()
        assert Path(f"/proc/{pod.pause_pid}").exists()  # the pod outlives its kubelet
    finally:
        node.stop()
    assert not Path(f"/proc/{pod.pause_pid}").exists()  # stop() waited for it to be reaped
    assert not Path(f"/sys/class/net/{pod.host_veth}").exists()
    assert not Path(f"/sys/class/net/{BRIDGE}").exists()
    assert set(os.listdir(NETNS_DIR)) - netns_before == set()
    assert not node.dir.exists()
    assert not [h for h in CGROUP_FS.iterdir() if (h / CGROUP_ROOT).exists()]
    assert str(node.dir) not in Path("/proc/self/mounts").read_text()
    shims = [p for p in Path("/proc").iterdir() if p.name.isdigit()
             and str(node.socket).encode() in _cmdline(p)]
    assert shims == []
    # the killed shims' sockets too (and /run/containerd itself if it was not there before)
    assert (set(os.listdir(SHIM_SOCKETS)) if SHIM_SOCKETS.exists() else set()) <= sockets_before


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
