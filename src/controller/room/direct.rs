//! Direct rooms in their members' `m.direct` account data, which clients
//! use to show a room as a conversation with the other member.

use super::plan::DesiredRoom;
use super::{audit, RoomContext};
use crate::api::{MatrixRoom, RoomPermission};
use crate::controller::{key, Error};
use kube::runtime::reflector::ObjectRef;
use ruma::UserId;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Members of a direct room whose `m.direct` cannot be written now: a
/// locked account cannot be logged in as. Part of the room's fingerprint, so
/// that unlocking one lists the room in its `m.direct` at once.
pub(super) fn unlistable_members(
    d: &DesiredRoom,
    perms: &[Arc<RoomPermission>],
    ctx: &RoomContext,
    ns: &str,
) -> BTreeSet<String> {
    if !d.direct {
        return BTreeSet::new();
    }
    perms
        .iter()
        .filter_map(|p| {
            ctx.users
                .get(&ObjectRef::new(&p.spec.user_ref.name).within(ns))
        })
        // Locked in the spec, or still in Synapse (a lock lifts a while
        // after the spec lets go of it).
        .filter(|u| {
            let locked = u.status.as_ref().and_then(|s| {
                crate::api::conditions::find(&s.conditions, crate::controller::user::LOCKED)
            });
            u.spec.locked || locked.is_some_and(|c| c.is_true())
        })
        .filter_map(|u| u.status.as_ref()?.user_id.clone())
        .collect()
}

/// Lists a direct room in both members' `m.direct` (each under the other
/// member), keeping every other entry. Only local members' account data is
/// the operator's to write, and only while they can be logged in as: a
/// locked member's list waits for the unlock (the room converges meanwhile).
pub(super) async fn list_as_direct(
    room: &MatrixRoom,
    room_id: &str,
    d: &DesiredRoom,
    unlistable: &BTreeSet<String>,
    ctx: &RoomContext,
) -> Result<(), Error> {
    let members: Vec<&String> = d
        .members
        .iter()
        .filter(|(_, (m, _))| *m != crate::api::permission::Membership::Ban)
        .map(|(u, _)| u)
        .collect();
    let [a, b] = members.as_slice() else {
        return Ok(());
    };
    for (user, other) in [(a, b), (b, a)] {
        if !user.ends_with(&d.server_suffix) || unlistable.contains(user.as_str()) {
            continue;
        }
        let user_id =
            UserId::parse(user.as_str()).map_err(|e| Error::Invalid(format!("{user:?}: {e}")))?;
        let current = ctx.synapse.direct_rooms(&user_id).await?;
        if let Some(next) = crate::synapse::account_data::with_direct_room(&current, other, room_id)
        {
            match ctx.synapse.set_direct_rooms(&user_id, &next).await {
                // Locked in Synapse before the cache shows it: as above.
                Err(e) if e.errcode() == Some("M_USER_LOCKED") => {
                    tracing::info!(room = %key(room), user = %user, "m.direct waits: the account is locked");
                    continue;
                }
                other => other?,
            }
            audit(room, room_id, &format!("list in m.direct of {user}"));
        }
    }
    Ok(())
}
