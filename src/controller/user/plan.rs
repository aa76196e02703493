//! Pure planning for `MatrixUser`: desired spec + observed account → actions.
//! No I/O here; every branch is driven from fixtures in the tests below.

use crate::api::MatrixUserSpec;
use crate::synapse::{ExternalId, SynapseUser, UserUpsert};

/// Why a user cannot be converged right now. Each is a stable condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The localpart is on the operator's reserved list.
    ReservedLocalpart,
    /// An older `MatrixUser` claims the same localpart.
    LocalpartConflict,
    /// `admin: true` in a namespace the operator does not allow it for.
    AdminNotAllowed,
    /// The account exists, is not the operator's, and adoption is not allowed here.
    AccountExists,
    /// The account carries another object's owner marker (a deleted object's,
    /// or one of the same name but another uid): never adopted.
    OwnedByAnother,
    /// MAS mode: Synapse has an account of that name that MAS does not (made
    /// before MAS, or by someone else): never taken over.
    OnlyInSynapse,
    /// The account is deactivated in Synapse while the spec wants it active:
    /// deactivated (and erased) accounts are never reactivated or adopted.
    AccountDeactivated,
    /// The SSO subject is claimed by an older object of the tenant, or is
    /// linked in Synapse to an account that is not this object's.
    SubjectConflict,
}

impl Blocked {
    pub fn reason(self) -> &'static str {
        match self {
            Blocked::ReservedLocalpart => "ReservedLocalpart",
            Blocked::LocalpartConflict => "LocalpartConflict",
            Blocked::AdminNotAllowed => "AdminNotAllowed",
            Blocked::AccountExists | Blocked::OwnedByAnother | Blocked::OnlyInSynapse => {
                "AccountExists"
            }
            Blocked::AccountDeactivated => "AccountDeactivated",
            Blocked::SubjectConflict => "SubjectConflict",
        }
    }

    /// Whether the object still owns its account while blocked, so its
    /// `status.userId` (and with it room membership) stays. A policy refusal
    /// (a change refused, or the reserved list grown over an existing
    /// account) is no reason to take anyone out of their rooms; an account
    /// that was never, or is no longer, this object's is not kept.
    pub fn keeps_account(self) -> bool {
        matches!(
            self,
            Blocked::AdminNotAllowed | Blocked::SubjectConflict | Blocked::ReservedLocalpart
        )
    }
}

/// One Synapse write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserAction {
    /// `PUT` on an absent account.
    Create(UserUpsert),
    /// `PUT` of the changed fields of an existing account.
    Update(UserUpsert),
    /// Ends every session the account has (its devices, with their access
    /// and refresh tokens): Synapse's lock only suspends them, and they
    /// would come back when it is lifted.
    EndSessions,
}

/// The outcome of planning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserPlan {
    Blocked(Blocked),
    /// Writes to make, in order; empty when the account already matches.
    /// `adopts` is true when the account was not the operator's before.
    Converge {
        actions: Vec<UserAction>,
        adopts: bool,
    },
}

/// What the operator's configuration says about this object.
#[derive(Clone, Debug)]
pub struct Desired<'a> {
    pub spec: &'a MatrixUserSpec,
    /// The external id that marks an account as owned by this object
    /// (namespace, name and uid: a re-created object is another owner).
    pub owner_marker: ExternalId,
    /// The marker of earlier versions (namespace and name only), honoured
    /// only when this very object's status already names the account.
    pub legacy_marker: Option<ExternalId>,
    /// `oidc-<idp>`: the provider SSO logins arrive through.
    pub sso_provider: &'a str,
    /// The tenant-qualified subject linked as the SSO external id; `None`
    /// when no subject is declared or the namespace names no tenant.
    pub sso_subject: Option<String>,
    pub reserved: bool,
    pub admin_allowed: bool,
    pub adoption_allowed: bool,
    /// Whether this object holds its email claim. When it does not, the
    /// account's emails are left exactly as they are.
    pub email_held: bool,
    /// This object asked Synapse to create the account (recorded in its
    /// status before the call) and has not seen the create complete.
    pub create_pending: bool,
    /// Whether a lock may be lifted now: every credential token issued
    /// before it has expired (Synapse revives them on unlock, and they
    /// cannot all be found to revoke). Until then the account stays locked
    /// and everything else converges.
    pub unlock_allowed: bool,
}

/// Whether the spec lifts a lock that must stay for now (see
/// [`Desired::unlock_allowed`]).
pub fn unlock_waits(desired: &Desired<'_>, observed: Option<&SynapseUser>) -> bool {
    let spec = desired.spec;
    observed.is_some_and(|o| o.locked && !o.deactivated)
        && !spec.locked
        && !spec.deactivated
        && !desired.unlock_allowed
}

/// Checks that need no Synapse call: reserved names and admin permission.
pub fn precheck(desired: &Desired<'_>) -> Option<Blocked> {
    if desired.reserved {
        return Some(Blocked::ReservedLocalpart);
    }
    if desired.spec.admin && !desired.admin_allowed {
        return Some(Blocked::AdminNotAllowed);
    }
    None
}

/// The external ids the account should carry: the ownership marker, and the
/// SSO link when a subject is set. Sorted, so comparison is order-free.
pub fn desired_external_ids(desired: &Desired<'_>) -> Vec<ExternalId> {
    let mut ids = vec![desired.owner_marker.clone()];
    if let Some(subject) = &desired.sso_subject {
        ids.push(ExternalId {
            auth_provider: desired.sso_provider.to_string(),
            external_id: subject.clone(),
        });
    }
    ids.sort();
    ids
}

fn desired_emails(spec: &MatrixUserSpec) -> Vec<String> {
    spec.email.iter().map(|e| e.to_lowercase()).collect()
}

/// Whether the account carries this object's marker (or, for an object
/// that converged it before markers carried the uid, the legacy one).
fn is_owned(observed: &SynapseUser, marker: &ExternalId, legacy: Option<&ExternalId>) -> bool {
    observed
        .external_ids
        .iter()
        .any(|id| id == marker || Some(id) == legacy)
}

/// Whether the account carries an owner marker that is not this object's.
fn marked_by_another(observed: &SynapseUser, marker: &ExternalId) -> bool {
    observed
        .external_ids
        .iter()
        .any(|id| id.auth_provider == marker.auth_provider && id != marker)
}

/// What the plan would add that Synapse keys globally, so the shell can check
/// who holds it before writing: email addresses and the SSO external id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalWrites {
    pub emails: Vec<String>,
    pub sso_subject: Option<String>,
}

/// The emails and SSO link `actions` would newly give the account.
pub fn global_writes(
    actions: &[UserAction],
    observed: Option<&SynapseUser>,
    provider: &str,
) -> GlobalWrites {
    let held_emails = observed.map(SynapseUser::emails).unwrap_or_default();
    let held_ids = observed.map(|o| o.external_ids.clone()).unwrap_or_default();
    let mut out = GlobalWrites::default();
    for action in actions {
        let (UserAction::Create(change) | UserAction::Update(change)) = action else {
            continue;
        };
        for email in change.emails.iter().flatten() {
            if !held_emails.contains(email) && !out.emails.contains(email) {
                out.emails.push(email.clone());
            }
        }
        for id in change.external_ids.iter().flatten() {
            if id.auth_provider == provider && !held_ids.contains(id) {
                out.sso_subject = Some(id.external_id.clone());
            }
        }
    }
    out
}

/// Plans the writes that bring the account to the desired state.
pub fn plan(desired: &Desired<'_>, observed: Option<&SynapseUser>) -> UserPlan {
    if let Some(blocked) = precheck(desired) {
        return UserPlan::Blocked(blocked);
    }
    let spec = desired.spec;
    let Some(observed) = observed else {
        let create = UserUpsert {
            displayname: spec.display_name.clone(),
            avatar_url: spec.avatar_url.clone(),
            emails: (desired.email_held && spec.email.is_some()).then(|| desired_emails(spec)),
            external_ids: Some(desired_external_ids(desired)),
            admin: spec.admin.then_some(true),
            locked: None,
            deactivated: None,
        };
        let mut actions = vec![UserAction::Create(create)];
        // Synapse's create path ignores `locked` and `deactivated`: a second
        // write sets them. Deactivation wins over a lock: a deactivated
        // account can do nothing anyway.
        if spec.deactivated {
            actions.push(UserAction::Update(UserUpsert {
                deactivated: Some(true),
                ..Default::default()
            }));
        } else if spec.locked {
            actions.push(UserAction::Update(UserUpsert {
                locked: Some(true),
                ..Default::default()
            }));
        }
        return UserPlan::Converge {
            actions,
            adopts: false,
        };
    };

    // An account with no external id at all, where this object's own create
    // was under way: the create was cut short before Synapse recorded the
    // marker. Finish it rather than leave the object blocked for good.
    let unfinished_create =
        desired.create_pending && observed.external_ids.is_empty() && !observed.deactivated;
    let owned = unfinished_create
        || is_owned(
            observed,
            &desired.owner_marker,
            desired.legacy_marker.as_ref(),
        );
    if !owned {
        // Never bring back what was deactivated or erased, nor take an
        // account another object (maybe a deleted one) was given.
        if observed.deactivated {
            return UserPlan::Blocked(Blocked::AccountDeactivated);
        }
        if marked_by_another(observed, &desired.owner_marker) {
            return UserPlan::Blocked(Blocked::OwnedByAnother);
        }
        if !desired.adoption_allowed {
            return UserPlan::Blocked(Blocked::AccountExists);
        }
    } else if observed.deactivated && !spec.deactivated {
        // Deactivated out of band: only a person reactivates an account.
        return UserPlan::Blocked(Blocked::AccountDeactivated);
    }
    let adopts = !owned;

    let mut change = UserUpsert::default();
    let mut external_ids = observed.external_ids.clone();
    external_ids.sort();
    let wanted_ids = desired_external_ids(desired);
    if external_ids != wanted_ids {
        change.external_ids = Some(wanted_ids);
    }

    if spec.deactivated {
        // On a deactivated account only flags and our marker are compared:
        // Synapse strips its third-party ids, so diffing them would never
        // settle. Deactivation wins over a lock: `locked: true` is never
        // sent with it (Synapse refuses the pair), a lock lifted in the
        // same change is, and once deactivated the lock is moot.
        if !observed.deactivated {
            change.deactivated = Some(true);
            if observed.locked && !spec.locked {
                change.locked = Some(false);
            }
        }
    } else {
        if let Some(name) = &spec.display_name {
            if observed.displayname.as_ref() != Some(name) {
                change.displayname = Some(name.clone());
            }
        }
        let observed_avatar = observed.avatar_url.as_deref().filter(|a| !a.is_empty());
        if spec.avatar_url.as_deref() != observed_avatar {
            // An empty string clears the avatar.
            change.avatar_url = Some(spec.avatar_url.clone().unwrap_or_default());
        }
        let emails = desired_emails(spec);
        if desired.email_held && observed.emails() != emails {
            change.emails = Some(emails);
        }
        if observed.locked != spec.locked && !unlock_waits(desired, Some(observed)) {
            change.locked = Some(spec.locked);
        }
    }
    // A flag Synapse keeps on deactivated accounts too.
    if observed.admin != spec.admin {
        change.admin = Some(spec.admin);
    }

    // Sessions never outlive a lock: they end right after the account is
    // locked (Synapse refuses new logins from then on), and once more right
    // before a lock is lifted, so that none from before it comes back even
    // when ending them failed after the lock landed, or the lock was made
    // out of band. A deactivation ends them by itself.
    let lock_flips = !spec.deactivated
        && observed.locked != spec.locked
        && !unlock_waits(desired, Some(observed));
    let mut actions = Vec::new();
    if lock_flips && !spec.locked {
        actions.push(UserAction::EndSessions);
    }
    if !change.is_empty() {
        actions.push(UserAction::Update(change));
    }
    if lock_flips && spec.locked {
        actions.push(UserAction::EndSessions);
    }
    UserPlan::Converge { actions, adopts }
}

/// What deleting the object does to the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupAction {
    /// Nothing to do: retained, already done, gone, or not ours.
    Nothing,
    Deactivate,
    Erase,
}

/// Plans the finalizer's cleanup. Only an account carrying this object's
/// marker is ever touched; a repeat after success plans nothing.
pub fn plan_cleanup(
    policy: crate::api::UserDeletionPolicy,
    marker: &ExternalId,
    legacy: Option<&ExternalId>,
    observed: Option<&SynapseUser>,
) -> CleanupAction {
    use crate::api::UserDeletionPolicy::*;
    let Some(observed) = observed else {
        return CleanupAction::Nothing;
    };
    if !is_owned(observed, marker, legacy) {
        return CleanupAction::Nothing;
    }
    match policy {
        Retain => CleanupAction::Nothing,
        Deactivate if observed.deactivated => CleanupAction::Nothing,
        Deactivate => CleanupAction::Deactivate,
        Erase if observed.deactivated && observed.erased => CleanupAction::Nothing,
        Erase => CleanupAction::Erase,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::UserDeletionPolicy;
    use crate::synapse::users::Threepid;

    fn spec() -> MatrixUserSpec {
        serde_json::from_value(serde_json::json!({
            "localpart": "alice",
            "displayName": "Alice",
            "email": "Alice@Example.org",
            "subject": "user-123",
        }))
        .unwrap()
    }

    fn marker() -> ExternalId {
        ExternalId {
            auth_provider: "net.openmeet.owner".into(),
            external_id: "tenant-a/alice/uid-1".into(),
        }
    }

    fn legacy() -> ExternalId {
        ExternalId {
            auth_provider: "net.openmeet.owner".into(),
            external_id: "tenant-a/alice".into(),
        }
    }

    fn desired(spec: &MatrixUserSpec) -> Desired<'_> {
        Desired {
            spec,
            owner_marker: marker(),
            legacy_marker: None,
            sso_provider: "oidc-openmeet",
            sso_subject: spec.subject.as_ref().map(|s| format!("tenant-a/{s}")),
            reserved: false,
            admin_allowed: false,
            adoption_allowed: false,
            email_held: true,
            create_pending: false,
            unlock_allowed: true,
        }
    }

    /// The account exactly as the operator would have left it for `spec()`.
    fn converged() -> SynapseUser {
        SynapseUser {
            name: "@alice:x".into(),
            displayname: Some("Alice".into()),
            threepids: vec![Threepid {
                medium: "email".into(),
                address: "alice@example.org".into(),
            }],
            external_ids: vec![
                ExternalId {
                    auth_provider: "oidc-openmeet".into(),
                    external_id: "tenant-a/user-123".into(),
                },
                marker(),
            ],
            ..Default::default()
        }
    }

    fn single_update(plan: UserPlan) -> UserUpsert {
        match plan {
            UserPlan::Converge { actions, .. } => match actions.as_slice() {
                [UserAction::Update(change)] => change.clone(),
                other => panic!("expected one update, got {other:?}"),
            },
            other => panic!("expected converge, got {other:?}"),
        }
    }

    #[test]
    fn creates_absent_account_with_marker_and_sso_link() {
        let spec = spec();
        let plan = plan(&desired(&spec), None);
        let UserPlan::Converge {
            actions,
            adopts: false,
        } = plan
        else {
            panic!("{plan:?}")
        };
        let [UserAction::Create(create)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(create.displayname.as_deref(), Some("Alice"));
        assert_eq!(create.emails, Some(vec!["alice@example.org".to_string()]));
        assert_eq!(create.external_ids.as_ref().unwrap().len(), 2);
        assert_eq!(create.admin, None, "false is Synapse's default: omitted");
        assert_eq!(create.deactivated, None);
    }

    #[test]
    fn converged_account_plans_nothing() {
        let spec = spec();
        assert_eq!(
            plan(&desired(&spec), Some(&converged())),
            UserPlan::Converge {
                actions: vec![],
                adopts: false
            }
        );
    }

    #[test]
    fn changes_only_what_differs() {
        let mut spec = spec();
        spec.display_name = Some("Alice B".into());
        spec.avatar_url = Some("mxc://x/new".into());
        let change = single_update(plan(&desired(&spec), Some(&converged())));
        assert_eq!(
            change,
            UserUpsert {
                displayname: Some("Alice B".into()),
                avatar_url: Some("mxc://x/new".into()),
                ..Default::default()
            }
        );
    }

    fn actions(plan: UserPlan) -> Vec<UserAction> {
        match plan {
            UserPlan::Converge { actions, .. } => actions,
            other => panic!("expected converge, got {other:?}"),
        }
    }

    #[test]
    fn locking_ends_the_sessions_after_the_lock() {
        let mut spec = spec();
        spec.locked = true;
        spec.display_name = Some("Alice B".into());
        assert_eq!(
            actions(plan(&desired(&spec), Some(&converged()))),
            [
                UserAction::Update(UserUpsert {
                    displayname: Some("Alice B".into()),
                    locked: Some(true),
                    ..Default::default()
                }),
                UserAction::EndSessions,
            ]
        );
        // Locked already: nothing more, not even a read of the sessions.
        let mut locked = converged();
        locked.locked = true;
        spec.display_name = Some("Alice".into());
        assert_eq!(actions(plan(&desired(&spec), Some(&locked))), []);
    }

    #[test]
    fn lifting_a_lock_ends_the_sessions_before_it() {
        let spec = spec();
        let mut locked = converged();
        locked.locked = true;
        assert_eq!(
            actions(plan(&desired(&spec), Some(&locked))),
            [
                UserAction::EndSessions,
                UserAction::Update(UserUpsert {
                    locked: Some(false),
                    ..Default::default()
                }),
            ]
        );
    }

    #[test]
    fn no_sessions_to_end_on_create_or_deactivation() {
        let mut spec = spec();
        spec.locked = true;
        assert!(!actions(plan(&desired(&spec), None)).contains(&UserAction::EndSessions));
        // Deactivation ends every session itself, lifting a lock or not.
        spec.deactivated = true;
        assert!(
            !actions(plan(&desired(&spec), Some(&converged()))).contains(&UserAction::EndSessions)
        );
        spec.locked = false;
        let mut locked = converged();
        locked.locked = true;
        assert!(!actions(plan(&desired(&spec), Some(&locked))).contains(&UserAction::EndSessions));
    }

    #[test]
    fn subject_change_replaces_sso_link_and_keeps_marker() {
        let mut spec = spec();
        spec.subject = Some("user-999".into());
        let change = single_update(plan(&desired(&spec), Some(&converged())));
        let ids = change.external_ids.unwrap();
        assert!(ids.contains(&marker()));
        assert!(ids
            .iter()
            .any(|i| i.auth_provider == "oidc-openmeet" && i.external_id == "tenant-a/user-999"));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn removed_email_and_avatar_are_cleared() {
        let mut spec = spec();
        spec.email = None;
        let mut observed = converged();
        observed.avatar_url = Some("mxc://x/old".into());
        let change = single_update(plan(&desired(&spec), Some(&observed)));
        assert_eq!(change.emails, Some(vec![]));
        assert_eq!(change.avatar_url, Some(String::new()));
    }

    #[test]
    fn foreign_account_is_left_alone_unless_adoption_allowed() {
        let spec = spec();
        let mut foreign = converged();
        foreign.external_ids.clear();
        assert_eq!(
            plan(&desired(&spec), Some(&foreign)),
            UserPlan::Blocked(Blocked::AccountExists)
        );

        let mut d = desired(&spec);
        d.adoption_allowed = true;
        let UserPlan::Converge {
            actions,
            adopts: true,
        } = plan(&d, Some(&foreign))
        else {
            panic!()
        };
        let [UserAction::Update(change)] = actions.as_slice() else {
            panic!()
        };
        assert!(change.external_ids.as_ref().unwrap().contains(&marker()));
    }

    #[test]
    fn reserved_and_admin_are_refused_before_any_call() {
        let mut spec = spec();
        let mut d = desired(&spec);
        d.reserved = true;
        assert_eq!(
            plan(&d, None),
            UserPlan::Blocked(Blocked::ReservedLocalpart)
        );
        spec.admin = true;
        assert_eq!(precheck(&desired(&spec)), Some(Blocked::AdminNotAllowed));
        let mut d = desired(&spec);
        d.admin_allowed = true;
        assert_eq!(precheck(&d), None);
        let change = single_update(plan(&d, Some(&converged())));
        assert_eq!(change.admin, Some(true));
    }

    #[test]
    fn deactivation_ignores_profile_and_settles() {
        let mut spec = spec();
        spec.deactivated = true;
        spec.display_name = Some("Changed".into());
        let change = single_update(plan(&desired(&spec), Some(&converged())));
        assert_eq!(
            change,
            UserUpsert {
                deactivated: Some(true),
                ..Default::default()
            }
        );

        // After deactivation Synapse stripped the email: nothing more to do.
        let mut after = converged();
        after.deactivated = true;
        after.threepids.clear();
        assert_eq!(
            plan(&desired(&spec), Some(&after)),
            UserPlan::Converge {
                actions: vec![],
                adopts: false
            }
        );
    }

    #[test]
    fn absent_deactivated_account_is_created_then_deactivated() {
        let mut spec = spec();
        spec.deactivated = true;
        let UserPlan::Converge { actions, .. } = plan(&desired(&spec), None) else {
            panic!()
        };
        assert!(
            matches!(actions.as_slice(), [UserAction::Create(_), UserAction::Update(u)] if u.deactivated == Some(true))
        );
    }

    #[test]
    fn absent_locked_account_is_created_then_locked() {
        let mut spec = spec();
        spec.locked = true;
        let UserPlan::Converge { actions, .. } = plan(&desired(&spec), None) else {
            panic!()
        };
        let [UserAction::Create(create), UserAction::Update(lock)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(create.locked, None, "Synapse ignores it on create");
        assert_eq!(lock.locked, Some(true));
    }

    #[test]
    fn a_deactivated_account_is_never_reactivated() {
        let spec = spec();
        let mut observed = converged();
        observed.deactivated = true;
        assert_eq!(
            plan(&desired(&spec), Some(&observed)),
            UserPlan::Blocked(Blocked::AccountDeactivated)
        );
        // Nor adopted, even where adoption is allowed, erased or not.
        observed.external_ids.clear();
        observed.erased = true;
        let mut d = desired(&spec);
        d.adoption_allowed = true;
        assert_eq!(
            plan(&d, Some(&observed)),
            UserPlan::Blocked(Blocked::AccountDeactivated)
        );
    }

    #[test]
    fn a_recreated_object_never_takes_its_predecessors_account() {
        let spec = spec();
        // The account a deleted object of the same name left (Retain).
        let mut observed = converged();
        observed.external_ids.retain(|i| *i != marker());
        observed.external_ids.push(ExternalId {
            auth_provider: "net.openmeet.owner".into(),
            external_id: "tenant-a/alice/uid-0".into(),
        });
        let mut d = desired(&spec);
        d.adoption_allowed = true;
        assert_eq!(
            plan(&d, Some(&observed)),
            UserPlan::Blocked(Blocked::OwnedByAnother)
        );
        // A legacy marker is another owner too, unless this object made it.
        let mut legacy_owned = converged();
        legacy_owned.external_ids.retain(|i| *i != marker());
        legacy_owned.external_ids.push(legacy());
        assert_eq!(
            plan(&d, Some(&legacy_owned)),
            UserPlan::Blocked(Blocked::OwnedByAnother)
        );
        let mut made_it = desired(&spec);
        made_it.legacy_marker = Some(legacy());
        let change = single_update(plan(&made_it, Some(&legacy_owned)));
        let ids = change.external_ids.expect("marker upgraded");
        assert!(ids.contains(&marker()) && !ids.contains(&legacy()));
        let UserPlan::Converge { adopts, .. } = plan(&made_it, Some(&legacy_owned)) else {
            panic!()
        };
        assert!(!adopts);
    }

    #[test]
    fn deactivation_wins_over_a_lock() {
        let mut spec = spec();
        spec.deactivated = true;
        spec.locked = true;
        let UserPlan::Converge { actions, .. } = plan(&desired(&spec), None) else {
            panic!()
        };
        let [UserAction::Create(_), UserAction::Update(second)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(
            *second,
            UserUpsert {
                deactivated: Some(true),
                ..Default::default()
            }
        );
        // An existing active, unlocked account: deactivate, never lock too.
        let change = single_update(plan(&desired(&spec), Some(&converged())));
        assert_eq!(change.locked, None);
        assert_eq!(change.deactivated, Some(true));
    }

    #[test]
    fn an_email_not_held_is_never_written() {
        let spec = spec();
        let mut d = desired(&spec);
        d.email_held = false;
        let UserPlan::Converge { actions, .. } = plan(&d, None) else {
            panic!()
        };
        let [UserAction::Create(create)] = actions.as_slice() else {
            panic!()
        };
        assert_eq!(create.emails, None);
        let mut observed = converged();
        observed.threepids.clear();
        let UserPlan::Converge { actions, .. } = plan(&d, Some(&observed)) else {
            panic!()
        };
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn global_writes_name_only_what_is_new() {
        let spec = spec();
        let d = desired(&spec);
        let UserPlan::Converge { actions, .. } = plan(&d, None) else {
            panic!()
        };
        let writes = global_writes(&actions, None, "oidc-openmeet");
        assert_eq!(writes.emails, vec!["alice@example.org".to_string()]);
        assert_eq!(writes.sso_subject.as_deref(), Some("tenant-a/user-123"));
        // A converged account adds nothing global.
        let converged = converged();
        let mut spec2 = spec.clone();
        spec2.display_name = Some("Other".into());
        let UserPlan::Converge { actions, .. } = plan(&desired(&spec2), Some(&converged)) else {
            panic!()
        };
        assert_eq!(
            global_writes(&actions, Some(&converged), "oidc-openmeet"),
            GlobalWrites::default()
        );
    }

    #[test]
    fn cleanup_touches_only_owned_accounts_and_is_idempotent() {
        let owned = converged();
        let mut foreign = converged();
        foreign.external_ids.retain(|i| *i != marker());
        assert_eq!(
            plan_cleanup(
                UserDeletionPolicy::Deactivate,
                &marker(),
                None,
                Some(&owned)
            ),
            CleanupAction::Deactivate
        );
        assert_eq!(
            plan_cleanup(
                UserDeletionPolicy::Deactivate,
                &marker(),
                None,
                Some(&foreign)
            ),
            CleanupAction::Nothing
        );
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Deactivate, &marker(), None, None),
            CleanupAction::Nothing
        );
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Retain, &marker(), None, Some(&owned)),
            CleanupAction::Nothing
        );
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Erase, &marker(), None, Some(&owned)),
            CleanupAction::Erase
        );

        let mut done = owned.clone();
        done.deactivated = true;
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Deactivate, &marker(), None, Some(&done)),
            CleanupAction::Nothing
        );
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Erase, &marker(), None, Some(&done)),
            CleanupAction::Erase
        );
        done.erased = true;
        assert_eq!(
            plan_cleanup(UserDeletionPolicy::Erase, &marker(), None, Some(&done)),
            CleanupAction::Nothing
        );
    }

    #[test]
    fn a_create_cut_short_is_finished_not_refused() {
        let spec = spec();
        // Synapse made the account but not its external ids.
        let bare = SynapseUser {
            name: "@alice:x".into(),
            ..Default::default()
        };
        assert_eq!(
            plan(&desired(&spec), Some(&bare)),
            UserPlan::Blocked(Blocked::AccountExists),
            "without a pending create it is someone else's"
        );
        let mut d = desired(&spec);
        d.create_pending = true;
        let UserPlan::Converge { actions, adopts } = plan(&d, Some(&bare)) else {
            panic!()
        };
        assert!(!adopts);
        let [UserAction::Update(change)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert!(change.external_ids.as_ref().unwrap().contains(&marker()));
        assert_eq!(change.displayname.as_deref(), Some("Alice"));
        // A pending create never takes an account marked by another owner.
        let mut marked = bare.clone();
        marked.external_ids.push(legacy());
        assert_eq!(
            plan(&d, Some(&marked)),
            UserPlan::Blocked(Blocked::OwnedByAnother)
        );
    }
}
