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
