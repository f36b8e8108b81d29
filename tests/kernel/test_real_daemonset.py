"""The shipped DaemonSet, run by a real kubelet: the image `make image` builds, the
manifest's own security context, capabilities, seccomp profile, probes and mounts.

`kubectl apply -k deploy/base` on a control plane whose daemonset controller runs;
the kubelet of tests/cluster/node.py pulls nothing (the image is imported into its
containerd) and starts podnetmon with exactly what deploy/ says. The daemon reaches the
API the in-cluster way, through the "kubernetes" Service (a DNAT rule stands in for
kube-proxy). Its counts are checked against the veths of real pods beside it.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor import cleanup
from monitor.settings import Settings
from tests.cluster import fixtures
from tests.cluster.controlplane import ISSUER, ROOT, ControlPlane
from tests.cluster.node import KubeletNode, RealPod, remove_empty_dirs, started_node
from tests.kernel.support import (
    ON_ONE_HOOK,
    Metrics,
    assert_pings_counted_exactly,
    https_get,
    in_pod,
    our_programs,
    parse_metrics,
    pod_info,
    wait_for,
)
from tests.pki import leaf, new_ca

# Where Prometheus scrapes (the node's port 9655) and the name its tlsConfig verifies
SERVER_NAME = "podnetmon.podnetmon.svc"
# host paths the DaemonSet mounts with DirectoryOrCreate: the kubelet makes the missing
# ones, the test removes what it made
CREATED_BY_MOUNTS = ("/run/netns", "/run/containerd/io.containerd.runtime.v2.task/k8s.io",
                     "/run/containers/storage/overlay-containers",
                     "/var/lib/containers/storage/overlay-containers",
                     "/var/lib/podnetmon/captures")


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    # the daemonset controller makes the DaemonSet's pod and the scheduler binds it; the
    # only node is the kubelet's
    yield from fixtures.start(controllers=fixtures.CONTROLLERS.replace(
        ",-daemonset-controller", ""), scheduler=True)


def _first_missing(path: str) -> Path | None:
    p = Path(path)
    top = None
    while not p.exists():
        top, p = p, p.parent
    return top


@pytest.fixture(scope="module")
def node(cluster: ControlPlane) -> Iterator[KubeletNode]:
    archive = fixtures.built_image()
    made = [t for t in map(_first_missing, CREATED_BY_MOUNTS) if t is not None]
    node = started_node(cluster)
    try:
        node.import_image(archive)
        node.proxy_kubernetes_service()
        node.share_host_mounts(_host_to_container_paths())
        yield node
    finally:
        cluster.kubectl("delete", "-k", str(ROOT / "deploy" / "base"), "--wait=true",
                        "--timeout=90s", check=False)
        node.stop()
        # the DaemonSet leaves its programs attached on SIGTERM (PODNETMON_LEAVE_ATTACHED,
        # for upgrades); a node it leaves for good is cleaned as `podnetmon cleanup` does
        cleanup.cleanup("/sys/fs/bpf", Settings.tc_priority, Settings.tc_handle)
        for top in made:
            remove_empty_dirs(top)


@pytest.fixture(scope="module")
def tls_secret(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The podnetmon-tls Secret the DaemonSet serves from, made as the README says
    (`kubectl create secret generic --type kubernetes.io/tls`); returns its CA."""
    d = tmp_path_factory.mktemp("daemon-tls")
    ca = new_ca(d, "ca", "podnetmon-ca")
    pair = leaf(d, ca, "tls", "/CN=podnetmon", usage="serverAuth",
                sans=f"DNS:{SERVER_NAME},IP:127.0.0.1")
    cluster.kubectl("create", "namespace", fixtures.DAEMON_NAMESPACE, check=False)
    cluster.kubectl("create", "secret", "generic", "podnetmon-tls", "-n",
                    fixtures.DAEMON_NAMESPACE, "--type", "kubernetes.io/tls",
                    f"--from-file=tls.crt={pair.cert}", f"--from-file=tls.key={pair.key}",
                    f"--from-file=ca.crt={ca.cert}")
    return ca.cert


class DaemonSetPod:
    """The DaemonSet's daemon, scraped as Prometheus would: the node's port 9655 over TLS,
    verified against the Secret's CA under the Service's name."""

    ca: Path

    def scrape(self) -> Metrics:
        status, body = https_get("127.0.0.1", 9655, "/metrics", self.ca, SERVER_NAME)
        assert status == 200, body
        return Metrics(parse_metrics(body.decode()))


def _host_to_container_paths() -> list[str]:
    """The host paths of the DaemonSet's HostToContainer volumes, read from deploy/."""
    ds = yaml.safe_load((ROOT / "deploy" / "base" / "daemonset.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return [volumes[m["name"]]["hostPath"]["path"]
            for c in spec["containers"] for m in c["volumeMounts"]
            if m.get("mountPropagation") == "HostToContainer"]


def _scrape() -> Metrics:
    return DaemonSetPod().scrape()


def _daemon_pod(cluster: ControlPlane) -> dict[str, Any]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", fixtures.DAEMON_NAMESPACE, "-o",
                                      "json").stdout)["items"]
    assert len(pods) <= 1, [p["metadata"]["name"] for p in pods]
    return dict(pods[0]) if pods else {}


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def test_shipped_daemonset_runs_under_kubelet_and_counts_exactly(
        cluster: ControlPlane, node: KubeletNode, tls_secret: Path) -> None:
    DaemonSetPod.ca = tls_secret
    web = node.run_pod("web-0", "default", labels={"app": "web"})
    cluster.kubectl("apply", "-k", str(ROOT / "deploy" / "base"))
    try:
        wait_for(lambda: _ready(_daemon_pod(cluster)), timeout=240, interval=1)
    except AssertionError:
        pod = _daemon_pod(cluster)
        logs = cluster.kubectl("logs", "-n", fixtures.DAEMON_NAMESPACE,
                               pod.get("metadata", {}).get("name", "none"), check=False)
        raise AssertionError(f"the DaemonSet's pod never became Ready:\n"
                             f"{json.dumps(pod.get('status'), indent=1)[-3000:]}\n"
                             f"{logs.stdout[-3000:]}{logs.stderr[-1000:]}\n"
                             f"{node.logs('kubelet')[-2000:]}") from None
    daemon_pod = _daemon_pod(cluster)
    # the kubelet ran what the manifest says, not something looser
    container = daemon_pod["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    status = daemon_pod["status"]["containerStatuses"][0]
    assert status["image"] == container["image"] == "ghcr.io/podnetmon/podnetmon:0.1.0"
    assert status["restartCount"] == 0

    db = node.run_pod("db-0", "default", labels={"app": "db"})  # after the daemon started
    wait_for(lambda: {("default", "web-0"), ("default", "db-0")} <= set(pod_info(_scrape())),
             timeout=60, interval=0.5)
    info = pod_info(_scrape())
    assert info[("default", "web-0")]["uid"] == web.uid
    assert info[("default", "db-0")]["uid"] == db.uid
    # the daemon's own pod is host-network: nothing of its own to count
    assert ("podnetmon", daemon_pod["metadata"]["name"]) not in info

    assert_pings_counted_exactly(DaemonSetPod(), web, db, 23)
    # TLS only: the port speaks no cleartext, and a name the certificate lacks fails
    with pytest.raises(OSError):
        urllib.request.urlopen("http://127.0.0.1:9655/metrics", timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get("127.0.0.1", 9655, "/metrics", tls_secret, "podnetmon.example.com")

    try:
        _trace_with_a_token(cluster, web, db, tls_secret)
    except (AssertionError, KeyError) as exc:
        raise AssertionError(f"{exc!r}\nthe daemon's log:\n{_container_log(node, daemon_pod)}"
                             ) from exc
    _stopped_pod_leaves_only_what_it_documents(cluster, node, daemon_pod, [web, db])


# The README's RBAC for a person who may trace a namespace's pods (a Role, there)
ONCALL_RBAC = [
    {"apiVersion": "v1", "kind": "ServiceAccount",
     "metadata": {"name": "oncall", "namespace": "default"}},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
     "metadata": {"name": "podnetmon-tracer", "namespace": "default"},
     "rules": [{"apiGroups": [""], "resources": ["pods/capture", "pods/drops"],
                "verbs": ["get"]}]},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
     "metadata": {"name": "oncall-traces", "namespace": "default"},
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                 "name": "podnetmon-tracer"},
     "subjects": [{"kind": "ServiceAccount", "name": "oncall", "namespace": "default"}]}]


def _trace_with_a_token(cluster: ControlPlane, web: RealPod, db: RealPod, ca: Path) -> None:
    """A pcapng trace of a kubelet pod, from the DaemonSet's daemon over TLS, for a token
    meant for podnetmon (the real TokenReview and SubjectAccessReview decide), holding
    exactly the pings sent meanwhile; refused without a token and for another audience."""
    cluster.apply(ONCALL_RBAC)
    path = "/api/v1/namespaces/default/pods/web-0/capture?duration=4s&filter=icmp"
    status, body = https_get("127.0.0.1", 9655, path, ca, SERVER_NAME)
    assert status == 401, body
    status, body = https_get("127.0.0.1", 9655, path, ca, SERVER_NAME,
                             token=cluster.create_token("default", "oncall", ISSUER))
    assert status == 401, body  # a token for the API server is not one for podnetmon
    token = cluster.create_token("default", "oncall", "podnetmon")
    result: dict[str, tuple[int, bytes]] = {}
    reader = threading.Thread(target=lambda: result.update(trace=https_get(
        "127.0.0.1", 9655, path, ca, SERVER_NAME, timeout=30, token=token)))
    reader.start()
    time.sleep(1.0)  # the trace is on once the request is in; the pings come well after
    ping = in_pod(db, "ping", "-c", "10", "-i", "0.1", "-q", web.ip)
    assert " 10 received" in ping.stdout, ping.stdout
    reader.join(timeout=40)
    status, pcap = result["trace"]
    assert status == 200, pcap[-500:]
    with tempfile.NamedTemporaryFile(suffix=".pcapng") as f:
        f.write(pcap)
        f.flush()
        icmp = subprocess.run(["tshark", "-r", f.name, "-T", "fields", "-e", "icmp.type",
                               "-e", "ip.src", "-e", "ip.dst", "-Y", "icmp"],
                              capture_output=True, text=True, check=True).stdout.split("\n")
    seen = sorted(line for line in icmp if line)
    assert seen == sorted([f"8\t{db.ip}\t{web.ip}"] * 10 + [f"0\t{web.ip}\t{db.ip}"] * 10), seen


def _container_log(node: KubeletNode, pod: dict[str, Any]) -> str:
    """The daemon's own log, read where the kubelet writes it (`kubectl logs` would need
    the API server to reach the kubelet's port, which this node does not serve)."""
    meta = pod["metadata"]
    d = node.dir / "pod-logs" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
    return "".join(p.read_text(errors="replace") for p in sorted(d.rglob("*.log")))[-6000:]


def _podnetmon_processes() -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # the image's entry point: its venv's python running /opt/podnetmon/bin/podnetmon
        if proc.name.isdigit() and "/opt/podnetmon/bin/podnetmon run" in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _stopped_pod_leaves_only_what_it_documents(cluster: ControlPlane, node: KubeletNode,
                                               daemon_pod: dict[str, Any],
                                               pods: list[RealPod]) -> None:
    """The DaemonSet deleted: its process and mounts go; what it leaves is what
    PODNETMON_LEAVE_ATTACHED documents (its programs on the pods' veths, counting into
    pinned maps, for the next daemon), and `podnetmon cleanup` removes all of that."""
    assert _podnetmon_processes(), "the daemon's process is not where the test looks"
    uid = daemon_pod["metadata"]["uid"]
    cluster.kubectl("delete", "daemonset", "podnetmon", "-n", fixtures.DAEMON_NAMESPACE,
                    "--wait=true", "--timeout=90s")
    wait_for(lambda: not _daemon_pod(cluster), timeout=90, interval=0.5)
    wait_for(lambda: not _podnetmon_processes(), timeout=30, interval=0.2)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert uid not in mounts, [m for m in mounts.splitlines() if uid in m]
    for pod in pods:  # left attached on purpose (the next daemon adopts them) ...
        assert set(our_programs(pod.host_veth)) in ON_ONE_HOOK, pod.name
    assert any(Path("/sys/fs/bpf/podnetmon").rglob("*"))
    removed = cleanup.cleanup("/sys/fs/bpf", Settings.tc_priority, Settings.tc_handle)
    assert removed
    for pod in pods:  # ... and gone with `podnetmon cleanup`
        assert our_programs(pod.host_veth) == {}, pod.name
    assert not Path("/sys/fs/bpf/podnetmon").exists() or \
        not any(Path("/sys/fs/bpf/podnetmon").rglob("*"))
