//! What deleting a `MatrixRoom` does in Synapse, by its deletion policy:
//! planned from what Synapse holds by pure functions ([`close`], [`purge`]),
//! executed by [`cleanup`].

use super::apply::apply_action;
use super::desired::{desired, full_alias, holds_alias};
use super::model::Located;
use super::observe::locate;
use super::plan::{plan_close, DesiredRoom, RoomAction};
use super::{audit, direct, record, status, RoomContext};
use crate::api::room::RoomDeletionPolicy;
use crate::api::MatrixRoom;
use crate::controller::finalizer::Cleanup;
use crate::controller::{key, Error};
use crate::synapse::rooms::{DeleteStatus, RoomState};
use kube::runtime::events::EventType;
use kube::Api;
use ruma::RoomId;
use std::collections::BTreeMap;
use std::time::Duration;

/// How soon a running deletion is first looked at again; later looks
/// back off from there, up to [`PURGE_POLL_MAX`].
pub(super) const PURGE_POLL: Duration = Duration::from_millis(500);
/// The longest wait between two looks at a running deletion.
pub(super) const PURGE_POLL_MAX: Duration = Duration::from_secs(30);

/// The per-room wait between looks at a running purge.
pub(super) fn purge_polls() -> crate::controller::backoff::Backoff {
    crate::controller::backoff::Backoff::new(PURGE_POLL, PURGE_POLL_MAX)
}

/// One write of a cleanup.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// Take a direct room out of these local members' `m.direct`.
    Unlist(Vec<String>),
    /// Unlink the room from its spaces, or remove a member.
    Room(RoomAction),
    /// Drop the alias, if it still points at this room.
    DropAlias,
    /// The admin account leaves: the room is no longer the operator's.
    Leave,
    /// Start deleting and purging the room; `retrying` says why the
    /// previous deletion failed.
    Purge { retrying: Option<String> },
}

/// The writes of one cleanup pass and where they leave the finalizer.
#[derive(Clone, Debug, PartialEq)]
struct CleanupPlan {
    steps: Vec<Step>,
    /// Once the steps are done: release the finalizer, or look again later.
    then: Cleanup,
    /// The Event a finished cleanup leaves: reason and note.
    finished: Option<(&'static str, String)>,
}

impl CleanupPlan {
    fn done() -> Self {
        CleanupPlan {
            steps: Vec::new(),
            then: Cleanup::Done,
            finished: None,
        }
    }
}

/// A direct room's local members (every one with a membership event, the
/// admin aside), whose `m.direct` lists it while it exists.
fn unlist(d: &DesiredRoom, state: &RoomState) -> Option<Step> {
    let members: Vec<String> = state
        .memberships()
        .into_keys()
        .filter(|user| *user != d.admin && user.ends_with(&d.server_suffix))
        .collect();
    (d.direct && !members.is_empty()).then_some(Step::Unlist(members))
}

/// Closing: a direct room taken out of its members' `m.direct`, unlinked
/// from its spaces, every local member but the admin removed, the alias
/// dropped, the admin gone. A room the admin has left already was closed by
/// an earlier, interrupted cleanup.
fn close(d: &DesiredRoom, state: &RoomState, room_id: &str) -> CleanupPlan {
    if state.memberships().get(&d.admin).map(String::as_str) != Some("join") {
        return CleanupPlan::done();
    }
    let steps = unlist(d, state)
        .into_iter()
        .chain(plan_close(d, state).into_iter().map(Step::Room))
        .chain([Step::DropAlias, Step::Leave])
        .collect();
    CleanupPlan {
        steps,
        then: Cleanup::Done,
        finished: Some(("RoomClosed", format!("closed {room_id}"))),
    }
}

/// Purging, one step per reconcile from the deletion Synapse reports: a
/// running deletion is a requeue, never a wait inside the reconcile (a
/// replica that loses its lease must not keep polling, let alone retrying).
/// `poll` is how long to wait before the next look (backing off while the
/// same deletion runs).
fn purge(deletion: Option<DeleteStatus>, room_id: &str, poll: Duration) -> CleanupPlan {
    let start = |retrying| CleanupPlan {
        steps: vec![Step::Purge { retrying }],
        then: Cleanup::Pending(poll),
        finished: None,
    };
    match deletion {
        None => start(None),
        Some(DeleteStatus::Failed(why)) => start(Some(why)),
        Some(DeleteStatus::InProgress) => CleanupPlan {
            then: Cleanup::Pending(poll),
            ..CleanupPlan::done()
        },
        Some(DeleteStatus::Complete) => CleanupPlan {
            finished: Some(("RoomPurged", format!("deleted and purged {room_id}"))),
            ..CleanupPlan::done()
        },
    }
}

pub(super) async fn cleanup(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
) -> Result<Cleanup, Error> {
    if holds_alias(room, ctx).is_err() || room.spec.deletion_policy == RoomDeletionPolicy::Retain {
        return Ok(Cleanup::Done);
    }
    let result = clean(room, ctx).await;
    if let Err(error) = &result {
        status::cleanup_failed(room, api, error).await;
    }
    result
}

/// The deletion Synapse has on record for the room this object's status
/// names, when its policy is Purge: only the operator deletes its rooms,
/// so one on record was begun by an earlier pass of this cleanup.
async fn purge_begun(
    room: &MatrixRoom,
    ctx: &RoomContext,
) -> Result<Option<(String, DeleteStatus)>, Error> {
    if room.spec.deletion_policy != RoomDeletionPolicy::Purge {
        return Ok(None);
    }
    let Some(room_id) = room.status.as_ref().and_then(|s| s.room_id.clone()) else {
        return Ok(None);
    };
    let deletion = ctx.synapse.room_delete_status(&room_id).await?;
    Ok(deletion.map(|d| (room_id, d)))
}

/// Observes the room, plans its cleanup by policy, and applies the plan.
async fn clean(room: &MatrixRoom, ctx: &RoomContext) -> Result<Cleanup, Error> {
    let alias = full_alias(room, ctx)?;
    let poll = || ctx.purge_polls.next_delay(&key(room));
    let (room_id, plan) = match purge_begun(room, ctx).await? {
        // Mid-purge the room no longer reads as ours (Synapse has made the
        // admin account leave): the deletion's own status says when it ends.
        Some((room_id, deletion)) => {
            let plan = purge(Some(deletion), &room_id, poll());
            (room_id, plan)
        }
        None => {
            let Located::Ours(room_id, state) = locate(room, &alias, ctx, true).await? else {
                // Gone already, or never ours: nothing to clean.
                return Ok(Cleanup::Done);
            };
            let plan = match room.spec.deletion_policy {
                RoomDeletionPolicy::Retain => CleanupPlan::done(),
                RoomDeletionPolicy::Close => {
                    close(&desired(room, ctx, BTreeMap::new(), None), &state, &room_id)
                }
                RoomDeletionPolicy::Purge => {
                    let mut plan = purge(None, &room_id, poll());
                    let d = desired(room, ctx, BTreeMap::new(), None);
                    plan.steps.splice(0..0, unlist(&d, &state));
                    plan
                }
            };
            (room_id, plan)
        }
    };
    for step in &plan.steps {
        match step {
            Step::Unlist(members) => direct::unlist(room, &room_id, members, ctx).await?,
            Step::Room(action) => {
                let parsed = RoomId::parse(&room_id).map_err(|e| Error::Invalid(e.to_string()))?;
                apply_action(&room_id, &parsed, action, ctx).await?;
                audit(room, &room_id, &action.describe());
            }
            Step::DropAlias => {
                if ctx.synapse.resolve_alias(&alias).await?.as_deref() == Some(room_id.as_str()) {
                    ctx.synapse.delete_alias(&alias).await?;
                    audit(room, &room_id, "drop alias");
                }
            }
            Step::Leave => {
                ctx.synapse.leave(&room_id).await?;
                audit(room, &room_id, "leave");
            }
            Step::Purge { retrying } => {
                if let Some(why) = retrying {
                    tracing::warn!(room = %key(room), room_id, why, "room deletion failed; retrying");
                }
                ctx.synapse.delete_room(&room_id, true).await?;
                let action = match retrying {
                    Some(_) => "delete and purge (retry)",
                    None => "delete and purge",
                };
                audit(room, &room_id, action);
            }
        }
    }
    if let Some((reason, note)) = &plan.finished {
        record(room, ctx, EventType::Normal, reason, note);
    }
    if plan.then == Cleanup::Done {
        ctx.purge_polls.reset(&key(room));
    }
    Ok(plan.then)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::room::plan::tests::{desired, ADMIN};
    use crate::synapse::rooms::StateEvent;
    use serde_json::json;

    /// The plan module's fixture room, with no members of its own.
    fn desired_room() -> DesiredRoom {
        DesiredRoom {
            members: BTreeMap::new(),
            ..desired()
        }
    }

    /// A room with these members, as `GET /state` returns it.
    fn state(members: &[(&str, &str)]) -> RoomState {
        let events = members
            .iter()
            .map(|(user, membership)| StateEvent {
                kind: "m.room.member".into(),
                state_key: user.to_string(),
                sender: user.to_string(),
                content: json!({"membership": membership}),
            })
            .collect();
        RoomState::from_events(events)
    }

    #[test]
    fn closing_removes_local_members_then_drops_the_alias_and_leaves() {
        let s = state(&[
            (ADMIN, "join"),
            ("@alice:x", "join"),
            ("@bob:x", "invite"),
            ("@gone:x", "leave"),
            ("@remote:y", "join"),
        ]);
        let plan = close(&desired_room(), &s, "!r:x");
        assert_eq!(
            plan.steps,
            [
                Step::Room(RoomAction::Kick("@alice:x".into())),
                Step::Room(RoomAction::Kick("@bob:x".into())),
                Step::DropAlias,
                Step::Leave,
            ]
        );
        assert_eq!(plan.then, Cleanup::Done);
        assert_eq!(plan.finished, Some(("RoomClosed", "closed !r:x".into())));
    }

    #[test]
    fn closing_a_direct_room_unlists_it_for_its_local_members_first() {
        let s = state(&[
            (ADMIN, "join"),
            ("@alice:x", "join"),
            ("@bob:x", "leave"),
            ("@remote:y", "join"),
        ]);
        let d = DesiredRoom {
            direct: true,
            ..desired_room()
        };
        let plan = close(&d, &s, "!r:x");
        assert_eq!(
            plan.steps,
            [
                Step::Unlist(vec!["@alice:x".into(), "@bob:x".into()]),
                Step::Room(RoomAction::Kick("@alice:x".into())),
                Step::DropAlias,
                Step::Leave,
            ]
        );
        assert_eq!(unlist(&desired_room(), &s), None, "only a direct room");
    }

    #[test]
    fn a_room_the_admin_left_is_closed_already() {
        let s = state(&[(ADMIN, "leave"), ("@alice:x", "join")]);
        assert_eq!(close(&desired_room(), &s, "!r:x"), CleanupPlan::done());
    }

    #[test]
    fn a_running_purge_is_looked_at_less_and_less_often() {
        let polls = purge_polls();
        let waits: Vec<Duration> = (0..12).map(|_| polls.next_delay("t/r")).collect();
        assert!(waits[0] <= PURGE_POLL.mul_f64(1.2), "{waits:?}");
        assert!(waits[4] >= PURGE_POLL * 8 / 2, "backs off: {waits:?}");
        assert!(
            waits.iter().all(|w| *w <= PURGE_POLL_MAX.mul_f64(1.2)),
            "{waits:?}"
        );
        assert!(waits[11] >= PURGE_POLL_MAX.mul_f64(0.8), "{waits:?}");
        polls.reset("t/r");
        assert!(polls.next_delay("t/r") <= PURGE_POLL.mul_f64(1.2));
    }

    #[test]
    fn purging_starts_once_then_waits_as_a_requeue() {
        let started = purge(None, "!r:x", PURGE_POLL);
        assert_eq!(started.steps, [Step::Purge { retrying: None }]);
        assert_eq!(started.then, Cleanup::Pending(PURGE_POLL));
        assert_eq!(started.finished, None);

        let running = purge(Some(DeleteStatus::InProgress), "!r:x", PURGE_POLL);
        assert!(
            running.steps.is_empty(),
            "a running deletion is not started again"
        );
        assert_eq!(running.then, Cleanup::Pending(PURGE_POLL));
    }

    #[test]
    fn a_failed_purge_is_retried_and_a_complete_one_releases() {
        let retried = purge(
            Some(DeleteStatus::Failed("boom".into())),
            "!r:x",
            PURGE_POLL,
        );
        assert_eq!(
            retried.steps,
            [Step::Purge {
                retrying: Some("boom".into())
            }]
        );
        assert_eq!(retried.then, Cleanup::Pending(PURGE_POLL));

        let complete = purge(Some(DeleteStatus::Complete), "!r:x", PURGE_POLL);
        assert!(complete.steps.is_empty());
        assert_eq!(complete.then, Cleanup::Done);
        assert_eq!(
            complete.finished,
            Some(("RoomPurged", "deleted and purged !r:x".into()))
        );
    }
}
