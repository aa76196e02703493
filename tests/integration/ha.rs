//! Several controller replicas: exactly one reconciles (it holds the Lease);
//! when it dies, another takes over and converges new changes.

use crate::harness::{controller_command, free_port, unique, wait_for, Options, TestEnv};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use std::time::{Duration, Instant};

struct Replica {
    child: tokio::process::Child,
    metrics: String,
}

fn replica(env: &TestEnv, lease: &str, name: &str) -> Replica {
    let port = free_port();
    let child = controller_command(env)
        .env("LEADER_ELECT", "true")
        .env("LEASE_NAME", lease)
        .env("POD_NAMESPACE", env.ns(0))
        .env("POD_NAME", name)
        .env("LEASE_DURATION_SECONDS", "4")
        .env("LEASE_RENEW_SECONDS", "1")
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start controller replica");
    Replica {
        child,
        metrics: format!("http://127.0.0.1:{port}"),
    }
}

async fn holder(env: &TestEnv, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), env.ns(0));
    leases.get_opt(lease).await.ok()??.spec?.holder_identity
}

/// The replica's count of MatrixUser reconciles, from its /metrics.
async fn user_reconciles(r: &Replica) -> u64 {
    let text = reqwest::get(format!("{}/metrics", r.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("openmeet_reconciles_total{kind=\"MatrixUser\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let env = TestEnv::with(
        "ha",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let lease = unique("lease");
    let mut a = replica(&env, &lease, "replica-a");
    wait_for("replica-a to lead", || async {
        (holder(&env, &lease).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = replica(&env, &lease, "replica-b");
    // The standby is ready (it serves the transaction endpoint) but does not reconcile.
    let http = reqwest::Client::new();
    wait_for("the standby to be ready", || async {
        let r = http
            .get(format!("{}/readyz", b.metrics))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    env.create_user(0, "first", json!({"localpart": unique("first")}))
        .await;
    env.wait_ready(0, "first", true, "Converged").await;
    assert!(user_reconciles(&a).await > 0);
    assert_eq!(user_reconciles(&b).await, 0, "only the leader reconciles");
    assert_eq!(holder(&env, &lease).await.as_deref(), Some("replica-a"));

    // The leader dies without a word; the standby takes over once the lease lapses.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let killed = Instant::now();
    env.create_user(0, "second", json!({"localpart": unique("second")}))
        .await;
    env.wait_ready(0, "second", true, "Converged").await;
    assert_eq!(holder(&env, &lease).await.as_deref(), Some("replica-b"));
    assert!(user_reconciles(&b).await > 0);
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "hand-over took {:?}",
        killed.elapsed()
    );

    // A leader stopped with SIGTERM releases the lease at once.
    let pid = b.child.id().unwrap().to_string();
    let mut b = b;
    tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), b.child.wait())
        .await
        .expect("the leader exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(holder(&env, &lease).await, None, "released on shutdown");
}
