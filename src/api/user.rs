//! `MatrixUser`: one Matrix account on the homeserver.

use super::conditions::Condition;
use super::PLAIN_TEXT_PATTERN;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Matrix user-id localpart grammar (lower case, as new accounts require).
pub const LOCALPART_PATTERN: &str = r"^[a-z0-9._=/+-]+$";
/// Shortest and longest localpart the schema admits.
pub const LOCALPART_MIN: usize = 1;
pub const LOCALPART_MAX: usize = 200;
/// CEL rule of the schema: Synapse refuses new localparts starting with `_`
/// (kept for application services' namespaces).
pub const LOCALPART_NO_UNDERSCORE_RULE: &str = "!self.startsWith('_')";
/// CEL rule of the schema: Synapse keeps all-digit localparts for guest
/// accounts and refuses them for new users.
pub const LOCALPART_NOT_NUMERIC_RULE: &str = "!self.matches('^[0-9]+$')";
/// Content URIs only: the avatar must already live in the media repository.
pub const MXC_PATTERN: &str = r"^mxc://[A-Za-z0-9.:_-]+/[A-Za-z0-9_-]+$";

/// A Matrix account that the operator creates and keeps converged.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "matrix.openmeet.net",
    version = "v1alpha1",
    kind = "MatrixUser",
    plural = "matrixusers",
    singular = "matrixuser",
    shortname = "mxuser",
    category = "matrix",
    namespaced,
    status = "MatrixUserStatus",
    doc = "A Matrix account on the homeserver, created and kept converged by the operator.",
    printcolumn = r#"{"name":"User ID","type":"string","jsonPath":".status.userId"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Localpart","type":"string","priority":1,"jsonPath":".spec.localpart"}"#,
    printcolumn = r#"{"name":"Deletion","type":"string","priority":1,"jsonPath":".spec.deletionPolicy"}"#,
    printcolumn = r#"{"name":"Deactivated","type":"boolean","priority":1,"jsonPath":".spec.deactivated"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(oldSelf.deactivated) || !oldSelf.deactivated || (has(self.deactivated) && self.deactivated)").message("deactivation is permanent: deactivated cannot be set back to false"))]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserSpec {
    /// Local part of the Matrix user id (`@<localpart>:<server>`): lower case
    /// `[a-z0-9._=/+-]`, not starting with `_`, not digits only. Immutable.
    #[schemars(
        regex(pattern = LOCALPART_PATTERN),
        length(min = LOCALPART_MIN, max = LOCALPART_MAX)
    )]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("localpart is immutable"),
        validation = Rule::new(LOCALPART_NO_UNDERSCORE_RULE).message("localpart must not start with _"),
        validation = Rule::new(LOCALPART_NOT_NUMERIC_RULE).message("localpart must not be digits only (Synapse keeps those for guests)")
    )]
    pub localpart: String,

    /// Display name shown in Matrix clients. No control characters and no
    /// bidirectional overrides or isolates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PLAIN_TEXT_PATTERN), length(min = 1, max = 256))]
    pub display_name: Option<String>,

    /// Avatar as an `mxc://` content URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = MXC_PATTERN), length(max = 512))]
    pub avatar_url: Option<String>,

    /// Email address recorded as the account's third-party id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), length(max = 254))]
    pub email: Option<String>,

    /// The platform's stable user id: the OIDC `sub`, linked in Synapse as the
    /// account's external id for the `oidc-<idp>` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub subject: Option<String>,

    /// Server admin (default false). Only honoured in namespaces the
    /// operator's configuration allows; elsewhere `AdminNotAllowed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,

    /// Locked accounts cannot log in or use existing tokens (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,

    /// Deactivated accounts are logged out and leave their rooms. Deactivation
    /// is permanent: once true it can't be set back to false or removed (CEL
    /// rule). Reactivating is left to a person, out of band in Synapse; while
    /// this object says true, the controller deactivates the account again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deactivated: bool,

    /// What deleting this object does to the account: `Deactivate`
    /// (default; logged out, removed from rooms, the id never reused),
    /// `Erase` (deactivate, hide messages from new members, clear the
    /// profile), `Retain` (the account is left as it is).
    #[serde(default)]
    pub deletion_policy: UserDeletionPolicy,
}

/// What deleting a `MatrixUser` does to its account.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum UserDeletionPolicy {
    /// Deactivate the account (logged out, removed from rooms; the id is never reused).
    #[default]
    Deactivate,
    /// Deactivate and erase: messages are hidden from new members, profile cleared.
    Erase,
    /// Leave the account as it is.
    Retain,
}

/// Observed state of a `MatrixUser`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserStatus {
    /// Full Matrix user id, set once the account is the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Conditions keyed by type: `Ready` (converged, or why not),
    /// `Reconciling` (work in progress) and `Stalled` (waits for a spec
    /// change or an older claimant to let go, e.g. `LocalpartConflict`).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted upon (0: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The account the operator asked Synapse to create and has not seen
    /// complete yet. Synapse creates an account before recording its
    /// external ids; a create cut short in between leaves an account with
    /// no owner marker, which this record lets the next reconcile finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_account: Option<String>,
    /// What the last convergence confirmed in Synapse, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<super::Confirmed>,
}

/// The grammar rule a localpart breaks: exactly the rules of the CRD's
/// schema for `spec.localpart` (a test holds the two together), so a handle
/// the sidecar calls valid is one the API server admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalpartRule {
    /// Shorter than [`LOCALPART_MIN`] or longer than [`LOCALPART_MAX`].
    Length,
    /// A character outside [`LOCALPART_PATTERN`] (lower case letters,
    /// digits and `._=/+-`).
    Characters,
    /// Starts with `_`.
    LeadingUnderscore,
    /// Digits only: Synapse keeps those for guest accounts.
    Numeric,
}

impl LocalpartRule {
    /// Stable code for programs.
    pub fn code(self) -> &'static str {
        match self {
            LocalpartRule::Length => "length",
            LocalpartRule::Characters => "characters",
            LocalpartRule::LeadingUnderscore => "leading_underscore",
            LocalpartRule::Numeric => "numeric",
        }
    }
}

/// Checks a localpart against the schema's rules, in the order a person
/// fixes them: length, characters, first character.
pub fn check_localpart(localpart: &str) -> Result<(), LocalpartRule> {
    static GRAMMAR: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(LOCALPART_PATTERN).expect("the localpart pattern compiles")
    });
    // The schema counts characters (code points), as does `chars()`.
    let length = localpart.chars().count();
    if !(LOCALPART_MIN..=LOCALPART_MAX).contains(&length) {
        return Err(LocalpartRule::Length);
    }
    if !GRAMMAR.is_match(localpart) {
        return Err(LocalpartRule::Characters);
    }
    if localpart.starts_with('_') {
        return Err(LocalpartRule::LeadingUnderscore);
    }
    if localpart.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LocalpartRule::Numeric);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_localpart_check_is_the_schemas() {
        let crd = serde_json::to_value(MatrixUser::crd()).unwrap();
        let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["localpart"];
        assert_eq!(field["pattern"], LOCALPART_PATTERN);
        assert_eq!(field["minLength"], LOCALPART_MIN);
        assert_eq!(field["maxLength"], LOCALPART_MAX);
        let rules: Vec<&str> = field["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert_eq!(
            rules,
            [
                "self == oldSelf",
                LOCALPART_NO_UNDERSCORE_RULE,
                LOCALPART_NOT_NUMERIC_RULE
            ]
        );
    }

    #[test]
    fn localparts_follow_the_grammar() {
        for ok in [
            "a",
            "alice",
            "john.doe",
            "a_b",
            "x=y/z+w-v",
            "0a",
            "1.2",
            &"a".repeat(200),
        ] {
            assert_eq!(check_localpart(ok), Ok(()), "{ok}");
        }
        for (bad, rule) in [
            ("", LocalpartRule::Length),
            (&"a".repeat(201) as &str, LocalpartRule::Length),
            ("Alice", LocalpartRule::Characters),
            ("al ice", LocalpartRule::Characters),
            ("al:ice", LocalpartRule::Characters),
            ("alice\n", LocalpartRule::Characters),
            ("émile", LocalpartRule::Characters),
            ("_bridge", LocalpartRule::LeadingUnderscore),
            ("0", LocalpartRule::Numeric),
            ("20261206", LocalpartRule::Numeric),
        ] {
            assert_eq!(check_localpart(bad), Err(rule), "{bad:?}");
        }
    }
}
