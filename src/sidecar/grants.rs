//! Authorization codes and OIDC access tokens that any replica can check.
//!
//! Both are sealed: encrypted and authenticated (AES-256-GCM, a random
//! 96-bit nonce each) with a key derived from the private signing key, so a
//! code in a browser's address bar or a token in a log reveals nothing (no
//! namespace, uid, email, name, subject or tenant) to anyone but a sidecar.
//! Only sidecars hold the keys, every replica holds them (a mounted
//! Secret), and a retired key keeps opening what it sealed while it is
//! published. A code is redeemed once across all replicas: the first
//! redemption creates a Lease named after the code in the API server, and a
//! second finds it (and marks it revoked, which ends the access tokens that
//! code produced). Without a state namespace (one replica, development) the
//! same record is kept in memory.

use super::directory::Account;
use super::keys::{KeySet, SigningKey};
use base64::Engine;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CODE_TYPE: &str = "om-code";
const ACCESS_TYPE: &str = "om-access";
const WAIT_TYPE: &str = "om-wait";
/// The first byte of every sealed value: its format.
const FORMAT: u8 = 1;
/// Longer values are refused unread (a sealed code is well under 1 KiB).
const MAX_SEALED: usize = 8 * 1024;
/// Label on every redemption Lease, for the cleanup.
pub const REDEMPTION_LABEL: &str = "matrix.openmeet.net/oidc-code";
const REVOKED_ANNOTATION: &str = "matrix.openmeet.net/revoked";

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("not a valid code or token")]
    Invalid,
    #[error("expired")]
    Expired,
    #[error("the redemption record is unavailable: {0}")]
    Store(#[from] kube::Error),
}

/// What a code carries: everything `/token` needs, bound to one client,
/// one redirect URI and one PKCE challenge.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CodeClaims {
    pub jti: String,
    pub exp: u64,
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    pub account: Account,
}

/// What an OIDC access token carries (for `/userinfo`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The code it came from: revoked with it.
    pub jti: String,
    pub exp: u64,
    pub account: Account,
}

/// What a first login's wait carries from one look to the next, in a
/// cookie: the identity the platform's token proved, never the token.
/// Single-use: each look redeems its `jti` and a further wait gets a new one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaitClaims {
    pub jti: String,
    pub exp: u64,
    pub subject: String,
    pub tenant: String,
}

/// The AEAD key of one purpose, derived from a signing key's secret seed.
fn sealing_key(key: &SigningKey, purpose: &str) -> LessSafeKey {
    let mut h = Sha256::new();
    h.update(b"openmeet-matrix-operator/oidc-seal/");
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(key.seed);
    let bytes = h.finalize();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 256-bit key"))
}

/// What the ciphertext is bound to besides its key: format and purpose.
fn associated_data(purpose: &str) -> Vec<u8> {
    let mut aad = vec![FORMAT];
    aad.extend_from_slice(purpose.as_bytes());
    aad
}

/// `base64url(FORMAT || nonce || AES-256-GCM(claims JSON) || tag)`, with the
/// active key.
fn seal<T: Serialize>(keys: &KeySet, purpose: &str, claims: &T) -> String {
    let mut sealed = serde_json::to_vec(claims).expect("claims serialize");
    let nonce: [u8; NONCE_LEN] = rand::random();
    sealing_key(&keys.active, purpose)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(purpose)),
            &mut sealed,
        )
        .expect("AES-GCM sealing cannot fail for short inputs");
    let mut out = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
    out.push(FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
}

/// Sealed claims with an expiry (seconds since the epoch).
trait Expiring {
    fn exp(&self) -> u64;
}

impl Expiring for CodeClaims {
    fn exp(&self) -> u64 {
        self.exp
    }
}

impl Expiring for AccessClaims {
    fn exp(&self) -> u64 {
        self.exp
    }
}

impl Expiring for WaitClaims {
    fn exp(&self) -> u64 {
        self.exp
    }
}

fn open<T: DeserializeOwned + Expiring>(
    keys: &KeySet,
    purpose: &str,
    sealed: &str,
) -> Result<T, GrantError> {
    if sealed.len() > MAX_SEALED {
        return Err(GrantError::Invalid);
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sealed)
        .map_err(|_| GrantError::Invalid)?;
    let Some((&FORMAT, rest)) = bytes.split_first() else {
        return Err(GrantError::Invalid);
    };
    if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(GrantError::Invalid);
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| GrantError::Invalid)?;
    // No key id travels with the value: the active key first, then every
    // other published one (a handful at most, during a rotation).
    let candidates =
        std::iter::once(&keys.active).chain(keys.all.iter().filter(|k| k.kid != keys.active.kid));
    let claims = candidates
        .filter_map(|key| {
            let mut buffer = ciphertext.to_vec();
            let plain = sealing_key(key, purpose)
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(associated_data(purpose)),
                    &mut buffer,
                )
                .ok()?;
            Some(serde_json::from_slice::<T>(plain))
        })
        .next()
        .ok_or(GrantError::Invalid)?
        .map_err(|_| GrantError::Invalid)?;
    // Expired at `exp` itself, not a second later.
    if claims.exp() <= epoch(SystemTime::now()) {
        return Err(GrantError::Expired);
    }
    Ok(claims)
}

pub fn seal_code(keys: &KeySet, claims: &CodeClaims) -> String {
    seal(keys, CODE_TYPE, claims)
}

pub fn open_code(keys: &KeySet, code: &str) -> Result<CodeClaims, GrantError> {
    open(keys, CODE_TYPE, code)
}

pub fn seal_access(keys: &KeySet, claims: &AccessClaims) -> String {
    seal(keys, ACCESS_TYPE, claims)
}

pub fn open_access(keys: &KeySet, token: &str) -> Result<AccessClaims, GrantError> {
    open(keys, ACCESS_TYPE, token)
}

pub fn seal_wait(keys: &KeySet, claims: &WaitClaims) -> String {
    seal(keys, WAIT_TYPE, claims)
}

pub fn open_wait(keys: &KeySet, ticket: &str) -> Result<WaitClaims, GrantError> {
    open(keys, WAIT_TYPE, ticket)
}

/// A fresh code id: 128 random bits, lower-case hex (a valid object name).
pub fn new_jti() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Whether this presentation of a code is its first.
#[derive(Debug, PartialEq, Eq)]
pub enum Redemption {
    First,
    Replay,
}

/// The record of redeemed codes.
pub enum Redemptions {
    /// One replica: in memory (jti → (expiry, revoked)).
    Memory(Mutex<HashMap<String, (SystemTime, bool)>>),
    /// Every replica: Leases in this namespace.
    Leases {
        api: Box<Api<Lease>>,
        identity: String,
    },
}

impl Redemptions {
    pub fn memory() -> Self {
        Redemptions::Memory(Mutex::default())
    }

    fn lease_name(jti: &str) -> String {
        format!("oidc-code-{jti}")
    }

    /// Records a redemption of `jti`; a second one marks it revoked.
    pub async fn redeem(&self, jti: &str, keep: Duration) -> Result<Redemption, GrantError> {
        match self {
            Redemptions::Memory(map) => {
                let now = SystemTime::now();
                let mut map = map.lock().expect("redemptions lock");
                map.retain(|_, (until, _)| *until > now);
                match map.get_mut(jti) {
                    Some(entry) => {
                        entry.1 = true;
                        Ok(Redemption::Replay)
                    }
                    None => {
                        map.insert(jti.to_string(), (now + keep, false));
                        Ok(Redemption::First)
                    }
                }
            }
            Redemptions::Leases { api, identity } => {
                let now = k8s_openapi::jiff::Timestamp::now();
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(Self::lease_name(jti)),
                        labels: Some(BTreeMap::from([(
                            REDEMPTION_LABEL.to_string(),
                            "true".to_string(),
                        )])),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(identity.clone()),
                        lease_duration_seconds: Some(keep.as_secs().max(1) as i32),
                        acquire_time: Some(MicroTime(now)),
                        ..Default::default()
                    }),
                };
                match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Redemption::First),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        let patch = serde_json::json!({
                            "metadata": {"annotations": {REVOKED_ANNOTATION: "true"}}
                        });
                        api.patch(
                            &Self::lease_name(jti),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await?;
                        Ok(Redemption::Replay)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Whether the code `jti` was replayed (its tokens are revoked).
    pub async fn is_revoked(&self, jti: &str) -> Result<bool, GrantError> {
        match self {
            Redemptions::Memory(map) => Ok(map
                .lock()
                .expect("redemptions lock")
                .get(jti)
                .is_some_and(|(_, revoked)| *revoked)),
            Redemptions::Leases { api, .. } => Ok(api
                .get_opt(&Self::lease_name(jti))
                .await?
                .and_then(|l| l.metadata.annotations)
                .is_some_and(|a| a.contains_key(REVOKED_ANNOTATION))),
        }
    }

    /// Deletes redemption records past their keep time (Leases only).
    pub async fn sweep(&self) -> Result<usize, GrantError> {
        let Redemptions::Leases { api, .. } = self else {
            return Ok(0);
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut removed = 0;
        for lease in api
            .list(&ListParams::default().labels(&format!("{REDEMPTION_LABEL}=true")))
            .await?
        {
            let Some(spec) = &lease.spec else { continue };
            let (Some(MicroTime(acquired)), Some(secs)) =
                (&spec.acquire_time, spec.lease_duration_seconds)
            else {
                continue;
            };
            let until = acquired
                .saturating_add(k8s_openapi::jiff::SignedDuration::from_secs(secs.into()))
                .unwrap_or(*acquired);
            if until < now {
                let name = lease.metadata.name.unwrap_or_default();
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => removed += 1,
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::keys::{parse_key, tests::generate_ec_pem};

    fn keys(kids: &[&str], active: &str) -> KeySet {
        let all: Vec<_> = kids
            .iter()
            .map(|k| std::sync::Arc::new(parse_key(k, &generate_ec_pem()).unwrap()))
            .collect();
        KeySet::from_keys(all, active).unwrap()
    }

    fn account() -> Account {
        Account {
            namespace: "ns".into(),
            name: "alice".into(),
            uid: "u1".into(),
            user_id: "@alice:x".into(),
            localpart: "alice".into(),
            display_name: None,
            email: None,
            subject: "sub-1".into(),
            tenant: "t".into(),
        }
    }

    fn code(exp: u64) -> CodeClaims {
        CodeClaims {
            jti: new_jti(),
            exp,
            client_id: "synapse".into(),
            redirect_uri: "https://x/cb".into(),
            code_challenge: "c".repeat(43),
            nonce: Some("n".into()),
            account: account(),
        }
    }

    #[test]
    fn codes_open_with_any_published_key_and_nothing_else() {
        let set = keys(&["a", "b"], "a");
        let sealed = seal_code(&set, &code(epoch(SystemTime::now()) + 60));
        assert_eq!(open_code(&set, &sealed).unwrap().client_id, "synapse");
        // After rotation to b, a's codes still open while a is published.
        let rotated = KeySet::from_keys(set.all.clone(), "b").unwrap();
        assert!(open_code(&rotated, &sealed).is_ok());
        // Another sidecar's keys do not open it.
        assert!(open_code(&keys(&["a"], "a"), &sealed).is_err());
        // A code is not an access token, nor the reverse.
        assert!(open_access(&set, &sealed).is_err());
        // Tampering breaks the seal, anywhere.
        for at in [0, 1, 20, sealed.len() / 2, sealed.len() - 1] {
            let mut forged = sealed.clone().into_bytes();
            forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
            let forged = String::from_utf8(forged).unwrap();
            assert!(open_code(&set, &forged).is_err(), "tampered at {at}");
        }
        assert!(open_code(&set, "").is_err());
        assert!(open_code(&set, &"A".repeat(MAX_SEALED + 4)).is_err());
    }

    #[test]
    fn a_wait_ticket_carries_the_identity_and_is_no_code() {
        let set = keys(&["a"], "a");
        let claims = WaitClaims {
            jti: new_jti(),
            exp: epoch(SystemTime::now()) + 60,
            subject: "sub-1".into(),
            tenant: "ns".into(),
        };
        let ticket = seal_wait(&set, &claims);
        assert_eq!(open_wait(&set, &ticket).unwrap(), claims);
        assert!(open_code(&set, &ticket).is_err());
        let code = seal_code(&set, &code(epoch(SystemTime::now()) + 60));
        assert!(open_wait(&set, &code).is_err());
        let expired = WaitClaims {
            exp: epoch(SystemTime::now()) - 1,
            ..claims
        };
        assert!(matches!(
            open_wait(&set, &seal_wait(&set, &expired)),
            Err(GrantError::Expired)
        ));
    }

    #[test]
    fn sealed_values_are_opaque_and_never_repeat() {
        let set = keys(&["a"], "a");
        let mut claims = code(epoch(SystemTime::now()) + 60);
        claims.account.display_name = Some("Alice Liddell".into());
        claims.account.email = Some("alice@wonderland.test".into());
        let first = seal_code(&set, &claims);
        let second = seal_code(&set, &claims);
        assert_ne!(first, second, "a fresh nonce each time");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&first)
            .unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in ["alice", "Alice", "wonderland", "sub-1", "\"ns\"", "synapse"] {
            assert!(!text.contains(secret), "{secret} readable in {text:?}");
        }
        let opened = open_code(&set, &first).unwrap();
        assert_eq!(opened.account, claims.account);
    }

    #[test]
    fn expired_codes_do_not_open() {
        let set = keys(&["a"], "a");
        let sealed = seal_code(&set, &code(epoch(SystemTime::now()) - 1));
        assert!(matches!(open_code(&set, &sealed), Err(GrantError::Expired)));
    }

    #[tokio::test]
    async fn a_second_redemption_is_a_replay_and_revokes() {
        let r = Redemptions::memory();
        let keep = Duration::from_secs(60);
        assert_eq!(r.redeem("j1", keep).await.unwrap(), Redemption::First);
        assert!(!r.is_revoked("j1").await.unwrap());
        assert_eq!(r.redeem("j1", keep).await.unwrap(), Redemption::Replay);
        assert!(r.is_revoked("j1").await.unwrap());
        assert_eq!(r.redeem("j2", keep).await.unwrap(), Redemption::First);
    }
}
