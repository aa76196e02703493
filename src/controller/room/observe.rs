//! Finding the room in Synapse and reading what it holds; whether it is
//! this object's is the marker's say.

use super::desired::marker;
use super::model::Located;
use super::plan::{self, marker_matches, RoomAction};
use super::RoomContext;
use crate::api::MatrixRoom;
use crate::controller::{key, Error};
use crate::synapse::rooms::RoomState;
use ruma::{RoomAliasId, RoomId};
use std::collections::BTreeSet;

/// A room's state as the admin account sees it. A `createRoom` cut short
/// right after the create event leaves a room the admin account is not even
/// joined to: read it through the admin API and, when it is such an
/// unfinished room of the operator's, join it (its creator may) so that it
/// can be completed. Any other room the admin cannot read stays unreadable.
async fn readable_state(room_id: &str, ctx: &RoomContext) -> Result<Option<RoomState>, Error> {
    if let Some(state) = ctx.synapse.room_state(room_id).await? {
        return Ok(Some(state));
    }
    let admin = ctx.synapse.admin_user_id().as_str();
    match ctx.synapse.admin_room_state(room_id).await? {
        Some(state) if plan::unfinished_by(&state, admin) => {
            tracing::info!(room_id, "joining a room whose creation was cut short");
            ctx.synapse.join_self(room_id).await?;
            Ok(ctx.synapse.room_state(room_id).await?)
        }
        _ => Ok(None),
    }
}

/// Whether the room is this object's: its marker says so, or it is one the
/// operator began and a Synapse stop cut short (then the plan completes it).
fn is_ours(room: &MatrixRoom, state: &RoomState, ctx: &RoomContext) -> bool {
    if marker_matches(state, &marker(room)) {
        return true;
    }
    let unfinished = plan::unfinished_by(state, ctx.synapse.admin_user_id().as_str());
    if unfinished {
        tracing::info!(room = %key(room), "completing a room whose creation was cut short");
    }
    unfinished
}

/// Finds the room: by status, else (when `resolve` is set) by alias; the
/// marker decides ownership. Without `resolve`, an unknown room is reported
/// absent: the create that follows takes the alias as its lock, and
/// `M_ROOM_IN_USE` sends it back here by alias.
pub(super) async fn locate(
    room: &MatrixRoom,
    alias: &RoomAliasId,
    ctx: &RoomContext,
    resolve: bool,
) -> Result<Located, Error> {
    let known = room.status.as_ref().and_then(|s| s.room_id.clone());
    let from_status = known.is_some();
    let candidate = match known {
        Some(id) => Some(id),
        None if resolve => ctx.synapse.resolve_alias(alias).await?,
        None => None,
    };
    let Some(room_id) = candidate else {
        return Ok(Located::Absent);
    };
    match readable_state(&room_id, ctx).await? {
        Some(state) if is_ours(room, &state, ctx) => Ok(Located::Ours(room_id, state)),
        Some(state) if from_status && still_ours(&room_id, alias, &state, ctx).await? => {
            // The plan writes the marker back, as drift.
            tracing::warn!(room = %key(room), room_id, "ownership marker changed out of band: restoring it");
            Ok(Located::Ours(room_id, state))
        }
        Some(_) => Ok(Located::Foreign(room_id)),
        None => Ok(Located::Foreign(room_id)),
    }
}

/// Whether a room whose marker no longer names this object is still its
/// own: the status names it, the operator created it, and the object's
/// alias (in the operator's exclusive namespace, which nobody else can
/// bind) resolves to it. Then the marker was changed out of band, which
/// is drift to repair, never a reason to let the room go.
async fn still_ours(
    room_id: &str,
    alias: &RoomAliasId,
    state: &RoomState,
    ctx: &RoomContext,
) -> Result<bool, Error> {
    if state.creator.as_deref() != Some(ctx.synapse.admin_user_id().as_str()) {
        return Ok(false);
    }
    Ok(ctx.synapse.resolve_alias(alias).await?.as_deref() == Some(room_id))
}

/// After `M_ROOM_IN_USE`: the room under the alias, if it carries our marker.
pub(super) async fn locate_by_alias(
    room: &MatrixRoom,
    alias: &RoomAliasId,
    ctx: &RoomContext,
) -> Result<Option<(String, RoomState)>, Error> {
    let Some(id) = ctx.synapse.resolve_alias(alias).await? else {
        return Ok(None);
    };
    match readable_state(&id, ctx).await? {
        Some(state) if is_ours(room, &state, ctx) => Ok(Some((id, state))),
        _ => Ok(None),
    }
}

/// The joined members of a room (a parent space), or none when Synapse
/// does not know it: the member list only, not the space's whole state.
pub(super) async fn joined_members_of(
    room_id: &str,
    ctx: &RoomContext,
) -> Result<BTreeSet<String>, Error> {
    let room_id = RoomId::parse(room_id)
        .map_err(|e| Error::Invalid(format!("parent room id {room_id:?}: {e}")))?;
    Ok(ctx
        .synapse
        .joined_members(&room_id)
        .await?
        .unwrap_or_default())
}

/// Joined members, the admin account included: those the state read shows
/// joined, changed by the membership writes Synapse has since confirmed (a
/// join answered 200 is a joined member, a kick or ban answered 200 is not).
/// Synapse's own answers, not the plan's prediction, and no read-back.
pub(super) fn joined_count(state: &RoomState, confirmed: &[&RoomAction]) -> u64 {
    let mut joined: BTreeSet<String> = state
        .memberships()
        .into_iter()
        .filter(|(_, m)| m == "join")
        .map(|(u, _)| u)
        .collect();
    for action in confirmed {
        match action {
            RoomAction::Join(u) | RoomAction::JoinAsMember(u) => {
                joined.insert(u.clone());
            }
            RoomAction::Kick(u) | RoomAction::Ban(u) => {
                joined.remove(u);
            }
            _ => {}
        }
    }
    joined.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synapse::rooms::StateEvent;
    use serde_json::json;

    #[test]
    fn joined_members_are_the_state_read_plus_confirmed_writes() {
        let events: Vec<StateEvent> = serde_json::from_value(json!([
            {"type": "m.room.member", "state_key": "@op:x", "sender": "@op:x", "content": {"membership": "join"}},
            {"type": "m.room.member", "state_key": "@a:x", "sender": "@a:x", "content": {"membership": "join"}},
            {"type": "m.room.member", "state_key": "@b:x", "sender": "@b:x", "content": {"membership": "invite"}},
            {"type": "m.room.member", "state_key": "@c:x", "sender": "@c:x", "content": {"membership": "leave"}},
        ]))
        .unwrap();
        let state = RoomState::from_events(events);
        assert_eq!(joined_count(&state, &[]), 2);
        let (join_b, join_a, kick_a, invite_c, ban_gone) = (
            RoomAction::Join("@b:x".into()),
            RoomAction::Join("@a:x".into()),
            RoomAction::Kick("@a:x".into()),
            RoomAction::Invite("@c:x".into()),
            RoomAction::Ban("@d:x".into()),
        );
        // An invite is not a member yet; joining a joined user counts once.
        assert_eq!(joined_count(&state, &[&join_b, &invite_c, &join_a]), 3);
        assert_eq!(joined_count(&state, &[&join_b, &kick_a, &ban_gone]), 2);
    }
}
