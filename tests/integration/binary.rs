//! The shipped binary, as a Deployment would run it: configuration from the
//! environment, the `as_token` read from its Secret, clean exit on SIGTERM.

use crate::harness::{controller_command, Options, TestEnv};
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

#[tokio::test]
async fn controller_binary_reads_its_secret_converges_and_stops_on_sigterm() {
    let env = TestEnv::with(
        "binary",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let mut child = controller_command(&env)
        .env("LOG_FORMAT", "json")
        .stderr(Stdio::null())
        .spawn()
        .expect("start controller binary");

    let localpart = crate::harness::unique("frank");
    env.create_user(
        0,
        "frank",
        json!({"localpart": localpart, "displayName": "Frank"}),
    )
    .await;
    env.wait_ready(0, "frank", true, "Converged").await;
    assert!(env
        .synapse
        .get_user(&env.user_id(&localpart))
        .await
        .unwrap()
        .is_some());

    let pid = child.id().expect("running").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("controller exits promptly on SIGTERM")
        .unwrap();
    assert!(status.success(), "clean exit, got {status:?}");
}

/// `/healthz` says the process runs; `/readyz` says it can do its job:
/// Synapse answers (and, on the leader, the caches are synced).
#[tokio::test]
async fn readiness_means_caches_synced_and_synapse_reachability_is_a_gauge() {
    let env = TestEnv::with(
        "health",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let port = crate::harness::free_port;
    let (good, bad, dead_synapse) = (port(), port(), port());
    let _healthy = controller_command(&env)
        .env("METRICS_LISTEN", format!("127.0.0.1:{good}"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _cut_off = controller_command(&env)
        .env("METRICS_LISTEN", format!("127.0.0.1:{bad}"))
        .env("SYNAPSE_URL", format!("http://127.0.0.1:{dead_synapse}"))
        // Watches nothing, so it never races the healthy one.
        .env("WATCH_SELECTOR", "openmeet.test/run=nobody")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let get = |port: u16, path: &'static str| {
        let http = http.clone();
        async move {
            let r = http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .ok()?;
            Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
        }
    };
    crate::harness::wait_for("the healthy controller to be ready", || async {
        (get(good, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    // Synapse being down keeps no replica out of service (nor a node drain
    // waiting on it): ready once its caches sync, saying what it found; the
    // background probe sets the gauge without anyone asking.
    let metrics_seen =
        crate::harness::wait_for("the cut-off controller to report Synapse", || async {
            let (_, metrics) = get(bad, "/metrics").await?;
            metrics
                .lines()
                .any(|l| l == "openmeet_synapse_reachable 0")
                .then_some(metrics)
        })
        .await;
    let (status, reason) = crate::harness::wait_for("the cut-off controller ready", || async {
        get(bad, "/readyz")
            .await
            .filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!(status, 200, "{reason}\n{metrics_seen}");
    assert!(reason.contains("Synapse is unreachable"), "{reason}");
    assert_eq!(get(bad, "/healthz").await.unwrap().0, 200, "alive");
    env.create_user(
        0,
        "measured",
        json!({"localpart": crate::harness::unique("measured")}),
    )
    .await;
    env.wait_ready(0, "measured", true, "Converged").await;
    // A refused object: its reconciles succeed as calls, yet count as stalled.
    env.create_user(0, "refused", json!({"localpart": "admin"}))
        .await;
    env.wait_ready(0, "refused", false, "ReservedLocalpart")
        .await;
    let metrics = crate::harness::wait_for("the objects gauge to count both", || async {
        let (_, metrics) = get(good, "/metrics").await?;
        let counted = |line: &str| metrics.lines().any(|l| l == line);
        (counted(r#"openmeet_objects{kind="MatrixUser",reason="Converged",health="ready"} 1"#)
            && counted(
                r#"openmeet_objects{kind="MatrixUser",reason="ReservedLocalpart",health="stalled"} 1"#,
            ))
        .then_some(metrics)
    })
    .await;
    for series in [
        r#"openmeet_reconciles_total{kind="MatrixUser",outcome="ready"}"#,
        r#"openmeet_reconciles_total{kind="MatrixUser",outcome="stalled"}"#,
        &format!(
            r#"openmeet_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        ),
        "openmeet_leader 1",
        // Its own requests to the API server, counted as it made them.
        r#"openmeet_kube_requests_total{resource="matrixusers/status",verb="apply",status="2xx"}"#,
        r#"openmeet_kube_requests_total{resource="matrixusers",verb="watch",status="2xx"}"#,
        "process_resident_memory_bytes ",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(r#"outcome="success""#),
        "a refusal is no success: {metrics}"
    );
    assert!(
        metrics.contains("# TYPE openmeet_reconcile_duration_seconds histogram"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE openmeet_synapse_request_duration_seconds histogram"));
}
