//! `RoomPermission`s are converged by their room's reconcile. This controller
//! only reports the one case no room reconcile sees: the room does not exist.

use super::events::Recorder;
use super::index::{keys, Index};
use super::outcome::{self, Outcome};
use super::{Deps, Error, ReconcileStats};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{MatrixRoom, RoomPermission};
use futures::{Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

struct Ctx {
    client: Client,
    rooms: Store<MatrixRoom>,
    recorder: Recorder,
    stats: Arc<ReconcileStats>,
}

/// The shared watch subscriptions that trigger permission reconciles.
pub struct Triggers<A, B> {
    /// Every applied `RoomPermission`.
    pub objects: A,
    /// Rooms, deletions included: a room appeared or went away.
    pub rooms: B,
}

/// The shared caches the permission controller reads.
pub struct Caches {
    pub permissions: Store<RoomPermission>,
    pub index: Arc<Index<RoomPermission>>,
    pub rooms: Store<MatrixRoom>,
}

/// Runs until `shutdown` resolves. The room cache must be complete first:
/// an incomplete one would call every permission's room missing.
pub async fn run<A, B>(
    caches: Caches,
    triggers: Triggers<A, B>,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<RoomPermission>> + Send + 'static,
    B: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
{
    let Caches {
        permissions,
        index,
        rooms,
    } = caches;
    Controller::for_shared_stream(triggers.objects, permissions)
        // A room appeared or went away: the permissions naming it.
        .watches_shared_stream(triggers.rooms, move |room: Arc<MatrixRoom>| {
            let ns = room.namespace().unwrap_or_default();
            index.refs(&keys::permissions_of_room(&ns, &room.name_any()))
        })
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_secs(5)),
            Arc::new(Ctx {
                client: deps.client,
                rooms,
                recorder: deps.recorder,
                stats: deps.stats,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(p: Arc<RoomPermission>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.stats
        .permission_reconciles
        .fetch_add(1, Ordering::Relaxed);
    let timer = ctx.stats.start("RoomPermission");
    let (result, written) = outcome::noting(mark_pending(&p, &ctx)).await;
    let before = p
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY));
    timer.finish(Outcome::of(&result, written, before));
    result
}

/// A permission whose room does not exist is `Pending`; the room's
/// reconcile writes every other outcome. Read from the cache: a room the
/// cache has not seen yet is about to trigger this permission again, and
/// its own reconcile writes the outcome.
async fn mark_pending(p: &RoomPermission, ctx: &Ctx) -> Result<Action, Error> {
    let ns = p.namespace().unwrap_or_default();
    let room = ObjectRef::<MatrixRoom>::new(&p.spec.room_ref.name).within(&ns);
    if ctx.rooms.get(&room).is_none() {
        let message = format!(
            "MatrixRoom {} does not exist in this namespace",
            p.spec.room_ref.name
        );
        let ready = Condition::new(READY, false, "Pending", message, p.metadata.generation);
        super::room::write_permission_status(&ctx.client, &ctx.recorder, p, None, ready).await?;
    }
    Ok(Action::await_change())
}
