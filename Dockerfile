# podnetmon's node daemon image (deploy/base/daemonset.yaml runs it), built from the
# repository root:
#   docker build -t ghcr.io/podnetmon/podnetmon:0.1.0 .
#
# bcc comes from Debian (python3-bpfcc, libbpfcc with its LLVM/clang); PyPI's "bcc" is an
# unrelated package and is never installed. Kernel headers are not in the image: BCC
# compiles against the node's, mounted from /lib/modules and /usr/src.
#
# The Debian packages are pinned to Debian 12 (bookworm) versions. When a bookworm point
# release replaces one, the build fails at apt-get install; `apt-cache policy <package>`
# in debian:12-slim gives the version to pin instead.

# checkov:skip=CKV_DOCKER_2:No HEALTHCHECK because Kubernetes ignores it; the DaemonSet's startup, liveness and readiness probes call /healthz and /readyz
# checkov:skip=CKV_DOCKER_7:FROM names the BASE build argument whose default debian:12-slim is a versioned tag; checkov does not read build arguments
# checkov:skip=CKV_DOCKER_3:Runs as root on purpose because loading BPF and opening root-owned bpffs, tracefs and netns files need uid 0 with all DAC capabilities dropped

# BASE: `make image` builds on a Debian 12 root file system made by mmdebstrap (no
# registry is needed); a docker build takes Debian's own image.
ARG BASE=debian:12-slim
FROM ${BASE}

RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3-bpfcc=0.26.0+ds-1 \
        libbpfcc=0.26.0+ds-1 \
        iproute2=6.1.0-3 \
        python3-venv=3.11.2-1+b1 \
        libpcap0.8=1.10.3-1 \
    && rm -rf /var/lib/apt/lists/*

# A venv of podnetmon's own, which sees Debian's bcc and nothing else of the system's
# Python packages: a folder holding only a link to bcc, named in a .pth file (as
# scripts/setup.sh does for the development venv). Its bin/ comes first on PATH.
ENV PATH="/opt/podnetmon/bin:${PATH}"
RUN python3 -m venv /opt/podnetmon \
    && mkdir /opt/podnetmon/bcc-path \
    && ln -s /usr/lib/python3/dist-packages/bcc /opt/podnetmon/bcc-path/bcc \
    && echo /opt/podnetmon/bcc-path \
        > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/debian_bcc.pth" \
    && python -c 'import bcc'

# PIP_CERT: a CA bundle for pip where the build's network reaches PyPI through a TLS proxy
# (`make image` mounts the host's for the build only; nothing of it stays in the image).
# Unset, it is not in the environment at all and pip uses its own bundle.
ARG PIP_CERT

# Only what the package needs (.dockerignore keeps everything else out of the context).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY monitor/ monitor/
COPY podnetlab/ podnetlab/
COPY bpf/ bpf/

# The wheel holds the monitor package (and the lab's, which the daemon never imports), and
# monitor/kernel/source.py finds the C programs in bpf/ beside the package
# (Path(__file__).parents[2] / "bpf"): they are copied there.
# The compose_source call fails the build if the daemon cannot find every probe's C source,
# the PacketFilter one if trace filters cannot be compiled (libpcap).
RUN pip install --no-cache-dir --disable-pip-version-check . \
    && podnetmon --version \
    && python -c 'from monitor import probes; from monitor.kernel import source; source.compose_source(probes.select(()))' \
    && python -c 'from monitor.traces.pcapfilter import PacketFilter; PacketFilter("icmp", snaplen=96)' \
    && rm -rf /src

WORKDIR /

# The root filesystem is mounted read-only: no .pyc may be written at run time (pip
# compiled the package's at install).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# No USER: the daemon runs as root (uid 0) with every capability dropped but the five the
# DaemonSet adds back; see deploy/base/daemonset.yaml for why each is needed.
ENTRYPOINT ["podnetmon"]
CMD ["run"]
