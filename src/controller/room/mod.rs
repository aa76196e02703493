//! `MatrixRoom` controller, with every `RoomPermission` naming a room folded
//! into that room's reconcile: one state read, at most one power-levels write.

pub mod fold;
pub mod plan;
pub mod tree;

use super::audit::Subject;
use super::backoff::jitter;
use super::events::Recorder;
use super::finalizer::Cleanup;
use super::memo::fingerprint;
use super::outcome::{self, Outcome};
use super::{claims, key};
use super::{Error, OperatorConfig, ReconcileStats};
use crate::api::conditions::{self, Condition, READY};
use crate::api::room::{JoinRule, RoomDeletionPolicy};
use crate::api::{MatrixRoom, MatrixRoomStatus, MatrixUser, RoomPermission, RoomPermissionStatus};
use crate::synapse::rooms::{CreateOutcome, DeleteStatus, MembershipAction, RoomState};
use crate::synapse::{SynapseClient, SynapseError};
use fold::{fold, PermissionOutcome, UserRefState};
use futures::{Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use plan::{create_body, marker_matches, plan, plan_close, DesiredRoom, RoomAction, Thresholds};
use ruma::{OwnedRoomAliasId, RoomAliasId, RoomId, UserId};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
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
    pub backoff: super::backoff::Backoff,
    pub stats: Arc<ReconcileStats>,
    /// What each room was last converged to: skips reconciles our own status
    /// writes cause, and tells drift from spec changes.
    memo: super::memo::ConvergedMemo,
}

/// The shared caches the room controller reads.
pub struct Caches {
    pub rooms: Store<MatrixRoom>,
    pub users: Store<MatrixUser>,
    pub permissions: Store<RoomPermission>,
}

/// The shared watch subscriptions that trigger room reconciles.
pub struct Triggers<A, B, C, D> {
    /// Every applied `MatrixRoom`.
    pub objects: A,
    /// Permissions, deletions included: each folds into its room.
    pub permissions: B,
    /// Users, deletions included: the rooms their permissions name.
    pub users: C,
    /// Rooms, deletions included: alias claimants decide again.
    pub peers: D,
}

/// Runs the `MatrixRoom` controller until `shutdown` resolves.
#[allow(clippy::too_many_arguments)]
pub async fn run<A, B, C, D>(
    caches: Caches,
    triggers: Triggers<A, B, C, D>,
    client: Client,
    synapse: SynapseClient,
    config: OperatorConfig,
    recorder: Recorder,
    stats: Arc<ReconcileStats>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
    B: Stream<Item = Arc<RoomPermission>> + Send + 'static,
    C: Stream<Item = Arc<MatrixUser>> + Send + 'static,
    D: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
{
    let ctx = Arc::new(RoomContext {
        client,
        synapse,
        config,
        recorder,
        rooms: caches.rooms.clone(),
        users: caches.users,
        permissions: caches.permissions.clone(),
        backoff: super::default_backoff(),
        stats,
        memo: Default::default(),
    });
    let perms_for_users = caches.permissions;
    let rooms_for_claims = caches.rooms.clone();
    let spaces = std::sync::Mutex::new(tree::SpaceIndex::default());
    let evict = ctx.clone();
    Controller::for_shared_stream(triggers.objects, caches.rooms)
        // A permission changed or went away: its room folds it in.
        .watches_shared_stream(triggers.permissions, |p: Arc<RoomPermission>| {
            Some(ObjectRef::new(&p.spec.room_ref.name).within(&p.namespace().unwrap_or_default()))
        })
        // A user changed (or went away): the rooms that reference it.
        .watches_shared_stream(triggers.users, move |u: Arc<MatrixUser>| {
            let ns = u.namespace().unwrap_or_default();
            let name = u.name_any();
            perms_for_users
                .state()
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(ns.as_str()) && p.spec.user_ref.name == name
                })
                .map(|p| ObjectRef::new(&p.spec.room_ref.name).within(&ns))
                .collect::<Vec<_>>()
        })
        // A room changed: its parents (old and new) and children see it;
        // when it went away, the others claiming its alias decide again.
        .watches_shared_stream(triggers.peers, move |r: Arc<MatrixRoom>| {
            let me = ObjectRef::from_obj(r.as_ref());
            let gone = rooms_for_claims.get(&me).is_none();
            if gone {
                evict.memo.forget(&key(r.as_ref()));
                evict.backoff.reset(&key(r.as_ref()));
            }
            let leaving = r.metadata.deletion_timestamp.is_some() || gone;
            let ns = r.namespace().unwrap_or_default();
            let parent = r.spec.parent_ref.as_ref().map(|p| p.name.as_str());
            let mut related: Vec<ObjectRef<MatrixRoom>> = spaces
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .update(&ns, &r.name_any(), parent.filter(|_| !gone))
                .into_iter()
                .map(|name| ObjectRef::new(&name).within(&ns))
                .collect();
            if leaving {
                related.extend(
                    rooms_for_claims
                        .state()
                        .iter()
                        .filter(|o| o.spec.alias == r.spec.alias)
                        .map(|o| ObjectRef::from_obj(o.as_ref()))
                        .filter(|o| *o != me),
                );
            }
            related
        })
        .with_config(super::controller_config(
            &ctx.config,
            Duration::from_millis(100),
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

pub async fn reconcile(room: Arc<MatrixRoom>, ctx: Arc<RoomContext>) -> Result<Action, Error> {
    let timer = ctx.stats.start("MatrixRoom");
    let api: Api<MatrixRoom> = super::own_namespace(&ctx.client, room.as_ref())?;
    let (result, written) = outcome::noting(super::finalizer::reconcile(
        &api,
        room.as_ref(),
        |own_version| apply(&room, &api, &ctx, own_version),
        || cleanup(&room, &api, &ctx),
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

/// The ownership marker state content for this object.
fn marker(room: &MatrixRoom) -> Value {
    json!({
        "namespace": room.namespace().unwrap_or_default(),
        "name": room.name_any(),
        "uid": room.metadata.uid.clone().unwrap_or_default(),
    })
}

fn full_alias(room: &MatrixRoom, ctx: &RoomContext) -> Result<OwnedRoomAliasId, Error> {
    let alias = format!(
        "#{}{}:{}",
        ctx.config.alias_prefix,
        room.spec.alias,
        ctx.synapse.server_name()
    );
    RoomAliasId::parse(&alias).map_err(|e| Error::Invalid(format!("alias {alias:?}: {e}")))
}

/// Whether this object holds its alias (oldest claim wins, homeserver-wide).
/// The message never names the holder, which may be another tenant's; the
/// operator's log does.
fn holds_alias(room: &MatrixRoom, ctx: &RoomContext) -> Result<(), String> {
    claims::check(&ctx.rooms.state(), room, |r| {
        r.spec.alias == room.spec.alias
    })
    .map_err(|holder| {
        tracing::info!(room = %key(room), %holder, "alias claimed by an older object");
        format!(
            "alias {:?} is already claimed by another, older MatrixRoom",
            room.spec.alias
        )
    })
}

/// The permissions naming this room, from the cache.
fn permissions_of(room: &MatrixRoom, ctx: &RoomContext) -> Vec<Arc<RoomPermission>> {
    let ns = room.namespace();
    let name = room.name_any();
    ctx.permissions
        .state()
        .into_iter()
        .filter(|p| p.namespace() == ns && p.spec.room_ref.name == name)
        .collect()
}

fn user_state(ctx: &RoomContext, ns: &str, name: &str) -> UserRefState {
    fold::user_ref_state(ctx.users.get(&ObjectRef::new(name).within(ns)).as_deref())
}

fn desired(
    room: &MatrixRoom,
    ctx: &RoomContext,
    members: BTreeMap<String, (crate::api::permission::Membership, i64)>,
    parent: Option<String>,
) -> DesiredRoom {
    let spec = &room.spec;
    // A space lists its children; an ordinary room's m.space.child events
    // are not the operator's (and cost nothing to leave alone).
    let children = spec.is_space().then(|| {
        let ns = room.namespace();
        let rooms: Vec<_> = ctx
            .rooms
            .state()
            .into_iter()
            .filter(|r| r.namespace() == ns)
            .collect();
        tree::children(room, &rooms)
    });
    DesiredRoom {
        alias_localpart: format!("{}{}", ctx.config.alias_prefix, spec.alias),
        name: spec.name.clone(),
        topic: spec.topic.clone(),
        avatar_url: spec.avatar_url.clone(),
        join_rule: spec.join_rule,
        history_visibility: spec.history_visibility,
        guest_access: spec.guest_access,
        encrypted: spec.encryption(),
        marker: marker(room),
        thresholds: Thresholds::from(spec.permissions.as_ref()),
        members,
        membership_policy: spec.membership_policy,
        admin: ctx.synapse.admin_user_id().to_string(),
        server_suffix: format!(":{}", ctx.synapse.server_name()),
        space: spec.is_space(),
        direct: spec.is_direct(),
        parent,
        children,
    }
}

/// The room's parent space, resolved from the cache.
fn parent_of(room: &MatrixRoom, ctx: &RoomContext) -> tree::Parent {
    let ns = room.namespace().unwrap_or_default();
    tree::parent(room, |name| {
        ctx.rooms.get(&ObjectRef::new(name).within(&ns))
    })
}

/// How long to wait for referenced users that are still being created: not
/// yet in the cache (the platform writes a user and its permissions
/// together), or not yet reconciled once. Bounded by age, so a permission
/// naming a user that never comes holds a room back for ten seconds, and a
/// user the operator has not reached yet for two minutes, at most. Each user
/// turning Ready triggers the room anyway; the requeue is only the fallback.
fn users_in_flight(perms: &[Arc<RoomPermission>], ctx: &RoomContext, ns: &str) -> Option<Duration> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let younger = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, secs: i64| {
        meta.creation_timestamp
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0).as_secs() < secs)
    };
    perms.iter().find_map(|p| {
        let in_flight = match ctx
            .users
            .get(&ObjectRef::new(&p.spec.user_ref.name).within(ns))
        {
            None => younger(&p.metadata, 10),
            Some(user) => {
                !conditions::observed(user.status.as_ref().and_then(|s| s.observed_generation))
                    && younger(&user.metadata, 120)
            }
        };
        in_flight.then_some(Duration::from_secs(5))
    })
}

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

/// Where the room is, if it exists and is this object's.
enum Located {
    Ours(String, RoomState),
    Absent,
    Foreign(String),
}

/// Finds the room: by status, else (when `resolve` is set) by alias; the
/// marker decides ownership. Without `resolve`, an unknown room is reported
/// absent: the create that follows takes the alias as its lock, and
/// `M_ROOM_IN_USE` sends it back here by alias.
async fn locate(
    room: &MatrixRoom,
    alias: &RoomAliasId,
    ctx: &RoomContext,
    resolve: bool,
) -> Result<Located, Error> {
    let known = room.status.as_ref().and_then(|s| s.room_id.clone());
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
        Some(_) => Ok(Located::Foreign(room_id)),
        None => Ok(Located::Foreign(room_id)),
    }
}

async fn apply(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    own_version: Option<String>,
) -> Result<Action, Error> {
    let resync = Action::requeue(jitter(ctx.config.resync_interval));
    let perms = permissions_of(room, ctx);
    let ns = room.namespace().unwrap_or_default();

    if let Err(message) = holds_alias(room, ctx) {
        blocked(room, api, ctx, &perms, "AliasConflict", message, false).await?;
        return Ok(resync);
    }
    let parent = match parent_of(room, ctx) {
        tree::Parent::None => None,
        tree::Parent::Ready(id) => Some(id),
        tree::Parent::Waiting { reason, message } => {
            // The parent's own changes trigger this room; the requeue is a fallback.
            blocked(room, api, ctx, &perms, reason, message, true).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        tree::Parent::Refused { reason, message } => {
            blocked(room, api, ctx, &perms, reason, message, true).await?;
            return Ok(resync);
        }
    };
    let alias = full_alias(room, ctx)?;
    let perm_refs: Vec<&RoomPermission> = perms.iter().map(|p| p.as_ref()).collect();
    let (members, outcomes) = fold(&perm_refs, |name| user_state(ctx, &ns, name));
    if room.spec.is_direct() {
        let declared = fold::declared_members(&perm_refs, &outcomes);
        if declared != 2 {
            let message = format!(
                "a Direct room has exactly two members; RoomPermissions declare {declared}"
            );
            blocked(room, api, ctx, &perms, "DirectMemberCount", message, true).await?;
            return Ok(resync);
        }
    }
    let desired = desired(room, ctx, members, parent);
    tracing::debug!(room = %key(room), version = ?room.metadata.resource_version, members = desired.members.len(), "room reconcile");
    if let Some(wait) = users_in_flight(&perms, ctx, &ns) {
        tracing::debug!(room = %key(room), "waiting for users in flight");
        // Users being created right now: fold them in one go, not one write each.
        return Ok(Action::requeue(wait));
    }
    // Permission outcomes are part of it: a new Pending or Duplicate
    // permission changes no member, but its status must still be written.
    let unlistable = unlistable_members(&desired, &perms, ctx, &ns);
    let fingerprint = fingerprint(&(
        &desired,
        &outcomes,
        room.spec.publish_to_directory,
        room.metadata.generation,
        &unlistable,
    ));
    let version = room.metadata.resource_version.as_deref();
    if ctx.memo.is_fresh(
        &key(room),
        version,
        fingerprint,
        super::freshness(&ctx.config),
    ) {
        // Only our own status writes happened since the last convergence.
        tracing::debug!(room = %key(room), "fresh: nothing changed since the last convergence");
        return Ok(resync);
    }
    let previous_reason = room
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    let resolve = previous_reason.as_deref() == Some("AliasConflict");

    let result: Result<Result<Converged, (&'static str, String)>, Error> = async {
        let (room_id, state, created) = match locate(room, &alias, ctx, resolve).await? {
            Located::Ours(id, state) => (id, state, false),
            Located::Foreign(id) => {
                return Ok(Err((
                    "AliasConflict",
                    format!("alias {alias} points at room {id}, which is not this object's"),
                )))
            }
            Located::Absent => match ctx.synapse.create_room(&create_body(&desired)).await? {
                CreateOutcome::Created(id) => {
                    record(
                        room,
                        ctx,
                        EventType::Normal,
                        "RoomCreated",
                        &format!("created {id} as {alias}"),
                    )
                    .await;
                    super::failpoint("after-room-create");
                    // Read what createRoom made: the plan below then only adds members.
                    let state = ctx.synapse.room_state(&id).await?.ok_or_else(|| {
                        Error::Synapse(SynapseError::Decode(format!(
                            "created room {id} is not readable"
                        )))
                    })?;
                    (id, state, true)
                }
                // Someone (maybe our own earlier, interrupted call) holds the alias: resolve, never retry.
                CreateOutcome::AliasInUse => match locate_by_alias(room, &alias, ctx).await? {
                    Some((id, state)) => (id, state, false),
                    None => {
                        return Ok(Err((
                            "AliasConflict",
                            format!("alias {alias} is in use by a room that is not this object's"),
                        )))
                    }
                },
            },
        };
        if let Some(refusal) = plan::refusal(&desired, &state) {
            return Ok(Err((refusal.reason, refusal.message)));
        }
        let mut room_plan = plan(&desired, &state);
        if plan::removes_members(&room_plan) && desired.join_rule == JoinRule::Restricted {
            // Members of the parent space may be here through the join rule.
            if let Some(parent) = &desired.parent {
                let members: BTreeSet<String> = ctx
                    .synapse
                    .room_state(parent)
                    .await?
                    .map(|s| {
                        s.memberships()
                            .into_iter()
                            .filter(|(_, m)| m == "join")
                            .map(|(u, _)| u)
                            .collect()
                    })
                    .unwrap_or_default();
                room_plan = plan::plan_with(&desired, &state, Some(&members));
            }
        }
        tracing::debug!(room = %key(room), room_id = %room_id, actions = ?room_plan.actions.iter().map(RoomAction::describe).collect::<Vec<_>>(), "planned");
        let drift = !created
            && !room_plan.actions.is_empty()
            && ctx.memo.same_desired(&key(room), fingerprint);
        let room_id_parsed = RoomId::parse(&room_id)
            .map_err(|e| Error::Invalid(format!("room id {room_id:?}: {e}")))?;
        for action in &room_plan.actions {
            apply_action(&room_id, &room_id_parsed, action, ctx).await?;
            audit(room, &room_id, &action.describe());
        }
        if drift {
            let summary: Vec<String> = room_plan.actions.iter().map(RoomAction::describe).collect();
            record(
                room,
                ctx,
                EventType::Normal,
                "DriftCorrected",
                &summary.join("; "),
            )
            .await;
        } else if !room_plan.actions.is_empty() && !created {
            let summary: Vec<String> = room_plan.actions.iter().map(RoomAction::describe).collect();
            record(
                room,
                ctx,
                EventType::Normal,
                "RoomUpdated",
                &summary.join("; "),
            )
            .await;
        }
        if desired.direct && (created || !ctx.memo.same_desired(&key(room), fingerprint)) {
            // Checked when the room or its members change, not on every
            // resync: a user's own later edits to their DM list are theirs.
            list_as_direct(room, &room_id, &desired, &unlistable, ctx).await?;
        }
        let published = publication(room, &room_id, ctx).await?;
        Ok(Ok(Converged {
            room_id,
            joined: room_plan.joined_after,
            published,
        }))
    }
    .await;

    match result {
        Ok(Ok(converged)) => {
            ctx.backoff.reset(&key(room));
            let mut conds = vec![Condition::new(
                READY,
                true,
                "Converged",
                "room matches the spec",
                room.metadata.generation,
            )];
            if let Some(p) = converged.published {
                conds.push(p);
            }
            let version = write_room_status(
                room,
                api,
                Some(converged.room_id),
                Some(alias.to_string()),
                Some(converged.joined as i64),
                conds,
            )
            .await?;
            write_permission_statuses(ctx, &perms, &outcomes, None).await?;
            ctx.memo
                .record(&key(room), [own_version, version], fingerprint);
            Ok(resync)
        }
        Ok(Err((reason, message))) => {
            let keep = reason != "AliasConflict";
            blocked(room, api, ctx, &perms, reason, message, keep).await?;
            Ok(resync)
        }
        Err(error) => {
            ctx.memo.forget(&key(room));
            let ready = Condition::new(
                READY,
                false,
                error.reason(),
                error.to_string(),
                room.metadata.generation,
            );
            let status = room.status.clone().unwrap_or_default();
            if let Err(e) = write_room_status(
                room,
                api,
                status.room_id,
                status.canonical_alias,
                status.joined_members,
                vec![ready],
            )
            .await
            {
                tracing::warn!(room = %key(room), error = %e, "could not record failure in status");
            }
            let _ = write_permission_statuses(
                ctx,
                &perms,
                &outcomes,
                Some(("RoomNotReady", error.to_string())),
            )
            .await;
            if error.is_transient() {
                return Err(error);
            }
            record(
                room,
                ctx,
                EventType::Warning,
                error.reason(),
                &error.to_string(),
            )
            .await;
            Ok(resync)
        }
    }
}

struct Converged {
    room_id: String,
    joined: usize,
    published: Option<Condition>,
}

/// After `M_ROOM_IN_USE`: the room under the alias, if it carries our marker.
async fn locate_by_alias(
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

async fn apply_action(
    room_id: &str,
    parsed: &RoomId,
    action: &RoomAction,
    ctx: &RoomContext,
) -> Result<(), Error> {
    let s = &ctx.synapse;
    let user =
        |u: &str| UserId::parse(u).map_err(|e| Error::Invalid(format!("user id {u:?}: {e}")));
    match action {
        RoomAction::MakeRoomAdmin => s.make_room_admin(room_id).await?,
        RoomAction::SetState { kind, content } => s.put_state(room_id, kind, "", content).await?,
        RoomAction::SetPowerLevels(content) => {
            s.put_state(room_id, "m.room.power_levels", "", content)
                .await?
        }
        RoomAction::SetRelation {
            kind,
            state_key,
            content,
        } => s.put_state(room_id, kind, state_key, content).await?,
        RoomAction::Join(u) => s.admin_join(parsed, &user(u)?).await?,
        RoomAction::Invite(u) => {
            s.membership(
                room_id,
                MembershipAction::Invite,
                u,
                "declared by RoomPermission",
            )
            .await?
        }
        RoomAction::Kick(u) => {
            s.membership(
                room_id,
                MembershipAction::Kick,
                u,
                "not declared for this room",
            )
            .await?
        }
        RoomAction::Ban(u) => {
            s.membership(
                room_id,
                MembershipAction::Ban,
                u,
                "banned by RoomPermission",
            )
            .await?
        }
        RoomAction::Unban(u) => {
            s.membership(room_id, MembershipAction::Unban, u, "no longer banned")
                .await?
        }
    }
    Ok(())
}

/// Members of a direct room whose `m.direct` cannot be written now: a
/// locked account cannot be logged in as. Part of the room's fingerprint, so
/// that unlocking one lists the room in its `m.direct` at once.
fn unlistable_members(
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
        .filter(|u| u.spec.locked)
        .filter_map(|u| u.status.as_ref()?.user_id.clone())
        .collect()
}

/// Lists a direct room in both members' `m.direct` (each under the other
/// member), keeping every other entry. Only local members' account data is
/// the operator's to write, and only while they can be logged in as: a
/// locked member's list waits for the unlock (the room converges meanwhile).
async fn list_as_direct(
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

/// Publishes or unpublishes in the directory, verifying the result. Checked
/// once per generation, so an unchanged room's resync stays one read.
async fn publication(
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
            record(room, ctx, EventType::Warning, "PublicationRefused", message).await;
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

async fn cleanup(
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
                )
                .await;
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
                )
                .await;
            }
        }
        Ok(Cleanup::Done)
    }
    .await;
    match result {
        Ok(cleanup) => Ok(cleanup),
        Err(error) => {
            let ready = Condition::new(
                READY,
                false,
                error.reason(),
                format!("cleanup: {error}"),
                room.metadata.generation,
            );
            let status = room.status.clone().unwrap_or_default();
            let _ = write_room_status(
                room,
                api,
                status.room_id,
                status.canonical_alias,
                status.joined_members,
                vec![ready],
            )
            .await;
            Err(error)
        }
    }
}

/// Records a blocked room: condition, a Warning on transition, no Synapse
/// write. `keep` keeps the room id and alias in the status (the room is
/// still this object's); an alias conflict clears them.
async fn blocked(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    reason: &str,
    message: String,
    keep: bool,
) -> Result<(), Error> {
    let previous = room
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    if previous.as_deref() != Some(reason) {
        record(room, ctx, EventType::Warning, reason, &message).await;
    }
    let ready = Condition::new(
        READY,
        false,
        reason,
        message.clone(),
        room.metadata.generation,
    );
    let status = room.status.clone().filter(|_| keep).unwrap_or_default();
    write_room_status(
        room,
        api,
        status.room_id,
        status.canonical_alias,
        status.joined_members,
        vec![ready],
    )
    .await?;
    write_permission_statuses(
        ctx,
        perms,
        &BTreeMap::new(),
        Some(("RoomNotReady", format!("room: {message}"))),
    )
    .await
}

async fn write_room_status(
    room: &MatrixRoom,
    api: &Api<MatrixRoom>,
    room_id: Option<String>,
    canonical_alias: Option<String>,
    joined_members: Option<i64>,
    next: Vec<Condition>,
) -> Result<Option<String>, Error> {
    if let Some(ready) = conditions::find(&next, READY) {
        outcome::note(ready);
    }
    let existing = room.status.clone().unwrap_or_default();
    let next = next
        .into_iter()
        .flat_map(|c| match c.type_.as_str() {
            READY => conditions::with_kstatus(c),
            _ => vec![c],
        })
        .collect();
    let status = MatrixRoomStatus {
        room_id,
        canonical_alias,
        joined_members,
        conditions: conditions::merge(&existing.conditions, next, now()),
        observed_generation: room.metadata.generation,
    };
    if status == existing {
        return Ok(room.resource_version());
    }
    super::apply_status(api, room, &status).await
}

/// Writes each permission's status from the room's outcome (only when it changed).
async fn write_permission_statuses(
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
    outcomes: &BTreeMap<String, PermissionOutcome>,
    room_failure: Option<(&str, String)>,
) -> Result<(), Error> {
    for p in perms {
        let (ready, level) = match (&room_failure, outcomes.get(&p.name_any())) {
            (_, Some(PermissionOutcome::Duplicate(m))) => (
                Condition::new(READY, false, "Duplicate", m.clone(), p.metadata.generation),
                None,
            ),
            (_, Some(PermissionOutcome::Pending(m))) => (
                Condition::new(READY, false, "Pending", m.clone(), p.metadata.generation),
                None,
            ),
            (Some((reason, m)), _) => (
                Condition::new(READY, false, reason, m.clone(), p.metadata.generation),
                None,
            ),
            (
                None,
                Some(PermissionOutcome::Applied {
                    user_id,
                    power_level,
                }),
            ) => (
                Condition::new(
                    READY,
                    true,
                    "Converged",
                    format!("{user_id} has power level {power_level}"),
                    p.metadata.generation,
                ),
                Some(*power_level),
            ),
            (None, None) => continue,
        };
        write_permission_status(&ctx.client, &ctx.recorder, p, level, ready).await?;
    }
    Ok(())
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
        super::events::on_transition(conditions::find(&existing.conditions, READY), &ready)
    {
        super::audit::publish(
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
    match super::apply_status(&api, p, &status).await {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to report on.
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

/// One audit line per Synapse mutation of this room.
fn audit(room: &MatrixRoom, room_id: &str, action: &str) {
    super::audit::mutation(room, action, Subject::Room { room_id });
}

/// An Event on the room object.
async fn record(room: &MatrixRoom, ctx: &RoomContext, type_: EventType, reason: &str, note: &str) {
    super::audit::publish(
        &ctx.recorder,
        room,
        type_,
        reason,
        "Converge",
        note.to_string(),
    );
}
