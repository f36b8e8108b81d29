"""Throwaway CAs and leaf certificates, made with the openssl command.

Shared by the unit tests of the CLI's TLS, the cluster tests' control plane
(tests/cluster/pki.py) and `make demo`, which serves the daemon over TLS as a
real set-up would. Keys are EC P-256 (quick to make); everything lives one
day: nothing here is meant to outlive a test run or a demo.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "1"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


def new_ca(d: Path, name: str, common_name: str) -> Pair:
    """A self-signed CA, `d/<name>.crt` and `.key`, fit to sign leaves (and nothing else)."""
    pair = Pair(d / f"{name}.crt", d / f"{name}.key")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(pair.key), "-out", str(pair.cert), "-days", DAYS,
            "-subj", f"/CN={common_name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=d)
    pair.key.chmod(0o600)
    return pair


def leaf(d: Path, ca: Pair, name: str, subject: str, *, usage: str, sans: str = "") -> Pair:
    """A certificate signed by `ca` for `usage` (serverAuth, clientAuth), `d/<name>.crt`.

    `sans` is openssl's subjectAltName syntax ("IP:127.0.0.1,DNS:localhost"): TLS
    clients check the name they dialled against it, never against the CN.
    """
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", subject, cwd=d)
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}"]
    if sans:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-CAcreateserial", "-days", DAYS, "-extfile", str(ext), "-out", str(cert), cwd=d)
    csr.unlink()
    ext.unlink()
    key.chmod(0o600)
    return Pair(cert, key)
