"""A real node for the control plane: kubelet with containerd, runc and the bridge CNI plugin.

kubelet is the release's own (tests/cluster/build.sh builds it); containerd, runc and
the CNI plugins are Debian's. The pause image is ours: tests/cluster/pause.c, linked
statically and packed into an OCI image with umoci, imported with ctr. Pods made
through the API with `spec.nodeName` are run by this kubelet for real: a pause
sandbox in a network namespace containerd pins under /var/run/netns/cni-*, a veth
to the bridge, an IP from host-local IPAM, cgroups under the kubelet's cgroupfs
tree (so the pause process's cgroup names the pod UID, as on any node).

Everything it makes is its own and goes at `stop()`: containerd's root, state and
sockets, runc's state, the IPAM store and the pod logs live in one directory; the
cgroup root (`podnetmon-test` in every hierarchy), the bridge, the netns files of
its sandboxes, the kubelet's /var/log/containers links and libcni's result cache
entries are removed by name. kubelet rewrites a few kernel sysctls at start
(vm.overcommit_memory, kernel.panic, kernel.panic_on_oops): they are put back as
they were once the node is up, and again at stop.

This sandbox withholds CAP_SYS_RESOURCE, so no process may lower its own
oom_score_adj: runc cannot give the pause container kubelet's -998 and fails with
"can't get final child's PID from pipe". containerd's `restrict_oom_score_adj`
(meant for rootless nodes) clamps the scores to containerd's own; nothing about
networking depends on them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import fixtures, pki
from tests.cluster.controlplane import ROOT, ControlPlane, free_port, spawn, terminate

PAUSE_SOURCE = ROOT / "tests" / "cluster" / "pause.c"
PAUSE_IMAGE = "localhost/podnetmon/pause:1"
CGROUP_ROOT = "podnetmon-test"
CGROUP_FS = Path("/sys/fs/cgroup")
BRIDGE = "pnm-cni0"
CNI_NETWORK = "podnetmon-test"
CNI_BIN = Path("/usr/lib/cni")
POD_SUBNET = "10.250.0.0/24"
NETNS_DIR = Path("/var/run/netns")
CONTAINER_LOGS = Path("/var/log/containers")
CNI_CACHE = Path("/var/lib/cni/results")
RUN_CONTAINERD = Path("/run/containerd")
SHIM_SOCKETS = RUN_CONTAINERD / "s"  # containerd 1.6 puts its shims' sockets here, always
NFT_TABLE = "podnetmon_test_kubeproxy"
# What kubelet's container manager sets at start when protectKernelDefaults is off.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic",
                   "kernel/panic_on_oops", "kernel/keys/root_maxkeys",
                   "kernel/keys/root_maxbytes")
# mount, umount and nsenter are in /usr/bin; iptables (/usr/sbin) is left out on purpose
KUBELET_PATH = "/usr/local/bin:/usr/bin:/bin"
NEEDED = ("containerd", "ctr", "runc", "umoci", "gcc", "nsenter")
READY_TIMEOUT = 120.0


class NodeUnavailableError(RuntimeError):
    """A part a real node needs is missing here (the tests skip, saying which)."""


@dataclass(frozen=True)
class RealPod:
    """A pod the kubelet runs: what a test needs to send traffic from it and to check it."""

    name: str
    namespace: str
    uid: str
    ip: str
    pause_pid: int
    host_veth: str

    def exec_prefix(self) -> list[str]:
        """Run a host tool inside the pod's network namespace (as `kubectl debug` would)."""
        return ["nsenter", "-t", str(self.pause_pid), "-n"]


def missing_parts() -> list[str]:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if not (CNI_BIN / "bridge").exists():
        missing.append(str(CNI_BIN / "bridge"))
    return missing


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name


def _pause_pids() -> dict[int, str]:
    """Every process named pause, with its /proc/PID/cgroup text."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "pause":
                out[int(entry.name)] = (entry / "cgroup").read_text()
        except OSError:
            continue
    return out


def remove_empty_dirs(top: Path) -> None:
    """`top` and every directory under it, deepest first, that is (then) empty."""
    for d in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()),
                    key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass


def _mount_of(path: Path) -> tuple[str, bool]:
    """The mount point holding `path`, and whether it propagates (shared or slave)."""
    best, propagates = "/", False
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, optional = fields[4], fields[6:fields.index("-")]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best = point
            propagates = any(f.startswith(("shared:", "master:")) for f in optional)
    return best, propagates


class KubeletNode:
    """containerd + kubelet registered as one Node of `cp`, started and stopped by the caller."""

    def __init__(self, cp: ControlPlane, bin_dir: str | Path, name: str = "node-1") -> None:
        self.cp = cp
        self.bin_dir = Path(bin_dir)
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix="podnetmon-node-"))
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._sysctls: dict[str, str] = {}
        self._netns_before: set[str] = set()
        self._cache_before: set[str] = set()
        self._run_containerd_existed = True
        self._nft = False
        self._shared: list[str] = []
        self._shim_sockets_before: set[str] = set()
        self.start_seconds = 0.0

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        missing = missing_parts()
        if missing:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise NodeUnavailableError(f"a real node needs {', '.join(missing)} (make setup)")
        t0 = time.monotonic()
        self._sysctls = {n: _sysctl_path(n).read_text().strip() for n in KUBELET_SYSCTLS}
        self._netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set()
        self._cache_before = set(os.listdir(CNI_CACHE)) if CNI_CACHE.exists() else set()
        self._run_containerd_existed = RUN_CONTAINERD.exists()
        self._shim_sockets_before = (set(os.listdir(SHIM_SOCKETS)) if SHIM_SOCKETS.exists()
                                     else set())
        try:
            self._make_cgroup_root()
            image = self._build_pause_image()
            self._start_containerd()
            self._ctr("images", "import", "--base-name", PAUSE_IMAGE.rsplit(":", 1)[0],
                      str(image))
            self._write_cni_config()
            self._start_kubelet()
            self._wait_node_ready()
            self._restore_sysctls()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Pods ended through the API as a drain would; whatever remains, by force."""
        if "kubelet" in self._procs:
            self.cp.kubectl("delete", "pods", "--all-namespaces", "--field-selector",
                            f"spec.nodeName={self.name}", "--wait=true", "--timeout=90s",
                            check=False)
            self._wait(lambda: not self._runc_ids(), 60)
        for name in ("kubelet", "containerd"):
            self._end(name)
        self._kill_shims()
        self._remove_shim_sockets()
        for cid in self._runc_ids():
            self._runc("kill", cid, "KILL")
            self._runc("delete", "--force", cid)
        # killed containers whose shim is gone are reaped by init, a moment later
        self._wait(lambda: not any(f"/{CGROUP_ROOT}/" in cgroup
                                   for cgroup in _pause_pids().values()), 15)
        self._remove_netns()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        if self._nft:
            subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True,
                           check=False)
        self._remove_log_links()
        self._remove_cni_cache()
        self._remove_cgroup_root()
        self._restore_sysctls()
        self._unmount_under(self.dir)
        for point in self._shared:
            subprocess.run(["mount", "--make-private", point], capture_output=True,
                           check=False)
        if not self._run_containerd_existed:
            # the shims' socket directory, which containerd 1.6 does not let us move
            for d in (RUN_CONTAINERD / "s", RUN_CONTAINERD):
                try:
                    d.rmdir()
                except OSError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    # -- pods ------------------------------------------------------------------------

    def proxy_kubernetes_service(self) -> None:
        """What kube-proxy does for the one Service a DaemonSet pod uses, the API's own.

        In-cluster clients dial KUBERNETES_SERVICE_HOST:PORT (the "kubernetes"
        Service's ClusterIP, 443); with no kube-proxy here, an nft DNAT rule in the host's
        output path sends it to the API server on loopback (its certificate names
        10.96.0.1). The table is ours alone and goes at stop().
        """
        out = self.cp.kubectl("get", "service", "kubernetes", "-n", "default", "-o",
                              "jsonpath={.spec.clusterIP} {.spec.ports[0].port}")
        ip, port = out.stdout.split()
        rules = (f"table ip {NFT_TABLE} {{\n"
                 "  chain output {\n"
                 "    type nat hook output priority -100; policy accept;\n"
                 f"    ip daddr {ip} tcp dport {port} dnat to 127.0.0.1:{self.cp.port}\n"
                 "  }\n}\n")
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True, timeout=30)
        self._nft = True

    def share_host_mounts(self, paths: list[str]) -> None:
        """Make the host mounts holding `paths` shared, as systemd makes every mount at boot.

        A HostToContainer volume needs its host mount shared or slave: containerd
        refuses the container otherwise ("is mounted on / but it is not a shared or
        slave mount"). Every systemd node has them shared; this machine boots without
        systemd and has them private. Only the mounts named are changed (not
        recursively), and stop() makes them private again.
        """
        for path in paths:
            p = Path(path)
            while not p.exists():
                p = p.parent
            point, shared = _mount_of(p)
            if not shared and point not in self._shared:
                subprocess.run(["mount", "--make-shared", point], check=True,
                               capture_output=True, timeout=30)
                self._shared.append(point)

    def import_image(self, archive: str | Path) -> None:
        """An image archive (docker-archive or OCI) into the kubelet's containerd namespace."""
        self._ctr("images", "import", str(archive))


    def run_pod(self, name: str, namespace: str, *, labels: dict[str, str] | None = None,
                owner: dict[str, Any] | None = None, timeout: float = 90) -> RealPod:
        """A pod of the pause image on this node, waited for until Running with an IP."""
        meta: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": dict(labels or {})}
        if owner is not None:
            meta["ownerReferences"] = fixtures.owned_by(owner)
        self.cp.apply({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {
            "nodeName": self.name, "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": PAUSE_IMAGE,
                            "imagePullPolicy": "Never"}]}})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = json.loads(self.cp.kubectl("get", "pod", name, "-n", namespace, "-o",
                                             "json").stdout)
            if pod["status"].get("phase") == "Running" and pod["status"].get("podIP"):
                return self._real_pod(pod)
            time.sleep(0.5)
        raise AssertionError(f"pod {namespace}/{name} not running in {timeout:.0f} s:\n"
                             + self.cp.kubectl("describe", "pod", name, "-n", namespace,
                                               check=False).stdout[-3000:])

    def _real_pod(self, pod: dict[str, Any]) -> RealPod:
        uid = pod["metadata"]["uid"]
        pids = sorted(pid for pid, cgroup in _pause_pids().items() if f"pod{uid}" in cgroup)
        if not pids:
            raise AssertionError(f"no pause process in pod {uid}'s cgroup")
        pid = pids[0]  # the sandbox's, first started
        # the peer's ifindex as netlink reports it inside the pod (sysfs would show the
        # host's own interfaces: /sys stays the mounting namespace's)
        link = json.loads(subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", "-j", "link", "show", "eth0"],
            capture_output=True, text=True, check=True, timeout=10).stdout)[0]
        veth = next(p.name for p in Path("/sys/class/net").iterdir()
                    if (p / "ifindex").read_text().strip() == str(link["link_index"]))
        return RealPod(pod["metadata"]["name"], pod["metadata"]["namespace"], uid,
                       pod["status"]["podIP"], pid, veth)

    # -- the parts -------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self._procs[name] = spawn(self.dir, name, args, env)

    def _end(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            terminate(proc, timeout=20)

    def kill_kubelet(self) -> None:
        """The kubelet dies as in a crash (SIGKILL): its pods run on, nobody drains them."""
        proc = self._procs.pop("kubelet")
        proc.kill()
        proc.wait(timeout=10)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.logs(name)}")

    @staticmethod
    def _wait(predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.5)
        return False

    def _make_cgroup_root(self) -> None:
        """kubelet's cgroupRoot must exist in every hierarchy; cpuset needs its CPUs set."""
        for hierarchy in CGROUP_FS.iterdir():
            if (hierarchy / "cgroup.procs").exists():
                (hierarchy / CGROUP_ROOT).mkdir(exist_ok=True)
        cpuset = CGROUP_FS / "cpuset"
        if (cpuset / "cpuset.cpus").exists():
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (cpuset / CGROUP_ROOT / knob).write_text((cpuset / knob).read_text())

    def _remove_cgroup_root(self) -> None:
        for hierarchy in CGROUP_FS.iterdir():
            top = hierarchy / CGROUP_ROOT
            if not top.is_dir():
                continue
            remove_empty_dirs(top)  # a cgroup directory goes once it has no children

    def _build_pause_image(self) -> Path:
        """Our pause binary in an OCI image (umoci), as an archive `ctr images import` takes."""
        work = self.dir / "pause-image"
        work.mkdir()
        binary = work / "pause"
        subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(PAUSE_SOURCE)],
                       check=True, capture_output=True, timeout=120)
        layout, tag = work / "layout", PAUSE_IMAGE.rsplit(":", 1)[1]
        ref = f"{layout}:{tag}"
        for args in (["init", "--layout", str(layout)], ["new", "--image", ref],
                     ["unpack", "--image", ref, str(work / "bundle")]):
            subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=60)
        shutil.copy2(binary, work / "bundle" / "rootfs" / "pause")
        for args in (["repack", "--image", ref, str(work / "bundle")],
                     ["config", "--image", ref, "--config.entrypoint", "/pause",
                      "--config.user", "65535:65535"],
                     ["gc", "--layout", str(layout)]):
            subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=60)
        archive = work / "pause.tar"
        subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True,
                       capture_output=True, timeout=60)
        return archive

    def _start_containerd(self) -> None:
        d = self.dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{d}/containerd-ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d}/cni"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{shutil.which('runc')}"
        Root = "{d}/runc"
"""
        (d / "containerd.toml").write_text(config)
        self._spawn("containerd", ["containerd", "--config", str(d / "containerd.toml")])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive()
            if self._ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"containerd did not answer in 30 s:\n{self.logs('containerd')}")

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io",
                              *args], capture_output=True, text=True, timeout=300, check=False)
        if check and out.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {out.stderr}")
        return out

    @property
    def _runc_root(self) -> Path:
        """runc's state of our containers: the shim adds containerd's namespace to Root."""
        return self.dir / "runc" / "k8s.io"

    def _runc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runc", "--root", str(self._runc_root), *args],
                              capture_output=True, text=True, timeout=30, check=False)

    def _runc_ids(self) -> list[str]:
        if not self._runc_root.exists():
            return []
        return self._runc("list", "-q").stdout.split()

    def _write_cni_config(self) -> None:
        (self.dir / "cni").mkdir(exist_ok=True)  # containerd may have made it
        (self.dir / "ipam").mkdir()
        conf = {"cniVersion": "0.4.0", "name": CNI_NETWORK, "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "dataDir": str(self.dir / "ipam"),
                      "ranges": [[{"subnet": POD_SUBNET}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"}]}
        (self.dir / "cni" / "10-podnetmon-test.conflist").write_text(json.dumps(conf))

    def _start_kubelet(self) -> None:
        assert self.cp.pki is not None
        ca = self.cp.pki.ca
        cert = pki.leaf(ca.cert.parent, ca, f"kubelet-{self.name}",
                        f"/O=system:nodes/CN=system:node:{self.name}", usage="clientAuth")
        kubeconfig = self.cp.write_cert_kubeconfig(self.dir / "kubelet.kubeconfig", cert,
                                                   f"system:node:{self.name}")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": "127.0.0.1", "port": free_port(), "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(ca.cert)}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
            # this machine's cgroups are v1 (hybrid): kubelet 1.35+ refuses them unless told
            "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podLogsDir": str(self.dir / "pod-logs"), "resolvConf": "",
            "podCIDR": POD_SUBNET,
            # never evict or collect images on this shared machine: the tests' pods are tiny
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "registerNode": True, "localStorageCapacityIsolation": False,
        }
        (self.dir / "kubelet.json").write_text(json.dumps(config, indent=1))
        # No iptables on kubelet's PATH: it would otherwise leave its canary chains and a
        # KUBE-FIREWALL chain in the host's iptables (nothing here needs them: no kube-proxy)
        self._spawn("kubelet", env={**os.environ, "PATH": KUBELET_PATH}, args=[
            str(self.bin_dir / "kubelet"), f"--config={self.dir / 'kubelet.json'}",
            f"--kubeconfig={kubeconfig}", f"--root-dir={self.dir / 'kubelet'}",
            f"--hostname-override={self.name}", "--v=1"])

    def _wait_node_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_alive()
            out = self.cp.kubectl("get", "node", self.name, "-o",
                                  "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                                  check=False)
            if out.stdout.strip() == "True":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.name} not Ready in {READY_TIMEOUT:.0f} s:\n"
                           f"{self.logs('kubelet')}")

    # -- leaving nothing behind ------------------------------------------------------

    def _restore_sysctls(self) -> None:
        for name, value in self._sysctls.items():
            path = _sysctl_path(name)
            if path.read_text().strip() != value:
                path.write_text(value)

    def _kill_shims(self) -> None:
        """containerd's shims outlive containerd; ours name our socket on their command line."""
        needle = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _remove_shim_sockets(self) -> None:
        """A killed shim leaves its socket in /run/containerd/s (one that exits removes it)."""
        if not SHIM_SOCKETS.exists():
            return
        for name in set(os.listdir(SHIM_SOCKETS)) - self._shim_sockets_before:
            path = SHIM_SOCKETS / name
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink(missing_ok=True)

    def _remove_netns(self) -> None:
        """The netns files our sandboxes pinned (CNI DEL removes them on a clean stop)."""
        if not NETNS_DIR.exists():
            return
        for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
            if name.startswith("cni-"):
                path = NETNS_DIR / name
                subprocess.run(["umount", str(path)], capture_output=True, check=False)
                path.unlink(missing_ok=True)

    def _remove_log_links(self) -> None:
        if not CONTAINER_LOGS.exists():
            return
        for link in CONTAINER_LOGS.iterdir():
            if link.is_symlink() and str(self.dir) in os.readlink(link):
                link.unlink()

    def _remove_cni_cache(self) -> None:
        if not CNI_CACHE.exists():
            return
        for name in set(os.listdir(CNI_CACHE)) - self._cache_before:
            if name.startswith(CNI_NETWORK + "-"):
                (CNI_CACHE / name).unlink(missing_ok=True)

    @staticmethod
    def _unmount_under(top: Path) -> None:
        """kubelet's bind mount of its root dir onto itself; what a killed containerd left."""
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(str(top) + "/")),
                             key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def started_node(cp: ControlPlane) -> KubeletNode:
    """A kubelet node of `cp`, Ready; the test skips, saying why, where none can run here.
    The caller stops it."""
    node = KubeletNode(cp, fixtures.built_binaries())
    try:
        node.start()
    except NodeUnavailableError as exc:
        pytest.skip(str(exc))
    print(f"kubelet node {node.name} Ready in {node.start_seconds:.1f} s")
    return node
