"""Containers of a real runtime, no Kubernetes: podman beside lab pods.

podman 4 with netavark's default bridge (`podman0`, 10.88.0.0/16) gives each container a
veth and pins its netns as /run/netns/netns-<uuid>; the container runs its own command,
no pause process. The daemon, started with only the lab's inventory, must find the
containers' namespaces by their pins, name them from podman's own records (namespace
`_podman`, the container's name) and count their traffic exactly against their veths.

podman runs here as kernel-env.md measured it works on these machines (runc, the cgroupfs
manager, explicit nproc/nofile limits), with its state in a directory of the test's own,
and leaves nothing: containers, image, storage, pins, the bridge, and the firewall chains
netavark adds and does not remove.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from podnetlab.lab import Lab
from tests.kernel.support import Daemon, assert_pings_counted_exactly, in_pod, pod_info, wait_for

IMAGE = "localhost/podnetmon-test-busybox:1"
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.skipif(shutil.which("podman") is None or not BUSYBOX.exists(),
                                reason="podman or busybox-static is not installed "
                                       "(scripts/setup.sh installs both)")


@dataclass(frozen=True)
class Container:
    """A podman container, as a test sends traffic from it and checks it."""

    name: str
    id: str
    ip: str
    pid: int
    netns: str
    host_veth: str

    def exec_prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n"]


class Podman:
    """podman with its storage, run state and temp files in one directory of its own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cmd = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"),
                    "--tmpdir", str(root / "tmp"), "--events-backend", "none",
                    "--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs"]

    @property
    def bundles(self) -> Path:
        """Where its containers' OCI bundles (and containers.json) are: --runtime-dirs."""
        return self.root / "storage" / "overlay-containers"

    def __call__(self, *args: str) -> str:
        out = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=120,
                             check=False)
        if out.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed:\n{out.stderr[-2000:]}")
        return out.stdout

    def import_busybox(self) -> None:
        """A one-binary image from busybox-static (no registry)."""
        tar = self.root / "busybox.tar"
        with tarfile.open(tar, "w") as t:
            t.add(BUSYBOX, "bin/busybox")
            for applet in ("sh", "sleep", "ping", "nc"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(link)
        self("import", str(tar), IMAGE)

    def run(self, name: str) -> Container:
        self("run", "-d", "--name", name, "--ulimit", "nproc=1024:1024",
             "--ulimit", "nofile=1024:1024", IMAGE, "/bin/sleep", "3600")
        doc: dict[str, Any] = json.loads(self("inspect", name))[0]
        pid = int(doc["State"]["Pid"])
        link = json.loads(subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-j", "link",
                                          "show", "eth0"], capture_output=True, text=True,
                                         check=True).stdout)[0]
        veth = next(p.name for p in Path("/sys/class/net").iterdir()
                    if (p / "ifindex").read_text().strip() == str(link["link_index"]))
        ip = doc["NetworkSettings"]["Networks"]["podman"]["IPAddress"]
        return Container(name, doc["Id"], ip, pid, doc["NetworkSettings"]["SandboxKey"], veth)

    def remove_all(self) -> None:
        subprocess.run([*self.cmd, "rm", "-a", "-f", "-t", "0"], capture_output=True,
                       timeout=120, check=False)
        subprocess.run([*self.cmd, "system", "reset", "-f"], capture_output=True, timeout=120,
                       check=False)


def _nft_tables() -> set[tuple[str, str]]:
    doc = json.loads(subprocess.run(["nft", "-j", "list", "tables"], capture_output=True,
                                    text=True, check=True).stdout)
    return {(t["table"]["family"], t["table"]["name"]) for t in doc["nftables"] if "table" in t}


def _remove_netavark_rules(tables_before: set[tuple[str, str]]) -> None:
    """netavark's NETAVARK* chains stay after its last container: tables it made go whole,
    and from tables that were here before only its chains and the jumps to them."""
    for family, name in _nft_tables() - tables_before:
        subprocess.run(["nft", "delete", "table", family, name], check=False)
    doc = json.loads(subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True,
                                    text=True, check=True).stdout)["nftables"]
    for item in doc:
        rule = item.get("rule")
        if rule and "NETAVARK" in json.dumps(rule.get("expr", [])) \
                and not rule["chain"].startswith("NETAVARK"):
            subprocess.run(["nft", "delete", "rule", rule["family"], rule["table"],
                            rule["chain"], "handle", str(rule["handle"])], check=False)
    for item in doc:
        chain = item.get("chain")
        if chain and chain["name"].startswith("NETAVARK"):
            subprocess.run(["nft", "flush", "chain", chain["family"], chain["table"],
                            chain["name"]], check=False)
    for item in doc:
        chain = item.get("chain")
        if chain and chain["name"].startswith("NETAVARK"):
            subprocess.run(["nft", "delete", "chain", chain["family"], chain["table"],
                            chain["name"]], check=False)


@pytest.fixture
def podman() -> Iterator[Podman]:
    tables = _nft_tables()
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    bridge_before = Path("/sys/class/net/podman0").exists()
    pins_before = set(Path("/run/netns").iterdir()) if Path("/run/netns").exists() else set()
    root = Path(tempfile.mkdtemp(prefix="podnetmon-podman-"))
    pm = Podman(root)
    try:
        pm.import_busybox()
        yield pm
    finally:
        pm.remove_all()
        if not bridge_before:
            subprocess.run(["ip", "link", "del", "podman0"], capture_output=True, check=False)
        _remove_netavark_rules(tables)
        Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)  # netavark turns it on
        shutil.rmtree(root, ignore_errors=True)
    pins = set(Path("/run/netns").iterdir()) if Path("/run/netns").exists() else set()
    assert pins <= pins_before, f"podman left netns pins: {sorted(map(str, pins - pins_before))}"
    assert not any("NETAVARK" in line for line in subprocess.run(
        ["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout.splitlines())


def test_podman_containers_are_found_named_and_counted_exactly(podman: Podman, lab: Lab) -> None:
    web, client = podman.run("web"), podman.run("client")
    assert web.netns.startswith("/run/netns/netns-")  # pinned, as kernel-env.md says
    pods = lab.up(2)
    daemon = Daemon("--runtime-dirs", str(podman.bundles), inventory=str(lab.inventory))
    try:
        wanted = {("_podman", "web"), ("_podman", "client"), *((p.namespace, p.name)
                                                                for p in pods)}
        wait_for(lambda: wanted <= set(pod_info(daemon.scrape())), timeout=20, interval=0.2)
        info = pod_info(daemon.scrape())
        assert info[("_podman", "web")]["uid"] == web.id
        assert info[("_podman", "web")]["workload_kind"] == "Container"
        assert info[("_podman", "web")]["interface"] == web.host_veth
        assert_pings_counted_exactly(daemon, client, web, 17)
        assert_pings_counted_exactly(daemon, pods[0], pods[1], 13)  # the lab's, beside them
        # a container gone: its series go with its veth
        podman("rm", "-f", "-t", "0", "client")
        wait_for(lambda: ("_podman", "client") not in pod_info(daemon.scrape()), timeout=10,
                 interval=0.2)
        in_pod(web, "ping", "-c", "1", "-W", "1", "10.88.0.1")  # the bridge answers
    finally:
        assert daemon.stop() == 0, daemon.logs()
