//! Whether a handle (a localpart) is free for a `MatrixUser` that does not
//! exist yet: the controller's own rules (the schema's grammar, the reserved
//! list, the oldest claim, the plan for an existing account), applied to a
//! newcomer. The sidecar's handle API answers with this, so "available"
//! means the object the platform writes next will get the account.
//! I/O-free: the caller reads the cache and Synapse.

use super::plan::{plan, Desired, UserPlan};
use crate::api::user::{check_localpart, LocalpartRule};
use crate::api::{MatrixUser, MatrixUserSpec};
use crate::controller::claims;
use crate::controller::OWNER_PROVIDER;
use crate::synapse::{ExternalId, SynapseUser};
use std::collections::BTreeSet;

/// Where a handle stands. Never says who holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// A `MatrixUser` (any tenant) claims it, or Synapse has the account.
    Taken,
    /// On the operator's reserved list.
    Reserved,
    /// Breaks the schema's grammar; the rule says which part.
    Invalid(LocalpartRule),
}

impl Availability {
    /// Stable code for programs.
    pub fn code(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Taken => "taken",
            Availability::Reserved => "reserved",
            Availability::Invalid(_) => "invalid",
        }
    }
}

/// The answer that needs no Synapse call, if any: invalid, reserved, or
/// claimed by an object in the cache (`users`, every tenant). `None` means
/// only Synapse can tell ([`with_account`]).
pub fn precheck<'a>(
    localpart: &str,
    reserved: &BTreeSet<String>,
    users: impl IntoIterator<Item = &'a MatrixUser>,
) -> Option<Availability> {
    if let Err(rule) = check_localpart(localpart) {
        return Some(Availability::Invalid(rule));
    }
    if claims::is_reserved(reserved, localpart) {
        return Some(Availability::Reserved);
    }
    if claims::localpart_holder(users, localpart).is_some() {
        return Some(Availability::Taken);
    }
    None
}

/// What the controller's plan makes of the account Synapse holds under the
/// localpart (`None`: no account) for a newcomer: an object of its own uid,
/// in a namespace that may not adopt (sign-up never grants adoption).
pub fn with_account(localpart: &str, observed: Option<&SynapseUser>) -> Availability {
    let spec = MatrixUserSpec {
        localpart: localpart.to_string(),
        display_name: None,
        avatar_url: None,
        email: None,
        subject: None,
        admin: false,
        locked: false,
        deactivated: false,
        deletion_policy: Default::default(),
    };
    let desired = Desired {
        spec: &spec,
        // No object carries this marker: a newcomer owns no account yet.
        owner_marker: ExternalId {
            auth_provider: OWNER_PROVIDER.into(),
            external_id: String::new(),
        },
        legacy_marker: None,
        sso_provider: "",
        sso_subject: None,
        reserved: false,
        admin_allowed: false,
        adoption_allowed: false,
        email_held: true,
        create_pending: false,
        unlock_allowed: true,
    };
    match plan(&desired, observed) {
        UserPlan::Blocked(_) => Availability::Taken,
        UserPlan::Converge { .. } => Availability::Available,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::OperatorConfig;
    use std::sync::Arc;

    fn user(ns: &str, localpart: &str) -> Arc<MatrixUser> {
        let mut u = MatrixUser::new(
            "someone",
            serde_json::from_value(serde_json::json!({ "localpart": localpart })).unwrap(),
        );
        u.metadata.namespace = Some(ns.into());
        Arc::new(u)
    }

    #[test]
    fn decides_without_synapse_what_the_cache_and_the_rules_decide() {
        let reserved = OperatorConfig::builtin_reserved("openmeet-admin", "openmeet-operator");
        let users = [user("tenant-a", "alice"), user("tenant-b", "deactivated")];
        let check = |lp: &str| precheck(lp, &reserved, users.iter().map(|u| u.as_ref()));
        assert_eq!(
            check("Alice"),
            Some(Availability::Invalid(LocalpartRule::Characters))
        );
        assert_eq!(
            check("_x"),
            Some(Availability::Invalid(LocalpartRule::LeadingUnderscore))
        );
        assert_eq!(
            check("1234"),
            Some(Availability::Invalid(LocalpartRule::Numeric))
        );
        assert_eq!(check("admin"), Some(Availability::Reserved));
        assert_eq!(check("openmeet-operator"), Some(Availability::Reserved));
        // Claimed in another tenant: taken all the same.
        assert_eq!(check("alice"), Some(Availability::Taken));
        assert_eq!(check("bob"), None, "only Synapse can tell");
    }

    #[test]
    fn any_existing_account_is_taken() {
        assert_eq!(with_account("bob", None), Availability::Available);
        let base = SynapseUser {
            name: "@bob:x".into(),
            ..Default::default()
        };
        let mut deactivated = base.clone();
        deactivated.deactivated = true;
        let mut marked = base.clone();
        marked.external_ids.push(ExternalId {
            auth_provider: OWNER_PROVIDER.into(),
            external_id: "t/gone/uid-0".into(),
        });
        for account in [base, deactivated, marked] {
            assert_eq!(
                with_account("bob", Some(&account)),
                Availability::Taken,
                "{account:?}"
            );
        }
    }
}
