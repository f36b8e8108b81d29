"""The listener's TLS: the serving context, rebuilt when a rotated certificate, key or
client CA lands on disk, and the client certificate a connection presented. Apart from
the front door (monitor/listener.py) because it changes with how Kubernetes mounts and
rotates secrets, not with how connections are scheduled.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor import log


class TlsError(ValueError):
    """The serving certificate, its key or the client CA cannot be used."""


@dataclass(frozen=True)
class Certificate:
    """A client certificate the TLS layer verified against the client CA."""

    user: str  # the subject's CN, as the API server and kubelet read it
    groups: tuple[str, ...]  # the subject's O values

def _stamp(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows the symlink a Kubernetes Secret volume swaps on rotation
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class TlsFiles:
    """The serving context, rebuilt when the certificate, key or client CA file changes.

    Checked at most once a second, on a new connection. A pair that does not load
    (a half-written rotation: the certificate new, the key still old) keeps the last
    good context and is tried again at the next check; at start-up it is an error.
    """

    CHECK_INTERVAL = 1.0

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = tuple(p for p in (cert_file, key_file, client_ca_file) if p)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._clock = clock
        self._lock = threading.Lock()
        self._log = log.get("tls")
        self._stamps = self._read_stamps()
        self._context = self._build()  # raises TlsError: a bad pair stops the start-up
        self._checked = clock()
        self.reloads = 0

    def _read_stamps(self) -> tuple[Any, ...]:
        return tuple(_stamp(p) for p in self.paths)

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                ctx.load_verify_locations(cafile=self.client_ca_file)
                ctx.verify_mode = ssl.CERT_OPTIONAL  # a certificate is one way in, not the only one
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"cannot load the TLS files ({', '.join(self.paths)}): "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
        return ctx

    def context(self) -> ssl.SSLContext:
        now = self._clock()
        with self._lock:
            if now - self._checked < self.CHECK_INTERVAL:
                return self._context
            self._checked = now
            stamps = self._read_stamps()
            if stamps == self._stamps:
                return self._context
            try:
                self._context = self._build()
            except TlsError as exc:
                self._log.warning("new TLS files do not load: still serving the last good "
                                  "certificate", error=str(exc))
                return self._context  # stamps not taken: retried at the next check
            self._stamps = stamps
            self.reloads += 1
            self._log.info("TLS files changed: serving the new certificate", reloads=self.reloads)
            return self._context


def peer_certificate(sock: socket.socket) -> Certificate | None:
    """The verified client certificate of a TLS connection, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    names: dict[str, list[str]] = {}
    subject: Any = cert.get("subject", ())  # ((("commonName", "x"),), (("organizationName", "g"),))
    for rdn in subject:
        for key, value in rdn:
            names.setdefault(key, []).append(value)
    user = (names.get("commonName") or [""])[0]
    return Certificate(user, tuple(names.get("organizationName", ()))) if user else None
