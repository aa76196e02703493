//! A room stays the operator's whatever its members do, and its rules keep
//! being enforced: asserted on Synapse.

use crate::harness::{unique, wait_for, TestEnv};
use crate::rooms::{
    as_user, login_as, membership, perm, room_made_before, state, urlencode, users,
};
use kube::api::DeleteParams;
use openmeet_matrix_operator::api::{MatrixRoom, RoomPermission};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn room_id(room: &MatrixRoom) -> String {
    room.status.as_ref().unwrap().room_id.clone().unwrap()
}

fn marker_of(env: &TestEnv, name: &str, room: &MatrixRoom) -> Value {
    json!({"namespace": env.ns(0), "name": name, "uid": room.metadata.uid.clone().unwrap()})
}

#[tokio::test]
async fn a_host_can_neither_take_nor_retire_the_room_and_a_changed_marker_is_repaired() {
    let env = TestEnv::new("owner").await;
    let ids = users(&env, &["host", "member"]).await;
    perm(&env, 0, "host", "r", "host", json!({"role": "Admin"})).await;
    perm(&env, 0, "member", "r", "member", json!({})).await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("owner"), "name": "Meetup"}))
        .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let id = room_id(&room);
    let marker = marker_of(&env, "r", &room);
    let s = state(&env, &room).await;
    assert_eq!(s.get("m.room.create", "").unwrap()["room_version"], "12");
    assert_eq!(membership(&s, &ids[1]), "join");

    // The event's host (power 100) tries, from a client, everything that
    // would take the room out of the operator's hands or retire it.
    let host = login_as(&ids[0]).await;
    let mut pl = s.get("m.room.power_levels", "").unwrap().clone();
    pl["users"][&ids[1]] = json!(100);
    for (kind, content) in [
        ("net.openmeet.owner", json!({})),
        (
            "m.room.tombstone",
            json!({"body": "moved", "replacement_room": "!nowhere:example.org"}),
        ),
        (
            "m.room.server_acl",
            json!({"allow": ["*"], "deny": ["example.org"]}),
        ),
        ("m.room.power_levels", pl),
    ] {
        let path = format!("/rooms/{}/state/{kind}/", urlencode(&id));
        assert_eq!(
            as_user(&host, Method::PUT, &path, content).await,
            StatusCode::FORBIDDEN,
            "{kind}"
        );
    }
    let s = state(&env, &room).await;
    assert_eq!(s.get("net.openmeet.owner", ""), Some(&marker));
    assert!(s.get("m.room.tombstone", "").is_none());

    // Changed anyway (by the operator's own account, the one sender that
    // still can): the marker cleared. The next reconcile, for a deleted
    // permission, restores it and still removes the member, instead of
    // letting the room go. (A tombstone cannot be withdrawn once sent:
    // Synapse requires a replacement room; it can only be prevented.)
    env.synapse
        .put_state(&id, "net.openmeet.owner", "", &json!({}))
        .await
        .unwrap();
    env.api::<RoomPermission>(0)
        .delete("member", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("member removed, marker restored", || async {
        let s = state(&env, &room).await;
        (membership(&s, &ids[1]) == "leave" && s.get("net.openmeet.owner", "") == Some(&marker))
            .then_some(())
    })
    .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    assert_eq!(room_id(&room), id, "the status still names the room");
}

/// An adopted room of an older version (the operator is no creator there)
/// where a member shares the operator's level: Synapse refuses the
/// power-levels write that would demote them, and the kick the same plan
/// holds is applied all the same.
#[tokio::test]
async fn a_refused_power_levels_write_does_not_stop_a_kick() {
    let env = TestEnv::new("refused").await;
    let ids = users(&env, &["peer", "leaver", "newcomer"]).await;
    let alias = unique("refused");
    // Held back (its space does not exist yet), so the operator creates nothing.
    let object: MatrixRoom = env
        .create(
            0,
            "old",
            json!({"alias": alias, "parentRef": {"name": "later"}}),
        )
        .await;
    env.wait_condition::<MatrixRoom>(0, "old", false, "ParentNotFound")
        .await;
    // Meanwhile a room of this object's appears under its alias, version 10,
    // where the peer holds 100 like the operator's account.
    let mut levels = serde_json::Map::new();
    levels.insert(env.synapse.admin_user_id().to_string(), json!(100));
    levels.insert(ids[0].clone(), json!(100));
    let old_id = room_made_before(
        &env,
        &object,
        "10",
        json!({"power_level_content_override": {"users": levels}}),
    )
    .await;
    let parsed = ruma::RoomId::parse(&old_id).unwrap();
    for user in &ids[..2] {
        let user = ruma::UserId::parse(user).unwrap();
        env.synapse.admin_join(&parsed, &user).await.unwrap();
    }
    // The peer is declared a Moderator (a demotion Synapse refuses), the
    // leaver not at all (a kick).
    perm(&env, 0, "peer", "old", "peer", json!({"role": "Moderator"})).await;
    perm(&env, 0, "newcomer", "old", "newcomer", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "later",
        json!({"alias": unique("later"), "type": "Space"}),
    )
    .await;
    wait_for(
        "the undeclared member kicked, the newcomer joined",
        || async {
            let s = env.synapse.room_state(&old_id).await.ok()??;
            (membership(&s, &ids[1]) == "leave" && membership(&s, &ids[2]) == "join").then_some(())
        },
    )
    .await;
    let s = env.synapse.room_state(&old_id).await.unwrap().unwrap();
    assert_eq!(
        s.get("m.room.power_levels", "").unwrap()["users"][&ids[0]],
        100
    );
    assert_eq!(membership(&s, &ids[0]), "join");
    // The refusal is reported on the room and on the permission it
    // concerns; the newcomer's permission says it converged.
    let room: MatrixRoom = env.wait_condition(0, "old", false, "SynapseRejected").await;
    let ready = room.status.unwrap().conditions;
    let ready = ready.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        ready.message.contains("m.room.power_levels"),
        "{}",
        ready.message
    );
    env.wait_condition::<RoomPermission>(0, "peer", false, "SynapseRejected")
        .await;
    env.wait_condition::<RoomPermission>(0, "newcomer", true, "Converged")
        .await;
}
