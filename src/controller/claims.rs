//! Globally unique names (localparts, aliases): the oldest claim wins.
//! I/O-free; the controller feeds it from its watch cache.

use crate::api::MatrixUser;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use std::collections::BTreeSet;
use std::sync::Arc;

/// One object claiming a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub created: Option<&'a Time>,
}

impl Claim<'_> {
    /// Oldest first; ties (same second) broken by namespace then name, so
    /// every replica and every reconcile agrees on one winner.
    fn sort_key(&self) -> (bool, Option<&Time>, &str, &str) {
        (
            self.created.is_none(),
            self.created,
            self.namespace,
            self.name,
        )
    }
}

/// The claim that holds the name, if any.
pub fn holder<'a>(claims: impl IntoIterator<Item = Claim<'a>>) -> Option<Claim<'a>> {
    claims
        .into_iter()
        .min_by(|a, b| a.sort_key().cmp(&b.sort_key()))
}

/// The claim an object makes, by its namespace, name and age.
pub fn claim_of<K: ResourceExt>(k: &K) -> Claim<'_> {
    Claim {
        namespace: k.meta().namespace.as_deref().unwrap_or_default(),
        name: k.meta().name.as_deref().unwrap_or_default(),
        created: k.meta().creation_timestamp.as_ref(),
    }
}

/// Whether `me` holds the name it claims among `all` (a watch cache, which
/// may not contain `me` yet). `claims_same` says whether another object
/// claims the same name. `Err` names the holder.
pub fn check<K: ResourceExt>(
    all: &[Arc<K>],
    me: &K,
    claims_same: impl Fn(&K) -> bool,
) -> Result<(), String> {
    let same_object = |k: &K| k.namespace() == me.namespace() && k.name_any() == me.name_any();
    let others = all
        .iter()
        .map(|k| k.as_ref())
        .filter(|k| claims_same(k) && !same_object(k));
    let claims: Vec<Claim> = others.chain(std::iter::once(me)).map(claim_of).collect();
    match holder(claims) {
        Some(h) if h.namespace == me.namespace().unwrap_or_default() && h.name == me.name_any() => {
            Ok(())
        }
        Some(h) => Err(format!("{}/{}", h.namespace, h.name)),
        None => Ok(()),
    }
}

/// Whether `user` claims `localpart`. Every object does, whatever its
/// state (a deactivated account's id is never reused; a departing object
/// holds its claim until its cleanup is done). The one predicate both the
/// controller's conflict check and the sidecar's handle API use.
pub fn claims_localpart(user: &MatrixUser, localpart: &str) -> bool {
    user.spec.localpart == localpart
}

/// The object holding `localpart` among `users` (a watch cache), if any.
pub fn localpart_holder<'a>(
    users: impl IntoIterator<Item = &'a MatrixUser>,
    localpart: &str,
) -> Option<Claim<'a>> {
    holder(
        users
            .into_iter()
            .filter(|u| claims_localpart(u, localpart))
            .map(claim_of),
    )
}

/// Whether `me` holds its localpart among `all`. `Err` names the holder.
pub fn holds_localpart(all: &[Arc<MatrixUser>], me: &MatrixUser) -> Result<(), String> {
    check(all, me, |u| claims_localpart(u, &me.spec.localpart))
}

/// Whether the operator's reserved list (its own accounts, `admin`, and the
/// configured extras) names `localpart`.
pub fn is_reserved(reserved: &BTreeSet<String>, localpart: &str) -> bool {
    reserved.contains(localpart)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn oldest_wins_across_namespaces() {
        let (a, b) = (t(100), t(50));
        let claims = [
            Claim {
                namespace: "tenant-a",
                name: "alice",
                created: Some(&a),
            },
            Claim {
                namespace: "tenant-b",
                name: "alice",
                created: Some(&b),
            },
        ];
        assert_eq!(holder(claims).unwrap().namespace, "tenant-b");
    }

    #[test]
    fn ties_break_deterministically_and_missing_times_lose() {
        let same = t(10);
        let claims = [
            Claim {
                namespace: "b",
                name: "x",
                created: Some(&same),
            },
            Claim {
                namespace: "a",
                name: "y",
                created: Some(&same),
            },
            Claim {
                namespace: "0",
                name: "z",
                created: None,
            },
        ];
        assert_eq!(holder(claims).unwrap().namespace, "a");
        assert_eq!(holder(Vec::<Claim>::new()), None);
    }

    fn user(ns: &str, name: &str, localpart: &str, created: i64) -> Arc<MatrixUser> {
        let mut u = MatrixUser::new(
            name,
            serde_json::from_value(serde_json::json!({ "localpart": localpart })).unwrap(),
        );
        u.metadata.namespace = Some(ns.into());
        u.metadata.creation_timestamp = Some(t(created));
        Arc::new(u)
    }

    #[test]
    fn the_oldest_claimant_holds_a_localpart_whatever_its_tenant() {
        let all = vec![
            user("tenant-a", "alice", "alice", 100),
            user("tenant-b", "alice", "alice", 50),
            user("tenant-b", "bob", "bob", 10),
        ];
        let held = localpart_holder(all.iter().map(|u| u.as_ref()), "alice").unwrap();
        assert_eq!((held.namespace, held.name), ("tenant-b", "alice"));
        assert_eq!(
            localpart_holder(all.iter().map(|u| u.as_ref()), "carol"),
            None
        );
        // The controller's view of the same claims.
        assert_eq!(holds_localpart(&all, &all[1]), Ok(()));
        assert_eq!(
            holds_localpart(&all, &all[0]),
            Err("tenant-b/alice".to_string())
        );
        // An object the cache has not seen yet counts too.
        let newcomer = user("tenant-c", "early", "carol", 1);
        assert_eq!(holds_localpart(&all, &newcomer), Ok(()));
    }
}
