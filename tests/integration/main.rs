//! Integration tests against the real local stack: kube-apiserver with etcd,
//! and Synapse, started by `tests/stack/up.sh`.

mod binary;
mod browser;
mod chart;
mod chart_upgrade;
mod crds;
mod direct;
mod feed;
mod grants;
mod ha;
mod hardening;
mod harm;
mod harness;
mod health;
mod idle;
mod mas;
mod mas_signin;
mod ownership;
mod platform_kit;
mod proxy;
mod rooms;
mod sidecar;
mod spaces;
mod users;
