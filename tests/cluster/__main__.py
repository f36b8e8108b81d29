"""`make cluster`: a real single-node control plane on loopback, to try podnetmon against.

Builds (or takes from the cache) kube-apiserver, kube-controller-manager and the
Prometheus Operator, starts etcd, the API server and the controller-manager with a
throwaway PKI, applies podnetmon's RBAC, prints how to reach it, and runs until
Ctrl-C or SIGTERM, when it stops every process and removes every file it made.
"""

from __future__ import annotations

import signal
import sys
import threading

from tests.cluster import fixtures
from tests.cluster.controlplane import kubectl_path


def main() -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = fixtures.start()
    cp = next(cluster)
    print(f"""
a real control plane is up ({cp.start_seconds:.1f} s), with podnetmon's RBAC applied:
  export KUBECONFIG={cp.kubeconfig}
  {kubectl_path()} get namespaces
  # the daemon with its own ServiceAccount's token, names from this API:
  {kubectl_path()} create token podnetmon -n podnetmon > /tmp/podnetmon.token
Ctrl-C stops it and removes {cp.dir}.""", flush=True)
    stop.wait()
    cluster.close()  # the generator's finally: stop every process, remove the directory
    return 0


if __name__ == "__main__":
    sys.exit(main())
