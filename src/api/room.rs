//! `MatrixRoom`: a room for an OpenMeet event, group or direct conversation.

use super::conditions::Condition;
use super::PLAIN_TEXT_PATTERN;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Matrix room the operator creates, keeps converged and eventually closes.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "matrix.openmeet.net",
    version = "v1alpha1",
    kind = "MatrixRoom",
    plural = "matrixrooms",
    singular = "matrixroom",
    shortname = "mxroom",
    category = "matrix",
    namespaced,
    status = "MatrixRoomStatus",
    doc = "A Matrix room for an OpenMeet event, group or direct conversation.",
    printcolumn = r#"{"name":"Room ID","type":"string","jsonPath":".status.roomId"}"#,
    printcolumn = r#"{"name":"Alias","type":"string","jsonPath":".status.canonicalAlias"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.joinedMembers"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Type","type":"string","priority":1,"jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Parent","type":"string","priority":1,"jsonPath":".spec.parentRef.name"}"#,
    printcolumn = r#"{"name":"Source","type":"string","priority":1,"jsonPath":".spec.source.kind"}"#,
    printcolumn = r#"{"name":"Slug","type":"string","priority":1,"jsonPath":".spec.source.slug"}"#,
    printcolumn = r#"{"name":"Join","type":"string","priority":1,"jsonPath":".spec.joinRule"}"#,
    printcolumn = r#"{"name":"Membership","type":"string","priority":1,"jsonPath":".spec.membershipPolicy"}"#,
    printcolumn = r#"{"name":"Deletion","type":"string","priority":1,"jsonPath":".spec.deletionPolicy"}"#
)]
#[x_kube(validation = Rule::new("!(has(oldSelf.encrypted) ? oldSelf.encrypted : (has(oldSelf.source) && oldSelf.source.kind == 'Direct')) || (has(self.encrypted) ? self.encrypted : (has(self.source) && self.source.kind == 'Direct'))").message("encryption cannot be turned off once enabled"))]
#[x_kube(validation = Rule::new("has(self.type) == has(oldSelf.type) && (!has(self.type) || self.type == oldSelf.type)").message("type is immutable"))]
#[x_kube(validation = Rule::new("!has(self.joinRule) || self.joinRule != 'restricted' || has(self.parentRef)").message("joinRule restricted admits the parent space's members: it needs parentRef"))]
#[x_kube(validation = Rule::new("!has(self.type) || !has(self.source) || self.source.kind != 'Direct'").message("a Direct room cannot be a space"))]
#[serde(rename_all = "camelCase")]
pub struct MatrixRoomSpec {
    /// Local part of the room's canonical alias, mapped into the operator's
    /// alias namespace. Immutable.
    #[schemars(
        regex(pattern = r"^[a-z0-9][a-z0-9._=-]*$"),
        length(min = 1, max = 128)
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("alias is immutable"))]
    pub alias: String,

    /// Room name. No control characters and no bidirectional overrides or isolates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PLAIN_TEXT_PATTERN), length(min = 1, max = 255))]
    pub name: Option<String>,

    /// Room topic. No control characters (newlines included) and no
    /// bidirectional overrides or isolates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PLAIN_TEXT_PATTERN), length(max = 4096))]
    pub topic: Option<String>,

    /// Room avatar as an `mxc://` content URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^mxc://[A-Za-z0-9.:_-]+/[A-Za-z0-9_-]+$"),
        length(max = 512)
    )]
    pub avatar_url: Option<String>,

    /// The platform object this room belongs to. `Direct` rooms have
    /// exactly two members (two `RoomPermission`s), are created with
    /// `is_direct`, are listed in both users' `m.direct`, and are encrypted
    /// unless `encrypted` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RoomSource>,

    /// `Space` makes this room a Matrix space (`m.space`) that other rooms
    /// name as their parent; absent, an ordinary room. Immutable.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub room_type: Option<RoomType>,

    /// The space this room belongs to: a `MatrixRoom` of type `Space` in
    /// this namespace (a reference never crosses namespaces: there is no
    /// namespace field). The operator keeps `m.space.child` in the space and
    /// a canonical `m.space.parent` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_ref: Option<ParentRef>,

    /// Who may join: `invite` (default; only invited users), `public`
    /// (anyone who can find the room), `knock` (anyone may ask to join),
    /// `restricted` (members of the parent space; needs `parentRef` and room
    /// version 8 or later).
    #[serde(default)]
    pub join_rule: JoinRule,

    /// Who may read the room's history: `shared` (default; all members,
    /// including messages from before they joined), `invited` (members,
    /// from their invite on), `joined` (members, from their join on),
    /// `world_readable` (anyone, members or not).
    #[serde(default)]
    pub history_visibility: HistoryVisibility,

    /// Whether guest accounts may join (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_access: bool,

    /// End-to-end encryption. One way: it can be turned on, never off.
    /// Unset, it is on for `Direct` rooms and off for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,

    /// Publish the room in the server's room directory (default false);
    /// the `Published` condition says whether Synapse listed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_to_directory: bool,

    /// Power levels needed for the room's actions. Unset thresholds keep
    /// the operator's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<RoomThresholds>,

    /// `Exclusive` (default): only users with a `RoomPermission` stay in the
    /// room; anyone else is removed. `Additive`: undeclared members are never
    /// removed.
    #[serde(default)]
    pub membership_policy: MembershipPolicy,

    /// What deleting this object does to the room: `Close` (default;
    /// members are removed, the alias dropped and the operator leaves),
    /// `Purge` (Synapse deletes the room and purges its history), `Retain`
    /// (the room is left as it is).
    #[serde(default)]
    pub deletion_policy: RoomDeletionPolicy,
}

/// The platform object a room serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomSource {
    /// What the room serves: `Event` (an OpenMeet event), `Group` (an
    /// OpenMeet group) or `Direct` (a direct conversation).
    pub kind: SourceKind,
    /// The platform's slug of the event, group or conversation.
    #[schemars(length(min = 1, max = 255))]
    pub slug: String,
}

/// What kind of room this is: `Space`, a Matrix space (`m.space`) other
/// rooms name as their parent; absent, an ordinary room. Immutable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RoomType {
    /// A Matrix space (`creation_content.type: m.space`).
    Space,
}

/// The parent space of a room, and how the room is listed in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Name of a `MatrixRoom` of type `Space` in this namespace.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
    /// `order` of the room in the space (`m.space.child`): printable ASCII,
    /// compared lexicographically by clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[\x{20}-\x{7E}]+$"), length(min = 1, max = 50))]
    pub order: Option<String>,
    /// Whether clients suggest the room to the space's members.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suggested: bool,
}

impl MatrixRoomSpec {
    /// Whether this room is a space.
    pub fn is_space(&self) -> bool {
        self.room_type == Some(RoomType::Space)
    }

    /// Whether this is a direct conversation.
    pub fn is_direct(&self) -> bool {
        self.source.as_ref().map(|s| s.kind) == Some(SourceKind::Direct)
    }

    /// Encryption as it applies: the spec's, else on for direct rooms.
    pub fn encryption(&self) -> bool {
        self.encrypted.unwrap_or_else(|| self.is_direct())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SourceKind {
    Event,
    Group,
    Direct,
}

/// `m.room.join_rules`, as Matrix spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JoinRule {
    #[default]
    Invite,
    Public,
    Knock,
    /// Members of the parent space may join (`m.room_membership` allow rule).
    Restricted,
}

/// `m.room.history_visibility`, as Matrix spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HistoryVisibility {
    #[default]
    Shared,
    Invited,
    Joined,
    WorldReadable,
}

/// Power levels needed for each action (0–100).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoomThresholds {
    /// Power level needed to send messages (Matrix `events_default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub send_messages: Option<i64>,
    /// Power level needed to invite users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub invite: Option<i64>,
    /// Power level needed to remove (kick) members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub kick: Option<i64>,
    /// Power level needed to ban users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub ban: Option<i64>,
    /// Power level needed to redact other users' messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub redact: Option<i64>,
    /// Power level needed to change the room's settings (name, topic,
    /// avatar, join rules and other state; Matrix `state_default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub change_settings: Option<i64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MembershipPolicy {
    /// Only declared users stay joined.
    #[default]
    Exclusive,
    /// Undeclared members are never removed.
    Additive,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RoomDeletionPolicy {
    /// Leave the room as it is.
    Retain,
    /// Remove members, drop the alias, and leave.
    #[default]
    Close,
    /// Delete the room in Synapse and purge its history.
    Purge,
}

/// Observed state of a `MatrixRoom`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixRoomStatus {
    /// The Matrix room id (`!…:<server>`), once the room exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    /// The room's full canonical alias (`#<prefix><alias>:<server>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_alias: Option<String>,
    /// Members joined in Synapse at the last convergence, the operator's
    /// account included: the room state read then, changed by the
    /// joins, kicks and bans Synapse confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_members: Option<i64>,
    /// Conditions keyed by type: `Ready` (converged, or why not),
    /// `Reconciling` (work in progress), `Stalled` (waits for a spec change,
    /// e.g. `AliasConflict`) and `Published` (directory listing).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted upon (0: not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the last convergence confirmed in Synapse, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<super::Confirmed>,
}
