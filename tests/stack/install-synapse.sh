#!/usr/bin/env bash
# Installs the pinned matrix-synapse[oidc] from PyPI into a virtualenv cached
# outside the repo, keyed by version. Prints the virtualenv directory.
# With SYNAPSE_DATABASE=postgres, a second virtualenv also holds the pinned
# psycopg2 (built from source against Debian's libpq-dev), so the default
# SQLite stack needs nothing beyond Python.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${OPENMEET_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/openmeet-matrix-operator}"
python="${PYTHON:-python3}"
pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
extras="oidc"
packages=()
venv="$cache_root/synapse-$SYNAPSE_VERSION-py$pyver"
case "${SYNAPSE_DATABASE:-sqlite}" in
  sqlite) ;;
  postgres)
    extras="oidc,postgres"
    packages=("psycopg2==$PSYCOPG2_VERSION")
    venv="$venv-psycopg2-$PSYCOPG2_VERSION"
    ;;
  *) echo "install-synapse: SYNAPSE_DATABASE must be sqlite or postgres" >&2; exit 2 ;;
esac
if [[ -x "$venv/bin/python" && -f "$venv/.complete" ]]; then
  echo "$venv"
  exit 0
fi
rm -rf "$venv"
echo "install-synapse: installing matrix-synapse[$extras]==$SYNAPSE_VERSION ${packages[*]} into $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse[$extras]==$SYNAPSE_VERSION" "${packages[@]}" >&2
touch "$venv/.complete"
echo "$venv"
