//! The application-service transaction endpoint: Synapse pushes every event
//! of the rooms under the managed aliases here. A state or membership change
//! made by anyone but the operator marks that room's object (an annotation in
//! the API server), which triggers its reconcile in whichever replica leads.
//! A transaction is acknowledged only once every mark is recorded, so a
//! restart or another replica never drops the signal.

use super::room::DRIFT_ANNOTATION;
use crate::api::MatrixRoom;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How many recent transaction ids are remembered for idempotency.
const SEEN_CAPACITY: usize = 4096;

/// Why handling a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum AppserviceError {
    #[error("recording drift on {0}: {1}")]
    Record(String, #[source] kube::Error),
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Rooms whose state someone other than `own_senders` changed: room id →
/// the last such event. Messages (no `state_key`) are skipped cheaply.
fn drifted_rooms(events: &[PushedEvent], own_senders: &[String]) -> HashMap<String, String> {
    let mut rooms = HashMap::new();
    for e in events {
        if e.state_key.is_none() || e.kind.is_empty() {
            continue;
        }
        let sender = e.sender.as_deref().unwrap_or_default();
        if own_senders.iter().any(|s| s == sender) {
            continue;
        }
        if let (Some(room), Some(id)) = (&e.room_id, &e.event_id) {
            rooms.insert(room.clone(), id.clone());
        }
    }
    rooms
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
}

#[derive(Debug, Deserialize)]
struct Transaction {
    #[serde(default)]
    events: Vec<PushedEvent>,
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct AppserviceStats {
    pub transactions: AtomicU64,
    pub duplicates: AtomicU64,
    pub marks: AtomicU64,
}

pub struct Appservice {
    hs_token: String,
    /// Senders whose events are the operator's own.
    own_senders: Vec<String>,
    client: Client,
    rooms: Store<MatrixRoom>,
    seen: Mutex<(VecDeque<String>, HashSet<String>)>,
    pub stats: AppserviceStats,
}

impl Appservice {
    pub fn new(
        hs_token: String,
        own_senders: Vec<String>,
        client: Client,
        rooms: Store<MatrixRoom>,
    ) -> Arc<Self> {
        Arc::new(Appservice {
            hs_token,
            own_senders,
            client,
            rooms,
            seen: Mutex::default(),
            stats: AppserviceStats::default(),
        })
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

    /// Marks each managed room's object; unknown rooms are not ours.
    async fn mark(&self, drifted: HashMap<String, String>) -> Result<(), AppserviceError> {
        if drifted.is_empty() {
            return Ok(());
        }
        let by_room_id: HashMap<String, Arc<MatrixRoom>> = self
            .rooms
            .state()
            .into_iter()
            .filter_map(|r| Some((r.status.as_ref()?.room_id.clone()?, r)))
            .collect();
        for (room_id, event_id) in drifted {
            let Some(room) = by_room_id.get(&room_id) else {
                continue;
            };
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
                }
                // Deleted meanwhile: nothing left to converge.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(AppserviceError::Record(room_id, e)),
            }
        }
        Ok(())
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
    body: Bytes,
) -> Response {
    if let Some(refusal) = refusal(&service, &headers, &query) {
        return refusal;
    }
    service.stats.transactions.fetch_add(1, Ordering::Relaxed);
    if service.seen(&txn) {
        service.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return Json(json!({})).into_response();
    }
    let Ok(transaction) = serde_json::from_slice::<Transaction>(&body) else {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            "transaction is not valid JSON",
        );
    };
    let drifted = drifted_rooms(&transaction.events, &service.own_senders);
    match service.mark(drifted).await {
        Ok(()) => {
            service.remember(&txn);
            Json(json!({})).into_response()
        }
        Err(e) => {
            // Not acknowledged: Synapse retries the same transaction.
            tracing::warn!(txn = %txn, error = %e, "transaction not recorded; Synapse will retry");
            matrix_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "M_UNKNOWN",
                "could not record the transaction",
            )
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
/// until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    hs_token: String,
    own_senders: Vec<String>,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppserviceError> {
    use futures::StreamExt;
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    let api: Api<MatrixRoom> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (rooms, writer) = reflector::store();
    let cache = tokio::spawn(
        reflector(
            writer,
            watcher(api, watcher::Config::default().streaming_lists())
                .default_backoff()
                // Only the room id and the object's name are read here: keep
                // no more of each object than that needs.
                .modify(|r: &mut MatrixRoom| {
                    r.managed_fields_mut().clear();
                    r.annotations_mut().clear();
                    if let Some(status) = r.status.as_mut() {
                        status.conditions.clear();
                    }
                }),
        )
        .for_each(|_| futures::future::ready(())),
    );
    let result = serve(
        addr,
        Appservice::new(hs_token, own_senders, client, rooms),
        shutdown,
    )
    .await;
    cache.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(v: serde_json::Value) -> Vec<PushedEvent> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn only_foreign_state_changes_count() {
        let own = ["@openmeet-admin:x".to_string()];
        let evs = events(json!([
            {"type": "m.room.message", "room_id": "!a:x", "sender": "@u:x", "event_id": "$1", "content": {"body": "hi"}},
            {"type": "m.room.power_levels", "room_id": "!b:x", "sender": "@openmeet-admin:x", "state_key": "", "event_id": "$2"},
            {"type": "m.room.power_levels", "room_id": "!c:x", "sender": "@mod:x", "state_key": "", "event_id": "$3"},
            {"type": "m.room.member", "room_id": "!c:x", "sender": "@x:x", "state_key": "@x:x", "event_id": "$4"},
        ]));
        let rooms = drifted_rooms(&evs, &own);
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms["!c:x"], "$4", "the last event of a room is kept");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
