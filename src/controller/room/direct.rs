//! Direct rooms in their members' `m.direct` account data, which clients
//! use to show a room as a conversation with the other member.

use super::plan::DesiredRoom;
use super::{audit, RoomContext};
use crate::api::permission::Membership;
use crate::api::{MatrixRoom, RoomPermission};
use crate::controller::{key, Error};
use ruma::UserId;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Members of a direct room who cannot act as themselves now (a locked
/// account cannot be logged in as): their `m.direct` is not written and
/// they do not join. Part of the room's fingerprint, so that unlocking one
/// joins them and lists the room at once.
pub(super) fn unlistable_members(
    d: &DesiredRoom,
    perms: &[Arc<RoomPermission>],
    ctx: &RoomContext,
) -> BTreeSet<String> {
    if !d.direct {
        return BTreeSet::new();
    }
    perms
        .iter()
        .filter_map(|p| super::desired::user_of(p, ctx))
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

/// A locked member of a direct room stays invited (with `is_direct`) until
/// unlocked: members of a direct room join as themselves.
pub(super) fn invite_until_unlocked(d: &mut DesiredRoom, locked: &BTreeSet<String>) {
    for user in locked {
        if let Some((membership, _)) = d.members.get_mut(user) {
            if *membership == Membership::Join {
                *membership = Membership::Invite;
            }
        }
    }
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
        .filter(|(_, (m, _))| *m != Membership::Ban)
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

/// Takes a closed direct room out of every local member's `m.direct` (the
/// room no longer is a conversation). A locked member's list cannot be
/// written: it keeps the entry, which names a room they are no longer in.
pub(super) async fn unlist(
    room: &MatrixRoom,
    room_id: &str,
    members: &[String],
    ctx: &RoomContext,
) -> Result<(), Error> {
    for user in members {
        let user_id =
            UserId::parse(user.as_str()).map_err(|e| Error::Invalid(format!("{user:?}: {e}")))?;
        let current = ctx.synapse.direct_rooms(&user_id).await?;
        let Some(next) = crate::synapse::account_data::without_direct_room(&current, room_id)
        else {
            continue;
        };
        match ctx.synapse.set_direct_rooms(&user_id, &next).await {
            Err(e) if e.errcode() == Some("M_USER_LOCKED") => {
                tracing::info!(room = %key(room), user = %user, "m.direct keeps the closed room: the account is locked");
                continue;
            }
            other => other?,
        }
        audit(room, room_id, &format!("unlist from m.direct of {user}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::room::plan::tests::desired;

    #[test]
    fn a_locked_member_is_invited_until_unlocked() {
        let mut d = desired();
        d.members.insert("@banned:x".into(), (Membership::Ban, 0));
        let locked: BTreeSet<String> = ["@bob:x", "@banned:x", "@absent:x"]
            .map(String::from)
            .into();
        invite_until_unlocked(&mut d, &locked);
        assert_eq!(d.members["@bob:x"].0, Membership::Invite);
        assert_eq!(d.members["@alice:x"].0, Membership::Join);
        assert_eq!(d.members["@banned:x"].0, Membership::Ban, "a ban stays");
        assert!(!d.members.contains_key("@absent:x"));
    }
}
