//! The desired room, folded from the object, the permissions naming it and
//! the caches: nothing here reads Synapse.

use super::fold::{self, fold, UserRefState};
use super::model::{Blocked, Enforce, Held, Wanted};
use super::plan::{DesiredRoom, Thresholds};
use super::{direct, tree, RoomContext};
use crate::api::conditions;
use crate::api::{MatrixRoom, MatrixUser, RoomPermission};
use crate::controller::index::keys;
use crate::controller::{claims, key, reference, Error};
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use ruma::{OwnedRoomAliasId, RoomAliasId};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Folds the desired room, or says why it is held back. An older object
/// holding the alias is the only hold before Synapse: the room is not this
/// object's. The others (the parent space missing, not ready or refused, a
/// Direct room without two members) come with the desired room, so that a
/// room that exists keeps enforcing removals while it waits.
pub(super) fn fold_desired(
    room: &MatrixRoom,
    ctx: &RoomContext,
    perms: &[Arc<RoomPermission>],
) -> Result<Result<Wanted, Held>, Error> {
    if let Err(message) = holds_alias(room, ctx) {
        return Ok(Err(Held {
            blocked: Blocked::alias_conflict(message),
            retry: None,
            enforce: Enforce::RemovalsOnly,
        }));
    }
    let hold = |reason, message, retry, enforce| {
        Some(Held {
            blocked: Blocked::new(reason, message),
            retry,
            enforce,
        })
    };
    let (parent, mut held) = match parent_of(room, ctx) {
        tree::Parent::None => (None, None),
        tree::Parent::Ready(id) => (Some(id), None),
        // The parent's own changes trigger this room; the requeue is a fallback.
        tree::Parent::Waiting { reason, message } => {
            let enforce = if reason == tree::PARENT_NOT_FOUND {
                Enforce::Standalone
            } else {
                Enforce::RemovalsOnly
            };
            let retry = Some(Duration::from_secs(30));
            (None, hold(reason, message, retry, enforce))
        }
        tree::Parent::Refused { reason, message } => {
            (None, hold(reason, message, None, Enforce::RemovalsOnly))
        }
    };
    let alias = full_alias(room, ctx)?;
    let perm_refs: Vec<&RoomPermission> = perms.iter().map(|p| p.as_ref()).collect();
    let fold::Folded {
        members,
        outcomes,
        revoked,
    } = fold(&perm_refs, |p| user_state(ctx, p));
    if room.spec.is_direct() {
        let declared = fold::declared_members(&perm_refs, &outcomes);
        if declared != 2 {
            let message = format!(
                "a Direct room has exactly two members; RoomPermissions declare {declared}"
            );
            held = hold("DirectMemberCount", message, None, Enforce::RemovalsOnly);
        }
    }
    let mut desired = desired(room, ctx, members, parent);
    desired.revoked = revoked;
    let unlistable = direct::unlistable_members(&desired, perms, ctx);
    direct::invite_until_unlocked(&mut desired, &unlistable);
    Ok(Ok(Wanted {
        desired,
        outcomes,
        alias,
        unlistable,
        held,
    }))
}

/// The ownership marker state content for this object.
pub(super) fn marker(room: &MatrixRoom) -> Value {
    json!({
        "namespace": room.namespace().unwrap_or_default(),
        "name": room.name_any(),
        "uid": room.metadata.uid.clone().unwrap_or_default(),
    })
}

pub(super) fn full_alias(room: &MatrixRoom, ctx: &RoomContext) -> Result<OwnedRoomAliasId, Error> {
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
pub(super) fn holds_alias(room: &MatrixRoom, ctx: &RoomContext) -> Result<(), String> {
    let rivals = ctx
        .room_index
        .get(&ctx.rooms, &keys::alias(&room.spec.alias));
    claims::check(&rivals, room, |r| r.spec.alias == room.spec.alias).map_err(|holder| {
        tracing::info!(room = %key(room), %holder, "alias claimed by an older object");
        format!(
            "alias {:?} is already claimed by another, older MatrixRoom",
            room.spec.alias
        )
    })
}

/// The permissions naming this room, from the cache.
pub(super) fn permissions_of(room: &MatrixRoom, ctx: &RoomContext) -> Vec<Arc<RoomPermission>> {
    let ns = room.namespace().unwrap_or_default();
    let key = keys::permissions_of_room(&ns, &room.name_any());
    ctx.permission_index.get(&ctx.permissions, &key)
}

/// The user a permission names, from the cache.
pub(super) fn user_of(p: &RoomPermission, ctx: &RoomContext) -> Option<Arc<MatrixUser>> {
    ctx.users
        .get(&ObjectRef::new(&p.spec.user_ref.name).within(p.user_namespace()))
}

/// Resolves a permission's reference: across namespaces, judged against the
/// grants of the user's namespace first, so a refusal tells nothing of the
/// user.
fn user_state(ctx: &RoomContext, p: &RoomPermission) -> UserRefState {
    let user = user_of(p, ctx);
    if p.crosses_namespaces() {
        let grants = ctx
            .grant_index
            .get(&ctx.grants, &keys::grants_in(p.user_namespace()));
        let verdict = reference::judge(p, user.as_deref(), grants.iter().map(|g| g.as_ref()));
        if let reference::Verdict::Refused { reason, message } = verdict {
            let user_id = user
                .as_ref()
                .and_then(|u| u.status.as_ref())
                .and_then(|s| s.user_id.clone());
            return UserRefState::Refused {
                reason,
                message,
                user_id,
            };
        }
    }
    fold::user_ref_state(user.as_deref())
}

pub(super) fn desired(
    room: &MatrixRoom,
    ctx: &RoomContext,
    members: BTreeMap<String, (crate::api::permission::Membership, i64)>,
    parent: Option<String>,
) -> DesiredRoom {
    let spec = &room.spec;
    // A space lists its children; an ordinary room's m.space.child events
    // are not the operator's (and cost nothing to leave alone).
    let children = spec.is_space().then(|| {
        let ns = room.namespace().unwrap_or_default();
        let key = keys::children_of(&ns, &room.name_any());
        tree::children(room, &ctx.room_index.get(&ctx.rooms, &key))
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
        revoked: Default::default(),
        admin: ctx.synapse.admin_user_id().to_string(),
        server_suffix: format!(":{}", ctx.synapse.server_name()),
        room_version: ctx.config.room_version.clone(),
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
pub(super) fn users_in_flight(
    perms: &[Arc<RoomPermission>],
    ctx: &RoomContext,
) -> Option<Duration> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let younger = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, secs: i64| {
        meta.creation_timestamp
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0).as_secs() < secs)
    };
    perms.iter().find_map(|p| {
        let in_flight = match user_of(p, ctx) {
            None => younger(&p.metadata, 10),
            Some(user) => {
                !conditions::observed(user.status.as_ref().and_then(|s| s.observed_generation))
                    && younger(&user.metadata, 120)
            }
        };
        in_flight.then_some(Duration::from_secs(5))
    })
}
