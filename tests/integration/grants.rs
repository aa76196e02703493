//! Rooms across tenants: a `RoomPermission` naming a user of another
//! namespace takes effect only as far as a `MatrixUserGrant` there admits,
//! asserted on Synapse. Namespace 0 is the users' tenant; the others hold
//! the rooms.

use crate::harness::{unique, wait_for, Options, TestEnv};
use crate::rooms::{as_user, login_as, membership, urlencode};
use crate::spaces::state_of;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use openmeet_matrix_operator::synapse::rooms::RoomState;
use serde_json::{json, Value};
use std::time::Duration;

/// A Ready user in namespace 0; its Matrix id.
async fn tenant_user(env: &TestEnv, name: &str, labels: Value) -> String {
    let localpart = unique(name);
    env.create::<MatrixUser>(0, name, json!({"localpart": localpart}))
        .await;
    if labels.is_object() {
        merge(
            env.api::<MatrixUser>(0),
            name,
            json!({"metadata": {"labels": labels}}),
        )
        .await;
    }
    env.wait_condition::<MatrixUser>(0, name, true, "Converged")
        .await;
    env.user_id(&localpart).to_string()
}

/// A room in namespace `ns`, converged; its room id.
async fn room(env: &TestEnv, ns: usize, name: &str, extra: Value) -> String {
    let mut spec = json!({"alias": unique(name)});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    env.create::<MatrixRoom>(ns, name, spec).await;
    let room = env
        .wait_condition::<MatrixRoom>(ns, name, true, "Converged")
        .await;
    room.status.unwrap().room_id.unwrap()
}

/// A permission in namespace `ns` naming user `user` of namespace 0.
async fn guest(env: &TestEnv, ns: usize, name: &str, room: &str, user: &str, extra: Value) {
    let mut spec = json!({
        "roomRef": {"name": room},
        "userRef": {"namespace": env.ns(0), "name": user},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    env.create::<RoomPermission>(ns, name, spec).await;
}

async fn merge<K>(api: kube::Api<K>, name: &str, patch: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
}

/// Waits until `user` has `want` membership in the room.
async fn wait_membership(env: &TestEnv, room_id: &str, user: &str, want: &str) {
    wait_for(&format!("{user} {want} in {room_id}"), || async {
        let state = state_of(env, room_id).await;
        (membership(&state, user) == want).then_some(())
    })
    .await;
}

fn power_level(state: &RoomState, user: &str) -> Option<i64> {
    state.get("m.room.power_levels", "")?["users"][user].as_i64()
}

fn ready_message(p: &RoomPermission) -> String {
    let ready = p.status.as_ref().unwrap().conditions.iter();
    ready
        .clone()
        .find(|c| c.type_ == "Ready")
        .unwrap()
        .message
        .clone()
}

fn stalled(p: &RoomPermission) -> bool {
    p.status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .any(|c| c.type_ == "Stalled" && c.status == "True")
}

#[tokio::test]
async fn a_user_of_another_tenant_joins_only_as_far_as_its_grant_admits() {
    let env = TestEnv::with(
        "grant",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let (users_ns, rooms_ns) = (env.ns(0).to_string(), env.ns(1).to_string());
    let alice = tenant_user(&env, "alice", Value::Null).await;
    let joint = room(&env, 1, "joint", json!({})).await;

    // No grant: refused, the same way whether or not the user exists, and
    // nothing happens in Synapse.
    guest(
        &env,
        1,
        "alice",
        "joint",
        "alice",
        json!({"role": "Member"}),
    )
    .await;
    guest(&env, 1, "nobody", "joint", "nobody", json!({})).await;
    let refused = env
        .wait_condition::<RoomPermission>(1, "alice", false, "ReferenceNotPermitted")
        .await;
    assert_eq!(
        ready_message(&refused),
        format!(
            "no MatrixUserGrant in namespace {users_ns} lets this namespace name MatrixUser alice"
        )
    );
    assert!(stalled(&refused), "waits for a grant: Stalled");
    let unknown = env
        .wait_condition::<RoomPermission>(1, "nobody", false, "ReferenceNotPermitted")
        .await;
    assert_eq!(
        ready_message(&unknown),
        ready_message(&refused).replace("alice", "nobody"),
        "a refusal does not tell whether the user exists"
    );
    assert_eq!(membership(&state_of(&env, &joint).await, &alice), "none");

    // A grant by name, Member at most: alice joins with power level 0.
    env.create::<MatrixUserGrant>(
        0,
        "speakers",
        json!({"from": [{"namespace": rooms_ns}], "users": {"names": ["alice"]}, "maxRole": "Member"}),
    )
    .await;
    env.wait_condition::<RoomPermission>(1, "alice", true, "Converged")
        .await;
    let state = state_of(&env, &joint).await;
    assert_eq!(membership(&state, &alice), "join");
    assert_eq!(power_level(&state, &alice), None);
    env.wait_condition::<RoomPermission>(1, "nobody", false, "ReferenceNotPermitted")
        .await;

    // The users' tenant sees who uses the grant, in counts: no room names.
    let grant = wait_for("the grant's use counted", || async {
        let g = env.api::<MatrixUserGrant>(0).get("speakers").await.ok()?;
        (g.status.as_ref()?.permissions == 1).then_some(g)
    })
    .await;
    let status = grant.status.unwrap();
    assert_eq!(status.used_by.len(), 1);
    assert_eq!(status.used_by[0].namespace, rooms_ns);
    assert_eq!(status.used_by[0].permissions, 1);
    let shown = serde_json::to_string(&status).unwrap();
    assert!(
        !shown.contains("joint") && !shown.contains(&joint),
        "{shown}"
    );

    // Above the grant's limit: refused, and out of the room.
    merge(
        env.api::<RoomPermission>(1),
        "alice",
        json!({"spec": {"role": "Moderator"}}),
    )
    .await;
    let above = env
        .wait_condition::<RoomPermission>(1, "alice", false, "RoleNotPermitted")
        .await;
    assert!(
        ready_message(&above).contains("power level 0 at most; this permission asks for 50"),
        "{}",
        ready_message(&above)
    );
    wait_membership(&env, &joint, &alice, "leave").await;

    // The users' tenant raises the limit: back, as a moderator.
    merge(
        env.api::<MatrixUserGrant>(0),
        "speakers",
        json!({"spec": {"maxRole": "Moderator"}}),
    )
    .await;
    env.wait_condition::<RoomPermission>(1, "alice", true, "Converged")
        .await;
    let state = state_of(&env, &joint).await;
    assert_eq!(membership(&state, &alice), "join");
    assert_eq!(power_level(&state, &alice), Some(50));

    // Withdrawn: out within seconds, and the permission says why.
    env.api::<MatrixUserGrant>(0)
        .delete("speakers", &DeleteParams::default())
        .await
        .expect("delete the grant");
    let withdrawn = std::time::Instant::now();
    wait_membership(&env, &joint, &alice, "leave").await;
    eprintln!(
        "grant withdrawn to member removed: {} ms",
        withdrawn.elapsed().as_millis()
    );
    env.wait_condition::<RoomPermission>(1, "alice", false, "ReferenceNotPermitted")
        .await;
    assert_eq!(power_level(&state_of(&env, &joint).await, &alice), None);
}

#[tokio::test]
async fn a_user_whose_labels_no_longer_match_leaves_even_an_additive_room() {
    let env = TestEnv::with(
        "grant-label",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let rooms_ns = env.ns(1).to_string();
    let speaker = tenant_user(&env, "speaker", json!({"openmeet.test/speaker": "yes"})).await;
    env.create::<MatrixUserGrant>(
        0,
        "speakers",
        json!({"from": [{"namespace": rooms_ns}],
               "users": {"selector": {"matchLabels": {"openmeet.test/speaker": "yes"}}}}),
    )
    .await;
    let hall = room(&env, 1, "hall", json!({"membershipPolicy": "Additive"})).await;
    guest(
        &env,
        1,
        "speaker",
        "hall",
        "speaker",
        json!({"role": "Admin"}),
    )
    .await;
    env.wait_condition::<RoomPermission>(1, "speaker", true, "Converged")
        .await;
    let state = state_of(&env, &hall).await;
    assert_eq!(membership(&state, &speaker), "join");
    assert_eq!(power_level(&state, &speaker), Some(100));

    // The users' tenant takes the label off: the grant no longer covers the
    // user, and an Additive room (which keeps undeclared members) still
    // lets them go.
    merge(
        env.api::<MatrixUser>(0),
        "speaker",
        json!({"metadata": {"labels": {"openmeet.test/speaker": null}}}),
    )
    .await;
    wait_membership(&env, &hall, &speaker, "leave").await;
    env.wait_condition::<RoomPermission>(1, "speaker", false, "ReferenceNotPermitted")
        .await;
    assert_eq!(power_level(&state_of(&env, &hall).await, &speaker), None);
}

#[tokio::test]
async fn deleting_the_users_tenant_takes_them_out_of_every_other_tenants_rooms() {
    let env = TestEnv::with(
        "grant-tenant-gone",
        Options {
            namespaces: 3,
            ..Default::default()
        },
    )
    .await;
    let alice = tenant_user(&env, "alice", Value::Null).await;
    env.create::<MatrixUserGrant>(
        0,
        "partners",
        json!({"from": [{"namespace": env.ns(1)}, {"namespace": env.ns(2)}]}),
    )
    .await;
    let mut rooms = Vec::new();
    for ns in [1, 2] {
        let id = room(&env, ns, "joint", json!({})).await;
        guest(&env, ns, "alice", "joint", "alice", json!({})).await;
        env.wait_condition::<RoomPermission>(ns, "alice", true, "Converged")
            .await;
        assert_eq!(membership(&state_of(&env, &id).await, &alice), "join");
        rooms.push(id);
    }

    // The tenant leaves: its namespace is deleted. The stack runs no
    // kube-controller-manager, so the test deletes the namespace's objects
    // as its namespace controller does.
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
        .delete(env.ns(0), &DeleteParams::default())
        .await
        .expect("delete the namespace");
    let all = ListParams::default();
    env.api::<MatrixUserGrant>(0)
        .delete_collection(&DeleteParams::default(), &all)
        .await
        .expect("delete the grants");
    env.api::<MatrixUser>(0)
        .delete_collection(&DeleteParams::default(), &all)
        .await
        .expect("delete the users");
    for id in &rooms {
        wait_membership(&env, id, &alice, "leave").await;
    }
    for ns in [1, 2] {
        env.wait_condition::<RoomPermission>(ns, "alice", false, "ReferenceNotPermitted")
            .await;
    }
}

#[tokio::test]
async fn access_through_a_space_ends_with_the_grant() {
    let env = TestEnv::with(
        "grant-space",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let alice = tenant_user(&env, "alice", Value::Null).await;
    env.create::<MatrixUserGrant>(
        0,
        "members",
        json!({"from": [{"namespace": env.ns(1)}], "users": {"names": ["alice"]}, "maxRole": "Member"}),
    )
    .await;
    let space = room(&env, 1, "group", json!({"type": "Space"})).await;
    let child = room(
        &env,
        1,
        "event",
        json!({"joinRule": "restricted", "parentRef": {"name": "group"}}),
    )
    .await;
    guest(&env, 1, "alice", "group", "alice", json!({})).await;
    wait_membership(&env, &space, &alice, "join").await;
    // Alice joins the group's event room through the space, from a client.
    let token = login_as(&alice).await;
    let path = format!("/rooms/{}/join", urlencode(&child));
    assert!(as_user(&token, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        membership(&state_of(&env, &child).await, &alice),
        "join",
        "kept: a member of the space"
    );

    // The grant goes: out of the space, and of the room reached through it.
    env.api::<MatrixUserGrant>(0)
        .delete("members", &DeleteParams::default())
        .await
        .expect("delete the grant");
    wait_membership(&env, &space, &alice, "leave").await;
    wait_membership(&env, &child, &alice, "leave").await;
    // And the join rule no longer lets them back in.
    assert!(!as_user(&token, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
}
