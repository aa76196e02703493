//! Folding `RoomPermission`s into a room's desired membership and power.
//! I/O-free: the shell passes in what its watch caches hold.

use crate::api::permission::Membership;
use crate::api::{MatrixUser, RoomPermission};
use crate::controller::claims::{holder, Claim};
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};

/// What became of one permission in its room's reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PermissionOutcome {
    /// Folded into the room: the user's id and power level.
    Applied { user_id: String, power_level: i64 },
    /// The referenced user is missing or not Ready yet; resolves by itself.
    Pending(String),
    /// An older permission names the same user in the same room.
    Duplicate(String),
    /// The user's namespace does not admit the reference (see
    /// `controller::reference`): `reason` is the Ready reason.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// What the shell knows about a referenced `MatrixUser`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserRefState {
    /// No such object, or it is deactivated or being deleted: not a member.
    Missing,
    /// The object has no account yet.
    NotReady,
    /// The object has its account: a member, whatever its `Ready` says.
    Ready(String),
    /// The reference crosses into a namespace that does not admit it; the
    /// user's account (if any) is one to take out of the room.
    Refused {
        reason: &'static str,
        message: String,
        user_id: Option<String>,
    },
}

/// A referenced user's standing in rooms. Membership survives trouble: an
/// object that exists and has its `status.userId` keeps its rooms and power
/// whatever its `Ready` condition says (a Synapse blip, a 429 or a policy
/// refusal on the account must never kick anyone). Only a user that is
/// gone, deactivated or being deleted leaves.
pub fn user_ref_state(user: Option<&MatrixUser>) -> UserRefState {
    let Some(user) = user else {
        return UserRefState::Missing;
    };
    if user.spec.deactivated || user.metadata.deletion_timestamp.is_some() {
        return UserRefState::Missing;
    }
    match user.status.as_ref().and_then(|s| s.user_id.clone()) {
        Some(id) => UserRefState::Ready(id),
        None => UserRefState::NotReady,
    }
}

/// A room's permissions, folded.
#[derive(Debug, Default)]
pub struct Folded {
    /// Declared members: user id → membership and power level.
    pub members: BTreeMap<String, (Membership, i64)>,
    /// What became of each permission, by name.
    pub outcomes: BTreeMap<String, PermissionOutcome>,
    /// Accounts whose reference is refused: out of the room whatever its
    /// membership policy (access never outlives the grant that gave it).
    pub revoked: BTreeSet<String>,
}

/// How a permission names its user in messages: `name`, or `namespace/name`
/// across namespaces.
pub fn user_label(p: &RoomPermission) -> String {
    match p.crosses_namespaces() {
        true => format!("{}/{}", p.user_namespace(), p.spec.user_ref.name),
        false => p.spec.user_ref.name.clone(),
    }
}

/// Folds the permissions of one room (already filtered to it) into the
/// desired members; `user` resolves each permission's reference.
pub fn fold(
    permissions: &[&RoomPermission],
    user: impl Fn(&RoomPermission) -> UserRefState,
) -> Folded {
    let mut by_user: BTreeMap<(&str, &str), Vec<&RoomPermission>> = BTreeMap::new();
    for p in permissions {
        by_user
            .entry((p.user_namespace(), p.spec.user_ref.name.as_str()))
            .or_default()
            .push(p);
    }
    let mut folded = Folded::default();
    for claims in by_user.into_values() {
        let winner = holder(claims.iter().map(|p| Claim {
            namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
            name: p.metadata.name.as_deref().unwrap_or_default(),
            created: p.metadata.creation_timestamp.as_ref(),
        }))
        .map(|c| c.name.to_string());
        for p in claims {
            let name = p.name_any();
            let label = user_label(p);
            if Some(&name) != winner.as_ref() {
                let message = format!(
                    "permission {} already binds user {label} to this room",
                    winner.clone().unwrap_or_default()
                );
                folded
                    .outcomes
                    .insert(name, PermissionOutcome::Duplicate(message));
                continue;
            }
            let outcome = match user(p) {
                UserRefState::Missing => PermissionOutcome::Pending(format!(
                    "MatrixUser {label} does not exist, is deactivated or is being deleted"
                )),
                UserRefState::NotReady => {
                    PermissionOutcome::Pending(format!("MatrixUser {label} has no account yet"))
                }
                UserRefState::Refused {
                    reason,
                    message,
                    user_id,
                } => {
                    folded.revoked.extend(user_id);
                    PermissionOutcome::Refused { reason, message }
                }
                UserRefState::Ready(user_id) => {
                    let level = p.spec.desired_power_level();
                    folded
                        .members
                        .insert(user_id.clone(), (p.spec.membership, level));
                    PermissionOutcome::Applied {
                        user_id,
                        power_level: level,
                    }
                }
            };
            folded.outcomes.insert(name, outcome);
        }
    }
    folded
}

/// How many users the permissions declare as members (joined or invited):
/// duplicates, refusals and bans do not count; users not ready yet do.
pub fn declared_members(
    permissions: &[&RoomPermission],
    outcomes: &BTreeMap<String, PermissionOutcome>,
) -> usize {
    permissions
        .iter()
        .filter(|p| p.spec.membership != Membership::Ban)
        .filter(|p| {
            !matches!(
                outcomes.get(&p.name_any()),
                Some(PermissionOutcome::Duplicate(_) | PermissionOutcome::Refused { .. })
            )
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn perm(name: &str, user: &str, created: i64, spec: serde_json::Value) -> RoomPermission {
        let mut full = serde_json::json!({"roomRef": {"name": "room"}, "userRef": {"name": user}});
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let mut p = RoomPermission::new(name, serde_json::from_value(full).unwrap());
        p.metadata.namespace = Some("t".into());
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        p
    }

    fn users(p: &RoomPermission) -> UserRefState {
        match p.spec.user_ref.name.as_str() {
            "missing" => UserRefState::Missing,
            "pending" => UserRefState::NotReady,
            other => UserRefState::Ready(format!("@{other}:x")),
        }
    }

    #[test]
    fn roles_and_levels_fold_into_members() {
        let a = perm("a", "alice", 1, serde_json::json!({"role": "Admin"}));
        let b = perm(
            "b",
            "bob",
            1,
            serde_json::json!({"powerLevel": 20, "membership": "Invite"}),
        );
        let c = perm("c", "carol", 1, serde_json::json!({"membership": "Ban"}));
        let Folded {
            members, outcomes, ..
        } = fold(&[&a, &b, &c], users);
        assert_eq!(members["@alice:x"], (Membership::Join, 100));
        assert_eq!(members["@bob:x"], (Membership::Invite, 20));
        assert_eq!(members["@carol:x"], (Membership::Ban, 0));
        assert_eq!(
            outcomes["b"],
            PermissionOutcome::Applied {
                user_id: "@bob:x".into(),
                power_level: 20
            }
        );
    }

    #[test]
    fn missing_or_unready_users_are_pending_and_left_out() {
        let a = perm("a", "missing", 1, serde_json::json!({}));
        let b = perm("b", "pending", 1, serde_json::json!({}));
        let Folded {
            members, outcomes, ..
        } = fold(&[&a, &b], users);
        assert!(members.is_empty());
        assert!(
            matches!(&outcomes["a"], PermissionOutcome::Pending(m) if m.contains("does not exist"))
        );
        assert!(
            matches!(&outcomes["b"], PermissionOutcome::Pending(m) if m.contains("no account"))
        );
    }

    #[test]
    fn oldest_duplicate_wins() {
        let newer = perm("newer", "alice", 20, serde_json::json!({"role": "Admin"}));
        let older = perm(
            "older",
            "alice",
            10,
            serde_json::json!({"role": "Moderator"}),
        );
        let Folded {
            members, outcomes, ..
        } = fold(&[&newer, &older], users);
        assert_eq!(members["@alice:x"], (Membership::Join, 50));
        assert!(
            matches!(&outcomes["newer"], PermissionOutcome::Duplicate(m) if m.contains("older"))
        );
    }

    #[test]
    fn the_same_name_in_two_namespaces_is_two_users() {
        let mut own = perm("own", "alice", 1, serde_json::json!({}));
        own.metadata.namespace = Some("b".into());
        let mut guest = perm("guest", "alice", 2, serde_json::json!({}));
        guest.metadata.namespace = Some("b".into());
        guest.spec.user_ref.namespace = Some("a".into());
        let folded = fold(&[&own, &guest], |p| {
            UserRefState::Ready(format!(
                "@{}-{}:x",
                p.user_namespace(),
                p.spec.user_ref.name
            ))
        });
        assert_eq!(folded.members.len(), 2, "{folded:?}");
        assert!(matches!(
            folded.outcomes["guest"],
            PermissionOutcome::Applied { .. }
        ));
        // Two permissions naming the same user across namespaces: one wins.
        let mut again = perm("again", "alice", 3, serde_json::json!({}));
        again.metadata.namespace = Some("b".into());
        again.spec.user_ref.namespace = Some("a".into());
        let folded = fold(&[&guest, &again], |_| UserRefState::Ready("@a:x".into()));
        assert!(
            matches!(&folded.outcomes["again"], PermissionOutcome::Duplicate(m)
                if m == "permission guest already binds user a/alice to this room"),
            "{folded:?}"
        );
    }

    #[test]
    fn refused_references_are_no_members_and_revoke_the_account() {
        let ok = perm("ok", "alice", 1, serde_json::json!({}));
        let refused = perm("refused", "bob", 1, serde_json::json!({}));
        let unknown = perm("unknown", "ghost", 1, serde_json::json!({}));
        let folded = fold(&[&ok, &refused, &unknown], |p| {
            match p.spec.user_ref.name.as_str() {
                "alice" => UserRefState::Ready("@alice:x".into()),
                name => UserRefState::Refused {
                    reason: "ReferenceNotPermitted",
                    message: "no".into(),
                    user_id: (name == "bob").then(|| "@bob:x".to_string()),
                },
            }
        });
        assert_eq!(folded.members.keys().collect::<Vec<_>>(), ["@alice:x"]);
        assert_eq!(folded.revoked.iter().collect::<Vec<_>>(), ["@bob:x"]);
        assert_eq!(
            folded.outcomes["refused"],
            PermissionOutcome::Refused {
                reason: "ReferenceNotPermitted",
                message: "no".into()
            }
        );
        let all = [&ok, &refused, &unknown];
        assert_eq!(declared_members(&all, &folded.outcomes), 1);
    }

    #[test]
    fn declared_members_skip_duplicates_and_bans() {
        let a = perm("a", "alice", 1, serde_json::json!({}));
        let a2 = perm("a2", "alice", 2, serde_json::json!({}));
        let b = perm(
            "b",
            "pending",
            1,
            serde_json::json!({"membership": "Invite"}),
        );
        let c = perm("c", "carol", 1, serde_json::json!({"membership": "Ban"}));
        let all = [&a, &a2, &b, &c];
        let outcomes = fold(&all, users).outcomes;
        assert_eq!(declared_members(&all, &outcomes), 2);
    }

    fn user_with(ready: Option<(bool, &str)>, user_id: Option<&str>) -> MatrixUser {
        let mut u = MatrixUser::new(
            "alice",
            serde_json::from_value(serde_json::json!({"localpart": "alice"})).unwrap(),
        );
        u.metadata.namespace = Some("t".into());
        let conditions = ready
            .map(|(ok, reason)| {
                vec![crate::api::Condition::new(
                    crate::api::conditions::READY,
                    ok,
                    reason,
                    "m",
                    Some(1),
                )]
            })
            .unwrap_or_default();
        u.status = Some(crate::api::MatrixUserStatus {
            user_id: user_id.map(str::to_string),
            conditions,
            observed_generation: Some(1),
            ..Default::default()
        });
        u
    }

    #[test]
    fn a_flapping_user_keeps_membership_and_power() {
        let p = perm("p", "alice", 1, serde_json::json!({"role": "Moderator"}));
        // Ready, then every kind of trouble, then Ready again: the member and
        // its power level never change.
        for (ready, reason) in [
            (true, "Converged"),
            (false, "SynapseUnavailable"),
            (false, "SynapseRejected"),
            (false, "AdminNotAllowed"),
            (false, "EmailConflict"),
            (false, "KubernetesError"),
            (true, "Converged"),
        ] {
            let user = user_with(Some((ready, reason)), Some("@alice:x"));
            let Folded {
                members, outcomes, ..
            } = fold(&[&p], |_| user_ref_state(Some(&user)));
            assert_eq!(
                members.get("@alice:x"),
                Some(&(Membership::Join, 50)),
                "{reason}"
            );
            assert!(matches!(outcomes["p"], PermissionOutcome::Applied { .. }));
        }
    }

    #[test]
    fn only_gone_deactivated_or_departing_users_leave() {
        assert_eq!(user_ref_state(None), UserRefState::Missing);
        let mut deactivated = user_with(Some((true, "Converged")), Some("@alice:x"));
        deactivated.spec.deactivated = true;
        assert_eq!(user_ref_state(Some(&deactivated)), UserRefState::Missing);
        let mut departing = user_with(Some((true, "Converged")), Some("@alice:x"));
        departing.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(user_ref_state(Some(&departing)), UserRefState::Missing);
        // Never had an account (a localpart conflict clears it): not a member yet.
        let conflict = user_with(Some((false, "LocalpartConflict")), None);
        assert_eq!(user_ref_state(Some(&conflict)), UserRefState::NotReady);
        let fresh = user_with(None, None);
        assert_eq!(user_ref_state(Some(&fresh)), UserRefState::NotReady);
    }
}
