#!/usr/bin/env bash
# Runs etcd and kube-apiserver on loopback until stopped (TERM or INT stop
# both): the stack's control plane, and a private one for the tests that
# change cluster-scoped objects such as CRDs.
#
#   control-plane.sh <dir> <pki> <api-port>
#
# <pki> holds ca.{crt,key}, apiserver.{crt,key}, admin.{crt,key} and
# sa.{key,pub} (tests/stack/up.sh makes them). Writes <dir>/kubeconfig (the
# admin, a system:masters client certificate) at once, and logs and etcd's
# data to <dir>; returns when the API server stops. STACK_CONTROL_PLANE_CPUS
# pins both to those CPUs; STACK_CONTROL_PLANE_NICE runs both at that nice
# level (a control plane on other machines, as in production, takes no CPU
# from Synapse).
set -euo pipefail
dir="$1" pki="$2" api_port="$3"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$("$here/build-tools.sh")"
mkdir -p "$dir"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
etcd_port="$(free_port)"; etcd_peer_port="$(free_port)"

children=()
stop() { # TERM, then KILL what is still there after 3 s
  trap - EXIT TERM INT
  ((${#children[@]})) || return 0
  kill "${children[@]}" 2>/dev/null || true
  for _ in $(seq 30); do
    kill -0 "${children[@]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "${children[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 143' TERM INT

pinned=()
if [[ -n "${STACK_CONTROL_PLANE_CPUS:-}" ]]; then pinned=(taskset -c "$STACK_CONTROL_PLANE_CPUS"); fi
if [[ -n "${STACK_CONTROL_PLANE_NICE:-}" ]]; then pinned=(nice -n "$STACK_CONTROL_PLANE_NICE" "${pinned[@]}"); fi

"${pinned[@]}" "$bin/etcd" --name stack --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "stack=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync --log-level warn > "$dir/etcd.log" 2>&1 &
children+=($!)

"${pinned[@]}" "$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/16 \
  --authorization-mode RBAC \
  --disable-admission-plugins ServiceAccount \
  --enable-priority-and-fairness=false \
  --profiling=false \
  --v 1 > "$dir/kube-apiserver.log" 2>&1 &
children+=($!)

cat > "$dir/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: stack
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: stack-admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: stack
  context: {cluster: stack, user: stack-admin}
current-context: stack
KCFG

# Either one ending ends the control plane.
wait -n "${children[@]}"
