"""The real Prometheus Operator against the loopback control plane, and the config it writes.

The operator (built by tests/cluster/build.sh from its published module) runs
with the admin's client certificate, its CRDs applied from the same module.
For each Prometheus resource it renders a scrape configuration from the
PodMonitors and ServiceMonitors it selects and stores it, gzipped, in the
Secret `prometheus-<name>` (key `prometheus.yaml.gz`). No StatefulSet runs
here; instead `run_prometheus` starts Prometheus with exactly that
configuration (after the `$(SHARD)`/`$(POD_NAME)` substitution the StatefulSet's
config-reloader makes): Prometheus 2.55.1 built by build.sh, since Debian's is built without
the Kubernetes service discovery the configuration uses. That discovery is
in-cluster (no api_server field): Prometheus then reads KUBERNETES_SERVICE_HOST/PORT and the token and
CA at /var/run/secrets/kubernetes.io/serviceaccount, so it runs in a mount
namespace of its own where those paths hold a ServiceAccount token and our CA,
as a pod would see them; the host's /run is untouched.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import ControlPlane, free_port

CONFIG_KEY = "prometheus.yaml.gz"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Where the StatefulSet mounts the Secret(s) prometheus-<name>-tls-assets-<n>: the CAs,
# certificates and keys the monitors' tlsConfig names, which the configuration refers to
CERTS_DIR = "/etc/prometheus/certs"
# Where it mounts the ConfigMaps prometheus-<name>-rulefiles-<n>: the PrometheusRules it
# selected, one file each
RULES_DIR = "/etc/prometheus/rules"


class Operator:
    """The prometheus-operator process."""

    def __init__(self, cp: ControlPlane, bin_dir: Path) -> None:
        assert cp.pki is not None
        self.cp = cp
        crds = bin_dir / "crds"
        cp.kubectl("apply", "--server-side", "-f", str(crds))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
        self.port = free_port()
        self._log_path = cp.dir / "prometheus-operator.log"
        log = self._log_path.open("ab")
        self.proc = subprocess.Popen([
            str(bin_dir / "prometheus-operator"), f"-apiserver={cp.url}",
            f"-ca-file={cp.pki.ca.cert}", f"-cert-file={cp.pki.admin.cert}",
            f"-key-file={cp.pki.admin.key}", f"-web.listen-address=127.0.0.1:{self.port}",
            "-log-format=json"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def logs(self) -> str:
        return self._log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def generated_config(self, namespace: str, prometheus: str, *,
                         must_contain: str = "", timeout: float = 90) -> str:
        """The scrape configuration the operator wrote for a Prometheus resource."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus-operator exited:\n{self.logs()}")
            out = self.cp.kubectl("get", "secret", f"prometheus-{prometheus}", "-n", namespace,
                                  "-o", "json", check=False)
            if out.returncode == 0:
                data = json.loads(out.stdout).get("data") or {}
                if CONFIG_KEY in data:
                    text = gzip.decompress(base64.b64decode(data[CONFIG_KEY])).decode()
                    if must_contain in text:
                        return text
            time.sleep(0.5)
        raise RuntimeError(f"no configuration with {must_contain!r} in {timeout:.0f} s "
                           f"(last: {text[:2000]!r}):\n{self.logs()}")


def tls_assets(cp: ControlPlane, namespace: str, prometheus: str) -> dict[str, bytes]:
    """The files the operator put in the Prometheus's tls-assets Secrets, by name."""
    out = json.loads(cp.kubectl("get", "secrets", "-n", namespace, "-o", "json").stdout)
    files = {}
    for item in out["items"]:
        if item["metadata"]["name"].startswith(f"prometheus-{prometheus}-tls-assets"):
            files.update({k: base64.b64decode(v) for k, v in (item.get("data") or {}).items()})
    return files


def rule_files(cp: ControlPlane, namespace: str, prometheus: str, *, must_contain: str,
               timeout: float = 60) -> dict[str, dict[str, str]]:
    """The rule files the operator made of the PrometheusRules it selected, by ConfigMap."""
    deadline = time.monotonic() + timeout
    while True:
        out = json.loads(cp.kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout)
        maps = {item["metadata"]["name"]: dict(item.get("data") or {}) for item in out["items"]
                if item["metadata"]["name"].startswith(f"prometheus-{prometheus}-rulefiles")}
        if any(must_contain in text for files in maps.values() for text in files.values()):
            return maps
        if time.monotonic() > deadline:
            raise RuntimeError(f"no rule file with {must_contain!r} in {timeout:.0f} s: {maps}")
        time.sleep(0.5)


# What the StatefulSet's prometheus-config-reloader sidecar sets and substitutes into the
# configuration before Prometheus reads it: `$(NAME)` references to its environment.
RELOADER_ENV = {"SHARD": "0", "POD_NAME": "prometheus-k8s-0"}


def as_reloader_writes_it(config: str, env: dict[str, str] = RELOADER_ENV) -> str:
    """The operator's configuration as the config-reloader hands it to Prometheus."""
    return re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), config)


def prometheus_resource(name: str, namespace: str, version: str = "v2.55.1") -> dict[str, Any]:
    """A Prometheus resource that selects every PodMonitor and ServiceMonitor."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"version": version, "replicas": 1, "serviceAccountName": "prometheus",
                     "podMonitorSelector": {}, "podMonitorNamespaceSelector": {},
                     "serviceMonitorSelector": {}, "serviceMonitorNamespaceSelector": {},
                     "ruleSelector": {}, "ruleNamespaceSelector": {},
                     "scrapeInterval": "1s", "evaluationInterval": "1s"}}


def prometheus_rbac(namespace: str) -> list[dict[str, Any]]:
    """What kube-prometheus-stack grants its Prometheus: discovery of pods and endpoints."""
    meta = {"name": f"prometheus-{namespace}"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "prometheus", "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta,
         "rules": [{"apiGroups": [""], "resources": ["nodes", "services", "endpoints", "pods"],
                    "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": meta,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": meta["name"]},
         "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": namespace}]},
    ]


def run_prometheus(cp: ControlPlane, prometheus: Path, config: str, workdir: Path, token: str,
                   *, assets: dict[str, bytes] | None = None,
                   rules: dict[str, dict[str, str]] | None = None,
                   paths: dict[str, Path] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Prometheus with `config` as is, its in-cluster discovery pointed at `cp`; `assets`
    (tls_assets()) are the files the configuration names under CERTS_DIR and `rules`
    (rule_files()) those under RULES_DIR, kept in `workdir` instead; `paths` maps other
    files the configuration names to where they are here. Those are the only changes made
    to the configuration."""
    assert cp.pki is not None
    workdir.mkdir(parents=True, exist_ok=True)
    certs = workdir / "certs"
    certs.mkdir(mode=0o700, exist_ok=True)
    for name, data in (assets or {}).items():
        (certs / name).write_bytes(data)
    config = as_reloader_writes_it(config).replace(CERTS_DIR + "/", f"{certs}/")
    rules_dir = workdir / "rules"
    for configmap, files in (rules or {}).items():
        (rules_dir / configmap).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (rules_dir / configmap / name).write_text(text)
    config = config.replace(RULES_DIR + "/", f"{rules_dir}/")
    for named, here in (paths or {}).items():
        config = config.replace(named, str(here))
    (workdir / "prometheus.yml").write_text(config)
    secrets = workdir / "serviceaccount"
    secrets.mkdir(exist_ok=True)
    (secrets / "token").write_text(token)
    shutil.copy(cp.pki.ca.cert, secrets / "ca.crt")
    (secrets / "namespace").write_text("monitoring")
    port = free_port()
    # A private mount namespace: a tmpfs on /run (where /var/run points) holding the
    # ServiceAccount files, seen by this Prometheus alone.
    script = (f"mount --make-rprivate / && mount -t tmpfs tmpfs /run && mkdir -p {SA_DIR} && "
              f"cp {secrets}/token {secrets}/ca.crt {secrets}/namespace {SA_DIR}/ && "
              f"exec {prometheus} --config.file={workdir}/prometheus.yml "
              f"--storage.tsdb.path={workdir}/data --web.listen-address=127.0.0.1:{port} "
              f"--log.level=warn")
    log = (workdir / "prometheus.log").open("ab")
    proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script],
                            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                                 "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                 "KUBERNETES_SERVICE_PORT": str(cp.port)},
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    return proc, port
