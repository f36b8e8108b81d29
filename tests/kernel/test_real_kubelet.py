"""The daemon on a real node: kubelet with containerd runs the pods, not the lab.

The control plane is tests/cluster/controlplane.py's; the node is
tests/cluster/node.py's (kubelet of the same release, Debian's containerd, runc and
bridge CNI plugin, our pause image). Pods are made through the API and run by the
kubelet: real pause sandboxes in netns containerd pinned, veths the bridge plugin
made, cgroups kubelet made. The daemon must find them by the pause netns inode, name
them from the API, count them exactly against their veths, and forget a pod the
kubelet tore down.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import fixtures
from tests.cluster.controlplane import ControlPlane
from tests.cluster.node import KubeletNode, started_node
from tests.kernel.support import Daemon, assert_pings_counted_exactly, pod_info, wait_for

WEB_LABELS = {"app": "web", "pod-template-hash": "7c4d9f8b6"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from fixtures.start()


@pytest.fixture(scope="module")
def node(cluster: ControlPlane) -> Iterator[KubeletNode]:
    node = started_node(cluster)
    try:
        yield node
    finally:
        node.stop()


def _daemon(cluster: ControlPlane, node: KubeletNode, tmp_path: Path) -> Daemon:
    kubeconfig = fixtures.daemon_kubeconfig(cluster, tmp_path / "daemon.kubeconfig")
    bundles = node.dir / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io"
    return Daemon("--metadata", "kubernetes", "--kubeconfig", str(kubeconfig),
                  "--node-name", node.name, "--runtime-dirs", str(bundles),
                  "--pod-labels", "app")


def test_kubelet_pods_found_named_and_counted_exactly(
        cluster: ControlPlane, node: KubeletNode, daemons: list[Daemon],
        tmp_path: Path) -> None:
    cluster.kubectl("create", "namespace", "shop", check=False)
    rs = fixtures.add_owner(cluster, "ReplicaSet", "web-7c4d9f8b6", "shop", WEB_LABELS)
    sts = fixtures.add_owner(cluster, "StatefulSet", "db", "shop", {"app": "db"})
    web = node.run_pod("web-7c4d9f8b6-k2v9q", "shop", labels=WEB_LABELS, owner=rs)
    db = node.run_pod("db-0", "shop", labels={"app": "db"}, owner=sts)
    # what the runtime made, seen without the daemon: a pinned netns, a bridge veth
    pinned = {p.stat().st_ino for p in Path("/var/run/netns").glob("cni-*")}
    for pod in (web, db):
        assert Path(f"/proc/{pod.pause_pid}/ns/net").stat().st_ino in pinned
        assert Path(f"/sys/class/net/{pod.host_veth}/master").resolve().name.startswith("pnm")

    daemon = _daemon(cluster, node, tmp_path)
    daemons.append(daemon)
    wait_for(lambda: set(pod_info(daemon.scrape())) == {("shop", web.name), ("shop", db.name)},
             timeout=30)
    info = pod_info(daemon.scrape())
    assert info[("shop", web.name)]["uid"] == web.uid
    assert info[("shop", web.name)]["workload"] == "web"
    assert info[("shop", web.name)]["workload_kind"] == "Deployment"
    assert info[("shop", db.name)]["workload_kind"] == "StatefulSet"
    assert info[("shop", db.name)]["uid"] == db.uid

    # counted exactly against the veths the bridge plugin made
    assert_pings_counted_exactly(daemon, web, db, 17)

    # the kubelet tears a pod down (CNI DEL removes its veth and netns): its series go,
    # the other pod's stay
    cluster.kubectl("delete", "pod", db.name, "-n", "shop", "--wait=true", "--timeout=60s")
    assert not Path(f"/sys/class/net/{db.host_veth}").exists()
    wait_for(lambda: set(pod_info(daemon.scrape())) == {("shop", web.name)}, timeout=30)
    assert daemon.scrape().sum("podnet_packets_total", pod=web.name, direction="egress") >= 17
