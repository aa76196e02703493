//! Do no harm: identity and membership stay intact under faults and across
//! tenants. Every test asserts on Synapse itself.

use crate::harness::{unique, wait_for, Options, Stack, TestEnv};
use crate::proxy::HttpProxy;
use crate::rooms::{membership, perm, state, urlencode, users};
use crate::users::{account, foreign_account, sso_holder, synapse_account, Foreign};
use kube::api::{Patch, PatchParams};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser};
use openmeet_matrix_operator::synapse::ExternalId;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Every membership event of a room, oldest first: (user, membership).
async fn membership_history(room_id: &str) -> Vec<(String, String)> {
    let path = format!("/_synapse/admin/v1/rooms/{}/messages", urlencode(room_id));
    let page: Value = Stack::get()
        .admin_api(reqwest::Method::GET, &path)
        .await
        .query(&[
            ("dir", "f"),
            ("limit", "1000"),
            ("filter", r#"{"types":["m.room.member"]}"#),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["chunk"]
        .as_array()
        .expect("a page of events")
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| {
            (
                e["state_key"].as_str().unwrap_or_default().to_string(),
                e["content"]["membership"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

async fn patch_spec<K>(env: &TestEnv, ns: usize, name: &str, spec: Value)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    env.api::<K>(ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .expect("patch");
}

fn power_of(state: &openmeet_matrix_operator::synapse::rooms::RoomState, user: &str) -> i64 {
    state
        .get("m.room.power_levels", "")
        .and_then(|pl| pl["users"][user].as_i64())
        .unwrap_or(0)
}

#[tokio::test]
async fn trouble_on_a_users_account_never_costs_them_their_rooms() {
    let proxy = HttpProxy::start().await;
    let env = TestEnv::with(
        "harm-members",
        Options {
            synapse_url: Some(proxy.url.clone()),
            ..Default::default()
        },
    )
    .await;
    let ids = users(&env, &["ann", "ben", "cat"]).await;
    env.create::<MatrixRoom>(
        0,
        "room",
        json!({"alias": unique("harm"), "name": "Harm", "membershipPolicy": "Exclusive"}),
    )
    .await;
    perm(&env, 0, "ann-room", "room", "ann", json!({"role": "Admin"})).await;
    perm(
        &env,
        0,
        "ben-room",
        "room",
        "ben",
        json!({"role": "Moderator"}),
    )
    .await;
    perm(&env, 0, "cat-room", "room", "cat", json!({})).await;
    let room = wait_for("all three joined", || async {
        let room = env.api::<MatrixRoom>(0).get("room").await.ok()?;
        (room.status.as_ref()?.joined_members == Some(4)).then_some(room)
    })
    .await;
    let room_id = room.status.clone().unwrap().room_id.unwrap();

    // A Synapse blip on every user call: ann's change is retried; her last
    // verdict stands, with the retry noted.
    proxy.fail_users(true);
    patch_spec::<MatrixUser>(&env, 0, "ann", json!({"displayName": "Ann B"})).await;
    wait_for("ann's retry noted", || async {
        let ann = env.users(0).get("ann").await.ok()?;
        let conditions = ann.status?.conditions;
        let note = conditions.iter().find(|c| c.type_ == "Reconciling")?;
        let ready = conditions.iter().find(|c| c.type_ == "Ready")?;
        (note.status == "True" && note.reason == "SynapseUnavailable" && ready.status == "True")
            .then_some(())
    })
    .await;
    // A policy refusal on ben's account: admin is not allowed here.
    patch_spec::<MatrixUser>(&env, 0, "ben", json!({"admin": true})).await;
    env.wait_ready(0, "ben", false, "AdminNotAllowed").await;
    // The room converges meanwhile (a spec change makes sure it runs now).
    patch_spec::<MatrixRoom>(&env, 0, "room", json!({"topic": "during trouble"})).await;
    env.wait_condition::<MatrixRoom>(0, "room", true, "Converged")
        .await;
    let during = state(&env, &room).await;
    for id in &ids {
        assert_eq!(membership(&during, id), "join", "{id} kept its room");
    }
    assert_eq!(power_of(&during, &ids[0]), 100, "ann keeps her power");
    assert_eq!(power_of(&during, &ids[1]), 50, "ben keeps his power");

    // Trouble over: ann converges again, the room stays as it was.
    proxy.fail_users(false);
    env.wait_ready(0, "ann", true, "Converged").await;
    patch_spec::<MatrixRoom>(&env, 0, "room", json!({"topic": "after trouble"})).await;
    env.wait_condition::<MatrixRoom>(0, "room", true, "Converged")
        .await;

    let declared: BTreeSet<&String> = ids.iter().collect();
    let leaves: Vec<(String, String)> = membership_history(&room_id)
        .await
        .into_iter()
        .filter(|(user, m)| declared.contains(user) && (m == "leave" || m == "ban"))
        .collect();
    assert!(
        leaves.is_empty(),
        "declared members left the room: {leaves:?}"
    );
}

#[tokio::test]
async fn a_recreated_object_never_revives_the_account_it_left() {
    let env = TestEnv::new("harm-revive").await;
    let mut accounts = Vec::new();
    for policy in ["Deactivate", "Erase", "Retain"] {
        let name = policy.to_lowercase();
        let localpart = unique(&name);
        env.create_user(
            0,
            &name,
            json!({"localpart": localpart, "displayName": policy, "deletionPolicy": policy}),
        )
        .await;
        accounts.push((name, localpart));
    }
    for (name, _) in &accounts {
        env.wait_ready(0, name, true, "Converged").await;
        env.delete_user(0, name).await;
        env.wait_gone(&env.users(0), name).await;
    }
    // The same namespace and name again: a new object (another uid).
    for (name, localpart) in &accounts {
        env.create_user(
            0,
            name,
            json!({"localpart": localpart, "displayName": "Thief"}),
        )
        .await;
    }
    let deactivated = env
        .wait_ready(0, "deactivate", false, "AccountDeactivated")
        .await;
    let erased = env
        .wait_ready(0, "erase", false, "AccountDeactivated")
        .await;
    let retained = env.wait_ready(0, "retain", false, "AccountExists").await;
    for user in [&deactivated, &erased, &retained] {
        assert_eq!(user.status.as_ref().unwrap().user_id, None);
    }
    synapse_account(&env, &accounts[0].1, "it stays deactivated", |a| {
        a.deactivated
    })
    .await;
    synapse_account(&env, &accounts[1].1, "it stays erased", |a| {
        a.deactivated && a.erased
    })
    .await;
    let account =
        synapse_account(&env, &accounts[2].1, "it stays active", |a| !a.deactivated).await;
    assert_eq!(
        account.displayname.as_deref(),
        Some("Retain"),
        "the retained account is not taken over"
    );
    // The marker carries the first object's uid, never the newcomer's.
    let newcomer = env.users(0).get("retain").await.unwrap();
    assert!(!account.external_ids.iter().any(|i| i
        .external_id
        .ends_with(&newcomer.metadata.uid.clone().unwrap())));
}

#[tokio::test]
async fn an_email_is_never_taken_from_another_account() {
    let env = TestEnv::with(
        "harm-email",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let email = format!("{}@example.org", unique("shared"));
    let (a, b) = (unique("owner"), unique("taker"));
    env.create_user(0, "owner", json!({"localpart": a, "email": email}))
        .await;
    env.wait_ready(0, "owner", true, "Converged").await;
    // Tenant B declares tenant A's user's email.
    let taker_subject = unique("taker-subject");
    env.create_user(
        1,
        "taker",
        json!({"localpart": b, "email": email, "subject": taker_subject}),
    )
    .await;
    let taker = env.wait_ready(1, "taker", false, "EmailConflict").await;
    let message = &taker.status.as_ref().unwrap().conditions[0].message;
    assert!(
        !message.contains(env.ns(0)),
        "never names another tenant: {message}"
    );
    // The account exists, without the address; the owner keeps it.
    assert_eq!(
        taker.status.as_ref().unwrap().user_id.as_deref(),
        Some(env.user_id(&b).as_str())
    );
    let owner = account(&env, &a).await.unwrap();
    assert_eq!(owner.emails, std::slice::from_ref(&email));
    let taken = account(&env, &b).await.unwrap();
    assert!(taken.emails.is_empty());
    // Refused only its email, the account still signs in (an older claim
    // elsewhere must not block anyone's sign-in).
    let sidecar = Stack::get().sidecar().await;
    let token = crate::sidecar::platform_token(&taker_subject, env.ns(1));
    let (status, answer) = crate::sidecar::credentials(sidecar, Some(&token)).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{answer}");
    assert_eq!(answer["user_id"], env.user_id(&b).as_str());
    // A later reconcile of either does not flap it.
    env.patch_user(0, "owner", json!({"displayName": "Owner"}))
        .await;
    env.wait_ready(0, "owner", true, "Converged").await;
    env.patch_user(1, "taker", json!({"displayName": "Taker"}))
        .await;
    env.wait_ready(1, "taker", false, "EmailConflict").await;
    let owner = account(&env, &a).await.unwrap();
    assert_eq!(owner.emails, std::slice::from_ref(&email));

    // An address held by an account the operator does not own is never moved.
    let foreign = unique("foreign");
    let foreign_email = format!("{}@example.org", unique("foreign"));
    let holding = Foreign {
        email: Some(&foreign_email),
        ..Default::default()
    };
    foreign_account(&env, &foreign, holding).await;
    let c = unique("claimer");
    env.create_user(
        0,
        "claimer",
        json!({"localpart": c, "email": foreign_email}),
    )
    .await;
    env.wait_ready(0, "claimer", false, "EmailConflict").await;
    let held = account(&env, &foreign).await.unwrap();
    assert_eq!(held.emails, [foreign_email]);

    // The holder lets go: the other takes the address.
    env.patch_user(0, "owner", json!({"email": format!("new-{email}")}))
        .await;
    env.wait_ready(1, "taker", true, "Converged").await;
    let taken = account(&env, &b).await.unwrap();
    assert_eq!(taken.emails, [email]);
}

#[tokio::test]
async fn equal_subjects_in_two_tenants_are_two_identities() {
    let env = TestEnv::with(
        "harm-subject",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let subject = unique("platform-user");
    let (a, b) = (unique("tenant-a"), unique("tenant-b"));
    env.create_user(0, "user", json!({"localpart": a, "subject": subject}))
        .await;
    env.wait_ready(0, "user", true, "Converged").await;
    // Tenant B declares the same platform subject: its own identity.
    env.create_user(1, "user", json!({"localpart": b, "subject": subject}))
        .await;
    env.wait_ready(1, "user", true, "Converged").await;
    for (ns, localpart) in [(0, &a), (1, &b)] {
        let account = account(&env, localpart).await.unwrap();
        assert_eq!(account.sso, [format!("{}/{subject}", env.ns(ns))]);
    }
    // Synapse (MAS in MAS mode) maps each tenant's SSO subject to that
    // tenant's account.
    for (ns, localpart) in [(0, &a), (1, &b)] {
        let holder = sso_holder(&env, &format!("{}/{subject}", env.ns(ns))).await;
        assert_eq!(holder.as_deref(), Some(env.user_id(localpart).as_str()));
    }

    // Inside one tenant a repeated subject: the oldest wins, nothing written.
    let c = unique("second");
    env.create_user(0, "second", json!({"localpart": c, "subject": subject}))
        .await;
    let second = env.wait_ready(0, "second", false, "SubjectConflict").await;
    assert!(!second.status.as_ref().unwrap().conditions[0]
        .message
        .contains("/user"));
    assert_eq!(
        env.synapse.get_user(&env.user_id(&c)).await.unwrap(),
        None,
        "no half-created account"
    );

    // An external id held by an account the operator does not own: refused
    // before any write, no account left behind.
    let taken_subject = unique("taken");
    let link = format!("{}/{taken_subject}", env.ns(0));
    let holding = Foreign {
        sso: Some(&link),
        ..Default::default()
    };
    foreign_account(&env, &unique("foreign"), holding).await;
    let d = unique("late");
    env.create_user(0, "late", json!({"localpart": d, "subject": taken_subject}))
        .await;
    env.wait_ready(0, "late", false, "SubjectConflict").await;
    assert_eq!(env.synapse.get_user(&env.user_id(&d)).await.unwrap(), None);
}

#[tokio::test]
async fn deactivated_wins_over_locked() {
    let env = TestEnv::new("harm-lockdeact").await;
    let (fresh, existing) = (unique("fresh"), unique("existing"));
    env.create_user(
        0,
        "fresh",
        json!({"localpart": fresh, "locked": true, "deactivated": true}),
    )
    .await;
    env.create_user(0, "existing", json!({"localpart": existing}))
        .await;
    env.wait_ready(0, "existing", true, "Converged").await;
    env.patch_user(0, "existing", json!({"locked": true, "deactivated": true}))
        .await;
    for (name, localpart) in [("fresh", &fresh), ("existing", &existing)] {
        env.wait_ready(0, name, true, "Converged").await;
        let account = account(&env, localpart).await.unwrap();
        assert!(account.deactivated, "{name} is deactivated: {account:?}");
    }
}

#[tokio::test]
async fn a_room_whose_creation_was_cut_short_is_completed_not_blocked() {
    let env = TestEnv::new("harm-halfroom").await;
    // What a createRoom cut short by a Synapse stop leaves: the operator's
    // room under the managed alias, with no marker and none of the state.
    let alias = unique("half");
    let outcome = env
        .synapse
        .create_room(
            &json!({"room_alias_name": format!("openmeet-{alias}"), "preset": "private_chat"}),
        )
        .await
        .unwrap();
    let openmeet_matrix_operator::synapse::rooms::CreateOutcome::Created(half_made) = outcome
    else {
        panic!("room not created")
    };
    users(&env, &["ann"]).await;
    env.create::<MatrixRoom>(0, "room", json!({"alias": alias, "name": "Finished"}))
        .await;
    perm(&env, 0, "ann-room", "room", "ann", json!({})).await;
    let room = env
        .wait_condition::<MatrixRoom>(0, "room", true, "Converged")
        .await;
    assert_eq!(
        room.status.as_ref().unwrap().room_id.as_deref(),
        Some(half_made.as_str()),
        "the unfinished room is completed, no second room made"
    );
    let state = state(&env, &room).await;
    assert_eq!(
        state.get("net.openmeet.owner", "").unwrap()["uid"],
        room.metadata.uid.clone().unwrap().as_str()
    );
    assert_eq!(state.get("m.room.name", "").unwrap()["name"], "Finished");
}

#[tokio::test]
async fn an_account_whose_creation_was_cut_short_is_finished_not_blocked() {
    let env = TestEnv::with(
        "harm-halfuser",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let localpart = unique("half");
    let user_id = env.user_id(&localpart);
    let user = env
        .create_user(
            0,
            "half",
            json!({"localpart": localpart, "displayName": "Half"}),
        )
        .await;
    // The controller recorded its intent, then Synapse stopped between
    // making the account and recording its external ids.
    let status = json!({
        "apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "MatrixUser",
        "status": {"pendingAccount": user_id.as_str(), "conditions": []},
    });
    env.users(0)
        .patch_status(
            "half",
            &PatchParams::apply(openmeet_matrix_operator::api::FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    foreign_account(&env, &localpart, Foreign::default()).await;
    let mut controller = crate::harness::controller_command(&env)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = env.wait_ready(0, "half", true, "Converged").await;
    assert_eq!(ready.status.as_ref().unwrap().pending_account, None);
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert_eq!(account.displayname.as_deref(), Some("Half"));
    assert!(account.external_ids.contains(&ExternalId {
        auth_provider: "net.openmeet.owner".into(),
        external_id: format!("{}/half/{}", env.ns(0), user.metadata.uid.unwrap()),
    }));
    controller.kill().await.unwrap();
}

/// A Synapse outage (or a leader hand-over) is a retry, not a verdict: the
/// room keeps its last Ready with a Reconciling note, and its permissions'
/// statuses are not written at all.
#[tokio::test]
async fn an_outage_writes_nothing_to_permissions_and_keeps_the_last_verdict() {
    let proxy = HttpProxy::start().await;
    let env = TestEnv::with(
        "outage",
        Options {
            synapse_url: Some(proxy.url.clone()),
            ..Default::default()
        },
    )
    .await;
    users(&env, &["ann", "ben"]).await;
    env.create::<MatrixRoom>(0, "room", json!({"alias": unique("outage")}))
        .await;
    perm(&env, 0, "ann-room", "room", "ann", json!({})).await;
    perm(&env, 0, "ben-room", "room", "ben", json!({})).await;
    let perms = env.api::<openmeet_matrix_operator::api::RoomPermission>(0);
    let versions = || async {
        let mut out = Vec::new();
        for name in ["ann-room", "ben-room"] {
            out.push(perms.get(name).await.unwrap().metadata.resource_version);
        }
        out
    };
    wait_for("both permissions converged", || async {
        let list = perms.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.reason == "Converged")
                })
            })
            .then_some(())
    })
    .await;
    env.wait_condition::<MatrixRoom>(0, "room", true, "Converged")
        .await;
    let before = versions().await;

    proxy.fail_all(true);
    patch_spec::<MatrixRoom>(&env, 0, "room", json!({"topic": "during the outage"})).await;
    let room = wait_for("the retry noted on the room", || async {
        let room = env.api::<MatrixRoom>(0).get("room").await.ok()?;
        let conditions = &room.status.as_ref()?.conditions;
        let reconciling = conditions.iter().find(|c| c.type_ == "Reconciling")?;
        (reconciling.status == "True" && reconciling.reason == "SynapseUnavailable").then_some(room)
    })
    .await;
    let conditions = &room.status.as_ref().unwrap().conditions;
    let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Converged"),
        "the last verdict stands"
    );
    for c in conditions {
        assert!(!c.message.contains("http"), "no address: {}", c.message);
    }
    // Retries with backoff meanwhile; still nothing on the permissions.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(versions().await, before, "permissions untouched");

    proxy.fail_all(false);
    wait_for("converged after the outage", || async {
        let room = env.api::<MatrixRoom>(0).get("room").await.ok()?;
        let conditions = &room.status.as_ref()?.conditions;
        let reconciling = conditions.iter().find(|c| c.type_ == "Reconciling")?;
        let s = env
            .synapse
            .room_state(room.status.as_ref()?.room_id.as_deref()?)
            .await
            .ok()??;
        (reconciling.status == "False"
            && s.get("m.room.topic", "")?["topic"] == "during the outage")
            .then_some(())
    })
    .await;
    assert_eq!(versions().await, before, "permissions untouched");
}
