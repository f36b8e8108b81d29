"""`podnetmon trace` and `podnetmon drops`: clients of the daemon's trace endpoints."""

from __future__ import annotations

import argparse
import http.client
import struct
import sys
import time
import urllib.parse
from typing import BinaryIO

from monitor import client

EPB = 6  # pcapng Enhanced Packet Block


class BlockCounter:
    """Counts packets in a pcapng stream as it passes, for the progress line."""

    def __init__(self) -> None:
        self._buf = b""
        self.packets = 0
        self.bytes = 0

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        self._buf += data
        while len(self._buf) >= 8:
            kind, length = struct.unpack_from("<II", self._buf)
            if length < 12 or len(self._buf) < length:
                return
            if kind == EPB:
                self.packets += 1
            self._buf = self._buf[length:]


def _open(args: argparse.Namespace, endpoint: str, query: dict[str, str]) -> http.client.HTTPResponse:
    if "/" not in args.target:
        raise SystemExit(f"podnetmon: {args.target!r}: expected NAMESPACE/POD")
    namespace, pod = args.target.split("/", 1)
    path = (f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods/"
            f"{urllib.parse.quote(pod)}/{endpoint}?" + urllib.parse.urlencode(
                {k: v for k, v in query.items() if v}))
    try:
        return client.from_args(args).open(path, timeout=30)
    except client.ClientError as exc:
        raise SystemExit(f"podnetmon {args.command}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    if args.command == "drops":
        resp = _open(args, "drops", {"duration": args.duration,
                                     "events": str(args.count or "")})
        for line in resp:
            sys.stdout.write(line.decode())
            sys.stdout.flush()
        return 0
    resp = _open(args, "capture", {"duration": args.duration, "filter": args.filter,
                                   "snaplen": str(args.snaplen or ""),
                                   "packets": str(args.count or "")})
    out: BinaryIO = sys.stdout.buffer if args.write == "-" else open(args.write, "wb")  # noqa: SIM115
    from monitor.traces.session import parse_duration

    total = parse_duration(args.duration)
    counter, started, last = BlockCounter(), time.monotonic(), 0.0
    try:
        while chunk := resp.read1(65536):
            out.write(chunk)
            out.flush()
            counter.feed(chunk)
            if time.monotonic() - last >= 1:
                last = time.monotonic()
                left = max(0.0, total - (time.monotonic() - started))
                print(f"\r{counter.packets} packets, {counter.bytes} bytes, {left:.0f} s left ",
                      end="", file=sys.stderr, flush=True)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    print(f"\r{counter.packets} packets, {counter.bytes} bytes in "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0
