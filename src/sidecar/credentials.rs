//! The credential API: a platform JWT in, a short-lived Matrix access token
//! for that user's own account out. Tokens are minted with Synapse's
//! login-as-user (always with `valid_until_ms`), or in MAS mode as MAS
//! personal sessions (with an expiry and a device of their own, listed in
//! the user's sessions), reused until close to expiry, and ended as soon as
//! the account stops being usable.

use super::directory::{Account, Directory, LookupError};
use super::platform::{PlatformError, PlatformVerifier};
use super::{bearer, untrusted, ApiError};
use crate::synapse::{SynapseClient, SynapseError};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct CredentialSettings {
    /// Lifetime of a minted token.
    pub token_lifetime: Duration,
    /// A cached token with less than this left is replaced by a new one.
    pub renew_before: Duration,
    /// Calls per user per minute, and the burst allowed.
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for CredentialSettings {
    fn default() -> Self {
        CredentialSettings {
            token_lifetime: Duration::from_secs(3600),
            renew_before: Duration::from_secs(600),
            per_minute: NonZeroU32::new(30).expect("non-zero"),
            burst: NonZeroU32::new(10).expect("non-zero"),
        }
    }
}

struct Minted {
    account: Account,
    access_token: String,
    expires_at: SystemTime,
    /// MAS mode: the personal session and its device, ended to revoke it.
    session: Option<Session>,
}

#[derive(Clone)]
struct Session {
    id: String,
    device_id: String,
}

pub struct CredentialService {
    pub homeserver_url: String,
    directory: Directory,
    platform: PlatformVerifier,
    synapse: SynapseClient,
    settings: CredentialSettings,
    limiter: DefaultKeyedRateLimiter<String>,
    /// One live token per account object (`namespace/name`).
    cache: Mutex<HashMap<String, Minted>>,
    /// Tokens of unusable accounts not logged out yet: a locked account
    /// cannot log out, so its tokens are retried until the lock lifts (or
    /// they expire).
    pending_logout: Mutex<Vec<Minted>>,
    /// Serialises minting per account, so concurrent calls share one token.
    minting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Serialize)]
pub struct Credentials {
    pub homeserver_url: String,
    pub user_id: String,
    pub access_token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub expires_in: u64,
}

impl CredentialService {
    pub fn new(
        homeserver_url: String,
        directory: Directory,
        platform: PlatformVerifier,
        synapse: SynapseClient,
        settings: CredentialSettings,
    ) -> Self {
        let quota = Quota::per_minute(settings.per_minute).allow_burst(settings.burst);
        CredentialService {
            homeserver_url,
            directory,
            platform,
            synapse,
            settings,
            limiter: RateLimiter::keyed(quota),
            cache: Mutex::default(),
            pending_logout: Mutex::default(),
            minting: Mutex::default(),
        }
    }

    /// Credentials for the bearer of a platform token.
    pub async fn credentials(
        &self,
        platform_token: Option<String>,
    ) -> Result<Credentials, ApiError> {
        let token = platform_token.ok_or_else(|| {
            ApiError::new(
                401,
                "missing_token",
                "a platform token is required as a Bearer token",
            )
        })?;
        let identity = self.platform.verify(&token).await.map_err(|e| {
            if e.is_unavailable() {
                ApiError::new(503, "platform_keys_unavailable", e.to_string())
            } else if matches!(e, PlatformError::TooLarge) {
                ApiError::new(413, "token_too_large", e.to_string())
            } else {
                ApiError::new(401, "invalid_token", e.to_string())
            }
        })?;
        let limit_key = format!("{}\u{0}{}", identity.tenant, identity.subject);
        if let Err(not_until) = self.limiter.check_key(&limit_key) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(
                ApiError::new(429, "rate_limited", "too many credential requests")
                    .retry_after(wait.as_secs().max(1)),
            );
        }
        let account = self
            .directory
            .lookup(&identity.tenant, &identity.subject)
            .map_err(lookup_error)?;
        self.token_for(&account).await
    }

    async fn token_for(&self, account: &Account) -> Result<Credentials, ApiError> {
        let key = account.object_key();
        let lock = self
            .minting
            .lock()
            .expect("minting lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        let now = SystemTime::now();
        if let Some(live) = self.cache.lock().expect("cache lock").get(&key) {
            if live.account.uid == account.uid
                && live.account.user_id == account.user_id
                && live.expires_at > now + self.settings.renew_before
            {
                return Ok(self.answer(&live.account.user_id, &live.access_token, live.expires_at));
            }
        }
        let expires_at = now + self.settings.token_lifetime;
        let valid_until_ms = expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let user_id = self
            .synapse
            .user_id(&account.localpart)
            .map_err(synapse_error)?;
        let (access_token, session) = match self.synapse.mas() {
            Some(mas) => {
                // A personal session in MAS, with a device of its own so
                // that revoking it ends the token in Synapse at once.
                let user = mas
                    .user_by_username(&account.localpart)
                    .await
                    .map_err(mas_error)?
                    .ok_or_else(|| {
                        ApiError::new(409, "user_not_ready", "the account is not in MAS yet")
                    })?;
                let device_id = device_id();
                let minted = mas
                    .personal_session(
                        &user.id,
                        "OpenMeet credential API",
                        &device_id,
                        self.settings.token_lifetime,
                    )
                    .await
                    .map_err(mas_error)?;
                let session = Session {
                    id: minted.session_id,
                    device_id,
                };
                (minted.access_token, Some(session))
            }
            None => {
                let token = self
                    .synapse
                    .login_as(&user_id, valid_until_ms)
                    .await
                    .map_err(synapse_error)?;
                (token, None)
            }
        };
        tracing::info!(user = %account.user_id, object = %key, "credentials: token minted");
        let answer = self.answer(&account.user_id, &access_token, expires_at);
        let replaced = self.cache.lock().expect("cache lock").insert(
            key,
            Minted {
                account: account.clone(),
                access_token,
                expires_at,
                session,
            },
        );
        // The token it replaces is close to expiry; end it now rather than
        // leave two live tokens per user.
        if let Some(old) = replaced {
            if old.expires_at > now {
                let synapse = self.synapse.clone();
                tokio::spawn(async move {
                    let _ = end(&synapse, &old).await;
                });
            }
        }
        Ok(answer)
    }

    fn answer(&self, user_id: &str, token: &str, expires_at: SystemTime) -> Credentials {
        let secs = expires_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let expires_in = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .as_secs();
        Credentials {
            homeserver_url: self.homeserver_url.clone(),
            user_id: user_id.to_string(),
            access_token: token.to_string(),
            expires_at: k8s_openapi::jiff::Timestamp::from_second(secs)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            expires_in,
        }
    }

    /// Moves the cached token of `key` to the logout queue, if its account
    /// is the one that changed.
    fn retire(&self, key: &str, uid: &str) {
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.get(key).is_some_and(|m| m.account.uid == uid) {
            if let Some(m) = cache.remove(key) {
                self.pending_logout.lock().expect("pending lock").push(m);
            }
        }
    }

    /// Queues cached tokens whose account is no longer usable (locked,
    /// deactivated, deleted, replaced), forgets expired ones, and logs out
    /// the queue. Returns how many were logged out.
    pub async fn revoke_unusable(&self) -> usize {
        let now = SystemTime::now();
        let work: Vec<Minted> = {
            let mut cache = self.cache.lock().expect("cache lock");
            cache.retain(|_, m| m.expires_at > now);
            let dead: Vec<String> = cache
                .iter()
                .filter(|(_, m)| self.directory.is_withdrawn(&m.account) == Some(true))
                .map(|(k, _)| k.clone())
                .collect();
            let mut pending = self.pending_logout.lock().expect("pending lock");
            pending.extend(dead.into_iter().filter_map(|k| cache.remove(&k)));
            // Minting locks of accounts with no live token and no caller waiting.
            self.minting
                .lock()
                .expect("minting lock")
                .retain(|k, lock| Arc::strong_count(lock) > 1 || cache.contains_key(k));
            pending.retain(|m| m.expires_at > now);
            std::mem::take(&mut *pending)
        };
        let mut revoked = 0;
        let mut retry = Vec::new();
        for minted in work {
            match end(&self.synapse, &minted).await {
                Ok(()) => {
                    revoked += 1;
                    tracing::info!(
                        user = %minted.account.user_id, object = %minted.account.object_key(),
                        "credentials: token revoked (account no longer usable)"
                    );
                }
                Err(e) => {
                    tracing::debug!(
                        user = %minted.account.user_id, error = %untrusted(&e),
                        "credentials: token not revoked yet; retrying"
                    );
                    retry.push(minted);
                }
            }
        }
        self.pending_logout
            .lock()
            .expect("pending lock")
            .extend(retry);
        revoked
    }

    /// Revokes at once on every change that makes an account unusable (each
    /// version the watch delivers, so a lock lifted a moment later still
    /// ends the tokens), and sweeps every `interval` as a safety net.
    pub async fn revoke_loop(self: Arc<Self>, interval: Duration) {
        let mut changes = self.directory.subscribe();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(c) if !c.usable => self.retire(&c.key, &c.uid),
                    Ok(_) => continue,
                    // Missed changes: the sweep below catches up.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => self.limiter.retain_recent(),
            }
            self.revoke_unusable().await;
        }
    }
}

/// Ends a minted token: a logout in Synapse mode; in MAS mode the
/// personal session is revoked and its device deleted (Synapse caches
/// MAS's answer about a token, but checks its device on every request).
async fn end(synapse: &SynapseClient, minted: &Minted) -> Result<(), String> {
    match (synapse.mas(), &minted.session) {
        (Some(mas), Some(session)) => {
            mas.end_session(crate::mas::SessionKind::Personal, &session.id)
                .await
                .map_err(|e| e.to_string())?;
            let user_id = synapse
                .user_id(&minted.account.localpart)
                .map_err(|e| e.to_string())?;
            synapse
                .delete_devices(&user_id, std::slice::from_ref(&session.device_id))
                .await
                .map_err(|e| e.to_string())
        }
        _ => synapse
            .logout_token(&minted.access_token)
            .await
            .map_err(|e| e.to_string()),
    }
}

/// A fresh device id for a personal session (Matrix device ids are opaque).
fn device_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let tail: String = (0..10)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("OPENMEET{tail}")
}

fn mas_error(e: crate::mas::MasError) -> ApiError {
    tracing::warn!(error = %untrusted(&e), "credentials: MAS call failed");
    super::homeserver_failure(e.is_transient(), "the homeserver refused to issue a token")
}

fn lookup_error(e: LookupError) -> ApiError {
    let message = e.to_string();
    if super::pending::is_pending(&e) {
        // Being prepared (or about to be declared): ask again shortly.
        return ApiError::new(
            202,
            "account_pending",
            format!(
                "the Matrix account is being prepared ({message}); ask again after Retry-After"
            ),
        )
        .retry_after(super::pending::RETRY_AFTER_SECONDS);
    }
    match e {
        LookupError::UnknownTenant(_) => ApiError::new(404, "unknown_tenant", message),
        LookupError::UserNotFound => ApiError::new(404, "user_not_found", message),
        LookupError::Deleted => ApiError::new(404, "user_deleted", message),
        LookupError::NotReady(_) => ApiError::new(409, "user_not_ready", message),
        LookupError::Locked => ApiError::new(403, "user_locked", message),
        LookupError::Deactivated => ApiError::new(403, "user_deactivated", message),
        LookupError::Loading => ApiError::new(503, "directory_loading", message),
    }
}

fn synapse_error(e: SynapseError) -> ApiError {
    tracing::warn!(error = %untrusted(&e), "credentials: Synapse call failed");
    super::homeserver_failure(e.is_transient(), "the homeserver refused to issue a token")
}

pub async fn handler(
    State(service): State<Arc<CredentialService>>,
    headers: HeaderMap,
) -> Response {
    super::api_answer(service.credentials(bearer(&headers)).await, "credentials")
}
