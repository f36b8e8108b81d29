"""The Helm chart (deploy/helm/podnetmon): linted, rendered, installed into a real API server.

helm is built from its Go module by tests/cluster/build.sh. With its defaults the
chart renders exactly the objects of the kustomize base (deploy/base), Helm's own
labels aside, so the two cannot drift apart; an install into the real control plane
goes through admission and schema validation and an uninstall leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import fixtures
from tests.cluster.controlplane import ROOT, ControlPlane, kubectl_path

CHART = ROOT / "deploy" / "helm" / "podnetmon"
HELM_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")


@pytest.fixture(scope="module")
def helm() -> Path:
    path = fixtures.built_binaries() / "helm"
    if not path.exists():
        pytest.skip(f"no helm in {path.parent}: tests/cluster/build.sh builds it")
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from fixtures.start(rbac=False)  # the chart brings its own (Helm owns what it made)


def _helm(helm: Path, *args: str, cp: ControlPlane | None = None,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    env = cp.env() if cp else None
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=180,
                         env=env, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out


def _render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = _helm(helm, "template", "podnetmon", str(CHART), "--namespace", "podnetmon", *args)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _without_helm_labels(doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for meta in (doc["metadata"], doc.get("spec", {}).get("template", {}).get("metadata")):
        if meta:
            for label in HELM_LABELS:
                meta.get("labels", {}).pop(label, None)
    doc["metadata"].pop("annotations", None)  # the base's checkov suppressions
    return doc


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_chart_lints_clean(helm: Path) -> None:
    out = _helm(helm, "lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout, out.stdout


def test_defaults_render_exactly_the_kustomize_base(helm: Path) -> None:
    base = subprocess.run([kubectl_path(), "kustomize", str(ROOT / "deploy" / "base")],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    kustomized = {_key(d): _without_helm_labels(d) for d in yaml.safe_load_all(base) if d}
    # the chart installs into a namespace Helm is given (--create-namespace), as charts do
    kustomized.pop(("Namespace", "podnetmon"))
    rendered = {_key(d): _without_helm_labels(d) for d in _render(helm)}
    assert set(rendered) == set(kustomized)
    for key, doc in kustomized.items():
        assert rendered[key] == doc, key


def test_values_change_what_they_say(helm: Path) -> None:
    docs = {_key(d): d for d in _render(
        helm, "--set", "image.digest=sha256:" + "ab" * 32, "--set", "port=9700",
        "--set", "podMonitor.enabled=true", "--set-json", 'extraArgs=["--pod-labels","app"]',
        "--set", "resourceQuota.enabled=false")}
    container = docs[("DaemonSet", "podnetmon")]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/podnetmon/podnetmon@sha256:" + "ab" * 32
    assert container["args"] == ["run", "--listen", "0.0.0.0:9700", "--tls-cert-file",
                                 "/etc/podnetmon/tls/tls.crt", "--tls-key-file",
                                 "/etc/podnetmon/tls/tls.key", "--pod-labels", "app"]
    assert container["ports"][0]["containerPort"] == 9700
    assert docs[("PodMonitor", "podnetmon")]["spec"]["podMetricsEndpoints"][0][
        "honorLabels"] is True
    assert ("ResourceQuota", "podnetmon-critical-pods") not in docs
    # TLS off: plain HTTP, the probes too, no Secret, and the monitors scrape http
    plain = {_key(d): d for d in _render(helm, "--set", "tls.enabled=false",
                                         "--set", "serviceMonitor.enabled=true")}
    spec = plain[("DaemonSet", "podnetmon")]["spec"]["template"]["spec"]
    assert spec["containers"][0]["args"] == ["run", "--listen", "0.0.0.0:9655"]
    assert spec["containers"][0]["livenessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert "tls" not in {v["name"] for v in spec["volumes"]}
    endpoint = plain[("ServiceMonitor", "podnetmon")]["spec"]["endpoints"][0]
    assert "tlsConfig" not in endpoint and "scheme" not in endpoint
    both = _helm(helm, "template", "podnetmon", str(CHART), "--set", "podMonitor.enabled=true",
                 "--set", "serviceMonitor.enabled=true", check=False)
    assert both.returncode != 0 and "enable one of them" in both.stderr


def test_install_into_the_real_api_and_uninstall_leaves_nothing(
        helm: Path, cluster: ControlPlane) -> None:
    _helm(helm, "install", "podnetmon", str(CHART), "--namespace", "monitoring",
          "--create-namespace", cp=cluster)
    out = json.loads(cluster.kubectl("get", "daemonset,serviceaccount,service,resourcequota",
                                     "-n", "monitoring", "-l",
                                     "app.kubernetes.io/instance=podnetmon",
                                     "-o", "json").stdout)
    assert sorted(i["kind"] for i in out["items"]) == ["DaemonSet", "ResourceQuota",
                                                       "Service", "ServiceAccount"]
    binding = json.loads(cluster.kubectl("get", "clusterrolebinding", "podnetmon", "-o",
                                         "json").stdout)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "podnetmon",
                                    "namespace": "monitoring"}]
    # the account the chart made is granted what the daemon uses, by the real authorizer
    can = cluster.kubectl("auth", "can-i", "watch", "pods", "--all-namespaces",
                          "--as=system:serviceaccount:monitoring:podnetmon", check=False)
    assert can.stdout.strip() == "yes"
    _helm(helm, "uninstall", "podnetmon", "--namespace", "monitoring", "--wait", cp=cluster)
    left = cluster.kubectl("get", "daemonset,serviceaccount,service,resourcequota", "-n",
                           "monitoring", "-l", "app.kubernetes.io/instance=podnetmon",
                           "-o", "name").stdout.strip()
    assert left == ""
    gone = cluster.kubectl("get", "clusterrole,clusterrolebinding", "podnetmon",
                           check=False)
    assert "NotFound" in gone.stderr
