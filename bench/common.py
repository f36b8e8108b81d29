"""What the benchmarks share: lab pods, traffic, the daemon, medians."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from podnetlab.lab import Lab, LabPod

T = TypeVar("T")

UDP_SENDER = """
import socket, sys
dsts, port, count, size = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b'x' * size
for i in range(count):
    try:
        s.sendto(payload, (dsts[i % len(dsts)], port))
    except OSError:
        pass
"""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), kernel {platform.release()}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def stable(read: Callable[[], T], attempts: int = 200) -> T:
    """`read()` again until two reads in a row agree, and that value.

    Stray packets (ARP, IPv6 neighbour discovery, the last segments of a finished iperf3)
    cross a veth at any moment, also while several counters are read one after the
    other: one read is then part before and part after a packet. Two equal reads in a
    row saw no packet in between, so the second is one consistent moment. Raises
    RuntimeError if the counters never stand still (traffic that did not stop)."""
    last = read()
    for _ in range(attempts):
        time.sleep(0.005)
        now = read()
        if now == last:
            return now
        last = now
    raise RuntimeError(f"counters never stood still over {attempts} reads")


def run_in(pod: LabPod, *cmd: str, timeout: float = 300, check: bool = True,
           stdin: str | None = None) -> str:
    return subprocess.run([*pod.exec_prefix(), *cmd], capture_output=True, text=True,
                          check=check, timeout=timeout, input=stdin).stdout


def spawn_in(pod: LabPod, *cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*pod.exec_prefix(), *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@contextmanager
def lab_pods(count: int) -> Iterator[tuple[Lab, list[LabPod]]]:
    lab = Lab()
    lab.down()
    try:
        pods = lab.up(count)
        # Warm the first pair's neighbour entries (the benches send between them). Not
        # every pod's: the kernel's ARP table is one for all namespaces, and a ping from
        # 500 pods fills it to its default gc_thresh3 (1024) with entries too
        # fresh to collect, after which new pods cannot resolve anyone for a while.
        if len(pods) > 1:
            run_in(pods[1], "ping", "-c", "1", "-W", "1", pods[0].ip)
        yield lab, pods
    finally:
        lab.down()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure in kB (VmRSS, VmHWM) or a count (Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def proc_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RunningDaemon:
    address: str
    proc: subprocess.Popen[bytes]
    log: Path

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in kB (VmRSS, VmHWM) or a count (Threads)."""
        return proc_status(self.proc.pid, key)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def events(self, name: str) -> list[dict[str, object]]:
        """The daemon's JSON log lines whose event is `name`."""
        out = []
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name:
                out.append(doc)
        return out

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=30) as resp:
            return str(resp.read().decode())


@contextmanager
def running_daemon(inventory: Path, *args: str, log: Path | None = None,
                   ready_timeout: float = 120, scheme: str = "http",
                   context: ssl.SSLContext | None = None,
                   checkout: Path = ROOT) -> Iterator[RunningDaemon]:
    """The real `podnetmon run` with its JSON log kept; yields once it is ready
    (scheme https: the daemon serves TLS per `args`, verified with `context`;
    `checkout`: the source tree whose monitor package runs, another release's worktree).

    The log (a file of its own unless `log` names one) is what explains a bench that
    failed, and only that: it is deleted when the bench ends well, and kept, its path
    printed, when the daemon or the bench failed."""
    if log is None:
        fd, name = tempfile.mkstemp(prefix="podnetmon-bench-", suffix=".log")
        os.close(fd)
        log = Path(name)
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--inventory",
                                 str(inventory), "--listen", f"127.0.0.1:{port}",
                                 "--log-format", "json", *args], cwd=checkout, stdout=out,
                                stderr=subprocess.STDOUT)
    failed = True
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/readyz", timeout=1,
                                            context=context):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not become ready; see {log}") from None
                time.sleep(0.05)
        yield RunningDaemon(f"127.0.0.1:{port}", proc, log)
        failed = False
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if failed or code != 0:
            print(f"the daemon's log is kept in {log} (exit {code})", file=sys.stderr, flush=True)
        else:
            log.unlink(missing_ok=True)


@contextmanager
def daemon(inventory: Path, *args: str) -> Iterator[str]:
    """The real `podnetmon run`; yields its address once it is ready."""
    with running_daemon(inventory, *args) as running:
        yield running.address


def stamp(event: dict[str, object]) -> float:
    """A log line's timestamp in seconds since the epoch."""
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextmanager
def tcpdump(dev: str) -> Iterator[None]:
    proc = subprocess.Popen(["tcpdump", "-i", dev, "-w", "/dev/null", "-s", "0", "-n", "-Z", "root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # tcpdump opens its socket and installs its filter before traffic
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
