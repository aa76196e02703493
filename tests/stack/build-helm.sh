#!/usr/bin/env bash
# Builds the pinned helm CLI from Go modules (the module proxy is the only
# source) into a cache outside the repo, keyed by version. Prints the bin
# directory. Idempotent: a warm cache returns at once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
out="$cache_root/helm-$HELM_VERSION"
bin="$out/bin"
if [[ -x "$bin/helm" ]]; then
  echo "$bin"
  exit 0
fi

log() { echo "build-helm: $*" >&2; }
log "building helm $HELM_VERSION (cold: a few minutes)"
mkdir -p "$bin"

# `go install pkg@version` builds the release's own go.mod (no replace lines
# in helm's), outside any module; GOBIN puts the result in the cache.
# Build into a scratch GOBIN and move, so an interrupted build leaves no
# half-written binary that the warm-cache check would accept.
scratch="$out/gobin.tmp"
rm -rf "$scratch"
mkdir -p "$scratch"
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOBIN="$scratch"

# As helm's own Makefile: the Kubernetes version `helm template` and
# `helm lint` assume is the one of the client-go helm links (v0.X.Y -> 1.X);
# without it they assume 1.20.
gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
client_go="$(awk '$1=="k8s.io/client-go"{print $2; exit}' "$gomod")"
IFS=. read -r k8s_major k8s_minor _ <<<"${client_go#v}"
k8s_major=$((k8s_major + 1))
pkg=helm.sh/helm/v3
ldflags="-s -w -X $pkg/internal/version.version=$HELM_VERSION -X $pkg/internal/version.gitTreeState=clean"
for p in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $pkg/$p.k8sVersionMajor=$k8s_major -X $pkg/$p.k8sVersionMinor=$k8s_minor"
done
go install -trimpath -ldflags "$ldflags" "$pkg/cmd/helm@$HELM_VERSION" >&2
mv "$scratch/helm" "$bin/helm"
rm -rf "$scratch"
log "done: $bin"
echo "$bin"
