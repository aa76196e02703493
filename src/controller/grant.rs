//! `MatrixUserGrant`s need nothing from Synapse: the rooms' reconciles
//! judge references against them. This controller writes what the users'
//! tenant may see of their use: per namespace, how many permissions (never
//! which rooms).

use super::index::{keys, Index};
use super::outcome::{self, Outcome};
use super::{reference, Deps, Error, ReconcileStats};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{MatrixUser, MatrixUserGrant, MatrixUserGrantStatus, RoomPermission};
use futures::{Stream, StreamExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const KIND: &str = "MatrixUserGrant";

struct Ctx {
    client: Client,
    grants: Store<MatrixUserGrant>,
    permissions: Store<RoomPermission>,
    permission_index: Arc<Index<RoomPermission>>,
    users: Store<MatrixUser>,
    synced: Arc<AtomicBool>,
    stats: Arc<ReconcileStats>,
    leading: super::Leading,
}

/// The shared caches the grant controller reads.
pub struct Caches {
    pub grants: Store<MatrixUserGrant>,
    pub grant_index: Arc<Index<MatrixUserGrant>>,
    pub permissions: Store<RoomPermission>,
    pub permission_index: Arc<Index<RoomPermission>>,
    pub users: Store<MatrixUser>,
    /// Set once the caches above are complete: uses counted before would
    /// be too few.
    pub synced: Arc<AtomicBool>,
}

/// The shared watch subscriptions that trigger grant reconciles.
pub struct Triggers<A, B, C> {
    /// Every applied `MatrixUserGrant`.
    pub objects: A,
    /// Permissions, deletions included: the grants of the namespace a
    /// crossing one names a user of.
    pub permissions: B,
    /// Users, deletions included: label grants may cover them or not.
    pub users: C,
}

/// Runs until `shutdown` resolves.
pub async fn run<A, B, C>(
    caches: Caches,
    triggers: Triggers<A, B, C>,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<MatrixUserGrant>> + Send + 'static,
    B: Stream<Item = Arc<RoomPermission>> + Send + 'static,
    C: Stream<Item = Arc<MatrixUser>> + Send + 'static,
{
    let Caches {
        grants,
        grant_index,
        permissions,
        permission_index,
        users,
        synced,
    } = caches;
    let grants_of = {
        let index = grant_index.clone();
        move |namespace: &str| index.refs(&keys::grants_in(namespace))
    };
    let grants_of_user_ns = grants_of.clone();
    let (perms_for_users, perms_by_user) = (permissions.clone(), permission_index.clone());
    let (own, by_permission, by_user) =
        (deps.stats.clone(), deps.stats.clone(), deps.stats.clone());
    let objects = triggers
        .objects
        .inspect(move |g| own.queue.note_object(KIND, g.as_ref()));
    Controller::for_shared_stream(objects, grants.clone())
        .watches_shared_stream(triggers.permissions, move |p: Arc<RoomPermission>| match p
            .crosses_namespaces()
        {
            true => by_permission
                .queue
                .note(KIND, grants_of(p.user_namespace())),
            false => Vec::new(),
        })
        .watches_shared_stream(triggers.users, move |u: Arc<MatrixUser>| {
            let ns = u.namespace().unwrap_or_default();
            let named_from_elsewhere = perms_by_user
                .get(
                    &perms_for_users,
                    &keys::permissions_of_user(&ns, &u.name_any()),
                )
                .iter()
                .any(|p| p.crosses_namespaces());
            match named_from_elsewhere {
                true => by_user.queue.note(KIND, grants_of_user_ns(&ns)),
                false => Vec::new(),
            }
        })
        .with_config(super::controller_config(
            &deps.config,
            std::time::Duration::ZERO,
        ))
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile,
            |_, _, _| Action::requeue(std::time::Duration::from_secs(5)),
            Arc::new(Ctx {
                client: deps.client,
                grants,
                permissions,
                permission_index,
                users,
                synced,
                stats: deps.stats,
                leading: deps.leading,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

async fn reconcile(grant: Arc<MatrixUserGrant>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let Some(grant) = ctx.leading.current(grant, &ctx.grants).await else {
        return Ok(Action::await_change());
    };
    let timer = ctx.stats.start(KIND, &super::key(grant.as_ref()));
    let (result, written) = outcome::noting(write_uses(&grant, &ctx)).await;
    let before = grant
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY));
    timer.finish(Outcome::of(&result, written, before));
    result
}

/// Counts the permissions the grant admits and writes them, when changed.
async fn write_uses(grant: &MatrixUserGrant, ctx: &Ctx) -> Result<Action, Error> {
    if !ctx.synced.load(Ordering::Acquire) {
        return Ok(Action::requeue(std::time::Duration::from_secs(1)));
    }
    let ns = grant.namespace().unwrap_or_default();
    let crossing = ctx
        .permission_index
        .get(&ctx.permissions, &keys::permissions_into(&ns));
    let used_by = reference::uses(grant, crossing.iter().map(|p| p.as_ref()), |name| {
        ctx.users.get(&ObjectRef::new(name).within(&ns))
    });
    let status = status_of(grant, used_by);
    let existing = grant.status.clone().unwrap_or_default();
    if same_but_timestamps(&status, &existing) {
        return Ok(Action::await_change());
    }
    let status = MatrixUserGrantStatus {
        conditions: conditions::merge(&existing.conditions, status.conditions, now()),
        ..status
    };
    let api: Api<MatrixUserGrant> = Api::namespaced(ctx.client.clone(), &ns);
    match super::apply_status(&api, grant, &status).await {
        Ok(_) => Ok(Action::await_change()),
        // Deleted meanwhile: nothing left to report on.
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e),
    }
}

/// The status a grant's uses come to; condition times are left to merging.
fn status_of(
    grant: &MatrixUserGrant,
    used_by: Vec<crate::api::grant::GrantUse>,
) -> MatrixUserGrantStatus {
    let permissions = used_by.iter().map(|u| u.permissions).sum();
    let message = format!(
        "admits {permissions} RoomPermission(s) from {} namespace(s)",
        used_by.len()
    );
    let ready = Condition::new(READY, true, "Granted", message, grant.metadata.generation);
    MatrixUserGrantStatus {
        used_by,
        permissions,
        conditions: conditions::with_kstatus(ready),
        observed_generation: grant.metadata.generation,
    }
}

/// Whether `next` says what `existing` says, transition times aside.
fn same_but_timestamps(next: &MatrixUserGrantStatus, existing: &MatrixUserGrantStatus) -> bool {
    let merged = conditions::merge(&existing.conditions, next.conditions.clone(), now());
    merged == existing.conditions
        && next.used_by == existing.used_by
        && next.permissions == existing.permissions
        && next.observed_generation == existing.observed_generation
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::grant::GrantUse;

    fn grant() -> MatrixUserGrant {
        let mut g = MatrixUserGrant::new(
            "speakers",
            serde_json::from_value(serde_json::json!({"from": [{"namespace": "b"}]})).unwrap(),
        );
        g.metadata.namespace = Some("a".into());
        g.metadata.generation = Some(3);
        g
    }

    #[test]
    fn a_grant_reports_counts_per_namespace_and_nothing_else() {
        let status = status_of(
            &grant(),
            vec![GrantUse {
                namespace: "b".into(),
                permissions: 2,
            }],
        );
        assert_eq!(status.permissions, 2);
        assert_eq!(status.observed_generation, Some(3));
        let ready = conditions::find(&status.conditions, READY).unwrap();
        assert_eq!(ready.reason, "Granted");
        assert_eq!(
            ready.message,
            "admits 2 RoomPermission(s) from 1 namespace(s)"
        );
        // Once written, the same counts write nothing.
        let written = MatrixUserGrantStatus {
            conditions: conditions::merge(&[], status.conditions.clone(), now()),
            ..status.clone()
        };
        assert!(same_but_timestamps(&status, &written));
        let more = status_of(
            &grant(),
            vec![GrantUse {
                namespace: "b".into(),
                permissions: 3,
            }],
        );
        assert!(!same_but_timestamps(&more, &written));
    }
}
