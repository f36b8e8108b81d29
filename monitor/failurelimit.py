"""Failed authentications, counted per client address, so that garbage tokens cannot
make the daemon send the API server TokenReviews without end (monitor/server.py asks
before it authenticates and tells after a failure)."""

from __future__ import annotations

import collections
import ipaddress
import threading
import time
from collections.abc import Callable


class FailureLimiter:
    """Failed authentications per client address: a token bucket each.

    `per_minute` failures a minute, in bursts of a sixth of that; an address past it
    waits (429) before anything it sends is checked again, so garbage tokens cost the
    API server at most this many TokenReviews per address. IPv6 clients are counted
    per /64, which is what one host can pick its addresses from. At most
    `max_addresses` are remembered, those idle longest forgotten first (an address
    forgotten starts again with a full bucket, which is the worst it can gain).
    """

    def __init__(self, per_minute: int = 60, *, max_addresses: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1 or max_addresses < 1:
            raise ValueError("per_minute and max_addresses must be at least 1")
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute / 6.0)
        self.max_addresses, self._clock = max_addresses, clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.limited = 0  # requests answered 429, for the figures

    @staticmethod
    def _key(peer: str) -> str:
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(getattr(ip, "ipv4_mapped", None) or ip)

    def _tokens(self, key: str, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def wait(self, peer: str) -> float:
        """Seconds until this address may try again; 0: now."""
        key, now = self._key(peer), self._clock()
        with self._lock:
            if key not in self._buckets:
                return 0.0
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                return 0.0
            self.limited += 1
            return (1.0 - tokens) / self.rate

    def failed(self, peer: str) -> None:
        key, now = self._key(peer), self._clock()
        with self._lock:
            self._buckets[key] = (self._tokens(key, now) - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
