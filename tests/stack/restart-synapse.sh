#!/usr/bin/env bash
# Restarts the local stack's Synapse on the same port and database, and
# returns once it answers /health again (used by `make chaos`).
#
# Usage: restart-synapse.sh STACK_ENV [--kill] [--down SECONDS]
# STACK_ENV is the stack.env that up.sh printed. --kill stops Synapse with
# SIGKILL (a crash) instead of SIGTERM (a clean shutdown); --down keeps it
# stopped that many seconds before up.sh's supervisor starts it again.
set -euo pipefail
env_file="${1:?usage: restart-synapse.sh STACK_ENV [--kill] [--down SECONDS]}"
shift
signal=TERM
down=0
while (($#)); do
  case "$1" in
    --kill) signal=KILL; shift ;;
    --down) down="$2"; shift 2 ;;
    *) echo "restart-synapse: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ "$down" =~ ^[0-9]+$ ]] || { echo "restart-synapse: --down takes whole seconds" >&2; exit 2; }
# shellcheck disable=SC1090
source "$env_file"
syn="$STACK_DIR/synapse"
old="$(cat "$syn/synapse.pid" 2>/dev/null || true)"
if [[ -z "$old" ]] || ! kill -0 "$old" 2>/dev/null; then
  echo "restart-synapse: no running Synapse in $syn/synapse.pid (a stack started by this up.sh?)" >&2
  exit 1
fi

# The marker tells up.sh's supervisor that this stop is a restart, and for how long.
echo "$down" > "$syn/restart"
kill "-$signal" "$old"
for _ in $(seq 300); do   # 30 s for the old process to go
  kill -0 "$old" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$old" 2>/dev/null; then
  echo "restart-synapse: Synapse ($old) did not stop; sending SIGKILL" >&2
  kill -KILL "$old" 2>/dev/null || true
fi
for _ in $(seq $(((120 + down) * 10))); do  # the down time, then 120 s for it to answer
  new="$(cat "$syn/synapse.pid" 2>/dev/null || true)"
  if [[ -n "$new" && "$new" != "$old" ]] && curl -fsS -o /dev/null "$SYNAPSE_URL/health" 2>/dev/null; then
    echo "restart-synapse: Synapse restarted ($old -> $new) after ${down}s down" >&2
    exit 0
  fi
  sleep 0.1
done
echo "restart-synapse: Synapse did not come back (see $syn/stdout.log)" >&2
exit 1
