"""A throwaway PKI for a loopback control plane, made with the openssl command (tests/pki.py).

One CA signs everything: the API server's serving certificate, the client
certificates of the admin and the controller-manager, and (as the cluster
signing CA) whatever the controller-manager signs. A separate RSA key pair
signs and verifies ServiceAccount tokens, RSA because every verifier accepts
RS256. Everything lives one day: nothing here is meant to outlive a test run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.pki import Pair, leaf, new_ca, openssl

__all__ = ["Pair", "Pki", "leaf", "make"]


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


def make(d: Path, *, extra_sans: tuple[str, ...] = ()) -> Pki:
    """Make every file under `d` (which must exist); returns their paths."""
    authority = new_ca(d, "ca", "podnetmon-test-ca")
    sans = ",".join(["IP:127.0.0.1", "DNS:localhost", "IP:10.96.0.1", "DNS:kubernetes",
                     "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                     "DNS:kubernetes.default.svc.cluster.local", *extra_sans])
    apiserver = leaf(d, authority, "apiserver", "/CN=kube-apiserver", usage="serverAuth",
                     sans=sans)
    admin = leaf(d, authority, "admin", "/O=system:masters/CN=podnetmon-test-admin",
                 usage="clientAuth")
    cm = leaf(d, authority, "controller-manager", "/CN=system:kube-controller-manager",
              usage="clientAuth")
    scheduler = leaf(d, authority, "scheduler", "/CN=system:kube-scheduler", usage="clientAuth")
    sa_key, sa_pub = d / "sa.key", d / "sa.pub"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
            "-out", sa_key.name, cwd=d)
    openssl("pkey", "-in", sa_key.name, "-pubout", "-out", sa_pub.name, cwd=d)
    sa_key.chmod(0o600)  # the leaves' and the CA's keys are 0600 already
    return Pki(authority, apiserver, admin, cm, scheduler, sa_key, sa_pub)
