//! `RoomPermission`s are converged by their room's reconcile. This controller
//! only reports the one case no room reconcile sees: the room does not exist.

use super::{Error, OperatorConfig, ReconcileStats};
use crate::api::conditions::{Condition, READY};
use crate::api::{MatrixRoom, RoomPermission};
use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

struct Ctx {
    client: Client,
    stats: Arc<ReconcileStats>,
}

pub async fn run(
    client: Client,
    config: OperatorConfig,
    permissions: Store<RoomPermission>,
    stats: Arc<ReconcileStats>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (perms_api, rooms_api): (Api<RoomPermission>, Api<MatrixRoom>) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let watch = super::watch_config(&config);
    Controller::new(perms_api, watch.clone())
        // A room appeared or went away: the permissions naming it.
        .watches(rooms_api, watch, move |room: MatrixRoom| {
            let ns = room.namespace();
            let name = room.name_any();
            permissions
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
            Arc::new(Ctx { client, stats }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(p: Arc<RoomPermission>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.stats
        .permission_reconciles
        .fetch_add(1, Ordering::Relaxed);
    let timer = ctx.stats.start("RoomPermission");
    let result = mark_pending(&p, &ctx).await;
    timer.finish(result.is_ok());
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
        super::room::write_permission_status(&ctx.client, p, None, ready).await?;
    }
    Ok(Action::await_change())
}
