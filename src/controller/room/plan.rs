//! Pure planning for `MatrixRoom` and the `RoomPermission`s folded into it:
//! desired room + observed state → the writes that converge it.

use crate::api::permission::Membership;
use crate::api::room::{HistoryVisibility, JoinRule, MembershipPolicy, RoomThresholds};
use crate::synapse::rooms::RoomState;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// State event type of the ownership marker.
pub const MARKER_TYPE: &str = "net.openmeet.owner";
const ENCRYPTION_ALGORITHM: &str = "m.megolm.v1.aes-sha2";

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
    /// The operator's admin account.
    pub admin: String,
    /// `:<server_name>`, to tell local users from remote ones.
    pub server_suffix: String,
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
    Unban(String),
    Join(String),
    Invite(String),
    Kick(String),
    Ban(String),
}

impl RoomAction {
    pub fn describe(&self) -> String {
        match self {
            RoomAction::MakeRoomAdmin => "restore operator power".into(),
            RoomAction::SetState { kind, .. } => format!("set {kind}"),
            RoomAction::SetPowerLevels(_) => "set m.room.power_levels".into(),
            RoomAction::Unban(u) => format!("unban {u}"),
            RoomAction::Join(u) => format!("join {u}"),
            RoomAction::Invite(u) => format!("invite {u}"),
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
    }
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
        (
            "m.room.join_rules",
            json!({"join_rule": join_rule(d.join_rule)}),
        ),
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
    state
}

/// Whether the admin account is a creator with unlimited power (room version
/// 12 and later), in which case it must never appear in `users`.
pub fn admin_is_creator(state: Option<&RoomState>, admin: &str) -> bool {
    let Some(create) = state.and_then(|s| s.get("m.room.create", "")) else {
        // A room we are about to create: Synapse's default version makes us creator.
        return true;
    };
    let version = create
        .get("room_version")
        .and_then(Value::as_str)
        .unwrap_or("1");
    let modern = version.parse::<u32>().map(|v| v >= 12).unwrap_or(false);
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
        "m.room.encryption",
    ] {
        events.insert(kind.into(), json!(t.change_settings));
    }
    for kind in [
        "m.room.power_levels",
        "m.room.tombstone",
        "m.room.server_acl",
        MARKER_TYPE,
    ] {
        events.insert(kind.into(), json!(100));
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
    let mut body = json!({
        "room_alias_name": d.alias_localpart,
        "visibility": "private",
        "preset": if d.join_rule == JoinRule::Public { "public_chat" } else { "private_chat" },
        "initial_state": initial_state,
        "power_level_content_override": power_levels(d, None, true),
    });
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
    /// Joined members once the actions are applied.
    pub joined_after: usize,
}

/// Plans the writes for an existing room: state, at most one power-levels
/// event, then membership.
pub fn plan(d: &DesiredRoom, state: &RoomState) -> RoomPlan {
    let mut actions = Vec::new();
    let admin_creator = admin_is_creator(Some(state), &d.admin);
    let observed_pl = state.get("m.room.power_levels", "");
    let admin_level = observed_pl
        .and_then(|pl| pl.get("users"))
        .and_then(|u| u.get(&d.admin))
        .and_then(Value::as_i64);
    if !admin_creator && admin_level.unwrap_or(0) < 100 {
        actions.push(RoomAction::MakeRoomAdmin);
    }

    for (kind, content) in desired_state(d) {
        if !state_matches(state.get(kind, ""), &content) {
            actions.push(RoomAction::SetState {
                kind: kind.to_string(),
                content,
            });
        }
    }
    let wanted_pl = power_levels(d, observed_pl, admin_creator);
    if observed_pl != Some(&wanted_pl) {
        actions.push(RoomAction::SetPowerLevels(wanted_pl));
    }

    let observed = state.memberships();
    let mut joined: std::collections::BTreeSet<String> = observed
        .iter()
        .filter(|(_, m)| m.as_str() == "join")
        .map(|(u, _)| u.clone())
        .collect();
    for (user, (membership, _)) in &d.members {
        let current = observed.get(user).map(String::as_str).unwrap_or("leave");
        match (membership, current) {
            (Membership::Join, "join")
            | (Membership::Invite, "join" | "invite")
            | (Membership::Ban, "ban") => {}
            (Membership::Join, _) => {
                if current == "ban" {
                    actions.push(RoomAction::Unban(user.clone()));
                }
                actions.push(RoomAction::Join(user.clone()));
                joined.insert(user.clone());
            }
            (Membership::Invite, _) => {
                if current == "ban" {
                    actions.push(RoomAction::Unban(user.clone()));
                }
                actions.push(RoomAction::Invite(user.clone()));
            }
            (Membership::Ban, _) => {
                actions.push(RoomAction::Ban(user.clone()));
                joined.remove(user);
            }
        }
    }
    if d.membership_policy == MembershipPolicy::Exclusive {
        for (user, membership) in &observed {
            let undeclared = !d.members.contains_key(user)
                && *user != d.admin
                && user.ends_with(&d.server_suffix);
            if undeclared && (membership == "join" || membership == "invite") {
                actions.push(RoomAction::Kick(user.clone()));
                joined.remove(user);
            }
        }
    }
    RoomPlan {
        actions,
        joined_after: joined.len(),
    }
}

/// The writes that close a room: every local member but the admin removed.
/// Dropping the alias and leaving follow in the shell.
pub fn plan_close(d: &DesiredRoom, state: &RoomState) -> Vec<RoomAction> {
    state
        .memberships()
        .into_iter()
        .filter(|(user, m)| {
            *user != d.admin && user.ends_with(&d.server_suffix) && (m == "join" || m == "invite")
        })
        .map(|(user, _)| RoomAction::Kick(user))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synapse::rooms::StateEvent;

    const ADMIN: &str = "@openmeet-admin:x";

    fn desired() -> DesiredRoom {
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
            admin: ADMIN.into(),
            server_suffix: ":x".into(),
        }
    }

    /// The state Synapse would hold once `d` has fully converged (room v12,
    /// created by the admin).
    fn converged(d: &DesiredRoom) -> RoomState {
        let mut events = vec![StateEvent {
            kind: "m.room.create".into(),
            state_key: String::new(),
            sender: ADMIN.into(),
            content: json!({"room_version": "12"}),
        }];
        for (kind, content) in desired_state(d) {
            events.push(StateEvent {
                kind: kind.into(),
                state_key: String::new(),
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
        assert_eq!(plan.joined_after, 3);
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
        assert_eq!(plan.joined_after, 1003);
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
                RoomAction::Unban("@back:x".into()),
                RoomAction::Join("@back:x".into()),
                RoomAction::Ban("@banned:x".into()),
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
        assert_eq!(pl["events"]["m.room.power_levels"], 100);
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
}
