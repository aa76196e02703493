#!/usr/bin/env bash
# Builds the `health` tool (tests/stack/health: kstatus and Argo CD's Lua
# interpreter, from the Go module proxy) into a cache outside the repo, keyed
# by the versions its go.mod pins and a hash of its source. Prints the bin
# directory. Idempotent: a warm cache returns at once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/health"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
kstatus="$(awk '$1=="sigs.k8s.io/cli-utils"{print $2; exit}' "$src/go.mod")"
lua="$(awk '$1=="github.com/yuin/gopher-lua"{print $2; exit}' "$src/go.mod")"
digest="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)"
out="$cache_root/health-kstatus-$kstatus-gopher-lua-$lua-$digest"
bin="$out/bin"
if [[ -x "$bin/health" ]]; then
  echo "$bin"
  exit 0
fi

echo "build-health: building kstatus $kstatus + gopher-lua $lua" >&2
mkdir -p "$bin"
# Build to a scratch name and move: an interrupted build leaves nothing the
# warm-cache check would accept.
(cd "$src" && CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" \
  go build -trimpath -ldflags "-s -w" -o "$bin/health.tmp" .)
mv "$bin/health.tmp" "$bin/health"
echo "$bin"
