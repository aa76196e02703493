//! `RoomPermission`s are converged by their room's reconcile. This controller
//! only reports the one case no room reconcile sees: the room does not exist.

use super::events::Recorder;
use super::outcome::{self, Outcome};
use super::{Error, ReconcileStats};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{MatrixRoom, RoomPermission};
use futures::{Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

struct Ctx {
    client: Client,
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

pub async fn run<A, B>(
    permissions: Store<RoomPermission>,
    triggers: Triggers<A, B>,
    client: Client,
    recorder: Recorder,
    stats: Arc<ReconcileStats>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<RoomPermission>> + Send + 'static,
    B: Stream<Item = Arc<MatrixRoom>> + Send + 'static,
{
    let cache = permissions.clone();
    Controller::for_shared_stream(triggers.objects, permissions)
        // A room appeared or went away: the permissions naming it.
        .watches_shared_stream(triggers.rooms, move |room: Arc<MatrixRoom>| {
            let ns = room.namespace();
            let name = room.name_any();
            cache
                .state()
                .iter()
                .filter(|p| p.namespace() == ns && p.spec.room_ref.name == name)
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_secs(5)),
            Arc::new(Ctx {
                client,
                recorder,
                stats,
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
/// reconcile writes every other outcome.
async fn mark_pending(p: &RoomPermission, ctx: &Ctx) -> Result<Action, Error> {
    let ns = p.namespace().unwrap_or_default();
    let rooms: Api<MatrixRoom> = Api::namespaced(ctx.client.clone(), &ns);
    if rooms.get_opt(&p.spec.room_ref.name).await?.is_none() {
        let message = format!(
            "MatrixRoom {} does not exist in this namespace",
            p.spec.room_ref.name
        );
        let ready = Condition::new(READY, false, "Pending", message, p.metadata.generation);
        super::room::write_permission_status(&ctx.client, &ctx.recorder, p, None, ready).await?;
    }
    Ok(Action::await_change())
}
