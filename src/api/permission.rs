//! `RoomPermission`: one user's place in one room, like a RoleBinding.

use super::conditions::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One user's membership and power in one room of the same namespace. The
/// user is of the same namespace too, unless `userRef.namespace` names
/// another whose `MatrixUserGrant` admits this one.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "matrix.openmeet.net",
    version = "v1alpha1",
    kind = "RoomPermission",
    plural = "roompermissions",
    singular = "roompermission",
    shortname = "mxperm",
    category = "matrix",
    namespaced,
    status = "RoomPermissionStatus",
    doc = "One user's membership and power level in one room of the same namespace.",
    printcolumn = r#"{"name":"Room","type":"string","jsonPath":".spec.roomRef.name"}"#,
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userRef.name"}"#,
    printcolumn = r#"{"name":"Membership","type":"string","jsonPath":".spec.membership"}"#,
    printcolumn = r#"{"name":"Power","type":"integer","jsonPath":".status.effectivePowerLevel"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"User Namespace","type":"string","priority":1,"description":"The user's namespace, when not this one","jsonPath":".spec.userRef.namespace"}"#,
    printcolumn = r#"{"name":"Role","type":"string","priority":1,"jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Level","type":"integer","priority":1,"description":"Explicit power level, when set instead of a role","jsonPath":".spec.powerLevel"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!(has(self.role) && has(self.powerLevel))").message("set either role or powerLevel, not both"))]
#[serde(rename_all = "camelCase")]
pub struct RoomPermissionSpec {
    /// The `MatrixRoom` in this namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("roomRef is immutable"))]
    pub room_ref: LocalRef,
    /// The `MatrixUser`: in this namespace, or in the one `namespace` names
    /// when a `MatrixUserGrant` there admits this namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("userRef is immutable"))]
    pub user_ref: UserRef,
    /// Named role, mapped to a power level: `Member` = 0, `Moderator` = 50,
    /// `Admin` = 100. Set either this or `powerLevel`; with neither, 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Explicit power level (0–100), instead of a role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub power_level: Option<i64>,
    /// `Join` (default): the user is joined to the room. `Invite`: the user
    /// is invited and joins when they accept. `Ban`: the user is banned and
    /// kept out.
    #[serde(default)]
    pub membership: Membership,
}

/// A reference to an object of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LocalRef {
    /// Name of the object, in the same namespace as the referring one.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
}

/// A reference to a `MatrixUser`, of this namespace unless `namespace`
/// says otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserRef {
    /// Name of the `MatrixUser`.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// The user's namespace, when not this one: a `MatrixUserGrant` there
    /// must admit this namespace (`ReferenceNotPermitted` until one does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Role {
    Member,
    Moderator,
    Admin,
}

impl Role {
    pub fn power_level(self) -> i64 {
        match self {
            Role::Member => 0,
            Role::Moderator => 50,
            Role::Admin => 100,
        }
    }
}

impl RoomPermission {
    /// The referenced user's namespace.
    pub fn user_namespace(&self) -> &str {
        self.spec
            .user_ref
            .namespace
            .as_deref()
            .or(self.metadata.namespace.as_deref())
            .unwrap_or_default()
    }

    /// Whether the referenced user lives in another namespace (then a grant
    /// there must admit this one).
    pub fn crosses_namespaces(&self) -> bool {
        self.user_namespace() != self.metadata.namespace.as_deref().unwrap_or_default()
    }
}

impl RoomPermissionSpec {
    /// The power level this permission asks for.
    pub fn desired_power_level(&self) -> i64 {
        self.power_level
            .or(self.role.map(Role::power_level))
            .unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Membership {
    #[default]
    Join,
    Invite,
    Ban,
}

/// Observed state of a `RoomPermission`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomPermissionStatus {
    /// The power level the user holds in the room because of this permission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_power_level: Option<i64>,
    /// Conditions keyed by type: `Ready` (applied to the room, or why not),
    /// `Reconciling` (waiting for the room or the user) and `Stalled`
    /// (refused until changed, e.g. `Duplicate`).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted upon (0: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_power_level_wins_over_default() {
        let spec = RoomPermissionSpec {
            room_ref: LocalRef { name: "r".into() },
            user_ref: UserRef {
                name: "u".into(),
                namespace: None,
            },
            role: None,
            power_level: Some(42),
            membership: Membership::Join,
        };
        assert_eq!(spec.desired_power_level(), 42);
        let spec = RoomPermissionSpec {
            power_level: None,
            role: Some(Role::Moderator),
            ..spec
        };
        assert_eq!(spec.desired_power_level(), 50);
        let spec = RoomPermissionSpec { role: None, ..spec };
        assert_eq!(spec.desired_power_level(), 0);
    }
}
