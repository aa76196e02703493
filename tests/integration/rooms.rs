//! `MatrixRoom` and `RoomPermission` converging against the real stack.

use crate::harness::{
    controller_command, unique, wait_for, DriftMarks, Options, Stack, TestEnv, LABEL,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use openmeet_matrix_operator::synapse::rooms::RoomState;
use openmeet_matrix_operator::synapse::RequestKind;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;

/// Creates Ready users named after `names` in namespace 0; returns their ids.
pub(crate) async fn users(env: &TestEnv, names: &[&str]) -> Vec<String> {
    let mut ids = Vec::new();
    for name in names {
        let localpart = unique(name);
        env.create::<MatrixUser>(
            0,
            name,
            json!({"localpart": localpart, "displayName": name}),
        )
        .await;
        ids.push(env.user_id(&localpart).to_string());
    }
    for name in names {
        env.wait_condition::<MatrixUser>(0, name, true, "Converged")
            .await;
    }
    ids
}

pub(crate) async fn perm(
    env: &TestEnv,
    ns: usize,
    name: &str,
    room: &str,
    user: &str,
    extra: Value,
) {
    let mut spec = json!({"roomRef": {"name": room}, "userRef": {"name": user}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    env.create::<RoomPermission>(ns, name, spec).await;
}

pub(crate) async fn state(env: &TestEnv, room: &MatrixRoom) -> RoomState {
    let id = room.status.as_ref().unwrap().room_id.clone().unwrap();
    env.synapse
        .room_state(&id)
        .await
        .unwrap()
        .expect("room readable")
}

pub(crate) fn membership(state: &RoomState, user: &str) -> String {
    state
        .memberships()
        .get(user)
        .cloned()
        .unwrap_or_else(|| "none".into())
}

/// A room that appears under the managed alias of `object` (in namespace
/// 0) before the operator made one, as an earlier version of the platform
/// would have: of `version`, carrying the object's marker, with `extra` in
/// the `createRoom` body. Its room id.
pub(crate) async fn room_made_before(
    env: &TestEnv,
    object: &MatrixRoom,
    version: &str,
    extra: Value,
) -> String {
    let marker = json!({"namespace": env.ns(0), "name": object.metadata.name.clone().unwrap(),
                        "uid": object.metadata.uid.clone().unwrap()});
    let mut body = json!({
        "room_alias_name": format!("openmeet-{}", object.spec.alias),
        "room_version": version,
        "preset": "private_chat",
        "initial_state": [{"type": "net.openmeet.owner", "state_key": "", "content": marker}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    match env.synapse.create_room(&body).await.unwrap() {
        openmeet_matrix_operator::synapse::rooms::CreateOutcome::Created(id) => id,
        _ => panic!("alias taken"),
    }
}

/// An access token for a local user, valid for an hour, minted as the
/// stack's auth mode allows ([`Stack::login_as`]).
pub(crate) async fn login_as(user_id: &str) -> String {
    login_as_for(user_id, 3_600_000).await
}

/// [`login_as`], valid for `valid_ms`.
pub(crate) async fn login_as_for(user_id: &str, valid_ms: u64) -> String {
    Stack::get()
        .login_as(user_id, Duration::from_millis(valid_ms))
        .await
}

pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A client-API call as a plain user.
pub(crate) async fn as_user(
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> reqwest::StatusCode {
    let url = format!(
        "{}/_matrix/client/v3{path}",
        Stack::get().var("SYNAPSE_URL")
    );
    reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn room_is_created_once_with_its_state_members_and_power() {
    let env = TestEnv::new("room").await;
    let ids = users(&env, &["alice", "bob", "carol"]).await;
    perm(
        &env,
        0,
        "alice",
        "meetup",
        "alice",
        json!({"role": "Admin"}),
    )
    .await;
    perm(&env, 0, "bob", "meetup", "bob", json!({"powerLevel": 10})).await;
    perm(
        &env,
        0,
        "carol",
        "meetup",
        "carol",
        json!({"membership": "Invite"}),
    )
    .await;
    let alias = unique("meetup");
    env.create::<MatrixRoom>(
        0,
        "meetup",
        json!({"alias": alias, "name": "Meetup", "topic": "Talk", "encrypted": true, "historyVisibility": "joined",
               "permissions": {"sendMessages": 5, "changeSettings": 75}}),
    )
    .await;
    let room: MatrixRoom = env.wait_condition(0, "meetup", true, "Converged").await;
    let status = room.status.clone().unwrap();
    assert_eq!(
        status.canonical_alias.as_deref(),
        Some(format!("#openmeet-{alias}:openmeet.test").as_str())
    );
    assert_eq!(status.joined_members, Some(3), "operator, alice, bob");
    assert_eq!(
        status.joined_members,
        Some(joined_in_synapse(&env, &room).await)
    );

    let s = state(&env, &room).await;
    assert_eq!(s.get("m.room.name", "").unwrap()["name"], "Meetup");
    assert_eq!(s.get("m.room.topic", "").unwrap()["topic"], "Talk");
    assert_eq!(
        s.get("m.room.encryption", "").unwrap()["algorithm"],
        "m.megolm.v1.aes-sha2"
    );
    assert_eq!(
        s.get("m.room.history_visibility", "").unwrap()["history_visibility"],
        "joined"
    );
    assert_eq!(s.get("net.openmeet.owner", "").unwrap()["name"], "meetup");
    let pl = s.get("m.room.power_levels", "").unwrap();
    assert_eq!(pl["users"][&ids[0]], 100);
    assert_eq!(pl["users"][&ids[1]], 10);
    assert_eq!(pl["events_default"], 5);
    assert_eq!(pl["events"]["m.room.name"], 75);
    assert!(
        pl["users"]
            .get(env.synapse.admin_user_id().as_str())
            .is_none(),
        "creator is never listed"
    );
    assert_eq!(membership(&s, &ids[0]), "join");
    assert_eq!(membership(&s, &ids[1]), "join");
    assert_eq!(membership(&s, &ids[2]), "invite");

    let p: RoomPermission = env.wait_condition(0, "bob", true, "Converged").await;
    assert_eq!(p.status.unwrap().effective_power_level, Some(10));
    let by_kind = env.operator_synapse.stats().by_kind();
    assert_eq!(by_kind.get(&RequestKind::CreateRoom), Some(&1));
    assert!(
        by_kind
            .get(&RequestKind::PutPowerLevels)
            .copied()
            .unwrap_or(0)
            <= 1
    );

    // Carol accepts her invite in a client: nothing for the operator to
    // write, yet the status counts her, as Synapse does.
    let room_id = status.room_id.clone().unwrap();
    let token = login_as(&ids[2]).await;
    let path = format!("/rooms/{}/join", urlencode(&room_id));
    assert!(as_user(&token, reqwest::Method::POST, &path, json!({}))
        .await
        .is_success());
    let room: MatrixRoom = wait_for("joinedMembers counts carol", || async {
        let room = env.api::<MatrixRoom>(0).get("meetup").await.ok()?;
        (room.status.as_ref()?.joined_members == Some(4)).then_some(room)
    })
    .await;
    let joined = joined_in_synapse(&env, &room).await;
    assert_eq!(room.status.unwrap().joined_members, Some(joined));
}

/// How many members Synapse has joined to the room, from its current state.
async fn joined_in_synapse(env: &TestEnv, room: &MatrixRoom) -> i64 {
    let s = state(env, room).await;
    s.memberships().values().filter(|m| *m == "join").count() as i64
}

#[tokio::test]
async fn spec_changes_converge_and_encryption_only_turns_on() {
    let env = TestEnv::new("roomupd").await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("upd"), "name": "Before"}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    env.api::<MatrixRoom>(0)
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"name": "After", "topic": "New topic", "joinRule": "public",
                "guestAccess": true, "encrypted": true, "avatarUrl": "mxc://openmeet.test/room"}}),
            ),
        )
        .await
        .unwrap();
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let s = state(&env, &room).await;
    assert_eq!(s.get("m.room.name", "").unwrap()["name"], "After");
    assert_eq!(s.get("m.room.topic", "").unwrap()["topic"], "New topic");
    assert_eq!(
        s.get("m.room.join_rules", "").unwrap()["join_rule"],
        "public"
    );
    assert_eq!(
        s.get("m.room.guest_access", "").unwrap()["guest_access"],
        "can_join"
    );
    assert_eq!(
        s.get("m.room.avatar", "").unwrap()["url"],
        "mxc://openmeet.test/room"
    );
    assert!(s.get("m.room.encryption", "").is_some());
    let rejected = env
        .api::<MatrixRoom>(0)
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"encrypted": false}})),
        )
        .await;
    assert!(
        rejected.is_err(),
        "turning encryption off is refused at admission"
    );
}

#[tokio::test]
async fn exclusive_removes_strangers_and_additive_keeps_them() {
    let env = TestEnv::new("members").await;
    let ids = users(&env, &["member", "stranger"]).await;
    let stranger = ruma::UserId::parse(&ids[1]).unwrap();
    perm(
        &env,
        0,
        "ex-member",
        "exclusive",
        "member",
        json!({"role": "Moderator"}),
    )
    .await;
    perm(
        &env,
        0,
        "add-member",
        "additive",
        "member",
        json!({"role": "Moderator"}),
    )
    .await;
    env.create::<MatrixRoom>(0, "exclusive", json!({"alias": unique("ex")}))
        .await;
    env.create::<MatrixRoom>(
        0,
        "additive",
        json!({"alias": unique("add"), "membershipPolicy": "Additive"}),
    )
    .await;
    let ex: MatrixRoom = env.wait_condition(0, "exclusive", true, "Converged").await;
    let add: MatrixRoom = env.wait_condition(0, "additive", true, "Converged").await;

    // The stranger is joined out of band (as an admin could). Synapse's admin
    // join invites, then joins: in the Exclusive room the operator may revoke
    // the invite in between, and the join then fails. Either way the stranger
    // must end up outside.
    let room_id = |r: &MatrixRoom| {
        ruma::RoomId::parse(r.status.as_ref().unwrap().room_id.as_deref().unwrap()).unwrap()
    };
    let _ = env.synapse.admin_join(&room_id(&ex), &stranger).await;
    env.synapse
        .admin_join(&room_id(&add), &stranger)
        .await
        .unwrap();
    wait_for("stranger removed from the Exclusive room", || async {
        (membership(&state(&env, &ex).await, &ids[1]) == "leave").then_some(())
    })
    .await;
    assert_eq!(
        membership(&state(&env, &add).await, &ids[1]),
        "join",
        "Additive never removes"
    );
    // Nothing to write for the stranger there, yet the status counts what Synapse does.
    wait_for(
        "the Additive room's joinedMembers counts the stranger",
        || async {
            let room = env.api::<MatrixRoom>(0).get("additive").await.ok()?;
            let joined = joined_in_synapse(&env, &room).await;
            (joined == 3 && room.status?.joined_members == Some(joined)).then_some(())
        },
    )
    .await;

    // Deleting a permission: Exclusive removes the member, Additive only drops power.
    env.api::<RoomPermission>(0)
        .delete("ex-member", &DeleteParams::default())
        .await
        .unwrap();
    env.api::<RoomPermission>(0)
        .delete("add-member", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("member removed from the Exclusive room", || async {
        (membership(&state(&env, &ex).await, &ids[0]) == "leave").then_some(())
    })
    .await;
    wait_for("member loses power in the Additive room", || async {
        let s = state(&env, &add).await;
        let power = s.get("m.room.power_levels", "")?["users"]
            .get(&ids[0])
            .cloned();
        (power.is_none() && membership(&s, &ids[0]) == "join").then_some(())
    })
    .await;
}

#[tokio::test]
async fn ban_and_unban() {
    let env = TestEnv::new("ban").await;
    let ids = users(&env, &["troll"]).await;
    perm(&env, 0, "troll", "r", "troll", json!({})).await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("ban")}))
        .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    assert_eq!(membership(&state(&env, &room).await, &ids[0]), "join");

    let api = env.api::<RoomPermission>(0);
    api.patch(
        "troll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"membership": "Ban"}})),
    )
    .await
    .unwrap();
    wait_for("banned", || async {
        (membership(&state(&env, &room).await, &ids[0]) == "ban").then_some(())
    })
    .await;
    api.patch(
        "troll",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"membership": "Join"}})),
    )
    .await
    .unwrap();
    wait_for("unbanned and joined", || async {
        (membership(&state(&env, &room).await, &ids[0]) == "join").then_some(())
    })
    .await;
}

#[tokio::test]
async fn out_of_band_changes_are_reverted_at_once() {
    let env = TestEnv::new("drift").await;
    let ids = users(&env, &["moderator", "member"]).await;
    perm(
        &env,
        0,
        "moderator",
        "r",
        "moderator",
        json!({"role": "Admin"}),
    )
    .await;
    perm(&env, 0, "member", "r", "member", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "r",
        json!({"alias": unique("drift"), "name": "Official"}),
    )
    .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let room_id = room.status.as_ref().unwrap().room_id.clone().unwrap();
    let token = login_as(&ids[0]).await;

    // A room Admin cannot raise the member's power in a client: power
    // levels are the operator's, and only its creator level reaches them.
    let mut pl = state(&env, &room)
        .await
        .get("m.room.power_levels", "")
        .unwrap()
        .clone();
    pl["users"][&ids[1]] = json!(90);
    let path = format!("/rooms/{}/state/m.room.power_levels/", urlencode(&room_id));
    assert_eq!(
        as_user(&token, reqwest::Method::PUT, &path, pl).await,
        reqwest::StatusCode::FORBIDDEN
    );
    // Renaming the room is theirs to try; the operator reverts it.
    let path = format!("/rooms/{}/state/m.room.name/", urlencode(&room_id));
    assert!(as_user(
        &token,
        reqwest::Method::PUT,
        &path,
        json!({"name": "Hijacked"})
    )
    .await
    .is_success());

    // Reverted through the pushed transaction, well before any periodic resync (300 s here).
    wait_for("drift reverted", || async {
        let s = state(&env, &room).await;
        let power = s.get("m.room.power_levels", "")?["users"]
            .get(&ids[1])
            .cloned();
        (power.is_none() && s.get("m.room.name", "")?["name"] == "Official").then_some(())
    })
    .await;
    wait_for("DriftCorrected event", || async {
        env.event_reasons(0, "r")
            .await
            .iter()
            .any(|r| r == "DriftCorrected")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_operators_own_joins_are_not_drift() {
    let env = TestEnv::new("ownjoins").await;
    let ids = users(&env, &["alice", "bob", "carol"]).await;
    env.create::<MatrixRoom>(
        0,
        "r",
        json!({"alias": unique("ownjoins"), "name": "Joined"}),
    )
    .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let room_id = room.status.as_ref().unwrap().room_id.clone().unwrap();

    // Every drift mark the room's object receives from here on.
    let config = kube::runtime::watcher::Config::default().fields("metadata.name=r");
    let marks = DriftMarks::watch(env.api::<MatrixRoom>(0), config);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(marks.marks().is_empty(), "{:?}", marks.marks());

    // The operator joins three members: their membership events come back
    // through the feed, sent as the members themselves.
    perm(&env, 0, "alice", "r", "alice", json!({"role": "Moderator"})).await;
    perm(&env, 0, "bob", "r", "bob", json!({})).await;
    perm(&env, 0, "carol", "r", "carol", json!({})).await;
    wait_for("three members joined", || async {
        let s = state(&env, &room).await;
        ids.iter()
            .all(|id| {
                s.get("m.room.member", id)
                    .is_some_and(|m| m["membership"] == "join")
            })
            .then_some(())
    })
    .await;
    // Synapse pushes within moments; events of a room arrive in order.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A member's own change is drift, and the mark names it.
    let token = login_as(&ids[0]).await;
    let topic: Value = reqwest::Client::new()
        .put(format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            Stack::get().var("SYNAPSE_URL"),
            urlencode(&room_id)
        ))
        .bearer_auth(&token)
        .json(&json!({"topic": "changed in a client"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let topic_event = topic["event_id"].as_str().unwrap().to_string();
    wait_for("the topic change marked", || async {
        marks.marks().contains(&topic_event).then_some(())
    })
    .await;
    assert_eq!(
        marks.marks(),
        vec![topic_event],
        "only the member's change is drift, not the operator's joins"
    );
}

#[tokio::test]
async fn alias_conflicts_across_namespaces_and_with_foreign_rooms() {
    let env = TestEnv::with(
        "alias",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let alias = unique("shared");
    env.create::<MatrixRoom>(0, "first", json!({"alias": alias}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "first", true, "Converged")
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let creates = env
        .operator_synapse
        .stats()
        .by_kind()
        .get(&RequestKind::CreateRoom)
        .copied();
    env.create::<MatrixRoom>(1, "second", json!({"alias": alias}))
        .await;
    let second: MatrixRoom = env
        .wait_condition(1, "second", false, "AliasConflict")
        .await;
    assert_eq!(second.status.as_ref().unwrap().room_id, None);
    assert_eq!(
        env.operator_synapse
            .stats()
            .by_kind()
            .get(&RequestKind::CreateRoom)
            .copied(),
        creates
    );

    // Its message never names the holder: it may be another tenant's.
    let message = &second.status.as_ref().unwrap().conditions[0].message;
    assert!(
        !message.contains(env.ns(0)) && !message.contains("first"),
        "{message}"
    );

    // A room under a managed alias that is another object's (its marker
    // names another uid: an object deleted with Retain, say) is never adopted.
    let squatted = unique("squat");
    let other = json!({"namespace": env.ns(0), "name": "squatted", "uid": "another-uid"});
    let body = json!({"room_alias_name": format!("openmeet-{squatted}"), "name": "Not ours",
                      "initial_state": [{"type": "net.openmeet.owner", "state_key": "", "content": other}]});
    env.synapse.create_room(&body).await.unwrap();
    env.create::<MatrixRoom>(0, "squatted", json!({"alias": squatted, "name": "Mine"}))
        .await;
    env.wait_condition::<MatrixRoom>(0, "squatted", false, "AliasConflict")
        .await;
}

#[tokio::test]
async fn references_resolve_by_themselves_and_never_cross_namespaces() {
    let env = TestEnv::with(
        "refs",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let ids = users(&env, &["alice"]).await;
    // Namespace 1 names "alice", which only exists in namespace 0.
    perm(&env, 1, "cross", "r", "alice", json!({"role": "Admin"})).await;
    env.create::<MatrixRoom>(1, "r", json!({"alias": unique("refs")}))
        .await;
    let room: MatrixRoom = env.wait_condition(1, "r", true, "Converged").await;
    let p: RoomPermission = env.wait_condition(1, "cross", false, "Pending").await;
    assert!(p.status.unwrap().conditions[0]
        .message
        .contains("does not exist"));
    assert_eq!(membership(&state(&env, &room).await, &ids[0]), "none");

    // A permission whose room does not exist yet is Pending, then converges.
    perm(&env, 0, "early", "later", "alice", json!({})).await;
    env.wait_condition::<RoomPermission>(0, "early", false, "Pending")
        .await;
    env.create::<MatrixRoom>(0, "later", json!({"alias": unique("later")}))
        .await;
    env.wait_condition::<RoomPermission>(0, "early", true, "Converged")
        .await;

    // A user created after its permission: Pending until the user is Ready.
    perm(&env, 0, "late-user", "later", "bob", json!({})).await;
    env.wait_condition::<RoomPermission>(0, "late-user", false, "Pending")
        .await;
    env.create::<MatrixUser>(0, "bob", json!({"localpart": unique("bob")}))
        .await;
    env.wait_condition::<RoomPermission>(0, "late-user", true, "Converged")
        .await;

    // Duplicates: the oldest wins.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    perm(&env, 0, "dup", "later", "alice", json!({"role": "Admin"})).await;
    env.wait_condition::<RoomPermission>(0, "dup", false, "Duplicate")
        .await;
}

#[tokio::test]
async fn deletion_closes_purges_or_retains() {
    let env = TestEnv::new("roomdel").await;
    let ids = users(&env, &["alice"]).await;
    let mut rooms = Vec::new();
    for policy in ["Close", "Purge", "Retain"] {
        let name = policy.to_lowercase();
        perm(&env, 0, &name, &name, "alice", json!({})).await;
        let alias = unique(&name);
        env.create::<MatrixRoom>(0, &name, json!({"alias": alias, "deletionPolicy": policy}))
            .await;
        rooms.push((name, alias));
    }
    let mut ids_by_name = Vec::new();
    for (name, _) in &rooms {
        let room: MatrixRoom = env.wait_condition(0, name, true, "Converged").await;
        ids_by_name.push(room.status.unwrap().room_id.unwrap());
        env.api::<MatrixRoom>(0)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for (name, _) in &rooms {
        env.wait_gone(&env.api::<MatrixRoom>(0), name).await;
    }
    let alias = |a: &str| ruma::RoomAliasId::parse(format!("#openmeet-{a}:openmeet.test")).unwrap();
    // Close: alias dropped, alice removed, the operator left.
    assert_eq!(
        env.synapse
            .resolve_alias(&alias(&rooms[0].1))
            .await
            .unwrap(),
        None
    );
    let closed = env
        .synapse
        .room_state(&ids_by_name[0])
        .await
        .unwrap()
        .expect("state as of leaving");
    assert_eq!(membership(&closed, &ids[0]), "leave");
    assert_eq!(
        membership(&closed, env.synapse.admin_user_id().as_str()),
        "leave"
    );
    // Purge: the room is gone from Synapse.
    assert_eq!(
        env.synapse
            .resolve_alias(&alias(&rooms[1].1))
            .await
            .unwrap(),
        None,
        "the purged room was {}",
        ids_by_name[1]
    );
    let details = admin_room_details(&ids_by_name[1]).await;
    assert_eq!(details, reqwest::StatusCode::NOT_FOUND);
    // Retain: untouched.
    assert_eq!(
        env.synapse
            .resolve_alias(&alias(&rooms[2].1))
            .await
            .unwrap()
            .as_deref(),
        Some(ids_by_name[2].as_str())
    );
    assert_eq!(
        membership(
            &env.synapse
                .room_state(&ids_by_name[2])
                .await
                .unwrap()
                .unwrap(),
            &ids[0]
        ),
        "join"
    );
}

async fn admin_room_details(room_id: &str) -> reqwest::StatusCode {
    let path = format!("/_synapse/admin/v1/rooms/{}", urlencode(room_id));
    Stack::get()
        .admin_api(reqwest::Method::GET, &path)
        .await
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn directory_publication_is_verified() {
    let env = TestEnv::new("publish").await;
    env.create::<MatrixRoom>(
        0,
        "r",
        json!({"alias": unique("pub"), "publishToDirectory": true, "joinRule": "public"}),
    )
    .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let id = room.status.as_ref().unwrap().room_id.clone().unwrap();
    let published = room
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Published")
        .cloned()
        .unwrap();
    assert_eq!(
        (published.status.as_str(), published.reason.as_str()),
        ("True", "Published")
    );
    assert!(env.synapse.directory_visibility(&id).await.unwrap());

    env.api::<MatrixRoom>(0)
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"publishToDirectory": false}})),
        )
        .await
        .unwrap();
    env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    assert!(!env.synapse.directory_visibility(&id).await.unwrap());

    // The stack's room_list_publication_rules deny this alias pattern.
    env.create::<MatrixRoom>(
        0,
        "refused",
        json!({"alias": unique("refused"), "publishToDirectory": true}),
    )
    .await;
    let room: MatrixRoom = env.wait_condition(0, "refused", true, "Converged").await;
    let published = room
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Published")
        .cloned()
        .unwrap();
    assert_eq!(
        (published.status.as_str(), published.reason.as_str()),
        ("False", "PublicationRefused")
    );
    env.wait_event(0, "refused", "PublicationRefused", 1).await;
}

#[tokio::test]
async fn crash_between_create_and_status_leaves_one_room() {
    let env = TestEnv::with(
        "crash",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let stack = Stack::get();
    let binary = |failpoint: Option<&str>| {
        let mut cmd = controller_command(&env);
        cmd.stderr(Stdio::null());
        if let Some(f) = failpoint {
            cmd.env("OPENMEET_FAILPOINT", f);
        }
        cmd.spawn().expect("controller binary")
    };
    let name = unique("Crash room");
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("crash"), "name": name}))
        .await;
    let mut crashing = binary(Some("after-room-create"));
    let exit = tokio::time::timeout(Duration::from_secs(60), crashing.wait())
        .await
        .expect("crashes")
        .unwrap();
    assert_eq!(exit.code(), Some(86), "the failpoint fired");
    let room = env.api::<MatrixRoom>(0).get("r").await.unwrap();
    assert_eq!(
        room.status.and_then(|s| s.room_id),
        None,
        "crashed before the status write"
    );

    let _restarted = binary(None);
    env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    let listed: Value = stack
        .admin_api(reqwest::Method::GET, "/_synapse/admin/v1/rooms")
        .await
        .query(&[("search_term", name.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["total_rooms"], 1, "exactly one room: {listed}");
}

#[tokio::test]
async fn a_thousand_permissions_cost_one_power_levels_write() {
    let env = TestEnv::new("thousand").await;
    let count = 1000;
    let api = env.api::<MatrixUser>(0);
    let run = env.run_id.clone();
    let mut creating = Vec::new();
    for i in 0..count {
        let user: MatrixUser = serde_json::from_value(json!({
            "apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": format!("u{i}"), "labels": {LABEL: run}},
            "spec": {"localpart": format!("{run}-u{i}")},
        }))
        .unwrap();
        let perm: RoomPermission = serde_json::from_value(json!({
            "apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "RoomPermission",
            "metadata": {"name": format!("p{i}"), "labels": {LABEL: run}},
            "spec": {"roomRef": {"name": "big"}, "userRef": {"name": format!("u{i}")},
                     "role": if i % 10 == 0 { "Moderator" } else { "Member" }},
        }))
        .unwrap();
        let (users_api, perms_api) = (api.clone(), env.api::<RoomPermission>(0));
        creating.push(tokio::spawn(async move {
            users_api.create(&Default::default(), &user).await.unwrap();
            perms_api.create(&Default::default(), &perm).await.unwrap();
        }));
        if creating.len() >= 32 {
            for c in creating.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in creating {
        c.await.unwrap();
    }
    env.create::<MatrixRoom>(0, "big", json!({"alias": unique("big")}))
        .await;
    wait_for_long("1000 members joined", || async {
        let room = env.api::<MatrixRoom>(0).get("big").await.ok()?;
        (room.status?.joined_members? == count + 1).then_some(())
    })
    .await;
    let by_kind = env.operator_synapse.stats().by_kind();
    let pl_writes = by_kind
        .get(&RequestKind::PutPowerLevels)
        .copied()
        .unwrap_or(0);
    assert!(
        pl_writes <= 1,
        "one power-levels write at most, got {pl_writes}"
    );
    assert_eq!(by_kind.get(&RequestKind::CreateRoom), Some(&1));
    let room = env.api::<MatrixRoom>(0).get("big").await.unwrap();
    let pl = state(&env, &room)
        .await
        .get("m.room.power_levels", "")
        .unwrap()
        .clone();
    assert_eq!(
        pl["users"].as_object().unwrap().len(),
        count as usize / 10,
        "moderators only"
    );
}

/// Like `wait_for`, with room for a thousand joins.
async fn wait_for_long<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn transaction_endpoint_checks_hs_token_and_ignores_repeats() {
    let env = TestEnv::new("txn").await;
    env.create::<MatrixRoom>(0, "r", json!({"alias": unique("txn")}))
        .await;
    let room: MatrixRoom = env.wait_condition(0, "r", true, "Converged").await;
    let room_id = room.status.unwrap().room_id.unwrap();
    let stack = Stack::get();
    let hs_token =
        std::fs::read_to_string(format!("{}/synapse/appservice.env", stack.var("STACK_DIR")))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HS_TOKEN=").map(str::to_string))
            .unwrap();
    let txn = unique("txn");
    let url = format!(
        "http://{}/_matrix/app/v1/transactions/{txn}",
        stack.var("APPSERVICE_LISTEN")
    );
    let body = |event_id: &str| {
        json!({"events": [
            {"type": "m.room.message", "room_id": room_id, "sender": "@someone:openmeet.test", "event_id": "$msg", "content": {"body": "hi"}},
            {"type": "m.room.topic", "room_id": room_id, "sender": "@someone:openmeet.test", "state_key": "", "event_id": event_id, "content": {"topic": "x"}},
        ]})
    };
    let http = reqwest::Client::new();
    let put = |token: Option<&str>, body: Value| {
        let mut request = http.put(&url).json(&body);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(put(None, body("$1")).await, 401);
    assert_eq!(put(Some("wrong"), body("$1")).await, 403);
    assert_eq!(put(Some(&hs_token), body("$first")).await, 200);
    let annotation = |r: MatrixRoom| {
        r.metadata
            .annotations
            .unwrap_or_default()
            .get("matrix.openmeet.net/drift-event")
            .cloned()
    };
    assert_eq!(
        annotation(env.api::<MatrixRoom>(0).get("r").await.unwrap()).as_deref(),
        Some("$first")
    );
    // Synapse retrying the same transaction: acknowledged, not applied twice.
    assert_eq!(put(Some(&hs_token), body("$again")).await, 200);
    assert_eq!(
        annotation(env.api::<MatrixRoom>(0).get("r").await.unwrap()).as_deref(),
        Some("$first")
    );
}

#[tokio::test]
async fn resync_of_unchanged_room_reads_and_writes_nothing() {
    let env = TestEnv::new("roomnoop").await;
    users(&env, &["alice"]).await;
    perm(&env, 0, "alice", "r", "alice", json!({"role": "Moderator"})).await;
    env.create::<MatrixRoom>(
        0,
        "r",
        json!({"alias": unique("noop"), "name": "Quiet", "publishToDirectory": true}),
    )
    .await;
    env.wait_condition::<MatrixRoom>(0, "r", true, "Converged")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = env.operator_synapse.stats();
    let (writes, reads) = (stats.writes(), stats.reads());
    for i in 0..3 {
        let before = env.stats.room_reconciles();
        env.api::<MatrixRoom>(0)
            .patch(
                "r",
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stats.writes(),
        writes,
        "a no-op resync must not write to Synapse"
    );
    assert_eq!(
        stats.reads(),
        reads,
        "the status confirms the room: no read until the sweep (a drift mark reads it, see idle::)"
    );
}

#[tokio::test]
async fn rooms_that_exist_before_the_controller_starts_all_converge() {
    // Regression: every reconcile once waited on the caches' readiness, which
    // wakes a single waiter; at start-up the others hung and held their slots.
    let env = TestEnv::with(
        "startup",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let rooms = 24;
    for r in 0..rooms {
        env.create::<MatrixRoom>(
            0,
            &format!("r{r}"),
            json!({"alias": unique(&format!("start{r}"))}),
        )
        .await;
    }
    let _controller = controller_command(&env)
        .env("CONCURRENCY", "4")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for r in 0..rooms {
        env.wait_condition::<MatrixRoom>(0, &format!("r{r}"), true, "Converged")
            .await;
    }
}
