//! `MatrixUser`: one Matrix account on the homeserver.

use super::conditions::Condition;
use super::PLAIN_TEXT_PATTERN;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Matrix user-id localpart grammar (lower case, as new accounts require);
/// Synapse refuses a leading `_` (reserved for application services' bridges).
pub const LOCALPART_PATTERN: &str = r"^[a-z0-9.=/+-][a-z0-9._=/+-]*$";
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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(oldSelf.deactivated) || !oldSelf.deactivated || (has(self.deactivated) && self.deactivated)").message("deactivation is permanent: deactivated cannot be set back to false"))]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserSpec {
    /// Local part of the Matrix user id (`@<localpart>:<server>`): lower case
    /// `[a-z0-9._=/+-]`, not starting with `_`. Immutable.
    #[schemars(regex(pattern = LOCALPART_PATTERN), length(min = 1, max = 200))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("localpart is immutable"))]
    pub localpart: String,

    /// Display name shown in Matrix clients. No control characters and no
    /// bidirectional overrides or isolates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PLAIN_TEXT_PATTERN), length(min = 1, max = 256))]
    pub display_name: Option<String>,

    /// Avatar as an `mxc://` content URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^mxc://[A-Za-z0-9.:_-]+/[A-Za-z0-9_-]+$"),
        length(max = 512)
    )]
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

    /// Server admin. Only honoured in namespaces the operator's configuration allows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,

    /// Locked accounts cannot log in or use existing tokens.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,

    /// Deactivated accounts are logged out and leave their rooms. Deactivation
    /// is permanent: once true it can't be set back to false or removed (CEL
    /// rule). Reactivating is left to a person, out of band in Synapse; while
    /// this object says true, the controller deactivates the account again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deactivated: bool,

    /// What happens to the account when this object is deleted.
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
    /// Conditions keyed by type; `Ready` summarises convergence.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The account the operator asked Synapse to create and has not seen
    /// complete yet. Synapse creates an account before recording its
    /// external ids; a create cut short in between leaves an account with
    /// no owner marker, which this record lets the next reconcile finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_account: Option<String>,
}
