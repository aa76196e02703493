//! `MatrixUser` converging end to end against kube-apiserver and Synapse.

use crate::harness::{default_mode_only, wait_for, Options, Stack, TestEnv};
use crate::proxy;
use kube::api::{Patch, PatchParams};
use openmeet_matrix_operator::synapse::{ExternalId, SynapseUser, UserUpsert};
use serde_json::json;
use std::time::Duration;

/// The auth provider of the SSO links Synapse holds in the default mode.
const SSO_PROVIDER: &str = "oidc-openmeet";

/// An account as the stack's account store holds it: Synapse's admin API,
/// or in MAS mode MAS's, which owns accounts there (Synapse mirrors its
/// flags a moment later, and holds no SSO link or admin flag of its own).
#[derive(Debug, Default)]
pub(crate) struct Account {
    pub(crate) locked: bool,
    pub(crate) deactivated: bool,
    pub(crate) admin: bool,
    /// Email addresses, lowercase and sorted.
    pub(crate) emails: Vec<String>,
    /// SSO links to the sidecar's provider: `<tenant>/<subject>`, sorted.
    pub(crate) sso: Vec<String>,
}

/// The account of `localpart`, if there is one.
pub(crate) async fn account(env: &TestEnv, localpart: &str) -> Option<Account> {
    let Some(mas) = Stack::get().shared_mas() else {
        let user = env
            .synapse
            .get_user(&env.user_id(localpart))
            .await
            .unwrap()?;
        let mut sso: Vec<String> = user
            .external_ids
            .iter()
            .filter(|i| i.auth_provider == SSO_PROVIDER)
            .map(|i| i.external_id.clone())
            .collect();
        sso.sort();
        return Some(Account {
            locked: user.locked,
            deactivated: user.deactivated,
            admin: user.admin,
            emails: user.emails(),
            sso,
        });
    };
    let user = mas.user_by_username(localpart).await.unwrap()?;
    let mut emails: Vec<String> = (mas.emails_of(&user.id).await.unwrap().into_iter())
        .map(|e| e.email.to_lowercase())
        .collect();
    emails.sort();
    let mut sso: Vec<String> = (mas.links_of(&user.id).await.unwrap().into_iter())
        .map(|l| l.subject)
        .collect();
    sso.sort();
    Some(Account {
        locked: user.locked,
        deactivated: user.deactivated,
        admin: user.admin,
        emails,
        sso,
    })
}

/// Synapse's account of `localpart`, which must satisfy `settled`: at once
/// in the default mode (Synapse is the account store the operator wrote
/// to), or in MAS mode once Synapse mirrors what MAS holds (MAS tells
/// Synapse a moment after it answers, from its job queue).
pub(crate) async fn synapse_account(
    env: &TestEnv,
    localpart: &str,
    what: &str,
    settled: impl Fn(&SynapseUser) -> bool,
) -> SynapseUser {
    let id = env.user_id(localpart);
    if Stack::get().is_mas() {
        return wait_for(&format!("Synapse to mirror that {what}"), || async {
            let account = env.synapse.get_user(&id).await.ok()??;
            settled(&account).then_some(account)
        })
        .await;
    }
    let account = env.synapse.get_user(&id).await.unwrap().expect("account");
    assert!(settled(&account), "{what}: {account:?}");
    account
}

/// The user id whose SSO link is `<tenant>/<subject>`, if any.
pub(crate) async fn sso_holder(env: &TestEnv, link: &str) -> Option<String> {
    let Some(mas) = Stack::get().shared_mas() else {
        return env
            .synapse
            .user_by_external_id(SSO_PROVIDER, link)
            .await
            .unwrap();
    };
    let holder = mas.link_by_subject(link).await.unwrap()?.user_id?;
    let user = mas.user(&holder).await.unwrap()?;
    Some(env.user_id(&user.username).to_string())
}

/// An admin renames and locks (or unlocks) an account behind the
/// operator's back: through Synapse's admin API, or in MAS mode the lock
/// through MAS's (which owns it there; the profile stays Synapse's).
pub(crate) async fn change_out_of_band(
    env: &TestEnv,
    localpart: &str,
    displayname: &str,
    locked: bool,
) {
    let mas = Stack::get().shared_mas();
    let change = UserUpsert {
        displayname: Some(displayname.into()),
        locked: mas.is_none().then_some(locked),
        ..Default::default()
    };
    env.synapse
        .upsert_user(&env.user_id(localpart), &change)
        .await
        .unwrap();
    if let Some(mas) = mas {
        let user = mas.user_by_username(localpart).await.unwrap().unwrap();
        mas.set_locked(&user.id, locked).await.unwrap();
    }
}

/// What an account made outside the operator starts with.
#[derive(Default)]
pub(crate) struct Foreign<'a> {
    pub(crate) displayname: Option<&'a str>,
    pub(crate) email: Option<&'a str>,
    /// An SSO link to the sidecar's provider: `<tenant>/<subject>`.
    pub(crate) sso: Option<&'a str>,
}

/// Makes an account outside the operator (no owner marker), where the
/// stack's auth mode makes accounts: Synapse's admin API, or MAS's (which
/// provisions it in Synapse before it answers).
pub(crate) async fn foreign_account(env: &TestEnv, localpart: &str, with: Foreign<'_>) {
    let Some(mas) = Stack::get().shared_mas() else {
        let change = UserUpsert {
            displayname: with.displayname.map(str::to_string),
            emails: with.email.map(|e| vec![e.to_string()]),
            external_ids: with.sso.map(|s| {
                vec![ExternalId {
                    auth_provider: SSO_PROVIDER.into(),
                    external_id: s.to_string(),
                }]
            }),
            ..Default::default()
        };
        env.synapse
            .upsert_user(&env.user_id(localpart), &change)
            .await
            .unwrap();
        return;
    };
    let user = mas
        .create_user(localpart, with.displayname, None, false)
        .await
        .unwrap();
    if let Some(email) = with.email {
        mas.add_email(&user.id, email).await.unwrap();
    }
    if let Some(link) = with.sso {
        mas.add_link(&user.id, link).await.unwrap();
    }
}

/// The owner marker of the object `name` in `ns`, as it is now (its uid).
pub(crate) async fn marker(env: &TestEnv, ns: usize, name: &str) -> ExternalId {
    let uid = env.users(ns).get(name).await.unwrap().metadata.uid.unwrap();
    ExternalId {
        auth_provider: "net.openmeet.owner".into(),
        external_id: format!("{}/{name}/{uid}", env.ns(ns)),
    }
}

#[tokio::test]
async fn creates_account_with_profile_sso_link_and_event() {
    let env = TestEnv::new("create").await;
    let localpart = crate::harness::unique("alice");
    env.create_user(
        0,
        "alice",
        json!({"localpart": localpart, "displayName": "Alice", "email": "Alice@Example.org",
               "subject": "platform-user-1", "avatarUrl": "mxc://openmeet.test/abc123"}),
    )
    .await;
    let user = env.wait_ready(0, "alice", true, "Converged").await;
    let user_id = env.user_id(&localpart);
    assert_eq!(
        user.status.unwrap().user_id.as_deref(),
        Some(user_id.as_str())
    );

    let account = env
        .synapse
        .get_user(&user_id)
        .await
        .unwrap()
        .expect("account exists in Synapse");
    assert_eq!(account.displayname.as_deref(), Some("Alice"));
    assert_eq!(
        account.avatar_url.as_deref(),
        Some("mxc://openmeet.test/abc123")
    );
    assert!(account
        .external_ids
        .contains(&marker(&env, 0, "alice").await));
    let held = self::account(&env, &localpart).await.unwrap();
    assert_eq!(held.emails, ["alice@example.org"]);
    assert_eq!(held.sso, [format!("{}/platform-user-1", env.ns(0))]);
    assert!(!held.admin && !held.locked && !held.deactivated, "{held:?}");

    env.wait_event(0, "alice", "AccountCreated", 1).await;
}

#[tokio::test]
async fn created_locked_and_deactivated_accounts_are_so_in_synapse() {
    let env = TestEnv::new("createflags").await;
    let (locked, gone) = (
        crate::harness::unique("locked"),
        crate::harness::unique("gone"),
    );
    env.create_user(0, "locked", json!({"localpart": locked, "locked": true}))
        .await;
    env.create_user(0, "gone", json!({"localpart": gone, "deactivated": true}))
        .await;
    env.wait_ready(0, "locked", true, "Converged").await;
    env.wait_ready(0, "gone", true, "Converged").await;
    assert!(account(&env, &locked).await.unwrap().locked);
    assert!(account(&env, &gone).await.unwrap().deactivated);
}

#[tokio::test]
async fn updates_profile_then_locks_then_deactivates() {
    let env = TestEnv::new("update").await;
    let localpart = crate::harness::unique("bob");
    env.create_user(
        0,
        "bob",
        json!({"localpart": localpart, "displayName": "Bob", "subject": "s-1"}),
    )
    .await;
    env.wait_ready(0, "bob", true, "Converged").await;
    let user_id = env.user_id(&localpart);

    env.patch_user(
        0,
        "bob",
        json!({"displayName": "Robert", "avatarUrl": "mxc://openmeet.test/new", "email": "rob@example.org", "subject": "s-2"}),
    )
    .await;
    env.wait_ready(0, "bob", true, "Converged").await;
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert_eq!(account.displayname.as_deref(), Some("Robert"));
    assert_eq!(
        account.avatar_url.as_deref(),
        Some("mxc://openmeet.test/new")
    );
    let held = self::account(&env, &localpart).await.unwrap();
    assert_eq!(held.emails, ["rob@example.org"]);
    assert_eq!(held.sso, [format!("{}/s-2", env.ns(0))]);

    env.patch_user(0, "bob", json!({"locked": true})).await;
    env.wait_ready(0, "bob", true, "Converged").await;
    assert!(self::account(&env, &localpart).await.unwrap().locked);

    env.patch_user(0, "bob", json!({"locked": false, "deactivated": true}))
        .await;
    env.wait_ready(0, "bob", true, "Converged").await;
    let held = self::account(&env, &localpart).await.unwrap();
    assert!(held.deactivated);
    assert!(!held.locked);
    env.wait_event(0, "bob", "AccountUpdated", 3).await;
}

#[tokio::test]
async fn resync_of_unchanged_user_reads_and_writes_nothing() {
    let env = TestEnv::new("noop").await;
    let localpart = crate::harness::unique("carol");
    env.create_user(
        0,
        "carol",
        json!({"localpart": localpart, "displayName": "Carol", "email": "c@example.org"}),
    )
    .await;
    env.wait_ready(0, "carol", true, "Converged").await;
    // Let the reconcile triggered by our own status write settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = env.operator_synapse.stats();
    let (writes, reads, reconciles) = (stats.writes(), stats.reads(), env.stats.user_reconciles());

    // An annotation change is a resync with nothing to do.
    for i in 0..3 {
        // Counted before the change: a reconcile that reads nothing ends fast.
        let before = env.stats.user_reconciles();
        env.users(0)
            .patch(
                "carol",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"test/touch": i.to_string()}}})),
            )
            .await
            .unwrap();
        wait_for("a resync", || async {
            (env.stats.user_reconciles() > before).then_some(())
        })
        .await;
    }
    assert!(env.stats.user_reconciles() >= reconciles + 3);
    assert_eq!(
        stats.writes(),
        writes,
        "a no-op resync must not write to Synapse"
    );
    assert_eq!(
        stats.reads(),
        reads,
        "the status confirms the account: no read until the sweep"
    );
}

#[tokio::test]
async fn existing_account_is_adopted_only_where_allowed() {
    let env = TestEnv::with(
        "adopt",
        Options {
            namespaces: 2,
            adopt: vec![1],
            ..Default::default()
        },
    )
    .await;
    // Accounts made outside the operator.
    let (foreign_a, foreign_b) = (
        crate::harness::unique("legacy"),
        crate::harness::unique("legacy"),
    );
    for localpart in [&foreign_a, &foreign_b] {
        let original = Foreign {
            displayname: Some("Original"),
            ..Default::default()
        };
        foreign_account(&env, localpart, original).await;
    }

    env.create_user(
        0,
        "legacy",
        json!({"localpart": foreign_a, "displayName": "Taken Over"}),
    )
    .await;
    env.wait_ready(0, "legacy", false, "AccountExists").await;
    let untouched = env
        .synapse
        .get_user(&env.user_id(&foreign_a))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.displayname.as_deref(), Some("Original"));
    assert!(
        untouched.external_ids.is_empty(),
        "no marker may be added to a foreign account"
    );

    env.create_user(
        1,
        "legacy",
        json!({"localpart": foreign_b, "displayName": "Adopted"}),
    )
    .await;
    env.wait_ready(1, "legacy", true, "Converged").await;
    let adopted = env
        .synapse
        .get_user(&env.user_id(&foreign_b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(adopted.displayname.as_deref(), Some("Adopted"));
    assert!(adopted
        .external_ids
        .contains(&marker(&env, 1, "legacy").await));
    env.wait_event(1, "legacy", "AccountAdopted", 1).await;
}

#[tokio::test]
async fn admin_is_honoured_only_in_allowed_namespaces() {
    let env = TestEnv::with(
        "admin",
        Options {
            namespaces: 2,
            admin: vec![1],
            ..Default::default()
        },
    )
    .await;
    let (denied, allowed) = (
        crate::harness::unique("boss"),
        crate::harness::unique("boss"),
    );
    env.create_user(0, "boss", json!({"localpart": denied, "admin": true}))
        .await;
    env.create_user(1, "boss", json!({"localpart": allowed, "admin": true}))
        .await;

    env.wait_ready(0, "boss", false, "AdminNotAllowed").await;
    assert_eq!(
        env.synapse.get_user(&env.user_id(&denied)).await.unwrap(),
        None,
        "no half-applied account"
    );

    env.wait_ready(1, "boss", true, "Converged").await;
    assert!(account(&env, &allowed).await.unwrap().admin);

    env.patch_user(1, "boss", json!({"admin": false})).await;
    env.wait_ready(1, "boss", true, "Converged").await;
    assert!(!account(&env, &allowed).await.unwrap().admin);
}

#[tokio::test]
async fn localpart_conflict_oldest_wins_across_namespaces() {
    let env = TestEnv::with(
        "conflict",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let localpart = crate::harness::unique("dave");
    env.create_user(
        0,
        "first",
        json!({"localpart": localpart, "displayName": "First", "deletionPolicy": "Retain"}),
    )
    .await;
    env.wait_ready(0, "first", true, "Converged").await;
    // Creation timestamps have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reads_before = env.operator_synapse.stats().reads();
    env.create_user(
        1,
        "second",
        json!({"localpart": localpart, "displayName": "Second"}),
    )
    .await;
    let loser = env
        .wait_ready(1, "second", false, "LocalpartConflict")
        .await;
    assert_eq!(loser.status.unwrap().user_id, None);
    let account = env
        .synapse
        .get_user(&env.user_id(&localpart))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.displayname.as_deref(), Some("First"));
    assert!(account
        .external_ids
        .contains(&marker(&env, 0, "first").await));
    assert!(!account
        .external_ids
        .contains(&marker(&env, 1, "second").await));
    // The winner's reconcile may read; the loser makes no Synapse call at all.
    assert!(env.operator_synapse.stats().reads() <= reads_before + 2);

    // When the holder goes, the claim is decided again at once: the account
    // still carries the first object's marker, so it is not silently taken.
    env.delete_user(0, "first").await;
    env.wait_gone(&env.users(0), "first").await;
    env.wait_ready(1, "second", false, "AccountExists").await;
}

#[tokio::test]
async fn reserved_localparts_are_refused() {
    let env = TestEnv::new("reserved").await;
    let admin = Stack::get().var("MATRIX_ADMIN_LOCALPART").to_string();
    let before = env
        .synapse
        .get_user(&env.user_id(&admin))
        .await
        .unwrap()
        .unwrap();
    env.create_user(
        0,
        "impostor",
        json!({"localpart": admin, "displayName": "Impostor", "deactivated": true}),
    )
    .await;
    env.create_user(0, "root", json!({"localpart": "admin"}))
        .await;
    env.wait_ready(0, "impostor", false, "ReservedLocalpart")
        .await;
    env.wait_ready(0, "root", false, "ReservedLocalpart").await;
    let after = env
        .synapse
        .get_user(&env.user_id(&admin))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before, after, "the operator's own account is untouched");
    assert_eq!(
        env.synapse.get_user(&env.user_id("admin")).await.unwrap(),
        None
    );

    // Deleting the refused object leaves the reserved account alone too.
    env.delete_user(0, "impostor").await;
    env.wait_gone(&env.users(0), "impostor").await;
    assert!(
        !env.synapse
            .get_user(&env.user_id(&admin))
            .await
            .unwrap()
            .unwrap()
            .deactivated
    );
}

#[tokio::test]
async fn deletion_policies_deactivate_erase_or_retain() {
    let env = TestEnv::new("delete").await;
    let mut accounts = Vec::new();
    for policy in ["Deactivate", "Erase", "Retain"] {
        let name = policy.to_lowercase();
        let localpart = crate::harness::unique(&name);
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
    }
    for (name, _) in &accounts {
        env.wait_gone(&env.users(0), name).await;
    }
    synapse_account(&env, &accounts[0].1, "it is deactivated, not erased", |a| {
        a.deactivated && !a.erased
    })
    .await;
    let erased = synapse_account(&env, &accounts[1].1, "it is erased", |a| {
        a.deactivated && a.erased
    })
    .await;
    assert_eq!(erased.displayname, None);
    let retained =
        synapse_account(&env, &accounts[2].1, "it is retained", |a| !a.deactivated).await;
    assert_eq!(retained.displayname.as_deref(), Some("Retain"));
}

#[tokio::test]
async fn synapse_outage_is_reported_and_recovers() {
    let port = proxy::closed_port();
    let env = TestEnv::with(
        "outage",
        Options {
            synapse_url: Some(format!("http://127.0.0.1:{port}")),
            ..Default::default()
        },
    )
    .await;
    let localpart = crate::harness::unique("erin");
    env.create_user(
        0,
        "erin",
        json!({"localpart": localpart, "displayName": "Erin"}),
    )
    .await;
    let down = env.wait_ready(0, "erin", false, "SynapseUnavailable").await;
    let status = down.status.unwrap();
    let message = &status.conditions[0].message;
    assert!(
        message.contains("unreachable"),
        "condition says why: {message}"
    );
    let user_id = env.user_id(&localpart).to_string();
    if Stack::get().is_mas() {
        // MAS (which reaches Synapse) made the account; the operator's own
        // write to Synapse failed. The create stays recorded through the
        // failure: only this record tells the next reconcile that the
        // account is this object's to finish, not someone else's.
        assert_eq!(status.pending_account.as_deref(), Some(user_id.as_str()));
    } else {
        // The first read failed: nothing was begun.
        assert_eq!(status.pending_account, None);
        assert_eq!(
            env.synapse
                .get_user(&env.user_id(&localpart))
                .await
                .unwrap(),
            None
        );
    }

    // Synapse "comes back": the controller retries with backoff and converges.
    let target = Stack::get()
        .var("SYNAPSE_URL")
        .trim_start_matches("http://")
        .to_string();
    let forwarder = proxy::forward(port, target).await;
    let up = env.wait_ready(0, "erin", true, "Converged").await;
    assert_eq!(
        up.status.unwrap().pending_account,
        None,
        "the create is done"
    );
    assert!(env
        .synapse
        .get_user(&env.user_id(&localpart))
        .await
        .unwrap()
        .is_some());
    assert!(
        env.stats
            .user_failures
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    forwarder.abort();
}

/// A token minted before a lock (by a sidecar that has since restarted, or
/// another replica: none of them knows it any more) never works after the
/// unlock: the lock lifts only once every such token has expired, and the
/// account stays locked in Synapse until then.
#[tokio::test]
async fn a_token_from_before_a_lock_never_works_after_the_unlock() {
    default_mode_only!(
        "Synapse mode's UnlockPending: a lock lifts only once every token from before it has \
         expired; in MAS mode a lock ends every session at once and the unlock does not wait \
         (mas::credentials_are_mas_personal_sessions_that_a_lock_ends_for_good)"
    );
    let env = TestEnv::new("lock-final").await;
    let localpart = crate::harness::unique("locked");
    env.create_user(0, "u", json!({"localpart": localpart}))
        .await;
    env.wait_ready(0, "u", true, "Converged").await;
    let user_id = env.user_id(&localpart);
    // As a sidecar mints it: login-as, for the credential token lifetime.
    let lifetime = crate::harness::CREDENTIAL_TOKEN_LIFETIME_SECS;
    let token = crate::rooms::login_as_for(user_id.as_str(), lifetime * 1000).await;
    let synapse = Stack::get().var("SYNAPSE_URL");
    assert_eq!(
        crate::sidecar::whoami(synapse, &token).await.0,
        reqwest::StatusCode::OK
    );

    env.patch_user(0, "u", json!({"locked": true})).await;
    wait_for("locked in Synapse", || async {
        let account = env.synapse.get_user(&user_id).await.ok()??;
        account.locked.then_some(())
    })
    .await;
    env.patch_user(0, "u", json!({"locked": false})).await;
    let waiting = env.wait_ready(0, "u", false, "UnlockPending").await;
    let ready = waiting.status.unwrap().conditions;
    let ready = ready.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        ready.message.contains("the lock lifts at"),
        "{}",
        ready.message
    );
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert!(
        account.locked,
        "still locked while a token from before may live"
    );
    assert_eq!(
        crate::sidecar::whoami(synapse, &token).await.0,
        reqwest::StatusCode::UNAUTHORIZED
    );

    env.wait_ready(0, "u", true, "Converged").await;
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert!(!account.locked, "the lock lifted");
    let (status, body) = crate::sidecar::whoami(synapse, &token).await;
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "{body}");
}
