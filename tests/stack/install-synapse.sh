#!/usr/bin/env bash
# Installs the pinned matrix-synapse[oidc] from PyPI into a virtualenv cached
# outside the repo, keyed by version. Prints the virtualenv directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
python="${PYTHON:-python3}"
pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
venv="$cache_root/synapse-$SYNAPSE_VERSION-py$pyver"
if [[ -x "$venv/bin/python" && -f "$venv/.complete" ]]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
echo "install-synapse: installing matrix-synapse[oidc]==$SYNAPSE_VERSION into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse[oidc]==$SYNAPSE_VERSION" >&2
touch "$venv/.complete"
echo "$venv"
