//! What a converged tenant costs Synapse when nothing changes, across
//! restarts: an object whose status confirms what it wants is not read
//! again until the sweep is due; a spec change, a drift mark or a due sweep
//! reads it (and only it).

use crate::harness::{unique, wait_for, Options, Stack, TestEnv};
use crate::rooms::{login_as, perm, urlencode, users};
use kube::api::{Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser};
use openmeet_matrix_operator::controller::room::DRIFT_ANNOTATION;
use openmeet_matrix_operator::synapse::RequestKind;
use serde_json::{json, Value};
use std::time::Duration;

fn room_id(room: &MatrixRoom) -> String {
    room.status.as_ref().unwrap().room_id.clone().unwrap()
}

async fn annotate<K>(env: &TestEnv, name: &str, key: &str, value: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    env.api::<K>(0)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap();
}

/// Reads of each kind the operator has sent so far.
fn reads_of(env: &TestEnv, kind: RequestKind) -> u64 {
    env.operator_synapse
        .stats()
        .by_kind()
        .get(&kind)
        .copied()
        .unwrap_or(0)
}

async fn topic(env: &TestEnv, room_id: &str) -> Value {
    env.synapse
        .room_state(room_id)
        .await
        .unwrap()
        .unwrap()
        .get("m.room.topic", "")
        .cloned()
        .unwrap_or(json!({}))
}

#[tokio::test]
async fn a_converged_tenant_is_not_read_again_not_even_after_a_restart() {
    let mut env = TestEnv::new("idle").await;
    let ids = users(&env, &["ann", "ben"]).await;
    perm(&env, 0, "ann", "r1", "ann", json!({"role": "Moderator"})).await;
    perm(&env, 0, "ben", "r1", "ben", json!({})).await;
    perm(&env, 0, "ann2", "r2", "ann", json!({})).await;
    for r in ["r1", "r2"] {
        env.create::<MatrixRoom>(0, r, json!({"alias": unique(r), "topic": "Talk"}))
            .await;
    }
    let r1 = room_id(&env.wait_condition(0, "r1", true, "Converged").await);
    let r2 = room_id(&env.wait_condition(0, "r2", true, "Converged").await);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = env.operator_synapse.stats();
    let (writes, reads) = (stats.writes(), stats.reads());

    // Reconciles with nothing changed (a label, an annotation) read nothing.
    for i in 0..3 {
        let before = (env.stats.room_reconciles(), env.stats.user_reconciles());
        annotate::<MatrixRoom>(&env, "r1", "test/touch", &i.to_string()).await;
        annotate::<MatrixUser>(&env, "ann", "test/touch", &i.to_string()).await;
        wait_for("both reconciled", || async {
            (env.stats.room_reconciles() > before.0 && env.stats.user_reconciles() > before.1)
                .then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (stats.writes(), stats.reads()),
        (writes, reads),
        "nothing read or written"
    );

    // A drift mark is read once: one state read, and nothing to write.
    let before = env.stats.room_reconciles();
    annotate::<MatrixRoom>(&env, "r1", DRIFT_ANNOTATION, "$test-mark").await;
    wait_for("the marked room reconciled", || async {
        (env.stats.room_reconciles() > before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.writes(), writes, "nothing had drifted");
    assert_eq!(stats.reads(), reads + 1, "one state read for the mark");

    // Down: r2's spec changes, and r1 drifts (the feed marks it meanwhile).
    env.stop_operator().await;
    env.api::<MatrixRoom>(0)
        .patch(
            "r2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"topic": "Moved"}})),
        )
        .await
        .unwrap();
    let token = login_as(&ids[0]).await;
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/state/m.room.topic/",
        Stack::get().var("SYNAPSE_URL"),
        urlencode(&r1)
    );
    let changed = reqwest::Client::new()
        .put(url)
        .bearer_auth(&token)
        .json(&json!({"topic": "changed while the operator was down"}))
        .send()
        .await
        .unwrap();
    assert!(changed.status().is_success());
    wait_for("the drift marked", || async {
        let r: MatrixRoom = env.api(0).get("r1").await.ok()?;
        let mark = r.metadata.annotations?.get(DRIFT_ANNOTATION).cloned();
        (mark.as_deref() != Some("$test-mark")).then_some(())
    })
    .await;

    // A new operator, with no memory: the changed and the marked room are
    // read and converged; the unchanged users are not read at all.
    let (users_read, rooms_read) = (
        reads_of(&env, RequestKind::GetUser),
        reads_of(&env, RequestKind::GetRoomState),
    );
    env.restart_operator().await;
    wait_for("r2 takes the new topic", || async {
        (topic(&env, &r2).await["topic"] == "Moved").then_some(())
    })
    .await;
    wait_for("r1's drift reverted", || async {
        (topic(&env, &r1).await["topic"] == "Talk").then_some(())
    })
    .await;
    env.wait_condition::<MatrixRoom>(0, "r2", true, "Converged")
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        reads_of(&env, RequestKind::GetUser),
        users_read,
        "no user read"
    );
    assert_eq!(
        reads_of(&env, RequestKind::GetRoomState),
        rooms_read + 2,
        "one state read for each room that changed"
    );
}

#[tokio::test]
async fn an_account_changed_out_of_band_is_corrected_by_the_sweep() {
    let env = TestEnv::with(
        "sweep",
        Options {
            sweep_period: Some(Duration::from_secs(3)),
            ..Default::default()
        },
    )
    .await;
    let localpart = unique("dan");
    env.create_user(
        0,
        "dan",
        json!({"localpart": localpart, "displayName": "Dan"}),
    )
    .await;
    env.wait_ready(0, "dan", true, "Converged").await;
    let user_id = env.user_id(&localpart);
    // An admin renames and locks the account through the admin APIs: no
    // event reaches the feed.
    crate::users::change_out_of_band(&env, &localpart, "Renamed", true).await;
    wait_for("the sweep restores the account", || async {
        let profile = env.synapse.get_user(&user_id).await.ok()??;
        let account = crate::users::account(&env, &localpart).await?;
        (profile.displayname.as_deref() == Some("Dan") && !account.locked).then_some(())
    })
    .await;
}
