//! What wakes a room: its own changes, and the permissions, users and other
//! rooms that fold into it.

use super::{tree, RoomContext};
use crate::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use crate::controller::index::{keys, Index};
use crate::controller::{self, key, Deps};
use futures::{Stream, StreamExt};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The kind, as the metrics name it.
pub(super) const KIND: &str = "MatrixRoom";

/// The shared caches the room controller reads.
pub struct Caches {
    pub rooms: Store<MatrixRoom>,
    pub users: Store<MatrixUser>,
    pub permissions: Store<RoomPermission>,
    pub permission_index: Arc<Index<RoomPermission>>,
    pub room_index: Arc<Index<MatrixRoom>>,
    pub grants: Store<MatrixUserGrant>,
    pub grant_index: Arc<Index<MatrixUserGrant>>,
}

/// The shared watch subscriptions that trigger room reconciles.
pub struct Triggers<A, B, C, D, E> {
    /// Every applied `MatrixRoom`.
    pub objects: A,
    /// Permissions, deletions included: each folds into its room.
    pub permissions: B,
    /// Users, deletions included: the rooms their permissions name.
    pub users: C,
    /// Rooms, deletions included: alias claimants decide again.
    pub peers: D,
    /// Grants, deletions included: the rooms whose permissions name a user
    /// of the grant's namespace from another.
    pub grants: E,
}

/// Runs the `MatrixRoom` controller until `shutdown` resolves.
pub async fn run<A, B, C, D, E>(
    caches: Caches,
    triggers: Triggers<A, B, C, D, E>,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
    B: Stream<Item = Arc<RoomPermission>> + Send + 'static,
    C: Stream<Item = Arc<MatrixUser>> + Send + 'static,
    D: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
    E: Stream<Item = Arc<MatrixUserGrant>> + Send + 'static,
{
    let Deps {
        client,
        synapse,
        config,
        recorder,
        stats,
        own_joins,
        sweep,
        leading,
    } = deps;
    let ctx = Arc::new(RoomContext {
        client,
        synapse,
        config,
        recorder,
        rooms: caches.rooms.clone(),
        users: caches.users,
        permissions: caches.permissions.clone(),
        permission_index: caches.permission_index.clone(),
        room_index: caches.room_index.clone(),
        grants: caches.grants,
        grant_index: caches.grant_index,
        backoff: controller::default_backoff(),
        purge_polls: super::cleanup::purge_polls(),
        stats,
        own_joins,
        memo: Default::default(),
        sweep,
        leading,
    });
    let (perms_for_users, perms_by_user) = (caches.permissions, caches.permission_index);
    let (perms_for_grants, perms_into) = (perms_for_users.clone(), perms_by_user.clone());
    let (rooms_for_claims, rooms_by_alias) = (caches.rooms.clone(), caches.room_index);
    let spaces = std::sync::Mutex::new(tree::SpaceIndex::default());
    let evict = ctx.clone();
    // Every trigger notes what it queues (the queue-depth gauge).
    let noted = || ctx.stats.clone();
    let (own, by_permission, by_user, by_grant, by_peer) =
        (noted(), noted(), noted(), noted(), noted());
    let objects = triggers
        .objects
        .inspect(move |r| own.queue.note_object(KIND, r.as_ref()));
    Controller::for_shared_stream(objects, caches.rooms)
        // A permission changed or went away: its room folds it in.
        .watches_shared_stream(triggers.permissions, move |p: Arc<RoomPermission>| {
            let ns = p.namespace().unwrap_or_default();
            by_permission
                .queue
                .note(KIND, [ObjectRef::new(&p.spec.room_ref.name).within(&ns)])
        })
        // A user changed (or went away): the rooms that reference it.
        .watches_shared_stream(triggers.users, move |u: Arc<MatrixUser>| {
            let key = keys::permissions_of_user(&u.namespace().unwrap_or_default(), &u.name_any());
            by_user
                .queue
                .note(KIND, rooms_of(&perms_by_user.get(&perms_for_users, &key)))
        })
        // A grant changed or went away: the rooms it may admit users to.
        .watches_shared_stream(triggers.grants, move |g: Arc<MatrixUserGrant>| {
            let key = keys::permissions_into(&g.namespace().unwrap_or_default());
            by_grant
                .queue
                .note(KIND, rooms_of(&perms_into.get(&perms_for_grants, &key)))
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
                    rooms_by_alias
                        .get(&rooms_for_claims, &keys::alias(&r.spec.alias))
                        .iter()
                        .map(|o| ObjectRef::from_obj(o.as_ref()))
                        .filter(|o| *o != me),
                );
            }
            by_peer.queue.note(KIND, related)
        })
        .with_config(controller::controller_config(
            &ctx.config,
            Duration::from_millis(100),
        ))
        .graceful_shutdown_on(shutdown)
        .run(super::reconcile, super::error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The rooms `permissions` name (each in its permission's namespace), once each.
fn rooms_of(permissions: &[Arc<RoomPermission>]) -> Vec<ObjectRef<MatrixRoom>> {
    let mut rooms: Vec<ObjectRef<MatrixRoom>> = permissions
        .iter()
        .map(|p| ObjectRef::new(&p.spec.room_ref.name).within(&p.namespace().unwrap_or_default()))
        .collect();
    rooms.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rooms.dedup();
    rooms
}
