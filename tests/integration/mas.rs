//! MAS mode, against a stack started with `MATRIX_AUTH=mas`: real MAS on
//! PostgreSQL, Synapse with `matrix_authentication_service`, kube-apiserver.
//! Accounts live in MAS and Synapse mirrors them, so every test asserts on
//! MAS's admin API and on Synapse. `make integration-mas` runs them; the
//! default-mode suite skips them.

use crate::harness::{unique, wait_for, Stack, TestEnv};
use crate::rooms::{perm, state};
use crate::sidecar::{credentials, platform_token, ready_user, whoami};
use crate::users::marker;
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use openmeet_matrix_operator::mas::{MasClient, MasUser, SessionKind};
use openmeet_matrix_operator::synapse::SynapseUser;
use reqwest::StatusCode;
use serde_json::json;

fn mas() -> &'static MasClient {
    Stack::get()
        .shared_mas()
        .expect("these tests need the stack in MAS mode (MATRIX_AUTH=mas)")
}

async fn mas_user(localpart: &str) -> Option<MasUser> {
    mas().user_by_username(localpart).await.unwrap()
}

async fn mas_emails(user: &MasUser) -> Vec<String> {
    let mut emails: Vec<String> = mas()
        .emails_of(&user.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.email)
        .collect();
    emails.sort();
    emails
}

async fn mas_links(user: &MasUser) -> Vec<String> {
    mas()
        .links_of(&user.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.subject)
        .collect()
}

/// Synapse's mirror of an account, which must exist.
async fn synapse_account(env: &TestEnv, localpart: &str) -> SynapseUser {
    env.synapse
        .get_user(&env.user_id(localpart))
        .await
        .unwrap()
        .expect("Synapse has the account")
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn a_user_lives_in_mas_and_synapse_mirrors_it_through_every_change() {
    let env = TestEnv::new("mas-user").await;
    let localpart = unique("alice");
    env.create_user(
        0,
        "alice",
        json!({"localpart": localpart, "displayName": "Alice", "email": "Alice@Example.org",
               "subject": "platform-user-1", "avatarUrl": "mxc://openmeet.test/abc"}),
    )
    .await;
    env.wait_ready(0, "alice", true, "Converged").await;
    let user = mas_user(&localpart).await.expect("the account is in MAS");
    assert!(!user.locked && !user.deactivated && !user.admin);
    assert_eq!(mas_emails(&user).await, ["alice@example.org"]);
    assert_eq!(
        mas_links(&user).await,
        [format!("{}/platform-user-1", env.ns(0))],
        "the SSO link is the tenant-qualified subject, on the sidecar's provider"
    );
    let user_id = env.user_id(&localpart);
    let mirror = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert_eq!(mirror.displayname.as_deref(), Some("Alice"));
    assert_eq!(
        mirror.avatar_url.as_deref(),
        Some("mxc://openmeet.test/abc")
    );
    assert_eq!(mirror.external_ids, [marker(&env, 0, "alice").await]);
    env.wait_event(0, "alice", "AccountCreated", 1).await;

    // A profile, an email and a lock, in one change.
    env.patch_user(
        0,
        "alice",
        json!({"displayName": "Alice B", "email": "new@example.org", "locked": true}),
    )
    .await;
    wait_for("MAS to hold the change", || async {
        let user = mas_user(&localpart).await?;
        (user.locked && mas_emails(&user).await == ["new@example.org"]).then_some(())
    })
    .await;
    env.wait_ready(0, "alice", true, "Converged").await;
    let mirror = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert_eq!(mirror.displayname.as_deref(), Some("Alice B"));

    // Every session of a MAS account can be found and ended, so a lock
    // lifts as soon as the spec says so (no wait for tokens to expire).
    env.patch_user(0, "alice", json!({"locked": false})).await;
    env.wait_ready(0, "alice", true, "Converged").await;
    assert!(!mas_user(&localpart).await.unwrap().locked);

    env.patch_user(0, "alice", json!({"deactivated": true}))
        .await;
    wait_for("MAS to deactivate the account", || async {
        mas_user(&localpart)
            .await
            .filter(|u| u.deactivated)
            .map(|_| ())
    })
    .await;
    wait_for("Synapse to mirror the deactivation", || async {
        let mirror = env.synapse.get_user(&user_id).await.ok()??;
        mirror.deactivated.then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn erased_stays_erased_and_a_new_object_never_revives_the_account() {
    let env = TestEnv::new("mas-erase").await;
    let localpart = unique("gone");
    env.create_user(
        0,
        "gone",
        json!({"localpart": localpart, "deletionPolicy": "Erase"}),
    )
    .await;
    env.wait_ready(0, "gone", true, "Converged").await;
    env.delete_user(0, "gone").await;
    env.wait_gone(&env.users(0), "gone").await;
    assert!(mas_user(&localpart).await.unwrap().deactivated);
    wait_for("Synapse to mirror the erasure", || async {
        let mirror = env
            .synapse
            .get_user(&env.user_id(&localpart))
            .await
            .ok()??;
        (mirror.deactivated && mirror.erased).then_some(())
    })
    .await;

    // The same name again: another object (another uid), never the old account.
    env.create_user(0, "gone", json!({"localpart": localpart}))
        .await;
    env.wait_ready(0, "gone", false, "AccountDeactivated").await;
    assert!(mas_user(&localpart).await.unwrap().deactivated);
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn global_claims_and_tenant_qualified_subjects_hold_in_mas() {
    let env = TestEnv::with(
        "mas-claims",
        crate::harness::Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let localpart = unique("shared");
    let email = format!("{}@example.org", unique("claimed"));
    env.create_user(
        0,
        "first",
        json!({"localpart": localpart, "email": email, "subject": "same-subject"}),
    )
    .await;
    env.wait_ready(0, "first", true, "Converged").await;
    let first = mas_user(&localpart).await.unwrap();

    // The same localpart in another tenant: refused, with no MAS call.
    env.create_user(1, "squatter", json!({"localpart": localpart}))
        .await;
    env.wait_ready(1, "squatter", false, "LocalpartConflict")
        .await;
    // The same email elsewhere: the account is made, the address is not moved.
    let second_lp = unique("second");
    env.create_user(
        1,
        "second",
        json!({"localpart": second_lp, "email": email, "subject": "same-subject"}),
    )
    .await;
    env.wait_ready(1, "second", false, "EmailConflict").await;
    let second = mas_user(&second_lp).await.unwrap();
    assert!(mas_emails(&second).await.is_empty());
    assert_eq!(mas_emails(&first).await, [email]);
    // Equal platform subjects in two tenants never collide.
    assert_eq!(
        mas_links(&first).await,
        [format!("{}/same-subject", env.ns(0))]
    );
    assert_eq!(
        mas_links(&second).await,
        [format!("{}/same-subject", env.ns(1))]
    );

    // An account made in MAS by someone else is not adopted, nor touched.
    let foreign = unique("foreign");
    let made = mas()
        .create_user(&foreign, Some("Theirs"), None, false)
        .await
        .unwrap();
    env.create_user(
        0,
        "foreign",
        json!({"localpart": foreign, "email": format!("{foreign}@example.org"), "subject": "x"}),
    )
    .await;
    env.wait_ready(0, "foreign", false, "AccountExists").await;
    let untouched = mas().user(&made.id).await.unwrap().unwrap();
    assert!(mas_emails(&untouched).await.is_empty() && mas_links(&untouched).await.is_empty());
    let mirror = synapse_account(&env, &foreign).await;
    assert!(mirror.external_ids.is_empty(), "{mirror:?}");
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn credentials_are_mas_personal_sessions_that_a_lock_ends_for_good() {
    let env = TestEnv::new("mas-creds").await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let synapse = stack.var("SYNAPSE_URL");
    let (subject, localpart, user_id) = ready_user(&env, "holder").await;
    let token = platform_token(&subject, env.ns(0));
    let (status, creds) = credentials(sidecar, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{creds}");
    let access = creds["access_token"].as_str().unwrap().to_string();
    let (status, me) = whoami(synapse, &access).await;
    assert_eq!(
        (status, me["user_id"].as_str()),
        (StatusCode::OK, Some(user_id.as_str()))
    );
    // Visible to the user (and to MAS's admins) as a session of theirs.
    let user = mas_user(&localpart).await.unwrap();
    let sessions = mas()
        .active_sessions(&user.id, SessionKind::Personal)
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1);

    env.patch_user(0, "holder", json!({"locked": true})).await;
    wait_for("the locked user's token to die", || async {
        (whoami(synapse, &access).await.0 == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    assert!(mas()
        .active_sessions(&user.id, SessionKind::Personal)
        .await
        .unwrap()
        .is_empty());
    env.patch_user(0, "holder", json!({"locked": false})).await;
    env.wait_ready(0, "holder", true, "Converged").await;
    assert!(!mas_user(&localpart).await.unwrap().locked);
    assert_eq!(
        whoami(synapse, &access).await.0,
        StatusCode::UNAUTHORIZED,
        "a token from before the lock never comes back"
    );
    let (status, fresh) = credentials(sidecar, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    assert_ne!(fresh["access_token"], creds["access_token"]);
    let fresh = fresh["access_token"].as_str().unwrap();
    assert_eq!(whoami(synapse, fresh).await.0, StatusCode::OK);
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn rooms_and_permissions_converge_unchanged_in_mas_mode() {
    let env = TestEnv::new("mas-rooms").await;
    let mut ids = Vec::new();
    for name in ["host", "guest"] {
        let localpart = unique(name);
        env.create::<MatrixUser>(0, name, json!({"localpart": localpart}))
            .await;
        ids.push(env.user_id(&localpart).to_string());
    }
    for name in ["host", "guest"] {
        env.wait_condition::<MatrixUser>(0, name, true, "Converged")
            .await;
    }
    env.create::<MatrixRoom>(
        0,
        "meetup",
        json!({"alias": unique("mas-room"), "name": "Meetup"}),
    )
    .await;
    perm(
        &env,
        0,
        "p-host",
        "meetup",
        "host",
        json!({"role": "Admin"}),
    )
    .await;
    perm(&env, 0, "p-guest", "meetup", "guest", json!({})).await;
    for p in ["p-host", "p-guest"] {
        env.wait_condition::<RoomPermission>(0, p, true, "Converged")
            .await;
    }
    let room = env
        .wait_condition::<MatrixRoom>(0, "meetup", true, "Converged")
        .await;
    let s = state(&env, &room).await;
    assert_eq!(
        s.memberships().get(&ids[0]).map(String::as_str),
        Some("join")
    );
    assert_eq!(
        s.memberships().get(&ids[1]).map(String::as_str),
        Some("join")
    );
    let power = &s.get("m.room.power_levels", "").unwrap()["users"];
    assert_eq!(power[&ids[0]], 100);

    // Removing a permission removes the member.
    env.api::<RoomPermission>(0)
        .delete("p-guest", &Default::default())
        .await
        .unwrap();
    wait_for("the guest to leave", || async {
        let room = env.api::<MatrixRoom>(0).get("meetup").await.ok()?;
        let s = state(&env, &room).await;
        (s.memberships().get(&ids[1]).map(String::as_str) == Some("leave")).then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn an_unreachable_mas_is_transient_and_leaves_nothing_half_made() {
    let port = crate::proxy::closed_port();
    let env = TestEnv::with(
        "mas-down",
        crate::harness::Options {
            mas_url: Some(format!("http://127.0.0.1:{port}")),
            ..Default::default()
        },
    )
    .await;
    let localpart = unique("waiting");
    env.create_user(
        0,
        "waiting",
        json!({"localpart": localpart, "displayName": "Waiting", "subject": "s"}),
    )
    .await;
    let down = env.wait_ready(0, "waiting", false, "MasUnavailable").await;
    let message = &down.status.unwrap().conditions[0].message;
    assert!(message.contains("MAS is unreachable"), "{message}");
    assert!(
        !message.contains("127.0.0.1"),
        "no internal address: {message}"
    );
    assert!(mas_user(&localpart).await.is_none());
    assert!(env
        .synapse
        .get_user(&env.user_id(&localpart))
        .await
        .unwrap()
        .is_none());

    // MAS comes back: the retry (with backoff) makes the whole account.
    let target = Stack::get()
        .var("MAS_URL")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let forwarder = crate::proxy::forward(port, target).await;
    env.wait_ready(0, "waiting", true, "Converged").await;
    let user = mas_user(&localpart).await.unwrap();
    assert_eq!(mas_links(&user).await, [format!("{}/s", env.ns(0))]);
    let mirror = synapse_account(&env, &localpart).await;
    assert_eq!(mirror.external_ids, [marker(&env, 0, "waiting").await]);
    forwarder.abort();
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn mas_refusals_and_wrong_credentials_say_so_and_write_nothing() {
    // An address MAS refuses (its parser takes no parentheses) that the
    // schema's looser pattern lets through: the account is made and marked,
    // the refusal is MAS's own words, and nothing retries in a loop.
    let env = TestEnv::new("mas-refuse").await;
    let localpart = unique("odd");
    env.create_user(
        0,
        "odd",
        json!({"localpart": localpart, "email": "odd(mail)@example.org"}),
    )
    .await;
    let user = env.wait_ready(0, "odd", false, "MasRejected").await;
    let ready = &user.status.unwrap().conditions[0];
    assert!(
        ready.message.contains("is not valid"),
        "MAS's message: {}",
        ready.message
    );
    let made = mas_user(&localpart).await.unwrap();
    assert!(mas_emails(&made).await.is_empty());
    let mirror = synapse_account(&env, &localpart).await;
    assert_eq!(mirror.external_ids, [marker(&env, 0, "odd").await]);
    let failures = env
        .stats
        .user_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        env.stats
            .user_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        failures,
        "stalled on the spec: no retry loop"
    );

    // The operator's client with a wrong secret: nothing reaches MAS or Synapse.
    let env = TestEnv::with(
        "mas-badcred",
        crate::harness::Options {
            mas_secret: Some("not-the-secret".into()),
            ..Default::default()
        },
    )
    .await;
    let localpart = unique("nocred");
    env.create_user(0, "nocred", json!({"localpart": localpart}))
        .await;
    let user = env
        .wait_ready(0, "nocred", false, "MasCredentialsRejected")
        .await;
    let message = &user.status.unwrap().conditions[0].message;
    assert!(message.contains("client credentials"), "{message}");
    assert!(mas_user(&localpart).await.is_none());
}

/// The controller binary with a wrong MAS client secret says so at
/// start-up and in `/readyz`.
#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn the_controller_reports_wrong_mas_credentials_in_readyz() {
    let env = TestEnv::with(
        "mas-readyz",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let dir = std::env::temp_dir().join(unique("mas-secret"));
    std::fs::create_dir_all(&dir).unwrap();
    let wrong = dir.join("client_secret");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let port = crate::harness::free_port();
    let _controller = crate::harness::controller_command(&env)
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .env("MAS_CLIENT_SECRET_FILE", &wrong)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reason = wait_for("/readyz to blame the MAS credentials", || async {
        let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
            .await
            .ok()?;
        let status = r.status();
        let text = r.text().await.ok()?;
        (status == StatusCode::SERVICE_UNAVAILABLE && text.contains("MAS")).then_some(text)
    })
    .await;
    assert_eq!(reason, "MAS refused the operator's client credentials");
    let _ = std::fs::remove_dir_all(dir);
}

/// What MAS leaves when its create is cut short: it provisions the Synapse
/// account before it commits its own, and drops the request when the caller
/// goes away (the operator SIGKILLed mid-call, as `make chaos` does). The
/// object that recorded the create finishes it; nobody else takes it.
#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn a_create_cut_short_between_synapse_and_mas_is_finished_by_its_own_object_only() {
    let env = TestEnv::with(
        "mas-cut",
        crate::harness::Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let stack = Stack::get();
    let provision = |localpart: String| async move {
        let secret =
            std::fs::read_to_string(format!("{}/mas/homeserver_secret", stack.var("STACK_DIR")))
                .unwrap();
        let r = reqwest::Client::new()
            .post(format!(
                "{}/_synapse/mas/provision_user",
                stack.var("SYNAPSE_URL")
            ))
            .bearer_auth(secret.trim())
            .json(&json!({"localpart": localpart}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    };
    // Its own: the object recorded the create (as `record_pending_create`
    // does before asking MAS), and MAS got as far as Synapse.
    let own = unique("cut");
    env.create_user(0, "cut", json!({"localpart": own, "subject": "s"}))
        .await;
    let pending = json!({"status": {"pendingAccount": env.user_id(&own).to_string()}});
    env.users(0)
        .patch_status(
            "cut",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&pending),
        )
        .await
        .unwrap();
    provision(own.clone()).await;
    // Someone else's: the same leftover, older than the object that claims
    // the name, with no create of that object's.
    let other = unique("stray");
    provision(other.clone()).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    env.create_user(0, "stray", json!({"localpart": other}))
        .await;
    assert!(mas_user(&own).await.is_none() && mas_user(&other).await.is_none());

    let _controller = crate::harness::controller_command(&env)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    env.wait_ready(0, "cut", true, "Converged").await;
    let user = mas_user(&own).await.expect("the create finished in MAS");
    assert_eq!(mas_links(&user).await, [format!("{}/s", env.ns(0))]);
    let mirror = synapse_account(&env, &own).await;
    assert_eq!(mirror.external_ids, [marker(&env, 0, "cut").await]);

    let stray = env.wait_ready(0, "stray", false, "AccountExists").await;
    let message = &stray.status.unwrap().conditions[0].message;
    assert!(message.contains("not in MAS"), "{message}");
    assert!(mas_user(&other).await.is_none());
    let stray = synapse_account(&env, &other).await;
    assert!(stray.external_ids.is_empty(), "untouched: {stray:?}");
}

/// A direct room's `m.direct` is written as each user: Synapse under MAS
/// has no login-as, so the operator takes a one-call MAS session instead.
#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn a_direct_room_is_listed_in_both_users_m_direct_in_mas_mode() {
    let env = TestEnv::new("mas-dm").await;
    let mut ids = Vec::new();
    for name in ["ann", "ben"] {
        let localpart = unique(name);
        env.create::<MatrixUser>(0, name, json!({"localpart": localpart}))
            .await;
        ids.push(env.user_id(&localpart));
    }
    perm(&env, 0, "ann", "dm", "ann", json!({})).await;
    perm(&env, 0, "ben", "dm", "ben", json!({})).await;
    env.create::<MatrixRoom>(
        0,
        "dm",
        json!({"alias": unique("dm"), "source": {"kind": "Direct", "slug": "ann-ben"}}),
    )
    .await;
    let dm: MatrixRoom = env.wait_condition(0, "dm", true, "Converged").await;
    let room_id = dm.status.unwrap().room_id.unwrap();
    let (ann, ben) = (&ids[0], &ids[1]);
    let listed = env.synapse.direct_rooms(ann).await.unwrap();
    assert_eq!(listed[ben.as_str()], json!([room_id]), "{listed}");
    let listed = env.synapse.direct_rooms(ben).await.unwrap();
    assert_eq!(listed[ann.as_str()], json!([room_id]), "{listed}");
    // The one-call sessions are gone.
    for localpart in [ann.localpart(), ben.localpart()] {
        let user = mas_user(localpart).await.unwrap();
        assert!(mas()
            .active_sessions(&user.id, SessionKind::Personal)
            .await
            .unwrap()
            .is_empty());
    }
}
