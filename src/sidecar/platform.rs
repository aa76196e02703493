//! Verification of the platform's JWTs: the one proof of who an end user is.
//!
//! Every rule is explicit: an algorithm allowlist (HS256 with a shared
//! secret, or RS256/ES256 keys from the platform's JWKS chosen by `kid`),
//! the configured issuer and audience, `exp`/`iss`/`aud`/`sub` required,
//! `nbf` honoured, a small leeway. Keys never come from the token itself
//! (`jku`, `x5u`, `jwk` headers are ignored).

use futures::future::{BoxFuture, FutureExt, Shared};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The largest platform token read, on every carrier (query, form, Bearer
/// header): a JWT of a few claims is well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a platform token was refused. The message is safe to show; it never
/// contains the token.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("no platform token was presented")]
    Missing,
    #[error("the platform token is malformed")]
    Malformed,
    #[error("the platform token is too large (over 16 KiB)")]
    TooLarge,
    #[error("the platform token's algorithm {0} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("the platform token names no key id (kid)")]
    MissingKeyId,
    #[error("the platform token's key id is unknown")]
    UnknownKey,
    #[error("the platform token has expired")]
    Expired,
    #[error("the platform token is not valid yet")]
    NotYetValid,
    #[error("the platform token's issuer is not the configured one")]
    WrongIssuer,
    #[error("the platform token's audience is not the configured one")]
    WrongAudience,
    #[error("the platform token's signature is invalid")]
    BadSignature,
    #[error("the platform token lacks the {0} claim")]
    MissingClaim(String),
    #[error("the platform token is invalid: {0}")]
    Invalid(String),
    #[error("the platform's signing keys could not be fetched: {0}")]
    KeysUnavailable(String),
}

impl PlatformError {
    /// Everything but an unreachable JWKS is the caller's fault (401).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, PlatformError::KeysUnavailable(_))
    }
}

/// Where the platform's verification keys come from.
#[derive(Clone, Debug)]
pub enum PlatformKeys {
    /// HS256 with a shared secret.
    SharedSecret(Vec<u8>),
    /// Asymmetric keys from the platform's JWKS document, chosen by `kid`.
    Jwks {
        url: String,
        algorithms: Vec<Algorithm>,
        /// A cached document is used this long before it is fetched again.
        refresh: Duration,
    },
}

/// How to check a platform token.
#[derive(Clone, Debug)]
pub struct PlatformSettings {
    pub issuer: String,
    pub audience: String,
    pub keys: PlatformKeys,
    /// The claim that names the tenant (a string or number).
    pub tenant_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
}

/// Who a valid platform token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformIdentity {
    pub subject: String,
    pub tenant: String,
    /// The token's own expiry (seconds since the epoch).
    pub expires_at: u64,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

struct CachedJwks {
    keys: JwkSet,
    fetched: Instant,
}

/// A fetch of the JWKS in flight, shared by every request waiting for it;
/// it yields the failure's text, or nothing (the document is in the cache).
type Fetch = Shared<BoxFuture<'static, Result<(), String>>>;

/// What is known of the platform's JWKS. Locked only briefly, never across
/// a fetch: requests that can be answered from the cache never wait.
#[derive(Default)]
struct JwksState {
    cached: Option<CachedJwks>,
    /// When the last fetch failed, and why.
    failed: Option<(Instant, String)>,
    in_flight: Option<Fetch>,
}

/// Verifies platform tokens; cheap to clone.
#[derive(Clone)]
pub struct PlatformVerifier {
    settings: Arc<PlatformSettings>,
    http: reqwest::Client,
    jwks: Arc<Mutex<JwksState>>,
}

/// An unknown `kid` fetches the JWKS again at most this often, so forged
/// tokens cannot turn the sidecar into a request amplifier.
const MIN_REFETCH: Duration = Duration::from_secs(10);

/// After a failed fetch the JWKS is not fetched again for this long:
/// requests that need it meanwhile fail at once (503), instead of each
/// waiting for a fetch of its own.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// How long one fetch of the JWKS may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl PlatformVerifier {
    pub fn new(settings: PlatformSettings) -> Self {
        Self::with_fetch_timeout(settings, FETCH_TIMEOUT)
    }

    pub fn with_fetch_timeout(settings: PlatformSettings, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .expect("HTTP client");
        PlatformVerifier {
            settings: Arc::new(settings),
            http,
            jwks: Arc::default(),
        }
    }

    pub fn settings(&self) -> &PlatformSettings {
        &self.settings
    }

    /// Checks a token and returns the identity it names.
    pub async fn verify(&self, token: &str) -> Result<PlatformIdentity, PlatformError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(PlatformError::TooLarge);
        }
        let header = decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => {
                PlatformError::AlgorithmNotAllowed("(unsupported)".into())
            }
            _ => PlatformError::Malformed,
        })?;
        let key = match &self.settings.keys {
            PlatformKeys::SharedSecret(secret) => {
                if header.alg != Algorithm::HS256 {
                    return Err(PlatformError::AlgorithmNotAllowed(format!(
                        "{:?}",
                        header.alg
                    )));
                }
                DecodingKey::from_secret(secret)
            }
            PlatformKeys::Jwks { algorithms, .. } => {
                if !algorithms.contains(&header.alg) {
                    return Err(PlatformError::AlgorithmNotAllowed(format!(
                        "{:?}",
                        header.alg
                    )));
                }
                let kid = header.kid.as_deref().ok_or(PlatformError::MissingKeyId)?;
                self.jwks_key(kid, header.alg).await?
            }
        };
        check_with_key(&self.settings, token, header.alg, &key)
    }

    /// The key for `kid`, from the cache or a fresh fetch of the JWKS.
    ///
    /// One fetch at a time (single flight): concurrent requests that need
    /// it wait for the same one, so an unreachable JWKS costs them one
    /// timeout together, not one each in turn. A failed fetch is not
    /// retried for [`RETRY_AFTER_FAILURE`]. A cached document that names
    /// the `kid` answers at once, even when due for a refresh (which then
    /// runs in the background); a stale document still verifies while the
    /// platform is down.
    async fn jwks_key(&self, kid: &str, alg: Algorithm) -> Result<DecodingKey, PlatformError> {
        let PlatformKeys::Jwks { url, refresh, .. } = &self.settings.keys else {
            unreachable!("only called for JWKS settings");
        };
        let wait = {
            let mut state = self.jwks.lock().expect("jwks lock");
            let recently_failed = state
                .failed
                .as_ref()
                .filter(|(at, _)| at.elapsed() < RETRY_AFTER_FAILURE)
                .map(|(_, why)| why.clone());
            let known = state
                .cached
                .as_ref()
                .is_some_and(|c| c.keys.find(kid).is_some());
            let stale = state
                .cached
                .as_ref()
                .is_none_or(|c| c.fetched.elapsed() > *refresh);
            if known {
                if stale && recently_failed.is_none() {
                    // Refreshed in the background; this request goes on.
                    drop(self.fetch(&mut state, url));
                }
                None
            } else if state
                .cached
                .as_ref()
                .is_some_and(|c| c.fetched.elapsed() <= MIN_REFETCH)
            {
                return Err(PlatformError::UnknownKey);
            } else if let Some(why) = recently_failed {
                return Err(if state.cached.is_some() {
                    PlatformError::UnknownKey
                } else {
                    PlatformError::KeysUnavailable(why)
                });
            } else {
                Some(self.fetch(&mut state, url))
            }
        };
        if let Some(fetch) = wait {
            if let Err(why) = fetch.await {
                if self.jwks.lock().expect("jwks lock").cached.is_none() {
                    return Err(PlatformError::KeysUnavailable(why));
                }
            }
        }
        let state = self.jwks.lock().expect("jwks lock");
        let jwk = state
            .cached
            .as_ref()
            .and_then(|c| c.keys.find(kid))
            .ok_or(PlatformError::UnknownKey)?;
        // A key published for one algorithm never verifies another.
        if let Some(key_alg) = jwk.common.key_algorithm {
            if key_alg.to_string() != format!("{alg:?}") {
                return Err(PlatformError::AlgorithmNotAllowed(format!("{alg:?}")));
            }
        }
        DecodingKey::from_jwk(jwk).map_err(|e| PlatformError::Invalid(e.to_string()))
    }

    /// The fetch in flight, or a new one. The fetch runs as a task of its
    /// own and records its outcome, whether or not anyone still waits.
    fn fetch(&self, state: &mut JwksState, url: &str) -> Fetch {
        if let Some(fetch) = &state.in_flight {
            return fetch.clone();
        }
        let (this, url) = (self.clone(), url.to_string());
        let task = tokio::spawn(async move {
            let outcome = this.fetch_jwks(&url).await;
            let mut state = this.jwks.lock().expect("jwks lock");
            state.in_flight = None;
            match outcome {
                Ok(keys) => {
                    state.cached = Some(CachedJwks {
                        keys,
                        fetched: Instant::now(),
                    });
                    state.failed = None;
                    Ok(())
                }
                Err(e) => {
                    let why = e.to_string();
                    tracing::warn!(
                        error = %super::untrusted(&why),
                        cached = state.cached.is_some(),
                        "the platform JWKS could not be fetched"
                    );
                    state.failed = Some((Instant::now(), why.clone()));
                    Err(why)
                }
            }
        });
        let jwks = self.jwks.clone();
        let fetch = async move {
            task.await.unwrap_or_else(|e| {
                let mut state = jwks.lock().expect("jwks lock");
                state.in_flight = None;
                let why = format!("the JWKS fetch failed: {e}");
                state.failed = Some((Instant::now(), why.clone()));
                Err(why)
            })
        }
        .boxed()
        .shared();
        state.in_flight = Some(fetch.clone());
        fetch
    }

    async fn fetch_jwks(&self, url: &str) -> Result<JwkSet, PlatformError> {
        let response = self
            .http
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| PlatformError::KeysUnavailable(e.without_url().to_string()))?;
        response
            .json::<JwkSet>()
            .await
            .map_err(|e| PlatformError::KeysUnavailable(e.without_url().to_string()))
    }
}

/// The pure part of verification: signature and claims against one key.
pub fn check_with_key(
    settings: &PlatformSettings,
    token: &str,
    alg: Algorithm,
    key: &DecodingKey,
) -> Result<PlatformIdentity, PlatformError> {
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[&settings.issuer]);
    validation.set_audience(&[&settings.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = settings.leeway_seconds;
    let data = decode::<RawClaims>(token, key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => PlatformError::Expired,
            K::ImmatureSignature => PlatformError::NotYetValid,
            K::InvalidIssuer => PlatformError::WrongIssuer,
            K::InvalidAudience => PlatformError::WrongAudience,
            K::InvalidSignature => PlatformError::BadSignature,
            K::MissingRequiredClaim(c) => PlatformError::MissingClaim(c.clone()),
            K::InvalidAlgorithm => PlatformError::AlgorithmNotAllowed(format!("{alg:?}")),
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => PlatformError::Malformed,
            other => PlatformError::Invalid(format!("{other:?}")),
        }
    })?;
    let claims = data.claims;
    if claims.sub.is_empty() {
        return Err(PlatformError::MissingClaim("sub".into()));
    }
    let tenant = match claims.rest.get(&settings.tenant_claim) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(PlatformError::MissingClaim(settings.tenant_claim.clone())),
    };
    Ok(PlatformIdentity {
        subject: claims.sub,
        tenant,
        expires_at: claims.exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"platform-shared-secret-of-enough-length";

    fn settings() -> PlatformSettings {
        PlatformSettings {
            issuer: "https://platform.test".into(),
            audience: "openmeet-matrix".into(),
            keys: PlatformKeys::SharedSecret(SECRET.to_vec()),
            tenant_claim: "tenant".into(),
            leeway_seconds: 5,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": "https://platform.test", "aud": "openmeet-matrix", "sub": "user-1",
               "tenant": "acme", "exp": now() + 300, "iat": now()})
    }

    fn hs256(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn check(token: &str) -> Result<PlatformIdentity, PlatformError> {
        let header = decode_header(token).map_err(|_| PlatformError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(PlatformError::AlgorithmNotAllowed(format!(
                "{:?}",
                header.alg
            )));
        }
        check_with_key(
            &settings(),
            token,
            header.alg,
            &DecodingKey::from_secret(SECRET),
        )
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// A JWKS URL whose server accepts connections and never answers.
    async fn hung_jwks() -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        (url, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_jwks_is_waited_for_once_then_fails_fast() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, hole) = hung_jwks().await;
        let timeout = Duration::from_secs(1);
        let verifier = PlatformVerifier::with_fetch_timeout(
            PlatformSettings {
                keys: PlatformKeys::Jwks {
                    url,
                    algorithms: vec![Algorithm::ES256],
                    refresh: Duration::from_secs(300),
                },
                ..settings()
            },
            timeout,
        );
        // Only the header matters: the key is looked up before the signature.
        let token = format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "ES256", "kid": "k1"})),
            b64(&claims())
        );
        let started = Instant::now();
        let outcomes = futures::future::join_all((0..10).map(|_| verifier.verify(&token))).await;
        for outcome in outcomes {
            assert!(
                matches!(outcome, Err(PlatformError::KeysUnavailable(_))),
                "{outcome:?}"
            );
        }
        assert!(
            started.elapsed() < timeout * 2,
            "10 concurrent verifications took {:?}: they waited in turn",
            started.elapsed()
        );
        // Within the negative-cache window: no new fetch, an answer at once.
        let started = Instant::now();
        assert!(matches!(
            verifier.verify(&token).await,
            Err(PlatformError::KeysUnavailable(_))
        ));
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        hole.abort();
    }

    #[tokio::test]
    async fn oversized_tokens_are_refused_unread() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let verifier = PlatformVerifier::new(settings());
        let mut c = claims();
        c["pad"] = json!("a".repeat(MAX_TOKEN_BYTES));
        assert!(matches!(
            verifier.verify(&hs256(&c)).await,
            Err(PlatformError::TooLarge)
        ));
        assert!(verifier.verify(&hs256(&claims())).await.is_ok());
    }

    #[test]
    fn accepts_a_valid_token() {
        let id = check(&hs256(&claims())).unwrap();
        assert_eq!(id.subject, "user-1");
        assert_eq!(id.tenant, "acme");
    }

    #[test]
    fn numeric_tenants_are_read_as_text() {
        let mut c = claims();
        c["tenant"] = json!(42);
        assert_eq!(check(&hs256(&c)).unwrap().tenant, "42");
    }

    #[test]
    fn refuses_wrong_issuer_audience_and_expiry() {
        let mut c = claims();
        c["iss"] = json!("https://evil.test");
        assert!(matches!(check(&hs256(&c)), Err(PlatformError::WrongIssuer)));
        let mut c = claims();
        c["aud"] = json!("someone-else");
        assert!(matches!(
            check(&hs256(&c)),
            Err(PlatformError::WrongAudience)
        ));
        let mut c = claims();
        c["exp"] = json!(now() - 60);
        assert!(matches!(check(&hs256(&c)), Err(PlatformError::Expired)));
        let mut c = claims();
        c["nbf"] = json!(now() + 120);
        assert!(matches!(check(&hs256(&c)), Err(PlatformError::NotYetValid)));
    }

    #[test]
    fn leeway_is_small_but_real() {
        let mut c = claims();
        c["exp"] = json!(now() - 2);
        assert!(check(&hs256(&c)).is_ok());
    }

    #[test]
    fn refuses_missing_claims() {
        for claim in ["exp", "sub", "iss", "aud", "tenant"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(claim);
            assert!(check(&hs256(&c)).is_err(), "{claim} must be required");
        }
        let mut c = claims();
        c["sub"] = json!("");
        assert!(check(&hs256(&c)).is_err());
    }

    #[test]
    fn a_wrongly_typed_exp_is_not_treated_as_absent() {
        let mut c = claims();
        c["exp"] = json!("never");
        assert!(check(&hs256(&c)).is_err());
    }

    #[test]
    fn refuses_alg_none_and_tampering() {
        let unsigned = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&claims())
        );
        assert!(check(&unsigned).is_err());
        let token = hs256(&claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("admin");
        let forged = b64(&forged);
        parts[1] = &forged;
        assert!(matches!(
            check(&parts.join(".")),
            Err(PlatformError::BadSignature)
        ));
        let other_secret = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another-secret"),
        )
        .unwrap();
        assert!(matches!(
            check(&other_secret),
            Err(PlatformError::BadSignature)
        ));
    }
}
