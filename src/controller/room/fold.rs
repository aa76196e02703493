//! Folding `RoomPermission`s into a room's desired membership and power.
//! I/O-free: the shell passes in what its watch caches hold.

use crate::api::permission::Membership;
use crate::api::RoomPermission;
use crate::controller::claims::{holder, Claim};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// What became of one permission in its room's reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PermissionOutcome {
    /// Folded into the room: the user's id and power level.
    Applied { user_id: String, power_level: i64 },
    /// The referenced user is missing or not Ready yet; resolves by itself.
    Pending(String),
    /// An older permission names the same user in the same room.
    Duplicate(String),
}

/// What the shell knows about a referenced `MatrixUser`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserRefState {
    Missing,
    NotReady,
    Ready(String),
}

/// Folds the permissions of one room (already filtered to it) into the
/// desired members, and says what became of each permission (by name).
pub fn fold(
    permissions: &[&RoomPermission],
    user: impl Fn(&str) -> UserRefState,
) -> (
    BTreeMap<String, (Membership, i64)>,
    BTreeMap<String, PermissionOutcome>,
) {
    let mut by_user: BTreeMap<&str, Vec<&RoomPermission>> = BTreeMap::new();
    for p in permissions {
        by_user
            .entry(p.spec.user_ref.name.as_str())
            .or_default()
            .push(p);
    }
    let mut members = BTreeMap::new();
    let mut outcomes = BTreeMap::new();
    for (user_name, claims) in by_user {
        let winner = holder(claims.iter().map(|p| Claim {
            namespace: p.metadata.namespace.as_deref().unwrap_or_default(),
            name: p.metadata.name.as_deref().unwrap_or_default(),
            created: p.metadata.creation_timestamp.as_ref(),
        }))
        .map(|c| c.name.to_string());
        for p in claims {
            let name = p.name_any();
            if Some(&name) != winner.as_ref() {
                let message = format!(
                    "permission {} already binds user {user_name} to this room",
                    winner.clone().unwrap_or_default()
                );
                outcomes.insert(name, PermissionOutcome::Duplicate(message));
                continue;
            }
            let outcome = match user(user_name) {
                UserRefState::Missing => {
                    PermissionOutcome::Pending(format!("MatrixUser {user_name} does not exist"))
                }
                UserRefState::NotReady => {
                    PermissionOutcome::Pending(format!("MatrixUser {user_name} is not Ready"))
                }
                UserRefState::Ready(user_id) => {
                    let level = p.spec.desired_power_level();
                    members.insert(user_id.clone(), (p.spec.membership, level));
                    PermissionOutcome::Applied {
                        user_id,
                        power_level: level,
                    }
                }
            };
            outcomes.insert(name, outcome);
        }
    }
    (members, outcomes)
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

    fn users(name: &str) -> UserRefState {
        match name {
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
        let (members, outcomes) = fold(&[&a, &b, &c], users);
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
        let (members, outcomes) = fold(&[&a, &b], users);
        assert!(members.is_empty());
        assert!(
            matches!(&outcomes["a"], PermissionOutcome::Pending(m) if m.contains("does not exist"))
        );
        assert!(matches!(&outcomes["b"], PermissionOutcome::Pending(m) if m.contains("not Ready")));
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
        let (members, outcomes) = fold(&[&newer, &older], users);
        assert_eq!(members["@alice:x"], (Membership::Join, 50));
        assert!(
            matches!(&outcomes["newer"], PermissionOutcome::Duplicate(m) if m.contains("older"))
        );
    }
}
