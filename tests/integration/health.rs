//! What GitOps tools say about the objects: kstatus (`status.Compute`, what
//! Flux and kstatus-based checks use) and the chart's Argo CD Lua health
//! checks run by gopher-lua (Argo CD's interpreter), both from the `health`
//! tool built by `tests/stack/build-health.sh`, on real objects from the
//! stack at each point of their life.

use crate::harness::{unique, wait_for, Options, TestEnv};
use kube::api::{Patch, PatchParams};
use kube::Resource;
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The health tool, built once per cache (warm: returns at once).
fn tool() -> &'static PathBuf {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        let out = Command::new(format!("{REPO}/tests/stack/build-health.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run build-health.sh");
        assert!(out.status.success(), "build-health.sh failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("health")
    })
}

fn ask(args: &[&str], object: &Value) -> (String, String) {
    let mut child = Command::new(tool())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start health tool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "health {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        verdict["status"].as_str().unwrap().to_string(),
        verdict["message"].as_str().unwrap().to_string(),
    )
}

/// kstatus's status for the object: InProgress, Current, Failed, …
pub fn kstatus(object: &Value) -> String {
    ask(&["kstatus"], object).0
}

/// The chart's Argo CD health check (one script for every kind, as each
/// kind's argocd-cm key holds it): (status, message).
pub fn argocd(object: &Value) -> (String, String) {
    let script = format!("{REPO}/charts/openmeet-matrix-operator/argocd/health.lua");
    ask(&["lua", &script], object)
}

/// Both verdicts, with the object for the failure message.
fn verdicts<K: serde::Serialize>(object: &K) -> (String, String, Value) {
    let value = serde_json::to_value(object).unwrap();
    let (argo, _) = argocd(&value);
    (kstatus(&value), argo, value)
}

fn assert_health<K: serde::Serialize>(object: &K, want_kstatus: &str, want_argo: &str) {
    let (k, argo, value) = verdicts(object);
    assert_eq!(
        (k.as_str(), argo.as_str()),
        (want_kstatus, want_argo),
        "object: {value:#}"
    );
}

async fn fetch<K>(env: &TestEnv, name: &str) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    env.api::<K>(0).get(name).await.expect("get")
}

#[tokio::test]
async fn objects_no_operator_has_seen_are_in_progress() {
    // No operator: what Flux and Argo CD see right after an apply, before the
    // controller (or while it is down) writes anything.
    let env = TestEnv::with(
        "unseen",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let user: MatrixUser = env
        .create(0, "u", json!({"localpart": unique("unseen")}))
        .await;
    let room: MatrixRoom = env.create(0, "r", json!({"alias": unique("unseen")})).await;
    let permission: RoomPermission = env
        .create(
            0,
            "p",
            json!({"roomRef": {"name": "r"}, "userRef": {"name": "u"}}),
        )
        .await;
    // As created and as read back (the API server fills in the default status).
    assert_health(&user, "InProgress", "Progressing");
    assert_health(&room, "InProgress", "Progressing");
    assert_health(&permission, "InProgress", "Progressing");
    for value in [
        serde_json::to_value(fetch::<MatrixUser>(&env, "u").await).unwrap(),
        serde_json::to_value(fetch::<MatrixRoom>(&env, "r").await).unwrap(),
        serde_json::to_value(fetch::<RoomPermission>(&env, "p").await).unwrap(),
    ] {
        assert_eq!(value["status"]["observedGeneration"], 0, "{value:#}");
        assert_eq!(kstatus(&value), "InProgress", "{value:#}");
        assert_eq!(argocd(&value).0, "Progressing", "{value:#}");
    }
}

#[tokio::test]
async fn converged_objects_are_current_and_healthy() {
    let env = TestEnv::new("healthy").await;
    env.create::<MatrixUser>(0, "u", json!({"localpart": unique("healthy")}))
        .await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("healthy")}))
        .await;
    env.create::<RoomPermission>(
        0,
        "p",
        json!({"roomRef": {"name": "r"}, "userRef": {"name": "u"}, "role": "Moderator"}),
    )
    .await;
    let user = env
        .wait_condition::<MatrixUser>(0, "u", true, "Converged")
        .await;
    let room = env
        .wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    let permission = env
        .wait_condition::<RoomPermission>(0, "p", true, "Converged")
        .await;
    assert_health(&user, "Current", "Healthy");
    assert_health(&room, "Current", "Healthy");
    assert_health(&permission, "Current", "Healthy");

    // A spec change is InProgress until the operator has observed it: the
    // patch's answer is the object before any controller could react.
    let changed: MatrixUser = env
        .api::<MatrixUser>(0)
        .patch(
            "u",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "Changed"}})),
        )
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
    assert_health(&changed, "InProgress", "Progressing");
    let user = env
        .wait_condition::<MatrixUser>(0, "u", true, "Converged")
        .await;
    assert_health(&user, "Current", "Healthy");
}

#[tokio::test]
async fn waiting_for_a_referenced_object_is_in_progress() {
    let env = TestEnv::new("waiting").await;
    env.create::<RoomPermission>(
        0,
        "p",
        json!({"roomRef": {"name": "not-yet"}, "userRef": {"name": "nobody"}}),
    )
    .await;
    let permission = env
        .wait_condition::<RoomPermission>(0, "p", false, "Pending")
        .await;
    assert_health(&permission, "InProgress", "Progressing");
    let (_, message) = argocd(&serde_json::to_value(&permission).unwrap());
    assert!(message.starts_with("Pending: "), "{message}");
}

#[tokio::test]
async fn conflicts_and_refusals_fail() {
    let env = TestEnv::new("failed").await;
    // Refused by policy: a reserved localpart.
    env.create::<MatrixUser>(0, "reserved", json!({"localpart": "admin"}))
        .await;
    // Conflicts: the younger claimant of a localpart and of an alias.
    let localpart = unique("twice");
    env.create::<MatrixUser>(0, "older", json!({"localpart": localpart}))
        .await;
    env.wait_condition::<MatrixUser>(0, "older", true, "Converged")
        .await;
    env.create::<MatrixUser>(0, "younger", json!({"localpart": localpart}))
        .await;
    let alias = unique("twice");
    env.create::<MatrixRoom>(0, "first", json!({"alias": alias}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "first", true, "Converged")
        .await;
    env.create::<MatrixRoom>(0, "second", json!({"alias": alias}))
        .await;
    // A second permission for the same user and room.
    env.create::<RoomPermission>(
        0,
        "one",
        json!({"roomRef": {"name": "first"}, "userRef": {"name": "older"}}),
    )
    .await;
    env.wait_condition::<RoomPermission>(0, "one", true, "Converged")
        .await;
    env.create::<RoomPermission>(
        0,
        "two",
        json!({"roomRef": {"name": "first"}, "userRef": {"name": "older"}}),
    )
    .await;

    let reserved = env
        .wait_condition::<MatrixUser>(0, "reserved", false, "ReservedLocalpart")
        .await;
    let younger = env
        .wait_condition::<MatrixUser>(0, "younger", false, "LocalpartConflict")
        .await;
    let second = env
        .wait_condition::<MatrixRoom>(0, "second", false, "AliasConflict")
        .await;
    let duplicate = env
        .wait_condition::<RoomPermission>(0, "two", false, "Duplicate")
        .await;
    for (value, reason) in [
        (
            serde_json::to_value(&reserved).unwrap(),
            "ReservedLocalpart",
        ),
        (serde_json::to_value(&younger).unwrap(), "LocalpartConflict"),
        (serde_json::to_value(&second).unwrap(), "AliasConflict"),
        (serde_json::to_value(&duplicate).unwrap(), "Duplicate"),
    ] {
        assert_eq!(kstatus(&value), "Failed", "{value:#}");
        let (argo, message) = argocd(&value);
        assert_eq!(argo, "Degraded", "{value:#}");
        assert!(message.starts_with(reason), "{message}");
    }

    // A spec change that does not lift the conflict: InProgress until
    // observed, then Failed again.
    let moved: MatrixUser = env
        .api::<MatrixUser>(0)
        .patch(
            "younger",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "Still younger"}})),
        )
        .await
        .unwrap();
    assert_health(&moved, "InProgress", "Progressing");
    let settled = wait_for("younger observed again", || async {
        let u = fetch::<MatrixUser>(&env, "younger").await;
        let observed = u.status.as_ref().and_then(|s| s.observed_generation);
        (observed == u.metadata.generation).then_some(u)
    })
    .await;
    assert_health(&settled, "Failed", "Degraded");
}

/// Events about one object: (reason, note, series count), oldest first.
async fn events_of(env: &TestEnv, name: &str) -> Vec<(String, String, i32)> {
    let api: kube::Api<k8s_openapi::api::events::v1::Event> = env.api(0);
    let mut events: Vec<_> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    events
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.series.map_or(1, |s| s.count),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_permission_records_its_transitions_as_events() {
    let env = TestEnv::new("permevents").await;
    env.create::<RoomPermission>(
        0,
        "p",
        json!({"roomRef": {"name": "r"}, "userRef": {"name": "u"}, "role": "Admin"}),
    )
    .await;
    env.wait_event(0, "p", "Pending", 1).await;
    env.create::<MatrixUser>(0, "u", json!({"localpart": unique("permevents")}))
        .await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("permevents")}))
        .await;
    env.wait_condition::<RoomPermission>(0, "p", true, "Converged")
        .await;
    env.wait_event(0, "p", "Converged", 1).await;
    // Named to sort after "p": creation timestamps have one-second
    // resolution and a same-second tie goes to the first name.
    env.create::<RoomPermission>(
        0,
        "p-again",
        json!({"roomRef": {"name": "r"}, "userRef": {"name": "u"}}),
    )
    .await;
    env.wait_condition::<RoomPermission>(0, "p-again", false, "Duplicate")
        .await;
    env.wait_event(0, "p-again", "Duplicate", 1).await;
    let story = events_of(&env, "p").await;
    let converged = story.iter().find(|(r, _, _)| r == "Converged").unwrap();
    assert!(converged.1.ends_with("has power level 100"), "{story:?}");
}

#[tokio::test]
async fn different_notes_are_different_events() {
    let env = TestEnv::new("notes").await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("notes"), "name": "One"}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    for (field, value) in [("name", "Two"), ("topic", "Three")] {
        env.api::<MatrixRoom>(0)
            .patch(
                "r",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {field: value}})),
            )
            .await
            .unwrap();
        env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
            .await;
    }
    let updates = wait_for("two RoomUpdated events", || async {
        let updates: Vec<_> = events_of(&env, "r")
            .await
            .into_iter()
            .filter(|(reason, _, _)| reason == "RoomUpdated")
            .collect();
        (updates.len() >= 2).then_some(updates)
    })
    .await;
    assert_ne!(updates[0].1, updates[1].1, "{updates:?}");
    assert!(
        updates.iter().all(|(_, _, count)| *count == 1),
        "{updates:?}"
    );

    // The same message again counts up its Event's series.
    env.api::<MatrixRoom>(0)
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"name": "Four"}})),
        )
        .await
        .unwrap();
    let counted = wait_for("the name change counted up", || async {
        let updates: Vec<_> = events_of(&env, "r")
            .await
            .into_iter()
            .filter(|(reason, _, _)| reason == "RoomUpdated")
            .collect();
        updates
            .iter()
            .any(|(_, _, count)| *count == 2)
            .then_some(updates)
    })
    .await;
    assert_eq!(counted.len(), 2, "one Event per message: {counted:?}");
    let (_, note, _) = counted.iter().find(|(_, _, c)| *c == 2).unwrap();
    assert_eq!(
        note, &updates[0].1,
        "the name's Event counted up: {counted:?}"
    );
}
