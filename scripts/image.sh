#!/usr/bin/env bash
# `make image`: the daemon's image from the Dockerfile, with no registry.
#
# The base is a Debian 12 minbase root file system that mmdebstrap makes from Debian's
# mirror (what debian:12-slim is, without a registry to pull it from), committed with
# buildah as localhost/podnetmon-base:bookworm and cached by a digest of its recipe. The
# Dockerfile builds on it (BASE build argument) with buildah; the result is tagged as the
# DaemonSet names it (ghcr.io/podnetmon/podnetmon:<version>) and written as a
# docker-archive that `ctr images import`, `podman load` and `docker load` all take.
# Prints the archive's path. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'image: %s\n' "$*" >&2; }
cache=${PODNETMON_CACHE:-/var/cache/podnetmon}
version=$(awk -F'"' '/^__version__ *=/ {print $2; exit}' monitor/__init__.py)
image=ghcr.io/podnetmon/podnetmon:$version
base=localhost/podnetmon-base:bookworm
mirror=http://deb.debian.org/debian
suites=("deb $mirror bookworm main" "deb $mirror bookworm-updates main"
        "deb http://deb.debian.org/debian-security bookworm-security main")
# The host's apt options travel into the base (a snapshot mirror may need
# Check-Valid-Until off); mmdebstrap writes them into its /etc/apt/apt.conf.d.
aptopts=()
for f in /etc/apt/apt.conf.d/*; do
  while IFS= read -r line; do
    case $line in Acquire::Check-*) aptopts+=(--aptopt="$line") ;; esac
  done < "$f"
done
recipe=$(printf '%s\n' minbase ca-certificates "${suites[@]}" "${aptopts[@]}" | sha256sum | cut -c1-12)
mkdir -p "$cache"
base_tar=$cache/image-base-bookworm-$recipe.tar
t0=$SECONDS
if [ ! -f "$base_tar" ]; then
  say "making the Debian 12 base with mmdebstrap (cold: about half a minute)"
  mmdebstrap --quiet --format=tar --variant=minbase --include=ca-certificates "${aptopts[@]}" \
    bookworm "$base_tar.tmp" "${suites[@]}"
  mv "$base_tar.tmp" "$base_tar"
fi
if [ "$(buildah images --noheading --filter "label=podnetmon.base-recipe=$recipe" -q | head -1)" = "" ]; then
  ctr=$(buildah from scratch)
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  buildah add --quiet "$ctr" "$base_tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --label "podnetmon.base-recipe=$recipe" --cmd bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
  trap - EXIT
fi
# The host's CA bundle is mounted for pip (PyPI may be behind a TLS proxy here); it is a
# build-time mount, not a layer.
ca=/etc/ssl/certs/ca-certificates.crt
previous=$(buildah images --noheading -q "$image" 2>/dev/null | head -1 || true)
buildah bud --quiet --isolation chroot --network host --layers --force-rm \
  -v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt \
  --build-arg "BASE=$base" -t "$image" . >/dev/null
# The image this build replaced (the tag moved on) would stay as an untagged 800 MB image
# at every rebuild: it goes, and nothing else does.
current=$(buildah images --noheading -q "$image" | head -1)
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  buildah rmi "$previous" >/dev/null 2>&1 || true
fi
out=$cache/podnetmon-image-$version.tar
rm -f "$out.tmp"
buildah push --quiet "$image" "docker-archive:$out.tmp:$image" >/dev/null
mv "$out.tmp" "$out"
say "built $image in $((SECONDS - t0)) s: $out"
echo "$out"
