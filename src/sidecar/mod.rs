//! The sidecar: the HTTPS endpoints platform users meet. An OpenID Connect
//! provider for Synapse's SSO login, and the credential API that hands a
//! signed-in platform user a short-lived Matrix access token.

pub mod config;
pub mod credentials;
pub mod directory;
pub mod grants;
pub mod handles;
pub mod keys;
pub mod oidc;
pub mod pending;
pub mod platform;

use crate::secrets::{read_secret_file, read_secret_key, SecretError};
use crate::synapse::{SynapseClient, SynapseConfig, SynapseError};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use config::SidecarConfig;
use jsonwebtoken::Algorithm;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The committed description of every endpoint the sidecar serves.
pub const OPENAPI: &str = include_str!("../../docs/sidecar-openapi.yaml");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error(transparent)]
    Synapse(#[from] SynapseError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// A refusal of the credential API: a stable code, a status, a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            Json(serde_json::json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == 401 {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"openmeet\""),
            );
        }
        response
    }
}

/// An API answer: the JSON result or the refusal (logged by its stable code
/// only), never cached, since both change as accounts and claims do.
pub fn api_answer<T: serde::Serialize>(result: Result<T, ApiError>, api: &'static str) -> Response {
    let mut response = match result {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => {
            tracing::info!(api, code = e.code, status = e.status, "refused");
            e.into_response()
        }
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The `Authorization: Bearer` token, if any.
/// The answer to a homeserver call (Synapse or MAS) that failed: 503 when
/// it may work on a retry, 502 with `refused` when it will not. Never the
/// homeserver's own words: they may name internal addresses.
pub fn homeserver_failure(transient: bool, refused: &'static str) -> ApiError {
    if transient {
        ApiError::new(
            503,
            "homeserver_unavailable",
            "the homeserver is unavailable",
        )
    } else {
        ApiError::new(502, "homeserver_refused", refused)
    }
}

pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .then(|| token.trim().to_string())
}

/// SHA-256: codes and tokens are kept by digest, never in clear.
pub fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

/// 256 random bits, URL-safe.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// At most this many characters of an untrusted value reach a log line.
const LOGGED_CHARS: usize = 200;

/// A value from outside (a request, a token's claims, a peer's error text)
/// made safe for a log field: control characters, line and paragraph
/// separators, bidirectional overrides and backslashes are written as
/// `\u{..}` escapes, so no value can start a log line of its own or hide
/// text, and it is cut after [`LOGGED_CHARS`] characters.
pub fn untrusted<T: std::fmt::Display>(value: T) -> Untrusted<T> {
    Untrusted(value)
}

/// See [`untrusted`].
pub struct Untrusted<T>(T);

impl<T: std::fmt::Display> std::fmt::Display for Untrusted<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        struct Escaper<'a, 'b> {
            out: &'a mut std::fmt::Formatter<'b>,
            left: usize,
            cut: bool,
        }
        impl Write for Escaper<'_, '_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                for c in s.chars() {
                    if self.left == 0 {
                        self.cut = true;
                        // Stops the value's own formatting.
                        return Err(std::fmt::Error);
                    }
                    self.left -= 1;
                    let unsafe_char = c.is_control()
                        || c == '\\'
                        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
                        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
                    if unsafe_char {
                        write!(self.out, "{}", c.escape_unicode())?;
                    } else {
                        self.out.write_char(c)?;
                    }
                }
                Ok(())
            }
        }
        let mut escaper = Escaper {
            out: f,
            left: LOGGED_CHARS,
            cut: false,
        };
        let written = write!(escaper, "{}", self.0);
        if escaper.cut {
            return escaper.out.write_str("…");
        }
        written
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A minimal page for people in a browser.
pub fn html_page(title: &str, detail: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:36em;margin:4em auto\"><h1>{t}</h1><p>{d}</p></body></html>",
        t = escape(title),
        d = escape(detail)
    ))
}

/// Everything the sidecar needs, resolved and checked.
pub struct Settings {
    pub listen: SocketAddr,
    /// Exactly as configured: Synapse compares it byte for byte.
    pub issuer: String,
    /// The issuer's path, under which the OIDC endpoints are served.
    pub issuer_path: String,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub keys_dir: PathBuf,
    pub active_kid: Option<String>,
    pub clients: Vec<oidc::OidcClient>,
    pub platform: platform::PlatformSettings,
    pub login: Option<oidc::LoginRedirect>,
    pub synapse: SynapseConfig,
    /// MAS mode: credentials are MAS personal sessions.
    pub mas: Option<crate::mas::MasConfig>,
    pub homeserver_public_url: String,
    pub credentials: credentials::CredentialSettings,
    pub handles: handles::HandleSettings,
    pub pending: pending::PendingSettings,
    pub lifetimes: oidc::Lifetimes,
    pub scope: directory::DirectoryScope,
    pub reload: Duration,
    /// Plain-HTTP `/metrics` listener (none when "off").
    pub metrics_listen: Option<SocketAddr>,
    /// Where redeemed codes are recorded (Leases) so that every replica
    /// sees them; in memory when unset (one replica).
    pub state_namespace: Option<String>,
    /// This replica's name (on its redemption records).
    pub identity: String,
}

fn required<T>(value: Option<T>, what: &str) -> Result<T, Error> {
    value.ok_or_else(|| Error::Config(format!("{what} is required")))
}

fn non_zero(value: Option<u32>, default: u32, what: &str) -> Result<NonZeroU32, Error> {
    NonZeroU32::new(value.unwrap_or(default))
        .ok_or_else(|| Error::Config(format!("{what} must be at least 1")))
}

impl Settings {
    /// Checks the configuration and reads the secrets it points to.
    pub async fn resolve(config: SidecarConfig, kube: &kube::Client) -> Result<Self, Error> {
        let issuer_text = required(config.issuer, "issuer")?;
        let issuer =
            url::Url::parse(&issuer_text).map_err(|e| Error::Config(format!("issuer: {e}")))?;
        // Synapse checks the provider's metadata; we never ask it not to.
        if issuer.scheme() != "https" || issuer.query().is_some() || issuer.fragment().is_some() {
            return Err(Error::Config(
                "issuer must be an https URL without query or fragment".into(),
            ));
        }
        if config.clients.is_empty() {
            return Err(Error::Config("at least one OIDC client is required".into()));
        }
        let mut clients = Vec::new();
        for c in &config.clients {
            if c.redirect_uris.is_empty() {
                return Err(Error::Config(format!(
                    "client {:?} has no redirect URIs",
                    c.id
                )));
            }
            for uri in &c.redirect_uris {
                url::Url::parse(uri)
                    .map_err(|e| Error::Config(format!("redirect URI {uri:?}: {e}")))?;
            }
            let secret = read_secret_file(&c.secret_file)?;
            clients.push(oidc::OidcClient {
                id: c.id.clone(),
                secret_digest: digest(&secret),
                redirect_uris: c.redirect_uris.clone(),
            });
        }
        let p = config.platform;
        let keys = match (&p.secret_file, &p.jwks_url) {
            (Some(file), None) => {
                let secret = read_secret_file(file)?;
                if secret.len() < 32 {
                    return Err(Error::Config(
                        "the platform's HS256 secret must be at least 32 bytes".into(),
                    ));
                }
                platform::PlatformKeys::SharedSecret(secret.into_bytes())
            }
            (None, Some(url)) => {
                let names = if p.algorithms.is_empty() {
                    vec!["RS256".to_string(), "ES256".to_string()]
                } else {
                    p.algorithms.clone()
                };
                let algorithms = names
                    .iter()
                    .map(|a| match a.as_str() {
                        "RS256" => Ok(Algorithm::RS256),
                        "ES256" => Ok(Algorithm::ES256),
                        other => Err(Error::Config(format!(
                            "platform algorithm {other:?} is not allowed with a JWKS (RS256, ES256)"
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                platform::PlatformKeys::Jwks {
                    url: url.clone(),
                    algorithms,
                    refresh: Duration::from_secs(p.jwks_refresh_seconds.unwrap_or(300)),
                }
            }
            _ => {
                return Err(Error::Config(
                    "platform: set exactly one of secretFile (HS256) or jwksUrl".into(),
                ))
            }
        };
        let platform = platform::PlatformSettings {
            issuer: required(p.issuer, "platform.issuer")?,
            audience: required(p.audience, "platform.audience")?,
            keys,
            tenant_claim: p.tenant_claim.unwrap_or_else(|| "tenant".into()),
            leeway_seconds: p.leeway_seconds.unwrap_or(30),
        };
        let login = match p.login_url {
            Some(u) => Some(oidc::LoginRedirect {
                url: url::Url::parse(&u)
                    .map_err(|e| Error::Config(format!("platform.loginUrl: {e}")))?,
                return_parameter: p.return_parameter.unwrap_or_else(|| "return_to".into()),
            }),
            None => None,
        };
        let hs = config.homeserver;
        let as_token = match (&hs.as_token_secret, &hs.as_token_file) {
            (_, Some(file)) => read_secret_file(file)?,
            (Some(reference), None) => read_secret_key(kube, reference, "as_token").await?,
            (None, None) => {
                return Err(Error::Config(
                    "homeserver.asTokenSecret or homeserver.asTokenFile is required".into(),
                ))
            }
        };
        let url = required(hs.url, "homeserver.url")?;
        let mas = match config.mas {
            Some(m) => Some(crate::mas::MasConfig {
                url: m.url,
                client_id: m.client_id,
                client_secret: read_secret_file(&m.client_secret_file)?,
                // The sidecar makes no links.
                upstream_provider: String::new(),
                timeout: Duration::from_secs(10),
            }),
            None => None,
        };
        let c = config.credentials;
        let o = config.oidc;
        let defaults = oidc::Lifetimes::default();
        let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
        let credential_defaults = credentials::CredentialSettings::default();
        let pending_defaults = pending::PendingSettings::default();
        let credentials = credentials::CredentialSettings {
            token_lifetime: secs(c.token_lifetime_seconds, credential_defaults.token_lifetime),
            renew_before: secs(c.renew_before_seconds, credential_defaults.renew_before),
            per_minute: non_zero(c.requests_per_minute, 30, "credentials.requestsPerMinute")?,
            burst: non_zero(c.burst, 10, "credentials.burst")?,
        };
        let admin_localpart = hs
            .admin_localpart
            .unwrap_or_else(|| "openmeet-admin".into());
        let sender_localpart = hs
            .sender_localpart
            .unwrap_or_else(|| "openmeet-operator".into());
        let h = config.handles;
        let mut reserved = crate::controller::OperatorConfig::builtin_reserved(
            &admin_localpart,
            &sender_localpart,
        );
        reserved.extend(
            h.reserved_localparts
                .into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
        let handles = handles::HandleSettings {
            reserved,
            per_minute: non_zero(h.requests_per_minute, 60, "handles.requestsPerMinute")?,
            burst: non_zero(h.burst, 20, "handles.burst")?,
        };
        if credentials.renew_before >= credentials.token_lifetime {
            return Err(Error::Config(
                "credentials.renewBeforeSeconds must be shorter than tokenLifetimeSeconds".into(),
            ));
        }
        Ok(Settings {
            listen: config
                .listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8443))),
            issuer_path: issuer.path().to_string(),
            issuer: issuer_text,
            cert_file: required(config.tls.cert_file, "tls.certFile")?,
            key_file: required(config.tls.key_file, "tls.keyFile")?,
            keys_dir: required(config.signing_keys.dir, "signingKeys.dir")?,
            active_kid: config.signing_keys.active_kid,
            clients,
            platform,
            login,
            homeserver_public_url: hs.public_url.unwrap_or_else(|| url.clone()),
            synapse: SynapseConfig {
                url,
                server_name: required(hs.server_name, "homeserver.serverName")?,
                admin_localpart,
                as_token,
                timeout: Duration::from_secs(10),
            },
            mas,
            credentials,
            handles,
            pending: pending::PendingSettings {
                wait: secs(config.pending_account.wait_seconds, pending_defaults.wait),
                refresh: secs(
                    config.pending_account.refresh_seconds,
                    pending_defaults.refresh,
                )
                .max(Duration::from_secs(1)),
            },
            lifetimes: oidc::Lifetimes {
                code: secs(o.code_seconds, defaults.code),
                id_token: secs(o.id_token_seconds, defaults.id_token),
                access_token: secs(o.access_token_seconds, defaults.access_token),
            },
            scope: directory::DirectoryScope {
                namespace: config.namespace,
                label_selector: config.label_selector,
            },
            reload: Duration::from_secs(config.reload_seconds.unwrap_or(30).max(1)),
            state_namespace: config.state_namespace,
            identity: config
                .identity
                .unwrap_or_else(|| format!("sidecar-{}", rand::random::<u32>())),
            metrics_listen: match config.metrics_listen.as_deref() {
                None => Some(SocketAddr::from(([0, 0, 0, 0], 8082))),
                Some("off") => None,
                Some(addr) => Some(
                    addr.parse()
                        .map_err(|e| Error::Config(format!("metricsListen {addr:?}: {e}")))?,
                ),
            },
        })
    }
}

#[derive(Clone)]
struct Health {
    directory: directory::Directory,
}

/// Requests served, by route template and status class, with latency.
#[derive(Clone)]
pub struct SidecarMetrics {
    requests: prometheus_client::metrics::family::Family<
        crate::metrics::Labels,
        prometheus_client::metrics::counter::Counter,
    >,
    latency: crate::metrics::HistogramFamily,
    synapse: Arc<crate::synapse::RequestStats>,
}

impl SidecarMetrics {
    pub fn new(synapse: Arc<crate::synapse::RequestStats>) -> Self {
        SidecarMetrics {
            requests: Default::default(),
            latency: crate::metrics::latency_family(),
            synapse,
        }
    }

    fn record(&self, endpoint: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("endpoint", endpoint.to_string()),
                ("status", crate::metrics::status_class(Some(status))),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("endpoint", endpoint.to_string())])
            .observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        crate::metrics::register_build_info(&mut registry);
        crate::metrics::register_process(&mut registry);
        registry.register(
            "openmeet_sidecar_requests",
            "Requests served by the sidecar, by route and status class",
            self.requests.clone(),
        );
        registry.register(
            "openmeet_sidecar_request_duration_seconds",
            "Latency of the sidecar's answers, by route",
            self.latency.clone(),
        );
        self.synapse.register(&mut registry);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

async fn readyz(State(h): State<Health>) -> Response {
    if h.directory.is_ready() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "directory loading").into_response()
    }
}

/// One log line per request: method, path (never the query: it may carry
/// codes or tokens), status, duration; and the request metrics, by route
/// template (a bounded set: unmatched paths count as `other`).
async fn access_log(
    State(metrics): State<SidecarMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let endpoint = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "other".to_string());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    metrics.record(&endpoint, status, started.elapsed());
    tracing::debug!(
        %method, path = %untrusted(&path), status, ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

/// The Content-Security-Policy of the sidecar's pages. They are static
/// HTML with inline style attributes: no script, image, font or frame; a
/// form may post only to the sidecar itself, and what it answers may
/// redirect only to a client's registered redirect URI or the platform's
/// login page (CSP applies `form-action` to those redirects too). A meta
/// refresh is not governed by CSP.
pub fn content_security_policy<'a>(targets: impl IntoIterator<Item = &'a str>) -> String {
    let mut origins: Vec<String> = targets.into_iter().filter_map(origin_of).collect();
    origins.sort();
    origins.dedup();
    let mut form_action = String::from("'self'");
    for origin in origins {
        form_action.push(' ');
        form_action.push_str(&origin);
    }
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action {form_action}; \
         frame-ancestors 'none'; base-uri 'none'"
    )
}

/// `scheme://host[:port]` of an http(s) URL, as CSP source expressions
/// write it.
fn origin_of(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    matches!(url.scheme(), "http" | "https").then(|| url.origin().ascii_serialization())
}

/// Headers on every answer: `nosniff` (JSON and HTML alike) and HSTS (the
/// sidecar serves HTTPS only); HTML answers also get the
/// Content-Security-Policy and are never framed.
async fn security_headers(
    State(csp): State<HeaderValue>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

/// The complete router: OIDC under the issuer's path, the credential API,
/// health and the API description.
pub fn router(
    issuer_path: &str,
    provider: Arc<oidc::Provider>,
    credentials: Arc<credentials::CredentialService>,
    handles: Arc<handles::HandleService>,
    directory: directory::Directory,
    metrics: SidecarMetrics,
) -> Router {
    let api = Router::new()
        .route("/api/v1/credentials", post(credentials::handler))
        .with_state(credentials)
        .merge(handles::router(handles));
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Health { directory });
    let openapi = Router::new().route(
        "/openapi.yaml",
        get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
    );
    let targets = provider
        .clients
        .values()
        .flat_map(|c| c.redirect_uris.iter().map(String::as_str))
        .chain(provider.login.iter().map(|l| l.url.as_str()));
    let csp = HeaderValue::from_str(&content_security_policy(targets))
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
    let oidc = oidc::router(provider);
    let prefix = issuer_path.trim_end_matches('/');
    let base = api.merge(health).merge(openapi);
    let app = if prefix.is_empty() {
        base.merge(oidc)
    } else {
        base.nest(prefix, oidc)
    };
    app.route_layer(axum::middleware::from_fn_with_state(metrics, access_log))
        // Forms carry a platform token (at most 16 KiB) and a few short
        // parameters: nothing larger is read.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(drain_oversized))
        .layer(axum::middleware::from_fn_with_state(csp, security_headers))
}

/// The largest request body read (the `/authorize` and `/token` forms).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How much of an oversized body is read and dropped so that its sender,
/// still writing, receives the 413 instead of a reset connection; beyond
/// it (or after [`DRAIN_TIME`]) the connection is closed after the answer.
pub const DRAIN_BYTES: usize = 8 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Hands the route at most [`MAX_BODY_BYTES`] + 1 of the body (so its own
/// extractor answers an oversized one with the route's 413: a page on
/// browser routes, JSON on the API), having read and dropped the rest up
/// to [`DRAIN_BYTES`]. Nothing beyond the limit is kept.
async fn drain_oversized(request: Request, next: Next) -> Response {
    use futures::StreamExt;
    let (parts, body) = request.into_parts();
    let mut chunks = body.into_data_stream();
    let mut kept: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    let drained = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(chunk) = chunks.next().await {
            let Ok(chunk) = chunk else { return false };
            seen += chunk.len();
            let room = (MAX_BODY_BYTES + 1).saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if seen > DRAIN_BYTES {
                return false;
            }
        }
        true
    })
    .await;
    if !matches!(drained, Ok(true)) && kept.len() <= MAX_BODY_BYTES {
        // The body broke off (or trickled past the drain time) within the limit.
        return (
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
        )
            .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(kept)))
        .await
}

/// Request headers (HTTP/2's header list; HTTP/1's read buffer has its own
/// larger limit) up to this size reach the handlers, so that a platform
/// token over its 16 KiB cap in a header or the query is answered with a
/// clear refusal; beyond it, 431.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// Runs the sidecar until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    kube: kube::Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let keys = keys::Keys::open(settings.keys_dir.clone(), settings.active_kid.clone())?;
    let verifier = platform::PlatformVerifier::new(settings.platform.clone());
    let (directory, watches) = directory::Directory::start(kube.clone(), &settings.scope);
    let mut synapse = SynapseClient::new(settings.synapse.clone())?;
    if let Some(mas) = settings.mas.clone() {
        let mas =
            crate::mas::MasClient::new(mas).map_err(|e| Error::Config(format!("mas: {e}")))?;
        synapse = synapse.with_mas(mas);
    }
    let metrics = SidecarMetrics::new(synapse.stats_handle());
    // Several replicas share the record of redeemed codes through Leases.
    let redemptions = match &settings.state_namespace {
        Some(ns) => grants::Redemptions::Leases {
            api: Box::new(kube::Api::namespaced(kube.clone(), ns)),
            identity: settings.identity.clone(),
        },
        None => grants::Redemptions::memory(),
    };
    let provider = Arc::new(oidc::Provider {
        issuer: settings.issuer.clone(),
        clients: settings
            .clients
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect(),
        keys: keys.clone(),
        platform: verifier.clone(),
        login: settings.login,
        directory: directory.clone(),
        lifetimes: settings.lifetimes,
        redemptions,
        pending: settings.pending,
    });
    let handles = Arc::new(handles::HandleService::new(
        directory.clone(),
        verifier.clone(),
        synapse.clone(),
        settings.handles,
    ));
    let credentials = Arc::new(credentials::CredentialService::new(
        settings.homeserver_public_url,
        directory.clone(),
        verifier,
        synapse,
        settings.credentials,
    ));
    let app = router(
        &settings.issuer_path,
        provider.clone(),
        credentials.clone(),
        handles.clone(),
        directory,
        metrics.clone(),
    );
    let metrics_server = match settings.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(Error::Serve)?;
            // The address bound (a `:0` port resolved): `make dev` prints it.
            let addr = listener.local_addr().map_err(Error::Serve)?;
            tracing::info!(%addr, "sidecar metrics listening (HTTP)");
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            );
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }))
        }
        None => None,
    };

    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
        &settings.cert_file,
        &settings.key_file,
    )
    .await
    .map_err(Error::Tls)?;
    let revoker = tokio::spawn(credentials.revoke_loop(Duration::from_secs(1)));
    let sweeper = {
        let provider = provider.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                handles.retain_recent();
                match provider.redemptions.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "expired code redemptions removed"),
                    Err(e) => tracing::warn!(error = %e, "code redemptions not swept"),
                }
            }
        })
    };
    let reloader = {
        let (tls, keys) = (tls.clone(), keys.clone());
        let (cert, key) = (settings.cert_file.clone(), settings.key_file.clone());
        let every = settings.reload;
        tokio::spawn(async move {
            let read = |c: &PathBuf, k: &PathBuf| (std::fs::read(c).ok(), std::fs::read(k).ok());
            let mut seen = read(&cert, &key);
            loop {
                tokio::time::sleep(every).await;
                keys.reload();
                let now = read(&cert, &key);
                if now != seen {
                    match tls.reload_from_pem_file(&cert, &key).await {
                        Ok(()) => tracing::info!("TLS certificate reloaded"),
                        Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded"),
                    }
                    seen = now;
                }
            }
        })
    };
    let handle = axum_server::Handle::new();
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            handle.graceful_shutdown(Some(Duration::from_secs(10)));
        });
    }
    {
        let handle = handle.clone();
        let issuer = settings.issuer.clone();
        tokio::spawn(async move {
            if let Some(addr) = handle.listening().await {
                tracing::info!(%addr, %issuer, "sidecar listening (HTTPS)");
            }
        });
    }
    let mut server = axum_server::bind_rustls(settings.listen, tls).handle(handle);
    server
        .http_builder()
        .http2()
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let served = server
        .serve(app.into_make_service())
        .await
        .map_err(Error::Serve);
    revoker.abort();
    sweeper.abort();
    reloader.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    watches.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path the router serves, as an issuer without a path puts them.
    const SERVED: &[&str] = &[
        "/api/v1/credentials",
        "/api/v1/handles/{localpart}",
        "/.well-known/openid-configuration",
        "/jwks",
        "/authorize",
        "/token",
        "/userinfo",
        "/healthz",
        "/readyz",
        "/openapi.yaml",
    ];

    #[test]
    fn the_api_description_covers_every_route() {
        let doc: serde_yaml::Value = serde_yaml::from_str(OPENAPI).unwrap();
        let mut documented: Vec<String> = doc["paths"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        documented.sort();
        let mut served: Vec<String> = SERVED.iter().map(|s| s.to_string()).collect();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn refusals_are_json_with_a_stable_code() {
        let response = ApiError::new(429, "rate_limited", "slow down")
            .retry_after(7)
            .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer abc"),
        );
        assert_eq!(bearer(&headers).as_deref(), Some("abc"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn untrusted_values_cannot_break_a_log_line() {
        let logged = untrusted("a\nb\r\u{2028}c\\n\u{202e}d\u{1b}[31m").to_string();
        assert_eq!(
            logged,
            "a\\u{a}b\\u{d}\\u{2028}c\\u{5c}n\\u{202e}d\\u{1b}[31m"
        );
        assert!(!logged.chars().any(char::is_control));
        let long = untrusted("x".repeat(LOGGED_CHARS + 50)).to_string();
        assert_eq!(long.chars().count(), LOGGED_CHARS + 1);
        assert!(long.ends_with('…'));
        assert_eq!(untrusted(42).to_string(), "42");
        assert_eq!(untrusted("client-é").to_string(), "client-é");
    }

    #[test]
    fn pages_may_post_only_to_the_sidecar_and_redirect_to_known_places() {
        let csp = content_security_policy([
            "https://matrix.example.com/_synapse/client/oidc/callback",
            "https://matrix.example.com/other/callback",
            "https://openmeet.example.com/login?x=1",
            "javascript:alert(1)",
        ]);
        assert_eq!(
            csp,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' \
             https://matrix.example.com https://openmeet.example.com; \
             frame-ancestors 'none'; base-uri 'none'"
        );
    }

    #[test]
    fn pages_escape_what_they_show() {
        let page = html_page("<b>", "a & \"b\"").0;
        assert!(page.contains("&lt;b&gt;") && page.contains("a &amp; &quot;b&quot;"));
    }
}
