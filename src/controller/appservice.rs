//! The application-service transaction endpoint: Synapse pushes every event
//! of the rooms under the managed aliases here. A state or membership change
//! made by anyone but the operator marks that room's object (an annotation in
//! the API server), which triggers its reconcile in whichever replica leads.
//! A transaction is acknowledged only once every mark is recorded, so a
//! restart or another replica never drops the signal, and only once the room
//! cache is complete. The body is streamed through the parser and all but
//! the ids of state events skipped, so a full transaction costs little.

use super::index::{keys, Index};
use super::own_joins::OwnJoins;
use super::room::DRIFT_ANNOTATION;
use crate::api::MatrixRoom;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::json;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How many recent transaction ids are remembered for idempotency.
const SEEN_CAPACITY: usize = 4096;

/// The largest transaction body read. Synapse puts at most 100 events in a
/// transaction (`MAX_PERSISTENT_EVENTS_PER_TRANSACTION`), each at most 64 KiB
/// (`MAX_PDU_SIZE`; `unsigned.prev_content` can double a state event), so
/// under 13 MiB, plus at most 100 ephemeral events and 100 to-device messages
/// should ephemeral delivery ever be switched on. A refused transaction is
/// retried unchanged and blocks the feed, so the cap is generous; it only
/// bounds what a broken sender can make us read. The body streams through
/// the parser: its size costs time, not memory.
pub const MAX_TRANSACTION_BYTES: u64 = 32 * 1024 * 1024;

/// How long a transaction is held while the room cache makes its first list.
/// Acknowledging earlier would drop drift in rooms not listed yet. Synapse
/// waits 60 s for an answer, and a 503 costs a retry with backoff, so hold.
const CACHE_WAIT: Duration = Duration::from_secs(20);

/// Read-ahead of the parser over the streamed body.
const READ_BUFFER: usize = 64 * 1024;

/// Why handling a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum AppserviceError {
    #[error("recording drift on {0}: {1}")]
    Record(String, #[source] kube::Error),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("transaction larger than {MAX_TRANSACTION_BYTES} bytes")]
    TooLarge,
    #[error("transaction is not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("reading the transaction: {0}")]
    Read(#[source] serde_json::Error),
    #[error("room cache not ready after {CACHE_WAIT:?}")]
    NotReady,
    #[error("transaction parser: {0}")]
    Parser(#[source] tokio::task::JoinError),
}

impl AppserviceError {
    fn from_parse(e: serde_json::Error) -> Self {
        match e.io_error_kind() {
            Some(ErrorKind::FileTooLarge) => AppserviceError::TooLarge,
            Some(_) => AppserviceError::Read(e),
            None => AppserviceError::NotJson(e),
        }
    }

    /// The answer Synapse gets. Anything but 200 is retried unchanged.
    fn response(&self) -> Response {
        let (status, errcode) = match self {
            AppserviceError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            AppserviceError::NotJson(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            AppserviceError::Read(_) => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            AppserviceError::Record(..)
            | AppserviceError::NotReady
            | AppserviceError::Parser(_)
            | AppserviceError::Bind(..) => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
        };
        matrix_error(status, errcode, &self.to_string())
    }
}

/// What a transaction asks of the operator, room id → the last event that asks it.
#[derive(Debug, Default, PartialEq)]
struct Signals {
    /// Rooms whose state someone other than the operator changed.
    drifted: HashMap<String, String>,
    /// Rooms someone left or was removed from, by anyone (the operator
    /// too): in a space, its restricted children check who may stay.
    departed: HashMap<String, String>,
}

/// Reads a transaction body into its [`Signals`]. Event content,
/// messages, ephemeral data and unknown fields are skipped as they stream
/// past, so a transaction of a hundred big messages costs only its ids.
fn drifted_rooms(body: impl std::io::Read, own: &Own) -> Result<Signals, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_reader(body);
    let rooms = TransactionSeed(own).deserialize(&mut de)?;
    de.end()?;
    Ok(rooms)
}

/// What the operator does itself, as the feed shows it.
struct Own<'a> {
    /// Its accounts: whatever they send is its own.
    senders: &'a [String],
    /// The admin joins it made in this process, sent as the joining user.
    joins: &'a OwnJoins,
    /// Counts the joins recognised.
    recognised: &'a AtomicU64,
}

/// The parts of a pushed event we look at; content is skipped.
#[derive(Debug, Deserialize)]
struct PushedEvent {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    room_id: Option<String>,
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    event_id: Option<String>,
    /// Only `membership` is read, and only when it is a string.
    #[serde(default)]
    content: MembershipField,
}

impl PushedEvent {
    /// `(room id, event id)` of a member leaving, kicked or banned.
    fn departure(&self) -> Option<(String, String)> {
        let left = self.kind == "m.room.member"
            && matches!(self.content.0.as_deref(), Some("leave" | "ban"));
        left.then(|| Some((self.room_id.clone()?, self.event_id.clone()?)))?
    }

    /// `(room id, event id)` of a state change the operator did not make;
    /// messages (no `state_key`) are not state changes.
    fn foreign_state_change(self, own: &Own) -> Option<(String, String)> {
        let state_key = self.state_key.as_deref()?;
        if self.kind.is_empty() {
            return None;
        }
        let sender = self.sender.as_deref().unwrap_or_default();
        if own.senders.iter().any(|s| s == sender) {
            return None;
        }
        let room_id = self.room_id?;
        let own_join = self.kind == "m.room.member"
            && self.content.0.as_deref() == Some("join")
            && sender == state_key
            && own.joins.take(&room_id, sender);
        if own_join {
            own.recognised.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some((room_id, self.event_id?))
    }
}

/// The `membership` of an event's content, read leniently: any other key,
/// any other shape of content, is skipped as it streams past. A malformed
/// event must never make the whole transaction unreadable.
#[derive(Debug, Default)]
struct MembershipField(Option<String>);

impl<'de> Deserialize<'de> for MembershipField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MembershipVisitor)
    }
}

struct MembershipVisitor;

impl<'de> Visitor<'de> for MembershipVisitor {
    type Value = MembershipField;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("event content")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut membership = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "membership" {
                membership = map
                    .next_value::<serde_json::Value>()?
                    .as_str()
                    .map(str::to_string);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(MembershipField(membership))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MembershipField(None))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(MembershipField(None))
    }
}

/// The transaction's top level: only `events` is read.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum TransactionField {
    Events,
    #[serde(other)]
    Other,
}

struct TransactionSeed<'a>(&'a Own<'a>);

impl<'de> DeserializeSeed<'de> for TransactionSeed<'_> {
    type Value = Signals;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TransactionSeed<'_> {
    type Value = Signals;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an application-service transaction")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut rooms = Signals::default();
        while let Some(field) = map.next_key()? {
            match field {
                TransactionField::Events => map.next_value_seed(EventsSeed {
                    own: self.0,
                    rooms: &mut rooms,
                })?,
                TransactionField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(rooms)
    }
}

/// Folds `events` into the signals one event at a time, so nothing but
/// the current event's ids is held.
struct EventsSeed<'a> {
    own: &'a Own<'a>,
    rooms: &'a mut Signals,
}

impl<'de> DeserializeSeed<'de> for EventsSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EventsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(event) = seq.next_element::<PushedEvent>()? {
            if let Some((room, id)) = event.departure() {
                self.rooms.departed.insert(room, id);
            }
            if let Some((room, id)) = event.foreign_state_change(self.own) {
                self.rooms.drifted.insert(room, id);
            }
        }
        Ok(())
    }
}

/// The request body as a blocking reader, cut after `limit` bytes (an error
/// of kind `FileTooLarge`). Must be made inside the runtime.
fn body_reader(body: Body, limit: u64) -> impl std::io::Read + Send + 'static {
    let mut read = 0u64;
    let chunks = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        read += chunk.len() as u64;
        if read > limit {
            return Err(std::io::Error::new(
                ErrorKind::FileTooLarge,
                "transaction too large",
            ));
        }
        Ok(chunk)
    });
    std::io::BufReader::with_capacity(
        READ_BUFFER,
        tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(chunks)),
    )
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct AppserviceStats {
    pub transactions: AtomicU64,
    pub duplicates: AtomicU64,
    pub marks: AtomicU64,
    /// Membership events recognised as the operator's own admin joins.
    pub own_joins: AtomicU64,
}

impl AppserviceStats {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::counter::Counter;
        let counter = |value: &AtomicU64| {
            let counter = Counter::<u64>::default();
            counter.inc_by(value.load(Ordering::Relaxed));
            counter
        };
        registry.register(
            "openmeet_feed_transactions",
            "Transactions Synapse pushed to the application-service endpoint, retries included",
            counter(&self.transactions),
        );
        registry.register(
            "openmeet_feed_drift_marks",
            "Rooms marked for a reconcile because someone other than the operator changed their state",
            counter(&self.marks),
        );
        registry.register(
            "openmeet_feed_own_joins",
            "Membership events recognised as the operator's own admin joins, not marked as drift",
            counter(&self.own_joins),
        );
    }
}

/// What the endpoint knows of the operator beside it: its accounts, the
/// joins it makes, and where to count.
#[derive(Clone, Debug, Default)]
pub struct Feed {
    /// Senders whose events are the operator's own.
    pub own_senders: Vec<String>,
    /// Joins the operator of this process makes (sent as the joining user).
    pub own_joins: Arc<OwnJoins>,
    pub stats: Arc<AppserviceStats>,
    /// For a standalone endpoint ([`run`]), the labels of the rooms its own
    /// watch takes: rooms outside them mark nothing. [`run_on`] maps
    /// through the controller's watch, scoped by `--selector` already.
    pub selector: Option<String>,
}

pub struct Appservice {
    hs_token: String,
    feed: Feed,
    client: Client,
    rooms: Store<MatrixRoom>,
    /// `rooms` by the room id in their status: a drifted room is found
    /// without walking the cache.
    room_ids: Arc<Index<MatrixRoom>>,
    /// True once `rooms` holds its first complete list.
    rooms_ready: watch::Receiver<bool>,
    seen: Mutex<(VecDeque<String>, HashSet<String>)>,
    pub stats: Arc<AppserviceStats>,
}

impl Appservice {
    pub fn new(
        hs_token: String,
        feed: Feed,
        client: Client,
        rooms: Store<MatrixRoom>,
        room_ids: Arc<Index<MatrixRoom>>,
        rooms_ready: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Appservice {
            hs_token,
            stats: feed.stats.clone(),
            feed,
            client,
            rooms,
            room_ids,
            rooms_ready,
            seen: Mutex::default(),
        })
    }

    /// Waits (bounded) for the room cache's first complete list: a room
    /// missing from it would read as "not ours" and its drift be dropped.
    async fn wait_for_rooms(&self) -> Result<(), AppserviceError> {
        let mut rooms_ready = self.rooms_ready.clone();
        let ready = tokio::time::timeout(CACHE_WAIT, rooms_ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok());
        if ready {
            Ok(())
        } else {
            Err(AppserviceError::NotReady)
        }
    }

    /// Streams the body through the parser on a blocking thread.
    async fn read(self: &Arc<Self>, body: Body) -> Result<Signals, AppserviceError> {
        let reader = body_reader(body, MAX_TRANSACTION_BYTES);
        let service = self.clone();
        tokio::task::spawn_blocking(move || {
            let own = Own {
                senders: &service.feed.own_senders,
                joins: &service.feed.own_joins,
                recognised: &service.stats.own_joins,
            };
            drifted_rooms(reader, &own)
        })
        .await
        .map_err(AppserviceError::Parser)?
        .map_err(AppserviceError::from_parse)
    }

    fn seen(&self, txn: &str) -> bool {
        self.seen.lock().expect("seen lock").1.contains(txn)
    }

    fn remember(&self, txn: &str) {
        let mut seen = self.seen.lock().expect("seen lock");
        if seen.1.insert(txn.to_string()) {
            seen.0.push_back(txn.to_string());
            if seen.0.len() > SEEN_CAPACITY {
                if let Some(old) = seen.0.pop_front() {
                    seen.1.remove(&old);
                }
            }
        }
    }

    /// Marks each managed room's object (unknown rooms are not ours), and
    /// the restricted children of each space someone left: group access
    /// follows the group within a reconcile, not at the resync.
    async fn mark(&self, signals: Signals) -> Result<(), AppserviceError> {
        for (room_id, event_id) in signals.drifted {
            for room in self.managing(&room_id) {
                self.mark_one(&room, &room_id, &event_id).await?;
            }
        }
        for (space_id, event_id) in signals.departed {
            for child in self.admitted_through(&space_id) {
                let child_id = child.status.as_ref().and_then(|s| s.room_id.clone());
                if let Some(child_id) = child_id {
                    self.mark_one(&child, &child_id, &event_id).await?;
                }
            }
        }
        Ok(())
    }

    /// The restricted rooms that admit the members of the space `space_id`
    /// is (none when it is no managed space).
    fn admitted_through(&self, space_id: &str) -> Vec<Arc<MatrixRoom>> {
        self.managing(space_id)
            .iter()
            .filter(|space| space.spec.is_space())
            .flat_map(|space| {
                let ns = space.namespace().unwrap_or_default();
                let key = keys::children_of(&ns, &space.name_any());
                self.room_ids.get(&self.rooms, &key)
            })
            .filter(|child| child.spec.join_rule == crate::api::room::JoinRule::Restricted)
            .collect()
    }

    /// The objects whose status names `room_id` (none: not ours).
    fn managing(&self, room_id: &str) -> Vec<Arc<MatrixRoom>> {
        let mut rooms = self.room_ids.get(&self.rooms, &keys::room_id(room_id));
        // The index is fed just before the cache: keep only what the cache agrees on.
        rooms.retain(|r| r.status.as_ref().and_then(|s| s.room_id.as_deref()) == Some(room_id));
        rooms
    }

    async fn mark_one(
        &self,
        room: &MatrixRoom,
        room_id: &str,
        event_id: &str,
    ) -> Result<(), AppserviceError> {
        let api: Api<MatrixRoom> =
            Api::namespaced(self.client.clone(), &room.namespace().unwrap_or_default());
        let patch = json!({"metadata": {"annotations": {DRIFT_ANNOTATION: event_id}}});
        match api
            .patch(
                &room.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                self.stats.marks.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Deleted meanwhile: nothing left to converge.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(AppserviceError::Record(room_id.to_string(), e)),
        }
    }
}

fn matrix_error(status: StatusCode, errcode: &str, error: &str) -> Response {
    (status, Json(json!({"errcode": errcode, "error": error}))).into_response()
}

/// Synapse authenticates with `hs_token`, as a bearer token or (legacy) a query
/// parameter; a refusal is returned when it does not.
fn refusal(
    service: &Appservice,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Option<Response> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = bearer.or(query.get("access_token").map(String::as_str));
    match token {
        None => Some(matrix_error(
            StatusCode::UNAUTHORIZED,
            "M_UNAUTHORIZED",
            "missing token",
        )),
        Some(t) if constant_time_eq(t.as_bytes(), service.hs_token.as_bytes()) => None,
        Some(_) => Some(matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "bad token",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn transaction(
    State(service): State<Arc<Appservice>>,
    Path(txn): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Nothing of the body is read before the sender is known to be Synapse.
    if let Some(refusal) = refusal(&service, &headers, &query) {
        return refusal;
    }
    service.stats.transactions.fetch_add(1, Ordering::Relaxed);
    if service.seen(&txn) {
        service.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return Json(json!({})).into_response();
    }
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_TRANSACTION_BYTES) {
        return AppserviceError::TooLarge.response();
    }
    let outcome = async {
        service.wait_for_rooms().await?;
        let drifted = service.read(body).await?;
        service.mark(drifted).await
    };
    match outcome.await {
        Ok(()) => {
            service.remember(&txn);
            Json(json!({})).into_response()
        }
        Err(e) => {
            // Not acknowledged: Synapse retries the same transaction.
            tracing::warn!(txn = %txn, error = %e, "transaction not recorded; Synapse will retry");
            e.response()
        }
    }
}

async fn not_found(
    State(service): State<Arc<Appservice>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refusal(&service, &headers, &query) {
        return refusal;
    }
    // Users and aliases in our namespaces exist only when the operator made them.
    matrix_error(
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
        "not provided by this application service",
    )
}

async fn ping(
    State(service): State<Arc<Appservice>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refusal(&service, &headers, &query) {
        return refusal;
    }
    Json(json!({})).into_response()
}

pub fn router(service: Arc<Appservice>) -> Router {
    Router::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/users/{user}", get(not_found))
        .route("/_matrix/app/v1/rooms/{alias}", get(not_found))
        .route("/_matrix/app/v1/ping", post(ping))
        .with_state(service)
}

/// The rooms the feed maps events to: a cache, its index by room id (and
/// by parent), and whether the cache holds its first complete list.
pub struct FeedRooms {
    pub store: Store<MatrixRoom>,
    pub room_ids: Arc<Index<MatrixRoom>>,
    pub ready: watch::Receiver<bool>,
}

/// Serves the endpoint on the controller's own watch of rooms (one list of
/// rooms per process, running from the start whether this replica leads
/// or not) until `shutdown` resolves.
pub async fn run_on(
    client: Client,
    rooms: FeedRooms,
    hs_token: String,
    feed: Feed,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppserviceError> {
    let service = Appservice::new(
        hs_token,
        feed,
        client,
        rooms.store,
        rooms.room_ids,
        rooms.ready,
    );
    serve(addr, service, shutdown).await
}

/// Serves the endpoint until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    service: Arc<Appservice>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppserviceError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppserviceError::Bind(addr, e))?;
    tracing::info!(%addr, "application-service endpoint listening");
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| AppserviceError::Bind(addr, e))
}

/// Watches the rooms (to map room ids to objects) and serves the endpoint
/// until `shutdown` resolves: an endpoint standing alone (one serving the
/// test suite's many operators); a controller serves it with [`run_on`].
pub async fn run(
    client: Client,
    namespace: Option<String>,
    hs_token: String,
    feed: Feed,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppserviceError> {
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    let api: Api<MatrixRoom> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let watch = match &feed.selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let (rooms, writer) = reflector::store();
    let room_ids = Index::new(keys::room_feed);
    let (ready_tx, rooms_ready) = watch::channel(false);
    // One waiter only: a store's readiness wakes a single waiter.
    let waiter = {
        let rooms = rooms.clone();
        tokio::spawn(async move {
            if rooms.wait_until_ready().await.is_ok() {
                ready_tx.send_replace(true);
            }
        })
    };
    let cache = tokio::spawn(
        reflector(
            writer,
            watcher(api, watch.streaming_lists())
                .default_backoff()
                // Only the room id and the object's name are read here: keep
                // no more of each object than that needs.
                .modify(|r: &mut MatrixRoom| {
                    super::strip_unread(r);
                    if let Some(status) = r.status.as_mut() {
                        status.conditions = Vec::new();
                    }
                })
                // Indexed before the reflector stores it: never behind the cache.
                .inspect({
                    let room_ids = room_ids.clone();
                    move |event| {
                        if let Ok(event) = event {
                            room_ids.observe(event);
                        }
                    }
                }),
        )
        .for_each(|_| futures::future::ready(())),
    );
    let result = serve(
        addr,
        Appservice::new(hs_token, feed, client, rooms, room_ids, rooms_ready),
        shutdown,
    )
    .await;
    cache.abort();
    waiter.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::Value;
    use std::sync::atomic::AtomicBool;

    const OWN: &str = "@openmeet-admin:x";

    fn parse(body: &[u8]) -> Result<HashMap<String, String>, AppserviceError> {
        parse_with(body, &OwnJoins::default())
    }

    fn parse_with(
        body: &[u8],
        joins: &OwnJoins,
    ) -> Result<HashMap<String, String>, AppserviceError> {
        signals(body, joins).map(|s| s.drifted)
    }

    fn signals(body: &[u8], joins: &OwnJoins) -> Result<Signals, AppserviceError> {
        let own = Own {
            senders: &[OWN.to_string()],
            joins,
            recognised: &AtomicU64::new(0),
        };
        drifted_rooms(body, &own).map_err(AppserviceError::from_parse)
    }

    /// A transaction of `n` messages with `size` bytes of content each, then
    /// one foreign state change, all in `room`.
    fn big_transaction(room: &str, n: usize, size: usize) -> Vec<u8> {
        // Escapes and non-ASCII text too, as real messages have.
        let unit = "ça \"dit\" \\ ok\n";
        let text = unit.repeat(size / (serde_json::to_string(unit).unwrap().len() - 2));
        let content = serde_json::to_string(&text).unwrap();
        let mut out = String::from(r#"{"events": ["#);
        for i in 0..n {
            out += &format!(
                r#"{{"type": "m.room.message", "room_id": "{room}", "sender": "@u:x", "event_id": "${i}", "content": {{"msgtype": "m.text", "body": {content}}}, "unsigned": {{"age": 1}}}},"#
            );
        }
        out += &format!(
            r#"{{"type": "m.room.name", "room_id": "{room}", "sender": "@u:x", "state_key": "", "event_id": "$rename", "content": {{"name": "Hijacked"}}}}]}}"#
        );
        out.into_bytes()
    }

    #[test]
    fn only_foreign_state_changes_count() {
        let body = json!({"events": [
            {"type": "m.room.message", "room_id": "!a:x", "sender": "@u:x", "event_id": "$1", "content": {"body": "hi"}},
            {"type": "m.room.power_levels", "room_id": "!b:x", "sender": OWN, "state_key": "", "event_id": "$2"},
            {"type": "m.room.power_levels", "room_id": "!c:x", "sender": "@mod:x", "state_key": "", "event_id": "$3"},
            {"type": "m.room.member", "room_id": "!c:x", "sender": "@x:x", "state_key": "@x:x", "event_id": "$4"},
        ]});
        let rooms = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms["!c:x"], "$4", "the last event of a room is kept");
    }

    #[test]
    fn the_operators_own_joins_are_not_drift_once() {
        let joins = OwnJoins::recording();
        joins.expect("!r:x", "@a:x");
        joins.expect("!r:x", "@b:x");
        let member = |id: &str, user: &str, sender: &str, content: Value| {
            json!({"type": "m.room.member", "room_id": "!r:x", "sender": sender,
                   "state_key": user, "event_id": id, "content": content})
        };
        let body = json!({"events": [
            member("$1", "@a:x", "@a:x", json!({"membership": "join", "displayname": "A"})),
            // Not a join, or not the one the operator made: drift.
            member("$2", "@b:x", "@b:x", json!({"membership": "leave"})),
        ]});
        let rooms = parse_with(&serde_json::to_vec(&body).unwrap(), &joins).unwrap();
        assert_eq!(rooms["!r:x"], "$2");
        // @b's join is still expected; @a's was recognised once only.
        let body = json!({"events": [
            member("$3", "@b:x", "@b:x", json!({"membership": "join"})),
        ]});
        assert!(parse_with(&serde_json::to_vec(&body).unwrap(), &joins)
            .unwrap()
            .is_empty());
        let body = json!({"events": [
            member("$4", "@a:x", "@a:x", json!({"membership": "join"})),
        ]});
        assert_eq!(
            parse_with(&serde_json::to_vec(&body).unwrap(), &joins).unwrap()["!r:x"],
            "$4"
        );
        // Someone else joining a user is not the operator's join either.
        joins.expect("!r:x", "@c:x");
        let body = json!({"events": [
            member("$5", "@c:x", "@mod:x", json!({"membership": "join"})),
        ]});
        assert_eq!(
            parse_with(&serde_json::to_vec(&body).unwrap(), &joins).unwrap()["!r:x"],
            "$5"
        );
    }

    #[test]
    fn content_of_any_shape_is_read_past() {
        let joins = OwnJoins::recording();
        joins.expect("!r:x", "@a:x");
        let body = json!({"events": [
            {"type": "m.room.member", "room_id": "!r:x", "sender": "@a:x", "state_key": "@a:x", "event_id": "$1", "content": "join"},
            {"type": "m.room.member", "room_id": "!s:x", "sender": "@a:x", "state_key": "@a:x", "event_id": "$2", "content": [1, {"membership": "join"}]},
            {"type": "m.room.member", "room_id": "!t:x", "sender": "@a:x", "state_key": "@a:x", "event_id": "$3", "content": {"membership": 5, "nested": {"membership": "join"}}},
            {"type": "m.room.member", "room_id": "!u:x", "sender": "@a:x", "state_key": "@a:x", "event_id": "$4", "content": null},
            {"type": "m.room.topic", "room_id": "!v:x", "sender": "@a:x", "state_key": "", "event_id": "$5", "content": {"topic": 1.5}},
        ]});
        let rooms = parse_with(&serde_json::to_vec(&body).unwrap(), &joins).unwrap();
        assert_eq!(rooms.len(), 5, "{rooms:?}");
        // None of them was the join: it is still expected.
        assert!(joins.take("!r:x", "@a:x"));
    }

    #[test]
    fn space_relations_and_join_rules_changed_by_others_count() {
        let body = json!({"events": [
            {"type": "m.space.child", "room_id": "!space:x", "sender": "@mod:x", "state_key": "!child:x", "event_id": "$1", "content": {}},
            {"type": "m.space.parent", "room_id": "!child:x", "sender": "@mod:x", "state_key": "!space:x", "event_id": "$2", "content": {}},
            {"type": "m.room.join_rules", "room_id": "!other:x", "sender": "@mod:x", "state_key": "", "event_id": "$3", "content": {"join_rule": "public"}},
            {"type": "m.space.child", "room_id": "!own:x", "sender": OWN, "state_key": "!c:x", "event_id": "$4", "content": {"via": ["x"]}},
        ]});
        let rooms = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(
            rooms,
            HashMap::from([
                ("!space:x".to_string(), "$1".to_string()),
                ("!child:x".to_string(), "$2".to_string()),
                ("!other:x".to_string(), "$3".to_string()),
            ])
        );
    }

    #[test]
    fn a_full_transaction_of_big_messages_is_read() {
        // What Synapse sends after a pause: 100 events of (nearly) 64 KiB.
        let body = big_transaction("!drift:x", 100, 63 * 1024);
        assert!(body.len() > 6 * 1024 * 1024);
        let rooms = parse(&body).unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms["!drift:x"], "$rename");
    }

    #[test]
    fn ephemeral_data_and_unknown_fields_are_skipped() {
        let body = json!({
            "de.sorunome.msc2409.ephemeral": [{"type": "m.typing", "room_id": "!a:x", "content": {"user_ids": ["@u:x"]}}],
            "ephemeral": [{"type": "m.receipt", "room_id": "!a:x", "content": {"$1": {"m.read": {"@u:x": {"ts": 1}}}}}],
            "de.sorunome.msc2409.to_device": [{"type": "m.room_key_request", "sender": "@u:x", "to_user_id": "@v:x", "to_device_id": "D", "content": {"x": [1, 2.5, null, true]}}],
            "org.matrix.msc3202.device_lists": {"changed": ["@u:x"], "left": []},
            "org.matrix.msc3202.device_one_time_keys_count": {"@u:x": {"D": {"signed_curve25519": 50}}},
            "events": [
                {"type": "m.room.topic", "room_id": "!a:x", "sender": "@u:x", "state_key": "", "event_id": "$t",
                 "content": {"topic": "x"}, "unsigned": {"prev_content": {"topic": "y"}, "age": 3}, "origin_server_ts": 1, "future_field": {"a": [{}]}},
            ],
            "trailing_unknown": "after the events",
        });
        let rooms = parse(&serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms["!a:x"], "$t");
        assert!(
            parse(b"{}").unwrap().is_empty(),
            "no events: nothing drifted"
        );
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for body in [
            &b""[..],
            b"not json",
            b"{\"events\": [",
            b"{\"events\": {}}",
            b"{\"events\": [{\"type\": 5}]}",
            b"[]",
            b"{} trailing",
        ] {
            let e = parse(body).unwrap_err();
            assert!(
                matches!(e, AppserviceError::NotJson(_)),
                "{:?}: {e:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(e.response().status(), StatusCode::BAD_REQUEST);
        }
    }

    /// A service whose API server is never reached (these transactions mark nothing).
    fn service(ready: bool) -> (Arc<Appservice>, watch::Sender<bool>) {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let (rooms, _writer) = kube::runtime::reflector::store();
        let (ready_tx, ready_rx) = watch::channel(ready);
        let service = appservice(client, rooms, Index::new(keys::room_by_id), ready_rx);
        (service, ready_tx)
    }

    fn appservice(
        client: Client,
        rooms: Store<MatrixRoom>,
        room_ids: Arc<Index<MatrixRoom>>,
        rooms_ready: watch::Receiver<bool>,
    ) -> Arc<Appservice> {
        let feed = Feed {
            own_senders: vec![OWN.into()],
            ..Default::default()
        };
        Appservice::new("hs".into(), feed, client, rooms, room_ids, rooms_ready)
    }

    fn managed_room(name: &str, room_id: &str) -> MatrixRoom {
        serde_json::from_value(json!({
            "apiVersion": "matrix.openmeet.net/v1alpha1", "kind": "MatrixRoom",
            "metadata": {"name": name, "namespace": "t"},
            "spec": {"alias": name},
            "status": {"roomId": room_id},
        }))
        .unwrap()
    }

    fn foreign_rename(room_id: &str, event_id: &str) -> Value {
        json!({"type": "m.room.name", "room_id": room_id, "sender": "@u:x", "state_key": "",
               "event_id": event_id, "content": {"name": "Hijacked"}})
    }

    #[tokio::test]
    async fn drift_marks_the_object_whose_status_names_the_room() {
        // The API server answers a patch with the object it stored.
        let (client, recorded) = crate::controller::scripted::client(|_| {
            crate::controller::scripted::stored(&managed_room("b", "!b:x"), "2")
        });
        let (rooms, mut writer) = kube::runtime::reflector::store();
        let room_ids = Index::new(keys::room_by_id);
        let (_ready, ready_rx) = watch::channel(true);
        let mut apply = |room: MatrixRoom| {
            let event = kube::runtime::watcher::Event::Apply(room);
            room_ids.observe(&event);
            writer.apply_watcher_event(&event);
        };
        apply(managed_room("a", "!a:x"));
        apply(managed_room("b", "!b:x"));
        let service = appservice(client, rooms, room_ids.clone(), ready_rx);
        let body =
            json!({"events": [foreign_rename("!b:x", "$1"), foreign_rename("!other:x", "$2")]});
        let r = put(&service, Some("hs"), Body::from(body.to_string())).await;
        assert_eq!(r.status(), StatusCode::OK);
        let sent = recorded.expect(1).await;
        assert_eq!(sent[0].method, http::Method::PATCH);
        assert_eq!(
            sent[0].path,
            "/apis/matrix.openmeet.net/v1alpha1/namespaces/t/matrixrooms/b"
        );
        assert_eq!(
            sent[0].body["metadata"]["annotations"][DRIFT_ANNOTATION],
            "$1"
        );

        // Its status now names another room: the old id is no longer ours.
        apply(managed_room("b", "!b2:x"));
        let body = json!({"events": [foreign_rename("!b:x", "$3")]});
        let r = put(&service, Some("hs"), Body::from(body.to_string())).await;
        assert_eq!(r.status(), StatusCode::OK);
        recorded.expect(1).await;
    }

    #[test]
    fn departures_count_whoever_sent_them() {
        let body = json!({"events": [
            // The operator's own kick: not drift, but a departure.
            {"type": "m.room.member", "room_id": "!space:x", "sender": OWN, "state_key": "@a:x", "event_id": "$1", "content": {"membership": "leave"}},
            {"type": "m.room.member", "room_id": "!other:x", "sender": "@b:x", "state_key": "@b:x", "event_id": "$2", "content": {"membership": "join"}},
            {"type": "m.room.member", "room_id": "!third:x", "sender": "@m:x", "state_key": "@c:x", "event_id": "$3", "content": {"membership": "ban"}},
        ]});
        let signals = signals(&serde_json::to_vec(&body).unwrap(), &OwnJoins::default()).unwrap();
        assert_eq!(
            signals.departed,
            HashMap::from([
                ("!space:x".to_string(), "$1".to_string()),
                ("!third:x".to_string(), "$3".to_string()),
            ])
        );
        assert!(!signals.drifted.contains_key("!space:x"));
    }

    fn room_with(name: &str, room_id: &str, spec: Value) -> MatrixRoom {
        let mut room = managed_room(name, room_id);
        room.spec = serde_json::from_value(spec).unwrap();
        room
    }

    #[tokio::test]
    async fn a_departure_from_a_space_marks_its_restricted_children_only() {
        let (client, recorded) = crate::controller::scripted::client(|_| {
            crate::controller::scripted::stored(&managed_room("c", "!c:x"), "2")
        });
        let (rooms, mut writer) = kube::runtime::reflector::store();
        let room_ids = Index::new(keys::room_feed);
        let (_ready, ready_rx) = watch::channel(true);
        for room in [
            room_with(
                "group",
                "!space:x",
                json!({"alias": "group", "type": "Space"}),
            ),
            room_with(
                "restricted",
                "!r:x",
                json!({"alias": "r", "joinRule": "restricted", "parentRef": {"name": "group"}}),
            ),
            room_with(
                "invite-only",
                "!i:x",
                json!({"alias": "i", "parentRef": {"name": "group"}}),
            ),
            room_with("plain", "!p:x", json!({"alias": "p"})),
        ] {
            let event = kube::runtime::watcher::Event::Apply(room);
            room_ids.observe(&event);
            writer.apply_watcher_event(&event);
        }
        let service = appservice(client, rooms, room_ids, ready_rx);
        let leave = |room: &str, id: &str| {
            json!({"type": "m.room.member", "room_id": room, "sender": OWN, "state_key": "@a:x",
                   "event_id": id, "content": {"membership": "leave"}})
        };
        let body = json!({"events": [leave("!space:x", "$1"), leave("!p:x", "$2")]});
        let r = put(&service, Some("hs"), Body::from(body.to_string())).await;
        assert_eq!(r.status(), StatusCode::OK);
        let sent = recorded.expect(1).await;
        assert_eq!(
            sent[0].path,
            "/apis/matrix.openmeet.net/v1alpha1/namespaces/t/matrixrooms/restricted"
        );
        assert_eq!(
            sent[0].body["metadata"]["annotations"][DRIFT_ANNOTATION],
            "$1"
        );
    }

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        headers
    }

    async fn put(service: &Arc<Appservice>, token: Option<&str>, body: Body) -> Response {
        transaction(
            State(service.clone()),
            Path(format!("txn-{}", rand::random::<u32>())),
            Query(HashMap::new()),
            headers(token),
            body,
        )
        .await
    }

    #[tokio::test]
    async fn the_token_is_checked_before_the_body_is_read() {
        let (service, _ready) = service(true);
        let polled = Arc::new(AtomicBool::new(false));
        let body = |polled: Arc<AtomicBool>| {
            Body::from_stream(futures::stream::once(async move {
                polled.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))
            }))
        };
        let r = put(&service, None, body(polled.clone())).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = put(&service, Some("wrong"), body(polled.clone())).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            !polled.load(Ordering::SeqCst),
            "body read before authentication"
        );
        let r = put(&service, Some("hs"), body(polled.clone())).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(polled.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn big_transactions_stream_and_declared_oversized_ones_are_refused() {
        let (service, _ready) = service(true);
        // 100 messages of ~60 KiB, in the chunks a socket delivers.
        // Its rename is in a room that is not ours: no API call.
        let big = Bytes::from(big_transaction("!unknown:x", 100, 60 * 1024));
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..big.len())
            .step_by(16 * 1024)
            .map(|i| Ok(big.slice(i..(i + 16 * 1024).min(big.len()))))
            .collect();
        let r = put(
            &service,
            Some("hs"),
            Body::from_stream(futures::stream::iter(chunks)),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);

        // A declared length past the cap: refused without reading.
        let mut h = headers(Some("hs"));
        h.insert(
            axum::http::header::CONTENT_LENGTH,
            (MAX_TRANSACTION_BYTES + 1).to_string().parse().unwrap(),
        );
        let r = transaction(
            State(service.clone()),
            Path("declared".into()),
            Query(HashMap::new()),
            h,
            Body::from_stream(futures::stream::pending::<Result<Bytes, std::io::Error>>()),
        )
        .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_body_is_read_up_to_the_cap_only() {
        // Streamed without a length, as Synapse could: cut once the cap is read.
        let filler = Bytes::from(vec![b' '; 64 * 1024]);
        let endless = futures::stream::once(async { Ok(Bytes::from_static(b"{\"events\": [")) })
            .chain(futures::stream::repeat_with(move || {
                Ok::<_, std::io::Error>(filler.clone())
            }));
        let reader = body_reader(Body::from_stream(endless), 1024 * 1024);
        let e = tokio::task::spawn_blocking(move || {
            let own = Own {
                senders: &[],
                joins: &OwnJoins::default(),
                recognised: &AtomicU64::new(0),
            };
            drifted_rooms(reader, &own)
        })
        .await
        .unwrap()
        .map_err(AppserviceError::from_parse)
        .unwrap_err();
        assert!(matches!(e, AppserviceError::TooLarge), "{e:?}");
        assert_eq!(e.response().status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn malformed_transaction_is_a_bad_request() {
        let (service, _ready) = service(true);
        let r = put(&service, Some("hs"), Body::from("{\"events\": 3}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = put(&service, Some("hs"), Body::from("{\"events\": [")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn transactions_wait_for_the_room_cache() {
        let (service, ready) = service(false);
        let pending = tokio::spawn({
            let service = service.clone();
            async move { put(&service, Some("hs"), Body::from("{\"events\": []}")).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !pending.is_finished(),
            "acknowledged before the cache was complete"
        );
        ready.send_replace(true);
        assert_eq!(pending.await.unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn refusals_map_to_retryable_or_final_statuses() {
        assert_eq!(
            AppserviceError::NotReady.response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            AppserviceError::TooLarge.response().status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
