"""On-demand traces against tcpdump, drop events against nft, alert captures, auth, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podnetlab.lab import Lab, LabPod
from tests.kernel.support import Daemon, in_pod, nft_in_pod, spawn_in_pod, wait_for

TOKEN = "t0ken-for-the-trace-tests"


@dataclass
class Env:
    lab: Lab
    pods: list[LabPod]
    daemon: Daemon
    capture_dir: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("traces")
    token_file = work / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    capture_dir = work / "captures"
    lab = Lab()
    lab.down()
    daemon = None
    try:
        pods = lab.up(3)
        daemon = Daemon("--auth-token-file", str(token_file), "--capture-dir", str(capture_dir),
                        "--capture-max-files", "2", "--traces-per-node", "3",
                        inventory=str(lab.inventory))
        for x in pods:
            for y in pods:
                if x is not y:
                    in_pod(x, "ping", "-c", "1", "-W", "1", y.ip)
        yield Env(lab, pods, daemon, capture_dir)
    finally:
        if daemon is not None:
            assert daemon.stop() == 0, daemon.logs()
        lab.down()


def api(env: Env, path: str, *, token: str | None = TOKEN, data: bytes | None = None,
        method: str | None = None, timeout: float = 60) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(env.daemon.base + path, data=data, headers=headers,
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def tshark(path: Path, *fields: str, display: str = "") -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields", *(x for f in fields for x in ("-e", f))]
    if display:
        cmd += ["-Y", display]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    noise = [ln for ln in proc.stderr.splitlines() if "Running as user" not in ln and ln.strip()]
    assert proc.returncode == 0 and not noise, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


class Tcpdump:
    """tcpdump on the same veth, the oracle for what the trace should hold."""

    def __init__(self, dev: str, path: Path, expression: str, snaplen: int) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", dev, "-w", str(path), "-s", str(snaplen), "-U", "-n", "-Z", "root",
             "--immediate-mode", *expression.split()],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        assert "listening" in self.proc.stderr.readline()

    def stop(self) -> None:
        time.sleep(0.3)
        self.proc.terminate()
        _out, err = self.proc.communicate(timeout=10)
        assert "0 packets dropped by kernel" in err, err


def frames(path: Path) -> list[tuple[float, str]]:
    """(time, identity) of each frame, read with tshark: the identity is the frame's length
    and its first 1400 bytes (tcpdump -s 1500 keeps 1498 of a big frame, we keep 1500)."""
    out = []
    proc = subprocess.run(["tshark", "-r", str(path), "-T", "json", "-x"], capture_output=True,
                          text=True, check=True)
    for pkt in json.loads(proc.stdout or "[]"):
        layers = pkt["_source"]["layers"]
        raw = bytes.fromhex(layers["frame_raw"][0])
        length = layers["frame"]["frame.len"]
        out.append((float(layers["frame"]["frame.time_epoch"]),
                    length + hashlib.sha256(raw[:1400]).hexdigest()))
    return out


def trace_in_thread(env: Env, pod: LabPod, query: str, out: Path) -> threading.Thread:
    def run() -> None:
        status, body = api(env, f"/api/v1/namespaces/lab/pods/{pod.name}/capture?{query}")
        out.write_bytes(body if status == 200 else b"")
        out.with_suffix(".status").write_text(str(status))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_trace_equals_tcpdump_with_the_same_filter(env: Env, tmp_path: Path) -> None:
    a, b, _c = env.pods
    server = spawn_in_pod(b, "iperf3", "-s", "-1")
    time.sleep(0.3)
    results = {}
    for name, expression in (("all", ""), ("icmp", "icmp")):
        dump = Tcpdump(a.host_veth, tmp_path / f"{name}.pcap", expression, 1500)
        out = tmp_path / f"{name}.pcapng"
        thread = trace_in_thread(env, a, f"duration=3s&filter={expression}", out)
        time.sleep(0.5)  # the trace is on: what follows is inside its window
        in_pod(a, "ping", "-c", "17", "-i", "0.02", "-q", b.ip)
        if name == "all":
            in_pod(a, "iperf3", "-c", b.ip, "-t", "1", "-b", "20M")
        thread.join(timeout=30)
        dump.stop()
        results[name] = (out, dump.path)
    server.kill()
    for name, (ours, theirs) in results.items():
        traced, dumped = frames(ours), frames(theirs)
        assert traced, name
        start, end = traced[0][0], traced[-1][0]
        ours_c = Counter(key for _t, key in traced)
        theirs_c = Counter(key for _t, key in dumped)
        assert not ours_c - theirs_c, f"{name}: traced packets tcpdump did not see"
        missing = theirs_c - ours_c
        inside = [t for t, key in dumped if key in missing and start + 0.05 < t < end - 0.05]
        assert not inside, f"{name}: {len(inside)} packets inside the window not traced"
        print(f"{name}: traced {sum(ours_c.values())}, tcpdump {sum(theirs_c.values())}, "
              f"{sum(missing.values())} only at the window's edges")
        if name == "icmp":
            protocols = {row[0] for row in tshark(ours, "_ws.col.Protocol")}
            assert protocols == {"ICMP"}, protocols
            assert sum(ours_c.values()) == 34  # 17 requests, 17 replies
    # directions, from the pod's side
    rows = tshark(results["icmp"][0], "ip.src", "frame.packet_flags_direction")
    # epb_flags bits 0-1: 1 inbound (the pod receives), 2 outbound (the pod sends)
    assert rows and all((src == a.ip) == (int(flag, 16) & 3 == 2) for src, flag in rows), rows


def retrans_segs(pod: LabPod) -> int:
    """The pod's own TcpRetransSegs, as nstat reads it in its netns (absolute, no history)."""
    out = in_pod(pod, "nstat", "-asz", "TcpRetransSegs").stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("TcpRetransSegs")]
    return int(line.split()[1])


def test_a_multi_stream_trace_is_in_time_order_with_no_retransmission_the_kernel_did_not_make(
        env: Env, tmp_path: Path) -> None:
    """Frames of four TCP streams come from every CPU's perf ring; the trace writes them in
    timestamp order (monitor/reorder.py), so that capinfos finds the file in strict time
    order and Wireshark's analysis sees the retransmissions the kernel made, and no other
    (merged as they came, 9 of 581 frames were out of order: 12 suspected retransmissions)."""
    a, b, _c = env.pods
    server = spawn_in_pod(b, "iperf3", "-s", "-1")
    time.sleep(0.3)
    kernel_before = retrans_segs(a) + retrans_segs(b)
    out = tmp_path / "streams.pcapng"
    thread = trace_in_thread(env, a, "duration=4s&snaplen=128&filter=tcp", out)
    time.sleep(0.5)
    in_pod(a, "iperf3", "-c", b.ip, "-P", "4", "-t", "2", "-b", "100M")  # 400 Mbit/s
    thread.join(timeout=30)
    server.wait(timeout=10)
    kernel = retrans_segs(a) + retrans_segs(b) - kernel_before
    assert out.with_suffix(".status").read_text() == "200"
    info = subprocess.run(["capinfos", "-o", "-M", "-c", str(out)], capture_output=True,
                          text=True, check=True).stdout
    packets = int(re.search(r"Number of packets:\s+(\d+)", info)[1])  # type: ignore[index]
    assert packets > 1000, info
    assert re.search(r"^Strict time order:\s+True$", info, re.M), info
    # nothing lost on the way, nothing out of order: Wireshark sees the whole conversation
    assert (b"lost 0 in the kernel's buffer, 0 waiting for the writer; 0 written out of time "
            b"order") in out.read_bytes()
    expert = subprocess.run(["tshark", "-r", str(out), "-q", "-z", "expert"],
                            capture_output=True, text=True, check=True).stdout
    flagged = tshark(out, "frame.number", display="tcp.analysis.retransmission or "
                     "tcp.analysis.fast_retransmission or tcp.analysis.spurious_retransmission")
    print(f"{packets} frames, kernel retransmitted {kernel} segments, tshark flags "
          f"{len(flagged)}")
    if kernel == 0:
        assert not flagged, expert
        assert "retransmission" not in expert.lower(), expert
    else:  # each retransmitted frame carries at least one retransmitted segment
        assert len(flagged) <= kernel, expert


def test_snaplen_and_each_limit_end_the_capture(env: Env, tmp_path: Path) -> None:
    a, b, _c = env.pods
    pinger = spawn_in_pod(a, "ping", "-i", "0.02", "-s", "400", b.ip)
    try:
        cases = {"snaplen": "duration=2s&snaplen=100", "packets": "duration=20s&packets=7",
                 "bytes": "duration=20s&bytes=2000&snaplen=200", "duration": "duration=1s"}
        took = {}
        for name, query in cases.items():
            out = tmp_path / f"{name}.pcapng"
            started = time.monotonic()
            status, body = api(env, f"/api/v1/namespaces/lab/pods/{a.name}/capture?{query}")
            took[name] = time.monotonic() - started
            assert status == 200, body
            out.write_bytes(body)
    finally:
        pinger.kill()
    rows = tshark(tmp_path / "snaplen.pcapng", "frame.len", "frame.cap_len")
    assert rows and all(int(cap) <= 100 for _ln, cap in rows)
    assert any(int(ln) > 100 for ln, _cap in rows)
    assert len(tshark(tmp_path / "packets.pcapng", "frame.len")) == 7
    assert took["packets"] < 5  # the limit ended it, not the 20 s
    caps = [int(c) for (c,) in tshark(tmp_path / "bytes.pcapng", "frame.cap_len")]
    # never more than asked for, and stopped by the next packet that would not fit
    assert 2000 - 200 < sum(caps) <= 2000 and took["bytes"] < 5
    assert 0.9 < took["duration"] < 3


def test_pod_removed_mid_trace_and_concurrent_traces(env: Env, tmp_path: Path) -> None:
    a, b, c = env.pods
    extra = env.lab.add()
    in_pod(extra, "ping", "-c", "1", "-W", "1", c.ip)
    time.sleep(0.5)
    t_extra = trace_in_thread(env, extra, "duration=30s", tmp_path / "extra.pcapng")
    t_a = trace_in_thread(env, a, "duration=3s", tmp_path / "a.pcapng")
    t_b = trace_in_thread(env, b, "duration=3s", tmp_path / "b.pcapng")
    time.sleep(0.5)
    pings = [spawn_in_pod(p, "ping", "-c", "10", "-i", "0.05", c.ip) for p in (a, b, extra)]
    for p in pings:
        p.wait(timeout=10)
    started = time.monotonic()
    env.lab.remove(extra.name)
    t_extra.join(timeout=20)
    assert not t_extra.is_alive() and time.monotonic() - started < 10
    t_a.join(timeout=30)
    t_b.join(timeout=30)
    for pod, name in ((a, "a"), (b, "b"), (extra, "extra")):
        rows = tshark(tmp_path / f"{name}.pcapng", "ip.src", "ip.dst")
        assert rows, name
        # only this pod's own packets: never another pod's
        assert all(pod.ip in (src, dst) for src, dst in rows if src), (name, rows[:5])
    # ended cleanly: the file closes with interface statistics saying why
    data = (tmp_path / "extra.pcapng").read_bytes()
    blocks, at = [], 0
    while at + 8 <= len(data):
        kind, length = struct.unpack_from("<II", data, at)
        blocks.append((kind, data[at: at + length]))
        at += length
    assert at == len(data) and blocks[-1][0] == 5  # an Interface Statistics Block, whole
    assert b"the pod went away" in blocks[-1][1]
    ended = [e for e in env.daemon.log_events() if e.get("event") == "trace ended"]
    assert any(e["reason"] == "the pod went away" for e in ended)


def test_drop_events_name_reason_function_and_five_tuple(env: Env) -> None:
    a, b, _c = env.pods
    nft_in_pod(b, """
table inet pnmtrace {
  chain input {
    type filter hook input priority 0;
    udp dport 4242 drop
  }
}""")
    lines: list[dict[str, object]] = []

    def read() -> None:
        status, body = api(env, f"/api/v1/namespaces/lab/pods/{b.name}/drops?duration=3s")
        assert status == 200, body
        lines.extend(json.loads(ln) for ln in body.decode().splitlines() if ln.strip())

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.7)
    in_pod(a, sys.executable, "-c", "import socket\ns=socket.socket(socket.AF_INET,"
           "socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',5151))\n"
           f"[s.sendto(b'x',('{b.ip}',4242)) for _ in range(3)]")
    reader.join(timeout=30)
    in_pod(b, "nft", "delete", "table", "inet", "pnmtrace")
    ours = [ln for ln in lines if ln.get("dport") == 4242]
    assert len(ours) == 3, lines
    for event in ours:
        assert event["reason"] == "NETFILTER_DROP"
        # netfilter's own code dropped it, and the name is a real kernel symbol
        function = str(event["function"]).split("+", 1)[0]
        assert function.startswith(("nf_", "nft_")), event["function"]
        assert f" {function}\n" in Path("/proc/kallsyms").read_text()
        assert (event["protocol"], event["src"], event["dst"], event["sport"]) == (
            "udp", a.ip, b.ip, 5151)
        assert (event["namespace"], event["pod"]) == ("lab", b.name)
        # nft dropped it in b's own stack: on b's end of its veth pair, named by the host
        # veth as `pods` and traces name it; the ifindex is the pod netns' own
        assert (event["interface"], event["side"]) == (b.host_veth, "pod"), event
        eth0 = json.loads(in_pod(b, "ip", "-j", "link", "show", "eth0").stdout)[0]
        assert event["ifindex"] == eth0["ifindex"]


def alert(pod: str, fingerprint: str, starts: str = "2026-11-27T00:00:00Z") -> dict[str, object]:
    return {"status": "firing", "labels": {"alertname": "PodNetDropsHigh", "namespace": "lab",
                                           "pod": pod, "podnet_capture": "1s"},
            "annotations": {}, "startsAt": starts, "fingerprint": fingerprint}


def test_alertmanager_webhook_starts_one_capture_and_retention_deletes_the_oldest(
        env: Env, tmp_path: Path) -> None:
    a, b, _c = env.pods
    payload = {"version": "4", "status": "firing", "receiver": "podnetmon",
               "alerts": [alert(a.name, "f1"), alert("not-here-0", "f2")]}
    status, body = api(env, "/api/v1/alertmanager", data=json.dumps(payload).encode())
    result = json.loads(body)
    assert status == 200 and len(result["started"]) == 1, result
    assert result["started"][0]["pod"] == a.name
    assert {s["why"] for s in result["skipped"]} == {"pod not on this node"}
    pinger = spawn_in_pod(a, "ping", "-c", "10", "-i", "0.05", b.ip)
    # Alertmanager repeats the notification: no second capture
    status, body = api(env, "/api/v1/alertmanager", data=json.dumps(payload).encode())
    assert json.loads(body)["started"] == []
    pinger.wait(timeout=10)

    def captures() -> list[dict[str, object]]:
        return list(json.loads(api(env, "/api/v1/captures")[1])["captures"])

    wait_for(lambda: any(c["ended"] for c in captures()), timeout=10)
    (first,) = captures()
    assert (first["namespace"], first["pod"]) == ("lab", a.name) and first["packets"] >= 1
    status, pcap = api(env, f"/api/v1/captures/{first['id']}")
    assert status == 200
    (tmp_path / "stored.pcapng").write_bytes(pcap)
    assert tshark(tmp_path / "stored.pcapng", "ip.src")
    files = sorted(env.capture_dir.iterdir())
    assert stat.S_IMODE(os.stat(env.capture_dir).st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    # two more alerts: retention (at most 2 captures) deletes the oldest
    for fp in ("f3", "f4"):
        api(env, "/api/v1/alertmanager",
            data=json.dumps({"alerts": [alert(b.name, fp)]}).encode())
        time.sleep(1.3)
    wait_for(lambda: len(captures()) == 2 and all(c["ended"] for c in captures()), timeout=10)
    assert first["id"] not in {c["id"] for c in captures()}
    assert api(env, f"/api/v1/captures/{first['id']}")[0] == 404


def test_unauthenticated_refused_and_bad_input_answered_4xx(env: Env) -> None:
    a = env.pods[0].name
    base = f"/api/v1/namespaces/lab/pods/{a}"
    assert api(env, f"{base}/capture?duration=1s", token=None)[0] == 401
    assert api(env, f"{base}/capture?duration=1s", token="wrong")[0] == 401
    assert api(env, f"{base}/drops?duration=1s", token=None)[0] == 401
    assert api(env, "/api/v1/captures", token=None)[0] == 401
    assert api(env, "/api/v1/alertmanager", token=None, data=b"{}")[0] == 401
    cases = {
        "/api/v1/namespaces/lab/pods/nobody-0/capture?duration=1s": 404,
        "/api/v1/namespaces/Bad_NS/pods/x/capture": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?duration=1h": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?duration=soon": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?filter=tcp%20port%20nonsense": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?packets=99999999999999999999": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?snaplen=5": 400,
        f"/api/v1/namespaces/lab/pods/{a}/capture?color=blue": 400,
        "/api/v1/captures/..%2f..%2fetc%2fpasswd": 404,
        "/api/v1/captures/../../etc/passwd": 404,
        "/api/v1/captures/20261127T000000Z-deadbeef": 404,
        "/api/v1/nothing": 404,
    }
    for path, want in cases.items():
        status, body = api(env, path)
        assert status == want, (path, status, body)
        if status != 404 or "captures" not in path:
            assert json.loads(body)["error"], path
    assert api(env, "/api/v1/alertmanager", data=b"not json")[0] == 400
    assert api(env, "/api/v1/alertmanager", data=b'{"alerts": 3}')[0] == 400
    assert api(env, "/api/v1/alertmanager", data=b"x" * (2 << 20))[0] == 413
    assert api(env, "/metrics", method="DELETE")[0] == 405
    assert env.daemon.get("/healthz")[0] == 200  # and the daemon lives on
    assert TOKEN not in env.daemon.logs()


def test_packet_bytes_never_reach_the_log(env: Env, tmp_path: Path) -> None:
    a, b, _c = env.pods
    secret = b"pnm-s3cret-bytes"  # ping fills its payload with this pattern
    out = tmp_path / "secret.pcapng"
    thread = trace_in_thread(env, a, "duration=2s", out)
    time.sleep(0.5)
    in_pod(a, "ping", "-c", "5", "-i", "0.02", "-q", "-p", secret.hex(), b.ip)
    thread.join(timeout=30)
    assert secret in out.read_bytes()  # the trace has it: the one place it belongs
    log = env.daemon.log_path.read_bytes()
    assert secret not in log and secret.hex().encode() not in log
    assert TOKEN.encode() not in log
