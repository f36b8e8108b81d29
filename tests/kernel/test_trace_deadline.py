"""A trace's client that reads nothing: the trace still ends on time, and lets go of everything.

The client sends its request on a socket with a tiny receive buffer and never reads while
traffic flows, so the daemon's writes block. Checked from outside the daemon: the pod's
switch in the kernel map (pnm_trace or pnm_drop_trace, found through the daemon's own map
descriptors in /proc/<pid>/fdinfo) is off within the trace's duration plus 2 s; its perf
buffers are closed (no perf_event descriptors left); the daemon's RSS comes back near what
it was; the connection is reset, with no socket of the daemon's left holding unsent bytes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitor.traces.api import WRITE_GRACE
from tests.kernel.support import UDP_SENDER, LabRun, bpftool_json, in_pod, lab_with_daemon, spawn_in_pod

TOKEN = "t0ken-for-the-deadline-tests"
DURATION = 3.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    token_file = tmp_path_factory.mktemp("deadline") / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    with lab_with_daemon(2, "--auth-token-file", str(token_file)) as lab_run:
        a, b = lab_run.pods
        in_pod(a, "ping", "-c", "1", "-W", "1", b.ip)
        yield lab_run


# -- the kernel's and the process's view, from outside the daemon --------------------------------

def daemon_maps(pid: int) -> dict[str, int]:
    """Name -> id of every BPF map the daemon holds a descriptor of (its own, not another
    daemon's of the same name: map names are global, ifindexes are per netns)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        ids.update(int(line.split()[1]) for line in text.splitlines()
                   if line.startswith("map_id:"))
    out = {}
    for map_id in ids:
        info = bpftool_json("map", "show", "id", str(map_id))
        assert isinstance(info, dict)
        out[str(info["name"])] = map_id
    return out


def lookup(map_id: int, key: int) -> bytes:
    entry = bpftool_json("map", "lookup", "id", str(map_id), "key",
                         *(str(b) for b in key.to_bytes(4, "little")))
    assert isinstance(entry, dict)
    return bytes(int(b, 16) for b in entry["value"])


def slot_of(maps: dict[str, int], ifindex: int) -> int:
    """The slot the daemon's kernel table gives a host veth (bucket ifindex & 65535)."""
    value = lookup(maps["pnm_ifslots"], ifindex & 0xFFFF)
    if int.from_bytes(value[:4], "little") == ifindex:
        return int.from_bytes(value[4:8], "little")
    for e in bpftool_json("map", "dump", "id", str(maps["pnm_ifslot_spil"])) or []:  # type: ignore[union-attr]
        if int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") == ifindex:
            return int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little")
    raise AssertionError(f"ifindex {ifindex} has no slot in the daemon's table")


def switch(maps: dict[str, int], name: str, slot: int) -> int:
    """The slot's trace switch: pnm_trace's `on` (the first u32) or pnm_drop_trace's u32."""
    return int.from_bytes(lookup(maps[name], slot)[:4], "little")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def perf_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            pass
    return count


def daemon_sockets(port: int) -> list[str]:
    """The daemon's TCP sockets on its port that still hold a connection's buffers: all
    but the listening one and those in TIME-WAIT (closed, nothing queued)."""
    out = subprocess.run(["ss", "-tnH", "state", "all", "sport", "=", f":{port}"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()
            if line.strip() and not line.startswith(("LISTEN", "TIME-WAIT"))]


# -- the client that reads nothing ---------------------------------------------------------------

def stalled_client(port: int, path: str) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # the kernel makes it ~2 KB
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: podnetmon\r\n"
              f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
    return s


def reads_to_the_end(s: socket.socket, timeout: float) -> str:
    """Read what is left: 'reset' or 'eof' (the daemon closed), else 'open'."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 20):
            pass
        return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"


def warm_up(run: LabRun, kind: str) -> None:
    """A trace read to its end, with a few packets or drops in it: a first trace's one-offs
    are behind us (libpcap; for drops the kernel's symbol table, ~25 MB, loaded at the
    first drop event and kept), so the figures below are the stalled trace's alone."""
    a, b = run.pods
    pod = a if kind == "capture" else b
    req = urllib.request.Request(
        f"{run.daemon.base}/api/v1/namespaces/lab/pods/{pod.name}/{kind}?duration=1.5s",
        headers={"Authorization": f"Bearer {TOKEN}"})
    body: list[bytes] = []

    def read() -> None:
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
            body.append(resp.read())

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    if kind == "capture":
        in_pod(a, "ping", "-c", "5", "-i", "0.02", "-q", b.ip)
    else:
        in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", "5", "16")
    reader.join(timeout=30)
    assert body and (kind == "capture" or b'"NO_SOCKET"' in body[0]), body


@dataclass
class Seen:
    on_for: float  # seconds from the request until the switch read off
    ever_on: bool
    peak_kib: int


def watch_switch(maps: dict[str, int], name: str, slot: int, pid: int, *, started: float,
                 limit: float) -> Seen:
    ever_on, peak = False, 0
    while True:
        on = switch(maps, name, slot)
        peak = max(peak, rss_kib(pid))
        now = time.monotonic() - started
        ever_on |= bool(on)
        if not on and (ever_on or now > 1.0):
            return Seen(now, ever_on, peak)
        if now > limit:
            return Seen(now, ever_on, peak)
        time.sleep(0.05)


BACK_WITHIN_KIB = 16 << 10  # what a trace's end must give back, within: its queue is 32 MiB


def memory_back(pid: int, baseline: int, within_kib: int, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    while True:
        now = rss_kib(pid)
        if now <= baseline + within_kib or time.monotonic() - started > timeout:
            return now, time.monotonic() - started
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["capture", "drops"])
def test_a_client_that_reads_nothing_ends_its_trace_on_time(run: LabRun, kind: str) -> None:
    a, b = run.pods
    pid, port = run.daemon.proc.pid, run.daemon.port
    traced = a if kind == "capture" else b
    duration = DURATION
    maps = daemon_maps(pid)
    ifindex = int(Path(f"/sys/class/net/{traced.host_veth}/ifindex").read_text())
    slot = slot_of(maps, ifindex)
    name = "pnm_trace" if kind == "capture" else "pnm_drop_trace"
    warm_up(run, kind)
    assert switch(maps, name, slot) == 0
    fds_before, rss_before = perf_fds(pid), rss_kib(pid)

    if kind == "capture":  # TCP at 200 Mbit/s: GSO packets of up to 64 KB, copied whole
        load = [spawn_in_pod(b, "iperf3", "-s")]
        time.sleep(0.3)
        load.append(spawn_in_pod(a, "iperf3", "-c", b.ip, "-t", "30", "-b", "200M"))
        query = f"duration={duration:g}s&snaplen=65000"
    else:  # UDP to a port nobody listens on: a NO_SOCKET drop in b for each datagram
        load = [spawn_in_pod(a, sys.executable, "-c", UDP_SENDER, b.ip, "9", "3000000", "16")]
        query = f"duration={duration:g}s"
    try:
        time.sleep(0.5)
        started = time.monotonic()
        client = stalled_client(port, f"/api/v1/namespaces/lab/pods/{traced.name}/{kind}?{query}")
        seen = watch_switch(maps, name, slot, pid, started=started, limit=duration + 30)
        # still reading nothing through the grace the writer gives a client past the deadline
        time.sleep(max(0.0, started + duration + WRITE_GRACE + 0.5 - time.monotonic()))
        # within 16 MiB: the 32 MiB queue of packets is what must come back (kept, RSS
        # stayed ~35 MiB up); glibc keeps some freed pages of the threads' arenas
        back, took = memory_back(pid, rss_before, BACK_WITHIN_KIB, timeout=10)
        left = daemon_sockets(port)  # before the client reads what its buffer holds
        ending = reads_to_the_end(client, timeout=5)
        client.close()
    finally:
        for proc in load:
            proc.kill()
            proc.wait()
    print(f"\n{kind}: switch on {seen.on_for:.2f} s for a {duration:g} s trace; RSS "
          f"{rss_before} KiB before, {seen.peak_kib} KiB at its peak, {back} KiB "
          f"{took:.1f} s after the trace's deadline + grace; perf fds {fds_before} -> {perf_fds(pid)}; "
          f"the connection: {ending}; daemon sockets left on the port: {left}")
    assert seen.ever_on, "the trace's switch never read on: the wrong map entry?"
    assert seen.on_for <= duration + 2, f"the switch stayed on {seen.on_for:.1f} s"
    if kind == "capture":  # the stalled client's queue really filled (else nothing is shown)
        assert seen.peak_kib > rss_before + (16 << 10), (rss_before, seen.peak_kib)
    # the bound waited for: a stricter one (8 MiB) failed a CI run at 9.1 MiB up, read the
    # moment the wait for 16 MiB ended
    assert back <= rss_before + BACK_WITHIN_KIB, f"RSS {back} KiB, {rss_before} KiB before"
    assert perf_fds(pid) == fds_before == 0  # the perf buffers close with the last trace
    # the daemon reset the connection: no socket of its own kept for the unsent bytes
    assert left == [] and ending == "reset", (left, ending)
    events = run.daemon.log_events()
    ended = [e for e in events if e.get("event") == "trace ended"]
    print(ended[-1:])
    assert ended and ended[-1]["reason"] == "duration reached", ended[-1:]
    # the writes did block on the client (else this test shows nothing): the writer gave up
    stalled = [e for e in events if e.get("event") == "trace client stopped reading"]
    assert stalled and stalled[-1]["id"] == ended[-1]["id"], stalled[-1:]
    assert run.daemon.get("/healthz")[0] == 200
