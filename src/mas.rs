//! Typed client for the Matrix Authentication Service's admin API
//! (`/api/admin/v1`), used in MAS mode, where MAS owns accounts, logins and
//! access tokens and Synapse only mirrors them.
//!
//! The operator authenticates as an OAuth client of its own with the client
//! credentials grant and the `urn:mas:admin` scope (the client must be listed
//! in MAS's `policy.data.admin_clients`). Tokens are cached until shortly
//! before they expire. Requests share the Synapse client's write gate (no
//! write once leadership is lost), its limit on requests in flight and its
//! counters: MAS and Synapse are one homeserver's budget.

use crate::synapse::{RequestKind, RequestStats, WriteGate};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a MAS call failed, classified for retry decisions.
#[derive(Debug, thiserror::Error)]
pub enum MasError {
    /// The transport's error and its causes, never the internal address.
    #[error("MAS is unreachable: {0}")]
    Unreachable(String),
    #[error("MAS answered {status}: {message}")]
    Server { status: u16, message: String },
    /// MAS refused the value (its policy, a malformed username or email, a
    /// conflict): a spec change is needed, not a retry.
    #[error("MAS refused the request with {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The token endpoint refused the operator's client: its id or secret is
    /// wrong, or the client may not use the admin scope.
    #[error("MAS refused the operator's client credentials: {0}")]
    Credentials(String),
    #[error("MAS's answer could not be read: {0}")]
    Decode(String),
    #[error("could not build the MAS request: {0}")]
    Request(String),
    #[error("not the leader: writes to MAS are stopped")]
    NotLeader,
}

impl MasError {
    fn unreachable(e: reqwest::Error) -> Self {
        MasError::Unreachable(crate::synapse::transport_failure(e))
    }

    /// Transient failures are retried with backoff. Wrong credentials are
    /// retried too (with backoff): they are fixed by a Secret, not a spec,
    /// and nothing is written meanwhile.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            MasError::Unreachable(_)
                | MasError::Server { .. }
                | MasError::Credentials(_)
                | MasError::NotLeader
        )
    }

    /// The HTTP status MAS answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            MasError::Server { status, .. } | MasError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Connection settings for MAS.
#[derive(Clone, Debug)]
pub struct MasConfig {
    /// MAS's base URL (its `http.public_base` or an internal address).
    pub url: String,
    /// The operator's OAuth client (a ULID in MAS's `clients`).
    pub client_id: String,
    pub client_secret: String,
    /// The upstream OAuth 2.0 provider (a ULID in MAS's `upstream_oauth2`)
    /// that points at the sidecar: SSO links are made on it.
    pub upstream_provider: String,
    pub timeout: Duration,
}

/// A cheap-to-clone handle on MAS.
#[derive(Clone)]
pub struct MasClient {
    http: reqwest::Client,
    base: String,
    client_id: String,
    client_secret: Arc<str>,
    upstream_provider: String,
    token: Arc<tokio::sync::Mutex<Option<Token>>>,
    /// A Synapse admin token for the operator's admin account (see
    /// [`MasClient::synapse_admin_token`]) and the session it belongs to.
    admin_token: Arc<tokio::sync::Mutex<Option<(Token, String)>>>,
    stats: Arc<RequestStats>,
    write_gate: Option<WriteGate>,
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
}

struct Token {
    value: String,
    renew_at: Instant,
}

impl std::fmt::Debug for MasClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret or the token.
        f.debug_struct("MasClient")
            .field("base", &self.base)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// A MAS user, as the admin API reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasUser {
    pub id: String,
    pub username: String,
    pub locked: bool,
    pub deactivated: bool,
    pub admin: bool,
}

/// An email address of a MAS user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasEmail {
    pub id: String,
    pub user_id: String,
    pub email: String,
}

/// An upstream OAuth link: a subject at an upstream provider, tied to a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasLink {
    pub id: String,
    pub provider_id: String,
    pub subject: String,
    pub user_id: Option<String>,
}

/// A personal session's access token, minted for a user.
#[derive(Clone, Debug)]
pub struct PersonalToken {
    pub session_id: String,
    pub access_token: String,
}

/// The kinds of session a user can hold in MAS, each ended its own way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// OAuth 2.0 sessions of Matrix clients (Element X and other MSC3861 clients).
    OAuth2,
    /// Sessions of legacy clients through MAS's compatibility login.
    Compat,
    /// Personal access tokens (the credential API's).
    Personal,
    /// Browser sessions on MAS's own pages.
    Browser,
}

impl SessionKind {
    pub const ALL: [SessionKind; 4] = [
        SessionKind::OAuth2,
        SessionKind::Compat,
        SessionKind::Personal,
        SessionKind::Browser,
    ];

    fn collection(self) -> &'static str {
        match self {
            SessionKind::OAuth2 => "oauth2-sessions",
            SessionKind::Compat => "compat-sessions",
            SessionKind::Personal => "personal-sessions",
            SessionKind::Browser => "user-sessions",
        }
    }

    /// The filter naming the user the sessions act for.
    fn user_filter(self) -> &'static str {
        match self {
            SessionKind::Personal => "filter[actor_user]",
            _ => "filter[user]",
        }
    }

    /// The verb that ends one.
    fn end(self) -> &'static str {
        match self {
            SessionKind::Personal => "revoke",
            _ => "finish",
        }
    }
}

#[derive(Deserialize)]
struct Single<T> {
    data: Resource<T>,
}

#[derive(Deserialize)]
struct Page<T> {
    #[serde(default = "Vec::new")]
    data: Vec<Resource<T>>,
}

#[derive(Deserialize)]
struct Resource<T> {
    id: String,
    attributes: T,
}

#[derive(Deserialize)]
struct UserAttributes {
    username: String,
    #[serde(default)]
    locked_at: Option<String>,
    #[serde(default)]
    deactivated_at: Option<String>,
    #[serde(default)]
    admin: bool,
}

impl From<Resource<UserAttributes>> for MasUser {
    fn from(r: Resource<UserAttributes>) -> Self {
        MasUser {
            id: r.id,
            username: r.attributes.username,
            locked: r.attributes.locked_at.is_some(),
            deactivated: r.attributes.deactivated_at.is_some(),
            admin: r.attributes.admin,
        }
    }
}

#[derive(Deserialize)]
struct EmailAttributes {
    user_id: String,
    email: String,
}

#[derive(Deserialize)]
struct LinkAttributes {
    provider_id: String,
    subject: String,
    #[serde(default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct PersonalAttributes {
    #[serde(default)]
    access_token: Option<String>,
}

#[derive(Deserialize)]
struct Ignored {}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorItem>,
    /// The token endpoint's OAuth error.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ErrorItem {
    title: String,
}

/// How many items a list asks for at once; a user holds far fewer emails,
/// links or sessions than this in practice, and ending sessions lists again.
const PAGE: &str = "100";

impl MasClient {
    pub fn new(config: MasConfig) -> Result<Self, MasError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| MasError::Request(e.to_string()))?;
        Ok(MasClient {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            client_id: config.client_id,
            client_secret: config.client_secret.into(),
            upstream_provider: config.upstream_provider,
            token: Default::default(),
            admin_token: Default::default(),
            stats: Arc::default(),
            write_gate: None,
            in_flight: None,
        })
    }

    /// The same client (and its cached tokens) over `http`: for a handle
    /// shared by more than one tokio runtime, which wants a client that
    /// keeps no idle connections, since a pooled connection dies with the
    /// runtime that opened it.
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The same client, counting into `stats`, writing through `gate` and
    /// holding a slot of `in_flight` per request (the Synapse client's).
    pub(crate) fn sharing(
        mut self,
        stats: Arc<RequestStats>,
        gate: Option<WriteGate>,
        in_flight: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Self {
        self.stats = stats;
        self.write_gate = gate;
        self.in_flight = in_flight;
        self
    }

    pub(crate) fn set_write_gate(&mut self, gate: WriteGate) {
        self.write_gate = Some(gate);
    }

    /// The upstream provider SSO links are made on.
    pub fn upstream_provider(&self) -> &str {
        &self.upstream_provider
    }

    /// Checks the operator's client credentials by obtaining a token.
    pub async fn check_credentials(&self) -> Result<(), MasError> {
        self.access_token().await.map(|_| ())
    }

    /// A token Synapse takes as a server admin's, for its admin API. In MAS
    /// mode Synapse grants admin only to tokens MAS issued with the
    /// `urn:synapse:admin:*` scope (an application service's token never
    /// has it), so the operator's admin account (`admin_username`, made in
    /// MAS at bootstrap) holds a personal session with that scope, owned by
    /// the operator's client. It lives an hour, is renewed ten minutes
    /// before it ends, and the session it replaces is revoked.
    pub async fn synapse_admin_token(&self, admin_username: &str) -> Result<String, MasError> {
        let mut cached = self.admin_token.lock().await;
        if let Some((token, _)) = cached.as_ref().filter(|(t, _)| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let admin = self
            .user_by_username(admin_username)
            .await?
            .ok_or_else(|| MasError::Rejected {
                status: 404,
                message: format!(
                    "the operator's admin account {admin_username:?} does not exist in MAS"
                ),
            })?;
        let lifetime = Duration::from_secs(3600);
        let minted = self
            .add_personal_session(
                &admin.id,
                "openmeet-matrix-operator: Synapse admin API",
                "urn:matrix:client:api:* urn:synapse:admin:*",
                lifetime,
                RequestKind::MasAdminToken,
            )
            .await?;
        let token = Token {
            value: minted.access_token.clone(),
            renew_at: Instant::now() + lifetime - Duration::from_secs(600),
        };
        if let Some((_, previous)) = cached.replace((token, minted.session_id)) {
            // Nothing waits on it: an old token still works until it expires.
            let _ = self.end_session(SessionKind::Personal, &previous).await;
        }
        Ok(minted.access_token)
    }

    /// Whether MAS answers at all (its health endpoint), for readiness.
    pub async fn reachable(&self) -> bool {
        self.http
            .get(format!("{}/health", self.base))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    async fn access_token(&self) -> Result<String, MasError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        #[derive(Deserialize)]
        struct Granted {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let request = self
            .http
            .post(format!("{}/oauth2/token", self.base))
            .basic_auth(&self.client_id, Some(&*self.client_secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "urn:mas:admin"),
            ])
            .build()
            .map_err(|e| MasError::Request(e.to_string()))?;
        let (status, body) = self.execute(request, RequestKind::MasToken).await?;
        if !(200..300).contains(&status) {
            let error = classify(status, &body);
            return Err(match error {
                MasError::Rejected { message, .. } => MasError::Credentials(message),
                other => other,
            });
        }
        let granted: Granted = decode(&body)?;
        // Renewed a minute early (or at half its life when shorter).
        let lifetime = Duration::from_secs(granted.expires_in.unwrap_or(300));
        let margin = Duration::from_secs(60).min(lifetime / 2);
        *cached = Some(Token {
            value: granted.access_token.clone(),
            renew_at: Instant::now() + lifetime - margin,
        });
        Ok(granted.access_token)
    }

    /// One admin API call: `path` under `/api/admin/v1`, with `query` pairs.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &[&str],
        query: &[(&str, &str)],
        body: Option<serde_json::Value>,
        kind: RequestKind,
    ) -> Result<bytes::Bytes, MasError> {
        if gated(kind) && self.write_gate.as_ref().is_some_and(|g| !g.is_open()) {
            return Err(MasError::NotLeader);
        }
        let token = self.access_token().await?;
        let mut url = url::Url::parse(&self.base).map_err(|e| MasError::Request(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|_| MasError::Request("MAS URL cannot be a base".into()))?
            .pop_if_empty()
            .extend(["api", "admin", "v1"])
            .extend(path);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let request = request
            .build()
            .map_err(|e| MasError::Request(e.to_string()))?;
        let (status, body) = self.execute(request, kind).await?;
        if status == 401 {
            // The token was revoked or MAS restarted with new keys: ask again next time.
            *self.token.lock().await = None;
        }
        if status < 400 {
            return Ok(body);
        }
        Err(classify(status, &body))
    }

    async fn execute(
        &self,
        request: reqwest::Request,
        kind: RequestKind,
    ) -> Result<(u16, bytes::Bytes), MasError> {
        let _slot = match &self.in_flight {
            Some(slots) => {
                let _waiting = self.stats.waiting();
                slots.acquire().await.ok()
            }
            None => None,
        };
        if gated(kind) && self.write_gate.as_ref().is_some_and(|g| !g.is_open()) {
            return Err(MasError::NotLeader);
        }
        let started = Instant::now();
        let outcome = match self.http.execute(request).await {
            Err(e) => Err(MasError::unreachable(e)),
            Ok(response) => {
                let status = response.status().as_u16();
                match response.bytes().await {
                    Err(e) => Err(MasError::unreachable(e)),
                    Ok(body) => Ok((status, body)),
                }
            }
        };
        self.stats.record(
            kind,
            outcome.as_ref().ok().map(|(s, _)| *s),
            started.elapsed(),
        );
        outcome
    }

    /// One page of a collection (see [`PAGE`]) matching `filter`.
    async fn list<A: DeserializeOwned>(
        &self,
        collection: &str,
        filter: &[(&str, &str)],
        kind: RequestKind,
    ) -> Result<Vec<Resource<A>>, MasError> {
        let mut query = filter.to_vec();
        query.push(("page[first]", PAGE));
        let body = self
            .call(reqwest::Method::GET, &[collection], &query, None, kind)
            .await?;
        Ok(decode::<Page<A>>(&body)?.data)
    }

    /// Deletes one resource; already gone counts as done.
    async fn delete(&self, collection: &str, id: &str, kind: RequestKind) -> Result<(), MasError> {
        match self
            .call(reqwest::Method::DELETE, &[collection, id], &[], None, kind)
            .await
        {
            Ok(_) | Err(MasError::Rejected { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The user with this username (the Matrix localpart), if any.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<MasUser>, MasError> {
        match self
            .call(
                reqwest::Method::GET,
                &["users", "by-username", username],
                &[],
                None,
                RequestKind::MasGetUser,
            )
            .await
        {
            Ok(body) => Ok(Some(decode::<Single<UserAttributes>>(&body)?.data.into())),
            Err(MasError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The user with this MAS id, if any.
    pub async fn user(&self, id: &str) -> Result<Option<MasUser>, MasError> {
        match self
            .call(
                reqwest::Method::GET,
                &["users", id],
                &[],
                None,
                RequestKind::MasGetUser,
            )
            .await
        {
            Ok(body) => Ok(Some(decode::<Single<UserAttributes>>(&body)?.data.into())),
            Err(MasError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a user; MAS provisions it in Synapse before answering.
    /// `over_homeserver_account` skips MAS's check that Synapse has no
    /// account of that name (for an account MAS provisioned in a create
    /// that never committed).
    pub async fn create_user(
        &self,
        username: &str,
        displayname: Option<&str>,
        avatar_url: Option<&str>,
        over_homeserver_account: bool,
    ) -> Result<MasUser, MasError> {
        let mut body = serde_json::json!({ "username": username });
        if over_homeserver_account {
            body["skip_homeserver_check"] = true.into();
        }
        if let Some(name) = displayname {
            body["displayname"] = name.into();
        }
        if let Some(avatar) = avatar_url.filter(|a| !a.is_empty()) {
            body["avatar_url"] = avatar.into();
        }
        let body = self
            .call(
                reqwest::Method::POST,
                &["users"],
                &[],
                Some(body),
                RequestKind::MasCreateUser,
            )
            .await?;
        Ok(decode::<Single<UserAttributes>>(&body)?.data.into())
    }

    /// Sets one of a user's flags: `lock`, `unlock`, `set-admin`, `deactivate`.
    async fn user_op(
        &self,
        id: &str,
        op: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(), MasError> {
        self.call(
            reqwest::Method::POST,
            &["users", id, op],
            &[],
            body,
            RequestKind::MasSetUser,
        )
        .await
        .map(|_| ())
    }

    pub async fn set_locked(&self, id: &str, locked: bool) -> Result<(), MasError> {
        self.user_op(id, if locked { "lock" } else { "unlock" }, None)
            .await
    }

    pub async fn set_admin(&self, id: &str, admin: bool) -> Result<(), MasError> {
        self.user_op(id, "set-admin", Some(serde_json::json!({ "admin": admin })))
            .await
    }

    /// Deactivates a user (MAS ends its sessions and deactivates it in
    /// Synapse), erasing it there unless `erase` is false.
    pub async fn deactivate(&self, id: &str, erase: bool) -> Result<(), MasError> {
        self.user_op(
            id,
            "deactivate",
            Some(serde_json::json!({ "skip_erase": !erase })),
        )
        .await
    }

    /// A user's email addresses.
    pub async fn emails_of(&self, user: &str) -> Result<Vec<MasEmail>, MasError> {
        self.list_emails(&[("filter[user]", user)]).await
    }

    /// Who holds an address (MAS keeps each address on one user).
    pub async fn email_holder(&self, email: &str) -> Result<Option<MasEmail>, MasError> {
        Ok(self
            .list_emails(&[("filter[email]", email)])
            .await?
            .into_iter()
            .next())
    }

    async fn list_emails(&self, filter: &[(&str, &str)]) -> Result<Vec<MasEmail>, MasError> {
        Ok(self
            .list::<EmailAttributes>("user-emails", filter, RequestKind::MasListEmails)
            .await?
            .into_iter()
            .map(|r| MasEmail {
                id: r.id,
                user_id: r.attributes.user_id,
                email: r.attributes.email,
            })
            .collect())
    }

    pub async fn add_email(&self, user: &str, email: &str) -> Result<(), MasError> {
        self.call(
            reqwest::Method::POST,
            &["user-emails"],
            &[],
            Some(serde_json::json!({ "user_id": user, "email": email })),
            RequestKind::MasAddEmail,
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_email(&self, id: &str) -> Result<(), MasError> {
        self.delete("user-emails", id, RequestKind::MasDeleteEmail)
            .await
    }

    /// A user's upstream links on the sidecar's provider.
    pub async fn links_of(&self, user: &str) -> Result<Vec<MasLink>, MasError> {
        self.list_links(&[
            ("filter[user]", user),
            ("filter[provider]", &self.upstream_provider),
        ])
        .await
    }

    /// The link of `subject` on the sidecar's provider, if any.
    pub async fn link_by_subject(&self, subject: &str) -> Result<Option<MasLink>, MasError> {
        Ok(self
            .list_links(&[
                ("filter[provider]", &self.upstream_provider),
                ("filter[subject]", subject),
            ])
            .await?
            .into_iter()
            .next())
    }

    async fn list_links(&self, filter: &[(&str, &str)]) -> Result<Vec<MasLink>, MasError> {
        Ok(self
            .list::<LinkAttributes>("upstream-oauth-links", filter, RequestKind::MasListLinks)
            .await?
            .into_iter()
            .map(|r| MasLink {
                id: r.id,
                provider_id: r.attributes.provider_id,
                subject: r.attributes.subject,
                user_id: r.attributes.user_id,
            })
            .collect())
    }

    /// Links `subject` on the sidecar's provider to a user.
    pub async fn add_link(&self, user: &str, subject: &str) -> Result<(), MasError> {
        self.call(
            reqwest::Method::POST,
            &["upstream-oauth-links"],
            &[],
            Some(serde_json::json!({
                "user_id": user,
                "provider_id": self.upstream_provider,
                "subject": subject,
            })),
            RequestKind::MasAddLink,
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_link(&self, id: &str) -> Result<(), MasError> {
        self.delete("upstream-oauth-links", id, RequestKind::MasDeleteLink)
            .await
    }

    /// The ids of a user's active sessions of one kind.
    pub async fn active_sessions(
        &self,
        user: &str,
        kind: SessionKind,
    ) -> Result<Vec<String>, MasError> {
        let filter = [(kind.user_filter(), user), ("filter[status]", "active")];
        Ok(self
            .list::<Ignored>(kind.collection(), &filter, RequestKind::MasListSessions)
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect())
    }

    /// Ends one session (already ended counts as done).
    pub async fn end_session(&self, kind: SessionKind, id: &str) -> Result<(), MasError> {
        match self
            .call(
                reqwest::Method::POST,
                &[kind.collection(), id, kind.end()],
                &[],
                None,
                RequestKind::MasEndSession,
            )
            .await
        {
            Ok(_) => Ok(()),
            // Gone, or finished meanwhile (MAS answers 400 for a session
            // already finished or revoked).
            Err(MasError::Rejected {
                status: 400 | 404, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Mints a personal session for `user` with the Matrix client API scope
    /// (and a device, so Synapse accepts it), expiring after `lifetime`.
    pub async fn personal_session(
        &self,
        user: &str,
        name: &str,
        device_id: &str,
        lifetime: Duration,
    ) -> Result<PersonalToken, MasError> {
        let scope = format!("urn:matrix:client:api:* urn:matrix:client:device:{device_id}");
        self.add_personal_session(
            user,
            name,
            &scope,
            lifetime,
            RequestKind::MasAddPersonalSession,
        )
        .await
    }

    /// A session of `user` for one short job of the operator's (no device:
    /// nothing is synced with it), expiring after `lifetime`.
    pub async fn short_session(
        &self,
        user: &str,
        name: &str,
        lifetime: Duration,
    ) -> Result<PersonalToken, MasError> {
        self.add_personal_session(
            user,
            name,
            "urn:matrix:client:api:*",
            lifetime,
            RequestKind::MasAddPersonalSession,
        )
        .await
    }

    async fn add_personal_session(
        &self,
        user: &str,
        name: &str,
        scope: &str,
        lifetime: Duration,
        kind: RequestKind,
    ) -> Result<PersonalToken, MasError> {
        let body = self
            .call(
                reqwest::Method::POST,
                &["personal-sessions"],
                &[],
                Some(serde_json::json!({
                    "actor_user_id": user,
                    "human_name": name,
                    "scope": scope,
                    "expires_in": lifetime.as_secs().max(1),
                })),
                kind,
            )
            .await?;
        let minted = decode::<Single<PersonalAttributes>>(&body)?;
        let access_token = minted
            .data
            .attributes
            .access_token
            .ok_or_else(|| MasError::Decode("no access_token in the new session".into()))?;
        Ok(PersonalToken {
            session_id: minted.data.id,
            access_token,
        })
    }
}

/// Writes stop when leadership is lost (the operator's own tokens are not
/// writes: a standby's reads of Synapse's admin API need them too).
fn gated(kind: RequestKind) -> bool {
    kind.is_write()
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, MasError> {
    serde_json::from_slice(body).map_err(|e| MasError::Decode(e.to_string()))
}

/// Turns a non-success answer into an error, with MAS's own message.
fn classify(status: u16, body: &[u8]) -> MasError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(parsed) if !parsed.errors.is_empty() => parsed
            .errors
            .into_iter()
            .map(|e| e.title)
            .collect::<Vec<_>>()
            .join(": "),
        Ok(ErrorBody {
            error: Some(error),
            error_description,
            ..
        }) => match error_description {
            Some(description) => format!("{error}: {description}"),
            None => error,
        },
        _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    };
    if status >= 500 || status == 429 {
        MasError::Server { status, message }
    } else {
        MasError::Rejected { status, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_mas_own_words_and_tell_retry_from_refusal() {
        let refused = classify(
            409,
            br#"{"errors":[{"title":"User email \"a@b.c\" already in use"}]}"#,
        );
        assert_eq!(
            refused.to_string(),
            "MAS refused the request with 409: User email \"a@b.c\" already in use"
        );
        assert!(!refused.is_transient());
        let oauth = classify(
            401,
            br#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        );
        assert_eq!(oauth.status(), Some(401));
        assert!(oauth
            .to_string()
            .ends_with("invalid_client: Client authentication failed"));
        assert!(classify(503, b"upstream connect error").is_transient());
        assert!(classify(429, b"").is_transient());
        assert!(MasError::Credentials("x".into()).is_transient());
    }

    #[test]
    fn users_links_and_pages_are_read_from_the_json_api_envelope() {
        let user: Single<UserAttributes> = serde_json::from_str(
            r#"{"data":{"type":"user","id":"01J0000000000000000000000A","attributes":{
                "username":"alice","created_at":"2026-01-01T00:00:00Z","locked_at":"2026-01-02T00:00:00Z",
                "deactivated_at":null,"admin":true,"legacy_guest":false},
                "links":{"self":"/api/admin/v1/users/01J0000000000000000000000A"}},
                "links":{"self":"/api/admin/v1/users/by-username/alice"}}"#,
        )
        .unwrap();
        assert_eq!(
            MasUser::from(user.data),
            MasUser {
                id: "01J0000000000000000000000A".into(),
                username: "alice".into(),
                locked: true,
                deactivated: false,
                admin: true,
            }
        );
        let empty: Page<LinkAttributes> =
            serde_json::from_str(r#"{"meta":{"count":0},"links":{"self":"/x"}}"#).unwrap();
        assert!(empty.data.is_empty());
    }
}
