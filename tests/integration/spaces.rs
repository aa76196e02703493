//! Spaces, restricted joins through the parent space, and direct rooms,
//! asserted on Synapse.

use crate::harness::{unique, wait_for, Stack, TestEnv};
use crate::rooms::{as_user, login_as, membership, perm, urlencode, users};
use kube::api::{Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, RoomPermission};
use openmeet_matrix_operator::synapse::rooms::RoomState;
use openmeet_matrix_operator::synapse::RequestKind;
use serde_json::{json, Value};
use std::time::Duration;

fn room_id(room: &MatrixRoom) -> String {
    room.status.as_ref().unwrap().room_id.clone().unwrap()
}

/// The room id of a room once it has converged.
async fn converged_id(env: &TestEnv, name: &str) -> String {
    room_id(
        &env.wait_condition::<MatrixRoom>(0, name, true, "Converged")
            .await,
    )
}

/// The room's state, read from Synapse.
pub(crate) async fn state_of(env: &TestEnv, room_id: &str) -> RoomState {
    env.synapse
        .room_state(room_id)
        .await
        .unwrap()
        .expect("room readable")
}

fn server() -> String {
    Stack::get().var("MATRIX_SERVER_NAME").to_string()
}

/// Whether the relation event holds content (an emptied one does not).
fn linked(state: &RoomState, kind: &str, key: &str) -> bool {
    state
        .get(kind, key)
        .and_then(Value::as_object)
        .is_some_and(|o| !o.is_empty())
}

async fn patch_spec(env: &TestEnv, name: &str, spec: Value) {
    env.api::<MatrixRoom>(0)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "spec": spec })),
        )
        .await
        .expect("patch");
}

#[tokio::test]
async fn a_space_lists_its_children_and_its_members_join_restricted_rooms() {
    let env = TestEnv::new("space").await;
    let ids = users(&env, &["member", "stranger"]).await;
    // The member belongs to the group's space only, not to any event room.
    perm(&env, 0, "member", "group", "member", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "group",
        json!({"alias": unique("group"), "name": "Group", "type": "Space"}),
    )
    .await;
    env.create::<MatrixRoom>(
        0,
        "e1",
        json!({"alias": unique("e1"), "joinRule": "restricted",
               "parentRef": {"name": "group", "order": "01", "suggested": true}}),
    )
    .await;
    for e in ["e2", "e3"] {
        env.create::<MatrixRoom>(
            0,
            e,
            json!({"alias": unique(e), "parentRef": {"name": "group"}}),
        )
        .await;
    }
    let group: MatrixRoom = env.wait_condition(0, "group", true, "Converged").await;
    let space_id = room_id(&group);
    let mut children = Vec::new();
    for e in ["e1", "e2", "e3"] {
        let child: MatrixRoom = env.wait_condition(0, e, true, "Converged").await;
        children.push(room_id(&child));
    }
    let via = json!([server()]);

    let space = state_of(&env, &space_id).await;
    assert_eq!(space.get("m.room.create", "").unwrap()["type"], "m.space");
    wait_for("the space lists its three children", || async {
        let space = state_of(&env, &space_id).await;
        children
            .iter()
            .all(|c| linked(&space, "m.space.child", c))
            .then_some(space)
    })
    .await;
    let space = state_of(&env, &space_id).await;
    assert_eq!(
        space.get("m.space.child", &children[0]).unwrap(),
        &json!({"via": via, "order": "01", "suggested": true})
    );
    assert_eq!(
        space.get("m.space.child", &children[1]).unwrap(),
        &json!({"via": via})
    );
    for child in &children {
        let s = state_of(&env, child).await;
        assert_eq!(
            s.get("m.space.parent", &space_id).unwrap(),
            &json!({"via": via, "canonical": true})
        );
    }
    let e1 = state_of(&env, &children[0]).await;
    assert_eq!(
        e1.get("m.room.join_rules", "").unwrap(),
        &json!({"join_rule": "restricted",
                "allow": [{"type": "m.room_membership", "room_id": space_id}]})
    );

    // The space's member joins the restricted room from a client; a stranger cannot.
    let path = format!("/rooms/{}/join", urlencode(&children[0]));
    let member = login_as(&ids[0]).await;
    let stranger = login_as(&ids[1]).await;
    assert_eq!(
        as_user(&stranger, reqwest::Method::POST, &path, json!({})).await,
        reqwest::StatusCode::FORBIDDEN
    );
    assert!(as_user(&member, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
    // The join reaches the operator through its feed; the room's reconcile
    // finds a member it did not declare and asks the space who its members
    // are (the member list, not the space's state). An Exclusive room still
    // keeps a member who came in through the space.
    let members_read = || {
        env.operator_synapse
            .stats()
            .by_kind()
            .get(&RequestKind::GetRoomMembers)
            .copied()
            .unwrap_or(0)
    };
    wait_for("the space's members read", || async {
        (members_read() > 0).then_some(())
    })
    .await;
    // Time for that reconcile to finish (a kick would follow the read at once).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let e1 = state_of(&env, &children[0]).await;
    assert_eq!(membership(&e1, &ids[0]), "join");
    assert_eq!(membership(&e1, &ids[1]), "none");
}

#[tokio::test]
async fn reparenting_unparenting_and_child_drift() {
    let env = TestEnv::new("reparent").await;
    let ids = users(&env, &["owner"]).await;
    perm(&env, 0, "owner", "s1", "owner", json!({"role": "Admin"})).await;
    for s in ["s1", "s2"] {
        env.create::<MatrixRoom>(0, s, json!({"alias": unique(s), "type": "Space"}))
            .await;
    }
    env.create::<MatrixRoom>(
        0,
        "c",
        json!({"alias": unique("c"), "parentRef": {"name": "s1"}}),
    )
    .await;
    let s1 = converged_id(&env, "s1").await;
    let s2 = converged_id(&env, "s2").await;
    let c = converged_id(&env, "c").await;
    wait_for("s1 lists c", || async {
        linked(&state_of(&env, &s1).await, "m.space.child", &c).then_some(())
    })
    .await;

    // The space's own Admin cannot drop the child in a client: the links
    // between spaces and rooms are the operator's, at a level only it holds.
    let owner = login_as(&ids[0]).await;
    let path = format!(
        "/rooms/{}/state/m.space.child/{}",
        urlencode(&s1),
        urlencode(&c)
    );
    assert_eq!(
        as_user(&owner, reqwest::Method::PUT, &path, json!({})).await,
        reqwest::StatusCode::FORBIDDEN
    );
    assert!(linked(&state_of(&env, &s1).await, "m.space.child", &c));

    // Re-parented: the old space drops it, the new one lists it.
    patch_spec(&env, "c", json!({"parentRef": {"name": "s2"}})).await;
    wait_for("moved from s1 to s2", || async {
        let (a, b, child) = (
            state_of(&env, &s1).await,
            state_of(&env, &s2).await,
            state_of(&env, &c).await,
        );
        (!linked(&a, "m.space.child", &c)
            && linked(&b, "m.space.child", &c)
            && !linked(&child, "m.space.parent", &s1)
            && linked(&child, "m.space.parent", &s2))
        .then_some(())
    })
    .await;

    // A child closed by deletion leaves its space on both sides.
    env.create::<MatrixRoom>(
        0,
        "gone",
        json!({"alias": unique("gone"), "parentRef": {"name": "s2"}}),
    )
    .await;
    let gone = converged_id(&env, "gone").await;
    wait_for("s2 lists the second child", || async {
        linked(&state_of(&env, &s2).await, "m.space.child", &gone).then_some(())
    })
    .await;
    env.api::<MatrixRoom>(0)
        .delete("gone", &Default::default())
        .await
        .unwrap();
    env.wait_gone(&env.api::<MatrixRoom>(0), "gone").await;
    wait_for("the closed child unlinked", || async {
        let space = state_of(&env, &s2).await;
        let closed = env.synapse.admin_room_state(&gone).await.ok()??;
        (!linked(&space, "m.space.child", &gone) && !linked(&closed, "m.space.parent", &s2))
            .then_some(())
    })
    .await;

    // Un-parented: no relation left on either side.
    patch_spec(&env, "c", json!({"parentRef": null})).await;
    wait_for("no parent left", || async {
        let (b, child) = (state_of(&env, &s2).await, state_of(&env, &c).await);
        (!linked(&b, "m.space.child", &c) && !linked(&child, "m.space.parent", &s2)).then_some(())
    })
    .await;
    env.wait_condition::<MatrixRoom>(0, "s2", true, "Converged")
        .await;
}

#[tokio::test]
async fn cycles_missing_and_plain_parents_are_refused() {
    let env = TestEnv::new("cycle").await;
    env.create::<MatrixRoom>(
        0,
        "a",
        json!({"alias": unique("a"), "type": "Space", "parentRef": {"name": "b"}}),
    )
    .await;
    env.create::<MatrixRoom>(
        0,
        "b",
        json!({"alias": unique("b"), "type": "Space", "parentRef": {"name": "a"}}),
    )
    .await;
    env.create::<MatrixRoom>(0, "plain", json!({"alias": unique("plain")}))
        .await;
    env.create::<MatrixRoom>(
        0,
        "under-plain",
        json!({"alias": unique("under"), "parentRef": {"name": "plain"}}),
    )
    .await;
    env.create::<MatrixRoom>(
        0,
        "orphan",
        json!({"alias": unique("orphan"), "parentRef": {"name": "later"}}),
    )
    .await;
    for name in ["a", "b"] {
        let r: MatrixRoom = env.wait_condition(0, name, false, "ParentCycle").await;
        assert!(r.status.unwrap().room_id.is_none(), "no room for a cycle");
    }
    env.wait_condition::<MatrixRoom>(0, "under-plain", false, "ParentNotSpace")
        .await;
    env.wait_condition::<MatrixRoom>(0, "orphan", false, "ParentNotFound")
        .await;
    // The missing parent arrives: the orphan converges under it by itself.
    env.create::<MatrixRoom>(
        0,
        "later",
        json!({"alias": unique("later"), "type": "Space"}),
    )
    .await;
    env.wait_condition::<MatrixRoom>(0, "orphan", true, "Converged")
        .await;
    // Breaking the cycle lets both converge.
    patch_spec(&env, "a", json!({"parentRef": null})).await;
    env.wait_condition::<MatrixRoom>(0, "a", true, "Converged")
        .await;
    env.wait_condition::<MatrixRoom>(0, "b", true, "Converged")
        .await;
}

#[tokio::test]
async fn resync_of_a_converged_space_and_child_reads_and_writes_nothing() {
    let env = TestEnv::new("spacenoop").await;
    users(&env, &["member"]).await;
    perm(&env, 0, "member", "s", "member", json!({})).await;
    env.create::<MatrixRoom>(0, "s", json!({"alias": unique("s"), "type": "Space"}))
        .await;
    env.create::<MatrixRoom>(
        0,
        "c",
        json!({"alias": unique("c"), "joinRule": "restricted",
               "parentRef": {"name": "s", "order": "1", "suggested": true}}),
    )
    .await;
    let s = converged_id(&env, "s").await;
    let c = converged_id(&env, "c").await;
    wait_for("s lists c", || async {
        linked(&state_of(&env, &s).await, "m.space.child", &c).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stats = env.operator_synapse.stats();
    let (writes, reads) = (stats.writes(), stats.reads());
    for (i, name) in ["s", "c", "s", "c"].into_iter().enumerate() {
        let before = env.stats.room_reconciles();
        env.api::<MatrixRoom>(0)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"test/touch": i.to_string()}}})),
            )
            .await
            .unwrap();
        wait_for("a resync", || async {
            (env.stats.room_reconciles() > before).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stats.writes(), writes, "a no-op resync writes nothing");
    assert_eq!(
        stats.reads(),
        reads,
        "the statuses confirm both rooms: no read until the sweep"
    );
}

#[tokio::test]
async fn an_adopted_room_too_old_for_restricted_joins_is_refused_untouched() {
    let env = TestEnv::new("oldroom").await;
    let alias = unique("old");
    // The room object waits for its space, so nothing is created yet.
    let child: MatrixRoom = env
        .create(
            0,
            "old",
            json!({"alias": alias, "joinRule": "restricted", "parentRef": {"name": "later"}}),
        )
        .await;
    env.wait_condition::<MatrixRoom>(0, "old", false, "ParentNotFound")
        .await;
    // Meanwhile an older room of this object's appears under its alias
    // (say, made by an earlier version of the platform): room version 7.
    let old_id = crate::rooms::room_made_before(&env, &child, "7", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "later",
        json!({"alias": unique("later"), "type": "Space"}),
    )
    .await;
    env.wait_condition::<MatrixRoom>(0, "old", false, "RoomVersionUnsupported")
        .await;
    // Nothing was half-applied: the join rule and the parent link are as they were.
    let s = state_of(&env, &old_id).await;
    assert_eq!(
        s.get("m.room.join_rules", "").unwrap()["join_rule"],
        "invite"
    );
    assert!(s.events.keys().all(|(kind, _)| kind != "m.space.parent"));
}

/// A group's space `group` and its event room `e1` (with `extra` in its
/// spec), with two members, each `(MatrixUser name, user id)`: the space's
/// and the event room's ids, once both members have joined.
async fn group_with_event(
    env: &TestEnv,
    extra: Value,
    members: [(&str, &str); 2],
) -> (String, String) {
    env.create::<MatrixRoom>(
        0,
        "group",
        json!({"alias": unique("group"), "type": "Space"}),
    )
    .await;
    let mut spec = json!({"alias": unique("e1"), "parentRef": {"name": "group"}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    env.create::<MatrixRoom>(0, "e1", spec).await;
    for (name, _) in members {
        perm(env, 0, name, "e1", name, json!({})).await;
    }
    let space_id = converged_id(env, "group").await;
    let child_id = converged_id(env, "e1").await;
    wait_for("both members joined", || async {
        let s = state_of(env, &child_id).await;
        members
            .iter()
            .all(|(_, id)| membership(&s, id) == "join")
            .then_some(())
    })
    .await;
    (space_id, child_id)
}

#[tokio::test]
async fn a_room_whose_space_is_gone_stands_alone_and_keeps_enforcing() {
    let env = TestEnv::new("orphan").await;
    let ids = users(&env, &["banned", "stays", "newcomer"]).await;
    let (space_id, child_id) = group_with_event(
        &env,
        json!({"joinRule": "restricted"}),
        [("banned", &ids[0]), ("stays", &ids[1])],
    )
    .await;

    // The group's space goes away: the event room stands alone.
    let rooms = env.api::<MatrixRoom>(0);
    rooms
        .delete("group", &Default::default())
        .await
        .expect("delete");
    env.wait_gone(&rooms, "group").await;
    wait_for("the child unlinked, invite only", || async {
        let s = state_of(&env, &child_id).await;
        let invite = s.get("m.room.join_rules", "")? == &json!({"join_rule": "invite"});
        (invite && !linked(&s, "m.space.parent", &space_id)).then_some(())
    })
    .await;
    let child: MatrixRoom = env.wait_condition(0, "e1", false, "ParentNotFound").await;
    assert_eq!(room_id(&child), child_id, "the room is still the object's");

    // Its rules still hold: a ban is applied, a new member joins.
    env.api::<RoomPermission>(0)
        .patch(
            "banned",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"membership": "Ban"}})),
        )
        .await
        .expect("patch");
    perm(&env, 0, "newcomer", "e1", "newcomer", json!({})).await;
    wait_for("banned and joined while the parent is gone", || async {
        let s = state_of(&env, &child_id).await;
        (membership(&s, &ids[0]) == "ban"
            && membership(&s, &ids[1]) == "join"
            && membership(&s, &ids[2]) == "join")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_room_held_back_applies_removals_and_nothing_else() {
    let env = TestEnv::new("held").await;
    let ids = users(&env, &["leaver", "stays", "newcomer"]).await;
    let (_, child_id) =
        group_with_event(&env, json!({}), [("leaver", &ids[0]), ("stays", &ids[1])]).await;

    // Moved under a space that has no room (an older object holds its alias).
    let taken = unique("taken");
    env.create::<MatrixRoom>(0, "holder", json!({"alias": taken}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "holder", true, "Converged")
        .await;
    env.create::<MatrixRoom>(0, "blocked", json!({"alias": taken, "type": "Space"}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "blocked", false, "AliasConflict")
        .await;
    patch_spec(&env, "e1", json!({"parentRef": {"name": "blocked"}})).await;
    env.wait_condition::<MatrixRoom>(0, "e1", false, "ParentNotReady")
        .await;

    // A newcomer waits with the room; a deleted permission is applied.
    perm(&env, 0, "newcomer", "e1", "newcomer", json!({})).await;
    env.api::<RoomPermission>(0)
        .delete("leaver", &Default::default())
        .await
        .expect("delete");
    wait_for("the leaver removed", || async {
        let s = state_of(&env, &child_id).await;
        (membership(&s, &ids[0]) == "leave").then_some(())
    })
    .await;
    let s = state_of(&env, &child_id).await;
    assert_eq!(membership(&s, &ids[1]), "join");
    assert_eq!(
        membership(&s, &ids[2]),
        "none",
        "nothing is added while held"
    );
}

#[tokio::test]
async fn leaving_the_group_takes_you_out_of_its_restricted_rooms_within_seconds() {
    let env = TestEnv::new("group-leave").await;
    let ids = users(&env, &["member"]).await;
    perm(&env, 0, "member", "group", "member", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "group",
        json!({"alias": unique("group"), "type": "Space"}),
    )
    .await;
    env.create::<MatrixRoom>(
        0,
        "e1",
        json!({"alias": unique("e1"), "joinRule": "restricted", "parentRef": {"name": "group"}}),
    )
    .await;
    let space_id = converged_id(&env, "group").await;
    let child_id = converged_id(&env, "e1").await;
    wait_for("the member in the space", || async {
        let s = state_of(&env, &space_id).await;
        (membership(&s, &ids[0]) == "join").then_some(())
    })
    .await;
    // The member joins the event room through the space, from a client.
    let member = login_as(&ids[0]).await;
    let path = format!("/rooms/{}/join", urlencode(&child_id));
    assert!(as_user(&member, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
    // Kept: the room's reconcile finds them in the space.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        membership(&state_of(&env, &child_id).await, &ids[0]),
        "join"
    );

    // Removed from the group: out of its event room at once, not at the
    // periodic resync (300 s here).
    let removed = std::time::Instant::now();
    env.api::<RoomPermission>(0)
        .delete("member", &Default::default())
        .await
        .expect("delete");
    wait_for("the member out of the restricted room", || async {
        let s = state_of(&env, &child_id).await;
        (membership(&s, &ids[0]) == "leave").then_some(())
    })
    .await;
    eprintln!(
        "group departure to restricted-room removal: {} ms",
        removed.elapsed().as_millis()
    );
    assert_eq!(
        membership(&state_of(&env, &space_id).await, &ids[0]),
        "leave"
    );
}
