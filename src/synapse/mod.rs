//! Typed Synapse client: admin and client API calls as the operator's
//! application service, masquerading as its admin account.
//!
//! Requests are built with ruma's `synapse-admin-api` types where they cover
//! an endpoint. Responses of `GET /_synapse/admin/v2/users` are read into our
//! own tolerant struct: Synapse returns `displayname: null` for erased
//! accounts, which the crate's `UserDetails` cannot represent.

pub mod account_data;
mod as_member;
pub mod rooms;
mod stats;
pub mod users;

pub use stats::{RequestKind, RequestStats};
pub use users::{ExternalId, SynapseUser, UserUpsert};

use ruma::api::{
    auth_scheme::SendAccessToken, AppserviceUserIdentity, OutgoingRequest,
    OutgoingRequestAppserviceExt,
};
use ruma::{OwnedUserId, UserId};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Why a Synapse call failed, classified for retry decisions.
#[derive(Debug, thiserror::Error)]
pub enum SynapseError {
    /// The transport's error and its causes, without the request's URL:
    /// this text reaches tenants' status conditions.
    #[error("Synapse is unreachable: {0}")]
    Unreachable(String),
    #[error("Synapse answered {status} ({errcode}): {message}")]
    Server {
        status: u16,
        errcode: String,
        message: String,
    },
    #[error("Synapse rate-limited the request; retry after {retry_after:?}")]
    RateLimited { retry_after: Option<Duration> },
    #[error("Synapse refused the request with {status} ({errcode}): {message}")]
    Rejected {
        status: u16,
        errcode: String,
        message: String,
    },
    #[error("Synapse's answer could not be read: {0}")]
    Decode(String),
    #[error("could not build the request: {0}")]
    Request(String),
    /// MAS mode: a token this call needs could not be had from MAS.
    #[error("no token from MAS: {0}")]
    Mas(String),
    /// This replica no longer holds the leader Lease: no write may leave it.
    #[error("not the leader: writes to Synapse are stopped")]
    NotLeader,
}

impl SynapseError {
    /// A transport failure, told by its causes (connection refused, timed
    /// out…), never by the internal address it was sent to.
    fn unreachable(e: reqwest::Error) -> Self {
        SynapseError::Unreachable(transport_failure(e))
    }

    /// Transient failures are retried with backoff; the rest need a change
    /// of spec or configuration.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SynapseError::Unreachable(_)
                | SynapseError::Server { .. }
                | SynapseError::RateLimited { .. }
                | SynapseError::Mas(_)
                | SynapseError::NotLeader
        )
    }

    /// The Matrix `errcode`, when Synapse gave one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            SynapseError::Server { errcode, .. } | SynapseError::Rejected { errcode, .. } => {
                Some(errcode)
            }
            _ => None,
        }
    }
}

/// A transport error and its causes (connection refused, timed out…),
/// without the request's URL: the text reaches tenants' status conditions.
pub(crate) fn transport_failure(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[derive(Deserialize)]
struct MatrixErrorBody {
    #[serde(default)]
    errcode: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// Connection settings for one homeserver.
#[derive(Clone, Debug)]
pub struct SynapseConfig {
    /// Base URL of the client-server API, e.g. `http://synapse:8008`.
    pub url: String,
    /// The homeserver's `server_name` (the part after `:` in user ids).
    pub server_name: String,
    /// Localpart of the admin account the operator masquerades as.
    pub admin_localpart: String,
    /// The application service's `as_token`.
    pub as_token: String,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// A cheap-to-clone handle on one homeserver.
#[derive(Clone)]
pub struct SynapseClient {
    http: reqwest::Client,
    base: String,
    server_name: String,
    admin: OwnedUserId,
    as_token: Arc<str>,
    stats: Arc<RequestStats>,
    /// Closed when this replica may no longer write (leadership lost).
    write_gate: Option<WriteGate>,
    /// Bounds the requests this client and its clones have in flight.
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    /// MAS, in MAS mode: accounts, logins and tokens live there.
    mas: Option<crate::mas::MasClient>,
}

/// Whether writes may leave this process: the controller's client holds one
/// that leader election opens only until the lease could expire, and closes
/// the moment leadership is in doubt, so an in-flight reconcile stops at its
/// next write instead of racing the new leader. The deadline is checked on
/// every write, so even a process frozen and thawed (SIGSTOP, a long GC-like
/// pause) writes nothing once its lease may have passed to another replica.
/// Reads stay allowed.
#[derive(Clone, Debug, Default)]
pub struct WriteGate(Arc<std::sync::Mutex<GateState>>);

#[derive(Clone, Copy, Debug, Default)]
enum GateState {
    #[default]
    Closed,
    Until(std::time::Instant),
    Open,
}

impl WriteGate {
    /// A gate that is always open (no leader election).
    pub fn open() -> Self {
        let gate = WriteGate::default();
        *gate.state() = GateState::Open;
        gate
    }

    /// Open until `deadline` (local clock), then closed until opened again.
    pub fn open_until(&self, deadline: std::time::Instant) {
        *self.state() = GateState::Until(deadline);
    }

    pub fn close(&self) {
        *self.state() = GateState::Closed;
    }

    pub fn is_open(&self) -> bool {
        match *self.state() {
            GateState::Closed => false,
            GateState::Until(deadline) => std::time::Instant::now() < deadline,
            GateState::Open => true,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is a plain value: a poisoned lock still holds a valid one.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for SynapseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("SynapseClient")
            .field("base", &self.base)
            .field("admin", &self.admin)
            .finish()
    }
}

impl SynapseClient {
    pub fn new(config: SynapseConfig) -> Result<Self, SynapseError> {
        let admin = UserId::parse(format!(
            "@{}:{}",
            config.admin_localpart, config.server_name
        ))
        .map_err(|e| SynapseError::Request(format!("admin user id: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| SynapseError::Request(e.to_string()))?;
        Ok(SynapseClient {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            server_name: config.server_name,
            admin,
            as_token: config.as_token.into(),
            stats: Arc::default(),
            write_gate: None,
            in_flight: None,
            mas: None,
        })
    }

    /// The same client with its writes going through `gate` (MAS's too).
    pub fn with_write_gate(mut self, gate: WriteGate) -> Self {
        if let Some(mas) = &mut self.mas {
            mas.set_write_gate(gate.clone());
        }
        self.write_gate = Some(gate);
        self
    }

    /// The same client in MAS mode: account calls go to `mas`, which shares
    /// this client's counters, write gate and limit on requests in flight.
    pub fn with_mas(mut self, mas: crate::mas::MasClient) -> Self {
        self.mas = Some(mas.sharing(
            self.stats.clone(),
            self.write_gate.clone(),
            self.in_flight.clone(),
        ));
        self
    }

    /// MAS, when the homeserver delegates authentication to it.
    pub fn mas(&self) -> Option<&crate::mas::MasClient> {
        self.mas.as_ref()
    }

    /// The same client with at most `limit` requests in flight, shared by
    /// every clone: Synapse's capacity is one budget for all controllers,
    /// whatever their reconcile concurrency (a reconcile also waits on the
    /// API server, where it holds no slot).
    pub fn with_request_limit(mut self, limit: usize) -> Self {
        self.in_flight = Some(Arc::new(tokio::sync::Semaphore::new(limit.max(1))));
        self
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    pub fn admin_user_id(&self) -> &UserId {
        &self.admin
    }

    /// Whether Synapse answers at all (its unauthenticated versions
    /// endpoint), for readiness. Not counted as a request of the operator.
    pub async fn reachable(&self) -> bool {
        self.http
            .get(format!("{}/_matrix/client/versions", self.base))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Counts of requests issued, by kind: reads, writes, failures.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// A shared handle on the same counters, for `/metrics`.
    pub fn stats_handle(&self) -> Arc<RequestStats> {
        self.stats.clone()
    }

    /// The full user id for a localpart on this server.
    pub fn user_id(&self, localpart: &str) -> Result<OwnedUserId, SynapseError> {
        UserId::parse(format!("@{localpart}:{}", self.server_name))
            .map_err(|e| SynapseError::Request(format!("user id for {localpart:?}: {e}")))
    }

    /// Sends a ruma request as the admin account, returning status and body.
    async fn send<R>(
        &self,
        request: R,
        kind: RequestKind,
    ) -> Result<(u16, bytes::Bytes), SynapseError>
    where
        R: OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
        for<'a> R::Authentication:
            ruma::api::auth_scheme::AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_request = request
            .try_into_http_request_with_identity::<Vec<u8>>(
                &self.base,
                SendAccessToken::Always(&self.as_token),
                AppserviceUserIdentity::new(&self.admin),
                (),
            )
            .map_err(|e| SynapseError::Request(e.to_string()))?;
        let request = reqwest::Request::try_from(http_request)
            .map_err(|e| SynapseError::Request(e.to_string()))?;
        self.execute(request, kind).await
    }

    /// Sends a JSON request to `path_segments` (each percent-encoded) as the
    /// admin account. For endpoints ruma's crates do not cover.
    async fn send_json(
        &self,
        method: reqwest::Method,
        path_segments: &[&str],
        body: Option<&serde_json::Value>,
        kind: RequestKind,
    ) -> Result<(u16, bytes::Bytes), SynapseError> {
        let mut url =
            url::Url::parse(&self.base).map_err(|e| SynapseError::Request(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|_| SynapseError::Request("Synapse URL cannot be a base".into()))?
            .pop_if_empty()
            .extend(path_segments);
        url.query_pairs_mut()
            .append_pair("user_id", self.admin.as_str());
        let mut request = self.http.request(method, url).bearer_auth(&*self.as_token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let request = request
            .build()
            .map_err(|e| SynapseError::Request(e.to_string()))?;
        self.execute(request, kind).await
    }

    async fn execute(
        &self,
        mut request: reqwest::Request,
        kind: RequestKind,
    ) -> Result<(u16, bytes::Bytes), SynapseError> {
        if let Some(mas) = &self.mas {
            if request.url().path().starts_with("/_synapse/admin/") {
                // MAS mode: the admin API takes only MAS-issued admin tokens.
                let token = mas
                    .synapse_admin_token(self.admin.localpart())
                    .await
                    .map_err(|e| SynapseError::Mas(e.to_string()))?;
                let value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|e| SynapseError::Request(e.to_string()))?;
                request
                    .headers_mut()
                    .insert(http::header::AUTHORIZATION, value);
            }
        }
        // The semaphore is never closed: acquiring only waits.
        let _slot = match &self.in_flight {
            Some(slots) => {
                let _waiting = self.stats.waiting();
                slots.acquire().await.ok()
            }
            None => None,
        };
        // Checked after the wait for a slot: leadership may have gone meanwhile.
        if kind.is_write() && self.write_gate.as_ref().is_some_and(|g| !g.is_open()) {
            return Err(SynapseError::NotLeader);
        }
        let started = std::time::Instant::now();
        let result = self.http.execute(request).await;
        let outcome = match result {
            Err(e) => Err(SynapseError::unreachable(e)),
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Err(e) => Err(SynapseError::unreachable(e)),
                    Ok(body) => Ok((status, body)),
                }
            }
        };
        self.stats.record(
            kind,
            outcome.as_ref().ok().map(|(s, _)| *s),
            started.elapsed(),
        );
        let (status, body) = outcome?;
        if status < 400 {
            return Ok((status, body));
        }
        Err(classify(status, &body))
    }
}

/// Turns a non-success answer into an error, using Matrix's error body.
fn classify(status: u16, body: &[u8]) -> SynapseError {
    let parsed: MatrixErrorBody = serde_json::from_slice(body).unwrap_or(MatrixErrorBody {
        errcode: String::new(),
        error: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        retry_after_ms: None,
    });
    if status == 429 || parsed.errcode == "M_LIMIT_EXCEEDED" {
        return SynapseError::RateLimited {
            retry_after: parsed.retry_after_ms.map(Duration::from_millis),
        };
    }
    if status >= 500 {
        return SynapseError::Server {
            status,
            errcode: parsed.errcode,
            message: parsed.error,
        };
    }
    SynapseError::Rejected {
        status,
        errcode: parsed.errcode,
        message: parsed.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_synapse_is_told_by_its_cause_never_by_its_address() {
        // A port nobody listens on any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/_synapse/admin/v2/users/secret-path");
        let e = reqwest::get(&url).await.unwrap_err();
        let text = SynapseError::unreachable(e).to_string();
        assert!(text.starts_with("Synapse is unreachable: "), "{text}");
        assert!(
            !text.contains("127.0.0.1") && !text.contains("secret-path"),
            "{text}"
        );
        assert!(
            text.to_lowercase().contains("connect"),
            "the cause is kept: {text}"
        );
    }

    #[test]
    fn the_write_gate_closes_at_its_deadline() {
        let gate = WriteGate::default();
        assert!(!gate.is_open(), "closed until opened");
        gate.open_until(std::time::Instant::now() + Duration::from_secs(60));
        assert!(gate.is_open());
        gate.open_until(std::time::Instant::now() - Duration::from_millis(1));
        assert!(!gate.is_open(), "past its deadline");
        gate.open_until(std::time::Instant::now() + Duration::from_secs(60));
        gate.close();
        assert!(!gate.is_open());
        assert!(WriteGate::open().is_open());
    }

    #[test]
    fn classifies_answers() {
        let e = classify(
            429,
            br#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow","retry_after_ms":1500}"#,
        );
        assert!(
            matches!(e, SynapseError::RateLimited { retry_after: Some(d) } if d == Duration::from_millis(1500))
        );
        assert!(e.is_transient());
        let e = classify(502, b"<html>bad gateway</html>");
        assert!(matches!(e, SynapseError::Server { status: 502, .. }));
        assert!(e.is_transient());
        let e = classify(403, br#"{"errcode":"M_FORBIDDEN","error":"no"}"#);
        assert_eq!(e.errcode(), Some("M_FORBIDDEN"));
        assert!(!e.is_transient());
    }

    /// A loopback endpoint that answers 404 after a pause and records the
    /// most requests it ever held at once.
    async fn slow_endpoint() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (now2, peak2) = (now.clone(), peak.clone());
        let app = axum::Router::new().fallback(move || {
            let (now, peak) = (now2.clone(), peak2.clone());
            async move {
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(held, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::NOT_FOUND,
                    r#"{"errcode":"M_NOT_FOUND","error":"no"}"#,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, peak)
    }

    #[tokio::test]
    async fn the_request_limit_bounds_requests_in_flight_across_clones() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, peak) = slow_endpoint().await;
        let client = SynapseClient::new(SynapseConfig {
            url,
            server_name: "example.org".into(),
            admin_localpart: "admin".into(),
            as_token: "token".into(),
            timeout: Duration::from_secs(10),
        })
        .unwrap()
        .with_request_limit(3);
        let requests = (0..12).map(|i| {
            // Clones (one per controller) share the one budget.
            let client = client.clone().with_write_gate(WriteGate::open());
            async move {
                let id = client.user_id(&format!("u{i}")).unwrap();
                assert!(client.get_user(&id).await.unwrap().is_none());
            }
        });
        futures::future::join_all(requests).await;
        let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            peak, 3,
            "12 requests, at most 3 in flight, and the limit reached"
        );
    }
}
