#!/usr/bin/env bash
# Builds the pinned kube-apiserver, kubectl and etcd from Go modules (the module
# proxy is the only source) into a cache outside the repo, keyed by version.
# Prints the bin directory. Idempotent: a warm cache returns at once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
out="$cache_root/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION"
bin="$out/bin"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kubectl" && -x "$bin/etcd" ]]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
work="$out/module"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

log() { echo "build-tools: $*" >&2; }
log "building kube-apiserver, kubectl, etcd for Kubernetes $KUBERNETES_VERSION (cold: many minutes)"

# The release's go.mod names each staging module with a `=> ./staging/...`
# replace; the wrapper replaces each with its published v0.<minor>.<patch>.
gomod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
staging_version="v0.${KUBERNETES_VERSION#v1.}"
pinned_etcd="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2; exit}' "$gomod")"
if [[ "$pinned_etcd" != "$ETCD_VERSION" ]]; then
  log "versions.env pins etcd $ETCD_VERSION but Kubernetes $KUBERNETES_VERSION pins $pinned_etcd"
  exit 1
fi

{
  echo "module openmeet.net/stack-tools"
  echo
  echo "go $(awk '$1=="go"{print $2; exit}' "$gomod")"
  echo
  echo "require ("
  echo "  k8s.io/kubernetes $KUBERNETES_VERSION"
  echo "  go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "replace ("
  grep -E '=> \./staging/' "$gomod" | awk -v v="$staging_version" '{print "  " $1 " => " $1 " " v}'
  echo ")"
} > go.mod

cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO

export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
go mod tidy >&2 2>&1 || go mod download >&2
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
go build -trimpath -ldflags "$ldflags" -o "$bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags "$ldflags" -o "$bin/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl >&2
go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
for b in kube-apiserver kubectl etcd; do mv "$bin/$b.tmp" "$bin/$b"; done
log "done: $bin"
echo "$bin"
