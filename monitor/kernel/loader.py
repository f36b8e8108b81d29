"""Compiling and loading the BPF programs in a child process: the only module that imports bcc.

BCC compiles in-process with clang and LLVM: importing bcc alone maps ~64 MB
into the process and a compile leaves ~40 MB more behind (bench/RESULTS.md).
The daemon runs for months; the compiler is needed for two seconds. So a
short-lived child (`python -m monitor.kernel.loader`) compiles and loads, and hands
the daemon the file descriptors of every program and map over a Unix socket
(SCM_RIGHTS); the kernel objects live on in the daemon once the child exits.

The child attaches nothing: BCC would attach each TRACEPOINT_PROBE while it
loads, which the daemon does itself, through bpf links it can pin. Maps
declared with PNM_MAP are opened from, or created and pinned to, the pin
directory named in the cflags (bpf/pnm.h); BCC does that while it loads.

Protocol: the parent writes one JSON spec on the child's stdin; the child
sends one message on the socket: a JSON header naming the descriptors it
carries, in order, or {"error": ...}. The compiler's own messages go to the
child's stderr, which the parent keeps for the error it raises.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

SOCKET_FD_ENV = "PODNETMON_LOADER_FD"
MAX_FDS = 250  # SCM_MAX_FD is 253; far more than the ~30 programs and maps we have
PROGRAM_TYPES = ("sched_cls", "tracepoint")
TIMEOUT = 300.0  # seconds; a compile takes ~1.5 s here, a loaded node a few times that


class LoadError(Exception):
    """The programs did not compile or load; the message carries the compiler's words."""


@dataclass(frozen=True)
class Spec:
    """What to compile and which objects to hand back."""

    source: str
    cflags: tuple[str, ...]
    programs: tuple[tuple[str, str], ...]  # (function name, one of PROGRAM_TYPES)
    maps: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "cflags": list(self.cflags),
                           "programs": [list(p) for p in self.programs],
                           "maps": list(self.maps)})


@dataclass
class Loaded:
    """The descriptors the daemon now owns (close them with close())."""

    programs: dict[str, int]
    maps: dict[str, int]
    bcc_version: str

    def close(self) -> None:
        for fd in (*self.programs.values(), *self.maps.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.programs.clear()
        self.maps.clear()


def load(spec: Spec, *, timeout: float = TIMEOUT) -> Loaded:
    """Compile and load in a child; returns the descriptors, or raises LoadError."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        env = dict(os.environ, **{SOCKET_FD_ENV: str(child_end.fileno())})
        proc = subprocess.Popen([sys.executable, "-m", "monitor.kernel.loader"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=(child_end.fileno(),), env=env)
        child_end.close()
        try:
            _, stderr = proc.communicate(spec.to_json().encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LoadError(f"the BPF loader did not finish within {timeout:.0f} s") from None
        return _receive(parent_end, proc.returncode, stderr.decode(errors="replace"))
    finally:
        parent_end.close()
        if child_end.fileno() >= 0:
            child_end.close()


def _receive(sock: socket.socket, returncode: int, stderr: str) -> Loaded:
    sock.setblocking(False)
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, MAX_FDS)
    except BlockingIOError:
        data, fds = b"", []
    try:
        header = json.loads(data) if data else {}
    except ValueError:
        header = {"error": "the loader sent an unreadable reply"}
    if "error" in header or not data or returncode != 0:
        for fd in fds:
            os.close(fd)
        reason = header.get("error") or f"the loader exited with status {returncode}"
        raise LoadError(f"{reason}{_tail(stderr)}")
    names = [*header["programs"], *header["maps"]]
    if len(names) != len(fds):
        for fd in fds:
            os.close(fd)
        raise LoadError(f"the loader sent {len(fds)} descriptors for {len(names)} objects")
    programs = dict(zip(header["programs"], fds[:len(header["programs"])], strict=True))
    maps = dict(zip(header["maps"], fds[len(header["programs"]):], strict=True))
    return Loaded(programs, maps, str(header.get("bcc_version", "unknown")))


def _tail(stderr: str, lines: int = 40) -> str:
    """The end of the compiler's messages: where the error is."""
    kept = [line for line in stderr.strip().splitlines() if line.strip()][-lines:]
    return (":\n" + "\n".join(kept)) if kept else ""


def compile_check() -> str:
    """Compile a trivial TC program in a child: proves clang and the kernel headers work.
    Returns "" or what failed."""
    spec = Spec("#include <uapi/linux/pkt_cls.h>\n"
                "int pnm_check(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }\n",
                (), (("pnm_check", "sched_cls"),), ())
    try:
        load(spec, timeout=120).close()
    except (LoadError, OSError) as exc:
        return str(exc)
    return ""


# -- the child --------------------------------------------------------------------------


def _child(sock: socket.socket) -> int:
    try:
        spec = json.load(sys.stdin)
        from bcc import BPF  # type: ignore[import-untyped]
        from bcc.version import __version__ as bcc_version  # type: ignore[import-untyped]

        class _LoadOnly(BPF):  # type: ignore[misc]
            def _trace_autoload(self) -> None:
                """Attach nothing: the daemon attaches, through links it can pin."""

        types = {"sched_cls": BPF.SCHED_CLS, "tracepoint": BPF.TRACEPOINT}
        module = _LoadOnly(text=spec["source"].encode(), cflags=spec["cflags"])
        program_fds = [module.load_func(name.encode(), types[kind]).fd
                       for name, kind in spec["programs"]]
        map_fds = [module.get_table(name.encode()).map_fd for name in spec["maps"]]
    except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception; the text goes to the parent
        sock.send(json.dumps({"error": f"the BPF programs did not compile or load: {exc}"}).encode())
        return 1
    header = {"programs": [name for name, _ in spec["programs"]], "maps": list(spec["maps"]),
              "bcc_version": str(bcc_version)}
    socket.send_fds(sock, [json.dumps(header).encode()], [*program_fds, *map_fds])
    return 0


def main() -> int:
    fd = os.environ.get(SOCKET_FD_ENV)
    if fd is None:
        print("monitor.kernel.loader is started by the daemon, not by hand", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(fd)) as sock:
        return _child(sock)


if __name__ == "__main__":
    sys.exit(main())
