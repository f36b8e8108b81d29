"""Kubernetes end to end: lab pods of every runtime style, names from a fake API server.

The daemon runs with --metadata kubernetes against tests/fakeapi.py (the real
client, list+watch); the API holds pod objects for the lab pods: two owned by
a ReplicaSet of a Deployment, a StatefulSet's, a DaemonSet's, a static pod
(its mirror pod found by annotation), a pod of another node, and one whose
netns does not exist yet.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from podnetlab.lab import Lab, LabPod
from tests.fakeapi import FakeApiServer, make_pod
from tests.kernel.support import Daemon, in_pod, pod_info, quiet_window, wait_for

NODE = "lab-node"



@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer(node=NODE) as server:
        yield server


def _api_objects(api: FakeApiServer, pods: list[LabPod]) -> str:
    """Pod objects for the lab pods; returns the static pod's mirror UID."""
    web0, web1, db, agent, static = pods
    rs = ("ReplicaSet", "web-5d8f7c9b4")
    for pod, name in ((web0, "web-5d8f7c9b4-x2x2x"), (web1, "web-5d8f7c9b4-k8k8k")):
        api.add(make_pod(name, "shop", pod.uid, NODE, owner=rs,
                         labels={"app": "web", "pod-template-hash": "5d8f7c9b4", "team": "a"}))
    api.add(make_pod("db-0", "shop", db.uid, NODE, owner=("StatefulSet", "db"),
                     labels={"app": "db"}))
    api.add(make_pod("agent-q7q7q", "kube-system", agent.uid, NODE, owner=("DaemonSet", "agent"),
                     labels={"app": "agent"}))
    # A static pod: the kubelet knows it by its config hash (the UID in its cgroup); the
    # API has a mirror pod with a UID of its own and the hash in an annotation.
    mirror_uid = str(uuid.uuid4())
    api.add(make_pod(f"etcd-{NODE}", "kube-system", mirror_uid, NODE,
                     owner=("Node", NODE), labels={"component": "etcd"},
                     annotations={"kubernetes.io/config.mirror": static.uid}))
    api.add(make_pod("elsewhere-0", "shop", str(uuid.uuid4()), "other-node"))
    return mirror_uid


def test_names_workloads_and_lifecycle_from_the_api(
        lab: Lab, daemons: list[Daemon], api: FakeApiServer, tmp_path: Path) -> None:
    pods = lab.up(5, styles=("docker", "containerd", "crio", "crio-noinfra", "docker"))
    mirror_uid = _api_objects(api, pods)
    later_uid = str(uuid.uuid4())  # in the API before its netns exists
    api.add(make_pod("later-0", "shop", later_uid, NODE, owner=("StatefulSet", "later")))
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
    daemon = Daemon("--metadata", "kubernetes", "--kubeconfig", kubeconfig, "--node-name", NODE,
                    "--runtime-dirs", str(lab.runtime_dir), "--pod-labels", "app,team")
    daemons.append(daemon)
    web0, web1, db, agent, static = pods

    named = {("shop", "web-5d8f7c9b4-x2x2x"), ("shop", "web-5d8f7c9b4-k8k8k"),
             ("shop", "db-0"), ("kube-system", "agent-q7q7q"), ("kube-system", f"etcd-{NODE}")}
    # the first pass waits (boundedly) for the API's first list, so the names are there
    # when the daemon is ready; a loaded machine gets a few seconds more
    try:
        wait_for(lambda: set(pod_info(daemon.scrape())) == named, timeout=10)
    finally:
        info = pod_info(daemon.scrape())
        assert set(info) == named, daemon.logs()
    web = info[("shop", "web-5d8f7c9b4-x2x2x")]
    assert (web["workload"], web["workload_kind"]) == ("web", "Deployment")
    assert (web["label_app"], web["label_team"], web["uid"]) == ("web", "a", web0.uid)
    assert (info[("shop", "db-0")]["workload"], info[("shop", "db-0")]["workload_kind"]) == (
        "db", "StatefulSet")
    assert info[("kube-system", "agent-q7q7q")]["workload_kind"] == "DaemonSet"
    assert info[("kube-system", "agent-q7q7q")]["netns"] == str(agent.netns)  # CRI-O, no pause
    etcd = info[("kube-system", f"etcd-{NODE}")]
    # found through the mirror annotation (the cgroup has the kubelet's UID, static.uid);
    # the uid label is the API object's, the one `kubectl get pod` shows
    assert (etcd["workload"], etcd["workload_kind"], etcd["uid"]) == (NODE, "Node", mirror_uid)
    assert etcd["netns"] == str(static.netns)
    assert daemon.scrape().sum("podnet_monitor_api_synced") == 1

    # counted under the API's names, exactly
    in_pod(web1, "ping", "-c", "1", "-W", "1", db.ip)
    before = quiet_window(daemon, pods)
    in_pod(web1, "ping", "-c", "9", "-i", "0.01", "-q", db.ip)
    after = quiet_window(daemon, pods)
    sent = (after.metrics.sum("podnet_packets_total", pod="web-5d8f7c9b4-k8k8k", direction="egress")
            - before.metrics.sum("podnet_packets_total", pod="web-5d8f7c9b4-k8k8k",
                                 direction="egress"))
    assert sent == after.stats[web1.host_veth]["rx_packets"] - before.stats[web1.host_veth]["rx_packets"]

    # the API pod whose netns was not there yet: labelled as soon as its pod appears
    started = time.monotonic()
    lab.add(style="containerd", uid=later_uid)
    took = wait_for(lambda: ("shop", "later-0") in pod_info(daemon.scrape()), timeout=5)
    assert time.monotonic() - started < 2, took

    # a netns seen before its API object: the fallback name, then the API's, never both
    early = lab.add(style="docker")
    fallback = ("_unknown", f"netns-{early.netns}")
    wait_for(lambda: fallback in pod_info(daemon.scrape()), timeout=5)
    api.add(make_pod("early-0", "shop", early.uid, NODE))
    wait_for(lambda: ("shop", "early-0") in pod_info(daemon.scrape()), timeout=5)
    info = pod_info(daemon.scrape())
    assert fallback not in info
    assert sum(1 for d in info.values() if d["netns"] == str(early.netns)) == 1

    # a pod deleted in the API and the kernel: its series go (well within 60 s)
    api.delete("shop", "db-0")
    lab.remove(db.name)
    took = wait_for(lambda: not daemon.scrape().has("podnet_packets_total", pod="db-0"), timeout=60)
    assert ("shop", "db-0") not in pod_info(daemon.scrape())
    assert took < 5
    # only lists and watches: of this node's pods (names), and of every pod and Service
    # (peers' names; pods in pages of 500); no per-pod call
    assert api.requests and all(path in ("/api/v1/pods", "/api/v1/services") and m == "GET"
                                for m, path, _q in api.requests)
    names = [q for _m, path, q in api.requests if q.get("fieldSelector")]
    assert names and all(q["fieldSelector"] == f"spec.nodeName={NODE}" for q in names)
    assert all(q.get("limit") == "500" or q.get("watch") == "true"
               for _m, path, q in api.requests if path == "/api/v1/pods"
               and not q.get("fieldSelector"))


def test_series_cap_folds_extra_pods_into_overflow(lab: Lab, daemons: list[Daemon]) -> None:
    pods = lab.up(5)
    daemon = Daemon("--max-pods", "3", inventory=str(lab.inventory))
    daemons.append(daemon)
    m = daemon.scrape()
    named = {k for k in pod_info(m) if k[0] == "lab"}
    assert len(named) == 3
    assert ("_overflow", "_overflow") in pod_info(m)  # one info series for all folded pods
    assert m.sum("podnet_monitor_series_dropped_total") == 2
    pod_series = {dict(ls)["pod"] for (n, ls) in m.samples if n == "podnet_packets_total"}
    assert pod_series == {name for _ns, name in named} | {"_overflow"}
    # the folded pods' traffic is counted, under _overflow: exact as ever
    folded = [p for p in pods if ("lab", p.name) not in named]
    in_pod(folded[0], "ping", "-c", "1", "-W", "1", folded[1].ip)
    before = quiet_window(daemon, pods)
    in_pod(folded[0], "ping", "-c", "7", "-i", "0.01", "-q", folded[1].ip)
    after = quiet_window(daemon, pods)
    ours = (after.metrics.sum("podnet_packets_total", pod="_overflow", direction="egress")
            - before.metrics.sum("podnet_packets_total", pod="_overflow", direction="egress"))
    kernel = sum(after.stats[p.host_veth]["rx_packets"] - before.stats[p.host_veth]["rx_packets"]
                 for p in folded)
    assert ours == kernel >= 7
    warnings = [e for e in daemon.log_events() if "cap reached" in str(e.get("event"))]
    assert len(warnings) == 1
