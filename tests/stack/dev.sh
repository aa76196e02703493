#!/usr/bin/env bash
# `make dev`: start the local stack, run the controller and the sidecar (the
# OIDC provider Synapse's SSO uses, or with MATRIX_AUTH=mas MAS's upstream
# provider, and the credential API) against it, with a stand-in platform login
# page, apply config/samples/, show the result, and keep running until
# interrupted. Everything stops on Ctrl-C.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
: "${OPERATOR_BIN:?}"
# A directory of its own unless STACK_DIR names one to keep.
made_dir=0
if [[ -n "${STACK_DIR:-}" ]]; then dir="$STACK_DIR"; else
  dir="$(mktemp -d "${TMPDIR:-/tmp}/openmeet-dev.XXXXXX")"; made_dir=1
fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if ((made_dir)); then rm -rf "$dir"; fi
}
trap cleanup EXIT
# Ctrl-C is how `make dev` is meant to end: a clean stop, not a failure.
trap 'cleanup; exit 0' INT TERM

fifo="$dir/ready"; mkdir -p "$dir"; rm -f "$fifo"; mkfifo "$fifo"
"$here/up.sh" --dir "$dir" > "$fifo" &
pids+=($!)
read -r line < "$fifo"
env_file="${line#stack ready: }"
set -a; source "$env_file"; set +a

echo "dev: controller logs in $dir/controller.log" >&2
METRICS_LISTEN=127.0.0.1:0 "$OPERATOR_BIN" controller > "$dir/controller.log" 2>&1 &
pids+=($!)
platform_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
echo "dev: sidecar logs in $dir/sidecar.log" >&2
"$OPERATOR_BIN" sidecar --config "$SIDECAR_CONFIG" \
  --platform-login-url "http://127.0.0.1:$platform_port/login" > "$dir/sidecar.log" 2>&1 &
pids+=($!)
OPERATOR_BIN="$OPERATOR_BIN" SIDECAR_URL="$SIDECAR_URL" python3 "$here/dev-platform.py" "$platform_port" > "$dir/platform.log" 2>&1 &
pids+=($!)

# The address a process logged for `what` ("metrics listening"): it binds
# port 0, so only its log knows the port. Waits up to 30 s.
bound() {
  local log="$1" what="$2" addr=""
  for _ in $(seq 300); do
    addr="$(sed 's/\x1b\[[0-9;]*m//g' "$log" 2>/dev/null \
      | sed -n "s/.*${what}.*addr=\([0-9.:]*\).*/\1/p" | head -n1)"
    [[ -n "$addr" ]] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "(not bound: see $log)"
}
controller_metrics="$(bound "$dir/controller.log" "metrics listening")"
sidecar_metrics="$(bound "$dir/sidecar.log" "sidecar metrics listening")"

"$KUBECTL" apply --server-side --field-manager dev -f "$repo/config/samples/" >/dev/null
for kind in matrixusers matrixrooms roompermissions; do
  "$KUBECTL" wait -n openmeet-demo --for=condition=Ready --timeout=120s "$kind" --all >/dev/null \
    || echo "dev: not every sample $kind is Ready yet; see $dir/controller.log" >&2
done

PATH="$STACK_BIN:$PATH"
if [[ "${MATRIX_AUTH:-synapse}" == mas ]]; then
  mas_line="
    MAS:     $MAS_URL  (Matrix Authentication Service; config $MAS_CONFIG)"
  sign_in="Sign in with a Matrix client: homeserver $SYNAPSE_URL; sign-in goes
  through MAS at $MAS_URL, \"Continue with OpenMeet\" (its upstream provider,
  the sidecar), accept the stack CA's certificate for $SIDECAR_URL (or import
  $STACK_CA), pick a sample user on the dev login page."
else
  mas_line=""
  sign_in="Sign in with a Matrix client: homeserver $SYNAPSE_URL, \"Continue with
  OpenMeet\", accept the stack CA's certificate for $SIDECAR_URL (or import
  $STACK_CA), pick a sample user on the dev login page."
fi
cat <<MSG

  Local stack is up.
    export KUBECONFIG=$KUBECONFIG
    export PATH=$STACK_BIN:\$PATH      # kubectl built for this stack
    Synapse: $SYNAPSE_URL  (server name $MATRIX_SERVER_NAME)
    Sidecar: $SIDECAR_URL  (OIDC issuer; CA: $STACK_CA)$mas_line
    Platform login (dev stand-in): http://127.0.0.1:$platform_port/login
    Metrics: controller http://$controller_metrics/metrics (also /healthz, /readyz)
             sidecar    http://$sidecar_metrics/metrics

  $sign_in

  Matrix credentials through the credential API:
    set -a; source $env_file; set +a
    TOKEN=\$($OPERATOR_BIN dev-token --subject 7f3c2a10-0000-4000-8000-000000000001 --tenant demo)
    curl --cacert \$STACK_CA -X POST -H "Authorization: Bearer \$TOKEN" \$SIDECAR_URL/api/v1/credentials

MSG
"$KUBECTL" get matrix -A
echo
if [[ "${MATRIX_AUTH:-synapse}" == mas ]]; then
  # With MAS, Synapse's admin API takes only tokens with urn:synapse:admin:*
  # (not the as_token): ask MAS's admin API, as the operator's client.
  echo "Accounts in MAS (admin API):"
  token="$(curl -fsS -u "$MAS_CLIENT_ID:$(cat "$MAS_CLIENT_SECRET_FILE")" -d grant_type=client_credentials \
    -d scope=urn:mas:admin "$MAS_URL/oauth2/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')"
  for u in $("$KUBECTL" get matrixusers -A -o jsonpath='{.items[*].status.userId}'); do
    localpart="${u#@}"; localpart="${localpart%%:*}"
    curl -fsS -H "Authorization: Bearer $token" "$MAS_URL/api/admin/v1/users/by-username/$localpart" \
      | python3 -c 'import json,sys; u=json.load(sys.stdin)["data"]["attributes"]; print("  %-28s locked=%s deactivated=%s" % (u["username"], u["locked_at"] is not None, u["deactivated_at"] is not None))' \
      || echo "  $u: not in MAS"
  done
else
echo "Accounts in Synapse (admin API):"
token="$(grep '^AS_TOKEN=' "$dir/synapse/appservice.env" | cut -d= -f2)"
for u in $("$KUBECTL" get matrixusers -A -o jsonpath='{.items[*].status.userId}'); do
  curl -fsS -H "Authorization: Bearer $token" \
    "$SYNAPSE_URL/_synapse/admin/v2/users/$u?user_id=@$MATRIX_ADMIN_LOCALPART:$MATRIX_SERVER_NAME" \
    | python3 -c 'import json,sys; u=json.load(sys.stdin); print("  %-28s displayname=%-30r locked=%s deactivated=%s" % (u["name"], u["displayname"], u["locked"], u["deactivated"]))'
done
fi
echo
echo "Press Ctrl-C to stop."
wait "${pids[0]}"
