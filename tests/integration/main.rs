//! Integration tests against the real local stack: kube-apiserver with etcd,
//! and Synapse, started by `tests/stack/up.sh`.

mod crds;
mod harness;
mod proxy;
mod users;
