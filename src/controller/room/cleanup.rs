//! What deleting a `MatrixRoom` does in Synapse, by its deletion policy.

use super::apply::apply_action;
use super::desired::{desired, full_alias, holds_alias};
use super::observe::{locate, Located};
use super::plan::plan_close;
use super::{audit, record, status, RoomContext};
use crate::api::room::RoomDeletionPolicy;
use crate::api::MatrixRoom;
use crate::controller::finalizer::Cleanup;
use crate::controller::{key, Error};
use crate::synapse::rooms::DeleteStatus;
use kube::runtime::events::EventType;
use kube::Api;
use ruma::RoomId;
use std::collections::BTreeMap;
use std::time::Duration;

pub(super) async fn cleanup(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
) -> Result<Cleanup, Error> {
    if holds_alias(room, ctx).is_err() || room.spec.deletion_policy == RoomDeletionPolicy::Retain {
        return Ok(Cleanup::Done);
    }
    let result: Result<Cleanup, Error> = async {
        let alias = full_alias(room, ctx)?;
        let Located::Ours(room_id, state) = locate(room, &alias, ctx, true).await? else {
            // Gone already, or never ours: nothing to clean.
            return Ok(Cleanup::Done);
        };
        match room.spec.deletion_policy {
            RoomDeletionPolicy::Retain => {}
            RoomDeletionPolicy::Close => {
                let d = desired(room, ctx, BTreeMap::new(), None);
                if state.memberships().get(&d.admin).map(String::as_str) != Some("join") {
                    // Left already: closed by an earlier, interrupted cleanup.
                    return Ok(Cleanup::Done);
                }
                let parsed = RoomId::parse(&room_id).map_err(|e| Error::Invalid(e.to_string()))?;
                for action in plan_close(&d, &state) {
                    apply_action(&room_id, &parsed, &action, ctx).await?;
                    audit(room, &room_id, &action.describe());
                }
                if ctx.synapse.resolve_alias(&alias).await?.as_deref() == Some(room_id.as_str()) {
                    ctx.synapse.delete_alias(&alias).await?;
                    audit(room, &room_id, "drop alias");
                }
                ctx.synapse.leave(&room_id).await?;
                audit(room, &room_id, "leave");
                record(
                    room,
                    ctx,
                    EventType::Normal,
                    "RoomClosed",
                    &format!("closed {room_id}"),
                );
            }
            RoomDeletionPolicy::Purge => {
                // One step per reconcile: a running deletion is a requeue,
                // never a wait inside the reconcile (a replica that loses
                // its lease must not keep polling, let alone retrying).
                match ctx.synapse.room_delete_status(&room_id).await? {
                    Some(DeleteStatus::InProgress) => {
                        return Ok(Cleanup::Pending(Duration::from_millis(500)))
                    }
                    Some(DeleteStatus::Complete) => {}
                    Some(DeleteStatus::Failed(why)) => {
                        tracing::warn!(room = %key(room), room_id, why, "room deletion failed; retrying");
                        ctx.synapse.delete_room(&room_id, true).await?;
                        audit(room, &room_id, "delete and purge (retry)");
                        return Ok(Cleanup::Pending(Duration::from_millis(500)));
                    }
                    None => {
                        ctx.synapse.delete_room(&room_id, true).await?;
                        audit(room, &room_id, "delete and purge");
                        return Ok(Cleanup::Pending(Duration::from_millis(500)));
                    }
                }
                record(
                    room,
                    ctx,
                    EventType::Normal,
                    "RoomPurged",
                    &format!("deleted and purged {room_id}"),
                );
            }
        }
        Ok(Cleanup::Done)
    }
    .await;
    match result {
        Ok(cleanup) => Ok(cleanup),
        Err(error) => {
            status::cleanup_failed(room, api, &error).await;
            Err(error)
        }
    }
}
