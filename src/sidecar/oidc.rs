//! The OpenID Connect provider Synapse's `oidc_providers` talks to:
//! discovery, JWKS, the authorization-code flow with PKCE S256, token and
//! userinfo endpoints. End users are authenticated by a platform JWT.

use super::directory::{Directory, LookupError};
use super::grants::{self, AccessClaims, CodeClaims, GrantError, Redemption, Redemptions};
use super::keys::Keys;
use super::platform::{PlatformError, PlatformVerifier};
use super::{bearer, digest, html_page, untrusted};
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use jsonwebtoken::{encode, Header};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One registered relying party (Synapse).
#[derive(Clone)]
pub struct OidcClient {
    pub id: String,
    /// SHA-256 of the secret: compared in constant time, never kept in clear.
    pub secret_digest: [u8; 32],
    /// Exact redirect URIs; anything else is refused.
    pub redirect_uris: Vec<String>,
}

/// Where unauthenticated browsers go to sign in to the platform.
#[derive(Clone, Debug)]
pub struct LoginRedirect {
    pub url: url::Url,
    /// Query parameter that carries the return address.
    pub return_parameter: String,
}

#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub code: Duration,
    pub id_token: Duration,
    pub access_token: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            code: Duration::from_secs(60),
            id_token: Duration::from_secs(300),
            access_token: Duration::from_secs(300),
        }
    }
}

pub struct Provider {
    pub issuer: String,
    pub clients: HashMap<String, OidcClient>,
    pub keys: Keys,
    pub platform: PlatformVerifier,
    pub login: Option<LoginRedirect>,
    pub directory: Directory,
    pub lifetimes: Lifetimes,
    /// Which codes were redeemed, across replicas.
    pub redemptions: Redemptions,
    /// How long a first login waits for an account being prepared.
    pub pending: super::pending::PendingSettings,
}

impl Provider {
    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.issuer.trim_end_matches('/'))
    }
}

/// Routes, relative to the issuer's path.
pub fn router(provider: Arc<Provider>) -> Router {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks", get(jwks))
        .route("/authorize", get(authorize_get).post(authorize_post))
        .route("/token", axum::routing::post(token))
        .route("/userinfo", get(userinfo).post(userinfo))
        .with_state(provider)
}

async fn discovery(State(p): State<Arc<Provider>>) -> Response {
    let body = json!({
        "issuer": p.issuer,
        "authorization_endpoint": p.endpoint("/authorize"),
        "token_endpoint": p.endpoint("/token"),
        "userinfo_endpoint": p.endpoint("/userinfo"),
        "jwks_uri": p.endpoint("/jwks"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        // Only what our keys sign with: never `none`, never HS*.
        "id_token_signing_alg_values_supported": p.keys.current().algorithms(),
        "scopes_supported": ["openid", "profile", "email"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce",
                             "preferred_username", "name", "email", "tenant"],
    });
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(body)).into_response()
}

async fn jwks(State(p): State<Arc<Provider>>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(p.keys.current().jwks()),
    )
        .into_response()
}

/// The authorization request, as Synapse (or any client) sends it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AuthorizeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redirect_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code_challenge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code_challenge_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt: Option<String>,
    /// The platform's JWT, when the platform sends the browser back after
    /// sign-in: in a form (POST) only, never in an address.
    #[serde(default, skip_serializing)]
    platform_token: Option<String>,
    /// When a first login began waiting for its account (the wait page's
    /// refresh carries it).
    #[serde(default, skip_serializing)]
    wait_started: Option<String>,
}

impl AuthorizeRequest {
    /// This request's parameters, with `other`'s where this one has none:
    /// a form posted to the return address, whose query holds the rest.
    fn or(self, other: AuthorizeRequest) -> AuthorizeRequest {
        AuthorizeRequest {
            response_type: self.response_type.or(other.response_type),
            client_id: self.client_id.or(other.client_id),
            redirect_uri: self.redirect_uri.or(other.redirect_uri),
            scope: self.scope.or(other.scope),
            state: self.state.or(other.state),
            nonce: self.nonce.or(other.nonce),
            code_challenge: self.code_challenge.or(other.code_challenge),
            code_challenge_method: self.code_challenge_method.or(other.code_challenge_method),
            prompt: self.prompt.or(other.prompt),
            platform_token: self.platform_token,
            wait_started: self.wait_started.or(other.wait_started),
        }
    }
}

/// The cookie that carries a first login's wait from one look to the next
/// (a sealed, single-use [`grants::WaitClaims`]).
const WAIT_COOKIE: &str = "openmeet_wait";

/// Browser history, proxies and access logs keep addresses: a platform
/// token in one is refused unread.
fn token_in_address() -> Response {
    refuse_page(
        StatusCode::BAD_REQUEST,
        "Sign-in refused",
        "The platform sent your sign-in token in the page address, where browsers and servers \
         keep it. The platform must post it in a form instead. Sign in again.",
    )
}

async fn authorize_get(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Query(request): Query<AuthorizeRequest>,
) -> Response {
    if request.platform_token.is_some() {
        return no_store(token_in_address());
    }
    let response = authorize(&p, &headers, request).await;
    no_store(end_wait(&p, &headers, response))
}

async fn authorize_post(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Query(query): Query<AuthorizeRequest>,
    form: Result<Form<AuthorizeRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    if query.platform_token.is_some() {
        return no_store(token_in_address());
    }
    match form {
        Ok(Form(request)) => {
            let response = authorize(&p, &headers, request.or(query)).await;
            no_store(end_wait(&p, &headers, response))
        }
        // Over the body limit (413) or not a form: a page, as on every
        // browser route.
        Err(rejection) => no_store(refuse_page(
            rejection.status(),
            "Invalid sign-in request",
            "The sign-in request could not be read: it is too large or malformed.",
        )),
    }
}

/// The value of cookie `name` in the request, if any.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Who is waiting for their account, from the wait ticket this browser
/// was given, once: a ticket presented again (or by another browser that
/// copied it) proves nothing.
async fn waiting(p: &Provider, headers: &HeaderMap) -> Option<(String, String)> {
    let ticket = cookie(headers, WAIT_COOKIE)?;
    let claims = grants::open_wait(&p.keys.current(), ticket).ok()?;
    let keep = Duration::from_secs(claims.exp.saturating_sub(grants::epoch(SystemTime::now())));
    match p
        .redemptions
        .redeem(
            &format!("wait-{}", claims.jti),
            keep + Duration::from_secs(60),
        )
        .await
    {
        Ok(Redemption::First) => Some((claims.tenant, claims.subject)),
        Ok(Redemption::Replay) => {
            tracing::info!("authorize: a wait ticket presented again; ignored");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "authorize: wait ticket not recorded; ignored");
            None
        }
    }
}

/// The `Set-Cookie` value of the wait ticket, scoped to `/authorize`:
/// sealed (nothing readable), script-proof, HTTPS only, sent on the
/// page's own refresh; `max_age` 0 removes it.
fn wait_cookie(p: &Provider, value: &str, max_age: u64) -> Option<HeaderValue> {
    let path = url::Url::parse(&p.endpoint("/authorize"))
        .ok()?
        .path()
        .to_string();
    HeaderValue::from_str(&format!(
        "{WAIT_COOKIE}={value}; Path={path}; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax"
    ))
    .ok()
}

/// The wait page, with a new single-use ticket saying who waits, valid
/// until the wait is over.
fn with_wait_ticket(
    p: &Provider,
    mut page: Response,
    started: u64,
    tenant: String,
    subject: String,
) -> Response {
    let exp = started + p.pending.wait.as_secs() + 10;
    let ticket = grants::seal_wait(
        &p.keys.current(),
        &grants::WaitClaims {
            jti: grants::new_jti(),
            exp,
            subject,
            tenant,
        },
    );
    let max_age = exp.saturating_sub(grants::epoch(SystemTime::now()));
    if let Some(value) = wait_cookie(p, &ticket, max_age) {
        page.headers_mut().append(header::SET_COOKIE, value);
    }
    page
}

/// Once the wait is over (a code, or a refusal), its ticket is removed.
fn end_wait(p: &Provider, headers: &HeaderMap, mut response: Response) -> Response {
    let held = response.headers().contains_key(header::SET_COOKIE);
    if !held && cookie(headers, WAIT_COOKIE).is_some() {
        if let Some(value) = wait_cookie(p, "", 0) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

/// Errors before the redirect URI is trusted are shown, never redirected.
fn refuse_page(status: StatusCode, title: &str, detail: &str) -> Response {
    (status, html_page(title, detail)).into_response()
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> Response {
    let mut url = match url::Url::parse(uri) {
        Ok(u) => u,
        Err(_) => {
            return refuse_page(
                StatusCode::BAD_REQUEST,
                "Invalid redirect",
                "The registered redirect URI is not a URL.",
            )
        }
    };
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    Redirect::to(url.as_str()).into_response()
}

fn is_pkce_value(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

async fn authorize(p: &Provider, headers: &HeaderMap, mut request: AuthorizeRequest) -> Response {
    // 1. The client and its redirect URI, before anything is redirected.
    let Some(client) = request
        .client_id
        .as_deref()
        .and_then(|id| p.clients.get(id))
    else {
        return refuse_page(
            StatusCode::BAD_REQUEST,
            "Unknown application",
            "The application asking you to sign in is not registered with this provider.",
        );
    };
    let Some(redirect_uri) = request.redirect_uri.clone().filter(|r| {
        client
            .redirect_uris
            .iter()
            .any(|registered| registered == r)
    }) else {
        return refuse_page(
            StatusCode::BAD_REQUEST,
            "Invalid redirect",
            "The redirect address is not registered for this application.",
        );
    };
    let state = request.state.clone().unwrap_or_default();
    let fail = |error: &str, description: &str| {
        let mut params = vec![("error", error), ("error_description", description)];
        if !state.is_empty() {
            params.push(("state", state.as_str()));
        }
        redirect_with(&redirect_uri, &params)
    };
    // 2. The request itself.
    if request.response_type.as_deref() != Some("code") {
        return fail(
            "unsupported_response_type",
            "only the authorization code flow is supported",
        );
    }
    if !request
        .scope
        .as_deref()
        .is_some_and(|s| s.split(' ').any(|x| x == "openid"))
    {
        return fail("invalid_scope", "the openid scope is required");
    }
    let challenge = match (
        request.code_challenge.as_deref(),
        request.code_challenge_method.as_deref(),
    ) {
        (Some(c), Some("S256")) if is_pkce_value(c) => c.to_string(),
        _ => {
            return fail(
                "invalid_request",
                "PKCE with code_challenge_method S256 is required",
            )
        }
    };
    // 3. Who the browser is, by the platform's token (a Bearer header or
    //    the posted form), or by the ticket of a first login's wait. With
    //    `prompt=none` no session is the client's error, never a login
    //    page (OIDC Core 3.1.2.6).
    let silent = request
        .prompt
        .as_deref()
        .is_some_and(|p| p.split(' ').any(|x| x == "none"));
    let presented = bearer(headers).or(request.platform_token.take());
    let (tenant, subject) = match presented {
        Some(platform_token) => match p.platform.verify(&platform_token).await {
            Ok(id) => (id.tenant, id.subject),
            Err(e) => {
                tracing::info!(reason = %untrusted(&e), "authorize: platform token refused");
                if silent && !e.is_unavailable() {
                    return fail("login_required", "the platform session is not valid");
                }
                let status = if e.is_unavailable() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else if matches!(e, PlatformError::TooLarge) {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::UNAUTHORIZED
                };
                return refuse_page(status, "Sign-in failed", &platform_message(&e));
            }
        },
        None => match waiting(p, headers).await {
            Some(who) => who,
            None if silent => return fail("login_required", "no platform session"),
            None => {
                return match &p.login {
                    Some(login) => {
                        let mut back =
                            url::Url::parse(&p.endpoint("/authorize")).expect("issuer URL");
                        back.set_query(Some(
                            &serde_urlencoded::to_string(&request).unwrap_or_default(),
                        ));
                        let mut to = login.url.clone();
                        to.query_pairs_mut()
                            .append_pair(&login.return_parameter, back.as_str());
                        Redirect::to(to.as_str()).into_response()
                    }
                    None => refuse_page(
                        StatusCode::UNAUTHORIZED,
                        "Sign-in required",
                        "Sign in to the platform first, then try again.",
                    ),
                }
            }
        },
    };
    // 4. The one account declared for that identity, or a clear refusal.
    let account = match p.directory.lookup(&tenant, &subject) {
        Ok(a) => a,
        Err(e) => {
            // A first login may arrive before its account is ready: wait,
            // unless the client asked for no interaction at all.
            if !silent {
                let again = serde_urlencoded::to_string(&request).unwrap_or_default();
                if let Some((page, started)) = super::pending::hold(
                    &p.pending,
                    &e,
                    &p.endpoint("/authorize"),
                    &again,
                    request.wait_started.as_deref(),
                ) {
                    tracing::info!(
                        tenant = %untrusted(&tenant), reason = %untrusted(&e),
                        "authorize: account pending; the browser waits"
                    );
                    return with_wait_ticket(p, page, started, tenant, subject);
                }
            }
            tracing::info!(
                tenant = %untrusted(&tenant), reason = %untrusted(&e),
                "authorize: no usable account"
            );
            let (status, title, detail) = lookup_page(&e);
            return refuse_page(status, title, detail);
        }
    };
    // 5. A single-use code bound to client, redirect and PKCE challenge,
    //    sealed so that any replica can redeem it.
    let code = grants::seal_code(
        &p.keys.current(),
        &CodeClaims {
            jti: grants::new_jti(),
            exp: grants::epoch(SystemTime::now() + p.lifetimes.code),
            client_id: client.id.clone(),
            redirect_uri: redirect_uri.clone(),
            code_challenge: challenge,
            nonce: request.nonce.clone(),
            account: account.clone(),
        },
    );
    tracing::info!(user = %account.user_id, client = %client.id, "authorize: code issued");
    let mut params = vec![("code", code.as_str())];
    if !state.is_empty() {
        params.push(("state", state.as_str()));
    }
    redirect_with(&redirect_uri, &params)
}

fn platform_message(e: &PlatformError) -> String {
    if e.is_unavailable() {
        "The platform's sign-in service could not be reached. Try again shortly.".into()
    } else {
        format!("Your platform session could not be verified ({e}). Sign in again.")
    }
}

/// The refusal page for an identity with no usable account: its status,
/// heading and text. The heading names what is wrong: "No chat account"
/// only to someone who has none.
fn lookup_page(e: &LookupError) -> (StatusCode, &'static str, &'static str) {
    match e {
        LookupError::UnknownTenant(_) | LookupError::UserNotFound | LookupError::Deleted => (
            StatusCode::FORBIDDEN,
            "No chat account",
            "You have no chat account here. Ask the organisers to add you.",
        ),
        LookupError::NotReady(_) => (
            StatusCode::CONFLICT,
            "Chat account not ready",
            "Your chat account is not ready yet. Try again in a moment.",
        ),
        LookupError::Locked => (
            StatusCode::FORBIDDEN,
            "Chat account locked",
            "Your chat account is locked. Ask the organisers if you think this is a mistake.",
        ),
        LookupError::Deactivated => (
            StatusCode::FORBIDDEN,
            "Chat account deactivated",
            "Your chat account is deactivated.",
        ),
        LookupError::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is starting",
            "Sign-in is starting up. Try again in a moment.",
        ),
    }
}

fn no_store(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    // The authorize URL may carry the platform token: never leak it.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[derive(Debug, Deserialize)]
struct TokenRequest {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"openmeet\""),
        );
    }
    no_store(response)
}

/// Client credentials from HTTP Basic (form-encoded parts) or the form.
fn client_credentials(headers: &HeaderMap, form: &TokenRequest) -> Option<(String, String)> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let encoded = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
        };
        return Some((unescape(id)?, unescape(secret)?));
    }
    Some((form.client_id.clone()?, form.client_secret.clone()?))
}

fn secret_matches(expected: &[u8; 32], presented: &str) -> bool {
    // Digests of equal length, compared without an early exit.
    let presented = digest(presented);
    expected
        .iter()
        .zip(presented.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[derive(Serialize)]
struct IdTokenClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
    auth_time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    preferred_username: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    tenant: &'a str,
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

async fn token(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Form(form): Form<TokenRequest>,
) -> Response {
    let Some((client_id, secret)) = client_credentials(&headers, &form) else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication is required",
        );
    };
    let Some(client) = p
        .clients
        .get(&client_id)
        .filter(|c| secret_matches(&c.secret_digest, &secret))
    else {
        tracing::info!(client = %untrusted(&client_id), "token: client authentication failed");
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
    };
    if form.grant_type.as_deref() != Some("authorization_code") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code is supported",
        );
    }
    let Some(code) = form.code.as_deref() else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "code is missing",
        );
    };
    let now = SystemTime::now();
    let keys = p.keys.current();
    let grant = match grants::open_code(&keys, code) {
        Ok(g) => g,
        Err(GrantError::Expired) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "code expired")
        }
        Err(_) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown code"),
    };
    // The first presentation consumes the code, whatever its outcome; a
    // second revokes what the first produced.
    let keep = p.lifetimes.code + p.lifetimes.access_token;
    match p.redemptions.redeem(&grant.jti, keep).await {
        Ok(Redemption::First) => {}
        Ok(Redemption::Replay) => {
            tracing::warn!(
                client = %client.id,
                "token: authorization code replayed; tokens it issued are revoked"
            );
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "code already used",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "token: redemption record unavailable");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again",
            );
        }
    }
    let account = grant.account;
    let nonce = grant.nonce;
    if grant.client_id != client.id {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code was issued to another client",
        );
    }
    if form.redirect_uri.as_deref() != Some(grant.redirect_uri.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri does not match the authorization request",
        );
    }
    let challenge = grant.code_challenge;
    let verified = form.code_verifier.as_deref().is_some_and(|v| {
        is_pkce_value(v)
            && base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest(v)) == challenge
    });
    if !verified {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code_verifier does not match the code challenge",
        );
    }
    // The account may have been locked or removed since the code was issued.
    if let Some(Err(e)) = p.directory.still_usable(&account) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            &format!("the account is no longer usable: {e}"),
        );
    }
    let signing = &keys.active;
    let issued_at = epoch(now);
    let name = account
        .display_name
        .clone()
        .unwrap_or_else(|| account.localpart.clone());
    let sub = crate::api::sso_subject(&account.tenant, &account.subject);
    let claims = IdTokenClaims {
        iss: &p.issuer,
        sub: &sub,
        aud: &client.id,
        exp: issued_at + p.lifetimes.id_token.as_secs(),
        iat: issued_at,
        auth_time: issued_at,
        nonce: nonce.as_deref(),
        preferred_username: &account.localpart,
        name: &name,
        email: account.email.as_deref(),
        tenant: &account.tenant,
    };
    let mut header = Header::new(signing.algorithm);
    header.kid = Some(signing.kid.clone());
    let id_token = match encode(&header, &claims, &signing.encoding) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "token: signing the id_token failed");
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "could not sign the id_token",
            );
        }
    };
    let access_token = grants::seal_access(
        &keys,
        &AccessClaims {
            jti: grant.jti,
            exp: issued_at + p.lifetimes.access_token.as_secs(),
            account: account.clone(),
        },
    );
    tracing::info!(user = %account.user_id, client = %client.id, kid = %signing.kid, "token: issued");
    no_store(
        Json(json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": p.lifetimes.access_token.as_secs(),
            "id_token": id_token,
            "scope": "openid profile email",
        }))
        .into_response(),
    )
}

async fn userinfo(State(p): State<Arc<Provider>>, headers: HeaderMap) -> Response {
    let invalid = || {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_token", "error_description": "the access token is invalid, expired or revoked"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        no_store(r)
    };
    let Some(token) = bearer(&headers) else {
        return invalid();
    };
    let Ok(claims) = grants::open_access(&p.keys.current(), &token) else {
        return invalid();
    };
    match p.redemptions.is_revoked(&claims.jti).await {
        Ok(false) => {}
        Ok(true) => return invalid(),
        Err(e) => {
            tracing::error!(error = %e, "userinfo: redemption record unavailable");
            return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
        }
    }
    let account = claims.account;
    if let Some(Err(_)) = p.directory.still_usable(&account) {
        return invalid();
    }
    no_store(
        Json(json!({
            "sub": crate::api::sso_subject(&account.tenant, &account.subject),
            "preferred_username": account.localpart,
            "name": account.display_name.clone().unwrap_or_else(|| account.localpart.clone()),
            "email": account.email,
            "tenant": account.tenant,
        }))
        .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_someone_without_an_account_is_told_they_have_none() {
        for e in [
            LookupError::UnknownTenant("t".into()),
            LookupError::UserNotFound,
            LookupError::Deleted,
        ] {
            assert_eq!(lookup_page(&e).1, "No chat account", "{e:?}");
        }
        for e in [
            LookupError::NotReady("x".into()),
            LookupError::Locked,
            LookupError::Deactivated,
            LookupError::Loading,
        ] {
            let (_, title, detail) = lookup_page(&e);
            assert_ne!(title, "No chat account", "{e:?}");
            assert!(!detail.contains("no chat account"), "{e:?}: {detail}");
        }
    }

    #[test]
    fn pkce_values_follow_rfc7636() {
        assert!(is_pkce_value(&"a".repeat(43)));
        assert!(!is_pkce_value(&"a".repeat(42)));
        assert!(!is_pkce_value(&"a".repeat(129)));
        assert!(!is_pkce_value(&format!("{}+", "a".repeat(43))));
    }

    #[test]
    fn reads_basic_client_credentials_form_encoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("synapse:s%3Acret+x");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        let form = TokenRequest {
            grant_type: None,
            code: None,
            redirect_uri: None,
            code_verifier: None,
            client_id: None,
            client_secret: None,
        };
        assert_eq!(
            client_credentials(&headers, &form),
            Some(("synapse".into(), "s:cret x".into()))
        );
    }

    #[test]
    fn secrets_compare_by_digest() {
        let d = digest("right");
        assert!(secret_matches(&d, "right"));
        assert!(!secret_matches(&d, "wrong"));
        assert!(!secret_matches(&d, ""));
    }
}
