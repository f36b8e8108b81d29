"""Setting up a lab pod's network: `ip` batches and sysctls (the host's side and the
pod's), and what is done inside the pod's netns (addresses, links up, no RA or DAD,
and for quiet pods no IPv6 and permanent neighbours) from a thread that entered it."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monitor.kernel import netns
from podnetlab.errors import LabError


def in_netns(netns_path: str, fn: Callable[[], None], thread_name: str) -> None:
    """Run fn in a thread that has entered the netns: what it opens in /proc/sys/net and
    the processes it starts are the pod's. The thread ends with it; the caller's netns
    never changes."""
    errors: list[BaseException] = []

    def run() -> None:
        fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                netns.setns(fd)
            except OSError as exc:
                raise LabError(f"setns into {netns_path}: {exc.strerror}") from None
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=thread_name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class Quiet:
    """A pod that sends nothing of its own accord: no IPv6 (no MLD reports, flooded to
    every port of the bridge) and permanent neighbour entries (no ARP broadcasts), so
    its veth carries only what it is made to send. For churn that compares each pod's
    counts with its veth's statistics at rest, beside pods being made."""

    neighbours: Mapping[str, str] = field(default_factory=dict)  # IPv4 address -> MAC


def configure_inside(ip: str, ip6: str, quiet: Quiet | None = None) -> None:
    """Inside the pod's netns: no RA, no DAD (sysctls first), then addresses and links up."""
    keys = ["net/ipv6/conf/eth0/accept_ra", "net/ipv6/conf/eth0/router_solicitations",
            "net/ipv6/conf/all/accept_dad", "net/ipv6/conf/eth0/accept_dad"]
    for key in keys:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write("0")
    if quiet is not None:
        with open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "w") as f:
            f.write("1")
    commands = [f"addr add {ip}/16 dev eth0"]
    if quiet is None:
        commands.append(f"addr add {ip6}/64 dev eth0 nodad")
    else:
        commands += [f"neigh replace {addr} lladdr {mac} dev eth0 nud permanent"
                     for addr, mac in quiet.neighbours.items()]
    ip_batch([*commands, "link set lo up", "link set eth0 up"])


def ip_batch(commands: Iterable[str]) -> None:
    """Many `ip` commands in one process; stops at the first that fails."""
    text = "".join(f"{c}\n" for c in commands)
    proc = subprocess.run(["ip", "-batch", "-"], input=text, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise LabError(f"`ip -batch` failed: {proc.stderr.strip() or proc.returncode}")


def sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        path.write_text(value)
    except OSError:
        pass  # an interface already gone, or a kernel without the knob: not lab-fatal
