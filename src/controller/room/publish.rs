//! Publication in the room directory.

use super::{audit, record, RoomContext, PUBLISHED};
use crate::api::conditions::{self, Condition};
use crate::api::MatrixRoom;
use crate::controller::Error;
use crate::synapse::SynapseError;
use kube::runtime::events::EventType;

/// Publishes or unpublishes in the directory, verifying the result. Checked
/// once per generation, so an unchanged room's resync stays one read.
pub(super) async fn publication(
    room: &MatrixRoom,
    room_id: &str,
    ctx: &RoomContext,
) -> Result<Option<Condition>, Error> {
    let generation = room.metadata.generation;
    let previous = room
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, PUBLISHED));
    let want = room.spec.publish_to_directory;
    if let Some(p) = previous {
        if p.observed_generation == generation
            && room.status.as_ref().and_then(|s| s.room_id.as_deref()) == Some(room_id)
        {
            return Ok(Some(p.clone()));
        }
    } else if !want {
        // Created private and never asked to publish: nothing to verify.
        return Ok(None);
    }
    let published = ctx.synapse.directory_visibility(room_id).await?;
    if published != want {
        match ctx.synapse.set_directory_visibility(room_id, want).await {
            Ok(()) => audit(
                room,
                room_id,
                if want {
                    "publish to directory"
                } else {
                    "unpublish from directory"
                },
            ),
            // room_list_publication_rules said no: reported below, not retried.
            Err(SynapseError::Rejected { status: 403, .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let verified = if published != want {
        ctx.synapse.directory_visibility(room_id).await?
    } else {
        published
    };
    Ok(Some(match (want, verified) {
        (true, true) => Condition::new(
            PUBLISHED,
            true,
            "Published",
            "listed in the room directory",
            generation,
        ),
        (true, false) => {
            let message =
                "Synapse did not list the room: its room_list_publication_rules refuse it";
            record(room, ctx, EventType::Warning, "PublicationRefused", message);
            Condition::new(PUBLISHED, false, "PublicationRefused", message, generation)
        }
        (false, false) => Condition::new(
            PUBLISHED,
            false,
            "NotRequested",
            "not listed in the room directory",
            generation,
        ),
        (false, true) => Condition::new(
            PUBLISHED,
            true,
            "UnpublishRefused",
            "Synapse still lists the room",
            generation,
        ),
    }))
}
