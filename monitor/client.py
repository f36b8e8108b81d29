"""The CLI's side of the daemon's listener: address, TLS and token, for pods, top, trace, drops.

An https:// daemon is always verified, certificate chain and host name, as
curl and kubectl do: against --ca-file when given, else the system trust
store. There is deliberately no flag to skip that: a token sent to a daemon
that was not verified is a token handed to whoever answered.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

DEFAULT_ADDRESS = "127.0.0.1:9655"
DEFAULT_PORT = 9655


class ClientError(Exception):
    """Why the daemon could not be asked, in one line for the terminal."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="the daemon: host:port (plain HTTP), http://host:port or "
                             "https://host:port")
    parser.add_argument("--ca-file", default="",
                        help="PEM CA bundle to verify an https:// daemon against (default: "
                             "the system trust store)")
    parser.add_argument("--cert-file", default="",
                        help="a client certificate (PEM) to present to an https:// daemon")
    parser.add_argument("--key-file", default="",
                        help="the client certificate's private key (default: in --cert-file)")
    parser.add_argument("--token-file", default="",
                        help="a file with the bearer token (else $PODNETMON_TOKEN)")


def base_url(address: str) -> str:
    """`scheme://host:port` of an --address; a bare host:port is http://, as it always was."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ClientError(f"--address {address!r}: the port is not a number in 1..65535") from None
    if parts.scheme not in ("http", "https"):
        raise ClientError(f"--address {address!r}: the scheme is http:// or https://")
    if not parts.hostname or parts.username is not None or parts.path not in ("", "/") \
            or parts.query or parts.fragment:
        raise ClientError(f"--address {address!r}: expected [http[s]://]host:port, nothing more")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def tls_context(ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """A client context that verifies chain and host name; TLS 1.2+, as the daemon serves."""
    try:
        # With a cafile, create_default_context trusts it alone, not the system store too
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError(f"--ca-file {ca_file}: {_file_problem(exc, 'a PEM CA bundle')}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ClientError(f"--cert-file {cert_file}: "
                              f"{_file_problem(exc, 'a PEM certificate and its key')}") from None
    elif key_file:
        raise ClientError("--key-file needs --cert-file")
    return context


def _file_problem(exc: Exception, wanted: str) -> str:
    if isinstance(exc, ssl.SSLError):  # before OSError: SSLError is one
        return f"not {wanted} ({exc.reason or exc})"
    return exc.strerror.lower() if isinstance(exc, OSError) and exc.strerror else str(exc)


@dataclass(frozen=True)
class Daemon:
    """One daemon's listener and the credentials to present to it."""

    url: str  # scheme://host:port
    context: ssl.SSLContext | None  # None: plain HTTP
    token: str = ""
    ca_file: str = ""  # named in errors: which trust the certificate failed

    def open(self, path: str, timeout: float) -> http.client.HTTPResponse:
        """GET `path` (with its query); any failure is a ClientError that says what to do."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            response: http.client.HTTPResponse = urllib.request.urlopen(
                request, timeout=timeout, context=self.context)
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    reason = json.load(exc).get("error", "")
                except (ValueError, AttributeError, OSError):
                    reason = ""
            raise ClientError(f"{self.url}: {exc.code} {reason or exc.reason}") from None
        except urllib.error.URLError as exc:  # the connection or TLS handshake failed
            raise ClientError(self._unreachable(exc.reason, timeout)) from None
        except OSError as exc:  # the response did not come (urllib does not wrap these)
            raise ClientError(self._unreachable(exc, timeout)) from None
        return response

    def _unreachable(self, reason: object, timeout: float) -> str:
        if isinstance(reason, ssl.SSLCertVerificationError):
            trust = self.ca_file or "the system trust store (name the daemon's CA with --ca-file)"
            why = (reason.verify_message or str(reason)).rstrip(".")
            return f"{self.url}: the daemon's certificate does not verify against {trust}: {why}"
        if isinstance(reason, ssl.SSLError) and reason.reason == "WRONG_VERSION_NUMBER":
            return f"{self.url}: the daemon did not answer in TLS (does it serve plain http://?)"
        if isinstance(reason, ssl.SSLError):
            return f"{self.url}: the TLS handshake failed: {reason.reason or reason}"
        if isinstance(reason, ConnectionResetError) and self.context is None:
            # What a TLS listener does with a plain HTTP request: it hangs up (a reset, or
            # RemoteDisconnected, which is one)
            return f"{self.url}: the daemon closed the connection unanswered (does it serve https://?)"
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused (is the daemon running, and listening there?)"
        elif isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
            why = f"no answer within {timeout:g} s"
        elif isinstance(reason, socket.gaierror):
            why = f"unknown host ({reason.strerror})"
        elif isinstance(reason, OSError) and reason.strerror:
            why = reason.strerror
        else:
            why = str(reason) or type(reason).__name__
        return f"cannot reach the daemon at {self.url}: {why}"


def from_args(args: argparse.Namespace) -> Daemon:
    """The daemon named by add_arguments' flags."""
    url = base_url(args.address)
    https = url.startswith("https://")
    if not https and (args.ca_file or args.cert_file or args.key_file):
        raise ClientError(f"--ca-file, --cert-file and --key-file are for https:// addresses; "
                          f"{url} is plain HTTP")
    context = tls_context(args.ca_file, args.cert_file, args.key_file) if https else None
    return Daemon(url, context, _token(args.token_file), args.ca_file)


def _token(path: str) -> str:
    if not path:
        return os.environ.get("PODNETMON_TOKEN", "").strip()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise ClientError(f"--token-file {path}: {_file_problem(exc, '')}") from None
