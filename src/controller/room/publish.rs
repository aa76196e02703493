//! Publication in the room directory: decided from the spec, the last
//! status and what Synapse lists, by pure functions; [`publication`] is the
//! shell that reads, writes and verifies.

use super::{audit, record, RoomContext, PUBLISHED};
use crate::api::conditions::{self, Condition};
use crate::api::MatrixRoom;
use crate::controller::Error;
use crate::synapse::SynapseError;
use kube::runtime::events::EventType;

/// Whether the directory needs a look. Checked once per generation, so an
/// unchanged room's resync stays one read.
#[derive(Clone, Debug, PartialEq)]
enum Check {
    /// Verified for this generation of this room: the condition stands.
    Known(Condition),
    /// Created private and never asked to publish: nothing to verify.
    NotRequested,
    /// Read what the directory lists.
    Verify,
}

fn check(room: &MatrixRoom, room_id: &str) -> Check {
    let status = room.status.as_ref();
    match status.and_then(|s| conditions::find(&s.conditions, PUBLISHED)) {
        Some(p)
            if p.observed_generation == room.metadata.generation
                && status.and_then(|s| s.room_id.as_deref()) == Some(room_id) =>
        {
            Check::Known(p.clone())
        }
        Some(_) => Check::Verify,
        None if room.spec.publish_to_directory => Check::Verify,
        None => Check::NotRequested,
    }
}

/// The directory write that makes Synapse's listing match the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publication {
    Publish,
    Unpublish,
}

impl Publication {
    fn describe(self) -> &'static str {
        match self {
            Publication::Publish => "publish to directory",
            Publication::Unpublish => "unpublish from directory",
        }
    }
}

/// What to write, if anything, given what the spec wants and what Synapse lists.
fn plan_publication(want: bool, listed: bool) -> Option<Publication> {
    match (want, listed) {
        (true, false) => Some(Publication::Publish),
        (false, true) => Some(Publication::Unpublish),
        _ => None,
    }
}

/// The Published condition for what Synapse lists once the write is done.
fn condition(want: bool, listed: bool, generation: Option<i64>) -> Condition {
    match (want, listed) {
        (true, true) => Condition::new(
            PUBLISHED,
            true,
            "Published",
            "listed in the room directory",
            generation,
        ),
        (true, false) => Condition::new(
            PUBLISHED,
            false,
            "PublicationRefused",
            "Synapse did not list the room: its room_list_publication_rules refuse it",
            generation,
        ),
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
    }
}

/// Publishes or unpublishes in the directory, verifying the result; the
/// Published condition, when the room has one.
pub(super) async fn publication(
    room: &MatrixRoom,
    room_id: &str,
    ctx: &RoomContext,
) -> Result<Option<Condition>, Error> {
    match check(room, room_id) {
        Check::Known(condition) => return Ok(Some(condition)),
        Check::NotRequested => return Ok(None),
        Check::Verify => {}
    }
    let want = room.spec.publish_to_directory;
    let mut listed = ctx.synapse.directory_visibility(room_id).await?;
    if let Some(write) = plan_publication(want, listed) {
        let public = write == Publication::Publish;
        match ctx.synapse.set_directory_visibility(room_id, public).await {
            Ok(()) => audit(room, room_id, write.describe()),
            // room_list_publication_rules said no: reported below, not retried.
            Err(SynapseError::Rejected { status: 403, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        listed = ctx.synapse.directory_visibility(room_id).await?;
    }
    let published = condition(want, listed, room.metadata.generation);
    if published.reason == "PublicationRefused" {
        let message = published.message.as_str();
        record(room, ctx, EventType::Warning, "PublicationRefused", message);
    }
    Ok(Some(published))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(yaml: &str) -> MatrixRoom {
        serde_yaml::from_str(yaml).unwrap()
    }

    const PUBLISHED_GEN_2: &str = r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: MatrixRoom
metadata: {name: r, namespace: t, generation: 2}
spec: {alias: r, publishToDirectory: true}
status:
  roomId: "!a:x"
  conditions:
  - {type: Published, status: "True", reason: Published, message: listed, observedGeneration: 2, lastTransitionTime: "2025-01-01T00:00:00Z"}
"#;

    #[test]
    fn a_verified_generation_is_not_read_again() {
        let r = room(PUBLISHED_GEN_2);
        assert!(matches!(check(&r, "!a:x"), Check::Known(c) if c.reason == "Published"));
    }

    #[test]
    fn a_new_generation_or_another_room_is_verified() {
        let mut r = room(PUBLISHED_GEN_2);
        assert_eq!(check(&r, "!b:x"), Check::Verify, "another room");
        r.metadata.generation = Some(3);
        assert_eq!(check(&r, "!a:x"), Check::Verify, "spec changed");
        // Asked to unpublish: the earlier condition says there is something to undo.
        r.spec.publish_to_directory = false;
        assert_eq!(check(&r, "!a:x"), Check::Verify);
    }

    #[test]
    fn a_room_never_published_needs_no_look_until_asked() {
        let mut r = room(PUBLISHED_GEN_2);
        r.status = None;
        r.spec.publish_to_directory = false;
        assert_eq!(check(&r, "!a:x"), Check::NotRequested);
        r.spec.publish_to_directory = true;
        assert_eq!(check(&r, "!a:x"), Check::Verify);
    }

    #[test]
    fn writes_only_what_differs() {
        assert_eq!(plan_publication(true, false), Some(Publication::Publish));
        assert_eq!(plan_publication(false, true), Some(Publication::Unpublish));
        assert_eq!(plan_publication(true, true), None);
        assert_eq!(plan_publication(false, false), None);
    }

    #[test]
    fn the_condition_reports_what_synapse_lists() {
        let reasons: Vec<(bool, String)> =
            [(true, true), (true, false), (false, false), (false, true)]
                .into_iter()
                .map(|(want, listed)| {
                    let c = condition(want, listed, Some(1));
                    (c.is_true(), c.reason)
                })
                .collect();
        assert_eq!(
            reasons,
            [
                (true, "Published".to_string()),
                (false, "PublicationRefused".to_string()),
                (false, "NotRequested".to_string()),
                (true, "UnpublishRefused".to_string()),
            ]
        );
    }
}
