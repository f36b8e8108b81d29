"""Shared builders for the unit tests: no root, no kernel, no network namespaces."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from monitor.identity import HostVeth, Pod, PodMeta, PodNetwork, identify


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PODNETMON_* or NODE_NAME from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("PODNETMON_") or name == "NODE_NAME":
            monkeypatch.delenv(name)
    yield


PodFactory = Callable[..., Pod]


@pytest.fixture
def make_pod() -> PodFactory:
    """A Pod as the reconciler makes it: netns inode, host veths as (ifindex, name), metadata."""

    def build(netns: int, veths: list[tuple[int, str]], *, namespace: str | None = None,
              name: str | None = None, uid: str = "", workload: str = "", workload_kind: str = "",
              net_uid: str | None = None, pause_pid: int | None = None,
              pinned: str | None = None) -> Pod:
        network = PodNetwork(netns, pinned or f"/proc/{pause_pid or 1}/ns/net",
                             pause_pid=pause_pid, pinned_path=pinned, uid=net_uid)
        meta = None
        if namespace is not None and name is not None:
            meta = PodMeta(namespace, name, uid=uid, workload=workload, workload_kind=workload_kind)
        return identify(network, [HostVeth(i, n) for i, n in veths], meta)

    return build
