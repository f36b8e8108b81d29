"""deploy/ and the Dockerfile: the manifests validate, the DaemonSet gives the daemon what
it needs and no more, and the linters pass with every suppression justified.

The linters live in a venv of their own, .tools/ (`make setup` installs scripts/tools.txt);
a test that needs one skips, saying so, only when it is missing. Nothing here needs a
cluster, a Docker engine or the network.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor import settings
from monitor.exposition import Registry
from monitor.server import Api
from monitor.state import MonitorState

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HELM = DEPLOY / "helm"
DOCKERFILE = ROOT / "Dockerfile"
TOOLS = ROOT / ".tools" / "bin"
K8S_VERSION = "1.30.0"
NAMESPACE = "podnetmon"
IMAGE = "ghcr.io/podnetmon/podnetmon:0.1.0"
PORT = 9655
CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYSLOG"}
# Host paths the daemon writes: bpffs (objects it pins) and the directory of captures started
# by alerts (--capture-dir). tracefs is only read (tracepoint formats and ids; no
# kprobe_events), so every other hostPath is mounted read-only.
CAPTURE_DIR = "/var/lib/podnetmon/captures"
WRITABLE_HOST_PATHS = {"/sys/fs/bpf", CAPTURE_DIR}
# Prometheus Operator kinds: kubernetes-validate ships Kubernetes' own schemas only, and for
# a kind it has no schema for it prints a WARN and exits 0. Their structure is checked here
# instead, against the fields the operator's CRDs require and the ones we use.
CRD_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
MIN_REASON_WORDS = 6
# checkov must not reach the network: no platform download, no PyPI version check.
CHECKOV_ENV = {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE"}


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is missing: `make setup` installs the manifest "
                    "linters (scripts/tools.txt) into .tools/")
    return path


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, **(env or {})})


def manifest_files() -> list[Path]:
    """The kustomize manifests (the Helm chart's templates are tested rendered, by
    tests/kernel/test_real_helm.py)."""
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"
                  and HELM not in p.parents)


def kustomization_files() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in docs(path):
            yield path, doc


def only(kind: str) -> dict[str, Any]:
    found = [doc for _path, doc in all_objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = only("DaemonSet")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["podnetmon"]
    return dict(containers[0])


def effective_security(key: str) -> Any:
    """A container securityContext field, or the pod's where the container leaves it unset."""
    c = container().get("securityContext", {})
    return c[key] if key in c else pod_spec().get("securityContext", {}).get(key)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


# -- the manifests as YAML and as Kubernetes objects -------------------------------------


def test_every_manifest_parses_and_lives_in_the_namespace() -> None:
    kinds = set()
    for path, doc in all_objects():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "podnetmon", path
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {doc['kind']}"
        kinds.add(doc["kind"])
    assert kinds == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                     "ResourceQuota", "DaemonSet", "Service"} | CRD_KINDS
    assert only("Namespace")["metadata"]["name"] == NAMESPACE


def test_manifests_validate_strictly_against_kubernetes_1_30() -> None:
    validate = tool("kubernetes-validate")
    core = [p for p in manifest_files() if not any(d["kind"] in CRD_KINDS for d in docs(p))]
    result = run(validate, "--strict", "-k", K8S_VERSION, *(p.relative_to(ROOT) for p in core))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # An unknown kind or apiVersion is only a WARN (exit 0): it must not pass unnoticed.
    assert not [ln for ln in lines if not ln.startswith("INFO")], result.stdout
    for path in core:
        rel = path.relative_to(ROOT)
        assert any(ln.startswith(f"INFO {rel} passed") for ln in lines), f"{rel}: {result.stdout}"


def test_rendered_kustomizations_validate() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomizations are not rendered")
    validate = tool("kubernetes-validate")
    for kustomization in kustomization_files():
        rendered = subprocess.run([kubectl, "kustomize", str(kustomization.parent)],
                                  capture_output=True, text=True, timeout=120, check=False)
        assert rendered.returncode == 0, rendered.stderr
        objects = [d for d in yaml.safe_load_all(rendered.stdout) if d]
        assert {o["kind"] for o in objects} >= {"Namespace", "DaemonSet", "ClusterRole"}
        core = [o for o in objects if o["kind"] not in CRD_KINDS]
        for obj in core:
            if obj["kind"] not in CLUSTER_SCOPED:
                assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        checked = subprocess.run([str(validate), "--strict", "-k", K8S_VERSION, "-"],
                                 input=yaml.safe_dump_all(core), capture_output=True, text=True,
                                 timeout=300, check=False)
        assert checked.returncode == 0, checked.stdout
        assert checked.stdout.count(" passed for resource ") == len(core), checked.stdout


def test_prometheus_operator_monitors_select_the_daemon() -> None:
    template_labels = only("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    service = only("Service")
    endpoint_keys = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                     "relabelings", "metricRelabelings", "tlsConfig"}
    for kind, endpoints_key, target_labels, port_names in (
            ("PodMonitor", "podMetricsEndpoints", template_labels, set(ports)),
            ("ServiceMonitor", "endpoints", service["metadata"]["labels"],
             {p["name"] for p in service["spec"]["ports"]})):
        monitor = only(kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        assert set(spec) == {"jobLabel", "selector", "namespaceSelector", endpoints_key}, kind
        # job="podnetmon", what the alert rules select (not the operator's "<ns>/<name>")
        assert template_labels[spec["jobLabel"]] == "podnetmon", kind
        selector = spec["selector"]["matchLabels"]
        assert selector.items() <= target_labels.items(), kind
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        [endpoint] = spec[endpoints_key]
        assert set(endpoint) <= endpoint_keys, f"{kind}: unknown fields {set(endpoint) - endpoint_keys}"
        # TLS, verified against the CA of the very Secret the daemons serve from
        assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s",
                            "honorLabels": True, "scheme": "https", "tlsConfig": {
                                "ca": {"secret": {"name": tls_secret(), "key": "ca.crt"}},
                                "serverName": f"podnetmon.{NAMESPACE}.svc"}}
        assert endpoint["port"] in port_names
    assert ports["metrics"] == PORT
    [service_port] = service["spec"]["ports"]
    assert (service_port["port"], service_port["targetPort"]) == (PORT, "metrics")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= template_labels.items()


def test_the_prometheus_rule_holds_the_plain_rule_file() -> None:
    rule = only("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    plain = yaml.safe_load((ROOT / "prometheus" / "podnet-rules.yaml").read_text())
    assert rule["spec"] == plain  # one source, two renderings
    alerts = [r["alert"] for g in plain["groups"] for r in g["rules"] if "alert" in r]
    assert alerts[:2] == ["PodNetDropsHigh", "PodNetTCPRetransmitRatioHigh"]


def test_kustomizations_list_exactly_the_files_beside_them() -> None:
    listed_somewhere = set()
    for kustomization in kustomization_files():
        here = kustomization.parent
        doc = yaml.safe_load(kustomization.read_text())
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert doc["kind"] == "Kustomization"
        assert doc["namespace"] == NAMESPACE
        files, bases = set(), set()
        for entry in doc["resources"]:
            target = (here / entry).resolve()
            if target.is_dir():
                assert (target / "kustomization.yaml").is_file(), f"{kustomization}: {entry}"
                bases.add(target)
            else:
                assert target.is_file(), f"{kustomization}: {entry} does not exist"
                assert target.parent == here, f"{kustomization}: {entry} is not beside it"
                files.add(target)
        present = {p.resolve() for p in here.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert files == present, f"{kustomization}: orphans {present - files}, missing {files - present}"
        assert len(doc["resources"]) == len(files) + len(bases), f"{kustomization}: duplicates"
        if here != DEPLOY / "base":
            assert bases == {(DEPLOY / "base").resolve()}, kustomization
        listed_somewhere |= files
    assert listed_somewhere == {p.resolve() for p in manifest_files()}
    assert (DEPLOY / "base" / "kustomization.yaml").is_file()
    assert (DEPLOY / "prometheus-operator" / "kustomization.yaml").is_file()


# -- the DaemonSet -------------------------------------------------------------------------


def test_daemonset_uses_the_hosts_namespaces_and_knows_its_node() -> None:
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    # No PODNETMON_* variables injected for the Service of the same name.
    assert spec["enableServiceLinks"] is False
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # ... which the daemon reads when PODNETMON_NODE_NAME is unset.
    assert settings.from_sources({}, environ={"NODE_NAME": "node-a"}).node_name == "node-a"


def test_daemonset_security_context() -> None:
    for key, value in walk(only("DaemonSet")):
        assert not (key == "privileged" and value is True)
    sc = container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert effective_security("runAsUser") == 0
    assert effective_security("seccompProfile") == {"type": "RuntimeDefault"}
    assert sc["capabilities"]["drop"] == ["ALL"]
    added = sc["capabilities"]["add"]
    assert sorted(added) == sorted(CAPABILITIES)  # exactly these, each once


def test_each_added_capability_is_explained_where_it_is_added() -> None:
    lines = (DEPLOY / "base" / "daemonset.yaml").read_text().splitlines()
    for cap in sorted(CAPABILITIES):
        [index] = [i for i, ln in enumerate(lines) if re.fullmatch(rf"\s*- {cap}\s*(#.*)?", ln)]
        comment = lines[index].partition("#")[2]
        above = index - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            comment = lines[above].strip() + " " + comment
            above -= 1
        assert cap in comment, f"{cap}: no comment on or just above line {index + 1} naming it"
        assert len(comment.split()) >= MIN_REASON_WORDS, f"{cap}: {comment!r} says too little"


def test_daemonset_probes_hit_the_daemons_routes_on_its_port() -> None:
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": PORT}
    routes = Api(Registry(), MonitorState(), "node", alive=lambda: True).routes
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"),
                        ("startupProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        # a GET route of the daemon's answers exactly this path (and not every path)
        assert [m for m, regex, _h in routes if m == "GET" and regex.match(get["path"])] == ["GET"], probe
        assert not any(regex.match(get["path"] + "x") for _m, regex, _h in routes), probe
        assert ports.get(get["port"], get["port"]) == PORT, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # BPF compile at start


def tls_secret() -> str:
    """The Secret the DaemonSet serves TLS from."""
    [volume] = [v for v in pod_spec()["volumes"] if v["name"] == "tls"]
    return str(volume["secret"]["secretName"])


def test_daemonset_serves_tls_from_its_secret() -> None:
    c = container()
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "tls"]
    assert mount["readOnly"] is True
    args = c["args"]
    for flag, key in (("--tls-cert-file", "tls.crt"), ("--tls-key-file", "tls.key")):
        assert args[args.index(flag) + 1] == f"{mount['mountPath']}/{key}"  # the Secret's keys
    assert tls_secret() == "podnetmon-tls"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS", probe


def test_daemonset_runs_the_daemon_with_real_settings() -> None:
    c = container()
    assert c["image"] == IMAGE
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["podnetmon"]
    assert c["args"][0] == "run"
    assert c["args"][1:3] == ["--listen", f"0.0.0.0:{PORT}"]
    flags = {settings.flag_name(n) for n in settings.names()}
    envs = {settings.env_name(n) for n in settings.names()} | {"NODE_NAME"}
    for arg in c["args"][1:]:
        if arg.startswith("-"):
            assert arg.partition("=")[0] in flags, f"{arg}: no such flag in monitor.settings"
    for var in c["env"]:
        assert var["name"] in envs, f"{var['name']}: no such variable in monitor.settings"
    # And the values are ones the daemon accepts, as `podnetmon run` would parse them.
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    flags_ns, unknown = parser.parse_known_args(c["args"][1:])
    assert unknown == []
    environ = {e["name"]: e.get("value", "node-a") for e in c["env"]}
    conf = settings.from_sources(flags_ns, environ=environ)
    assert (conf.listen_port, conf.node_name, conf.log_format) == (PORT, "node-a", "json")
    assert conf.tls_cert_file and conf.tls_key_file
    assert getattr(conf, "metadata", "kubernetes") == "kubernetes"


def host_mounts() -> dict[str, dict[str, Any]]:
    """Each hostPath volume's mount, by host path."""
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {}
    for mount in container()["volumeMounts"]:
        host = volumes[mount["name"]].get("hostPath")
        if host is not None:
            assert mount["mountPath"] == host["path"], "the daemon's defaults are the host's paths"
            mounts[host["path"]] = mount
    return mounts


def test_host_paths_are_read_only_but_bpffs() -> None:
    mounts = host_mounts()
    assert set(mounts) == {
        "/sys/fs/bpf", "/sys/kernel/tracing", "/run/netns", "/lib/modules", "/usr/src",
        "/run/containerd/io.containerd.runtime.v2.task/k8s.io",
        "/run/containers/storage/overlay-containers",
        "/var/lib/containers/storage/overlay-containers", CAPTURE_DIR}
    # the captures mount is where the daemon stores them by default (settings.capture_dir),
    # on the node's disk so they outlive the pod, made if the node has none yet
    assert settings.Settings(node_name="n").capture_dir == CAPTURE_DIR
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    [captures] = [v for v in volumes.values() if v.get("hostPath", {}).get("path") == CAPTURE_DIR]
    assert captures["hostPath"]["type"] == "DirectoryOrCreate"
    for path, mount in mounts.items():
        if path in WRITABLE_HOST_PATHS:
            assert not mount.get("readOnly", False), path
        else:
            assert mount.get("readOnly") is True, f"{path} should be mounted read-only"
        assert mount.get("mountPropagation", "None") in ("None", "HostToContainer"), path
    # netns pins made after the pod started are nsfs bind mounts: they must propagate.
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"
    [tmp] = [m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"]


def test_every_host_path_the_daemon_reads_by_default_is_there() -> None:
    mounted = set(host_mounts())
    for f in dataclasses.fields(settings.Settings):
        defaults = f.default if isinstance(f.default, tuple) else (f.default,)
        for path in (d for d in defaults if isinstance(d, str) and d.startswith("/")):
            if path == "/proc" or path.startswith("/proc/"):
                assert pod_spec()["hostPID"] is True  # the container's /proc is the host's
                continue
            if path.startswith("/sys/kernel/btf/"):
                continue  # the container's own sysfs shows it (and a kernel without BTF runs)
            # /var/run is a link to /run in the image (Debian's base-files).
            seen = "/run/" + path.removeprefix("/var/run/") if path.startswith("/var/run/") else path
            assert any(seen == m or seen.startswith(m + "/") for m in mounted), f"{f.name}: {path}"


def test_daemonset_scheduling_resources_and_updates() -> None:
    ds = only("DaemonSet")
    spec = pod_spec()
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": "10%"}}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"][
        "labels"].items()
    assert spec["serviceAccountName"] == only("ServiceAccount")["metadata"]["name"]
    resources = container()["resources"]
    # the steady and peak footprints measured in bench/RESULTS.md ("Footprint"), no CPU limit
    assert resources == {"requests": {"cpu": "50m", "memory": "160Mi"},
                         "limits": {"memory": "320Mi"}}
    assert "bench/RESULTS.md" in (DEPLOY / "base" / "daemonset.yaml").read_text()


def test_cluster_role_grants_exactly_what_the_daemon_uses() -> None:
    role = only("ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames, URLs
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]}
    assert granted == {("", "pods", "list"), ("", "pods", "watch"),
                       ("", "services", "list"), ("", "services", "watch"),
                       ("authentication.k8s.io", "tokenreviews", "create"),
                       ("authorization.k8s.io", "subjectaccessreviews", "create")}
    binding = only("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "podnetmon",
                                    "namespace": NAMESPACE}]


# -- the Dockerfile ---------------------------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = re.sub(r"\\\[(.*?)\\\]", r"[\1]", regex)
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerfile_builds_the_daemon_image() -> None:
    text = DOCKERFILE.read_text()
    # one base: Debian 12, Docker's image by default, `make image`'s mmdebstrap'd one by BASE
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}"]
    assert re.findall(r"^ARG BASE=(\S+)", text, re.M) == ["debian:12-slim"]
    install = re.search(r"apt-get install (?:\\\n|[^\n])*", text)
    assert install is not None
    assert "--no-install-recommends" in install.group(0)
    for package in ("python3-bpfcc", "libbpfcc", "iproute2", "python3-venv"):
        assert re.search(rf"\s{package}=\S+", install.group(0)), f"{package} is not pinned"
    # PyPI's "bcc" is an unrelated package; bcc comes from python3-bpfcc.
    assert not re.search(r"pip3? install[^\n]*\sbcc\b", text)
    assert "pip install --no-cache-dir" in text
    assert re.search(r"^ENV [^\n]*(\\\n[^\n]*)*PYTHONDONTWRITEBYTECODE=1", text, re.M)
    assert re.search(r'^ENTRYPOINT \["podnetmon"\]$', text, re.M)
    assert re.search(r'^CMD \["run"\]$', text, re.M)
    assert not re.search(r"^USER ", text, re.M)  # root: BPF needs it (see the DaemonSet)


def test_the_images_build_checks_run_against_this_tree() -> None:
    """Each `python -c '...'` the image build runs (it fails the build if the package cannot
    find its C sources or compile a trace filter) runs here too: a module it names that was
    moved or renamed fails this test, not the image build an hour later."""
    snippets = re.findall(r"python -c '([^']+)'", DOCKERFILE.read_text())
    assert len(snippets) >= 2, snippets
    for code in snippets:
        if code.strip() == "import bcc":
            continue  # the base image's python3-bpfcc, checked before the package exists
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, (code, done.stderr[-2000:])


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M)
              for src in line.split()[:-1]]
    assert {c.rstrip("/") for c in copied} == {"pyproject.toml", "README.md", "monitor", "podnetlab",
                                                "bpf"}
    needed = ["pyproject.toml", "README.md"] + [
        str(p.relative_to(ROOT)) for d in ("monitor", "podnetlab", "bpf") for p in (ROOT / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts]
    for path in needed:
        assert not dockerignore_excludes(path, patterns), f"{path} is needed by the image build"
    for path in (".venv/bin/python", ".tools/bin/checkov", ".git/HEAD", "tests/unit/test_cli.py",
                 "bench/out/run.json", ".pytest_cache/v/cache/nodeids", ".mypy_cache/3.11/x.json",
                 "monitor/__pycache__/cli.cpython-311.pyc", "podnetmon.egg-info/PKG-INFO",
                 "deploy/base/daemonset.yaml"):
        assert dockerignore_excludes(path, patterns), f"{path} should stay out of the context"


def test_hadolint_passes() -> None:
    result = run(tool("hadolint"), DOCKERFILE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


# -- checkov, and the reasons for what it is told to skip ---------------------------------------


def suppressions() -> dict[str, tuple[Path, str]]:
    """check id -> (file, reason), from the manifests' annotations and the Dockerfile."""
    found: dict[str, tuple[Path, str]] = {}
    for path, doc in all_objects():
        annotations = doc["metadata"].get("annotations") or {}
        for key, value in annotations.items():
            if key.startswith("checkov.io/skip"):
                assert re.fullmatch(r"checkov\.io/skip\d+", key), key
                # checkov splits the value on "=": exactly one, between the id and the reason.
                assert value.count("=") == 1, f"{path}: {key}"
                check, reason = value.split("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check), f"{path}: {key}"
                assert check not in found, f"{check} suppressed twice"
                found[check] = (path, reason)
    # Only the objects' own metadata is read by checkov: none anywhere else.
    raw = "".join(p.read_text() for p in manifest_files())
    assert len(re.findall(r"^\s*checkov\.io/skip\d+:", raw, re.M)) == len(found)
    for check, reason in re.findall(r"#\s*checkov:skip=(\S+?):(.*)", DOCKERFILE.read_text()):
        assert re.fullmatch(r"CKV2?_DOCKER_\d+", check), check
        found[check] = (DOCKERFILE, reason)
    return found


def test_every_suppression_gives_a_reason() -> None:
    found = suppressions()
    assert found, "no suppressions found: the parser is broken or checkov changed"
    for check, (path, reason) in found.items():
        assert len(reason.split()) >= MIN_REASON_WORDS, f"{path.name} {check}: {reason!r}"


def checkov(*argv: str) -> subprocess.CompletedProcess[str]:
    return run(tool("checkov"), *argv, "--skip-download", env=CHECKOV_ENV)


@pytest.mark.parametrize(("target", "framework"), [(("-d", "deploy"), "kubernetes"),
                                                   (("-f", "Dockerfile"), "dockerfile")])
def test_checkov_finds_nothing_unjustified(target: tuple[str, str], framework: str) -> None:
    result = checkov(*target, "--framework", framework, "--quiet", "--compact")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed checks: 0," in result.stdout, result.stdout
    report = checkov(*target, "--framework", framework, "--compact", "-o", "json")
    assert report.returncode == 0, report.stdout + report.stderr
    results = json.loads(report.stdout)["results"]
    assert results["failed_checks"] == []
    assert results["passed_checks"], "checkov checked nothing"
    # Every suppression written was understood, and nothing else was skipped (a malformed
    # one would be ignored silently, and its check would fail above).
    ours = {check: reason.strip() for check, (path, reason) in suppressions().items()
            if (path == DOCKERFILE) == (framework == "dockerfile")}
    skipped = {s["check_id"]: s["check_result"]["suppress_comment"].strip()
               for s in results["skipped_checks"]}
    assert skipped == ours
