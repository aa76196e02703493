//! The controller: watches the custom resources and converges Synapse to them.
//! Each kind has a module shaped `observe → plan (pure) → apply → status`.

pub mod appservice;
pub mod audit;
pub mod backoff;
pub mod claims;
pub mod events;
pub mod finalizer;
pub mod grant;
pub mod index;
pub mod leader;
pub mod memo;
pub mod outcome;
pub mod own_joins;
pub mod permission;
pub mod queue;
pub mod reference;
pub mod room;
#[cfg(test)]
pub(crate) mod scripted;
pub mod shared;
pub mod sweep;
pub mod tally;
pub mod user;

use crate::api::{MatrixRoom, MatrixUser, MatrixUserGrant, RoomPermission};
use crate::metrics::{HistogramFamily, Labels};
use crate::synapse::{SynapseClient, SynapseError};
use backoff::Backoff;
use events::Recorder;
use futures::future::{ready, FutureExt};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, reflector, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shared::SharedWatch;
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tally::Tally;

/// Finalizer the operator puts on every object it converges.
pub const FINALIZER: &str = "matrix.openmeet.net/cleanup";
/// External-id provider that marks an account as the operator's.
pub const OWNER_PROVIDER: &str = "net.openmeet.owner";

/// Why a reconcile failed. Each variant maps to one condition reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Synapse(#[from] SynapseError),
    #[error(transparent)]
    Mas(#[from] crate::mas::MasError),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer error: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("invalid object: {0}")]
    Invalid(String),
}

impl Error {
    /// The stable condition reason for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Synapse(e) if e.is_transient() => "SynapseUnavailable",
            Error::Synapse(_) => "SynapseRejected",
            Error::Mas(crate::mas::MasError::Credentials(_)) => "MasCredentialsRejected",
            Error::Mas(e) if e.is_transient() => "MasUnavailable",
            Error::Mas(_) => "MasRejected",
            Error::Kube(_) | Error::Finalizer(_) => "KubernetesError",
            Error::Invalid(_) => "InvalidSpec",
        }
    }

    /// Transient errors are retried with backoff; the rest wait for a change.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Synapse(e) => e.is_transient(),
            Error::Mas(e) => e.is_transient(),
            Error::Kube(_) | Error::Finalizer(_) => true,
            Error::Invalid(_) => false,
        }
    }
}

/// Operator-wide policy that tenants cannot change for themselves.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// The `idp_id` of the sidecar in Synapse's `oidc_providers`.
    pub sso_idp_id: String,
    /// Localparts no `MatrixUser` may take (the operator's own accounts, `admin`, …).
    pub reserved_localparts: BTreeSet<String>,
    /// Namespaces allowed to adopt accounts that already exist in Synapse.
    pub adopt_namespaces: BTreeSet<String>,
    /// Namespaces whose users may be server admins.
    pub admin_namespaces: BTreeSet<String>,
    /// Periodic resync: the safety net behind watches. It re-folds each
    /// object from the caches; Synapse is read only when something changed
    /// or the sweep is due.
    pub resync_interval: Duration,
    /// How long a converged, unchanged object is trusted without a Synapse
    /// read (the longest an out-of-band change the feed cannot see waits).
    pub sweep_period: Duration,
    /// Synapse requests per second the sweep may spend, spread evenly.
    pub sweep_budget: f64,
    /// Watch one namespace only (namespaced install); all when `None`.
    pub namespace: Option<String>,
    /// Watch only objects with these labels.
    pub label_selector: Option<String>,
    /// This replica's name, for Events.
    pub instance: Option<String>,
    /// Managed aliases are `#<alias_prefix><spec.alias>:<server>`, inside the
    /// registration's exclusive alias namespace.
    pub alias_prefix: String,
    /// Reconciles of one kind running at once.
    pub concurrency: u16,
    /// The longest a credential API token lives (the sidecar's token
    /// lifetime): a lock lifts only once every token from before it expired.
    pub credential_token_lifetime: Duration,
    /// The room version new rooms are created with. From 12 on the operator
    /// is the rooms' creator, a power level no member can be given.
    pub room_version: String,
}

impl OperatorConfig {
    /// Reserved whatever the configuration adds.
    pub fn builtin_reserved(admin_localpart: &str, sender_localpart: &str) -> BTreeSet<String> {
        [
            admin_localpart,
            sender_localpart,
            "admin",
            "administrator",
            "root",
            "system",
            "synapse",
            "server",
            "support",
        ]
        .into_iter()
        .map(str::to_string)
        .collect()
    }

    pub fn sso_provider(&self) -> String {
        format!("oidc-{}", self.sso_idp_id)
    }
}

/// The gauge's labels of an object with these conditions.
fn ready_bucket(conditions: Option<&Vec<crate::api::Condition>>) -> tally::Bucket {
    let ready =
        conditions.and_then(|c| crate::api::conditions::find(c, crate::api::conditions::READY));
    crate::metrics::ready_bucket(ready)
}

/// Counters the operator keeps about its own work.
#[derive(Debug)]
pub struct ReconcileStats {
    pub user_reconciles: AtomicU64,
    pub user_failures: AtomicU64,
    pub room_reconciles: AtomicU64,
    pub room_failures: AtomicU64,
    pub permission_reconciles: AtomicU64,
    outcomes: Family<Labels, Counter>,
    durations: HistogramFamily,
    in_flight: Family<Labels, Gauge>,
    /// Objects queued for a reconcile that has not started.
    pub queue: queue::Queued,
    /// Counts kept from the watches, once the controllers run: the objects
    /// gauge reads them.
    objects: std::sync::OnceLock<ObjectTallies>,
}

/// The three kinds' counts by Ready reason, kept from the shared watches.
#[derive(Clone)]
struct ObjectTallies {
    users: Arc<Tally<MatrixUser>>,
    rooms: Arc<Tally<MatrixRoom>>,
    permissions: Arc<Tally<RoomPermission>>,
}

impl std::fmt::Debug for ObjectTallies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectTallies")
    }
}

impl Default for ReconcileStats {
    fn default() -> Self {
        ReconcileStats {
            user_reconciles: Default::default(),
            user_failures: Default::default(),
            room_reconciles: Default::default(),
            room_failures: Default::default(),
            permission_reconciles: Default::default(),
            outcomes: Default::default(),
            durations: crate::metrics::latency_family(),
            in_flight: Default::default(),
            queue: Default::default(),
            objects: Default::default(),
        }
    }
}

/// Times one reconcile; counted as in flight until finished or dropped.
pub struct ReconcileTimer<'a> {
    stats: &'a ReconcileStats,
    kind: &'static str,
    started: std::time::Instant,
}

impl ReconcileTimer<'_> {
    /// Records the outcome and the duration.
    pub fn finish(self, outcome: outcome::Outcome) {
        let outcome = outcome.label();
        self.stats
            .outcomes
            .get_or_create(&vec![
                ("kind", self.kind.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        self.stats
            .durations
            .get_or_create(&vec![("kind", self.kind.to_string())])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.stats
            .in_flight
            .get_or_create(&vec![("kind", self.kind.to_string())])
            .dec();
    }
}

impl ReconcileStats {
    pub fn user_reconciles(&self) -> u64 {
        self.user_reconciles.load(Ordering::Relaxed)
    }

    pub fn room_reconciles(&self) -> u64 {
        self.room_reconciles.load(Ordering::Relaxed)
    }

    /// Starts timing a reconcile of `kind`, the object `key`
    /// (`namespace/name`), which leaves the queue.
    pub fn start(&self, kind: &'static str, key: &str) -> ReconcileTimer<'_> {
        self.queue.taken(kind, key);
        self.in_flight
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
        ReconcileTimer {
            stats: self,
            kind,
            started: std::time::Instant::now(),
        }
    }

    /// Lets the objects gauge read these counts.
    fn count_objects(&self, tallies: ObjectTallies) {
        let _ = self.objects.set(tallies);
    }

    /// Objects by kind, Ready reason and health: a few counters per kind,
    /// whatever the tenant's size.
    fn objects_gauge(&self) -> Family<Labels, Gauge> {
        let family = Family::<Labels, Gauge>::default();
        let Some(tallies) = self.objects.get() else {
            return family;
        };
        for (kind, counts) in [
            tallies.users.counts(),
            tallies.rooms.counts(),
            tallies.permissions.counts(),
        ] {
            for ((reason, health), count) in counts {
                family
                    .get_or_create(&vec![
                        ("kind", kind.to_string()),
                        ("reason", reason.to_string()),
                        ("health", health.to_string()),
                    ])
                    .set(count);
            }
        }
        family
    }

    /// Adds the Prometheus families to a registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "openmeet_objects",
            "Objects in the controller's caches, by kind, Ready reason (Unobserved: no status yet; Other: a reason outside the known set) and health (ready, reconciling, stalled)",
            self.objects_gauge(),
        );
        registry.register(
            "openmeet_reconciles",
            "Reconciles run, by kind and outcome",
            self.outcomes.clone(),
        );
        registry.register(
            "openmeet_reconcile_duration_seconds",
            "Duration of reconciles, by kind",
            self.durations.clone(),
        );
        registry.register(
            "openmeet_reconciles_in_flight",
            "Reconciles running now, by kind (the controllers' work in progress)",
            self.in_flight.clone(),
        );
        let depth = Family::<Labels, Gauge>::default();
        for (kind, queued) in self.queue.depths() {
            depth
                .get_or_create(&vec![("kind", kind.to_string())])
                .set(queued as i64);
        }
        registry.register(
            "openmeet_reconcile_queue_depth",
            "Objects a change has queued for a reconcile that has not started yet, by kind (a standby's are waiting for the lease)",
            depth,
        );
    }
}

/// What every controller of a process runs with: the clients, the settings,
/// the Event recorder and the counters.
#[derive(Clone)]
pub struct Deps {
    pub client: Client,
    pub synapse: SynapseClient,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub stats: Arc<ReconcileStats>,
    /// Admin joins in flight, for this process's application-service endpoint.
    pub own_joins: Arc<own_joins::OwnJoins>,
    /// One sweep, and one budget, for every kind.
    pub sweep: Arc<sweep::Sweep>,
    /// Reconciles wait for it.
    pub leading: Leading,
}

/// Whether this replica leads. Reconciles wait for it, so a standby runs
/// its watches, caches and queues warm and starts converging the moment it
/// wins the lease.
#[derive(Clone, Debug)]
pub struct Leading(tokio::sync::watch::Receiver<bool>);

impl Leading {
    /// Leads from the start (no leader election).
    pub fn always() -> Self {
        Leading(tokio::sync::watch::channel(true).1)
    }

    /// Waits to lead until the sender says so.
    pub fn channel() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Leading(rx))
    }

    /// The object to reconcile once this replica leads: at once while it
    /// leads; after a wait, as the cache has it by then (`None`: gone, or
    /// the process is ending).
    pub async fn current<K>(&self, obj: Arc<K>, store: &Store<K>) -> Option<Arc<K>>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        if *self.0.borrow() {
            return Some(obj);
        }
        self.0.clone().wait_for(|leads| *leads).await.ok()?;
        store.get(&ObjectRef::from_obj(obj.as_ref()))
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub synapse: SynapseClient,
    pub config: OperatorConfig,
    pub recorder: Recorder,
    pub users: Store<crate::api::MatrixUser>,
    /// Users by localpart, email, subject and refusal: claims read only rivals.
    pub user_index: Arc<index::Index<crate::api::MatrixUser>>,
    /// Namespaces carrying a tenant label (metadata only), for tenant lookups.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub backoff: Backoff,
    pub stats: Arc<ReconcileStats>,
    pub memo: memo::ConvergedMemo,
    pub sweep: Arc<sweep::Sweep>,
    pub leading: Leading,
}

impl Context {
    /// Drops what was remembered of an object that is gone (its convergence
    /// and its failures), so the maps shrink with the tenant.
    pub fn forget(&self, key: &str) {
        self.memo.forget(key);
        self.backoff.reset(key);
    }
}

/// The controller process: everything `run` needs.
pub struct Operator {
    client: Client,
    synapse: SynapseClient,
    config: OperatorConfig,
    stats: Arc<ReconcileStats>,
    synced: Arc<std::sync::atomic::AtomicBool>,
    own_joins: Arc<own_joins::OwnJoins>,
    leading: Leading,
    /// The watch of rooms, made before `run` so the feed can share it.
    rooms: SharedWatch<MatrixRoom>,
    rooms_ready: tokio::sync::watch::Sender<bool>,
}

impl Operator {
    pub fn new(client: Client, synapse: SynapseClient, config: OperatorConfig) -> Self {
        Operator {
            client,
            synapse,
            config,
            stats: Arc::default(),
            synced: Arc::default(),
            own_joins: Arc::default(),
            leading: Leading::always(),
            rooms: SharedWatch::new(),
            rooms_ready: tokio::sync::watch::channel(false).0,
        }
    }

    /// The controller's cache of rooms with an index by room id, for the
    /// application-service endpoint of this process.
    pub fn feed_rooms(&mut self) -> appservice::FeedRooms {
        appservice::FeedRooms {
            store: self.rooms.store(),
            room_ids: self.rooms.index(index::keys::room_feed),
            ready: self.rooms_ready.subscribe(),
        }
    }

    /// Reconciles wait until `leading` says so (leader election); the
    /// watches and caches run from the start.
    pub fn with_leading(mut self, leading: Leading) -> Self {
        self.leading = leading;
        self
    }

    /// The joins this operator makes, for the application-service endpoint
    /// of the same process (see [`own_joins`]).
    pub fn own_joins(&self) -> Arc<own_joins::OwnJoins> {
        self.own_joins.clone()
    }

    /// Shares an endpoint's record of own joins (one endpoint serving
    /// several operators in a process, as the integration tests do).
    pub fn with_own_joins(mut self, own_joins: Arc<own_joins::OwnJoins>) -> Self {
        self.own_joins = own_joins;
        self
    }

    pub fn stats(&self) -> Arc<ReconcileStats> {
        self.stats.clone()
    }

    /// Set once the caches the controllers read from are complete.
    pub fn synced(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.synced.clone()
    }

    /// Runs every controller until `shutdown` resolves; in-flight reconciles finish first.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
        let reporter = Reporter {
            controller: crate::api::FIELD_MANAGER.into(),
            instance: self.config.instance.clone(),
        };
        let deps = Deps {
            client: self.client.clone(),
            synapse: self.synapse.clone(),
            config: self.config.clone(),
            recorder: Recorder::new(self.client.clone(), reporter),
            stats: self.stats.clone(),
            own_joins: self.own_joins.clone(),
            sweep: Arc::new(sweep::Sweep::new(
                self.config.sweep_period,
                self.config.sweep_budget,
            )),
            leading: self.leading.clone(),
        };
        let shutdown: Pin<Box<dyn Future<Output = ()> + Send + Sync>> = Box::pin(shutdown);
        let shutdown = shutdown.shared();

        // One watch per kind, shared by every trigger and cache below.
        let watch = watch_config(&self.config);
        let mut users = SharedWatch::<MatrixUser>::new();
        let mut rooms = self.rooms;
        let rooms_ready = self.rooms_ready;
        let mut permissions = SharedWatch::<RoomPermission>::new();
        let mut grants = SharedWatch::<MatrixUserGrant>::new();
        let user_triggers = user::Triggers {
            objects: users.subscribe(),
            peers: users.subscribe_with_deletions(),
        };
        let room_triggers = room::Triggers {
            objects: rooms.subscribe(),
            permissions: permissions.subscribe_with_deletions(),
            users: users.subscribe_with_deletions(),
            peers: rooms.subscribe_with_deletions(),
            grants: grants.subscribe_with_deletions(),
        };
        let grant_triggers = grant::Triggers {
            objects: grants.subscribe(),
            permissions: permissions.subscribe_with_deletions(),
            users: users.subscribe_with_deletions(),
        };
        let user_index = users.index(index::keys::user);
        let grant_index = grants.index(index::keys::grant);
        let permission_index = permissions.index(index::keys::permission);
        let room_index = rooms.index(index::keys::room);
        let permission_triggers = permission::Triggers {
            objects: permissions.subscribe(),
            rooms: rooms.subscribe_with_deletions(),
        };
        let (users_store, rooms_store, permissions_store, grants_store) = (
            users.store(),
            rooms.store(),
            permissions.store(),
            grants.store(),
        );
        let queue = &self.stats.queue;
        queue.watching("MatrixUser", users_store.clone());
        queue.watching("MatrixRoom", rooms_store.clone());
        queue.watching("RoomPermission", permissions_store.clone());
        queue.watching("MatrixUserGrant", grants_store.clone());
        self.stats.count_objects(ObjectTallies {
            users: users.tally("MatrixUser", |u| {
                ready_bucket(u.status.as_ref().map(|s| &s.conditions))
            }),
            rooms: rooms.tally("MatrixRoom", |r| {
                ready_bucket(r.status.as_ref().map(|s| &s.conditions))
            }),
            permissions: permissions.tally("RoomPermission", |p| {
                ready_bucket(p.status.as_ref().map(|s| &s.conditions))
            }),
        });
        let (namespaces, namespaces_writer) = reflector::store();
        // Metadata only: labels are all the tenant lookup needs.
        let namespaces_api: Api<PartialObjectMeta<Namespace>> = Api::all(self.client.clone());
        let watches = tokio::spawn(futures::future::join5(
            users.run(
                scoped(&self.client, &self.config),
                watch.clone(),
                strip_unread_but_labels::<MatrixUser>,
            ),
            rooms.run(
                scoped(&self.client, &self.config),
                watch.clone(),
                strip_unread_but_drift,
            ),
            permissions.run(
                scoped(&self.client, &self.config),
                watch.clone(),
                strip_unread::<RoomPermission>,
            ),
            grants.run(
                scoped(&self.client, &self.config),
                watch,
                strip_unread::<MatrixUserGrant>,
            ),
            reflector(
                namespaces_writer,
                watcher(
                    namespaces_api,
                    watcher::Config::default().labels(crate::api::TENANT_LABEL),
                )
                .default_backoff()
                .modify(strip_managed_fields),
            )
            .for_each(|_| ready(())),
        ));

        let room_controller = {
            let deps = deps.clone();
            let (users, permissions, rooms, shutdown) = (
                users_store.clone(),
                permissions_store.clone(),
                rooms_store.clone(),
                shutdown.clone(),
            );
            let permission_index = permission_index.clone();
            let (grants, grant_index) = (grants_store.clone(), grant_index.clone());
            let synced = self.synced.clone();
            async move {
                // Folding permissions needs complete caches: an empty one would
                // read as "no members declared" and an Exclusive room would be
                // emptied. Awaited here, once: a store's readiness wakes only
                // one waiter, so reconciles must not each wait on it.
                let ready = futures::future::join3(
                    users.wait_until_ready(),
                    permissions.wait_until_ready(),
                    grants.wait_until_ready(),
                );
                if let futures::future::Either::Right(_) =
                    futures::future::select(Box::pin(ready), shutdown.clone()).await
                {
                    return;
                }
                synced.store(true, Ordering::Release);
                room::run(
                    room::Caches {
                        rooms,
                        users,
                        permissions,
                        permission_index,
                        room_index,
                        grants,
                        grant_index,
                    },
                    room_triggers,
                    deps,
                    shutdown,
                )
                .await
            }
        };
        let grant_controller = {
            let caches = grant::Caches {
                grants: grants_store,
                grant_index,
                permissions: permissions_store.clone(),
                permission_index: permission_index.clone(),
                users: users_store.clone(),
                synced: self.synced.clone(),
            };
            grant::run(caches, grant_triggers, deps.clone(), shutdown.clone())
        };
        let user_controller = {
            let (deps, shutdown) = (deps.clone(), shutdown.clone());
            async move {
                // Tenants come from namespace labels: before that cache is
                // complete an SSO link would look unwanted and be removed.
                if let futures::future::Either::Right(_) = futures::future::select(
                    Box::pin(namespaces.wait_until_ready()),
                    shutdown.clone(),
                )
                .await
                {
                    return;
                }
                user::run(
                    user::Caches {
                        users: users_store,
                        index: user_index,
                        namespaces,
                    },
                    user_triggers,
                    deps,
                    shutdown,
                )
                .await
            }
        };
        let permission_controller = {
            let caches = permission::Caches {
                permissions: permissions_store,
                index: permission_index.clone(),
                rooms: rooms_store.clone(),
            };
            async move {
                // A store's readiness wakes one waiter: the room cache's is
                // this one, which tells the feed.
                if let futures::future::Either::Right(_) = futures::future::select(
                    Box::pin(caches.rooms.wait_until_ready()),
                    shutdown.clone(),
                )
                .await
                {
                    return;
                }
                rooms_ready.send_replace(true);
                permission::run(caches, permission_triggers, deps, shutdown).await
            }
        };
        futures::join!(
            user_controller,
            room_controller,
            permission_controller,
            grant_controller
        );
        watches.abort();
    }
}

/// The API of a kind in the operator's scope: one namespace, or all.
fn scoped<K>(client: &Client, config: &OperatorConfig) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the caches never need: managed fields are most of an object's
/// bytes, and annotations (kubectl's last-applied configuration, GitOps
/// tracking, the drift marker), labels and owner references are never read
/// from the cache of the operator's kinds: a changed annotation still
/// triggers a reconcile through the new resourceVersion. Dropped, not
/// emptied: an emptied list keeps its allocation, for every cached object.
pub fn strip_unread<K: kube::Resource>(k: &mut K) {
    let meta = k.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
}

/// The user cache: what [`strip_unread`] drops, but labels, which grants
/// may select users by.
pub fn strip_unread_but_labels<K: kube::Resource>(k: &mut K) {
    let labels = k.meta_mut().labels.take();
    strip_unread(k);
    k.meta_mut().labels = labels;
}

/// The room cache: what [`strip_unread`] drops, but the drift mark, which
/// the room reconcile keeps in its memo so a mark set while it ran is
/// never taken for its own status write.
pub fn strip_unread_but_drift(room: &mut MatrixRoom) {
    let mark = room
        .metadata
        .annotations
        .as_mut()
        .and_then(|a| a.remove(room::DRIFT_ANNOTATION));
    strip_unread(room);
    if let Some(mark) = mark {
        room.metadata.annotations =
            Some(std::iter::once((room::DRIFT_ANNOTATION.to_string(), mark)).collect());
    }
}

/// For caches that read labels (tenant namespaces): managed fields only.
pub fn strip_managed_fields<K: kube::Resource>(k: &mut K) {
    k.meta_mut().managed_fields = None;
}

/// The watch every controller uses: the configured label selector, if any.
pub fn watch_config(config: &OperatorConfig) -> watcher::Config {
    // Streaming lists send the initial state object by object instead of as
    // one large list response: a much lower memory peak at start-up.
    let watch = watcher::Config::default().streaming_lists();
    match &config.label_selector {
        Some(selector) => watch.labels(selector),
        None => watch,
    }
}

/// `namespace/name`: the key for per-object bookkeeping.
pub fn key<K: kube::ResourceExt>(k: &K) -> String {
    format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any())
}

/// The namespaced API for an object's own namespace.
pub fn own_namespace<K>(client: &Client, obj: &K) -> Result<Api<K>, Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::Invalid(format!("{} must be namespaced", K::kind(&()))))?;
    Ok(Api::namespaced(client.clone(), &ns))
}

/// What a failed reconcile does next: counted, logged with its cause, and
/// retried after a jittered exponential backoff for this object.
pub fn retry_after<K: ResourceExt>(
    obj: &K,
    error: &Error,
    backoff: &Backoff,
    failures: &AtomicU64,
) -> Action {
    failures.fetch_add(1, Ordering::Relaxed);
    let delay = backoff.next_delay(&key(obj));
    tracing::warn!(object = %key(obj), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Server-side applies `status` under the operator's field manager and
/// returns the resourceVersion it produced. Callers skip unchanged statuses.
pub async fn apply_status<K>(
    api: &Api<K>,
    obj: &K,
    status: &impl serde::Serialize,
) -> Result<Option<String>, Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    let patch = serde_json::json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    let params = kube::api::PatchParams::apply(crate::api::FIELD_MANAGER).force();
    let written = api
        .patch_status(&obj.name_any(), &params, &kube::api::Patch::Apply(&patch))
        .await?;
    Ok(written.resource_version())
}

/// Test-only crash points: when `OPENMEET_FAILPOINT` names this point, the
/// process exits at once, as a crash there would.
pub fn failpoint(name: &str) {
    static ACTIVE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if ACTIVE
        .get_or_init(|| std::env::var("OPENMEET_FAILPOINT").ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("failpoint {name}: exiting");
        std::process::exit(86);
    }
}

/// Controller settings: bounded concurrency, and a trailing debounce that
/// folds bursts of triggers (many users of one room turning Ready) into one
/// reconcile.
pub fn controller_config(
    config: &OperatorConfig,
    debounce: Duration,
) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .concurrency(config.concurrency)
        .debounce(debounce)
}

/// Backoff bounds for transient failures.
pub fn default_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(300))
}
