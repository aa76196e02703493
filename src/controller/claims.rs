//! Globally unique names (localparts, aliases): the oldest claim wins.
//! I/O-free; the controller feeds it from its watch cache.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
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
}
