//! `MatrixUser` controller: the I/O shell around [`plan`].

pub mod account;
pub mod handle;
pub mod plan;

use super::audit::{self, Subject};
use super::backoff::jitter;
use super::finalizer::Cleanup;
use super::index::{keys, Index};
use super::memo::fingerprint;
use super::outcome::{self, Outcome};
use super::sweep::Trust;
use super::{claims, key};
use super::{Context, Deps, Error, OWNER_PROVIDER};
use crate::api::conditions::{self, Condition, READY};
use crate::api::{Confirmed, MatrixUser, MatrixUserStatus};
use crate::synapse::{ExternalId, UserUpsert};
use account::Accounts;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use plan::{
    global_writes, plan, plan_cleanup, precheck, unlock_waits, Blocked, CleanupAction, Desired,
    UserAction, UserPlan,
};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The shared caches the user controller reads.
pub struct Caches {
    pub users: Store<MatrixUser>,
    pub index: Arc<Index<MatrixUser>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
}

/// The shared watch subscriptions that trigger user reconciles.
pub struct Triggers<A, B> {
    /// Every applied `MatrixUser`.
    pub objects: A,
    /// The same, with deletions: a claimant that changes or goes away lets
    /// the others decide again.
    pub peers: B,
}

/// Runs the `MatrixUser` controller until `shutdown` resolves.
pub async fn run<A, B>(
    caches: Caches,
    triggers: Triggers<A, B>,
    deps: Deps,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) where
    A: Stream<Item = Arc<MatrixUser>> + Send + 'static,
    B: Stream<Item = Arc<MatrixUser>> + Send + 'static,
{
    let (peers, index) = (caches.users.clone(), caches.index.clone());
    let Deps {
        client,
        synapse,
        config,
        recorder,
        stats,
        // Joins are the room controller's.
        own_joins: _,
        sweep,
        leading,
    } = deps;
    let ctx = Arc::new(Context {
        client,
        synapse,
        config,
        recorder,
        users: caches.users.clone(),
        user_index: caches.index,
        namespaces: caches.namespaces,
        backoff: super::default_backoff(),
        stats,
        memo: Default::default(),
        sweep,
        leading,
    });
    let evict = ctx.clone();
    // Each object's email as last seen: a claimant that changes its address
    // frees the old one.
    let emails: std::sync::Mutex<std::collections::HashMap<String, String>> = Default::default();
    let (own, by_peer) = (ctx.stats.clone(), ctx.stats.clone());
    let objects = triggers
        .objects
        .inspect(move |u| own.queue.note_object(KIND, u.as_ref()));
    Controller::for_shared_stream(objects, caches.users)
        .watches_shared_stream(triggers.peers, move |changed: Arc<MatrixUser>| {
            let gone = peers.get(&ObjectRef::from_obj(changed.as_ref())).is_none();
            if gone {
                evict.forget(&key(changed.as_ref()));
            }
            let previous = {
                let mut emails = emails.lock().unwrap_or_else(|e| e.into_inner());
                match changed.spec.email.as_ref().filter(|_| !gone) {
                    Some(email) => emails.insert(key(changed.as_ref()), email.clone()),
                    None => emails.remove(&key(changed.as_ref())),
                }
            };
            let rivals = |key: &str| index.get(&peers, key);
            by_peer.queue.note(
                KIND,
                claim_peers(rivals, &changed, gone, previous.as_deref()),
            )
        })
        .with_config(super::controller_config(&ctx.config, Duration::ZERO))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// The objects whose claims `changed` may have freed: when a claimant of a
/// localpart goes away, the others claiming it; when one changes in any way,
/// those currently refused its email (the address it has, or had before:
/// `previous`) or its subject (the holder may have let go). Other changes
/// cannot move a localpart claim: newcomers are younger.
fn claim_peers(
    rivals: impl Fn(&str) -> Vec<Arc<MatrixUser>>,
    changed: &MatrixUser,
    gone: bool,
    previous: Option<&str>,
) -> Vec<ObjectRef<MatrixUser>> {
    let me = ObjectRef::from_obj(changed);
    let leaving = changed.metadata.deletion_timestamp.is_some() || gone;
    let mut peers: Vec<Arc<MatrixUser>> = changed
        .spec
        .email
        .as_deref()
        .into_iter()
        .chain(previous)
        .flat_map(|email| rivals(&keys::refused_email(email)))
        .collect();
    peers.extend(rivals(&keys::refused_subject(
        changed.spec.subject.as_deref(),
    )));
    if leaving {
        peers.extend(rivals(&keys::localpart(&changed.spec.localpart)));
    }
    let mut refs: Vec<_> = peers
        .iter()
        .map(|u| ObjectRef::from_obj(u.as_ref()))
        .filter(|r| *r != me)
        .collect();
    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    refs.dedup();
    refs
}

/// The finalizer is the only top-level branch: apply, or clean up.
pub async fn reconcile(user: Arc<MatrixUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(user) = ctx.leading.current(user, &ctx.users).await else {
        return Ok(Action::await_change());
    };
    let timer = ctx.stats.start(KIND, &super::key(user.as_ref()));
    let api: Api<MatrixUser> = super::own_namespace(&ctx.client, user.as_ref())?;
    let (result, written) = outcome::noting(super::finalizer::reconcile(
        &api,
        user.as_ref(),
        |_| apply(&user, &api, &ctx),
        || cleanup(&user, &api, &ctx),
    ))
    .await;
    ctx.stats.user_reconciles.fetch_add(1, Ordering::Relaxed);
    let before = user
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY));
    timer.finish(Outcome::of(&result, written, before));
    result
}

fn error_policy(user: Arc<MatrixUser>, error: &Error, ctx: Arc<Context>) -> Action {
    super::retry_after(user.as_ref(), error, &ctx.backoff, &ctx.stats.user_failures)
}

/// The marker external id that says "this account is this object's": the
/// uid is part of it, so an object re-created under the same name is another
/// owner and never revives the account its predecessor left.
fn owner_marker(user: &MatrixUser) -> ExternalId {
    ExternalId {
        auth_provider: OWNER_PROVIDER.into(),
        external_id: format!("{}/{}", key(user), user.uid().unwrap_or_default()),
    }
}

/// The marker of earlier versions (`namespace/name`), honoured only for the
/// object whose status already names the account: that object made it.
fn legacy_marker(user: &MatrixUser, user_id: &str) -> Option<ExternalId> {
    let recorded = user.status.as_ref().and_then(|s| s.user_id.as_deref());
    (recorded == Some(user_id)).then(|| ExternalId {
        auth_provider: OWNER_PROVIDER.into(),
        external_id: key(user),
    })
}

/// Whether this object holds its localpart (oldest claim wins, homeserver-wide).
/// `Err` names the holder, for the operator's log only.
fn holds_localpart(user: &MatrixUser, ctx: &Context) -> Result<(), String> {
    let rivals = ctx
        .user_index
        .get(&ctx.users, &keys::localpart(&user.spec.localpart));
    claims::holds_localpart(&rivals, user)
}

/// The tenant the object's namespace belongs to, from its label.
fn tenant_of(ctx: &Context, namespace: &str) -> Option<String> {
    ctx.namespaces
        .get(&ObjectRef::new(namespace))
        .and_then(|ns| ns.labels().get(crate::api::TENANT_LABEL).cloned())
}

/// Whether this object holds its subject among the tenant's objects.
fn holds_subject(user: &MatrixUser, ctx: &Context, tenant: &str) -> Result<(), String> {
    let Some(subject) = user.spec.subject.as_deref() else {
        return Ok(());
    };
    let rivals = ctx.user_index.get(&ctx.users, &keys::subject(subject));
    claims::check(&rivals, user, |u| {
        u.spec.subject.as_deref() == Some(subject)
            && u.metadata.deletion_timestamp.is_none()
            && tenant_of(ctx, &u.namespace().unwrap_or_default()).as_deref() == Some(tenant)
    })
}

/// Whether this object holds its email homeserver-wide. Deactivated and
/// departing objects claim nothing (Synapse strips a deactivated account's
/// emails); an address still held in Synapse is caught before any write.
fn holds_email(user: &MatrixUser, ctx: &Context) -> Result<(), String> {
    let Some(email) = user.spec.email.as_deref().map(str::to_lowercase) else {
        return Ok(());
    };
    let rivals = ctx.user_index.get(&ctx.users, &keys::email(&email));
    claims::check(&rivals, user, |u| {
        !u.spec.deactivated
            && u.metadata.deletion_timestamp.is_none()
            && u.spec.email.as_deref().map(str::to_lowercase).as_deref() == Some(email.as_str())
    })
}

async fn apply(user: &MatrixUser, api: &Api<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let ns = user.namespace().unwrap_or_default();
    let resync = Action::requeue(jitter(ctx.config.resync_interval));

    if let Err(holder) = holds_localpart(user, ctx) {
        tracing::info!(user = %key(user), %holder, "localpart claimed by an older object");
        block(user, api, ctx, Blocked::LocalpartConflict).await?;
        return Ok(resync);
    }
    let sso_provider = ctx.config.sso_provider();
    let tenant = tenant_of(ctx, &ns);
    let sso_subject = match (&user.spec.subject, &tenant) {
        (Some(subject), Some(tenant)) => Some(crate::api::sso_subject(tenant, subject)),
        _ => None,
    };
    let email_held = match holds_email(user, ctx) {
        Ok(()) => true,
        Err(holder) => {
            tracing::info!(user = %key(user), %holder, "email claimed by an older object");
            false
        }
    };
    let user_id = ctx.synapse.user_id(&user.spec.localpart)?;
    let mut desired = Desired {
        spec: &user.spec,
        owner_marker: owner_marker(user),
        legacy_marker: legacy_marker(user, user_id.as_str()),
        sso_provider: &sso_provider,
        sso_subject,
        reserved: claims::is_reserved(&ctx.config.reserved_localparts, &user.spec.localpart),
        admin_allowed: ctx.config.admin_namespaces.contains(&ns),
        adoption_allowed: ctx.config.adopt_namespaces.contains(&ns),
        email_held,
        create_pending: pending_account(user).as_deref() == Some(user_id.as_str()),
        unlock_allowed: false,
    };
    let lock = LockRecord::of(user, ctx.config.credential_token_lifetime);
    // Where every session can be found and ended (MAS), a lock lifts at once.
    desired.unlock_allowed =
        lock.may_lift() || Accounts::of(&ctx.synapse).sessions_are_enumerable();
    if let Some(blocked) = precheck(&desired) {
        block(user, api, ctx, blocked).await?;
        return Ok(resync);
    }
    if let Some(tenant) = &tenant {
        if let Err(holder) = holds_subject(user, ctx, tenant) {
            tracing::info!(user = %key(user), %holder, "subject claimed by an older object of the tenant");
            block(user, api, ctx, Blocked::SubjectConflict).await?;
            return Ok(resync);
        }
    }
    // What the account should be, and nothing of our own bookkeeping (a
    // pending create, the legacy marker our own status enables): our own
    // status writes must not look like a change and cost a Synapse read.
    let fingerprint = fingerprint(&(
        desired.spec,
        &desired.owner_marker,
        &desired.sso_subject,
        (desired.reserved, desired.admin_allowed),
        (desired.adoption_allowed, desired.email_held),
        user.metadata.generation,
    ));
    let digest = super::memo::digest(fingerprint, None);
    if let Some(wait) = trusted_for(user, ctx, &digest) {
        // Converged to this very digest, and not due: nothing to read.
        return Ok(Action::requeue(
            wait.min(jitter(ctx.config.resync_interval)),
        ));
    }

    let mut recorded = None;
    let outcome = converge(user, api, &user_id, &mut desired, ctx, &mut recorded).await;
    // A create recorded on the way stays recorded, whatever comes next: the
    // status writes below start from the object as it now stands, or a
    // failure after the create would erase the record and leave the
    // account looking like someone else's (`AccountExists`).
    let current;
    let user = match recorded {
        Some(user_id) => {
            current = with_pending_account(user, user_id);
            &current
        }
        None => user,
    };
    match outcome {
        Ok(Ok(Converged {
            unlock_waits,
            email_releasing,
        })) => {
            ctx.backoff.reset(&key(user));
            let locked = !user.spec.deactivated && (user.spec.locked || unlock_waits);
            let ready = if unlock_waits {
                Condition::new(
                    READY,
                    false,
                    UNLOCK_PENDING,
                    format!(
                        "the lock lifts at {}, when every credential token issued before it has expired",
                        lock.lifts_at
                    ),
                    user.metadata.generation,
                )
            } else if !desired.email_held {
                Condition::new(
                    READY,
                    false,
                    "EmailConflict",
                    "the email address belongs to another account; it was not written",
                    user.metadata.generation,
                )
            } else if user.spec.subject.is_some() && tenant.is_none() {
                Condition::new(
                    READY,
                    true,
                    "Converged",
                    "account matches the spec; the subject is not linked for SSO because the namespace names no tenant",
                    user.metadata.generation,
                )
            } else {
                let message = if user.spec.deactivated {
                    "account is deactivated"
                } else {
                    "account matches the spec"
                };
                Condition::new(READY, true, "Converged", message, user.metadata.generation)
            };
            let conflict = !ready.is_true();
            if conflict {
                warn_on_transition(user, ctx, &ready);
            }
            // Confirmed, unless it must be looked at again soon.
            let confirmed = (!unlock_waits && !email_releasing).then(|| Confirmed::now(&digest));
            // Converged: no create is pending any more.
            write_status(
                user,
                api,
                Some(user_id.to_string()),
                ready,
                None,
                Some(locked),
                confirmed,
            )
            .await?;
            if unlock_waits {
                return Ok(Action::requeue(lock.until_lifted()));
            }
            if email_releasing {
                // Its holder is letting go of it this very moment.
                return Ok(Action::requeue(jitter(Duration::from_secs(2))));
            }
            // A refused email is looked at again when a claimant of that
            // address changes (see `claim_peers`), or at the sweep.
            ctx.memo
                .record(&key(user), fingerprint, Confirmed::now(digest));
            Ok(resync)
        }
        Ok(Err(blocked)) => {
            block(user, api, ctx, blocked).await?;
            Ok(resync)
        }
        Err(error) => fail(user, api, ctx, error).await,
    }
}

/// Observe, plan, check global claims in Synapse, and apply. An email held by
/// another account is dropped from the plan (`desired.email_held` turns
/// false); an SSO link held by another account blocks every write, so no
/// half-made account is left behind. A pending create it records in the
/// status is noted in `recorded`, even when a later step fails.
async fn converge(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    user_id: &ruma::UserId,
    desired: &mut Desired<'_>,
    ctx: &Context,
    recorded: &mut Option<String>,
) -> Result<Result<Converged, Blocked>, Error> {
    let accounts = Accounts::of(&ctx.synapse);
    let observed = account::observe(accounts, user_id, desired.sso_provider).await?;
    let view = observed.as_ref().map(|o| &o.view);
    let mut planned = plan(desired, view);
    let mut email_releasing = false;
    if let UserPlan::Converge { actions, .. } = &planned {
        let writes = global_writes(actions, view, desired.sso_provider);
        if let Some(subject) = &writes.sso_subject {
            let holder =
                account::subject_holder(accounts, observed.as_ref(), desired.sso_provider, subject)
                    .await?;
            if holder.is_some_and(|h| h != user_id.as_str()) {
                tracing::info!(user = %key(user), "SSO subject linked to another account");
                return Ok(Err(Blocked::SubjectConflict));
            }
        }
        for email in &writes.emails {
            let holder = account::email_holder(accounts, observed.as_ref(), email).await?;
            if let Some(holder) = holder.filter(|h| h != user_id.as_str()) {
                tracing::info!(user = %key(user), "email held by another account");
                desired.email_held = false;
                email_releasing |= releasing(ctx, &holder, email);
            }
        }
        if !desired.email_held {
            planned = plan(desired, view);
        }
    }
    let unlock_waits = unlock_waits(desired, view);
    let mut mas_account = observed.and_then(|o| o.mas);
    match planned {
        UserPlan::Blocked(blocked) => Ok(Err(blocked)),
        UserPlan::Converge { actions, adopts } => {
            for action in actions {
                if let UserAction::Create(_) = &action {
                    if record_pending_create(user, api, user_id).await? {
                        *recorded = Some(user_id.to_string());
                    }
                }
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
                    UserAction::EndSessions => {
                        end_sessions(user, user_id, ctx, accounts, mas_account.as_ref()).await?;
                        continue;
                    }
                };
                match accounts {
                    Accounts::Synapse(synapse) => synapse.upsert_user(user_id, change).await?,
                    Accounts::Mas(mas, synapse) => {
                        let object_created = user
                            .metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.as_second());
                        let applied = account::apply_in_mas(
                            (mas, synapse),
                            user_id,
                            &action,
                            desired,
                            object_created,
                            &mut mas_account,
                        )
                        .await?;
                        if let Err(blocked) = applied {
                            return Ok(Err(blocked));
                        }
                    }
                }
                record_mutation(user, ctx, verb, user_id.as_str(), change);
            }
            Ok(Ok(Converged {
                unlock_waits,
                email_releasing,
            }))
        }
    }
}

/// What a convergence that went through leaves for the status.
struct Converged {
    /// The spec lifts a lock that must stay a while longer.
    unlock_waits: bool,
    /// The email is held in Synapse by an account whose object no longer
    /// claims it: its own reconcile is releasing it right now.
    email_releasing: bool,
}

/// Whether the account `holder` holds `email` only until its object's
/// reconcile writes the address it now declares.
fn releasing(ctx: &Context, holder: &str, email: &str) -> bool {
    let Ok(holder) = ruma::UserId::parse(holder) else {
        return false;
    };
    ctx.user_index
        .get(&ctx.users, &keys::localpart(holder.localpart()))
        .iter()
        .any(|u| u.spec.email.as_deref().map(str::to_lowercase) != Some(email.to_lowercase()))
}

/// Ends every session of the account: in Synapse mode by deleting its
/// devices (their access tokens die), in MAS mode by ending its MAS
/// sessions and then its devices. Nothing is written when it has none.
async fn end_sessions(
    user: &MatrixUser,
    user_id: &ruma::UserId,
    ctx: &Context,
    accounts: Accounts<'_>,
    mas_account: Option<&account::MasAccount>,
) -> Result<(), Error> {
    let count = match (accounts, mas_account) {
        (Accounts::Mas(mas, synapse), Some(account)) => {
            account::end_mas_sessions(mas, synapse, user_id, account).await?
        }
        _ => {
            let devices = ctx.synapse.list_devices(user_id).await?;
            if !devices.is_empty() {
                ctx.synapse.delete_devices(user_id, &devices).await?;
            }
            devices.len()
        }
    };
    if count == 0 {
        return Ok(());
    }
    audit::mutation(
        user,
        "SessionsEnded",
        Subject::Sessions {
            user_id: user_id.as_str(),
            count,
        },
    );
    publish(
        user,
        ctx,
        EventType::Normal,
        "SessionsEnded",
        "Converge",
        format!("{user_id}: ended {count} session(s)"),
    );
    Ok(())
}

async fn cleanup(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
) -> Result<Cleanup, Error> {
    if holds_localpart(user, ctx).is_err() {
        // Never the account's owner: nothing in Synapse is ours to change.
        return Ok(Cleanup::Done);
    }
    let result: Result<(), Error> = async {
        let user_id = ctx.synapse.user_id(&user.spec.localpart)?;
        let accounts = Accounts::of(&ctx.synapse);
        let sso_provider = ctx.config.sso_provider();
        let observed = account::observe(accounts, &user_id, &sso_provider).await?;
        let (erase, verb) = match plan_cleanup(
            user.spec.deletion_policy,
            &owner_marker(user),
            legacy_marker(user, user_id.as_str()).as_ref(),
            observed.as_ref().map(|o| &o.view),
        ) {
            CleanupAction::Nothing => return Ok(()),
            CleanupAction::Deactivate => (false, "AccountDeactivated"),
            CleanupAction::Erase => (true, "AccountErased"),
        };
        match (accounts, observed.and_then(|o| o.mas)) {
            (Accounts::Mas(mas, _), Some(account)) => {
                mas.deactivate(&account.user.id, erase).await?
            }
            _ => ctx.synapse.deactivate_user(&user_id, erase).await?,
        }
        let change = UserUpsert {
            deactivated: Some(true),
            ..Default::default()
        };
        record_mutation(user, ctx, verb, user_id.as_str(), &change);
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(Cleanup::Done),
        Err(error) => fail(user, api, ctx, error)
            .await
            .map(|_| Cleanup::Pending(jitter(ctx.config.resync_interval))),
    }
}

/// The condition message for a blocked object. It never names another
/// object: the holder of a claim may live in another tenant.
fn blocked_message(blocked: Blocked, user: &MatrixUser) -> String {
    let localpart = &user.spec.localpart;
    match blocked {
        Blocked::ReservedLocalpart => format!("localpart {localpart:?} is reserved by the operator"),
        Blocked::LocalpartConflict => format!("localpart {localpart:?} is claimed by another, older MatrixUser"),
        Blocked::AdminNotAllowed => "server admin is not allowed in this namespace; the account is left as it was".into(),
        Blocked::AccountExists => format!(
            "account @{localpart} exists and was not created by the operator; adoption is not allowed in this namespace"
        ),
        Blocked::OnlyInSynapse => format!(
            "account @{localpart} exists in Synapse but not in MAS; the operator never takes it over"
        ),
        Blocked::OwnedByAnother => format!(
            "account @{localpart} belongs to another MatrixUser (an earlier object of this name counts as another); it is never adopted"
        ),
        Blocked::AccountDeactivated => format!(
            "account @{localpart} is deactivated in Synapse; the operator never reactivates or adopts a deactivated account"
        ),
        Blocked::SubjectConflict => "the subject is already linked to another account of this tenant; nothing was written".into(),
    }
}

/// Records a blocked state: a condition (and a Warning Event on transition), no Synapse call.
async fn block(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
    blocked: Blocked,
) -> Result<(), Error> {
    let ready = Condition::new(
        READY,
        false,
        blocked.reason(),
        blocked_message(blocked, user),
        user.metadata.generation,
    );
    warn_on_transition(user, ctx, &ready);
    // An object that owns no account must not advertise one; one refused a
    // change keeps its account, and so its rooms.
    let user_id = blocked
        .keeps_account()
        .then(|| user.status.as_ref().and_then(|s| s.user_id.clone()))
        .flatten();
    write_status(user, api, user_id, ready, pending_account(user), None, None)
        .await
        .map(|_| ())
}

/// A Warning Event when the Ready reason changes to `ready`'s.
fn warn_on_transition(user: &MatrixUser, ctx: &Context, ready: &Condition) {
    let previous = user
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, READY))
        .map(|c| c.reason.clone());
    if previous.as_deref() != Some(ready.reason.as_str()) {
        publish(
            user,
            ctx,
            EventType::Warning,
            &ready.reason,
            "Reconcile",
            ready.message.clone(),
        );
    }
}

/// How long the account may go unread: its status confirms this digest,
/// no failure came after, and the sweep is not due (or has no slot for it
/// yet). `None`: read Synapse now.
fn trusted_for(user: &MatrixUser, ctx: &Context, digest: &str) -> Option<Duration> {
    if ctx.memo.failed_last(&key(user)) {
        return None;
    }
    let in_status = user.status.as_ref().and_then(|s| s.confirmed.as_ref());
    let here = ctx.memo.confirmed(&key(user));
    match ctx.sweep.judge(in_status, here.as_ref(), digest) {
        Trust::Trusted { due_in } => Some(due_in),
        Trust::Due => {
            let cost = Accounts::of(&ctx.synapse).reads_per_observe();
            ctx.sweep.reserve(&key(user), cost)
        }
        Trust::Unconfirmed => None,
    }
}

/// Records a failure as a condition; transient ones back off, the rest wait for a change.
async fn fail(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    ctx: &Context,
    error: Error,
) -> Result<Action, Error> {
    ctx.memo.record_failure(&key(user));
    let user_id = user.status.as_ref().and_then(|s| s.user_id.clone());
    let verdict = user
        .status
        .as_ref()
        .is_some_and(|s| conditions::find(&s.conditions, READY).is_some());
    if error.is_transient() && verdict {
        // A blip or a hand-over: the last verdict stands, and the retry is
        // noted only when a change waits on it.
        let converged = conditions::current_and_true(
            user.status.as_ref().map(|s| &s.conditions[..]),
            user.metadata.generation,
        );
        if converged {
            return Err(error);
        }
        if let Err(status_error) = note_retry(user, api, &error).await {
            tracing::warn!(user = %key(user), error = %status_error, "could not record the retry in status");
        }
        return Err(error);
    }
    let ready = Condition::new(
        READY,
        false,
        error.reason(),
        error.to_string(),
        user.metadata.generation,
    );
    if let Err(status_error) =
        write_status(user, api, user_id, ready, pending_account(user), None, None).await
    {
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
    );
    Ok(Action::requeue(jitter(ctx.config.resync_interval)))
}

/// Notes a transient failure in `Reconciling`, keeping every other
/// condition (the last `Ready` stands); nothing is written when the note
/// is already there.
async fn note_retry(user: &MatrixUser, api: &Api<MatrixUser>, error: &Error) -> Result<(), Error> {
    let existing = user.status.clone().unwrap_or_default();
    let note = Condition::new(
        conditions::RECONCILING,
        true,
        error.reason(),
        format!("retrying: {error}"),
        user.metadata.generation,
    );
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let status = MatrixUserStatus {
        conditions: conditions::merge(&existing.conditions, vec![note], now),
        ..existing.clone()
    };
    if status != existing {
        super::apply_status(api, user, &status).await?;
    }
    Ok(())
}

/// Server-side applies the status, skipping the write when nothing changed.
/// `locked`, when known, is whether Synapse holds the account locked now:
/// the `Locked` condition, whose transition time is when the lock began.
async fn write_status(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    user_id: Option<String>,
    ready: Condition,
    pending_account: Option<String>,
    locked: Option<bool>,
    confirmed: Option<Confirmed>,
) -> Result<Option<String>, Error> {
    outcome::note(&ready);
    let existing = user.status.clone().unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let mut next = conditions::with_kstatus(ready);
    if let Some(locked) = locked {
        let (reason, message) = match locked {
            true => ("Locked", "the account is locked"),
            false => ("Unlocked", "the account is not locked"),
        };
        next.push(Condition::new(
            LOCKED,
            locked,
            reason,
            message,
            user.metadata.generation,
        ));
    }
    let status = MatrixUserStatus {
        user_id,
        conditions: conditions::merge(&existing.conditions, next, now),
        observed_generation: user.metadata.generation,
        pending_account,
        confirmed,
    };
    if status == existing {
        return Ok(user.resource_version());
    }
    super::apply_status(api, user, &status).await
}

/// The condition recording that the account is locked, and since when.
/// The kind, as the metrics name it.
const KIND: &str = "MatrixUser";

pub const LOCKED: &str = "Locked";
/// The Ready reason of an account whose lock must stay a while longer.
pub const UNLOCK_PENDING: &str = "UnlockPending";

/// When a lock may be lifted. Synapse keeps the tokens of a locked account
/// and revives them on unlock, and the credential API's tokens (minted by
/// login-as, owned by the operator's account) cannot all be found to
/// revoke. Each lives at most the credential token lifetime, so a lock
/// lifts once that long has passed since it began (the `Locked`
/// condition's transition time, persisted in status): no token from
/// before it ever works again, whatever restarted meanwhile.
struct LockRecord {
    lifts_at: k8s_openapi::jiff::Timestamp,
}

impl LockRecord {
    fn of(user: &MatrixUser, lifetime: Duration) -> LockRecord {
        let now = k8s_openapi::jiff::Timestamp::now();
        let since = user
            .status
            .as_ref()
            .and_then(|s| conditions::find(&s.conditions, LOCKED))
            .filter(|c| c.is_true())
            .and_then(|c| c.last_transition_time.as_ref())
            .map_or(now, |t| t.0);
        let lifetime = k8s_openapi::jiff::SignedDuration::try_from(lifetime).unwrap_or_default();
        LockRecord {
            lifts_at: since.checked_add(lifetime).unwrap_or(now),
        }
    }

    fn may_lift(&self) -> bool {
        k8s_openapi::jiff::Timestamp::now() >= self.lifts_at
    }

    /// How long until it may lift (a second past, so the next look lifts it).
    fn until_lifted(&self) -> Duration {
        let left = self
            .lifts_at
            .duration_since(k8s_openapi::jiff::Timestamp::now());
        Duration::try_from(left).unwrap_or_default() + Duration::from_secs(1)
    }
}

/// The account this object's status says a create is under way for.
fn pending_account(user: &MatrixUser) -> Option<String> {
    user.status.as_ref().and_then(|s| s.pending_account.clone())
}

/// Records in the status, before Synapse is asked, that this object is
/// creating `user_id`: the intent outlives a crash of either side. Whether
/// it wrote the record (false: the object already carried it).
async fn record_pending_create(
    user: &MatrixUser,
    api: &Api<MatrixUser>,
    user_id: &ruma::UserId,
) -> Result<bool, Error> {
    if pending_account(user).as_deref() == Some(user_id.as_str()) {
        return Ok(false);
    }
    let status = with_pending_account(user, user_id.to_string()).status;
    super::apply_status(api, user, &status.unwrap_or_default()).await?;
    Ok(true)
}

/// The object as its status stands once a pending create of `user_id` is
/// recorded.
fn with_pending_account(user: &MatrixUser, user_id: String) -> MatrixUser {
    let mut user = user.clone();
    user.status
        .get_or_insert_with(Default::default)
        .pending_account = Some(user_id);
    user
}

/// Every Synapse mutation leaves an Event on the object and an audit log line.
fn record_mutation(
    user: &MatrixUser,
    ctx: &Context,
    reason: &str,
    user_id: &str,
    change: &UserUpsert,
) {
    let fields = change.field_names();
    audit::mutation(
        user,
        reason,
        Subject::Account {
            user_id,
            fields: &fields,
        },
    );
    publish(
        user,
        ctx,
        EventType::Normal,
        reason,
        "Converge",
        format!("{user_id}: set {}", fields.join(", ")),
    );
}

fn publish(
    user: &MatrixUser,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    audit::publish(&ctx.recorder, user, type_, reason, action, note);
}

#[cfg(test)]
mod reconcile_tests {
    //! Reconcile-level: what a user refused before Synapse sends the API
    //! server, and that it never reaches Synapse. Everything that does is
    //! on the real stack, in the integration suite.
    use super::*;
    use crate::controller::scripted::{self, ready_of, refuse, status_server, status_written};
    use crate::controller::FINALIZER;
    use kube::runtime::{reflector, watcher};
    use kube::Client;
    use serde_json::Value;

    fn user(ns: &str, name: &str, localpart: &str, created: &str) -> MatrixUser {
        serde_yaml::from_str(&format!(
            r#"
apiVersion: matrix.openmeet.net/v1alpha1
kind: MatrixUser
metadata: {{name: {name}, namespace: {ns}, generation: 1, uid: u-{name}, creationTimestamp: "{created}", finalizers: [{FINALIZER}]}}
spec: {{localpart: {localpart}}}
"#
        ))
        .unwrap()
    }

    fn context(client: Client, users: &[&MatrixUser]) -> Arc<Context> {
        let (store, mut writer) = reflector::store();
        let user_index = Index::new(keys::user);
        for u in users {
            let event = watcher::Event::Apply((*u).clone());
            writer.apply_watcher_event(&event);
            user_index.observe(&event);
        }
        let (namespaces, _) = reflector::store();
        Arc::new(Context {
            recorder: scripted::recorder(client.clone()),
            client,
            synapse: scripted::unreachable_synapse(),
            config: scripted::config(),
            users: store,
            user_index,
            namespaces,
            backoff: crate::controller::default_backoff(),
            stats: Default::default(),
            memo: Default::default(),
            sweep: Arc::new(crate::controller::sweep::Sweep::new(
                Duration::from_secs(3600),
                1.0,
            )),
            leading: crate::controller::Leading::always(),
        })
    }

    /// Reconciles `me` among `all`; returns the status it wrote, after
    /// checking it was the one write beside one Warning Event.
    async fn refused(me: &MatrixUser, all: &[&MatrixUser], reason: &str) -> Value {
        let answer = me.clone();
        let (client, recorded) = scripted::client(status_server(move |_| {
            serde_json::to_value(&answer).unwrap()
        }));
        let ctx = context(client, all);
        reconcile(Arc::new(me.clone()), ctx.clone()).await.unwrap();
        assert_eq!(
            ctx.synapse.stats().reads() + ctx.synapse.stats().writes(),
            0
        );
        let sent = recorded.expect(2).await;
        let event = sent.iter().find(|x| x.path.contains("/events")).unwrap();
        assert_eq!(
            (event.body["type"].as_str(), event.body["reason"].as_str()),
            (Some("Warning"), Some(reason))
        );
        let status = status_written(&sent, &me.name_any());
        assert_eq!(ready_of(&status)["reason"], reason);
        status
    }

    /// The same object with `status` finds nothing to write.
    async fn settled(me: &MatrixUser, all: &[&MatrixUser], status: Value) {
        let mut me = me.clone();
        me.status = Some(serde_json::from_value(status).unwrap());
        let (client, recorded) = scripted::client(refuse);
        reconcile(Arc::new(me), context(client, all)).await.unwrap();
        recorded.expect(0).await;
    }

    #[tokio::test]
    async fn a_younger_claim_on_a_localpart_in_another_tenant_never_reaches_synapse() {
        let alice = user("tenant-a", "alice", "alice", "2026-01-01T00:00:00Z");
        let mallory = user("tenant-b", "mallory", "alice", "2026-06-01T00:00:00Z");
        let status = refused(&mallory, &[&alice, &mallory], "LocalpartConflict").await;
        // It owns no account, and says so: no user id for rooms to use.
        assert!(status.get("userId").is_none(), "{status}");
        assert_eq!(
            ready_of(&status)["message"],
            "localpart \"alice\" is claimed by another, older MatrixUser"
        );
        settled(&mallory, &[&alice, &mallory], status).await;
    }

    #[tokio::test]
    async fn the_operators_own_accounts_are_never_claimed() {
        let admin = user("tenant-a", "admin", "operator", "2026-01-01T00:00:00Z");
        let status = refused(&admin, &[&admin], "ReservedLocalpart").await;
        assert!(status.get("userId").is_none(), "{status}");
        settled(&admin, &[&admin], status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MatrixUserStatus;

    fn user(name: &str, spec: serde_json::Value, reason: Option<&str>) -> Arc<MatrixUser> {
        let mut u = MatrixUser::new(name, serde_json::from_value(spec).unwrap());
        u.metadata.namespace = Some("t".into());
        u.status = reason.map(|r| MatrixUserStatus {
            conditions: vec![Condition::new(READY, false, r, "", Some(1))],
            ..Default::default()
        });
        Arc::new(u)
    }

    fn names(refs: Vec<ObjectRef<MatrixUser>>) -> Vec<String> {
        let mut names: Vec<String> = refs.into_iter().map(|r| r.name).collect();
        names.sort();
        names
    }

    #[test]
    fn a_claimant_leaving_or_changing_wakes_those_it_held_back() {
        let holder = user(
            "holder",
            serde_json::json!({"localpart": "a", "subject": "s", "email": "X@y.z"}),
            None,
        );
        let all = vec![
            holder.clone(),
            user(
                "same-localpart",
                serde_json::json!({"localpart": "a"}),
                Some("LocalpartConflict"),
            ),
            user(
                "email-loser",
                serde_json::json!({"localpart": "b", "email": "x@y.z"}),
                Some("EmailConflict"),
            ),
            user(
                "subject-loser",
                serde_json::json!({"localpart": "c", "subject": "s"}),
                Some("SubjectConflict"),
            ),
            user("bystander", serde_json::json!({"localpart": "d"}), None),
            user(
                "other-address-loser",
                serde_json::json!({"localpart": "e", "email": "other@y.z"}),
                Some("EmailConflict"),
            ),
        ];
        // The cache and its index, fed the same watch events.
        let (store, mut writer) = kube::runtime::reflector::store::<MatrixUser>();
        let index = Index::new(keys::user);
        let feed =
            |event: kube::runtime::watcher::Event<MatrixUser>,
             writer: &mut kube::runtime::reflector::store::Writer<MatrixUser>| {
                index.observe(&event);
                writer.apply_watcher_event(&event);
            };
        for u in &all {
            feed(
                kube::runtime::watcher::Event::Apply(u.as_ref().clone()),
                &mut writer,
            );
        }
        let rivals = |key: &str| index.get(&store, key);
        // A change in place: the losers of its email and subject look
        // again, not those refused another address.
        assert_eq!(
            names(claim_peers(rivals, &holder, false, None)),
            ["email-loser", "subject-loser"]
        );
        // It moved to another address: the losers of the old one look again.
        let moved = user(
            "holder",
            serde_json::json!({"localpart": "a", "subject": "s", "email": "new@y.z"}),
            None,
        );
        assert_eq!(
            names(claim_peers(rivals, &moved, false, Some("x@y.z"))),
            ["email-loser", "subject-loser"]
        );
        let unrelated = user("bystander", serde_json::json!({"localpart": "d"}), None);
        assert!(claim_peers(rivals, &unrelated, false, None).is_empty());
        // Gone from the cache: the localpart is free too.
        feed(
            kube::runtime::watcher::Event::Delete(holder.as_ref().clone()),
            &mut writer,
        );
        let rivals = |key: &str| index.get(&store, key);
        assert_eq!(
            names(claim_peers(rivals, &holder, true, None)),
            ["email-loser", "same-localpart", "subject-loser"]
        );
    }
}
