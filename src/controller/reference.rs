//! Whether a `RoomPermission` may name its user. Within a namespace it
//! always may; across namespaces only as far as a `MatrixUserGrant` in the
//! user's namespace admits: the permission's namespace listed in `from`,
//! the user covered, the power level within `maxRole`. I/O-free.
//!
//! A refusal never says more about the other tenant than the reference
//! already does: whether the user exists is told only once a grant covers
//! the reference.

use crate::api::grant::GrantUse;
use crate::api::{MatrixUser, MatrixUserGrant, RoomPermission};
use kube::core::{Selector, SelectorExt};
use kube::ResourceExt;
use std::collections::BTreeMap;

/// No grant in the user's namespace admits the reference.
pub const REFERENCE_NOT_PERMITTED: &str = "ReferenceNotPermitted";
/// A grant admits the reference, but not at the power level asked for.
pub const ROLE_NOT_PERMITTED: &str = "RoleNotPermitted";

/// What a permission's reference to its user comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Permitted,
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Whether `grant` lets namespace `from` name the user called `name` (with
/// `labels`, when the object exists). Grants being deleted admit nothing.
pub fn covers(
    grant: &MatrixUserGrant,
    from: &str,
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    if grant.metadata.deletion_timestamp.is_some()
        || !grant.spec.from.iter().any(|f| f.namespace == from)
    {
        return false;
    }
    let Some(users) = &grant.spec.users else {
        return true;
    };
    if let Some(names) = &users.names {
        return names.iter().any(|n| n == name);
    }
    let (Some(selector), Some(labels)) = (&users.selector, labels) else {
        return false;
    };
    // The API server accepts operators a selector cannot hold: such a
    // grant covers no one rather than everyone.
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// Judges `p`'s reference to `user` (its cached object, if any) against the
/// grants of the user's namespace.
pub fn judge<'a>(
    p: &RoomPermission,
    user: Option<&MatrixUser>,
    grants: impl IntoIterator<Item = &'a MatrixUserGrant>,
) -> Verdict {
    if !p.crosses_namespaces() {
        return Verdict::Permitted;
    }
    let (from, user_ns) = (p.namespace().unwrap_or_default(), p.user_namespace());
    let name = &p.spec.user_ref.name;
    let labels = user.map(|u| u.labels());
    let limit = grants
        .into_iter()
        .filter(|g| g.namespace().as_deref() == Some(user_ns))
        .filter(|g| covers(g, &from, name, labels))
        .map(|g| g.spec.max_power_level())
        .max();
    let asked = p.spec.desired_power_level();
    match limit {
        None => Verdict::Refused {
            reason: REFERENCE_NOT_PERMITTED,
            message: format!(
                "no MatrixUserGrant in namespace {user_ns} lets this namespace name MatrixUser {name}"
            ),
        },
        Some(limit) if asked > limit => Verdict::Refused {
            reason: ROLE_NOT_PERMITTED,
            message: format!(
                "MatrixUserGrants in namespace {user_ns} let this namespace give MatrixUser {name} \
                 power level {limit} at most; this permission asks for {asked}"
            ),
        },
        Some(_) => Verdict::Permitted,
    }
}

/// How `grant` is used: for each namespace it admits, how many of `crossing`
/// (permissions naming users of the grant's namespace from elsewhere) it
/// admits. `user` finds a user of the grant's namespace by name.
pub fn uses<'a>(
    grant: &MatrixUserGrant,
    crossing: impl IntoIterator<Item = &'a RoomPermission>,
    user: impl Fn(&str) -> Option<std::sync::Arc<MatrixUser>>,
) -> Vec<GrantUse> {
    let own = grant.namespace().unwrap_or_default();
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for p in crossing {
        if p.user_namespace() != own || !p.crosses_namespaces() {
            continue;
        }
        let from = p.namespace().unwrap_or_default();
        let name = &p.spec.user_ref.name;
        let object = user(name);
        let admitted = covers(grant, &from, name, object.as_ref().map(|u| u.labels()))
            && p.spec.desired_power_level() <= grant.spec.max_power_level();
        if admitted {
            *counts.entry(from).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(namespace, permissions)| GrantUse {
            namespace,
            permissions,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn grant(spec: serde_json::Value) -> MatrixUserGrant {
        let mut g = MatrixUserGrant::new("g", serde_json::from_value(spec).unwrap());
        g.metadata.namespace = Some("a".into());
        g
    }

    fn perm(
        ns: &str,
        user_ns: Option<&str>,
        user: &str,
        spec: serde_json::Value,
    ) -> RoomPermission {
        let mut full = json!({"roomRef": {"name": "room"}, "userRef": {"name": user}});
        if let Some(user_ns) = user_ns {
            full["userRef"]["namespace"] = json!(user_ns);
        }
        full.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        let mut p = RoomPermission::new(
            &format!("{user}-room"),
            serde_json::from_value(full).unwrap(),
        );
        p.metadata.namespace = Some(ns.into());
        p
    }

    fn user(name: &str, labels: &[(&str, &str)]) -> MatrixUser {
        let mut u = MatrixUser::new(
            name,
            serde_json::from_value(json!({"localpart": name})).unwrap(),
        );
        u.metadata.namespace = Some("a".into());
        u.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        u
    }

    #[test]
    fn within_a_namespace_no_grant_is_needed() {
        let own = perm("a", None, "alice", json!({"role": "Admin"}));
        assert_eq!(judge(&own, None, []), Verdict::Permitted);
        let named = perm("a", Some("a"), "alice", json!({"role": "Admin"}));
        assert_eq!(judge(&named, None, []), Verdict::Permitted);
    }

    #[test]
    fn across_namespaces_only_a_covering_grant_admits() {
        let p = perm("b", Some("a"), "alice", json!({}));
        let alice = user("alice", &[("role", "speaker")]);
        let refused = judge(&p, Some(&alice), []);
        assert!(
            matches!(&refused, Verdict::Refused { reason, message }
                if *reason == REFERENCE_NOT_PERMITTED
                    && message == "no MatrixUserGrant in namespace a lets this namespace name MatrixUser alice"),
            "{refused:?}"
        );
        for (spec, admitted) in [
            (json!({"from": [{"namespace": "b"}]}), true),
            (json!({"from": [{"namespace": "c"}]}), false),
            (
                json!({"from": [{"namespace": "b"}], "users": {"names": ["alice"]}}),
                true,
            ),
            (
                json!({"from": [{"namespace": "b"}], "users": {"names": ["bob"]}}),
                false,
            ),
            (
                json!({"from": [{"namespace": "b"}], "users": {"selector": {"matchLabels": {"role": "speaker"}}}}),
                true,
            ),
            (
                json!({"from": [{"namespace": "b"}], "users": {"selector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["host"]}]}}}),
                false,
            ),
        ] {
            let g = grant(spec.clone());
            let verdict = judge(&p, Some(&alice), [&g]);
            assert_eq!(verdict == Verdict::Permitted, admitted, "{spec}");
        }
    }

    #[test]
    fn refusals_tell_nothing_about_whether_the_user_exists() {
        let p = perm("b", Some("a"), "ghost", json!({}));
        let by_label = grant(
            json!({"from": [{"namespace": "b"}], "users": {"selector": {"matchLabels": {"role": "speaker"}}}}),
        );
        // No grant, or a label grant that cannot see a missing user: the
        // same answer as for a user that exists.
        let missing = judge(&p, None, [&by_label]);
        let present = judge(&p, Some(&user("ghost", &[])), [&by_label]);
        assert_eq!(missing, present);
        assert_eq!(missing, judge(&p, None, []));
    }

    #[test]
    fn grants_of_other_namespaces_or_being_deleted_admit_nothing() {
        let p = perm("b", Some("a"), "alice", json!({}));
        let mut elsewhere = grant(json!({"from": [{"namespace": "b"}]}));
        elsewhere.metadata.namespace = Some("c".into());
        assert_ne!(judge(&p, None, [&elsewhere]), Verdict::Permitted);
        let mut leaving = grant(json!({"from": [{"namespace": "b"}]}));
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_ne!(judge(&p, None, [&leaving]), Verdict::Permitted);
    }

    #[test]
    fn the_highest_limit_among_covering_grants_caps_the_power_level() {
        let member = grant(json!({"from": [{"namespace": "b"}], "maxRole": "Member"}));
        let moderator = grant(json!({"from": [{"namespace": "b"}], "maxRole": "Moderator"}));
        let asks = |spec| perm("b", Some("a"), "alice", spec);
        assert_eq!(judge(&asks(json!({})), None, [&member]), Verdict::Permitted);
        // A ban gives no power: a Member grant admits it.
        assert_eq!(
            judge(&asks(json!({"membership": "Ban"})), None, [&member]),
            Verdict::Permitted
        );
        let refused = judge(&asks(json!({"powerLevel": 20})), None, [&member]);
        assert!(
            matches!(&refused, Verdict::Refused { reason, message }
                if *reason == ROLE_NOT_PERMITTED && message.contains("power level 0 at most; this permission asks for 20")),
            "{refused:?}"
        );
        assert_eq!(
            judge(
                &asks(json!({"role": "Moderator"})),
                None,
                [&member, &moderator]
            ),
            Verdict::Permitted
        );
        assert_ne!(
            judge(&asks(json!({"role": "Admin"})), None, [&member, &moderator]),
            Verdict::Permitted
        );
        let unlimited = grant(json!({"from": [{"namespace": "b"}]}));
        assert_eq!(
            judge(&asks(json!({"role": "Admin"})), None, [&unlimited]),
            Verdict::Permitted
        );
    }

    #[test]
    fn uses_count_admitted_permissions_per_namespace() {
        let g = grant(
            json!({"from": [{"namespace": "b"}, {"namespace": "c"}], "maxRole": "Moderator"}),
        );
        let perms = [
            perm("b", Some("a"), "alice", json!({})),
            perm("b", Some("a"), "bob", json!({"role": "Moderator"})),
            perm("c", Some("a"), "alice", json!({})),
            // Above the limit, from a namespace not listed, or not crossing.
            perm("b", Some("a"), "carol", json!({"role": "Admin"})),
            perm("d", Some("a"), "alice", json!({})),
            perm("a", None, "alice", json!({})),
        ];
        let users = |name: &str| Some(Arc::new(user(name, &[])));
        assert_eq!(
            uses(&g, &perms, users),
            [
                GrantUse {
                    namespace: "b".into(),
                    permissions: 2
                },
                GrantUse {
                    namespace: "c".into(),
                    permissions: 1
                },
            ]
        );
    }
}
