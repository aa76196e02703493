//! `MatrixUser` controller: the I/O shell around [`plan`].

pub mod plan;

use super::backoff::jitter;
use super::memo::fingerprint;
use super::{claims, key};
use super::{Context, Error, OperatorConfig, ReconcileStats, OWNER_PROVIDER};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{MatrixUser, MatrixUserStatus};
use crate::synapse::{ExternalId, SynapseClient, UserUpsert};
use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use plan::{plan, plan_cleanup, precheck, Blocked, CleanupAction, Desired, UserAction, UserPlan};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Runs the `MatrixUser` controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    synapse: SynapseClient,
    config: OperatorConfig,
    recorder: Recorder,
    stats: Arc<ReconcileStats>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<MatrixUser> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let watch = super::watch_config(&config);
    let controller = Controller::new(api.clone(), watch.clone());
    let users = controller.store();
    let peers = users.clone();
    let ctx = Arc::new(Context {
        client,
        synapse,
        config,
        recorder,
        users,
        backoff: super::default_backoff(),
        stats,
        memo: Default::default(),
    });
    controller
        // When a claimant of a localpart goes away, the others are decided
        // again. Other changes cannot move the claim: newcomers are younger.
        .watches(api, watch, move |changed: MatrixUser| {
            let localpart = changed.spec.localpart.clone();
            let me = ObjectRef::from_obj(&changed);
            let leaving = changed.metadata.deletion_timestamp.is_some() || peers.get(&me).is_none();
            if !leaving {
                return Vec::new();
            }
            peers
                .state()
                .into_iter()
                .filter(|u| u.spec.localpart == localpart)
                .map(|u| ObjectRef::from_obj(u.as_ref()))
                .filter(|r| *r != me)
                .collect::<Vec<_>>()
        })
        .with_config(super::controller_config(&ctx.config, Duration::ZERO))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The finalizer is the only top-level branch: apply, or clean up.
pub async fn reconcile(user: Arc<MatrixUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    let timer = ctx.stats.start("MatrixUser");
    let api: Api<MatrixUser> = super::own_namespace(&ctx.client, user.as_ref())?;
    let result = super::finalizer::reconcile(
        &api,
        user.as_ref(),
        |own_version| apply(&user, &api, &ctx, own_version),
        || cleanup(&user, &api, &ctx),
    )
    .await;
    ctx.stats.user_reconciles.fetch_add(1, Ordering::Relaxed);
    timer.finish(result.is_ok());
    result
}

fn error_policy(user: Arc<MatrixUser>, error: &Error, ctx: Arc<Context>) -> Action {
    super::retry_after(user.as_ref(), error, &ctx.backoff, &ctx.stats.user_failures)
}

/// The marker external id that says "this account is this object's".
fn owner_marker(user: &MatrixUser) -> ExternalId {
    ExternalId {
        auth_provider: OWNER_PROVIDER.into(),
        external_id: key(user),
    }
}

/// Whether this object holds its localpart (oldest claim wins, homeserver-wide).
fn holds_localpart(user: &MatrixUser, ctx: &Context) -> Result<(), String> {
    claims::check(&ctx.users.state(), user, |u| {
        u.spec.localpart == user.spec.localpart
    })
    .map_err(|holder| {
        format!(
            "localpart {:?} is already claimed by {holder}",
            user.spec.localpart
        )
    })
}

async fn apply(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
    own_version: Option<String>,
) -> Result<Action, Error> {
    let ns = user.namespace().unwrap_or_default();
    let resync = Action::requeue(jitter(ctx.config.resync_interval));

    if let Err(message) = holds_localpart(user, ctx) {
        block(user, api, ctx, Blocked::LocalpartConflict, message).await?;
        return Ok(resync);
    }
    let sso_provider = ctx.config.sso_provider();
    let desired = Desired {
        spec: &user.spec,
        owner_marker: owner_marker(user),
        sso_provider: &sso_provider,
        reserved: ctx
            .config
            .reserved_localparts
            .contains(&user.spec.localpart),
        admin_allowed: ctx.config.admin_namespaces.contains(&ns),
        adoption_allowed: ctx.config.adopt_namespaces.contains(&ns),
    };
    if let Some(blocked) = precheck(&desired) {
        let message = blocked_message(blocked, user);
        block(user, api, ctx, blocked, message).await?;
        return Ok(resync);
    }
    let fingerprint = fingerprint(&(&desired, user.metadata.generation));
    let fresh = super::freshness(&ctx.config);
    if ctx.memo.is_fresh(
        &key(user),
        user.metadata.resource_version.as_deref(),
        fingerprint,
        fresh,
    ) {
        // Only our own status write happened since the last convergence.
        return Ok(resync);
    }

    let outcome = converge(user, &desired, ctx).await;
    match outcome {
        Ok(Ok(user_id)) => {
            ctx.backoff.reset(&key(user));
            let message = if user.spec.deactivated {
                "account is deactivated"
            } else {
                "account matches the spec"
            };
            let ready = Condition::new(READY, true, "Converged", message, user.metadata.generation);
            let version = write_status(user, api, Some(user_id), ready).await?;
            ctx.memo
                .record(&key(user), [own_version, version], fingerprint);
            Ok(resync)
        }
        Ok(Err(blocked)) => {
            let message = blocked_message(blocked, user);
            block(user, api, ctx, blocked, message).await?;
            Ok(resync)
        }
        Err(error) => fail(user, api, ctx, error).await,
    }
}

/// Observe, plan, and apply; returns the user id, or why it is blocked.
async fn converge(
    user: &MatrixUser,
    desired: &Desired<'_>,
    ctx: &Context,
) -> Result<Result<String, Blocked>, Error> {
    let user_id = ctx.synapse.user_id(&user.spec.localpart)?;
    let observed = ctx.synapse.get_user(&user_id).await?;
    match plan(desired, observed.as_ref()) {
        UserPlan::Blocked(blocked) => Ok(Err(blocked)),
        UserPlan::Converge { actions, adopts } => {
            for action in actions {
                let (verb, change) = match &action {
                    UserAction::Create(change) => ("AccountCreated", change),
                    UserAction::Update(change) => (
                        if adopts {
                            "AccountAdopted"
                        } else {
                            "AccountUpdated"
                        },
                        change,
                    ),
                };
                ctx.synapse.upsert_user(&user_id, change).await?;
                record_mutation(user, ctx, verb, user_id.as_str(), change).await;
            }
            Ok(Ok(user_id.to_string()))
        }
    }
}

async fn cleanup(user: &MatrixUser, api: &Api<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    if holds_localpart(user, ctx).is_err() {
        // Never the account's owner: nothing in Synapse is ours to change.
        return Ok(Action::await_change());
    }
    let result: Result<(), Error> = async {
        let user_id = ctx.synapse.user_id(&user.spec.localpart)?;
        let observed = ctx.synapse.get_user(&user_id).await?;
        let (erase, verb) = match plan_cleanup(
            user.spec.deletion_policy,
            &owner_marker(user),
            observed.as_ref(),
        ) {
            CleanupAction::Nothing => return Ok(()),
            CleanupAction::Deactivate => (false, "AccountDeactivated"),
            CleanupAction::Erase => (true, "AccountErased"),
        };
        ctx.synapse.deactivate_user(&user_id, erase).await?;
        let change = UserUpsert {
            deactivated: Some(true),
            ..Default::default()
        };
        record_mutation(user, ctx, verb, user_id.as_str(), &change).await;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(Action::await_change()),
        Err(error) => fail(user, api, ctx, error).await,
    }
}

fn blocked_message(blocked: Blocked, user: &MatrixUser) -> String {
    match blocked {
        Blocked::ReservedLocalpart => format!("localpart {:?} is reserved by the operator", user.spec.localpart),
        Blocked::LocalpartConflict => format!("localpart {:?} is claimed by an older MatrixUser", user.spec.localpart),
        Blocked::AdminNotAllowed => "server admin is not allowed in this namespace".into(),
        Blocked::AccountExists => format!(
            "account @{} exists and was not created by the operator; adoption is not allowed in this namespace",
            user.spec.localpart
        ),
    }
}

/// Records a blocked state: a condition (and a Warning Event on transition), no Synapse call.
async fn block(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
    blocked: Blocked,
    message: String,
) -> Result<(), Error> {
    let previous = user
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    if previous.as_deref() != Some(blocked.reason()) {
        publish(
            user,
            ctx,
            EventType::Warning,
            blocked.reason(),
            "Reconcile",
            message.clone(),
        )
        .await;
    }
    let ready = Condition::new(
        READY,
        false,
        blocked.reason(),
        message,
        user.metadata.generation,
    );
    // A blocked object owns no account: do not advertise one.
    write_status(user, api, None, ready).await.map(|_| ())
}

/// Records a failure as a condition; transient ones back off, the rest wait for a change.
async fn fail(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
    error: Error,
) -> Result<Action, Error> {
    ctx.memo.forget(&key(user));
    let user_id = user.status.as_ref().and_then(|s| s.user_id.clone());
    let ready = Condition::new(
        READY,
        false,
        error.reason(),
        error.to_string(),
        user.metadata.generation,
    );
    if let Err(status_error) = write_status(user, api, user_id, ready).await {
        tracing::warn!(user = %key(user), error = %status_error, "could not record failure in status");
    }
    if error.is_transient() {
        return Err(error);
    }
    publish(
        user,
        ctx,
        EventType::Warning,
        error.reason(),
        "Reconcile",
        error.to_string(),
    )
    .await;
    Ok(Action::requeue(jitter(ctx.config.resync_interval)))
}

/// Server-side applies the status, skipping the write when nothing changed.
async fn write_status(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    user_id: Option<String>,
    ready: Condition,
) -> Result<Option<String>, Error> {
    let existing = user.status.clone().unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let status = MatrixUserStatus {
        user_id,
        conditions: conditions::merge(&existing.conditions, vec![ready], now),
        observed_generation: user.metadata.generation,
    };
    if status == existing {
        return Ok(user.resource_version());
    }
    super::apply_status(api, user, &status).await
}

/// Every Synapse mutation leaves an Event on the object and an audit log line.
async fn record_mutation(
    user: &MatrixUser,
    ctx: &Context,
    reason: &str,
    user_id: &str,
    change: &UserUpsert,
) {
    let fields = change.field_names();
    tracing::info!(
        target: "audit",
        kind = "MatrixUser",
        namespace = %user.namespace().unwrap_or_default(),
        name = %user.name_any(),
        action = reason,
        matrix_user = user_id,
        fields = ?fields,
        "synapse mutation"
    );
    publish(
        user,
        ctx,
        EventType::Normal,
        reason,
        "Converge",
        format!("{user_id}: set {}", fields.join(", ")),
    )
    .await;
}

async fn publish(
    user: &MatrixUser,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // Published off the reconcile's path: an Event is a record, not a step
    // the next Synapse call should wait for.
    let (recorder, reference, object) = (ctx.recorder.clone(), user.object_ref(&()), key(user));
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(user = %object, error = %e, "could not publish event");
        }
    });
}
