//! The handle API: whether a localpart is free for a new account, decided
//! by the controller's own rules ([`crate::controller::user::handle`]) over
//! the sidecar's watch cache of `MatrixUser`s and Synapse's admin API. Any
//! signed-in platform user may ask, for any handle; the answer never says
//! who holds one (no tenant, namespace, object or user id).

use super::directory::Directory;
use super::platform::{PlatformIdentity, PlatformVerifier};
use super::{bearer, ApiError};
use crate::controller::user::handle::{self, Availability};
use crate::synapse::SynapseClient;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct HandleSettings {
    /// The controller's reserved list: its built-ins for the configured
    /// admin and sender localparts, plus the configured extras.
    pub reserved: BTreeSet<String>,
    /// Checks per caller per minute, and the burst allowed.
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

pub struct HandleService {
    directory: Directory,
    platform: PlatformVerifier,
    synapse: SynapseClient,
    reserved: BTreeSet<String>,
    limiter: DefaultKeyedRateLimiter<String>,
}

/// The answer: a status, and for `invalid` the grammar rule broken.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct HandleAnswer {
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

impl From<Availability> for HandleAnswer {
    fn from(a: Availability) -> Self {
        HandleAnswer {
            status: a.code(),
            reason: match a {
                Availability::Invalid(rule) => Some(rule.code()),
                _ => None,
            },
        }
    }
}

/// The identity behind a platform token presented as a Bearer token.
pub async fn authenticate(
    platform: &PlatformVerifier,
    token: Option<String>,
) -> Result<PlatformIdentity, ApiError> {
    let token = token.ok_or_else(|| {
        ApiError::new(
            401,
            "missing_token",
            "a platform token is required as a Bearer token",
        )
    })?;
    platform.verify(&token).await.map_err(|e| {
        if e.is_unavailable() {
            ApiError::new(503, "platform_keys_unavailable", e.to_string())
        } else {
            ApiError::new(401, "invalid_token", e.to_string())
        }
    })
}

/// 429 with `Retry-After` when `key` has used its quota.
pub fn limit(limiter: &DefaultKeyedRateLimiter<String>, key: &str) -> Result<(), ApiError> {
    limiter.check_key(&key.to_string()).map_err(|not_until| {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        ApiError::new(429, "rate_limited", "too many requests").retry_after(wait.as_secs().max(1))
    })
}

impl HandleService {
    pub fn new(
        directory: Directory,
        platform: PlatformVerifier,
        synapse: SynapseClient,
        settings: HandleSettings,
    ) -> Self {
        let quota = Quota::per_minute(settings.per_minute).allow_burst(settings.burst);
        HandleService {
            directory,
            platform,
            synapse,
            reserved: settings.reserved,
            limiter: RateLimiter::keyed(quota),
        }
    }

    /// Whether `localpart` is free, for the bearer of a platform token.
    pub async fn check(
        &self,
        platform_token: Option<String>,
        localpart: &str,
    ) -> Result<HandleAnswer, ApiError> {
        let caller = authenticate(&self.platform, platform_token).await?;
        limit(
            &self.limiter,
            &format!("{}\u{0}{}", caller.tenant, caller.subject),
        )?;
        self.availability(localpart).await.map(HandleAnswer::from)
    }

    /// The controller's verdict for a newcomer claiming `localpart`.
    pub async fn availability(&self, localpart: &str) -> Result<Availability, ApiError> {
        if !self.directory.is_ready() {
            return Err(ApiError::new(
                503,
                "directory_loading",
                "the account directory is still loading",
            ));
        }
        let users = self.directory.claimants(localpart);
        if let Some(answer) =
            handle::precheck(localpart, &self.reserved, users.iter().map(|u| u.as_ref()))
        {
            return Ok(answer);
        }
        // Valid by the grammar, so only the full id's length can fail
        // (Matrix caps `@localpart:server` at 255 bytes).
        let Ok(user_id) = self.synapse.user_id(localpart) else {
            return Ok(Availability::Invalid(
                crate::api::user::LocalpartRule::Length,
            ));
        };
        let observed = self.synapse.get_user(&user_id).await.map_err(|e| {
            tracing::warn!(error = %e, "handles: Synapse call failed");
            super::homeserver_failure(e.is_transient(), "the homeserver refused the lookup")
        })?;
        Ok(handle::with_account(localpart, observed.as_ref()))
    }

    /// Forgets idle callers' rate-limit state.
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
    }
}

async fn check_handler(
    State(service): State<Arc<HandleService>>,
    Path(localpart): Path<String>,
    headers: HeaderMap,
) -> Response {
    // The answer changes as soon as someone claims the handle: never cached.
    super::api_answer(service.check(bearer(&headers), &localpart).await, "handles")
}

/// `GET /api/v1/handles/{localpart}` (a `/` in the localpart is sent as `%2F`).
pub fn router(service: Arc<HandleService>) -> Router {
    Router::new()
        .route("/api/v1/handles/{localpart}", get(check_handler))
        .with_state(service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::user::LocalpartRule;

    #[test]
    fn answers_carry_a_status_and_for_invalid_the_rule() {
        let json = |a: Availability| serde_json::to_value(HandleAnswer::from(a)).unwrap();
        assert_eq!(
            json(Availability::Taken),
            serde_json::json!({"status": "taken"})
        );
        assert_eq!(
            json(Availability::Available),
            serde_json::json!({"status": "available"})
        );
        assert_eq!(
            json(Availability::Reserved),
            serde_json::json!({"status": "reserved"})
        );
        assert_eq!(
            json(Availability::Invalid(LocalpartRule::LeadingUnderscore)),
            serde_json::json!({"status": "invalid", "reason": "leading_underscore"})
        );
    }

    #[test]
    fn the_limit_answers_429_with_retry_after() {
        let limiter = RateLimiter::keyed(
            Quota::per_minute(NonZeroU32::new(1).unwrap()).allow_burst(NonZeroU32::new(2).unwrap()),
        );
        assert!(limit(&limiter, "a").is_ok());
        assert!(limit(&limiter, "a").is_ok());
        let refused = limit(&limiter, "a").unwrap_err();
        assert_eq!((refused.status, refused.code), (429, "rate_limited"));
        assert!(refused.retry_after.unwrap() >= 1);
        assert!(limit(&limiter, "b").is_ok(), "per caller");
    }
}
