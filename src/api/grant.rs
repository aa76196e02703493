//! `MatrixUserGrant`: a tenant's consent that `RoomPermission`s of other
//! namespaces may name some of its `MatrixUser`s, like Gateway API's
//! `ReferenceGrant`. It lives in the users' namespace, so only whoever may
//! write there can open its users to others.

use super::conditions::Condition;
use super::permission::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which `RoomPermission`s of other namespaces may name which `MatrixUser`s
/// of this namespace, and with what role at most.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "matrix.openmeet.net",
    version = "v1alpha1",
    kind = "MatrixUserGrant",
    plural = "matrixusergrants",
    singular = "matrixusergrant",
    shortname = "mxgrant",
    category = "matrix",
    namespaced,
    status = "MatrixUserGrantStatus",
    doc = "Lets RoomPermissions of other namespaces name MatrixUsers of this namespace.",
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".spec.from[*].namespace"}"#,
    printcolumn = r#"{"name":"Max Role","type":"string","jsonPath":".spec.maxRole"}"#,
    printcolumn = r#"{"name":"Permissions","type":"integer","description":"RoomPermissions of other namespaces that use this grant","jsonPath":".status.permissions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Users","type":"string","priority":1,"description":"The users covered by name, when named","jsonPath":".spec.users.names"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserGrantSpec {
    /// The namespaces whose `RoomPermission`s may name the users below.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace"]))]
    pub from: Vec<GrantFrom>,
    /// Which `MatrixUser`s of this namespace: by name or by label. Omitted:
    /// every one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<GrantedUsers>,
    /// The highest role a permission from those namespaces may give:
    /// `Member` (power level 0), `Moderator` (50) or `Admin` (100, the
    /// default). A permission asking for more is refused (`RoleNotPermitted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_role: Option<Role>,
}

/// One namespace a grant admits references from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GrantFrom {
    /// A namespace other than this one (references within a namespace need
    /// no grant).
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub namespace: String,
}

/// The `MatrixUser`s a grant covers: `names`, or a label `selector`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.names) != has(self.selector)").message("set either names or selector, not both"))]
#[serde(rename_all = "camelCase")]
pub struct GrantedUsers {
    /// `MatrixUser` names in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    pub names: Option<Vec<String>>,
    /// The `MatrixUser`s of this namespace whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// How a grant is used. Counts only: the names of the rooms and permissions
/// belong to the other tenant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserGrantStatus {
    /// Each namespace whose `RoomPermission`s use this grant, with how many.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace"]))]
    pub used_by: Vec<GrantUse>,
    /// How many `RoomPermission`s use this grant, in all.
    #[serde(default)]
    pub permissions: i64,
    /// Conditions keyed by type: `Ready` (the grant is in effect).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted upon (0: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One namespace's use of a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantUse {
    /// A namespace the grant admits.
    pub namespace: String,
    /// Its `RoomPermission`s that name a user this grant covers.
    pub permissions: i64,
}

impl MatrixUserGrantSpec {
    /// The highest power level a permission under this grant may give.
    pub fn max_power_level(&self) -> i64 {
        self.max_role.unwrap_or(Role::Admin).power_level()
    }
}
