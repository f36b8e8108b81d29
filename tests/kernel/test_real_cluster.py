"""The daemon under a real control plane: kube-apiserver, etcd, kube-controller-manager.

Built from the published modules by tests/cluster/build.sh and started on
loopback by tests/cluster/controlplane.py. Nothing about the API is assumed:
pods, owners and tokens are made through the real API, names are read back
from the daemon's metrics, access is judged by the real RBAC authorizer, and
what the daemon asked of the API is read from the API server's audit log.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor import alertrules, dashboards
from podnetlab.lab import Lab
from tests.cluster import fixtures, operator
from tests.cluster.controlplane import ISSUER, ROOT, ControlPlane
from tests.kernel import traffic
from tests.kernel.support import Daemon, assert_pings_counted_exactly, pod_info, wait_for
from tests.kernel.test_alerts_e2e import query, substitute
from tests.pki import leaf, new_ca

NODE = "node-1"
OPERATOR_DIR = ROOT / "deploy" / "prometheus-operator"
WORKLOAD_LABELS = {"app": "web", "pod-template-hash": "5d8f7c9b4"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ControlPlane]:
    yield from fixtures.start()



def _token_review(cp: ControlPlane, token: str, audiences: list[str]) -> dict[str, Any]:
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": token, "audiences": audiences}}
    out = cp.kubectl("create", "-f", "-", "-o", "json", stdin=json.dumps(review))
    return dict(json.loads(out.stdout)["status"])


def test_tokenreview_honours_audiences(cluster: ControlPlane) -> None:
    token = cluster.create_token(fixtures.DAEMON_NAMESPACE, fixtures.DAEMON_SA, "podnetmon")
    ok = _token_review(cluster, token, ["podnetmon"])
    assert ok["authenticated"] is True
    assert ok["audiences"] == ["podnetmon"]
    assert ok["user"]["username"] == fixtures.DAEMON_USER
    other = _token_review(cluster, token, ["some-other-service"])
    assert other.get("authenticated") is not True
    assert "audience" in other.get("error", ""), other
    # a token minted for the API server is no token for podnetmon either
    api_token = cluster.create_token(fixtures.DAEMON_NAMESPACE, fixtures.DAEMON_SA,
                                     ISSUER)
    assert _token_review(cluster, api_token, ["podnetmon"]).get("authenticated") is not True


def _can_i(cp: ControlPlane, kubeconfig: Path, verb: str, resource: str,
           subresource: str = "") -> bool:
    extra = [f"--subresource={subresource}"] if subresource else []
    out = cp.kubectl("auth", "can-i", verb, resource, "--all-namespaces", *extra, check=False,
                     kubeconfig=kubeconfig)
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), out.stderr
    return answer == "yes"


def test_shipped_rbac_grants_exactly_what_the_daemon_uses(
        cluster: ControlPlane, tmp_path: Path) -> None:
    kubeconfig = fixtures.daemon_kubeconfig(cluster, tmp_path / "daemon.kubeconfig")
    granted = {("list", "pods"), ("watch", "pods"), ("list", "services"), ("watch", "services"),
               ("create", "tokenreviews.authentication.k8s.io"),
               ("create", "subjectaccessreviews.authorization.k8s.io")}
    asked = {(verb, res) for verb in ("get", "list", "watch", "create", "update", "patch",
                                      "delete", "deletecollection")
             for res in ("pods", "secrets", "nodes", "services",
                         "endpointslices.discovery.k8s.io", "configmaps",
                         "tokenreviews.authentication.k8s.io",
                         "subjectaccessreviews.authorization.k8s.io")}
    allowed = {(v, r) for v, r in sorted(asked | granted) if _can_i(cluster, kubeconfig, v, r)}
    assert allowed == granted
    for verb, subresource in (("update", "status"), ("create", "exec"), ("get", "log"),
                              ("create", "eviction")):
        assert not _can_i(cluster, kubeconfig, verb, "pods", subresource), (verb, subresource)
    # and a real request outside the role is refused by the real authorizer
    out = cluster.kubectl("get", "secrets", "-A", check=False, kubeconfig=kubeconfig)
    assert out.returncode != 0 and "Forbidden" in out.stderr, out.stderr


def test_deploy_passes_server_side_dry_run(cluster: ControlPlane) -> None:
    out = cluster.kubectl("apply", "-k", str(ROOT / "deploy" / "base"), "--dry-run=server")
    assert "daemonset.apps/podnetmon" in out.stdout, out.stdout


def _etcdctl(cp: ControlPlane, *args: str) -> str:
    return subprocess.run(["etcdctl", f"--endpoints=http://127.0.0.1:{cp.etcd_port}", *args],
                          capture_output=True, text=True, check=True, timeout=30,
                          env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}).stdout


def test_names_from_the_real_api_through_expiry_and_outage(
        cluster: ControlPlane, lab: Lab, daemons: list[Daemon], tmp_path: Path) -> None:
    fixtures.add_node(cluster, NODE)
    cluster.kubectl("create", "namespace", "shop", check=False)
    rs = fixtures.add_owner(cluster, "ReplicaSet", "web-5d8f7c9b4", "shop", WORKLOAD_LABELS)
    sts = fixtures.add_owner(cluster, "StatefulSet", "db", "shop", {"app": "db"})
    web0 = fixtures.add_pod(cluster, "web-5d8f7c9b4-x2x2x", "shop", NODE,
                            labels={**WORKLOAD_LABELS, "team": "a"}, owner=rs)
    db0 = fixtures.add_pod(cluster, "db-0", "shop", NODE, labels={"app": "db"}, owner=sts)
    elsewhere = fixtures.add_pod(cluster, "elsewhere-0", "shop", "node-2")
    # lab pods whose cgroups carry the UIDs the API server gave
    pods = [lab.add(style=style, uid=p["metadata"]["uid"])
            for style, p in (("docker", web0), ("containerd", db0), ("docker", elsewhere))]
    web, db, stranger = pods
    for api_pod, lab_pod in ((web0, web), (db0, db)):
        fixtures.add_pod(cluster, api_pod["metadata"]["name"], "shop", NODE,
                         labels=api_pod["metadata"]["labels"],
                         owner=rs if lab_pod is web else sts, ip=lab_pod.ip)
    kubeconfig = fixtures.daemon_kubeconfig(cluster, tmp_path / "daemon.kubeconfig")
    mark = cluster.audit_mark()  # the other tests' requests with this identity came before
    daemon = Daemon("--metadata", "kubernetes", "--kubeconfig", str(kubeconfig),
                    "--node-name", NODE, "--runtime-dirs", str(lab.runtime_dir),
                    "--pod-labels", "app,team")
    daemons.append(daemon)

    named = {("shop", "web-5d8f7c9b4-x2x2x"), ("shop", "db-0")}
    fallback = ("_unknown", f"netns-{stranger.netns}")  # its API pod is on another node
    wait_for(lambda: set(pod_info(daemon.scrape())) == named | {fallback}, timeout=15)
    info = pod_info(daemon.scrape())
    assert info[("shop", "web-5d8f7c9b4-x2x2x")]["workload"] == "web"
    assert info[("shop", "web-5d8f7c9b4-x2x2x")]["workload_kind"] == "Deployment"
    assert info[("shop", "db-0")]["workload_kind"] == "StatefulSet"
    assert info[("shop", "web-5d8f7c9b4-x2x2x")]["uid"] == web0["metadata"]["uid"]

    # counted exactly, under the API's names
    assert_pings_counted_exactly(daemon, web, db, 13, names=("web-5d8f7c9b4-x2x2x", "db-0"))

    # the API goes away: every series stays as it was, none invented
    series_before = {k for k in daemon.scrape().samples if k[0] == "podnet_pod_info"}
    cluster.kill_apiserver()
    time.sleep(2)
    assert {k for k in daemon.scrape().samples if k[0] == "podnet_pod_info"} == series_before
    # ... and its history is compacted meanwhile, so the daemon's resourceVersion expires
    for i in range(5):
        _etcdctl(cluster, "put", f"/podnetmon-test/bump-{i}", "x")
    status = json.loads(_etcdctl(cluster, "endpoint", "status", "-w", "json"))
    revision = status[0]["Status"]["header"]["revision"]
    _etcdctl(cluster, "compact", str(revision))
    cluster.restart_apiserver()
    # a change the daemon can only see by listing again
    late = fixtures.add_pod(cluster, "web-5d8f7c9b4-late1", "shop", NODE,
                            labels=WORKLOAD_LABELS, owner=rs)
    late_pod = lab.add(style="containerd", uid=late["metadata"]["uid"])
    wait_for(lambda: ("shop", "web-5d8f7c9b4-late1") in pod_info(daemon.scrape()), timeout=60)
    # no kubelet confirms a graceful deletion here: delete at once, as a kubelet would end it
    cluster.kubectl("delete", "pod", "db-0", "-n", "shop", "--grace-period=0", "--force")
    lab.remove(db.name)
    wait_for(lambda: ("shop", "db-0") not in pod_info(daemon.scrape()), timeout=60)
    assert set(pod_info(daemon.scrape())) == {("shop", "web-5d8f7c9b4-x2x2x"),
                                             ("shop", "web-5d8f7c9b4-late1"), fallback}
    events = [str(e.get("event")) for e in daemon.log_events()]
    assert "watch expired, listing again" in events, events[-30:]
    assert late_pod.uid == late["metadata"]["uid"]

    # what the daemon asked of the API, as the API server audited it: a list+watch of this
    # node's pods (names), and of every pod and Service (peers' names, in pages); nothing
    # else, and nothing per pod. The shipped ClusterRole grants no more than that.
    events = cluster.audit_events(fixtures.DAEMON_USER, mark)
    used = {(e["verb"], (e.get("objectRef") or {}).get("resource", "")) for e in events}
    assert used == {("list", "pods"), ("watch", "pods"), ("list", "services"),
                    ("watch", "services")}, used
    scoped = "fieldSelector=spec.nodeName%3D" + NODE
    pods = [e["requestURI"] for e in events if e["objectRef"]["resource"] == "pods"]
    assert any(scoped in uri for uri in pods), pods  # this node's, for names
    assert all(scoped in uri or "limit=500" in uri or "watch=true" in uri for uri in pods), pods
    assert not any((e.get("objectRef") or {}).get("name") for e in events), "a per-object call"


def _daemon_pod(cluster: ControlPlane, daemon: Daemon, ip: str) -> dict[str, Any]:
    """The daemon's pod as the DaemonSet's template makes it, its IP the daemon's listener."""
    ds = yaml.safe_load((ROOT / "deploy" / "base" / "daemonset.yaml").read_text())
    template = ds["spec"]["template"]
    container = template["spec"]["containers"][0]
    ports = [{**p, "containerPort": daemon.port} for p in container["ports"]]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "podnetmon-q7x9k", "namespace": fixtures.DAEMON_NAMESPACE,
                        "labels": template["metadata"]["labels"]},
           "spec": {"nodeName": NODE, "serviceAccountName": fixtures.DAEMON_SA,
                    "containers": [{"name": container["name"], "image": container["image"],
                                    "ports": ports}]}}
    cluster.apply(pod)
    fixtures.set_running(cluster, "podnetmon-q7x9k", fixtures.DAEMON_NAMESPACE, ip)
    return pod


def _node_ip() -> str:
    """This machine's own address: the daemon pod's IP (an Endpoints address, as the
    ServiceMonitor's discovery reads it, may not be a loopback one)."""
    out = subprocess.run(["ip", "-4", "-o", "route", "get", "192.0.2.200"], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[out.index("src") + 1]


def _relaxed_alerts() -> Iterator[tuple[str, str]]:
    """Each alert's expression with its thresholds so low that it holds wherever its series
    have data: what "every alert expression returns data" asks of a Prometheus."""
    for alert in alertrules.ALERTS:
        threshold = 1.0 if "== {threshold" in alert.expr else -1.0  # up == 1: the daemon is up
        yield alert.name, alertrules.rule(replace(alert, threshold=threshold, min_rate=-1.0),
                                        "podnetmon")["expr"]


MONITORS = {
    # how each shipped way of scraping becomes a Prometheus configuration
    "podmonitor": (OPERATOR_DIR / "podmonitor.yaml", "podMonitor/podnetmon/podnetmon/0"),
    "servicemonitor": (OPERATOR_DIR / "servicemonitor" / "servicemonitor.yaml",
                       "serviceMonitor/podnetmon/podnetmon/0"),
    "plain": (ROOT / "prometheus" / "scrape-config.yaml", ""),
}


@pytest.mark.parametrize("monitor", sorted(MONITORS))
def test_each_shipped_scrape_config_keeps_the_pods_labels(
        monitor: str, cluster: ControlPlane, lab: Lab, daemons: list[Daemon],
        tmp_path: Path) -> None:
    """The real operator's configuration from each shipped monitor (and the plain example
    as is): per-pod series keep the lab pods' names, every dashboard query and every alert
    expression returns data, and the shipped PrometheusRule's recording rules evaluate."""
    bin_dir = fixtures.built_binaries()
    monitor_file, job_key = MONITORS[monitor]
    op = operator.Operator(cluster, bin_dir) if job_key else None
    prom = None
    ip = _node_ip()
    try:
        fixtures.add_node(cluster, NODE)
        cluster.kubectl("create", "namespace", "monitoring", check=False)
        cluster.apply(operator.prometheus_rbac("monitoring"))
        client, server = lab.up(2)
        # the daemon serves TLS as the DaemonSet does, from the Secret the monitor names
        ca = new_ca(tmp_path, "ca", "podnetmon-ca")
        pair = leaf(tmp_path, ca, "tls", "/CN=podnetmon", usage="serverAuth",
                    sans="DNS:podnetmon.podnetmon.svc,IP:127.0.0.1")
        cluster.kubectl("create", "namespace", fixtures.DAEMON_NAMESPACE, check=False)
        cluster.kubectl("create", "secret", "generic", "podnetmon-tls", "-n",
                        fixtures.DAEMON_NAMESPACE, "--type", "kubernetes.io/tls",
                        f"--from-file=tls.crt={pair.cert}", f"--from-file=tls.key={pair.key}",
                        f"--from-file=ca.crt={ca.cert}")
        daemon = Daemon("--tls-cert-file", str(pair.cert), "--tls-key-file", str(pair.key),
                        "--bpf-stats", "true", inventory=str(lab.inventory), ca=ca.cert,
                        listen_host="0.0.0.0")
        daemons.append(daemon)
        _daemon_pod(cluster, daemon, ip)
        cluster.apply(yaml.safe_load((ROOT / "deploy" / "base" / "service.yaml").read_text()))
        token = cluster.create_token("monitoring", "prometheus", ISSUER)
        if op is not None:
            cluster.kubectl("apply", "-f", str(monitor_file))
            cluster.kubectl("apply", "-f", str(OPERATOR_DIR / "prometheusrule.yaml"))
            cluster.apply(operator.prometheus_resource("k8s", "monitoring"))
            config = op.generated_config("monitoring", "k8s", must_contain=job_key)
            assert "server_name: podnetmon.podnetmon.svc" in config
            rules = operator.rule_files(cluster, "monitoring", "k8s",
                                        must_contain="namespace_workload:podnet_bytes:rate5m")
            prom, port = operator.run_prometheus(
                cluster, bin_dir / "prometheus", config, tmp_path / "prometheus", token,
                assets=operator.tls_assets(cluster, "monitoring", "k8s"), rules=rules)
        else:
            # the plain example as a user merges it, with the shipped rule file and a
            # faster interval than a production one
            config = ("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      f"rule_files: [{ROOT / 'prometheus' / 'podnet-rules.yaml'}]\n"
                      + monitor_file.read_text())
            prom, port = operator.run_prometheus(
                cluster, bin_dir / "prometheus", config, tmp_path / "prometheus", token,
                paths={"/etc/prometheus/podnetmon/ca.crt": ca.cert})
        print(f"the {monitor} configuration:\n" + config)
        address = f"127.0.0.1:{port}"
        log = tmp_path / "prometheus" / "prometheus.log"

        def results(expr: str) -> list[dict[str, Any]]:
            if prom is not None and prom.poll() is not None:
                raise AssertionError(log.read_text())
            try:
                return query(address, expr)  # type: ignore[return-value]
            except OSError:
                return []

        with traffic.every_kind(client, server):
            try:
                wait_for(lambda: results('up{job="podnetmon"} == 1'), timeout=60, interval=0.5)
            except AssertionError:
                raise AssertionError("the daemon was never scraped:\n" + log.read_text()) from None
            # per-pod series name the lab pods, never the daemon pod
            wait_for(lambda: results('podnet_packets_total{protocol="icmp"}'), timeout=30,
                     interval=0.5)
            series = results("podnet_packets_total")
            got = {(s["metric"].get("namespace"), s["metric"].get("pod"), s["metric"].get("job"))
                   for s in series}
            assert {("lab", client.name, "podnetmon"), ("lab", server.name, "podnetmon")} <= got
            assert not [s for s in series if "exported_pod" in s["metric"]
                        or s["metric"].get("pod") == "podnetmon-q7x9k"], series
            # the daemon's own series carry the daemon pod's names and its instance
            own = results("podnet_monitor_attached_pods")
            assert [(s["metric"].get("namespace"), s["metric"].get("pod")) for s in own] == [
                ("podnetmon", "podnetmon-q7x9k")], own
            assert own[0]["metric"]["instance"] == f"{ip}:{daemon.port}", own
            # every dashboard panel, every alert expression, every recording rule has data
            wanted = [(f"{d.uid}: {title}", substitute(expr, ".*"))
                      for d in dashboards.DASHBOARDS for title, expr in dashboards.expressions(d)]
            wanted += [(f"alert {name}", expr) for name, expr in _relaxed_alerts()]
            wanted += [(f"record {level}:{r.metric}",
                        f'{level}:{r.metric}:rate5m{{namespace="lab"}}')
                       for r in alertrules.RECORDINGS for level in ("namespace_workload", "namespace")]
            empty: list[str] = []

            def all_have_data() -> bool:
                empty[:] = [name for name, expr in wanted if not results(expr)]
                return not empty
            try:
                wait_for(all_have_data, timeout=60, interval=1)
            except AssertionError:
                raise AssertionError(f"no data for {empty}") from None
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=20)
        if op is not None:
            op.stop()
        for kind, name in (("secret", "podnetmon-tls"), ("service", "podnetmon"),
                           ("pod", "podnetmon-q7x9k")):
            cluster.kubectl("delete", kind, name, "-n", fixtures.DAEMON_NAMESPACE,
                            "--grace-period=0", "--force", check=False)
        for kind in ("podmonitor", "servicemonitor", "prometheusrule"):
            cluster.kubectl("delete", kind, "podnetmon", "-n", fixtures.DAEMON_NAMESPACE,
                            check=False)
        cluster.kubectl("delete", "prometheus", "k8s", "-n", "monitoring", check=False)


def _get_with_token(daemon: Daemon, path: str, token: str) -> tuple[int, str]:
    request = urllib.request.Request(daemon.base + path,
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_auth_takes_only_tokens_meant_for_podnetmon(
        cluster: ControlPlane, daemons: list[Daemon], tmp_path: Path) -> None:
    """--auth kubernetes against the real TokenReview and SubjectAccessReview APIs."""
    cluster.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "oncall", "namespace": "default"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "podnetmon-captures-reader"},
         "rules": [{"apiGroups": [""], "resources": ["pods/captures"], "verbs": ["list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "oncall-reads-captures"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "podnetmon-captures-reader"},
         "subjects": [{"kind": "ServiceAccount", "name": "oncall", "namespace": "default"}]}])
    kubeconfig = fixtures.daemon_kubeconfig(cluster, tmp_path / "daemon.kubeconfig")
    mark = cluster.audit_mark()
    daemon = Daemon("--metadata", "kubernetes", "--kubeconfig", str(kubeconfig),
                    "--node-name", NODE, "--auth", "kubernetes",
                    "--capture-dir", str(tmp_path / "captures"))
    daemons.append(daemon)

    def ask(audience: str, sa: str = "oncall", namespace: str = "default") -> tuple[int, str]:
        token = cluster.create_token(namespace, sa, audience)
        return _get_with_token(daemon, "/api/v1/captures", token)

    status, body = ask("podnetmon")
    assert status == 200, body
    # the same account's tokens for the API server and for another service: not ours
    for audience in (ISSUER, "some-other-service"):
        status, body = ask(audience)
        assert status == 401, (audience, body)
    # a token meant for podnetmon, of an account RBAC grants nothing: authenticated, refused
    status, body = ask("podnetmon", fixtures.DAEMON_SA, fixtures.DAEMON_NAMESPACE)
    assert status == 403, body
    assert fixtures.DAEMON_USER in body

    # Everything this daemon can ask of the API, it asked here (names, and both reviews):
    # the ClusterRole grants exactly what the audit log shows it used, no more, no less.
    used = {(e["objectRef"].get("apiGroup", ""), e["objectRef"]["resource"], e["verb"])
            for e in cluster.audit_events(fixtures.DAEMON_USER, mark)}
    role = yaml.safe_load((ROOT / "deploy" / "base" / "clusterrole.yaml").read_text())
    granted = {(group, resource, verb) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]
               for verb in rule["verbs"]}
    assert used == granted, (used, granted)
