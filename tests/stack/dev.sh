#!/usr/bin/env bash
# `make dev`: start the local stack, run the controller (and the sidecar's
# health endpoint) against it, apply config/samples/, show the result, and
# keep running until interrupted. Everything stops on Ctrl-C.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
: "${OPERATOR_BIN:?}"
dir="${STACK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/openmeet-dev.XXXXXX")}"

pids=()
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fifo="$dir/ready"; mkdir -p "$dir"; rm -f "$fifo"; mkfifo "$fifo"
"$here/up.sh" --dir "$dir" > "$fifo" &
pids+=($!)
read -r line < "$fifo"
env_file="${line#stack ready: }"
set -a; source "$env_file"; set +a

echo "dev: controller logs in $dir/controller.log" >&2
METRICS_LISTEN=127.0.0.1:0 "$OPERATOR_BIN" controller > "$dir/controller.log" 2>&1 &
pids+=($!)
"$OPERATOR_BIN" sidecar --listen 127.0.0.1:0 > "$dir/sidecar.log" 2>&1 &
pids+=($!)

"$KUBECTL" apply --server-side --field-manager dev -f "$repo/config/samples/" >/dev/null
for kind in matrixusers matrixrooms roompermissions; do
  "$KUBECTL" wait -n openmeet-demo --for=condition=Ready --timeout=120s "$kind" --all >/dev/null \
    || echo "dev: not every sample $kind is Ready yet; see $dir/controller.log" >&2
done

PATH="$STACK_BIN:$PATH"
cat <<MSG

  Local stack is up.
    export KUBECONFIG=$KUBECONFIG
    export PATH=$STACK_BIN:\$PATH      # kubectl built for this stack
    Synapse: $SYNAPSE_URL  (server name $MATRIX_SERVER_NAME)

MSG
"$KUBECTL" get matrix -A
echo
echo "Accounts in Synapse (admin API):"
token="$(grep '^AS_TOKEN=' "$dir/synapse/appservice.env" | cut -d= -f2)"
for u in $("$KUBECTL" get matrixusers -A -o jsonpath='{.items[*].status.userId}'); do
  curl -fsS -H "Authorization: Bearer $token" \
    "$SYNAPSE_URL/_synapse/admin/v2/users/$u?user_id=@$MATRIX_ADMIN_LOCALPART:$MATRIX_SERVER_NAME" \
    | python3 -c 'import json,sys; u=json.load(sys.stdin); print("  %-28s displayname=%-30r locked=%s deactivated=%s" % (u["name"], u["displayname"], u["locked"], u["deactivated"]))'
done
echo
echo "Press Ctrl-C to stop."
wait "${pids[0]}"
