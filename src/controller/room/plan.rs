//! Pure planning for `MatrixRoom` and the `RoomPermission`s folded into it:
//! desired room + observed state → the writes that converge it.

use crate::api::permission::Membership;
use crate::api::room::{HistoryVisibility, JoinRule, MembershipPolicy, RoomThresholds};
use crate::synapse::rooms::RoomState;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// State event type of the ownership marker.
pub const MARKER_TYPE: &str = "net.openmeet.owner";
/// A space's child (state key: the child's room id).
pub const SPACE_CHILD: &str = "m.space.child";
/// A room's parent space (state key: the space's room id).
pub const SPACE_PARENT: &str = "m.space.parent";
/// The first room version with the `restricted` join rule.
const RESTRICTED_SINCE: u32 = 8;
/// The first room version whose creators hold unlimited power.
const CREATORS_SINCE: u32 = 12;
/// What ownership state requires where the operator is a creator: above the
/// highest level a member can be given (100), so only a creator reaches it.
pub const OWNERSHIP_LEVEL: i64 = 150;
/// State that makes a room the operator's, or whose misuse abandons or
/// breaks it: only the operator may send it.
pub const OWNERSHIP_STATE: [&str; 7] = [
    MARKER_TYPE,
    "m.room.power_levels",
    // Cannot be withdrawn once sent (Synapse requires a replacement room):
    // only prevented.
    "m.room.tombstone",
    "m.room.server_acl",
    "m.room.encryption",
    SPACE_PARENT,
    SPACE_CHILD,
];
const ENCRYPTION_ALGORITHM: &str = "m.megolm.v1.aes-sha2";
const CANONICAL_ALIAS: &str = "m.room.canonical_alias";
/// Where clients look for service members: Element's convention, and its
/// proposed standard form (MSC4171).
pub const SERVICE_MEMBER_STATE: [&str; 2] = ["io.element.functional_members", "m.member_hints"];

/// Power levels from the spec's thresholds (Matrix defaults where unset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub send_messages: i64,
    pub invite: i64,
    pub kick: i64,
    pub ban: i64,
    pub redact: i64,
    pub change_settings: i64,
}

impl From<Option<&RoomThresholds>> for Thresholds {
    fn from(t: Option<&RoomThresholds>) -> Self {
        let t = t.cloned().unwrap_or_default();
        Thresholds {
            send_messages: t.send_messages.unwrap_or(0),
            invite: t.invite.unwrap_or(0),
            kick: t.kick.unwrap_or(50),
            ban: t.ban.unwrap_or(50),
            redact: t.redact.unwrap_or(50),
            change_settings: t.change_settings.unwrap_or(50),
        }
    }
}

/// Everything the room should be, already resolved to Matrix ids.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredRoom {
    /// The alias local part inside the operator's namespace (`<prefix><alias>`).
    pub alias_localpart: String,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub avatar_url: Option<String>,
    pub join_rule: JoinRule,
    pub history_visibility: HistoryVisibility,
    pub guest_access: bool,
    pub encrypted: bool,
    /// `{namespace, name, uid}` of the object.
    pub marker: Value,
    pub thresholds: Thresholds,
    /// Declared members: user id → membership and power level.
    pub members: BTreeMap<String, (Membership, i64)>,
    pub membership_policy: MembershipPolicy,
    /// Accounts named by a refused cross-namespace reference: removed even
    /// from an `Additive` room.
    pub revoked: BTreeSet<String>,
    /// The operator's admin account.
    pub admin: String,
    /// `:<server_name>`, to tell local users from remote ones.
    pub server_suffix: String,
    /// The version a new room is created with.
    pub room_version: String,
    /// Created as a space (`m.space`).
    pub space: bool,
    /// A direct conversation: created with `is_direct` and its members invited.
    pub direct: bool,
    /// The parent space's room id (`m.space.parent` here; the allow rule of
    /// a `restricted` join rule).
    pub parent: Option<String>,
    /// For a space: every child's room id and how it is listed. `None` for
    /// an ordinary room, whose `m.space.child` events are not managed.
    pub children: Option<BTreeMap<String, ChildLink>>,
}

/// How a child is listed in its space (`m.space.child` content).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChildLink {
    pub order: Option<String>,
    pub suggested: bool,
}

/// One Synapse write.
#[derive(Clone, Debug, PartialEq)]
pub enum RoomAction {
    /// Restore the admin account's top power level (adopted older rooms).
    MakeRoomAdmin,
    SetState {
        kind: String,
        content: Value,
    },
    SetPowerLevels(Value),
    /// A keyed relation (`m.space.child`, `m.space.parent`); empty content
    /// removes it.
    SetRelation {
        kind: &'static str,
        state_key: String,
        content: Value,
    },
    Unban(String),
    Join(String),
    Invite(String),
    /// Invite to a direct conversation: the invite carries `is_direct`.
    InviteDirect(String),
    /// A direct room's member joins from their `is_direct` invite as
    /// themselves (an admin join would invite them again, without it).
    JoinAsMember(String),
    Kick(String),
    Ban(String),
}

impl RoomAction {
    pub fn describe(&self) -> String {
        match self {
            RoomAction::MakeRoomAdmin => "restore operator power".into(),
            RoomAction::SetState { kind, .. } => format!("set {kind}"),
            RoomAction::SetPowerLevels(_) => "set m.room.power_levels".into(),
            RoomAction::SetRelation {
                kind,
                state_key,
                content,
            } if is_empty(Some(content)) => format!("remove {kind} {state_key}"),
            RoomAction::SetRelation {
                kind, state_key, ..
            } => format!("set {kind} {state_key}"),
            RoomAction::Unban(u) => format!("unban {u}"),
            RoomAction::Join(u) => format!("join {u}"),
            RoomAction::Invite(u) => format!("invite {u}"),
            RoomAction::InviteDirect(u) => format!("invite {u} to a direct conversation"),
            RoomAction::JoinAsMember(u) => format!("join {u} from their invite"),
            RoomAction::Kick(u) => format!("kick {u}"),
            RoomAction::Ban(u) => format!("ban {u}"),
        }
    }
}

fn join_rule(r: JoinRule) -> &'static str {
    match r {
        JoinRule::Invite => "invite",
        JoinRule::Public => "public",
        JoinRule::Knock => "knock",
        JoinRule::Restricted => "restricted",
    }
}

/// `m.room.join_rules` content; a restricted room admits the parent's members.
fn join_rules(d: &DesiredRoom) -> Value {
    match (d.join_rule, &d.parent) {
        (JoinRule::Restricted, Some(parent)) => json!({
            "join_rule": "restricted",
            "allow": [{"type": "m.room_membership", "room_id": parent}],
        }),
        // No parent to admit through (it is gone): invite only until one returns.
        (JoinRule::Restricted, None) => json!({"join_rule": "invite"}),
        (rule, _) => json!({"join_rule": join_rule(rule)}),
    }
}

/// The server part of the operator's ids, for `via`.
fn server(d: &DesiredRoom) -> &str {
    d.server_suffix.trim_start_matches(':')
}

/// Whether relation content is empty (the relation is removed).
fn is_empty(content: Option<&Value>) -> bool {
    content.is_none_or(|c| c.as_object().is_none_or(Map::is_empty))
}

/// The keyed relations this room should hold: `m.space.parent` for its
/// parent, `m.space.child` for each child of a space.
fn desired_relations(d: &DesiredRoom) -> Vec<(&'static str, String, Value)> {
    let via = json!([server(d)]);
    let mut out = Vec::new();
    if let Some(parent) = &d.parent {
        out.push((
            SPACE_PARENT,
            parent.clone(),
            json!({"via": via, "canonical": true}),
        ));
    }
    for (child, link) in d.children.iter().flatten() {
        let mut content = json!({"via": via});
        if let Some(order) = &link.order {
            content["order"] = json!(order);
        }
        if link.suggested {
            content["suggested"] = json!(true);
        }
        out.push((SPACE_CHILD, child.clone(), content));
    }
    out
}

/// Writes for the relations: each desired one that differs, and an empty
/// content for each present one that is no longer desired. A room's
/// `m.space.parent` events are always managed (this room names at most one
/// parent); `m.space.child` events only in a space.
fn plan_relations(d: &DesiredRoom, state: &RoomState) -> Vec<RoomAction> {
    let desired = desired_relations(d);
    let mut actions = Vec::new();
    for ((kind, key), content) in &state.events {
        let managed = kind == SPACE_PARENT || (kind == SPACE_CHILD && d.children.is_some());
        if !managed || is_empty(Some(content)) {
            continue;
        }
        if !desired.iter().any(|(k, sk, _)| k == kind && sk == key) {
            let kind = if kind == SPACE_PARENT {
                SPACE_PARENT
            } else {
                SPACE_CHILD
            };
            actions.push(RoomAction::SetRelation {
                kind,
                state_key: key.clone(),
                content: json!({}),
            });
        }
    }
    for (kind, state_key, content) in desired {
        if state.get(kind, &state_key) != Some(&content) {
            actions.push(RoomAction::SetRelation {
                kind,
                state_key,
                content,
            });
        }
    }
    actions
}

/// Why an existing room cannot take the spec: each is refused before any
/// write, so nothing is half-applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// Checks an existing (possibly adopted) room against what no write can
/// change: its type, and a room version too old for the join rule.
pub fn refusal(d: &DesiredRoom, state: &RoomState) -> Option<Refusal> {
    let create = state.get("m.room.create", "");
    let is_space = create.and_then(|c| c.get("type")).and_then(Value::as_str) == Some("m.space");
    if is_space != d.space {
        return Some(Refusal {
            reason: "RoomTypeMismatch",
            message: if d.space {
                "the room under this alias is not a space, and a room's type never changes".into()
            } else {
                "the room under this alias is a space, and a room's type never changes".into()
            },
        });
    }
    if d.join_rule == JoinRule::Restricted {
        let version = create
            .and_then(|c| c.get("room_version"))
            .and_then(Value::as_str)
            .unwrap_or("1");
        if version
            .parse::<u32>()
            .map_or(true, |v| v < RESTRICTED_SINCE)
        {
            return Some(Refusal {
                reason: "RoomVersionUnsupported",
                message: format!(
                    "room version {version} has no restricted join rule (needs {RESTRICTED_SINCE} or later); nothing was changed"
                ),
            });
        }
    }
    None
}

fn history(h: HistoryVisibility) -> &'static str {
    match h {
        HistoryVisibility::Shared => "shared",
        HistoryVisibility::Invited => "invited",
        HistoryVisibility::Joined => "joined",
        HistoryVisibility::WorldReadable => "world_readable",
    }
}

/// The state events the spec manages, as (type, content). Absent name,
/// topic and avatar are managed as "empty".
fn desired_state(d: &DesiredRoom) -> Vec<(&'static str, Value)> {
    let mut state = vec![
        (
            "m.room.name",
            json!({"name": d.name.clone().unwrap_or_default()}),
        ),
        (
            "m.room.topic",
            json!({"topic": d.topic.clone().unwrap_or_default()}),
        ),
        ("m.room.join_rules", join_rules(d)),
        (
            "m.room.history_visibility",
            json!({"history_visibility": history(d.history_visibility)}),
        ),
        (
            "m.room.guest_access",
            json!({"guest_access": if d.guest_access { "can_join" } else { "forbidden" }}),
        ),
        (MARKER_TYPE, d.marker.clone()),
    ];
    if let Some(url) = &d.avatar_url {
        state.push(("m.room.avatar", json!({"url": url})));
    }
    if d.encrypted {
        state.push((
            "m.room.encryption",
            json!({"algorithm": ENCRYPTION_ALGORITHM}),
        ));
    }
    if d.direct {
        // Named after the other person: no alias for clients to show (the
        // alias stays bound, as the creation lock, but unpublished), and the
        // operator's account marked as a service member, which clients leave
        // out of the room's name, avatar and DM detection.
        state.push((CANONICAL_ALIAS, json!({})));
        let service = json!({"service_members": [d.admin]});
        for kind in SERVICE_MEMBER_STATE {
            state.push((kind, service.clone()));
        }
    }
    state
}

/// Whether a room version gives its creators unlimited power.
fn creators_rule(version: &str) -> bool {
    version.parse::<u32>().is_ok_and(|v| v >= CREATORS_SINCE)
}

/// Whether the admin account is a creator with unlimited power (room version
/// 12 and later), in which case it must never appear in `users`. Checked
/// against the room's actual create event, never assumed.
pub fn admin_is_creator(d: &DesiredRoom, state: Option<&RoomState>) -> bool {
    let admin = d.admin.as_str();
    let Some(create) = state.and_then(|s| s.get("m.room.create", "")) else {
        // A room we are about to create, with the version we pin.
        return creators_rule(&d.room_version);
    };
    let version = create
        .get("room_version")
        .and_then(Value::as_str)
        .unwrap_or("1");
    let modern = creators_rule(version);
    let created_by_admin = state.and_then(|s| s.creator.as_deref()) == Some(admin);
    let additional = create
        .get("additional_creators")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|c| c.as_str() == Some(admin)));
    modern && (created_by_admin || additional)
}

/// The full power-levels content: unmanaged keys of the observed content are
/// kept, managed ones set from the spec and the folded permissions.
pub fn power_levels(d: &DesiredRoom, observed: Option<&Value>, admin_creator: bool) -> Value {
    let mut content: Map<String, Value> = observed
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let t = &d.thresholds;
    let mut users = Map::new();
    for (user, (membership, level)) in &d.members {
        if *membership != Membership::Ban && *level != 0 {
            users.insert(user.clone(), json!(level));
        }
    }
    if !admin_creator {
        users.insert(d.admin.clone(), json!(100));
    }
    content.insert("users".into(), Value::Object(users));
    content.insert("users_default".into(), json!(0));
    content.insert("events_default".into(), json!(t.send_messages));
    content.insert("state_default".into(), json!(t.change_settings));
    content.insert("invite".into(), json!(t.invite));
    content.insert("kick".into(), json!(t.kick));
    content.insert("ban".into(), json!(t.ban));
    content.insert("redact".into(), json!(t.redact));
    let mut events = content
        .get("events")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for kind in [
        "m.room.name",
        "m.room.topic",
        "m.room.avatar",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.guest_access",
        "m.room.canonical_alias",
    ] {
        events.insert(kind.into(), json!(t.change_settings));
    }
    // Where the operator is a creator, ownership state needs more than any
    // member has; in older rooms its level is 100, shared with room admins.
    let ownership = if admin_creator { OWNERSHIP_LEVEL } else { 100 };
    for kind in OWNERSHIP_STATE {
        events.insert(kind.into(), json!(ownership));
    }
    content.insert("events".into(), Value::Object(events));
    Value::Object(content)
}

/// The body of the one `createRoom` call: alias as the lock, full initial state.
pub fn create_body(d: &DesiredRoom) -> Value {
    let initial_state: Vec<Value> = desired_state(d)
        .into_iter()
        .filter(|(kind, _)| *kind != "m.room.name" && *kind != "m.room.topic")
        .map(|(kind, content)| json!({"type": kind, "state_key": "", "content": content}))
        .collect();
    let initial_state: Vec<Value> = initial_state
        .into_iter()
        .chain(desired_relations(d).into_iter().map(
            |(kind, key, content)| json!({"type": kind, "state_key": key, "content": content}),
        ))
        .collect();
    let mut body = json!({
        "room_alias_name": d.alias_localpart,
        "room_version": d.room_version,
        "visibility": "private",
        "preset": if d.join_rule == JoinRule::Public { "public_chat" } else { "private_chat" },
        "initial_state": initial_state,
        "power_level_content_override": power_levels(d, None, admin_is_creator(d, None)),
    });
    if d.space {
        body["creation_content"] = json!({"type": "m.space"});
    }
    if d.direct {
        // The Matrix DM convention: the invites carry `is_direct`; the
        // members are then joined like any other declared member.
        let invite: Vec<&String> = d
            .members
            .iter()
            .filter(|(_, (m, _))| *m != Membership::Ban)
            .map(|(u, _)| u)
            .collect();
        body["is_direct"] = json!(true);
        body["invite"] = json!(invite);
    }
    if let Some(name) = &d.name {
        body["name"] = json!(name);
    }
    if let Some(topic) = &d.topic {
        body["topic"] = json!(topic);
    }
    body
}

/// Whose room the observed marker says this is.
pub fn marker_matches(state: &RoomState, marker: &Value) -> bool {
    state.get(MARKER_TYPE, "") == Some(marker)
}

/// A room the operator's own account began that carries no marker at all
/// and nobody else in it: a `createRoom` cut short (Synapse stopped between
/// the create event and the initial state that carries the marker). Only
/// the operator can bind a managed alias (its namespace is exclusive), so
/// such a room under the object's alias is its own unfinished one: completed,
/// never left blocking the alias. A room anyone else is part of is never
/// taken this way.
pub fn unfinished_by(state: &RoomState, admin: &str) -> bool {
    state.get(MARKER_TYPE, "").is_none()
        && state.creator.as_deref() == Some(admin)
        && state.memberships().keys().all(|user| user == admin)
}

fn state_matches(observed: Option<&Value>, desired: &Value) -> bool {
    let Some(observed) = observed else {
        // An absent name/topic equals an empty one.
        return desired
            .as_object()
            .is_some_and(|o| o.values().all(|v| v.as_str() == Some("")));
    };
    match (observed.as_object(), desired.as_object()) {
        // Empty content (no canonical alias) is matched only by empty content.
        (Some(o), Some(d)) if d.is_empty() => o.is_empty(),
        (Some(o), Some(d)) => d
            .iter()
            .all(|(k, v)| o.get(k) == Some(v) || (v.as_str() == Some("") && o.get(k).is_none())),
        _ => observed == desired,
    }
}

/// The outcome of planning an existing room.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomPlan {
    pub actions: Vec<RoomAction>,
}

/// Plans the writes for an existing room: removals first (kicks and bans
/// never wait behind a refused settings write), then state, at most one
/// power-levels event, then additions.
pub fn plan(d: &DesiredRoom, state: &RoomState) -> RoomPlan {
    plan_with(d, state, None)
}

/// [`plan`], keeping undeclared members who may be there through the parent
/// space (`members_of_parent`: its joined members, read only for a
/// restricted room with someone to remove).
pub fn plan_with(
    d: &DesiredRoom,
    state: &RoomState,
    members_of_parent: Option<&BTreeSet<String>>,
) -> RoomPlan {
    let mut actions = Vec::new();
    let admin_creator = admin_is_creator(d, Some(state));
    let observed_pl = state.get("m.room.power_levels", "");
    let admin_level = observed_pl
        .and_then(|pl| pl.get("users"))
        .and_then(|u| u.get(&d.admin))
        .and_then(Value::as_i64);
    if !admin_creator && admin_level.unwrap_or(0) < 100 {
        actions.push(RoomAction::MakeRoomAdmin);
    }
    let (removals, additions) = plan_members(d, state, members_of_parent);
    actions.extend(removals);

    for (kind, content) in desired_state(d) {
        if !state_matches(state.get(kind, ""), &content) {
            actions.push(RoomAction::SetState {
                kind: kind.to_string(),
                content,
            });
        }
    }
    actions.extend(plan_relations(d, state));
    let wanted_pl = power_levels(d, observed_pl, admin_creator);
    if observed_pl != Some(&wanted_pl) {
        actions.push(RoomAction::SetPowerLevels(wanted_pl));
    }
    actions.extend(additions);
    RoomPlan { actions }
}

/// Membership writes, as (removals, additions): kicks and bans, then
/// unbans, joins and invites.
fn plan_members(
    d: &DesiredRoom,
    state: &RoomState,
    members_of_parent: Option<&BTreeSet<String>>,
) -> (Vec<RoomAction>, Vec<RoomAction>) {
    let (mut removals, mut additions) = (Vec::new(), Vec::new());
    let observed = state.memberships();
    for (user, (membership, _)) in &d.members {
        let current = observed.get(user).map(String::as_str).unwrap_or("leave");
        if current == "ban" && *membership != Membership::Ban {
            additions.push(RoomAction::Unban(user.clone()));
        }
        match (membership, current) {
            (Membership::Join, "join")
            | (Membership::Invite, "join" | "invite")
            | (Membership::Ban, "ban") => {}
            (Membership::Ban, _) => removals.push(RoomAction::Ban(user.clone())),
            (Membership::Join, _) if d.direct => {
                if !(current == "invite" && invited_as_direct(state, user)) {
                    additions.push(RoomAction::InviteDirect(user.clone()));
                }
                additions.push(RoomAction::JoinAsMember(user.clone()));
            }
            (Membership::Join, _) => additions.push(RoomAction::Join(user.clone())),
            (Membership::Invite, _) if d.direct => {
                additions.push(RoomAction::InviteDirect(user.clone()))
            }
            (Membership::Invite, _) => additions.push(RoomAction::Invite(user.clone())),
        }
    }
    for (user, membership) in &observed {
        // Additive rooms keep undeclared members, but not revoked ones.
        let removable =
            d.membership_policy == MembershipPolicy::Exclusive || d.revoked.contains(user);
        let undeclared =
            !d.members.contains_key(user) && *user != d.admin && user.ends_with(&d.server_suffix);
        let via_parent = membership == "join"
            && d.join_rule == JoinRule::Restricted
            && members_of_parent.is_some_and(|m| m.contains(user));
        if removable
            && undeclared
            && !via_parent
            && (membership == "join" || membership == "invite")
        {
            removals.push(RoomAction::Kick(user.clone()));
        }
    }
    (removals, additions)
}

/// Whether the user's pending invite carries `is_direct`.
fn invited_as_direct(state: &RoomState, user: &str) -> bool {
    state
        .get("m.room.member", user)
        .and_then(|m| m.get("is_direct"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// What a room held back may still do: remove members (kicks and bans).
/// Nothing is added and no setting changes until the hold is lifted.
pub fn removals_only(plan: RoomPlan) -> RoomPlan {
    RoomPlan {
        actions: plan
            .actions
            .into_iter()
            .filter(|a| matches!(a, RoomAction::Kick(_) | RoomAction::Ban(_)))
            .collect(),
    }
}

/// The space a restricted room's observed join rule admits members of: who
/// may be there through a parent, while the desired parent is unknown.
pub fn admitting_space(state: &RoomState) -> Option<String> {
    state
        .get("m.room.join_rules", "")?
        .get("allow")?
        .as_array()?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("m.room_membership"))?
        .get("room_id")?
        .as_str()
        .map(str::to_string)
}

/// The writes that close a room: every local member but the admin removed.
/// Dropping the alias and leaving follow in the shell.
pub fn plan_close(d: &DesiredRoom, state: &RoomState) -> Vec<RoomAction> {
    // A closed room leaves its space: no parent (and, for a space, no children).
    let unlinked = DesiredRoom {
        parent: None,
        children: d.children.as_ref().map(|_| BTreeMap::new()),
        ..d.clone()
    };
    plan_relations(&unlinked, state)
        .into_iter()
        .chain(
            state
                .memberships()
                .into_iter()
                .filter(|(user, m)| {
                    *user != d.admin
                        && user.ends_with(&d.server_suffix)
                        && (m == "join" || m == "invite")
                })
                .map(|(user, _)| RoomAction::Kick(user)),
        )
        .collect()
}

/// Whether a plan removes anyone (then a restricted room checks who may be
/// there through its parent space).
pub fn removes_members(plan: &RoomPlan) -> bool {
    plan.actions
        .iter()
        .any(|a| matches!(a, RoomAction::Kick(_)))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::synapse::rooms::StateEvent;

    pub(in crate::controller::room) const ADMIN: &str = "@openmeet-admin:x";

    /// A meetup room with two joined members (Alice an admin), the fixture
    /// other planners' tests start from too.
    pub(in crate::controller::room) fn desired() -> DesiredRoom {
        DesiredRoom {
            alias_localpart: "openmeet-meetup".into(),
            name: Some("Meetup".into()),
            topic: None,
            avatar_url: None,
            join_rule: JoinRule::Invite,
            history_visibility: HistoryVisibility::Shared,
            guest_access: false,
            encrypted: false,
            marker: json!({"namespace": "t", "name": "meetup", "uid": "u-1"}),
            thresholds: Thresholds::from(None),
            members: BTreeMap::from([
                ("@alice:x".to_string(), (Membership::Join, 100)),
                ("@bob:x".to_string(), (Membership::Join, 0)),
            ]),
            membership_policy: MembershipPolicy::Exclusive,
            revoked: BTreeSet::new(),
            admin: ADMIN.into(),
            server_suffix: ":x".into(),
            room_version: "12".into(),
            space: false,
            direct: false,
            parent: None,
            children: None,
        }
    }

    /// The state Synapse would hold once `d` has fully converged (room v12,
    /// created by the admin).
    fn converged(d: &DesiredRoom) -> RoomState {
        let mut create = json!({"room_version": "12"});
        if d.space {
            create["type"] = json!("m.space");
        }
        let mut events = vec![StateEvent {
            kind: "m.room.create".into(),
            state_key: String::new(),
            sender: ADMIN.into(),
            content: create,
        }];
        for (kind, content) in desired_state(d) {
            events.push(StateEvent {
                kind: kind.into(),
                state_key: String::new(),
                sender: ADMIN.into(),
                content,
            });
        }
        for (kind, state_key, content) in desired_relations(d) {
            events.push(StateEvent {
                kind: kind.into(),
                state_key,
                sender: ADMIN.into(),
                content,
            });
        }
        events.push(StateEvent {
            kind: "m.room.power_levels".into(),
            state_key: String::new(),
            sender: ADMIN.into(),
            content: power_levels(d, None, true),
        });
        for user in std::iter::once(ADMIN.to_string()).chain(d.members.keys().cloned()) {
            events.push(StateEvent {
                kind: "m.room.member".into(),
                state_key: user.clone(),
                sender: user,
                content: json!({"membership": "join"}),
            });
        }
        RoomState::from_events(events)
    }

    fn set_member(state: &mut RoomState, user: &str, membership: &str) {
        state.events.insert(
            ("m.room.member".into(), user.into()),
            json!({"membership": membership}),
        );
    }

    #[test]
    fn converged_room_plans_nothing() {
        let d = desired();
        let plan = plan(&d, &converged(&d));
        assert_eq!(plan.actions, vec![]);
    }

    #[test]
    fn create_body_carries_alias_state_marker_and_power() {
        let body = create_body(&desired());
        assert_eq!(body["room_alias_name"], "openmeet-meetup");
        assert_eq!(body["name"], "Meetup");
        let types: Vec<&str> = body["initial_state"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert!(types.contains(&MARKER_TYPE) && types.contains(&"m.room.join_rules"));
        let users = &body["power_level_content_override"]["users"];
        assert_eq!(users["@alice:x"], 100);
        assert!(users.get("@bob:x").is_none(), "level 0 is the default");
        assert!(
            users.get(ADMIN).is_none(),
            "a creator is never listed in room version 12"
        );
    }

    #[test]
    fn power_level_drift_is_one_write_of_the_whole_content() {
        let d = desired();
        let mut state = converged(&d);
        let mut pl = state.get("m.room.power_levels", "").unwrap().clone();
        pl["users"]["@bob:x"] = json!(50);
        pl["notifications"] = json!({"room": 50});
        state
            .events
            .insert(("m.room.power_levels".into(), String::new()), pl);
        let plan = plan(&d, &state);
        let [RoomAction::SetPowerLevels(content)] = plan.actions.as_slice() else {
            panic!("{:?}", plan.actions)
        };
        assert!(content["users"].get("@bob:x").is_none());
        assert_eq!(
            content["notifications"]["room"], 50,
            "unmanaged keys are kept"
        );
    }

    #[test]
    fn many_permissions_fold_into_one_power_levels_write() {
        let mut d = desired();
        let state = converged(&d);
        for i in 0..1000 {
            d.members.insert(
                format!("@u{i}:x"),
                (Membership::Join, if i % 2 == 0 { 50 } else { 0 }),
            );
        }
        let plan = plan(&d, &state);
        let pl_writes = plan
            .actions
            .iter()
            .filter(|a| matches!(a, RoomAction::SetPowerLevels(_)))
            .count();
        let joins = plan
            .actions
            .iter()
            .filter(|a| matches!(a, RoomAction::Join(_)))
            .count();
        assert_eq!((pl_writes, joins), (1, 1000));
    }

    #[test]
    fn renamed_room_is_renamed_back() {
        let d = desired();
        let mut state = converged(&d);
        state.events.insert(
            ("m.room.name".into(), String::new()),
            json!({"name": "Hijacked"}),
        );
        assert_eq!(
            plan(&d, &state).actions,
            vec![RoomAction::SetState {
                kind: "m.room.name".into(),
                content: json!({"name": "Meetup"})
            }]
        );
    }

    #[test]
    fn exclusive_removes_undeclared_local_members_only() {
        let d = desired();
        let mut state = converged(&d);
        set_member(&mut state, "@intruder:x", "join");
        set_member(&mut state, "@invited:x", "invite");
        set_member(&mut state, "@remote:elsewhere", "join");
        set_member(&mut state, "@gone:x", "leave");
        let plan = plan(&d, &state);
        assert_eq!(
            plan.actions,
            vec![
                RoomAction::Kick("@intruder:x".into()),
                RoomAction::Kick("@invited:x".into())
            ]
        );

        let additive = DesiredRoom {
            membership_policy: MembershipPolicy::Additive,
            ..d
        };
        assert_eq!(super::plan(&additive, &state).actions, vec![]);

        // A revoked reference leaves even an Additive room; a remote user
        // or one already gone is nothing to remove.
        let revoked = DesiredRoom {
            revoked: ["@invited:x", "@remote:elsewhere", "@gone:x"]
                .map(String::from)
                .into(),
            ..additive
        };
        assert_eq!(
            super::plan(&revoked, &state).actions,
            vec![RoomAction::Kick("@invited:x".into())]
        );
    }

    #[test]
    fn membership_transitions() {
        let mut d = desired();
        d.members.insert("@banned:x".into(), (Membership::Ban, 0));
        d.members.insert("@guest:x".into(), (Membership::Invite, 0));
        d.members.insert("@back:x".into(), (Membership::Join, 0));
        let mut state = converged(&desired());
        set_member(&mut state, "@banned:x", "join");
        set_member(&mut state, "@back:x", "ban");
        let plan = plan(&d, &state);
        let membership: Vec<_> = plan
            .actions
            .iter()
            .filter(|a| !matches!(a, RoomAction::SetPowerLevels(_)))
            .cloned()
            .collect();
        assert_eq!(
            membership,
            vec![
                // Removals first: they never wait behind another write.
                RoomAction::Ban("@banned:x".into()),
                RoomAction::Unban("@back:x".into()),
                RoomAction::Join("@back:x".into()),
                RoomAction::Invite("@guest:x".into()),
            ]
        );
        // An invited user who joined is fine; a banned one stays banned.
        let mut after = state.clone();
        set_member(&mut after, "@guest:x", "join");
        set_member(&mut after, "@banned:x", "ban");
        set_member(&mut after, "@back:x", "join");
        let again = super::plan(&d, &after);
        assert!(
            again
                .actions
                .iter()
                .all(|a| matches!(a, RoomAction::SetPowerLevels(_))),
            "{:?}",
            again.actions
        );
    }

    #[test]
    fn encryption_and_avatar_are_added() {
        let mut d = desired();
        let state = converged(&d);
        d.encrypted = true;
        d.avatar_url = Some("mxc://x/a".into());
        let kinds: Vec<_> = plan(&d, &state)
            .actions
            .into_iter()
            .filter_map(|a| match a {
                RoomAction::SetState { kind, .. } => Some(kind),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["m.room.avatar", "m.room.encryption"]);
    }

    #[test]
    fn older_room_lists_admin_and_restores_lost_power() {
        let d = desired();
        let mut state = converged(&d);
        state.events.insert(
            ("m.room.create".into(), String::new()),
            json!({"room_version": "10"}),
        );
        state.creator = Some("@someone:x".into());
        let plan = plan(&d, &state);
        assert_eq!(plan.actions[0], RoomAction::MakeRoomAdmin);
        let Some(RoomAction::SetPowerLevels(pl)) = plan
            .actions
            .iter()
            .find(|a| matches!(a, RoomAction::SetPowerLevels(_)))
        else {
            panic!()
        };
        assert_eq!(pl["users"][ADMIN], 100);
    }

    #[test]
    fn thresholds_map_to_power_levels() {
        let mut d = desired();
        d.thresholds = Thresholds::from(Some(&RoomThresholds {
            send_messages: Some(10),
            invite: Some(50),
            kick: Some(60),
            ban: Some(70),
            redact: Some(80),
            change_settings: Some(90),
        }));
        let pl = power_levels(&d, None, true);
        assert_eq!(
            (
                &pl["events_default"],
                &pl["invite"],
                &pl["kick"],
                &pl["ban"],
                &pl["redact"],
                &pl["state_default"]
            ),
            (
                &json!(10),
                &json!(50),
                &json!(60),
                &json!(70),
                &json!(80),
                &json!(90)
            )
        );
        assert_eq!(pl["events"]["m.room.name"], 90);
        assert_eq!(pl["events"]["m.room.power_levels"], OWNERSHIP_LEVEL);
    }

    #[test]
    fn ownership_state_needs_more_than_any_member_has_where_the_operator_is_creator() {
        let d = desired();
        let pl = power_levels(&d, None, true);
        for kind in OWNERSHIP_STATE {
            assert_eq!(pl["events"][kind], OWNERSHIP_LEVEL, "{kind}");
        }
        // Above the highest level a RoomPermission can give (the schema's maximum).
        let crd =
            serde_json::to_value(<crate::api::RoomPermission as kube::CustomResourceExt>::crd())
                .unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["powerLevel"];
        assert!(
            OWNERSHIP_LEVEL as f64 > schema["maximum"].as_f64().unwrap(),
            "{schema}"
        );
        assert!(d
            .members
            .values()
            .all(|(_, level)| *level < OWNERSHIP_LEVEL));
        // In an older room the operator holds 100 itself: nothing above it exists.
        let pl = power_levels(&d, None, false);
        assert_eq!(pl["events"][MARKER_TYPE], 100);
        assert_eq!(pl["users"][ADMIN], 100);
    }

    #[test]
    fn an_existing_room_gets_the_ownership_thresholds_through_power_levels() {
        let d = desired();
        let mut state = converged(&d);
        let mut old = power_levels(&d, None, true);
        for kind in OWNERSHIP_STATE {
            old["events"][kind] = json!(100);
        }
        state
            .events
            .insert(("m.room.power_levels".into(), String::new()), old);
        let actions = plan(&d, &state).actions;
        assert_eq!(actions.len(), 1, "{actions:?}");
        let RoomAction::SetPowerLevels(pl) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(pl["events"][MARKER_TYPE], OWNERSHIP_LEVEL);
        assert_eq!(pl["events"]["m.room.tombstone"], OWNERSHIP_LEVEL);
    }

    #[test]
    fn the_room_version_is_pinned_and_the_creator_assumption_follows_it() {
        let mut d = desired();
        let body = create_body(&d);
        assert_eq!(body["room_version"], "12");
        assert!(body["power_level_content_override"]["users"]
            .get(ADMIN)
            .is_none());
        d.room_version = "11".into();
        let body = create_body(&d);
        assert_eq!(body["room_version"], "11");
        assert_eq!(body["power_level_content_override"]["users"][ADMIN], 100);
        // A version-12 room the operator did not create: it is no creator there.
        let mut state = converged(&desired());
        state.creator = Some("@someone:x".into());
        assert!(!admin_is_creator(&desired(), Some(&state)));
        assert!(admin_is_creator(&desired(), Some(&converged(&desired()))));
    }

    #[test]
    fn a_changed_marker_is_restored() {
        let d = desired();
        let mut state = converged(&d);
        state
            .events
            .insert((MARKER_TYPE.into(), String::new()), json!({}));
        assert_eq!(
            plan(&d, &state).actions,
            vec![RoomAction::SetState {
                kind: MARKER_TYPE.into(),
                content: d.marker.clone()
            }]
        );
    }

    #[test]
    fn kicks_and_bans_come_before_the_power_levels_write() {
        let mut d = desired();
        d.members.remove("@bob:x");
        d.members.insert("@alice:x".into(), (Membership::Ban, 0));
        d.members.insert("@new:x".into(), (Membership::Join, 50));
        let state = converged(&desired());
        let actions = plan(&d, &state).actions;
        let position = |wanted: fn(&RoomAction) -> bool| actions.iter().position(wanted).unwrap();
        let power = position(|a| matches!(a, RoomAction::SetPowerLevels(_)));
        assert!(position(|a| matches!(a, RoomAction::Ban(_))) < power);
        assert!(position(|a| matches!(a, RoomAction::Kick(_))) < power);
        assert!(position(|a| matches!(a, RoomAction::Join(_))) > power);
    }

    #[test]
    fn a_held_room_applies_removals_only() {
        let mut d = desired();
        d.members.remove("@bob:x");
        d.members.insert("@carol:x".into(), (Membership::Ban, 0));
        d.members.insert("@new:x".into(), (Membership::Join, 0));
        d.name = Some("Renamed".into());
        let state = converged(&desired());
        let held = removals_only(plan(&d, &state));
        assert_eq!(
            held.actions,
            vec![
                RoomAction::Ban("@carol:x".into()),
                RoomAction::Kick("@bob:x".into()),
            ]
        );
    }

    #[test]
    fn a_restricted_room_without_a_parent_falls_back_to_invite() {
        let mut d = desired();
        d.join_rule = JoinRule::Restricted;
        d.parent = Some("!space:x".into());
        let state = converged(&d);
        assert_eq!(admitting_space(&state).as_deref(), Some("!space:x"));
        // The parent space is gone: standalone, invite only, no m.space.parent.
        let standalone = DesiredRoom {
            parent: None,
            ..d.clone()
        };
        let actions = plan(&standalone, &state).actions;
        assert!(actions.contains(&RoomAction::SetState {
            kind: "m.room.join_rules".into(),
            content: json!({"join_rule": "invite"}),
        }));
        assert!(actions.contains(&RoomAction::SetRelation {
            kind: SPACE_PARENT,
            state_key: "!space:x".into(),
            content: json!({}),
        }));
        assert_eq!(admitting_space(&converged(&standalone)), None);
    }

    #[test]
    fn close_kicks_local_members_but_not_the_operator() {
        let d = desired();
        let mut state = converged(&d);
        set_member(&mut state, "@remote:elsewhere", "join");
        assert_eq!(
            plan_close(&d, &state),
            vec![
                RoomAction::Kick("@alice:x".into()),
                RoomAction::Kick("@bob:x".into())
            ]
        );
    }

    #[test]
    fn marker_identifies_the_owner() {
        let d = desired();
        let state = converged(&d);
        assert!(marker_matches(&state, &d.marker));
        assert!(!marker_matches(
            &state,
            &json!({"namespace": "t", "name": "meetup", "uid": "other"})
        ));
    }

    #[test]
    fn a_room_cut_short_by_the_operator_is_its_own_and_others_are_not() {
        let d = desired();
        let mut begun = RoomState::from_events(vec![StateEvent {
            kind: "m.room.create".into(),
            state_key: String::new(),
            sender: ADMIN.into(),
            content: json!({"room_version": "12"}),
        }]);
        assert!(unfinished_by(&begun, ADMIN));
        // Completing it writes the marker with the rest of the state.
        let completed = plan(&d, &begun);
        assert!(completed.actions.iter().any(
            |a| matches!(a, RoomAction::SetState { kind, content } if kind == MARKER_TYPE && *content == d.marker)
        ));
        // A room someone else is in, someone else's room, or one marked for
        // another object, never is.
        let mut peopled = begun.clone();
        peopled.events.insert(
            ("m.room.member".into(), "@bob:x".into()),
            json!({"membership": "join"}),
        );
        assert!(!unfinished_by(&peopled, ADMIN));
        begun.creator = Some("@mallory:x".into());
        assert!(!unfinished_by(&begun, ADMIN));
        let marked = converged(&d);
        assert!(!unfinished_by(&marked, ADMIN));
    }

    fn space() -> DesiredRoom {
        DesiredRoom {
            space: true,
            children: Some(BTreeMap::from([
                (
                    "!e1:x".to_string(),
                    ChildLink {
                        order: Some("01".into()),
                        suggested: true,
                    },
                ),
                ("!e2:x".to_string(), ChildLink::default()),
            ])),
            ..desired()
        }
    }

    fn child(parent: &str) -> DesiredRoom {
        DesiredRoom {
            parent: Some(parent.into()),
            join_rule: JoinRule::Restricted,
            ..desired()
        }
    }

    fn relation(kind: &'static str, key: &str, content: Value) -> RoomAction {
        RoomAction::SetRelation {
            kind,
            state_key: key.into(),
            content,
        }
    }

    #[test]
    fn converged_spaces_and_children_plan_nothing() {
        for d in [space(), child("!g:x")] {
            assert_eq!(plan(&d, &converged(&d)).actions, vec![]);
            assert_eq!(refusal(&d, &converged(&d)), None);
        }
    }

    #[test]
    fn create_bodies_carry_type_relations_and_dm_invites() {
        let body = create_body(&space());
        assert_eq!(body["creation_content"], json!({"type": "m.space"}));
        let initial = body["initial_state"].as_array().unwrap();
        assert!(
            initial.contains(&json!({"type": SPACE_CHILD, "state_key": "!e1:x",
            "content": {"via": ["x"], "order": "01", "suggested": true}}))
        );

        let body = create_body(&child("!g:x"));
        assert!(body.get("creation_content").is_none() && body.get("is_direct").is_none());
        let initial = body["initial_state"].as_array().unwrap();
        assert!(
            initial.contains(&json!({"type": SPACE_PARENT, "state_key": "!g:x",
            "content": {"via": ["x"], "canonical": true}}))
        );
        assert!(
            initial.contains(&json!({"type": "m.room.join_rules", "state_key": "",
            "content": {"join_rule": "restricted",
                        "allow": [{"type": "m.room_membership", "room_id": "!g:x"}]}}))
        );

        let mut dm = DesiredRoom {
            direct: true,
            encrypted: true,
            ..desired()
        };
        dm.members.insert("@banned:x".into(), (Membership::Ban, 0));
        let body = create_body(&dm);
        assert_eq!(body["is_direct"], true);
        assert_eq!(body["invite"], json!(["@alice:x", "@bob:x"]));
        let initial = body["initial_state"].as_array().unwrap();
        // Synapse sends the alias as the canonical alias unless the initial
        // state says otherwise: here, that there is none.
        assert!(initial
            .contains(&json!({"type": "m.room.canonical_alias", "state_key": "", "content": {}})));
        for kind in SERVICE_MEMBER_STATE {
            assert!(initial.contains(&json!({"type": kind, "state_key": "",
                "content": {"service_members": [ADMIN]}})));
        }
        // An ordinary room's body is what it always was.
        let plain = create_body(&desired());
        assert!(["creation_content", "is_direct", "invite"]
            .iter()
            .all(|k| plain.get(*k).is_none()));
        let initial = plain["initial_state"].as_array().unwrap();
        assert!(initial.iter().all(|e| e["type"] != "m.room.canonical_alias"
            && !SERVICE_MEMBER_STATE.contains(&e["type"].as_str().unwrap())));
    }

    fn direct() -> DesiredRoom {
        DesiredRoom {
            direct: true,
            encrypted: true,
            ..desired()
        }
    }

    #[test]
    fn direct_members_join_from_an_is_direct_invite_as_themselves() {
        let d = direct();
        let mut state = converged(&d);
        // Alice is invited as to a DM (createRoom's invite), Bob left.
        state.events.insert(
            ("m.room.member".into(), "@alice:x".into()),
            json!({"membership": "invite", "is_direct": true}),
        );
        set_member(&mut state, "@bob:x", "leave");
        assert_eq!(
            plan(&d, &state).actions,
            [
                RoomAction::JoinAsMember("@alice:x".into()),
                RoomAction::InviteDirect("@bob:x".into()),
                RoomAction::JoinAsMember("@bob:x".into()),
            ]
        );
        // An invite without is_direct (an adopted room's) is sent again with it.
        set_member(&mut state, "@bob:x", "invite");
        assert_eq!(
            plan(&d, &state).actions[1..],
            [
                RoomAction::InviteDirect("@bob:x".into()),
                RoomAction::JoinAsMember("@bob:x".into()),
            ]
        );
        // A banned member let back, and one who is only invited.
        let mut d = d;
        d.members.get_mut("@bob:x").unwrap().0 = Membership::Invite;
        set_member(&mut state, "@bob:x", "ban");
        assert_eq!(
            plan(&d, &state).actions[1..],
            [
                RoomAction::Unban("@bob:x".into()),
                RoomAction::InviteDirect("@bob:x".into()),
            ]
        );
    }

    #[test]
    fn a_direct_room_shows_no_alias_and_names_the_operator_a_service_member() {
        let d = direct();
        let mut state = converged(&d);
        assert!(plan(&d, &state).actions.is_empty());
        // A room made with its alias as the canonical alias (or one someone
        // set later) loses it; the service members are restored.
        state.events.insert(
            ("m.room.canonical_alias".into(), String::new()),
            json!({"alias": "#openmeet-dm:x"}),
        );
        state
            .events
            .remove(&("io.element.functional_members".into(), String::new()));
        assert_eq!(
            plan(&d, &state).actions,
            [
                RoomAction::SetState {
                    kind: "m.room.canonical_alias".into(),
                    content: json!({}),
                },
                RoomAction::SetState {
                    kind: "io.element.functional_members".into(),
                    content: json!({"service_members": [ADMIN]}),
                },
            ]
        );
        // Other rooms' aliases and service members are not the operator's.
        let d = desired();
        let mut state = converged(&d);
        state.events.insert(
            ("m.room.canonical_alias".into(), String::new()),
            json!({"alias": "#openmeet-meetup:x"}),
        );
        assert!(plan(&d, &state).actions.is_empty());
    }

    #[test]
    fn space_children_drift_is_reverted_one_write_each() {
        let d = space();
        let mut state = converged(&d);
        // Someone dropped a child and added a room of their own.
        state
            .events
            .insert((SPACE_CHILD.into(), "!e2:x".into()), json!({}));
        state.events.insert(
            (SPACE_CHILD.into(), "!theirs:x".into()),
            json!({"via": ["x"]}),
        );
        assert_eq!(
            plan(&d, &state).actions,
            vec![
                relation(SPACE_CHILD, "!theirs:x", json!({})),
                relation(SPACE_CHILD, "!e2:x", json!({"via": ["x"]})),
            ]
        );
        // A child's listing changed in the spec: one write.
        let mut reordered = d.clone();
        reordered.children.as_mut().unwrap().insert(
            "!e2:x".into(),
            ChildLink {
                order: Some("00".into()),
                suggested: false,
            },
        );
        assert_eq!(
            plan(&reordered, &converged(&d)).actions,
            vec![relation(
                SPACE_CHILD,
                "!e2:x",
                json!({"via": ["x"], "order": "00"})
            )]
        );
    }

    #[test]
    fn ordinary_rooms_leave_child_events_alone_but_not_stray_parents() {
        let d = desired();
        let mut state = converged(&d);
        state
            .events
            .insert((SPACE_CHILD.into(), "!x:x".into()), json!({"via": ["x"]}));
        assert_eq!(plan(&d, &state).actions, vec![]);
        state.events.insert(
            (SPACE_PARENT.into(), "!old:x".into()),
            json!({"via": ["x"], "canonical": true}),
        );
        assert_eq!(
            plan(&d, &state).actions,
            vec![relation(SPACE_PARENT, "!old:x", json!({}))]
        );
    }

    #[test]
    fn reparenting_moves_the_parent_and_the_allow_rule() {
        let before = child("!old:x");
        let after = child("!new:x");
        let actions = plan(&after, &converged(&before)).actions;
        assert_eq!(
            actions,
            vec![
                RoomAction::SetState {
                    kind: "m.room.join_rules".into(),
                    content: json!({"join_rule": "restricted",
                        "allow": [{"type": "m.room_membership", "room_id": "!new:x"}]}),
                },
                relation(SPACE_PARENT, "!old:x", json!({})),
                relation(
                    SPACE_PARENT,
                    "!new:x",
                    json!({"via": ["x"], "canonical": true})
                ),
            ]
        );
    }

    #[test]
    fn old_rooms_and_wrong_types_are_refused_before_any_write() {
        let d = child("!g:x");
        let mut state = converged(&d);
        state.events.insert(
            ("m.room.create".into(), String::new()),
            json!({"room_version": "7"}),
        );
        assert_eq!(
            refusal(&d, &state).map(|r| r.reason),
            Some("RoomVersionUnsupported")
        );
        let invite_only = DesiredRoom {
            join_rule: JoinRule::Invite,
            ..d
        };
        assert_eq!(refusal(&invite_only, &state), None);
        // A space spec on an ordinary room, and the other way round.
        assert_eq!(
            refusal(&space(), &converged(&desired())).map(|r| r.reason),
            Some("RoomTypeMismatch")
        );
        assert_eq!(
            refusal(&desired(), &converged(&space())).map(|r| r.reason),
            Some("RoomTypeMismatch")
        );
    }

    #[test]
    fn restricted_rooms_keep_members_who_came_through_the_space() {
        let d = child("!g:x");
        let mut state = converged(&d);
        set_member(&mut state, "@via-space:x", "join");
        set_member(&mut state, "@intruder:x", "join");
        let first = plan(&d, &state);
        assert!(removes_members(&first));
        let space_members = std::collections::BTreeSet::from(["@via-space:x".to_string()]);
        assert_eq!(
            plan_with(&d, &state, Some(&space_members)).actions,
            vec![RoomAction::Kick("@intruder:x".into())]
        );
        // Not restricted: the parent's members are no reason to stay.
        let invite_only = DesiredRoom {
            join_rule: JoinRule::Invite,
            ..d
        };
        let mut state = converged(&invite_only);
        set_member(&mut state, "@via-space:x", "join");
        assert_eq!(
            plan_with(&invite_only, &state, Some(&space_members)).actions,
            vec![RoomAction::Kick("@via-space:x".into())]
        );
    }

    #[test]
    fn closing_unlinks_the_room_from_its_space() {
        let d = child("!g:x");
        let close = plan_close(&d, &converged(&d));
        assert_eq!(close[0], relation(SPACE_PARENT, "!g:x", json!({})));
        let s = space();
        let close = plan_close(&s, &converged(&s));
        assert_eq!(
            close[..2],
            [
                relation(SPACE_CHILD, "!e1:x", json!({})),
                relation(SPACE_CHILD, "!e2:x", json!({}))
            ]
        );
    }
}
