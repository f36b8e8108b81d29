#!/usr/bin/env bash
# Installs what podnetmon needs on a Debian 12 machine and prepares the kernel
# environment. Idempotent: every step checks before it acts. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup: run as root (apt, mounts, /lib/modules)" >&2; exit 1; }

# 1. Debian packages. bcc comes from Debian (python3-bpfcc): PyPI's "bcc" is another project.
packages=(python3-bpfcc libbpfcc bpftool iproute2 iperf3 tcpdump tshark nftables prometheus
          iputils-ping netcat-openbsd util-linux python3-venv procps kmod
          etcd-server etcd-client openssl curl
          containerd runc containernetworking-plugins umoci gcc libc6-dev
          buildah mmdebstrap podman netavark busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's prometheus package may start a service where systemd runs; the demo and
# the tests start their own on other ports, so a packaged one is left as it is.

# 2. Kernel headers for BCC. Where the running kernel has none (a VM kernel, as here),
# Debian's generic headers stand in: uapi types are right with them, and every kernel
# struct offset podnetmon needs comes from BTF instead (docs/kernel-env.md).
release=$(uname -r)
if [ ! -d "/lib/modules/$release/build/include" ]; then
  if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    say "installing linux-headers-$release"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$release" >/dev/null
  else
    dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q "install ok installed" || {
      say "no headers for $release; installing linux-headers-amd64 to stand in"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-headers-amd64 >/dev/null; }
    stand_in=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    if [ -e "/lib/modules/$release" ] && [ ! -L "/lib/modules/$release" ]; then
      ln -sfn "$stand_in" "/lib/modules/$release/build"
    else
      mkdir -p /lib/modules
      ln -sfn "/lib/modules/$(basename "$stand_in" | sed 's/^linux-headers-//')" "/lib/modules/$release"
    fi
    say "linked the headers of $release to $stand_in"
  fi
fi

# 3. tracefs (BCC reads tracepoint formats there) and bpffs (pinned objects).
mountpoint -q /sys/kernel/tracing || { mount -t tracefs tracefs /sys/kernel/tracing; say "mounted tracefs"; }
mountpoint -q /sys/fs/bpf || { mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs"; }

# 4. The venv, with Debian's bcc importable through a folder holding only a bcc link.
PYTHON=${PYTHON:-/usr/bin/python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/bcc-path
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-path/bcc
echo "$PWD/.venv/bcc-path" > "$site/debian_bcc.pth"
.venv/bin/python -c 'import bcc' || { echo "setup: bcc does not import in .venv" >&2; exit 1; }

# 5. Linters for what we ship (deploy/ manifests, the Dockerfile), in a venv of their own:
# checkov pins old versions of libraries the project's venv needs newer.
if [ ! -x .tools/bin/checkov ] || [ ! -f .tools/.installed ] || [ scripts/tools.txt -nt .tools/.installed ]; then
  say "installing manifest linters in .tools"
  [ -x .tools/bin/python ] || "$PYTHON" -m venv .tools
  .tools/bin/pip install -q --disable-pip-version-check -r scripts/tools.txt
  touch .tools/.installed
fi
say "ready"
