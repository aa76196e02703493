#!/usr/bin/env bash
# Starts the local stack on loopback with ephemeral ports: etcd, kube-apiserver
# (secure port, admin client certificate in a generated kubeconfig) and Synapse
# (SQLite, or PostgreSQL with SYNAPSE_DATABASE=postgres) with the operator's application-service registration loaded and its
# admin account made a server admin. Installs the CRDs and stores the as_token
# in a Secret. Writes the connection details as shell assignments to
# "$STACK_DIR/stack.env", prints "stack ready: <env file>" and stays up until
# interrupted (or until --watch-pid exits), then tears everything down.
#
# Usage: up.sh [--dir DIR] [--watch-pid PID] [--ephemeral]
# --ephemeral removes DIR (state, logs, keys) on teardown.
# SYNAPSE_DATABASE=postgres runs Synapse on a throwaway PostgreSQL cluster
# (Debian's postgresql-$POSTGRES_MAJOR) on a loopback port, removed on teardown.
# MATRIX_AUTH=mas (default synapse) delegates Synapse's authentication to the
# Matrix Authentication Service (built by build-mas.sh; its database on the
# same kind of throwaway cluster): sign-in goes through MAS, whose upstream
# provider is the sidecar; MAS holds an OAuth client for the operator
# (client_credentials, urn:mas:admin), and the admin account is made through
# MAS's admin API.
# STACK_CONTROL_PLANE_CPUS=<cpu list> pins etcd and kube-apiserver to those CPUs
# (taskset), as a cluster keeps its control plane off Synapse's machine; the
# bench uses it to measure the operator without the control plane taking
# Synapse's core. Unset by default: everything shares every CPU.
# STACK_CONTROL_PLANE_NICE=<n> runs etcd and kube-apiserver at nice level n:
# they take only the CPU Synapse, PostgreSQL and the operator leave. Unset
# by default.
# Needs OPERATOR_BIN (the built openmeet-matrix-operator binary).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

dir=""
watch_pid=""
ephemeral=0
while (($#)); do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --ephemeral) ephemeral=1; shift ;;
    --watch-pid) watch_pid="$2"; shift 2 ;;
    *) echo "up.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
: "${OPERATOR_BIN:?set OPERATOR_BIN to the built openmeet-matrix-operator binary}"
[[ -n "$dir" ]] || dir="$(mktemp -d "${TMPDIR:-/tmp}/openmeet-stack.XXXXXX")"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
log() { echo "stack: $*" >&2; }

matrix_auth="${MATRIX_AUTH:-synapse}"
case "$matrix_auth" in
  synapse|mas) ;;
  *) log "MATRIX_AUTH must be synapse or mas"; exit 2 ;;
esac

pids=()
pg_pid=""
pg_dir=""
teardown() {
  trap - EXIT INT TERM
  # PostgreSQL's own "immediate" stop: its data is thrown away below.
  if [[ -n "$pg_pid" ]]; then kill -QUIT "$pg_pid" 2>/dev/null || true; fi
  if ((${#pids[@]})); then
    log "tearing down"
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
  fi
  if [[ -n "$pg_dir" ]]; then rm -rf "$pg_dir"; fi
  if ((ephemeral)); then rm -rf "$dir"; fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

bin="$("$here/build-tools.sh")"
venv="$("$here/install-synapse.sh")"
kubectl="$bin/kubectl"
if [[ "$matrix_auth" == mas ]]; then
  mas_home="$("$here/build-mas.sh")"
  mas_bin="$mas_home/bin/mas-cli"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_for() { # description, seconds, command...
  local what="$1" secs="$2"; shift 2
  for _ in $(seq $((secs * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "timed out waiting for $what (logs in $dir)"
  return 1
}

api_port="$(free_port)"; synapse_port="$(free_port)"; appservice_port="$(free_port)"; sidecar_port="$(free_port)"
if [[ "$matrix_auth" == mas ]]; then mas_port="$(free_port)"; fi
server_name="openmeet.test"

# --- certificates: one CA for the API server's serving and client certs ---
pki="$dir/pki"; mkdir -p "$pki"
openssl_quiet() { openssl "$@" >/dev/null 2>&1; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=openmeet-stack-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > "$pki/apiserver.ext"
printf 'extendedKeyUsage=clientAuth\n' > "$pki/client.ext"
openssl_quiet x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt"
openssl_quiet req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=stack-admin" -keyout "$pki/admin.key" -out "$pki/admin.csr"
openssl_quiet x509 -req -in "$pki/admin.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 -extfile "$pki/client.ext" -out "$pki/admin.crt"
# The sidecar's serving certificate; Synapse trusts the CA through SSL_CERT_FILE.
openssl_quiet req -newkey rsa:2048 -nodes -subj "/CN=openmeet-sidecar" -keyout "$pki/sidecar.key" -out "$pki/sidecar.csr"
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$pki/sidecar.ext"
openssl_quiet x509 -req -in "$pki/sidecar.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 -extfile "$pki/sidecar.ext" -out "$pki/sidecar.crt"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

if [[ -n "${STACK_CONTROL_PLANE_CPUS:-}" ]]; then
  log "etcd and kube-apiserver pinned to CPUs $STACK_CONTROL_PLANE_CPUS"
fi
if [[ -n "${STACK_CONTROL_PLANE_NICE:-}" ]]; then
  log "etcd and kube-apiserver at nice level $STACK_CONTROL_PLANE_NICE"
fi

# --- etcd and kube-apiserver ---
"$here/control-plane.sh" "$dir" "$pki" "$api_port" &
pids+=($!)
kubeconfig="$dir/kubeconfig"
export KUBECONFIG="$kubeconfig"

# --- OIDC: the sidecar's signing key, its client (Synapse) and the platform's HS256 secret ---
oidc="$dir/oidc"; mkdir -p "$oidc/keys"
openssl_quiet genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$oidc/keys/stack-1.pem"
random_secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
random_secret > "$oidc/client_secret"
random_secret > "$oidc/platform_secret"
chmod 600 "$oidc"/client_secret "$oidc"/platform_secret "$oidc"/keys/*.pem
sidecar_url="https://127.0.0.1:$sidecar_port"
idp_id="openmeet"

# --- PostgreSQL (SYNAPSE_DATABASE=postgres, MATRIX_AUTH=mas): one throwaway cluster ---
synapse_database="${SYNAPSE_DATABASE:-sqlite}"
case "$synapse_database" in
  sqlite|postgres) ;;
  *) log "SYNAPSE_DATABASE must be sqlite or postgres"; exit 2 ;;
esac
if [[ "$synapse_database" == postgres || "$matrix_auth" == mas ]]; then
  pg_bin="/usr/lib/postgresql/$POSTGRES_MAJOR/bin"
  [[ -x "$pg_bin/postgres" ]] || { log "SYNAPSE_DATABASE=postgres and MATRIX_AUTH=mas run PostgreSQL: they need Debian's postgresql-$POSTGRES_MAJOR (apt-get install postgresql-$POSTGRES_MAJOR libpq-dev)"; exit 1; }
  pg_port="$(free_port)"
  # PostgreSQL refuses to run as root: as root, its cluster belongs to the
  # postgres account Debian's package creates, in a directory of its own.
  pg_dir="$(mktemp -d "${TMPDIR:-/tmp}/openmeet-pg.XXXXXX")"
  as_pg=()
  if ((EUID == 0)); then
    chown postgres: "$pg_dir"
    as_pg=(setpriv --reuid postgres --regid postgres --init-groups)
  fi
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U synapse --auth=trust --encoding UTF8 --locale C > "$dir/postgres-initdb.log" 2>&1
  # A test database: durability is traded for speed (the cluster is thrown away).
  "${as_pg[@]}" "$pg_bin/postgres" -D "$pg_dir/data" -p "$pg_port" -k "$pg_dir" \
    -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    > "$dir/postgres.log" 2>&1 &
  pg_pid=$!
  pids+=("$pg_pid")
  wait_for "PostgreSQL" 60 "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"
fi
case "$synapse_database" in
  sqlite)
    database_config="  name: sqlite3
  args:
    database: \"$dir/synapse/homeserver.db\""
    ;;
  postgres)
    "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U synapse -T template0 synapse
    database_config="  name: psycopg2
  args:
    user: synapse
    dbname: synapse
    host: 127.0.0.1
    port: $pg_port
    cp_min: 2
    cp_max: 10"
    ;;
esac

# --- MAS (MATRIX_AUTH=mas): its database, configuration and server ---
if [[ "$matrix_auth" == mas ]]; then
  mas="$dir/mas"; mkdir -p "$mas"
  mas_url="http://127.0.0.1:$mas_port"
  # IDs in MAS's configuration are ULIDs (Crockford base32, 26 characters).
  new_ulid() {
    python3 -c 'import os, time
n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
print("".join("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(n >> (5 * i)) & 31] for i in range(25, -1, -1)))'
  }
  mas_client_id="$(new_ulid)"      # the operator's client (client_credentials, urn:mas:admin)
  mas_provider="$(new_ulid)"       # the upstream provider: the sidecar
  random_secret > "$mas/client_secret"
  # MAS and Synapse authenticate each other with this one shared secret.
  python3 -c 'import secrets; print(secrets.token_hex(32))' > "$mas/homeserver_secret"
  chmod 600 "$mas/client_secret" "$mas/homeserver_secret"
  "$pg_bin/createuser" -h 127.0.0.1 -p "$pg_port" -U synapse mas
  "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U synapse -T template0 -O mas mas
  mas_database_url="postgresql://mas@127.0.0.1:$pg_port/mas"
  # `config generate` gives the secrets (encryption key, signing keys) and
  # defaults; the stack's choices are patched over it (Synapse's venv has PyYAML).
  "$mas_bin" config generate > "$mas/generated.yaml" 2> "$mas/setup.log"
  MAS_URL="$mas_url" MAS_PORT="$mas_port" MAS_HOME="$mas_home" MAS_DATABASE_URL="$mas_database_url" \
  MAS_DIR="$mas" SYNAPSE_URL="http://127.0.0.1:$synapse_port" SERVER_NAME="$server_name" \
  MAS_CLIENT_ID="$mas_client_id" MAS_PROVIDER="$mas_provider" SIDECAR_URL="$sidecar_url" \
  SIDECAR_CLIENT_SECRET_FILE="$oidc/client_secret" \
    "$venv/bin/python" - "$mas/generated.yaml" "$mas/config.yaml" <<'PY'
import os, sys, yaml
e = os.environ
config = yaml.safe_load(open(sys.argv[1]))
home, d = e["MAS_HOME"], e["MAS_DIR"]
config["http"] = {
    "public_base": e["MAS_URL"] + "/",
    "issuer": e["MAS_URL"] + "/",
    "listeners": [{
        "name": "web",
        "resources": [{"name": n} for n in
                      ("discovery", "human", "oauth", "compat", "graphql", "adminapi", "health")]
                     + [{"name": "assets", "path": home + "/assets/"}],
        "binds": [{"address": "127.0.0.1:" + e["MAS_PORT"]}],
    }],
}
config["database"] = {"uri": e["MAS_DATABASE_URL"]}
config["matrix"] = {
    "kind": "synapse",
    "homeserver": e["SERVER_NAME"],
    "endpoint": e["SYNAPSE_URL"] + "/",
    "secret_file": d + "/homeserver_secret",
}
config["templates"] = {
    "path": home + "/templates/",
    "assets_manifest": home + "/manifest.json",
    "translations_path": home + "/translations/",
}
# The operator's client may ask for urn:mas:admin with client_credentials
# (policies/authorization_grant: data.admin_clients).
config["policy"] = {"wasm_module": home + "/policy.wasm", "data": {"admin_clients": [e["MAS_CLIENT_ID"]]}}
config["clients"] = [{
    "client_id": e["MAS_CLIENT_ID"],
    "client_name": "openmeet-matrix-operator",
    "client_auth_method": "client_secret_basic",
    "client_secret_file": d + "/client_secret",
}]
# Sign-in only through the sidecar: no passwords, no self-registration.
config["passwords"] = {"enabled": False}
config.setdefault("account", {}).update({"password_registration_enabled": False})
config["email"] = {"from": '"OpenMeet" <root@localhost>', "reply_to": '"OpenMeet" <root@localhost>',
                   "transport": "blackhole"}
config["upstream_oauth2"] = {"providers": [{
    "id": e["MAS_PROVIDER"],
    "human_name": "OpenMeet",
    "issuer": e["SIDECAR_URL"],
    "client_id": "mas",
    "client_secret_file": e["SIDECAR_CLIENT_SECRET_FILE"],
    "token_endpoint_auth_method": "client_secret_basic",
    # The sidecar signs its ID tokens with an EC P-256 key.
    "id_token_signed_response_alg": "ES256",
    "pkce_method": "always",
    "scope": "openid profile email",
    # Accounts are made by the operator, each with an upstream link whose
    # subject is the ID token's `sub`: a sign-in finds its link and imports
    # nothing. A subject without a link would register; like Synapse's
    # `enable_registration: false` for its OIDC provider, a registration
    # token (none exists) stops it.
    "registration_token_required": True,
    "claims_imports": {
        "subject": {"template": "{{ user.sub }}"},
        "localpart": {"action": "require", "template": "{{ user.preferred_username }}"},
        "displayname": {"action": "force", "template": "{{ user.name }}"},
        "email": {"action": "force", "template": "{{ user.email }}"},
    },
}]}
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
PY
  mas_cli() { "$mas_bin" --config "$mas/config.yaml" "$@" >> "$mas/setup.log" 2>&1 \
    || { log "mas-cli $1 $2 failed (see $mas/setup.log)"; exit 1; }; }
  mas_cli config check
  mas_cli database migrate
  mas_cli config sync --prune    # the client and the provider, into MAS's database
  # MAS reaches the sidecar (its upstream provider) over HTTPS: its HTTP
  # client (rustls with the platform verifier) reads SSL_CERT_FILE.
  (SSL_CERT_FILE="$pki/ca.crt" exec "$mas_bin" --config "$mas/config.yaml" server --no-migrate --no-sync) \
    > "$mas/mas.log" 2>&1 &
  pids+=($!)
fi

# --- Synapse ---
syn="$dir/synapse"; mkdir -p "$syn/media"
synapse_url="http://127.0.0.1:$synapse_port"
"$OPERATOR_BIN" registration --server-name "$server_name" --url "http://127.0.0.1:$appservice_port" --out "$syn/appservice.yaml" --secret-env "$syn/appservice.env"
# shellcheck disable=SC1091
source "$syn/appservice.env"   # AS_TOKEN, HS_TOKEN, ADMIN_LOCALPART
shared_secret="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
if [[ "$matrix_auth" == synapse ]]; then
  auth_config="# Sign-in through the sidecar (see config/synapse-oidc.yaml for the why of each line).
oidc_providers:
  - idp_id: \"$idp_id\"
    idp_name: \"OpenMeet\"
    issuer: \"$sidecar_url\"
    client_id: \"synapse\"
    client_secret_path: \"$oidc/client_secret\"
    client_auth_method: client_secret_basic
    pkce_method: always
    scopes: [\"openid\", \"profile\", \"email\"]
    allow_existing_users: false
    enable_registration: false
    user_mapping_provider:
      config:
        subject_template: \"{{ user.sub }}\"
        localpart_template: \"{{ user.preferred_username }}\"
        display_name_template: \"{{ user.name }}\"
sso:
  client_whitelist: [\"http://localhost/\"]"
else
  auth_config="# Authentication delegated to MAS (sign-in through MAS, whose upstream provider
# is the sidecar); Synapse refuses to start with its own password login on.
password_config:
  enabled: false
matrix_authentication_service:
  enabled: true
  endpoint: \"$mas_url/\"
  secret_path: \"$mas/homeserver_secret\""
fi
cat > "$syn/log.yaml" <<LOGCFG
version: 1
formatters:
  plain: {format: '%(asctime)s %(levelname)s %(name)s %(message)s'}
handlers:
  file: {class: logging.FileHandler, filename: $syn/homeserver.log, formatter: plain}
root: {level: INFO, handlers: [file]}
disable_existing_loggers: false
LOGCFG
cat > "$syn/homeserver.yaml" <<SYNCFG
server_name: "$server_name"
public_baseurl: "$synapse_url/"
pid_file: "$syn/homeserver.pid"
listeners:
  - port: $synapse_port
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
$database_config
log_config: "$syn/log.yaml"
media_store_path: "$syn/media"
signing_key_path: "$syn/signing.key"
registration_shared_secret: "$shared_secret"
report_stats: false
# Synapse's own defaults unless set: SYNAPSE_EVENT_CACHE_SIZE and
# SYNAPSE_CACHE_FACTOR size its caches for a larger tenant (docs/benchmarks.md).
event_cache_size: "${SYNAPSE_EVENT_CACHE_SIZE:-10K}"
caches:
  global_factor: ${SYNAPSE_CACHE_FACTOR:-0.5}
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: false
app_service_config_files: ["$syn/appservice.yaml"]
# Synapse refuses every directory publication by default: allow the operator's
# managed rooms, except one alias pattern the tests use to see a refusal.
$auth_config
room_list_publication_rules:
  - alias: "#openmeet-refused-*"
    action: deny
  - user_id: "@$ADMIN_LOCALPART:$server_name"
    alias: "#openmeet-*"
    action: allow
SYNCFG
(cd "$syn" && "$venv/bin/python" -m synapse.app.homeserver -c homeserver.yaml --generate-keys >/dev/null 2>&1)
# Synapse runs under a small supervisor so that tests/stack/restart-synapse.sh
# can restart it (same port, same database) without this script taking the
# stop for a crash: it writes the restart marker (holding how many seconds to
# stay down), then stops the pid in synapse.pid. Any other exit ends the
# supervisor, which the loop below notices.
supervise_synapse() {
  local child="" down
  trap '[[ -n "$child" ]] && kill "$child" 2>/dev/null; wait; exit 0' TERM INT
  while :; do
    (cd "$syn" && SSL_CERT_FILE="$pki/ca.crt" exec "$venv/bin/python" -m synapse.app.homeserver -c homeserver.yaml) >> "$syn/stdout.log" 2>&1 &
    child=$!
    echo "$child" > "$syn/synapse.pid"
    wait "$child" || true
    [[ -f "$syn/restart" ]] || exit 1
    down="$(cat "$syn/restart")"
    rm -f "$syn/restart"
    echo "supervisor: restarting Synapse in ${down:-0}s" >> "$syn/stdout.log"
    sleep "${down:-0}" & child=$!   # in the background, so that TERM still ends it at once
    wait "$child" || true
  done
}
supervise_synapse &
pids+=($!)

wait_for "kube-apiserver" 120 "$kubectl" get --raw /readyz
wait_for "Synapse" 120 curl -fsS "$synapse_url/health"

# The operator's admin account: a server admin made once, at bootstrap.
if [[ "$matrix_auth" == synapse ]]; then
  "$venv/bin/register_new_matrix_user" -u "$ADMIN_LOCALPART" -a -k "$shared_secret" \
    --password="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" "$synapse_url" >/dev/null
else
  # With MAS, Synapse registers no one itself (no register_new_matrix_user,
  # no admin-API user creation): the account is made in MAS, which provisions
  # it in Synapse. In MAS's own database too, so that MAS can mint tokens for
  # it (skip_homeserver_check: the localpart is in the appservice's namespace,
  # non-exclusive). Synapse then counts a request as a server admin's only when
  # its token carries urn:synapse:admin:* (an as_token carries no scope), so the
  # `admin` flag is set through Synapse's admin API with a short-lived personal
  # session of the account itself, revoked at once; the flag still matters
  # where Synapse reads it from its database (e.g. the room-complexity check
  # on joins).
  wait_for "MAS" 120 curl -fsS "$mas_url/health"
  json_get() { python3 -c 'import json, sys
d = json.load(sys.stdin)
for k in sys.argv[1:]: d = d[k]
print(d)' "$@"; }
  mas_api() { # method path [json body]
    curl -fsS -X "$1" -H "Authorization: Bearer $mas_admin_token" -H "Content-Type: application/json" \
      ${3:+-d "$3"} "$mas_url/api/admin/v1$2"
  }
  mas_admin_token="$(curl -fsS -u "$mas_client_id:$(cat "$mas/client_secret")" \
    -d grant_type=client_credentials -d scope=urn:mas:admin "$mas_url/oauth2/token" | json_get access_token)"
  admin_mas_id="$(mas_api POST /users "{\"username\": \"$ADMIN_LOCALPART\", \"skip_homeserver_check\": true}" | json_get data id)"
  mas_api POST "/users/$admin_mas_id/set-admin" '{"admin": true}' >/dev/null
  bootstrap="$(mas_api POST /personal-sessions "{\"actor_user_id\": \"$admin_mas_id\", \"human_name\": \"stack bootstrap\",
    \"scope\": \"urn:matrix:client:api:* urn:synapse:admin:*\", \"expires_in\": 300}")"
  curl -fsS -X PUT -H "Authorization: Bearer $(json_get data attributes access_token <<<"$bootstrap")" \
    -d '{"admin": true}' "$synapse_url/_synapse/admin/v2/users/@$ADMIN_LOCALPART:$server_name" >/dev/null
  mas_api POST "/personal-sessions/$(json_get data id <<<"$bootstrap")/revoke" >/dev/null
fi

# CRDs, and the as_token where the controller reads it.
"$kubectl" apply --server-side --field-manager stack -f "$repo/crds/" >/dev/null
"$kubectl" wait --for condition=Established --timeout 60s crd --all >/dev/null
"$kubectl" create namespace openmeet-system >/dev/null
"$kubectl" -n openmeet-system create secret generic matrix-appservice \
  --from-literal=as_token="$AS_TOKEN" --from-literal=hs_token="$HS_TOKEN" >/dev/null

# The sidecar's configuration (the sidecar itself is started by its user:
# the tests, or `make dev`). Its one OIDC client is Synapse, or with MAS,
# MAS's upstream provider (same secret file); with MAS, the `mas` block is
# the operator's client there.
if [[ "$matrix_auth" == synapse ]]; then
  sidecar_client="  - id: synapse
    secretFile: \"$oidc/client_secret\"
    redirectUris: [\"$synapse_url/_synapse/client/oidc/callback\"]"
else
  sidecar_client="  - id: mas
    secretFile: \"$oidc/client_secret\"
    redirectUris: [\"$mas_url/upstream/callback/$mas_provider\"]"
fi
cat > "$dir/sidecar.yaml" <<SIDECAR
listen: "127.0.0.1:$sidecar_port"
issuer: "$sidecar_url"
tls: {certFile: "$pki/sidecar.crt", keyFile: "$pki/sidecar.key"}
signingKeys: {dir: "$oidc/keys"}
clients:
$sidecar_client
platform:
  issuer: "https://platform.openmeet.test"
  audience: "openmeet-matrix"
  secretFile: "$oidc/platform_secret"
  loginUrl: "https://platform.openmeet.test/login"
homeserver:
  url: "$synapse_url"
  serverName: "$server_name"
  adminLocalpart: "$ADMIN_LOCALPART"
  asTokenSecret: openmeet-system/matrix-appservice
reloadSeconds: 1
metricsListen: "127.0.0.1:0"
SIDECAR
if [[ "$matrix_auth" == mas ]]; then
  cat >> "$dir/sidecar.yaml" <<SIDECAR
mas:
  url: "$mas_url"
  clientId: "$mas_client_id"
  clientSecretFile: "$mas/client_secret"
SIDECAR
fi

env_file="$dir/stack.env"
cat > "$env_file.tmp" <<ENV
KUBECONFIG=$kubeconfig
STACK_DIR=$dir
STACK_BIN=$bin
KUBECTL=$kubectl
SYNAPSE_URL=$synapse_url
MATRIX_SERVER_NAME=$server_name
AS_TOKEN_SECRET=openmeet-system/matrix-appservice
MATRIX_ADMIN_LOCALPART=$ADMIN_LOCALPART
SYNAPSE_CONFIG=$syn/homeserver.yaml
SYNAPSE_VENV=$venv
SYNAPSE_DATABASE=$synapse_database
APPSERVICE_PORT=$appservice_port
APPSERVICE_LISTEN=127.0.0.1:$appservice_port
STACK_CA=$pki/ca.crt
SIDECAR_CONFIG=$dir/sidecar.yaml
SIDECAR_URL=$sidecar_url
SIDECAR_LISTEN=127.0.0.1:$sidecar_port
SIDECAR_CERT=$pki/sidecar.crt
SIDECAR_KEY=$pki/sidecar.key
OIDC_IDP_ID=$idp_id
OIDC_CLIENT_SECRET_FILE=$oidc/client_secret
PLATFORM_ISSUER=https://platform.openmeet.test
PLATFORM_AUDIENCE=openmeet-matrix
PLATFORM_SECRET_FILE=$oidc/platform_secret
MATRIX_AUTH=$matrix_auth
ENV
if [[ "$matrix_auth" == mas ]]; then
  cat >> "$env_file.tmp" <<ENV
MAS_URL=$mas_url
MAS_CLIENT_ID=$mas_client_id
MAS_CLIENT_SECRET_FILE=$mas/client_secret
MAS_UPSTREAM_PROVIDER=$mas_provider
MAS_CONFIG=$mas/config.yaml
MAS_BIN=$mas_bin
MAS_DATABASE_URL=$mas_database_url
ENV
fi
mv "$env_file.tmp" "$env_file"
echo "stack ready: $env_file"

# Stay up until interrupted, or until the process we serve goes away.
while :; do
  if [[ -n "$watch_pid" ]] && ! kill -0 "$watch_pid" 2>/dev/null; then break; fi
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then log "a stack process ($p) died; see logs in $dir"; exit 1; fi
  done
  sleep 1
done
