//! The event feed (Synapse's application-service transactions) under load.

use crate::harness::{pause_feed, unique, wait_for, Stack, TestEnv};
use crate::rooms::{as_user, login_as, perm, state, urlencode, users};
use futures::StreamExt;
use openmeet_matrix_operator::api::MatrixRoom;
use serde_json::json;
use std::time::{Duration, Instant};

/// How long the endpoint is unresponsive: a restart, leader hand-over or
/// long GC pause.
const PAUSE: Duration = Duration::from_secs(12);
const MESSAGES: usize = 150;
const MESSAGE_BYTES: usize = 60_000;

/// Lifts Synapse's message rate limit for one user (the admin API, as the
/// operator's admin account), so the burst is sent at full speed.
async fn unlimited(user_id: &str) {
    let path = format!(
        "/_synapse/admin/v1/users/{}/override_ratelimit",
        urlencode(user_id)
    );
    let status = Stack::get()
        .admin_api(reqwest::Method::POST, &path)
        .await
        .json(&json!({"messages_per_second": 0, "burst_count": 0}))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "override_ratelimit: {status}");
}

#[tokio::test]
async fn drift_after_a_burst_of_big_messages_during_a_pause_is_reverted() {
    let env = TestEnv::new("feed").await;
    let ids = users(&env, &["talker"]).await;
    perm(&env, 0, "talker", "r", "talker", json!({"role": "Admin"})).await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("feed"), "name": "Official"}))
        .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let room_id = urlencode(room.status.as_ref().unwrap().room_id.as_ref().unwrap());
    let token = login_as(&ids[0]).await;
    unlimited(&ids[0]).await;

    // The endpoint stops answering; Synapse's transaction in flight waits,
    // and everything after it queues up in Synapse.
    pause_feed(true);
    let paused = Instant::now();
    let body = "x".repeat(MESSAGE_BYTES);
    let sent = futures::stream::iter(0..MESSAGES)
        .map(|i| {
            let (token, room_id, body) = (&token, &room_id, &body);
            async move {
                let path = format!("/rooms/{room_id}/send/m.room.message/burst-{i}");
                let message = json!({"msgtype": "m.text", "body": body});
                as_user(token, reqwest::Method::PUT, &path, message).await
            }
        })
        .buffer_unordered(4)
        .filter(|status| futures::future::ready(status.is_success()))
        .count()
        .await;
    assert_eq!(sent, MESSAGES, "every message sent");
    let path = format!("/rooms/{room_id}/state/m.room.name/");
    let renamed = as_user(
        &token,
        reqwest::Method::PUT,
        &path,
        json!({"name": "Hijacked"}),
    )
    .await;
    assert!(renamed.is_success(), "rename: {renamed}");
    tokio::time::sleep(PAUSE.saturating_sub(paused.elapsed())).await;
    eprintln!("feed paused {:?}", paused.elapsed());

    // Back: the queued transactions (100 events of 60 KB each) are accepted
    // and the rename is reverted through the feed, long before the periodic
    // resync (300 s here). Synapse's first retry after a refused transaction
    // comes 2 s later, the next ones 4, 8, 16 and 32 s after that.
    pause_feed(false);
    let resumed = Instant::now();
    wait_for("the rename reverted", || async {
        (state(&env, &room).await.get("m.room.name", "")?["name"] == "Official").then_some(())
    })
    .await;
    eprintln!(
        "rename reverted {:?} after the feed resumed",
        resumed.elapsed()
    );
}
