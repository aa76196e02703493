//! `MatrixRoom` controller, with every `RoomPermission` naming a room folded
//! into that room's reconcile: one state read, at most one power-levels write.
//!
//! The reconcile below reads top to bottom: fold the desired room from the
//! caches (`desired`), find the room in Synapse (`observe`), plan (`plan`),
//! apply (`apply`, with `direct` and `publish`), write the status from the
//! one `status::Ending` that came out (`status::write`, the only place).
//! The values the steps hand each other live in `model`, so no step
//! imports another's types and the modules form no circle. Deletion is
//! `cleanup`; `triggers` maps watch events to the rooms they concern.

mod apply;
mod cleanup;
mod desired;
mod direct;
pub mod fold;
mod model;
mod observe;
pub mod plan;
mod publish;
mod status;
pub mod tree;
mod triggers;

pub(crate) use status::write_permission_status;
pub use triggers::{run, Caches, Triggers};

use super::audit::Subject;
use super::backoff::jitter;
use super::events::Recorder;
use super::index::Index;
use super::memo;
use super::outcome::{self, Outcome};
use super::sweep::Trust;
use super::{key, Error, OperatorConfig, ReconcileStats};
use crate::api::conditions::{self, READY};
use crate::api::room::JoinRule;
use crate::api::{Confirmed, MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use crate::synapse::SynapseClient;
use desired::{permissions_of, users_in_flight};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use model::{Blocked, Found, Located, ALIAS_CONFLICT};
use status::Ending;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Annotation the application-service endpoint sets to signal drift.
pub const DRIFT_ANNOTATION: &str = "matrix.openmeet.net/drift-event";
/// Condition reporting directory publication.
pub const PUBLISHED: &str = "Published";

/// Shared by every room reconcile.
pub struct RoomContext {
    pub client: Client,
    pub synapse: SynapseClient,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub rooms: Store<MatrixRoom>,
    pub users: Store<MatrixUser>,
    pub permissions: Store<RoomPermission>,
    /// Permissions by room and by user.
    pub permission_index: Arc<Index<RoomPermission>>,
    /// Grants admitting references across namespaces, by namespace.
    pub grants: Store<MatrixUserGrant>,
    pub grant_index: Arc<Index<MatrixUserGrant>>,
    /// Rooms by alias and parent.
    pub room_index: Arc<Index<MatrixRoom>>,
    pub backoff: super::backoff::Backoff,
    /// How long to wait between looks at a running purge, per room.
    pub purge_polls: super::backoff::Backoff,
    pub stats: Arc<ReconcileStats>,
    /// Admin joins in flight: their membership events are not drift.
    pub own_joins: Arc<super::own_joins::OwnJoins>,
    /// What each room was last converged to here: tells drift from spec
    /// changes, and a failure from a confirmation written before it.
    memo: super::memo::ConvergedMemo,
    /// When a converged room is read again.
    pub sweep: Arc<super::sweep::Sweep>,
    pub leading: super::Leading,
}

pub async fn reconcile(room: Arc<MatrixRoom>, ctx: Arc<RoomContext>) -> Result<Action, Error> {
    let Some(room) = ctx.leading.current(room, &ctx.rooms).await else {
        return Ok(Action::await_change());
    };
    let timer = ctx.stats.start(triggers::KIND, &key(room.as_ref()));
    let api: Api<MatrixRoom> = super::own_namespace(&ctx.client, room.as_ref())?;
    let (result, written) = outcome::noting(super::finalizer::reconcile(
        &api,
        room.as_ref(),
        |_| apply(&room, &api, &ctx),
        || cleanup::cleanup(&room, &api, &ctx),
    ))
    .await;
    ctx.stats.room_reconciles.fetch_add(1, Ordering::Relaxed);
    let before = room
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY));
    timer.finish(Outcome::of(&result, written, before));
    result
}

fn error_policy(room: Arc<MatrixRoom>, error: &Error, ctx: Arc<RoomContext>) -> Action {
    super::retry_after(room.as_ref(), error, &ctx.backoff, &ctx.stats.room_failures)
}

/// Converges one room, as one pipeline: fold the desired room, observe,
/// plan and apply (`converge`), then write the status from the one
/// [`Ending`] that came out of it.
async fn apply(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
) -> Result<Action, Error> {
    let resync = Action::requeue(jitter(ctx.config.resync_interval));
    let perms = permissions_of(room, ctx);
    let wanted = match desired::fold_desired(room, ctx, &perms)? {
        Ok(wanted) => wanted,
        Err(held) => {
            let no_outcomes = Default::default();
            let ending = Ending::Blocked(held.blocked);
            status::write(room, api, ctx, &perms, &no_outcomes, &ending).await?;
            return Ok(held.retry.map_or(resync, Action::requeue));
        }
    };
    // A held room comes back by itself (its parent's changes trigger it); the requeue is a fallback.
    let next = wanted
        .held
        .as_ref()
        .and_then(|h| h.retry)
        .map_or_else(|| resync.clone(), Action::requeue);
    tracing::debug!(room = %key(room), version = ?room.metadata.resource_version, members = wanted.desired.members.len(), held = ?wanted.held, "room reconcile");
    if wanted.held.is_none() {
        if let Some(wait) = users_in_flight(&perms, ctx) {
            tracing::debug!(room = %key(room), "waiting for users in flight");
            // Users being created right now: fold them in one go, not one write each.
            return Ok(Action::requeue(wait));
        }
    }
    let fingerprint = wanted.fingerprint(room);
    let digest = memo::digest(fingerprint, drift_mark(room).as_deref());
    if let Some(wait) = trusted_for(room, ctx, &digest) {
        // Converged to this very digest, and not due: nothing to read.
        tracing::debug!(room = %key(room), "trusted: confirmed for this digest");
        return Ok(Action::requeue(
            wait.min(jitter(ctx.config.resync_interval)),
        ));
    }
    let ending = match (&wanted.held, room_id_of(room)) {
        // Held, and nothing in Synapse to enforce yet: wait without touching it.
        (Some(held), None) => Ending::Blocked(held.blocked.clone()),
        _ => converge(room, ctx, &wanted, fingerprint).await.into(),
    };
    status::write(room, api, ctx, &perms, &wanted.outcomes, &ending).await?;
    match ending {
        Ending::Applied(_) => {
            ctx.backoff.reset(&key(room));
            ctx.memo
                .record(&key(room), fingerprint, Confirmed::now(digest));
            Ok(next)
        }
        Ending::Blocked(_) => Ok(next),
        Ending::Failed(error) => {
            ctx.memo.record_failure(&key(room));
            if error.is_transient() {
                return Err(error);
            }
            Ok(resync)
        }
    }
}

/// The last drift mark the feed set on the object.
pub(super) fn drift_mark(room: &MatrixRoom) -> Option<String> {
    room.annotations().get(DRIFT_ANNOTATION).cloned()
}

/// Whether the room was last converged to this desired state, in this
/// process or (after a restart) as its status's confirmation records.
fn converged_to(room: &MatrixRoom, ctx: &RoomContext, fingerprint: u64) -> bool {
    ctx.memo.same_desired(&key(room), fingerprint)
        || room
            .status
            .as_ref()
            .and_then(|s| s.confirmed.as_ref())
            .is_some_and(|c| memo::digest_answers(&c.digest, fingerprint))
}

/// How long the room may go unread: its status confirms this digest, no
/// failure came after, and the sweep is not due (or has no slot for it
/// yet). `None`: read Synapse now.
fn trusted_for(room: &MatrixRoom, ctx: &RoomContext, digest: &str) -> Option<Duration> {
    if ctx.memo.failed_last(&key(room)) {
        return None;
    }
    let in_status = room.status.as_ref().and_then(|s| s.confirmed.as_ref());
    let here = ctx.memo.confirmed(&key(room));
    match ctx.sweep.judge(in_status, here.as_ref(), digest) {
        Trust::Trusted { due_in } => Some(due_in),
        // One state read.
        Trust::Due => ctx.sweep.reserve(&key(room), 1),
        Trust::Unconfirmed => None,
    }
}

/// The room id the object's status names.
fn room_id_of(room: &MatrixRoom) -> Option<&str> {
    room.status.as_ref().and_then(|s| s.room_id.as_deref())
}

/// Finds (or creates) the room, plans it against what Synapse holds, and
/// applies the plan. A held room is never created, and applies its
/// removals only, unless its parent is gone (then it stands alone).
async fn converge(
    room: &MatrixRoom,
    ctx: &RoomContext,
    wanted: &model::Wanted,
    fingerprint: u64,
) -> Result<Result<status::AppliedEnding, Blocked>, Error> {
    // After an alias conflict the room may be found under the alias only.
    let resolve = status::previous_reason(room) == Some(ALIAS_CONFLICT);
    let alias = &wanted.alias;
    let found = match observe::locate(room, alias, ctx, resolve).await? {
        Located::Ours(room_id, state) => Found {
            room_id,
            state,
            created: false,
        },
        Located::Foreign(id) => {
            return Ok(Err(Blocked::alias_conflict(format!(
                "alias {alias} points at room {id}, which is not this object's"
            ))))
        }
        Located::Absent => {
            if let Some(held) = &wanted.held {
                return Ok(Err(held.blocked.clone()));
            }
            match apply::create(room, ctx, wanted).await? {
                Ok(found) => found,
                Err(blocked) => return Ok(Err(blocked)),
            }
        }
    };
    let desired = &wanted.desired;
    let removals_only = wanted.removals_only();
    if !removals_only {
        if let Some(refusal) = plan::refusal(desired, &found.state) {
            return Ok(Err(Blocked::new(refusal.reason, refusal.message)));
        }
    }
    let mut room_plan = plan::plan(desired, &found.state);
    if plan::removes_members(&room_plan) && desired.join_rule == JoinRule::Restricted {
        // Members of the parent space may be here through the join rule;
        // while the parent is unknown, the space the room admits through.
        let admitting = match removals_only {
            true => desired
                .parent
                .clone()
                .or_else(|| plan::admitting_space(&found.state)),
            false => desired.parent.clone(),
        };
        if let Some(parent) = &admitting {
            let members = observe::joined_members_of(parent, ctx).await?;
            room_plan = plan::plan_with(desired, &found.state, Some(&members));
        }
    }
    if removals_only {
        room_plan = plan::removals_only(room_plan);
    }
    let applied = apply::apply(room, ctx, wanted, found, room_plan, fingerprint).await?;
    Ok(Ok(status::AppliedEnding {
        applied,
        held: wanted.held.as_ref().map(|h| h.blocked.clone()),
    }))
}

/// One audit line per Synapse mutation of this room.
fn audit(room: &MatrixRoom, room_id: &str, action: &str) {
    super::audit::mutation(room, action, Subject::Room { room_id });
}

/// An Event on the room object.
fn record(room: &MatrixRoom, ctx: &RoomContext, type_: EventType, reason: &str, note: &str) {
    super::audit::publish(
        &ctx.recorder,
        room,
        type_,
        reason,
        "Converge",
        note.to_string(),
    );
}

#[cfg(test)]
mod tests {
    //! Reconcile-level: the exchange with the API server of a room held
    //! back before Synapse (its parent space is missing). Everything that
    //! reaches Synapse is on the real stack, in the integration suite.
    use super::*;
    use crate::controller::index::keys;
    use crate::controller::scripted::{self, ready_of, refuse, status_server, status_written};
    use crate::controller::FINALIZER;
    use kube::runtime::{reflector, watcher};
    use serde_json::Value;
    use std::time::Duration;

    fn room(status: Option<Value>) -> MatrixRoom {
        let mut room: MatrixRoom = serde_yaml::from_str(&format!(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: MatrixRoom
metadata: {{name: r, namespace: t, generation: 2, uid: u-r, resourceVersion: "10", finalizers: [{FINALIZER}]}}
spec: {{name: R, alias: r, parentRef: {{name: group-space}}}}
"#
        ))
        .unwrap();
        room.status = status.map(|s| serde_json::from_value(s).unwrap());
        room
    }

    fn permission(user: &str, status: Option<Value>) -> RoomPermission {
        let mut p: RoomPermission = serde_yaml::from_str(&format!(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: RoomPermission
metadata: {{name: {user}-r, namespace: t, generation: 1, uid: u-{user}}}
spec: {{roomRef: {{name: r}}, userRef: {{name: {user}}}}}
"#
        ))
        .unwrap();
        p.status = status.map(|s| serde_json::from_value(s).unwrap());
        p
    }

    fn context(client: Client, room: &MatrixRoom, perms: &[RoomPermission]) -> Arc<RoomContext> {
        let (rooms, mut room_writer) = reflector::store();
        let room_index = Index::new(keys::room);
        let event = watcher::Event::Apply(room.clone());
        room_writer.apply_watcher_event(&event);
        room_index.observe(&event);
        let (permissions, mut perm_writer) = reflector::store();
        let permission_index = Index::new(keys::permission);
        for p in perms {
            let event = watcher::Event::Apply(p.clone());
            perm_writer.apply_watcher_event(&event);
            permission_index.observe(&event);
        }
        let (users, _) = reflector::store();
        Arc::new(RoomContext {
            recorder: scripted::recorder(client.clone()),
            client,
            synapse: scripted::unreachable_synapse(),
            config: scripted::config(),
            rooms,
            users,
            permissions,
            permission_index,
            room_index,
            grants: reflector::store().0,
            grant_index: Index::new(keys::grant),
            backoff: crate::controller::default_backoff(),
            purge_polls: cleanup::purge_polls(),
            stats: Default::default(),
            own_joins: Default::default(),
            memo: Default::default(),
            sweep: Arc::new(crate::controller::sweep::Sweep::new(
                std::time::Duration::from_secs(3600),
                1.0,
            )),
            leading: crate::controller::Leading::always(),
        })
    }

    #[tokio::test]
    async fn a_room_held_back_before_synapse_says_why_once_on_itself_and_its_permissions() {
        let (obj, perms) = (
            room(None),
            [permission("alice", None), permission("bob", None)],
        );
        let (answer_room, answer_perms) = (obj.clone(), perms.clone());
        let (client, recorded) = scripted::client(status_server(move |name| {
            if name == "r" {
                return serde_json::to_value(&answer_room).unwrap();
            }
            let p = answer_perms.iter().find(|p| p.name_any() == name).unwrap();
            serde_json::to_value(p).unwrap()
        }));
        let ctx = context(client, &obj, &perms);
        let action = reconcile(Arc::new(obj), ctx.clone()).await.unwrap();
        // The parent's own changes trigger the room; the requeue is a fallback.
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        assert_eq!(
            ctx.synapse.stats().reads() + ctx.synapse.stats().writes(),
            0
        );

        // One status apply each, and one Event each for the transition.
        let sent = recorded.expect(6).await;
        let room_status = status_written(&sent, "r");
        let ready = ready_of(&room_status);
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "ParentNotFound");
        assert_eq!(ready["observedGeneration"], 2);
        assert!(room_status.get("roomId").is_none(), "{room_status}");
        let (alice, bob) = (
            status_written(&sent, "alice-r"),
            status_written(&sent, "bob-r"),
        );
        for status in [&alice, &bob] {
            let ready = ready_of(status);
            assert_eq!(ready["reason"], "RoomNotReady");
            assert_eq!(
                ready["message"],
                "room: parent MatrixRoom group-space does not exist"
            );
        }
        let events: Vec<_> = sent.iter().filter(|x| x.path.contains("/events")).collect();
        assert_eq!(events.len(), 3);
        assert!(events
            .iter()
            .any(|e| e.body["reason"] == "ParentNotFound" && e.body["type"] == "Warning"));

        // The next pass finds every status as it would write it: nothing sent.
        let obj = room(Some(room_status));
        let perms = [
            permission("alice", Some(alice)),
            permission("bob", Some(bob)),
        ];
        let (client, recorded) = scripted::client(refuse);
        let ctx = context(client, &obj, &perms);
        reconcile(Arc::new(obj), ctx).await.unwrap();
        recorded.expect(0).await;
    }
}
