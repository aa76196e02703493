//! The room's status and its permissions' statuses, written only when they
//! change. A converged status needs an [`Applied`]: only the apply step
//! makes one, so Ready=True is never written for a room not applied.

use super::apply::Applied;
use super::fold::PermissionOutcome;
use super::model::{Blocked, Refusals};
use super::{record, RoomContext};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{Confirmed, MatrixRoom, MatrixRoomStatus, RoomPermission, RoomPermissionStatus};
use crate::controller::events::{self, Recorder};
use crate::controller::{self, audit, key, memo, outcome, Error};
use futures::StreamExt;
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Permission status writes in flight at once for one room.
const PERMISSION_WRITES: usize = 8;

/// The Ready reason the object's status had before this reconcile.
pub(super) fn previous_reason(room: &MatrixRoom) -> Option<&str> {
    room.status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.as_str())
}

/// How a room's reconcile ended: the one value its status is written from.
pub(super) enum Ending {
    /// Applied to Synapse (what Synapse refused for good is in it); still
    /// held back when `held` says why.
    Applied(Box<AppliedEnding>),
    /// Nothing applied: why not.
    Blocked(Blocked),
    /// The convergence failed (a transient failure is retried).
    Failed(Error),
}

pub(super) struct AppliedEnding {
    pub applied: Applied,
    pub held: Option<Blocked>,
}

impl From<Result<Result<AppliedEnding, Blocked>, Error>> for Ending {
    fn from(result: Result<Result<AppliedEnding, Blocked>, Error>) -> Self {
        match result {
            Ok(Ok(applied)) => Ending::Applied(Box::new(applied)),
            Ok(Err(blocked)) => Ending::Blocked(blocked),
            Err(error) => Ending::Failed(error),
        }
    }
}

/// The one place a room's status (and its permissions') is written from.
/// Returns the resourceVersion our own write produced, if any.
pub(super) async fn write(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    outcomes: &BTreeMap<String, PermissionOutcome>,
    ending: &Ending,
) -> Result<Option<String>, Error> {
    match ending {
        Ending::Applied(ending) => match &ending.held {
            None => converged(room, api, ctx, perms, outcomes, &ending.applied).await,
            // Enforced what it could; still held back.
            Some(held) => blocked(room, api, ctx, perms, held).await,
        },
        Ending::Blocked(held) => blocked(room, api, ctx, perms, held).await,
        Ending::Failed(error) => {
            failed(room, api, ctx, perms, outcomes, error).await;
            Ok(None)
        }
    }
}

/// Writes the converged status from what was applied, then the permissions'.
/// Returns the resourceVersion the status write produced (our own write).
async fn converged(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    outcomes: &BTreeMap<String, PermissionOutcome>,
    applied: &Applied,
) -> Result<Option<String>, Error> {
    let refused = applied.refused();
    let ready = if refused.is_empty() {
        Condition::new(
            READY,
            true,
            "Converged",
            "room matches the spec",
            room.metadata.generation,
        )
    } else {
        // The rest was applied; what was refused waits for a change.
        let ready = Condition::new(
            READY,
            false,
            SYNAPSE_REJECTED,
            refused.summary(),
            room.metadata.generation,
        );
        if previous_reason(room) != Some(SYNAPSE_REJECTED) {
            record(
                room,
                ctx,
                EventType::Warning,
                SYNAPSE_REJECTED,
                &ready.message,
            );
        }
        ready
    };
    let mut next = vec![ready];
    next.extend(applied.published().cloned());
    let version = write_room_status(room, api, Facts::Applied(applied), next).await?;
    write_permission_statuses(ctx, perms, outcomes, &RoomReadiness::Converged(refused)).await?;
    Ok(version)
}

/// The reason of a write Synapse refused for good.
const SYNAPSE_REJECTED: &str = "SynapseRejected";

/// Records a blocked room: condition, a Warning on transition, and its
/// permissions waiting for it. Returns the resourceVersion the status write
/// produced (our own write).
async fn blocked(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    blocked: &Blocked,
) -> Result<Option<String>, Error> {
    if previous_reason(room) != Some(blocked.reason) {
        record(
            room,
            ctx,
            EventType::Warning,
            blocked.reason,
            &blocked.message,
        );
    }
    let ready = Condition::new(
        READY,
        false,
        blocked.reason,
        blocked.message.clone(),
        room.metadata.generation,
    );
    let facts = if blocked.keeps_room() {
        Facts::Kept
    } else {
        Facts::Cleared
    };
    let version = write_room_status(room, api, facts, vec![ready]).await?;
    let not_ready = RoomReadiness::NotReady(format!("room: {}", blocked.message));
    write_permission_statuses(ctx, perms, &BTreeMap::new(), &not_ready).await?;
    Ok(version)
}

/// Records a failed converge, best effort (the error itself is what the
/// caller returns). A transient failure (a Synapse blip, a leader
/// hand-over) keeps the last verdict and notes the retry in `Reconciling`
/// on the room alone: nothing is written to its permissions, so an outage
/// costs one write per room, not one per permission. A failure that waits
/// for a change sets Ready=False on the room and its permissions, with a
/// Warning Event.
async fn failed(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    outcomes: &BTreeMap<String, PermissionOutcome>,
    error: &Error,
) {
    if error.is_transient() {
        if conditions::current_and_true(
            room.status.as_ref().map(|s| &s.conditions[..]),
            room.metadata.generation,
        ) {
            // Converged for this generation: nothing waits on the retry.
            return;
        }
        let note = Condition::new(
            conditions::RECONCILING,
            true,
            error.reason(),
            format!("retrying: {error}"),
            room.metadata.generation,
        );
        if let Err(e) = write_room_status(room, api, Facts::Kept, vec![note]).await {
            tracing::warn!(room = %key(room), error = %e, "could not record the retry in status");
        }
        return;
    }
    let ready = Condition::new(
        READY,
        false,
        error.reason(),
        error.to_string(),
        room.metadata.generation,
    );
    if let Err(e) = write_room_status(room, api, Facts::Kept, vec![ready]).await {
        tracing::warn!(room = %key(room), error = %e, "could not record failure in status");
    }
    let not_ready = RoomReadiness::NotReady(error.to_string());
    let _ = write_permission_statuses(ctx, perms, outcomes, &not_ready).await;
    record(
        room,
        ctx,
        EventType::Warning,
        error.reason(),
        &error.to_string(),
    );
}

/// Records a failed cleanup on the room, best effort.
pub(super) async fn cleanup_failed(room: &MatrixRoom, api: &Api<MatrixRoom>, error: &Error) {
    let ready = Condition::new(
        READY,
        false,
        error.reason(),
        format!("cleanup: {error}"),
        room.metadata.generation,
    );
    let _ = write_room_status(room, api, Facts::Kept, vec![ready]).await;
}

/// What the status says about the room in Synapse.
enum Facts<'a> {
    /// What this reconcile applied and read back.
    Applied(&'a Applied),
    /// As the last status had it: the room is still this object's.
    Kept,
    /// Nothing: the room is not this object's.
    Cleared,
}

async fn write_room_status(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    facts: Facts<'_>,
    next: Vec<Condition>,
) -> Result<Option<String>, Error> {
    if let Some(ready) = conditions::find(&next, READY) {
        outcome::note(ready);
    }
    let existing = room.status.clone().unwrap_or_default();
    // What Synapse was read and written for (refusals included: they are
    // for good, and come back with the next change or the sweep).
    let facts_confirm = match &facts {
        Facts::Applied(applied) => Some(applied.fingerprint()),
        _ => None,
    };
    let (room_id, canonical_alias, joined_members) = match facts {
        Facts::Applied(applied) => (
            Some(applied.room_id().to_string()),
            Some(applied.canonical_alias().to_string()),
            Some(applied.joined_members() as i64),
        ),
        Facts::Kept => (
            existing.room_id.clone(),
            existing.canonical_alias.clone(),
            existing.joined_members,
        ),
        Facts::Cleared => (None, None, None),
    };
    let next = next
        .into_iter()
        .flat_map(|c| match c.type_.as_str() {
            READY => conditions::with_kstatus(c),
            _ => vec![c],
        })
        .collect();
    // A converged room's confirmation; any other ending withdraws it.
    let confirmed = facts_confirm.map(|fingerprint| {
        Confirmed::now(memo::digest(
            fingerprint,
            super::drift_mark(room).as_deref(),
        ))
    });
    let status = MatrixRoomStatus {
        room_id,
        canonical_alias,
        joined_members,
        conditions: conditions::merge(&existing.conditions, next, now()),
        observed_generation: room.metadata.generation,
        confirmed,
    };
    if status == existing {
        return Ok(room.resource_version());
    }
    controller::apply_status(api, room, &status).await
}

/// How the room's own reconcile went, which its permissions' statuses follow.
enum RoomReadiness<'a> {
    /// Applied; each member's own refusals (if any) say more than the room.
    Converged(&'a Refusals),
    /// The room is blocked or failed: every permission waits for it.
    NotReady(String),
}

/// Writes each permission's status from the room's outcome (only when it
/// changed), a few at once: a room with many permissions is not written one
/// round trip after another. Every write is tried; the first error is returned.
async fn write_permission_statuses(
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    outcomes: &BTreeMap<String, PermissionOutcome>,
    room: &RoomReadiness<'_>,
) -> Result<(), Error> {
    // Collected first: a lazy iterator's closure in the stream trips the
    // compiler's proof that the reconcile's future is Send.
    let writes: Vec<_> = perms
        .iter()
        .filter_map(|p| {
            let (ready, level) = permission_ready(p, outcomes.get(&p.name_any()), room)?;
            Some(write_permission_status(
                &ctx.client,
                &ctx.recorder,
                p,
                level,
                ready,
            ))
        })
        .collect();
    futures::stream::iter(writes)
        .buffer_unordered(PERMISSION_WRITES)
        .fold(Ok(()), |first, result| async move { first.and(result) })
        .await
}

/// A permission's Ready condition and effective power level, from its own
/// outcome and the room's; `None` when there is nothing to say.
fn permission_ready(
    p: &RoomPermission,
    outcome: Option<&PermissionOutcome>,
    room: &RoomReadiness<'_>,
) -> Option<(Condition, Option<i64>)> {
    let generation = p.metadata.generation;
    Some(match (room, outcome) {
        (_, Some(PermissionOutcome::Duplicate(m))) => (
            Condition::new(READY, false, "Duplicate", m.clone(), generation),
            None,
        ),
        (_, Some(PermissionOutcome::Refused { reason, message })) => (
            Condition::new(READY, false, reason, message.clone(), generation),
            None,
        ),
        (_, Some(PermissionOutcome::Pending(m))) => (
            Condition::new(READY, false, "Pending", m.clone(), generation),
            None,
        ),
        (RoomReadiness::NotReady(m), _) => (
            Condition::new(READY, false, "RoomNotReady", m.clone(), generation),
            None,
        ),
        (
            RoomReadiness::Converged(refused),
            Some(PermissionOutcome::Applied {
                user_id,
                power_level,
            }),
        ) => match refused.of_member(user_id, *power_level) {
            Some(why) => (
                Condition::new(READY, false, SYNAPSE_REJECTED, why, generation),
                None,
            ),
            None => (
                Condition::new(
                    READY,
                    true,
                    "Converged",
                    format!("{user_id} has power level {power_level}"),
                    generation,
                ),
                Some(*power_level),
            ),
        },
        (RoomReadiness::Converged(_), None) => return None,
    })
}

/// Writes a permission's status, with an Event when its Ready reason changes
/// (Pending, Duplicate, Converged…): `kubectl describe` tells its story.
pub(crate) async fn write_permission_status(
    client: &Client,
    recorder: &Recorder,
    p: &RoomPermission,
    level: Option<i64>,
    ready: Condition,
) -> Result<(), Error> {
    outcome::note(&ready);
    let existing = p.status.clone().unwrap_or_default();
    if let Some(type_) =
        events::on_transition(conditions::find(&existing.conditions, READY), &ready)
    {
        audit::publish(
            recorder,
            p,
            type_,
            &ready.reason,
            "Reconcile",
            ready.message.clone(),
        );
    }
    let status = RoomPermissionStatus {
        effective_power_level: level,
        conditions: conditions::merge(&existing.conditions, conditions::with_kstatus(ready), now()),
        observed_generation: p.metadata.generation,
    };
    if status == existing {
        return Ok(());
    }
    let api: Api<RoomPermission> =
        Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
    match controller::apply_status(&api, p, &status).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to report on.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permission() -> RoomPermission {
        serde_yaml::from_str(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: RoomPermission
metadata: {name: alice, namespace: t, generation: 4}
spec: {roomRef: {name: r}, userRef: {name: alice}}
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_permission_follows_its_own_outcome_first_then_the_room() {
        let p = permission();
        let none = Refusals::default();
        let applied = PermissionOutcome::Applied {
            user_id: "@alice:x".into(),
            power_level: 50,
        };
        let (ready, level) =
            permission_ready(&p, Some(&applied), &RoomReadiness::Converged(&none)).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.is_true(), level),
            ("Converged", true, Some(50))
        );
        assert_eq!(ready.observed_generation, Some(4));

        let not_ready = RoomReadiness::NotReady("room: blocked".into());
        let (ready, level) = permission_ready(&p, Some(&applied), &not_ready).unwrap();
        assert_eq!((ready.reason.as_str(), level), ("RoomNotReady", None));

        let duplicate = PermissionOutcome::Duplicate("older one".into());
        let (ready, _) = permission_ready(&p, Some(&duplicate), &not_ready).unwrap();
        assert_eq!(
            ready.reason, "Duplicate",
            "its own refusal says more than the room's"
        );

        assert!(permission_ready(&p, None, &RoomReadiness::Converged(&none)).is_none());

        // Its own member's refusal, or the power levels' when it has a level.
        let mut refused = Refusals::default();
        refused
            .members
            .insert("@bob:x".into(), "join @bob:x: refused".into());
        let (ready, _) =
            permission_ready(&p, Some(&applied), &RoomReadiness::Converged(&refused)).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.is_true()),
            ("Converged", true)
        );
        refused.power_levels = Some("set m.room.power_levels: refused".into());
        let (ready, level) =
            permission_ready(&p, Some(&applied), &RoomReadiness::Converged(&refused)).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str(), level),
            ("SynapseRejected", "set m.room.power_levels: refused", None)
        );
        let member = PermissionOutcome::Applied {
            user_id: "@bob:x".into(),
            power_level: 0,
        };
        let (ready, _) =
            permission_ready(&p, Some(&member), &RoomReadiness::Converged(&refused)).unwrap();
        assert_eq!(ready.message, "join @bob:x: refused");
    }
}
