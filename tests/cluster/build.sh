#!/usr/bin/env bash
# Builds the real control plane the cluster tests run, from the published Go modules:
# kube-apiserver, kube-controller-manager, kube-scheduler and kubelet of one Kubernetes
# release (go/kubernetes), the Prometheus Operator (go/prometheus-operator) and a
# Prometheus with Kubernetes service discovery (go/prometheus; Debian's has none), and
# helm (go/helm). Each set is cached under
# $PODNETMON_CACHE (default /var/cache/podnetmon) by release and by a digest of its
# go.mod and go.sum, so a second run on the same machine costs nothing; a cold build
# prints how long it took. etcd is Debian's (etcd-server, installed by setup.sh):
# this apiserver accepts its 3.4. Prints the directory that holds the binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${PODNETMON_CACHE:-/var/cache/podnetmon}
say() { printf 'cluster-build: %s\n' "$*" >&2; }
# Go's own install places, for a shell whose PATH lacks them (CI's, a sudo's).
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin:/usr/lib/go/bin
command -v go >/dev/null || { say "no go on PATH: the cluster tests need Go 1.26 to build Kubernetes"; exit 3; }

k8s_release=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/go/kubernetes/go.mod")
op_release=$(awk '$1 == "require" && $2 ~ /prometheus-operator$/ {print $3}' "$here/go/prometheus-operator/go.mod")
digest() { cat "$1/go.mod" "$1/go.sum" | sha256sum | cut -c1-12; }
out="$cache/cluster-$k8s_release-$(digest "$here/go/kubernetes")-op-$op_release-$(digest "$here/go/prometheus-operator")-$(digest "$here/go/prometheus")"

build() {  # build DIR BINARY PACKAGE LDFLAGS [OUT]
  local dir=$1 bin=$2 pkg=$3 ldflags=$4 to=${5:-$out}
  [ -x "$to/$bin" ] && return 0
  local t0=$SECONDS
  say "building $bin from $pkg (cold: several minutes on 2 cores)"
  (cd "$dir" && GOFLAGS=-mod=readonly CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" \
      -o "$to/$bin.tmp" "$pkg")
  mv "$to/$bin.tmp" "$to/$bin"
  say "built $bin in $((SECONDS - t0)) s"
}

mkdir -p "$out"
minor=${k8s_release#v1.}; minor=${minor%%.*}
# What hack/lib/version.sh stamps, so that clients see a real server version.
kv="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kv+=" -X $pkg.gitVersion=$k8s_release -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kv+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
build "$here/go/kubernetes" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kv"
build "$here/go/kubernetes" kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kv"
build "$here/go/kubernetes" kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kv"
build "$here/go/kubernetes" kubelet k8s.io/kubernetes/cmd/kubelet "$kv"
ov="-s -w -X github.com/prometheus/common/version.Version=${op_release#v}"
build "$here/go/prometheus-operator" prometheus-operator \
  github.com/prometheus-operator/prometheus-operator/cmd/operator "$ov"
pv="-s -w -X github.com/prometheus/common/version.Version=$(awk '$1 == "require" {print $3}' \
  "$here/go/prometheus/go.mod" | sed 's/^v0\./2./')"
build "$here/go/prometheus" prometheus github.com/prometheus/prometheus/cmd/prometheus "$pv"
# helm, for the chart's tests: cached by its own release and digest, linked beside the rest.
helm_release=$(awk '$1 == "require" && $2 ~ /^helm.sh\/helm/ {print $3}' "$here/go/helm/go.mod")
helm_out="$cache/helm-$helm_release-$(digest "$here/go/helm")"
mkdir -p "$helm_out"
build "$here/go/helm" helm helm.sh/helm/v4/cmd/helm \
  "-s -w -X helm.sh/helm/v4/internal/version.version=$helm_release" "$helm_out"
ln -sfn "$helm_out/helm" "$out/helm"
# The operator's CRDs, from the same module (the tests apply them).
crds=$(cd "$here/go/prometheus-operator" && go list -m -f '{{.Dir}}' \
  github.com/prometheus-operator/prometheus-operator)/example/prometheus-operator-crd
if [ ! -d "$out/crds" ]; then
  mkdir -p "$out/crds.tmp" && cp "$crds"/*.yaml "$out/crds.tmp"/ && mv "$out/crds.tmp" "$out/crds"
fi
echo "$out"
