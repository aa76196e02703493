#!/usr/bin/env bash
# Builds the pinned Matrix Authentication Service (MAS) for MATRIX_AUTH=mas
# stacks into a cache outside the repo, keyed by version, and prints that
# directory. It holds:
#   bin/mas-cli       the server (a debug build: `cargo build --locked -p mas-cli`)
#   policy.wasm       MAS's policy, built with OPA as policies/Makefile does
#   manifest.json     a Vite manifest mapping every asset the templates
#   assets/           include to an empty file (locales/*.json to copies of
#                     frontend/locales/): the web front end does not build
#                     from the registries reachable here, and the server's own
#                     pages (login, upstream OAuth, consent) need no script
#   templates/, translations/   copies of the release's
# Idempotent: a warm cache returns at once.
#
# MAS_SRC: the release's source tree (read-only is fine); when unset, the tag
# is cloned into the cache. The cargo target directory is shared across
# versions (mas-build/target) so that incremental rebuilds stay cheap; OPA is
# built from its Go module into opa-$OPA_VERSION.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
out="$cache_root/mas-$MAS_VERSION"
if [[ -f "$out/.complete" && -x "$out/bin/mas-cli" ]]; then
  echo "$out"
  exit 0
fi

log() { echo "build-mas: $*" >&2; }
mkdir -p "$out"

# --- source ---
src="${MAS_SRC:-}"
if [[ -z "$src" ]]; then
  src="$out/src"
  if [[ ! -f "$src/Cargo.lock" ]]; then
    log "cloning matrix-authentication-service v$MAS_VERSION"
    rm -rf "$src.tmp"
    git clone --quiet --depth 1 --branch "v$MAS_VERSION" \
      https://github.com/element-hq/matrix-authentication-service "$src.tmp" >&2
    mv "$src.tmp" "$src"
  fi
fi
src="$(cd "$src" && pwd)"
[[ -f "$src/Cargo.lock" && -d "$src/policies" && -d "$src/templates" ]] \
  || { log "$src is not a matrix-authentication-service source tree"; exit 1; }

# --- OPA (for the policy), from its Go module ---
opa_dir="$cache_root/opa-$OPA_VERSION"
opa="$opa_dir/opa"
if [[ ! -x "$opa" ]]; then
  log "building opa $OPA_VERSION (cold: a few minutes)"
  scratch="$opa_dir/gobin.tmp"
  rm -rf "$scratch"
  mkdir -p "$scratch"
  CGO_ENABLED=0 GOFLAGS="-buildvcs=false" GOBIN="$scratch" \
    go install "github.com/open-policy-agent/opa@$OPA_VERSION" >&2
  mv "$scratch/opa" "$opa"
  rm -rf "$scratch"
fi

# --- the server ---
if [[ ! -x "$out/bin/mas-cli" ]]; then
  target="$cache_root/mas-build/target"
  log "building mas-cli $MAS_VERSION (cold: about 15 minutes; log in $cache_root/mas-build/build.log)"
  mkdir -p "$out/bin" "$target"
  # SQLX_OFFLINE: the queries are checked against the .sqlx data in the
  # source, never against a DATABASE_URL that happens to be set.
  (cd "$src" && SQLX_OFFLINE=true CARGO_TARGET_DIR="$target" cargo build --locked -p mas-cli) \
    >> "$cache_root/mas-build/build.log" 2>&1 \
    || { log "cargo build failed: see $cache_root/mas-build/build.log"; exit 1; }
  # A hard link when it can (the debug binary is about 1 GB): cargo replaces
  # its own file on a rebuild, never this inode.
  ln -f "$target/debug/mas-cli" "$out/bin/mas-cli.tmp" 2>/dev/null \
    || cp "$target/debug/mas-cli" "$out/bin/mas-cli.tmp"
  mv "$out/bin/mas-cli.tmp" "$out/bin/mas-cli"
fi

# --- the policy: policies/Makefile's `opa build`, on a copy ---
work="$(mktemp -d "${TMPDIR:-/tmp}/build-mas.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp -r --no-preserve=mode "$src/policies" "$work/policies"
entrypoints=()
for e in client_registration register authorization_grant compat_login email; do
  entrypoints+=(-e "$e/violation")
done
inputs=(common/common.rego client_registration/client_registration.rego register/register.rego
  authorization_grant/authorization_grant.rego compat_login/compat_login.rego email/email.rego)
(cd "$work/policies" && "$opa" build -t wasm "${entrypoints[@]}" -o "$work/bundle.tar.gz" "${inputs[@]}" >&2)
tar -xzf "$work/bundle.tar.gz" -C "$work" /policy.wasm 2>/dev/null
chmod 644 "$work/policy.wasm"
mv "$work/policy.wasm" "$out/policy.wasm"

# --- templates, translations, and the front end's stand-in ---
rm -rf "$out/templates" "$out/translations" "$out/assets"
cp -r --no-preserve=mode "$src/templates" "$out/templates"
cp -r --no-preserve=mode "$src/translations" "$out/translations"
mkdir -p "$out/assets/locales"
cp --no-preserve=mode "$src"/frontend/locales/*.json "$out/assets/locales/"
# Every include_asset(...) the templates make must resolve in the manifest.
python3 - "$out" "$src/templates" <<'PY'
import json, os, pathlib, re, sys
out, templates = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
names = set()
for t in templates.rglob("*"):
    if t.is_file():
        names.update(re.findall(r"include_asset\('([^']+)'\)", t.read_text(errors="replace")))
manifest = {}
for name in sorted(names):
    stem, ext = os.path.splitext(os.path.basename(name))
    # Scripts are emitted as .js, stylesheets as .css (the server picks the tag by extension).
    out_ext = ".css" if ext == ".css" else ".js"
    (out / "assets" / f"{stem}{out_ext}").touch()
    manifest[name] = {"file": f"{stem}{out_ext}", "src": name, "isEntry": True}
for locale in sorted((out / "assets" / "locales").glob("*.json")):
    key = f"locales/{locale.name}"
    manifest[key] = {"file": key, "src": key}
(out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
PY
touch "$out/.complete"
log "done: $out"
echo "$out"
