"""A userspace delay line: two TUN devices, every packet held N ms before it is passed on.

The kernel here has no netem, so tests that need latency put this between two
network namespaces: TUN `--near-name` in one, `--far-name` in the other, each
packet read from one written to the other after `--delay-ms`. Run as a
process of its own (it setns()es its main thread); it prints "ready" once
both devices exist, and runs until killed. Addresses and routes are the
caller's to set.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(netns_path: str) -> None:
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns_path}")
    finally:
        os.close(fd)


def tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--near-netns", required=True)
    parser.add_argument("--far-netns", required=True)
    parser.add_argument("--near-name", default="dlnear")
    parser.add_argument("--far-name", default="dlfar")
    parser.add_argument("--delay-ms", type=float, required=True, help="per direction")
    args = parser.parse_args()
    enter(args.near_netns)
    near = tun(args.near_name)
    enter(args.far_netns)
    far = tun(args.far_name)
    print("ready", flush=True)
    delay = args.delay_ms / 1000
    held: list[tuple[float, int, int, bytes]] = []  # (due, sequence, out fd, packet)
    sequence = 0
    other = {near: far, far: near}
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        readable, _, _ = select.select([near, far], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                sequence += 1
                heapq.heappush(held, (now + delay, sequence, other[fd], packet))
        while held and held[0][0] <= time.monotonic():
            _due, _seq, out, packet = heapq.heappop(held)
            try:
                os.write(out, packet)
            except OSError:
                pass  # a full device queue drops, as a real link would


if __name__ == "__main__":
    sys.exit(main())
