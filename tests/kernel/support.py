"""Helpers for kernel tests: the daemon as a subprocess, scrapes, and the kernel's own counts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from podnetlab.lab import Lab, LabPod

ROOT = Path(__file__).resolve().parents[2]
# The daemons' logs (read by tests after a daemon stopped), removed with the session
LOG_DIR = Path(tempfile.gettempdir()) / f"podnetmon-test-logs-{os.getpid()}"
Sample = tuple[str, frozenset[tuple[str, str]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> dict[Sample, float]:
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


class Metrics:
    """One scrape, with sums over label subsets."""

    def __init__(self, samples: dict[Sample, float]) -> None:
        self.samples = samples

    def sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def has(self, name: str, **labels: str) -> bool:
        want = set(labels.items())
        return any(n == name and want <= ls for (n, ls) in self.samples)

    def pods(self) -> set[tuple[str, str]]:
        out = set()
        for (n, ls) in self.samples:
            if n == "podnet_pod_info":
                d = dict(ls)
                out.add((d["namespace"], d["pod"]))
        return out


class Daemon:
    """`podnetmon run` as a real subprocess, stopped with SIGTERM."""

    def __init__(self, *args: str, inventory: str | None = None,
                 env: Mapping[str, str] | None = None, ca: Path | None = None,
                 listen_host: str = "127.0.0.1", ready_timeout: float = 60,
                 wrapper: Sequence[str] = ()) -> None:
        """ca: the daemon serves TLS (args name its pair) and is verified against this CA.
        wrapper: a command the daemon runs under (setpriv, prlimit)."""
        self.port = free_port()
        self.scheme = "https" if ca else "http"
        self.context = ssl.create_default_context(cafile=str(ca)) if ca else None
        cmd = [*wrapper, sys.executable, "-m", "monitor", "run", "--listen", f"{listen_host}:{self.port}",
               "--log-format", "json", *args]
        if inventory:
            cmd += ["--inventory", inventory]
        LOG_DIR.mkdir(mode=0o700, exist_ok=True)
        self.log_path = LOG_DIR / f"daemon-{self.port}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()  # a daemon that never got ready is not left running (nobody holds it)
            raise

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10,
            headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.get("/readyz", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready in {timeout} s:\n{self.logs()}")

    def scrape(self) -> Metrics:
        status, body = self.get("/metrics")
        assert status == 200, body
        return Metrics(parse_metrics(body.decode()))

    def pods_api(self) -> list[dict[str, object]]:
        status, body = self.get("/api/v1/pods")
        assert status == 200
        return list(json.loads(body)["pods"])

    def logs(self) -> str:
        try:
            return self.log_path.read_text()[-8000:]
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def https_get(host: str, port: int, path: str, ca: Path, server_name: str, *,
              timeout: float = 10, token: str | None = None) -> tuple[int, bytes]:
    """GET over TLS from `host`, verifying the certificate names `server_name`: what
    Prometheus does with tlsConfig.serverName (the node's IP dialled, the Service's name
    checked). `token`: sent as a bearer token."""
    ctx = ssl.create_default_context(cafile=str(ca))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\n{auth}"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def pod_info(m: Metrics) -> dict[tuple[str, str], dict[str, str]]:
    """The labels of each podnet_pod_info series, by (namespace, pod)."""
    out = {}
    for (name, labels), _v in m.samples.items():
        if name == "podnet_pod_info":
            d = dict(labels)
            out[(d["namespace"], d["pod"])] = d
    return out


def iface_stats(name: str) -> dict[str, int]:
    base = Path("/sys/class/net") / name / "statistics"
    return {k: int((base / k).read_text()) for k in ("rx_packets", "rx_bytes",
                                                      "tx_packets", "tx_bytes")}


@dataclass(frozen=True)
class Window:
    """Interface statistics and a scrape taken while nothing moved in between."""

    stats: dict[str, dict[str, int]]
    metrics: Metrics


class Scrapes(Protocol):
    """A daemon to scrape: ours as a subprocess, or the DaemonSet's pod."""

    def scrape(self) -> Metrics: ...


class HasHostVeth(Protocol):
    """A pod with a host-side veth: a lab pod, or one a real kubelet runs."""

    @property
    def host_veth(self) -> str: ...


def quiet_window(daemon: Scrapes, pods: Sequence[HasHostVeth], attempts: int = 50) -> Window:
    """Read statistics, scrape, read again; keep the pair only if nothing moved.

    Stray packets (ARP refreshes, IPv6 neighbour discovery) can cross a veth at
    any moment; a window in which the kernel's own counters did not move is one
    in which the scrape saw exactly the same traffic they did.
    """
    for _ in range(attempts):
        before = {p.host_veth: iface_stats(p.host_veth) for p in pods}
        metrics = daemon.scrape()
        after = {p.host_veth: iface_stats(p.host_veth) for p in pods}
        if before == after:
            return Window(before, metrics)
        time.sleep(0.05)
    raise AssertionError("interfaces never stood still long enough to compare")


class NamedVethPod(HasHostVeth, Protocol):
    @property
    def name(self) -> str: ...


def assert_pings_counted_exactly(daemon: Scrapes, sender: Any, receiver: NamedVethPod,
                                 count: int, names: tuple[str, str] | None = None) -> None:
    """`count` pings from sender to receiver, counted in both pods' packets, both ways,
    exactly as their host veths counted them (the pod's egress is its veth's rx).

    `names`: the two pods' `pod` labels, where they are not the pods' own names (lab
    pods named from an API)."""
    label = dict(zip((sender.name, receiver.name), names or (sender.name, receiver.name),
                     strict=True))
    in_pod(sender, "ping", "-c", "1", "-W", "1", receiver.ip)  # neighbours settle first
    before = quiet_window(daemon, [sender, receiver])
    in_pod(sender, "ping", "-c", str(count), "-i", "0.01", "-q", receiver.ip)
    after = quiet_window(daemon, [sender, receiver])
    for pod in (sender, receiver):
        for direction, stat in (("egress", "rx_packets"), ("ingress", "tx_packets")):
            name = label[pod.name]
            ours = (after.metrics.sum("podnet_packets_total", pod=name, direction=direction)
                    - before.metrics.sum("podnet_packets_total", pod=name, direction=direction))
            kernel = after.stats[pod.host_veth][stat] - before.stats[pod.host_veth][stat]
            assert ours == kernel >= count, (name, direction, ours, kernel)


def in_pod(pod: Any, *cmd: str, check: bool = True, timeout: float = 120,
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*pod.exec_prefix(), *cmd], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} in {pod.name} failed ({proc.returncode}): {proc.stderr}")
    return proc


def spawn_in_pod(pod: LabPod, *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*pod.exec_prefix(), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate: object, timeout: float, interval: float = 0.02) -> float:
    """Poll until predicate() is true; returns the seconds it took, or raises."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def tc_filters(dev: str, hook: str) -> str:
    return subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True,
                          text=True, check=True).stdout


PINS = Path("/sys/fs/bpf/podnetmon")  # the daemon's pinned maps and links


def cleanup() -> None:
    """`podnetmon cleanup`: what daemons run with --leave-attached left, removed."""
    subprocess.run([sys.executable, "-m", "monitor", "cleanup"], cwd=ROOT, check=True,
                   capture_output=True)


# Where a device carries ours, by our_programs()'s keys: both hooks by classic tc, or both
# by tcx (attach_mode auto moves a device from one to the other after --tcx-move-after).
ON_ONE_HOOK = ({"tc ingress", "tc egress"}, {"tcx ingress", "tcx egress"})


def our_programs(dev: str) -> dict[str, list[int]]:
    """Our programs on a device's hooks, seen from outside the daemon, by hook:
    {"tc ingress": [prog id], "tcx egress": [...]}. Classic filters from `tc filter show`
    (ours are named podnetmon); tcx programs from the kernel's own list for the device
    (BPF_PROG_QUERY: no command-line tool here shows tcx per device), named by bpftool."""
    from monitor.kernel import syscalls

    found: dict[str, list[int]] = {}
    for hook in ("ingress", "egress"):
        listing = subprocess.run(["tc", "filter", "show", "dev", dev, hook], capture_output=True,
                                 text=True, check=False).stdout
        ids = [int(i) for line in listing.splitlines() if " podnetmon " in line
               for i in re.findall(r" id (\d+) ", line)]
        if ids:
            found[f"tc {hook}"] = ids
    try:
        ifindex = int(Path(f"/sys/class/net/{dev}/ifindex").read_text())
    except OSError:
        return found  # the device is gone, and with it whatever was on it
    names = {int(p["id"]): str(p.get("name", "")) for p in bpftool_json("prog", "show") or []}  # type: ignore[union-attr]
    for hook, attach_type in (("ingress", syscalls.BPF_TCX_INGRESS),
                              ("egress", syscalls.BPF_TCX_EGRESS)):
        ids = [i for i in syscalls.tcx_query(ifindex, attach_type)
               if names.get(i, "").startswith("pnm_tc_")]
        if ids:
            found[f"tcx {hook}"] = ids
    return found


def tc_qdiscs(dev: str) -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True,
                          check=True).stdout


def bpftool_json(*args: str) -> object:
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "null")


def _map_ids(map_name: str) -> list[int]:
    maps = bpftool_json("map", "show")
    assert isinstance(maps, list)
    return [int(m["id"]) for m in maps if m.get("name") == map_name]


def ifslot_of(ifindex: int, buckets: int = 65536) -> int | None:
    """The slot the kernel's table gives an ifindex, read with bpftool; None if none."""
    bucket = (ifindex & (buckets - 1)).to_bytes(4, "little")
    for map_id in _map_ids("pnm_ifslots"):
        entry = bpftool_json("map", "lookup", "id", str(map_id), "key", *(str(b) for b in bucket))
        assert isinstance(entry, dict)
        value = bytes(int(b, 16) for b in entry["value"])
        if int.from_bytes(value[:4], "little") == ifindex:
            return int.from_bytes(value[4:8], "little")
    for map_id in _map_ids("pnm_ifslot_spil"):  # map names are cut at 15 characters
        for e in bpftool_json("map", "dump", "id", str(map_id)) or []:  # type: ignore[union-attr]
            if int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") == ifindex:
                return int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little")
    return None


INNER = "pnmlab-inner"  # the lab's netns prefix: `lab down` removes it whatever happens
INNER_IP, ROUTER_TUN_IP = "10.215.0.2", "10.215.0.1"


@contextmanager
def delay_line(client: LabPod, router: LabPod, each_way_ms: float) -> Iterator[None]:
    """A namespace behind `router` (INNER_IP) that `client` reaches through it, every packet
    held `each_way_ms` in each direction by tests/kernel/delayline.py."""
    subprocess.run(["ip", "netns", "add", INNER], check=True)
    script = Path(__file__).resolve().parent / "delayline.py"
    line = subprocess.Popen([sys.executable, str(script), "--near-netns",
                             router.netns_path, "--far-netns", f"/run/netns/{INNER}",
                             "--delay-ms", str(each_way_ms)], stdout=subprocess.PIPE, text=True)
    inner = ["ip", "netns", "exec", INNER]
    try:
        assert line.stdout is not None and line.stdout.readline().strip() == "ready"
        r = router
        for cmd in (["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                    ["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"],
                    ["ip", "addr", "add", f"{ROUTER_TUN_IP}/30", "dev", "dlnear"],
                    ["ip", "link", "set", "dlnear", "up"]):
            in_pod(r, *cmd)
        for cmd in (["ip", "addr", "add", f"{INNER_IP}/30", "dev", "dlfar"],
                    ["ip", "link", "set", "dlfar", "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "10.213.0.0/16", "dev", "dlfar"]):
            subprocess.run([*inner, *cmd], check=True)
        in_pod(client, "ip", "route", "add", "10.215.0.0/24", "via", r.ip)
        yield
    finally:
        line.kill()
        line.wait()
        in_pod(client, "ip", "route", "del", "10.215.0.0/24", check=False)
        subprocess.run(["ip", "netns", "pids", INNER], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", INNER], check=False)



UDP_SENDER = """
import socket, sys
dst, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
family = socket.AF_INET6 if ':' in dst else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
payload = b'x' * size
sent = 0
for _ in range(count):
    while True:
        try:
            s.sendto(payload, (dst, port)); sent += 1; break
        except BlockingIOError:
            pass
print(sent)
"""


def nft_in_pod(pod: LabPod, script: str) -> None:
    """Load an nft script inside a pod's netns."""
    proc = subprocess.run([*pod.exec_prefix(), "nft", "-f", "-"], input=script, text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"nft in {pod.name}: {proc.stderr}")


def nft_counter(pod: LabPod, table: str, comment: str) -> int:
    """Packets of the counter on the rule carrying `comment`, as nft reports it."""
    out = subprocess.run([*pod.exec_prefix(), "nft", "-j", "list", "table", "inet", table],
                         capture_output=True, text=True, check=True).stdout
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == comment:
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"no rule {comment!r} in {table}")


def drop_keys() -> list[tuple[int, int, int, int]]:
    """(kind, id, reason, count) of every entry of pnm_drops, read by bpftool."""
    out: list[tuple[int, int, int, int]] = []
    for map_id in _map_ids("pnm_drops"):
        for e in bpftool_json("map", "dump", "id", str(map_id)) or []:  # type: ignore[union-attr]
            key = bytes(int(b, 16) for b in e["key"])
            count = sum(int.from_bytes(bytes(int(b, 16) for b in v["value"]), "little")
                        for v in e["values"])
            # struct pnm_drop_key: u32 id, u32 reason, u8 kind, 3 bytes of padding
            out.append((key[8], int.from_bytes(key[:4], "little"),
                        int.from_bytes(key[4:8], "little"), count))
    return out


@dataclass
class LabRun:
    """Lab pods and a daemon watching them, for a module's tests."""

    lab: Lab
    pods: list[LabPod]
    daemon: Daemon

    @property
    def a(self) -> LabPod:
        return self.pods[0]

    @property
    def b(self) -> LabPod:
        return self.pods[1]


@contextmanager
def lab_with_daemon(count: int, *daemon_args: str, pinned: int = 0,
                    neighbours: bool = False) -> Iterator[LabRun]:
    """Fresh lab pods and a daemon; both gone afterwards, whatever happened.

    neighbours=True gives every pod a permanent ARP and ND entry for every other, so
    that no neighbour exchange straddles a test's counting window: a cache filled by a
    ping goes stale after ~30 s, and the next reply through it sends a probe (an ND
    probe and its answer are ICMPv6, which a test counting ICMP would see).
    """
    lab = Lab()
    lab.down()
    daemon = None
    try:
        pods = lab.up(count, pinned=pinned)
        daemon = Daemon(*daemon_args, inventory=str(lab.inventory))
        if neighbours:
            macs = {p.name: json.loads(in_pod(p, "ip", "-j", "link", "show", "eth0").stdout)
                    [0]["address"] for p in pods}
            for x in pods:
                for y in pods:
                    if x is not y:
                        for ip in (y.ip, y.ip6):
                            in_pod(x, "ip", "neigh", "replace", ip, "lladdr", macs[y.name],
                                   "dev", "eth0", "nud", "permanent")
        yield LabRun(lab, pods, daemon)
    finally:
        if daemon is not None:
            code = daemon.stop()
            assert code == 0, daemon.logs()
        lab.down()


@dataclass(frozen=True)
class Census:
    """What podnetmon holds in the kernel and the process, counted from outside."""

    filters: int  # our classic tc filters (bpftool net), on any interface
    tcx: int  # tcx programs of ours attached (bpftool net)
    ifslots: int  # occupied entries of the slot table (pinned map, by bpftool)
    spill: int
    netns: int
    owners: int
    drop_keys: int
    fds: int  # /proc/<pid>/fd
    threads: int  # /proc/<pid>/status
    rss_kib: int


def _pinned_entries(name: str, occupied: Callable[[bytes], bool] = lambda v: True) -> int:
    paths = list(Path("/sys/fs/bpf/podnetmon").glob(f"maps-*/{name}"))
    if not paths:
        return 0
    dump = bpftool_json("map", "dump", "pinned", str(paths[0])) or []
    count = 0
    for entry in dump:  # type: ignore[union-attr]
        raw = entry.get("value") or (entry.get("values") or [{}])[0].get("value", [])
        if occupied(bytes(int(b, 16) for b in raw)):
            count += 1
    return count


def census(pid: int) -> Census:
    net = bpftool_json("net", "show") or []
    # bpftool lists a classic filter under its name: ours are all called "podnetmon"
    filters = sum(entry.get("name") == "podnetmon"
                  for section in net for entry in section.get("tc", []))  # type: ignore[union-attr]
    # tcx links: bpftool 7.1 lists them under `link` only, their type as the number 11
    names = {int(p["id"]): str(p.get("name", "")) for p in bpftool_json("prog", "show") or []}  # type: ignore[union-attr]
    tcx = sum(1 for link in bpftool_json("link", "show") or []  # type: ignore[union-attr]
              if link.get("type") in (11, "tcx") and
              names.get(int(link.get("prog_id", 0)), "").startswith("pnm_tc_"))
    status = Path(f"/proc/{pid}/status").read_text()
    field = {ln.split(":")[0]: ln.split(":")[1].split() for ln in status.splitlines() if ":" in ln}
    # an entry of an array map is taken when it is not all zero
    return Census(filters, tcx, _pinned_entries("pnm_ifslots", any),
                  _pinned_entries("pnm_ifslot_spill"), _pinned_entries("pnm_netns"),
                  _pinned_entries("pnm_slot_owner", any), _pinned_entries("pnm_drops"),
                  len(os.listdir(f"/proc/{pid}/fd")), int(field["Threads"][0]),
                  int(field["VmRSS"][0]))
