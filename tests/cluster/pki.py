"""A throwaway PKI for a loopback control plane, made with the openssl command.

One CA signs everything: the API server's serving certificate, the client
certificates of the admin and the controller-manager, and (as the cluster
signing CA) whatever the controller-manager signs. A separate RSA key pair
signs and verifies ServiceAccount tokens. Keys are EC P-256 (quick to make);
the service-account key is RSA because every verifier accepts RS256.
Everything lives one day: nothing here is meant to outlive a test run.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "1"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """The files a control plane is started with."""

    ca: Pair
    apiserver: Pair
    admin: Pair
    controller_manager: Pair
    scheduler: Pair
    sa_key: Path
    sa_pub: Path


def leaf(d: Path, ca: Pair, name: str, subject: str, *, usage: str, sans: str = "") -> Pair:
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt", d / f"{name}.ext"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key.name, "-out", csr.name, "-subj", subject, cwd=d)
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}"]
    if sans:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", csr.name, "-CA", ca.cert.name, "-CAkey", ca.key.name,
             "-CAcreateserial", "-days", DAYS, "-extfile", ext.name, "-out", cert.name, cwd=d)
    csr.unlink()
    ext.unlink()
    return Pair(cert, key)


def make(d: Path, *, extra_sans: tuple[str, ...] = ()) -> Pki:
    """Make every file under `d` (which must exist); returns their paths."""
    ca = Pair(d / "ca.crt", d / "ca.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", ca.key.name, "-out", ca.cert.name, "-days", DAYS,
             "-subj", "/CN=podnetmon-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", cwd=d)
    sans = ",".join(["IP:127.0.0.1", "DNS:localhost", "IP:10.96.0.1", "DNS:kubernetes",
                     "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                     "DNS:kubernetes.default.svc.cluster.local", *extra_sans])
    apiserver = leaf(d, ca, "apiserver", "/CN=kube-apiserver", usage="serverAuth", sans=sans)
    admin = leaf(d, ca, "admin", "/O=system:masters/CN=podnetmon-test-admin", usage="clientAuth")
    cm = leaf(d, ca, "controller-manager", "/CN=system:kube-controller-manager",
               usage="clientAuth")
    scheduler = leaf(d, ca, "scheduler", "/CN=system:kube-scheduler", usage="clientAuth")
    sa_key, sa_pub = d / "sa.key", d / "sa.pub"
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", sa_key.name, cwd=d)
    _openssl("pkey", "-in", sa_key.name, "-pubout", "-out", sa_pub.name, cwd=d)
    for key in (ca.key, apiserver.key, admin.key, cm.key, scheduler.key, sa_key):
        key.chmod(0o600)
    return Pki(ca, apiserver, admin, cm, scheduler, sa_key, sa_pub)
