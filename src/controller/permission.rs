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

const KIND: &str = "RoomPermission";

struct Ctx {
    client: Client,
    permissions: Store<RoomPermission>,
    rooms: Store<MatrixRoom>,
    recorder: Recorder,
    stats: Arc<ReconcileStats>,
    leading: super::Leading,
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
    let (own, by_room) = (deps.stats.clone(), deps.stats.clone());
    let objects = triggers
        .objects
        .inspect(move |p| own.queue.note_object(KIND, p.as_ref()));
    Controller::for_shared_stream(objects, permissions.clone())
        // A room appeared or went away: the permissions naming it.
        .watches_shared_stream(triggers.rooms, move |room: Arc<MatrixRoom>| {
            let ns = room.namespace().unwrap_or_default();
            let refs = index.refs(&keys::permissions_of_room(&ns, &room.name_any()));
            by_room.queue.note(KIND, refs)
        })
        // Bounded as every kind: a controller starting on a declared tenant
        // is handed every permission at once, and an unbounded runner holds
        // a task for each until they have run.
        .with_config(super::controller_config(&deps.config, Duration::ZERO))
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |_, _, _| Action::requeue(Duration::from_secs(5)),
            Arc::new(Ctx {
                client: deps.client,
                permissions,
                rooms,
                recorder: deps.recorder,
                stats: deps.stats,
                leading: deps.leading,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(p: Arc<RoomPermission>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(p) = ctx.leading.current(p, &ctx.permissions).await else {
        return Ok(Action::await_change());
    };
    ctx.stats
        .permission_reconciles
        .fetch_add(1, Ordering::Relaxed);
    let timer = ctx.stats.start(KIND, &super::key(p.as_ref()));
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

#[cfg(test)]
mod tests {
    //! The permission reconcile's exchange with the API server.
    use super::*;
    use crate::controller::scripted::{
        self, echo, not_found, ready_of, refuse, status_server, status_written,
    };
    use http::Method;
    use kube::runtime::{reflector, watcher};
    use serde_json::Value;

    fn permission(status: Option<Value>) -> RoomPermission {
        let mut p: RoomPermission = serde_yaml::from_str(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: RoomPermission
metadata: {name: alice-r, namespace: t, generation: 4, uid: u-1, resourceVersion: "5"}
spec: {roomRef: {name: r}, userRef: {name: alice}}
"#,
        )
        .unwrap();
        p.status = status.map(|s| serde_json::from_value(s).unwrap());
        p
    }

    fn ctx(client: Client, rooms: &[&str]) -> Arc<Ctx> {
        let (store, mut writer) = reflector::store();
        for name in rooms {
            let room: MatrixRoom = serde_yaml::from_str(&format!(
                "{{apiVersion: matrix.openmeet.net/v1alpha1, kind: MatrixRoom, \
                  metadata: {{name: {name}, namespace: t}}, spec: {{name: R, alias: {name}}}}}"
            ))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(room));
        }
        Arc::new(Ctx {
            recorder: scripted::recorder(client.clone()),
            client,
            permissions: reflector::store().0,
            rooms: store,
            stats: Default::default(),
            leading: crate::controller::Leading::always(),
        })
    }

    #[tokio::test]
    async fn a_permission_whose_room_exists_is_the_rooms_to_report() {
        let (client, recorded) = scripted::client(refuse);
        let action = reconcile(Arc::new(permission(None)), ctx(client, &["r"]))
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn a_missing_room_is_reported_once_then_costs_nothing() {
        let p = permission(None);
        let answer = serde_json::to_value(&p).unwrap();
        let (client, recorded) = scripted::client(status_server(move |_| answer.clone()));
        reconcile(Arc::new(p), ctx(client, &["other"]))
            .await
            .unwrap();
        let sent = recorded.expect(2).await;
        let status = sent.iter().find(|x| x.path.ends_with("/status")).unwrap();
        assert_eq!(
            status.path,
            "/apis/matrix.openmeet.net/v1alpha1/namespaces/t/roompermissions/alice-r/status"
        );
        let written = &status_written(&sent, "alice-r");
        assert_eq!(written["observedGeneration"], 4);
        let ready = ready_of(written);
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "Pending");
        assert_eq!(ready["observedGeneration"], 4);
        assert_eq!(
            ready["message"],
            "MatrixRoom r does not exist in this namespace"
        );
        // The transition is an Event on the permission.
        let event = sent.iter().find(|x| x.path.contains("/events")).unwrap();
        assert_eq!(event.method, Method::POST);
        assert_eq!(event.path, "/apis/events.k8s.io/v1/namespaces/t/events");
        assert_eq!(event.body["reason"], "Pending");
        assert_eq!(event.body["regarding"]["name"], "alice-r");
        assert_eq!(event.body["regarding"]["uid"], "u-1");

        // The next pass finds the same status: no write, no Event.
        let (client, recorded) = scripted::client(refuse);
        let again = permission(Some(written.clone()));
        reconcile(Arc::new(again), ctx(client, &["other"]))
            .await
            .unwrap();
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn a_permission_deleted_meanwhile_is_not_an_error() {
        let (client, recorded) = scripted::client(|x| {
            if x.path.contains("/events") {
                echo(x)
            } else {
                not_found()
            }
        });
        let action = reconcile(Arc::new(permission(None)), ctx(client, &[]))
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        recorded.expect(2).await;
    }

    /// A controller starting on a declared tenant is handed every
    /// permission at once: it reconciles `CONCURRENCY` of them at a time,
    /// not one task per permission.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_permissions_is_reconciled_a_bounded_few_at_a_time() {
        let burst: Vec<RoomPermission> = (0..20)
            .map(|i| {
                let mut p = permission(None);
                p.metadata.name = Some(format!("p-{i}"));
                p
            })
            .collect();
        // A complete list: the controller starts once its cache is ready.
        let (permissions, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for p in &burst {
            writer.apply_watcher_event(&watcher::Event::InitApply(p.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        // Every status write of a missing room is held at the gate: the
        // writes that arrive meanwhile are the reconciles running at once.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let answer = serde_json::to_value(permission(None)).unwrap();
        let (client, recorded) =
            scripted::gated_client(status_server(move |_| answer.clone()), Some(gate.clone()));
        let deps = Deps {
            client: client.clone(),
            synapse: scripted::unreachable_synapse(),
            config: scripted::config(),
            recorder: scripted::recorder(client),
            stats: Default::default(),
            own_joins: Default::default(),
            sweep: Arc::new(crate::controller::sweep::Sweep::new(
                Duration::from_secs(3600),
                1.0,
            )),
            leading: crate::controller::Leading::always(),
        };
        assert_eq!(deps.config.concurrency, 1);
        let caches = Caches {
            permissions,
            index: Index::new(keys::permission),
            rooms: reflector::store().0,
        };
        let triggers = Triggers {
            objects: futures::stream::iter(burst.into_iter().map(Arc::new))
                .chain(futures::stream::pending()),
            rooms: futures::stream::pending::<Arc<MatrixRoom>>(),
        };
        let controller = tokio::spawn(run(caches, triggers, deps, futures::future::pending()));
        // One reconcile: its Event and its status write, both held.
        let held = recorded.expect(2).await;
        let statuses = held.iter().filter(|x| x.path.ends_with("/status"));
        assert_eq!(statuses.count(), 1, "{held:#?}");
        controller.abort();
    }

    #[tokio::test]
    async fn an_api_server_failure_is_returned_for_a_retry() {
        let (client, _) = scripted::client(refuse);
        let result = reconcile(Arc::new(permission(None)), ctx(client, &[])).await;
        assert!(matches!(result, Err(Error::Kube(_))), "{result:?}");
    }
}
