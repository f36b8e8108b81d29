"""Starting the real control plane for a test module, and API objects for lab pods."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import ISSUER, ROOT, ControlPlane

BUILD = ROOT / "tests" / "cluster" / "build.sh"
IMAGE = ROOT / "scripts" / "image.sh"
NO_GO = 3  # build.sh's exit status when there is no Go toolchain
DAEMON_NAMESPACE, DAEMON_SA = "podnetmon", "podnetmon"
DAEMON_USER = f"system:serviceaccount:{DAEMON_NAMESPACE}:{DAEMON_SA}"
RBAC_FILES = ("namespace.yaml", "serviceaccount.yaml", "clusterrole.yaml",
              "clusterrolebinding.yaml")
# Workload controllers would make pods of their own for the owners the tests create (the
# tests make the pods, with lab pods' netns behind them); the node lifecycle controllers
# would taint and evict pods of a node that has no kubelet.
CONTROLLERS = ("*,-deployment-controller,-replicaset-controller,-statefulset-controller,"
               "-daemonset-controller,-job-controller,-cronjob-controller,"
               "-node-lifecycle-controller,-taint-eviction-controller")


def built_binaries() -> Path:
    """The cached build of the control plane (building it on a cold machine).

    PODNETMON_CLUSTER_BIN names a directory of binaries to use instead, unbuilt.
    """
    if os.environ.get("PODNETMON_CLUSTER_BIN"):
        return Path(os.environ["PODNETMON_CLUSTER_BIN"])
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False,
                         timeout=3000)
    if out.returncode == NO_GO:
        pytest.skip(f"the real control plane cannot be built here: {out.stderr.strip()}")
    if out.returncode != 0:
        raise AssertionError(f"building the control plane failed:\n{out.stderr[-4000:]}")
    took = time.monotonic() - t0
    print(f"\ncontrol plane binaries: {out.stdout.strip()} ({took:.1f} s)\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


def built_image() -> Path:
    """The daemon's image archive from `make image` (scripts/image.sh; cached)."""
    missing = [t for t in ("buildah", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the daemon's image cannot be built here: no {', '.join(missing)}")
    out = subprocess.run(["bash", str(IMAGE)], capture_output=True, text=True, check=False,
                         timeout=1800)
    if out.returncode != 0:
        raise AssertionError(f"make image failed:\n{out.stderr[-4000:]}")
    print(out.stderr)
    return Path(out.stdout.strip().splitlines()[-1])


def start(controllers: str = CONTROLLERS, rbac: bool = True,
          **kwargs: Any) -> Iterator[ControlPlane]:
    """A started control plane with the shipped RBAC applied (unless not `rbac`);
    stopped afterwards."""
    cp = ControlPlane(built_binaries(), controllers=controllers, **kwargs)
    cp.start()
    print(f"control plane started in {cp.start_seconds:.1f} s at {cp.url}")
    try:
        base = ROOT / "deploy" / "base"
        if rbac:
            cp.kubectl("apply", *[a for f in RBAC_FILES for a in ("-f", str(base / f))])
        yield cp
    finally:
        cp.stop()


def add_node(cp: ControlPlane, name: str) -> None:
    cp.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


def add_owner(cp: ControlPlane, kind: str, name: str, namespace: str,
              labels: Mapping[str, str]) -> dict[str, Any]:
    """A real owner object (apps/v1), so the garbage collector leaves its pods alone."""
    spec = {"replicas": 0, "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": {"containers": [{"name": "app", "image": "pause"}]}}}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    cp.apply({"apiVersion": "apps/v1", "kind": kind,
              "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
              "spec": spec})
    return get(cp, kind.lower(), name, namespace)


def get(cp: ControlPlane, resource: str, name: str, namespace: str) -> dict[str, Any]:
    return dict(json.loads(cp.kubectl("get", resource, name, "-n", namespace, "-o",
                                      "json").stdout))


def add_pod(cp: ControlPlane, name: str, namespace: str, node: str, *,
            labels: Mapping[str, str] | None = None, owner: Mapping[str, Any] | None = None,
            ip: str = "") -> dict[str, Any]:
    """A pod bound to `node` (no scheduler); its status (Running, IP) through /status."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if owner is not None:
        meta["ownerReferences"] = owned_by(owner)
    cp.apply({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
              "spec": {"nodeName": node, "containers": [{"name": "app", "image": "pause"}]}})
    set_running(cp, name, namespace, ip)
    return get(cp, "pod", name, namespace)


def owned_by(owner: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ownerReferences of a pod its controller `owner` made."""
    return [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
             "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": True}]


def set_running(cp: ControlPlane, name: str, namespace: str, ip: str = "") -> None:
    """What a kubelet would report: Running and Ready, with the pod's IP (via /status)."""
    status: dict[str, Any] = {"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True"}]}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    cp.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


def daemon_kubeconfig(cp: ControlPlane, path: Path) -> Path:
    """A kubeconfig with the daemon's own ServiceAccount token (a TokenRequest)."""
    token = cp.create_token(DAEMON_NAMESPACE, DAEMON_SA, audience=ISSUER)
    return cp.write_token_kubeconfig(path, token, user=DAEMON_USER)
