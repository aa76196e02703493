//! Direct conversations, as each member's client sees them: a DM under
//! People, named after the other person, both members joined from an
//! `is_direct` invite, the operator's account a service member; and out of
//! both members' `m.direct` once closed.

use crate::harness::{unique, wait_for, Stack, TestEnv};
use crate::rooms::{as_user, login_as, membership, perm, urlencode, users};
use kube::api::{DeleteParams, Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser};
use openmeet_matrix_operator::synapse::rooms::RoomState;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn room_id(room: &MatrixRoom) -> String {
    room.status.as_ref().unwrap().room_id.clone().unwrap()
}

async fn state_of(env: &TestEnv, room_id: &str) -> RoomState {
    env.synapse
        .room_state(room_id)
        .await
        .unwrap()
        .expect("room readable")
}

/// A room as a member's client sees it after an initial `/sync`: its state
/// (from the state block and the timeline) and its summary.
struct ClientView {
    state: BTreeMap<(String, String), Value>,
    summary: Value,
}

impl ClientView {
    async fn of(token: &str, room_id: &str) -> Option<ClientView> {
        let url = format!("{}/_matrix/client/v3/sync", Stack::get().var("SYNAPSE_URL"));
        // Lazy-loaded members, as Element syncs: Synapse then sends the
        // summary (heroes, counts) clients name rooms from. An event type of
        // its own makes each poll a new request: Synapse answers a repeat
        // from its two-minute sync cache, from before the membership.
        let filter = json!({"room": {
            "state": {"lazy_load_members": true},
            "timeline": {"not_types": [unique("test.poll")]},
        }});
        let sync: Value = reqwest::Client::new()
            .get(url)
            .query(&[("timeout", "0"), ("filter", &filter.to_string())])
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let room = sync["rooms"]["join"].get(room_id)?;
        let mut state = BTreeMap::new();
        for section in ["state", "timeline"] {
            for event in room[section]["events"].as_array().into_iter().flatten() {
                if let Some(key) = event["state_key"].as_str() {
                    let kind = event["type"].as_str().unwrap().to_string();
                    state.insert((kind, key.to_string()), event.clone());
                }
            }
        }
        Some(ClientView {
            state,
            summary: room["summary"].clone(),
        })
    }

    fn content(&self, kind: &str, key: &str) -> Option<&Value> {
        Some(&self.state.get(&(kind.to_string(), key.to_string()))?["content"])
    }

    fn service_members(&self) -> Vec<String> {
        let listed = self
            .content("io.element.functional_members", "")
            .and_then(|c| c["service_members"].as_array().cloned())
            .unwrap_or_default();
        listed
            .iter()
            .filter_map(|u| u.as_str().map(String::from))
            .collect()
    }

    /// The room's name by the rules matrix-js-sdk (Element) applies: its
    /// name, else its canonical alias, else its heroes' display names,
    /// service members left out.
    fn shown_name(&self) -> String {
        if let Some(name) = self
            .content("m.room.name", "")
            .and_then(|c| c["name"].as_str())
        {
            if !name.is_empty() {
                return name.to_string();
            }
        }
        if let Some(alias) = self
            .content("m.room.canonical_alias", "")
            .and_then(|c| c["alias"].as_str())
        {
            return alias.to_string();
        }
        let service = self.service_members();
        let heroes: Vec<String> = self.summary["m.heroes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|u| !service.iter().any(|s| s == u))
            .map(|u| {
                self.content("m.room.member", u)
                    .and_then(|c| c["displayname"].as_str())
                    .unwrap_or(u)
                    .to_string()
            })
            .collect();
        heroes.join(", ")
    }
}

/// The Direct room `dm` of two `MatrixUser`s (object names), once converged: its id.
async fn direct_room(env: &TestEnv, a: &str, b: &str) -> String {
    for user in [a, b] {
        perm(env, 0, user, "dm", user, json!({})).await;
    }
    env.create::<MatrixRoom>(
        0,
        "dm",
        json!({"alias": unique("dm"), "source": {"kind": "Direct", "slug": format!("{a}-{b}")}}),
    )
    .await;
    room_id(&env.wait_condition(0, "dm", true, "Converged").await)
}

/// Every invite `user` received in the room carries `is_direct`, and their
/// membership event, when joined, says they joined from such an invite (what
/// matrix-js-sdk reads to tell a DM and who it is with).
fn invited_as_direct_only(events: &[Value], view: Option<&ClientView>, user: &str, admin: &str) {
    let invites: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == json!(user)
                && e["content"]["membership"] == "invite"
        })
        .collect();
    assert!(!invites.is_empty(), "{user} was invited");
    for invite in invites {
        assert_eq!(
            invite["content"]["is_direct"], true,
            "every invite {user} received is direct: {invite}"
        );
    }
    if let Some(view) = view {
        let me = &view.state[&("m.room.member".to_string(), user.to_string())];
        assert_eq!(me["content"]["membership"], "join");
        assert_eq!(
            me["unsigned"]["prev_content"]["membership"], "invite",
            "{me}"
        );
        assert_eq!(me["unsigned"]["prev_content"]["is_direct"], true, "{me}");
        assert_eq!(me["unsigned"]["prev_sender"], admin, "{me}");
    }
}

/// A user's global account data, through the admin API.
async fn account_data(user_id: &str) -> Value {
    let path = format!(
        "/_synapse/admin/v1/users/{}/accountdata",
        urlencode(user_id)
    );
    let v: Value = Stack::get()
        .admin_api(reqwest::Method::GET, &path)
        .await
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["account_data"]["global"].clone()
}

/// The room's events as the admin API lists them, oldest first.
async fn room_events(room_id: &str) -> Vec<Value> {
    let path = format!("/_synapse/admin/v1/rooms/{}/messages", urlencode(room_id));
    let v: Value = Stack::get()
        .admin_api(reqwest::Method::GET, &path)
        .await
        .query(&[("dir", "f"), ("limit", "100")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["chunk"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_direct_room_looks_like_a_dm_to_both_members_and_needs_exactly_two() {
    let env = TestEnv::new("direct").await;
    let ids = users(&env, &["ann", "ben", "cat"]).await;
    // Ann already has a DM elsewhere: it stays listed.
    let ann = login_as(&ids[0]).await;
    let earlier = json!({"@someone:elsewhere": ["!old:elsewhere"]});
    let path = format!("/user/{}/account_data/m.direct", urlencode(&ids[0]));
    assert!(as_user(&ann, reqwest::Method::PUT, &path, earlier)
        .await
        .is_success());

    let id = direct_room(&env, "ann", "ben").await;
    let s = state_of(&env, &id).await;
    let admin = Stack::get().admin_user_id();
    let joined: Vec<String> = s
        .memberships()
        .into_iter()
        .filter(|(u, m)| m == "join" && *u != admin)
        .map(|(u, _)| u)
        .collect();
    assert_eq!(joined, {
        let mut two = vec![ids[0].clone(), ids[1].clone()];
        two.sort();
        two
    });
    assert!(
        s.get("m.room.encryption", "").is_some(),
        "encrypted by default"
    );
    // No alias for clients to show, the operator a service member.
    let alias = s.get("m.room.canonical_alias", "");
    assert!(
        alias.is_none_or(|c| c.get("alias").is_none()),
        "no canonical alias: {alias:?}"
    );
    for kind in ["io.element.functional_members", "m.member_hints"] {
        assert_eq!(
            s.get(kind, "").map(|c| c["service_members"].clone()),
            Some(json!([admin])),
            "{kind}"
        );
    }
    // Each member's client: a DM with the other person, named after them,
    // joined from an is_direct invite; three joined, the operator hidden.
    let events = room_events(&id).await;
    for (me, other, other_name) in [(&ids[0], &ids[1], "ben"), (&ids[1], &ids[0], "ann")] {
        let token = login_as(me).await;
        let view = wait_for("the DM in the member's sync", || async {
            ClientView::of(&token, &id).await
        })
        .await;
        assert_eq!(
            view.shown_name(),
            other_name,
            "{me} sees the DM named after {other}: {}",
            view.summary
        );
        assert_eq!(view.summary["m.joined_member_count"], 3, "{}", view.summary);
        assert_eq!(view.service_members(), vec![admin.clone()]);
        invited_as_direct_only(&events, Some(&view), me, &admin);
    }
    wait_for("both users list the DM", || async {
        let a = account_data(&ids[0]).await;
        let b = account_data(&ids[1]).await;
        (a["m.direct"][&ids[1]] == json!([id])
            && a["m.direct"]["@someone:elsewhere"] == json!(["!old:elsewhere"])
            && b["m.direct"][&ids[0]] == json!([id]))
        .then_some(())
    })
    .await;

    // A third member is refused, and no room is made for it.
    for (p, u) in [("x-ann", "ann"), ("x-ben", "ben"), ("x-cat", "cat")] {
        perm(&env, 0, p, "trio", u, json!({})).await;
    }
    env.create::<MatrixRoom>(
        0,
        "trio",
        json!({"alias": unique("trio"), "source": {"kind": "Direct", "slug": "trio"}}),
    )
    .await;
    let trio: MatrixRoom = env
        .wait_condition(0, "trio", false, "DirectMemberCount")
        .await;
    assert!(trio.status.unwrap().room_id.is_none());
}

/// A locked member cannot be logged in as, so cannot join as themselves
/// nor have their `m.direct` written: the DM still converges with them
/// invited (the other member's list names it), and they join and list it
/// once the account is unlocked.
#[tokio::test]
async fn a_direct_room_with_a_locked_member_converges_and_joins_them_on_unlock() {
    let env = TestEnv::new("direct-locked").await;
    let ids = users(&env, &["eve"]).await;
    let localpart = unique("fay");
    env.create::<MatrixUser>(
        0,
        "fay",
        json!({"localpart": localpart, "displayName": "fay", "locked": true}),
    )
    .await;
    let fay = env.user_id(&localpart).to_string();
    env.wait_condition::<MatrixUser>(0, "fay", true, "Converged")
        .await;

    let id = direct_room(&env, "eve", "fay").await;
    wait_for("eve lists the DM", || async {
        (account_data(&ids[0]).await["m.direct"][&fay] == json!([id])).then_some(())
    })
    .await;
    assert!(
        account_data(&fay).await["m.direct"].is_null(),
        "nothing written for the locked account"
    );
    assert_eq!(
        membership(&state_of(&env, &id).await, &fay),
        "invite",
        "invited until unlocked"
    );

    env.api::<MatrixUser>(0)
        .patch(
            "fay",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"locked": false}})),
        )
        .await
        .expect("unlock");
    wait_for("fay lists the DM once unlocked", || async {
        (account_data(&fay).await["m.direct"][&ids[0]] == json!([id])).then_some(())
    })
    .await;
    wait_for("fay joined", || async {
        (membership(&state_of(&env, &id).await, &fay) == "join").then_some(())
    })
    .await;
    let admin = Stack::get().admin_user_id();
    invited_as_direct_only(&room_events(&id).await, None, &fay, &admin);
}

/// A member who leaves is brought back as to a DM (an `is_direct` invite,
/// joined from it); closing the room takes it out of both members' lists
/// (their other entries kept), and a re-created conversation is listed anew.
#[tokio::test]
async fn a_dm_keeps_its_members_as_a_dm_and_leaves_their_lists_when_closed() {
    let env = TestEnv::new("direct-close").await;
    let ids = users(&env, &["gus", "hal"]).await;
    let (gus, hal) = (&ids[0], &ids[1]);
    let earlier = json!({"@someone:elsewhere": ["!old:elsewhere"]});
    let hal_token = login_as(hal).await;
    let path = format!("/user/{}/account_data/m.direct", urlencode(hal));
    assert!(as_user(&hal_token, reqwest::Method::PUT, &path, earlier)
        .await
        .is_success());
    perm(&env, 0, "gus", "dm", "gus", json!({})).await;
    perm(&env, 0, "hal", "dm", "hal", json!({})).await;
    let spec = json!({"alias": unique("dm"), "source": {"kind": "Direct", "slug": "gus-hal"}});
    env.create::<MatrixRoom>(0, "dm", spec.clone()).await;
    let id = room_id(&env.wait_condition(0, "dm", true, "Converged").await);
    let listed_by_both = |room: String| async move {
        let (g, h) = (account_data(gus).await, account_data(hal).await);
        (g["m.direct"][hal] == json!([room]) && h["m.direct"][gus] == json!([room]))
            .then_some((g, h))
    };
    wait_for("both list the DM", || listed_by_both(id.clone())).await;

    // Hal leaves; the operator brings him back, as to a DM.
    let leave = format!("/rooms/{}/leave", urlencode(&id));
    assert!(
        as_user(&hal_token, reqwest::Method::POST, &leave, json!({}))
            .await
            .is_success()
    );
    wait_for("hal back", || async {
        let joins = room_events(&id)
            .await
            .iter()
            .filter(|e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == json!(hal)
                    && e["content"]["membership"] == "join"
            })
            .count();
        (joins == 2 && membership(&state_of(&env, &id).await, hal) == "join").then_some(())
    })
    .await;
    let admin = Stack::get().admin_user_id();
    let view = wait_for("hal's sync", || async {
        ClientView::of(&hal_token, &id).await
    })
    .await;
    invited_as_direct_only(&room_events(&id).await, Some(&view), hal, &admin);

    // Closed (the default deletion policy): out of both lists.
    let api = env.api::<MatrixRoom>(0);
    api.delete("dm", &DeleteParams::default()).await.unwrap();
    env.wait_gone(&api, "dm").await;
    let (g, h) = (account_data(gus).await, account_data(hal).await);
    assert!(g["m.direct"].get(hal).is_none(), "{g}");
    assert_eq!(
        h["m.direct"],
        json!({"@someone:elsewhere": ["!old:elsewhere"]})
    );

    // The conversation again: a new room, listed by both.
    env.create::<MatrixRoom>(0, "dm", spec).await;
    let again = room_id(&env.wait_condition(0, "dm", true, "Converged").await);
    assert_ne!(again, id);
    let (_, h) = wait_for("both list the new DM", || listed_by_both(again.clone())).await;
    assert_eq!(
        h["m.direct"]["@someone:elsewhere"],
        json!(["!old:elsewhere"])
    );
}
