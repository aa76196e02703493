//! The OIDC provider's signing keys: PEM files in one directory (a mounted
//! Secret), `<kid>.pem` each. One key signs; every other key in the
//! directory is still published in the JWKS, so tokens signed before a
//! rotation keep verifying until the old key is removed.

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The file in the key directory that may name the signing key's `kid`, so
/// that a rotation is one Secret update.
pub const ACTIVE_KID_FILE: &str = "active-kid";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading signing keys from {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signing key {kid:?} is neither a P-256 EC key nor an RSA key (PKCS#8 or PKCS#1 PEM)")]
    Unsupported { kid: String },
    #[error("no signing keys (*.pem) in {0}")]
    Empty(PathBuf),
    #[error("the active signing key {0:?} is not in the key directory")]
    ActiveMissing(String),
    #[error(
        "{0} signing keys and none named active (set the active kid or an {ACTIVE_KID_FILE} file)"
    )]
    Ambiguous(usize),
    #[error("building the JWK for {kid:?}: {message}")]
    Jwk { kid: String, message: String },
}

/// One key: how it signs and how it is published.
pub struct SigningKey {
    pub kid: String,
    /// Secret material derived from the private key, for the keys that
    /// seal (encrypt) codes and access tokens (see `grants`).
    pub seed: [u8; 32],
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub jwk: Jwk,
}

/// All keys; `active` signs.
pub struct KeySet {
    pub active: Arc<SigningKey>,
    pub all: Vec<Arc<SigningKey>>,
    /// Raw file contents, to notice a change on reload.
    fingerprint: BTreeMap<String, Vec<u8>>,
}

impl KeySet {
    /// The public JWKS document.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.all.iter().map(|k| k.jwk.clone()).collect(),
        }
    }

    /// Algorithms discovery may list: only those of keys we hold.
    pub fn algorithms(&self) -> Vec<String> {
        let mut algs: Vec<String> = self
            .all
            .iter()
            .map(|k| format!("{:?}", k.algorithm))
            .collect();
        algs.sort();
        algs.dedup();
        algs
    }

    /// A key set from parsed keys, `active` signing.
    pub fn from_keys(all: Vec<Arc<SigningKey>>, active: &str) -> Result<Self, KeyError> {
        let active = all
            .iter()
            .find(|k| k.kid == active)
            .cloned()
            .ok_or_else(|| KeyError::ActiveMissing(active.to_string()))?;
        Ok(KeySet {
            active,
            all,
            fingerprint: BTreeMap::new(),
        })
    }

    pub fn by_kid(&self, kid: &str) -> Option<&Arc<SigningKey>> {
        self.all.iter().find(|k| k.kid == kid)
    }
}

/// Parses one PEM key, inferring its algorithm: EC P-256 → ES256, RSA → RS256.
pub fn parse_key(kid: &str, pem: &[u8]) -> Result<SigningKey, KeyError> {
    let (algorithm, encoding) = if let Ok(k) = EncodingKey::from_ec_pem(pem) {
        (Algorithm::ES256, k)
    } else if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
        (Algorithm::RS256, k)
    } else {
        return Err(KeyError::Unsupported { kid: kid.into() });
    };
    let jwk_err = |e: jsonwebtoken::errors::Error| KeyError::Jwk {
        kid: kid.into(),
        message: e.to_string(),
    };
    let mut jwk = Jwk::from_encoding_key(&encoding, algorithm).map_err(jwk_err)?;
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => KeyAlgorithm::RS256,
    });
    let decoding = DecodingKey::from_jwk(&jwk).map_err(jwk_err)?;
    let seed = {
        use sha2::{Digest, Sha256};
        Sha256::digest(pem).into()
    };
    Ok(SigningKey {
        kid: kid.to_string(),
        seed,
        algorithm,
        encoding,
        decoding,
        jwk,
    })
}

/// Reads the key directory. `active` (configuration) is overridden by the
/// directory's own `active-kid` file when present.
pub fn load(dir: &Path, active: Option<&str>) -> Result<KeySet, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = BTreeMap::new();
    let mut active_file = None;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Mounted Secrets hold `..data` links and hidden files: skip them.
        if name.starts_with('.') {
            continue;
        }
        if name == ACTIVE_KID_FILE {
            let text = std::fs::read_to_string(&path).map_err(io)?;
            active_file = Some(text.trim().to_string());
        } else if let Some(kid) = name.strip_suffix(".pem") {
            files.insert(kid.to_string(), std::fs::read(&path).map_err(io)?);
        }
    }
    let mut fingerprint = files.clone();
    if let Some(a) = &active_file {
        fingerprint.insert(format!("/{ACTIVE_KID_FILE}"), a.clone().into_bytes());
    }
    if files.is_empty() {
        return Err(KeyError::Empty(dir.to_path_buf()));
    }
    let all = files
        .iter()
        .map(|(kid, pem)| parse_key(kid, pem).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let active_kid = match active_file.as_deref().or(active) {
        Some(kid) => kid.to_string(),
        None if all.len() == 1 => all[0].kid.clone(),
        None => return Err(KeyError::Ambiguous(all.len())),
    };
    let active = all
        .iter()
        .find(|k| k.kid == active_kid)
        .cloned()
        .ok_or(KeyError::ActiveMissing(active_kid))?;
    Ok(KeySet {
        active,
        all,
        fingerprint,
    })
}

/// The live key set, reloaded from its directory when the files change.
#[derive(Clone)]
pub struct Keys {
    dir: PathBuf,
    active: Option<String>,
    current: Arc<RwLock<Arc<KeySet>>>,
}

impl Keys {
    pub fn open(dir: PathBuf, active: Option<String>) -> Result<Self, KeyError> {
        let set = load(&dir, active.as_deref())?;
        Ok(Keys {
            dir,
            active,
            current: Arc::new(RwLock::new(Arc::new(set))),
        })
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.current.read().expect("key lock").clone()
    }

    /// Re-reads the directory; a broken update keeps the previous keys.
    /// Returns whether the key set changed.
    pub fn reload(&self) -> bool {
        match load(&self.dir, self.active.as_deref()) {
            Ok(set) => {
                if set.fingerprint == self.current().fingerprint {
                    return false;
                }
                tracing::info!(
                    active = %set.active.kid,
                    published = ?set.all.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
                    "signing keys reloaded"
                );
                *self.current.write().expect("key lock") = Arc::new(set);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "signing keys not reloaded; keeping the previous ones");
                false
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_key() {
        assert!(matches!(
            parse_key("x", b"not a key"),
            Err(KeyError::Unsupported { .. })
        ));
    }

    #[test]
    fn chooses_the_active_key_and_publishes_all() {
        let dir = std::env::temp_dir().join(format!("keys-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ec = generate_ec_pem();
        std::fs::write(dir.join("a.pem"), &ec).unwrap();
        std::fs::write(dir.join("b.pem"), &ec).unwrap();
        assert!(matches!(load(&dir, None), Err(KeyError::Ambiguous(2))));
        let set = load(&dir, Some("a")).unwrap();
        assert_eq!(set.active.kid, "a");
        assert_eq!(set.jwks().keys.len(), 2);
        assert_eq!(set.algorithms(), vec!["ES256".to_string()]);
        std::fs::write(dir.join(ACTIVE_KID_FILE), "b\n").unwrap();
        assert_eq!(load(&dir, Some("a")).unwrap().active.kid, "b");
        std::fs::write(dir.join(ACTIVE_KID_FILE), "c").unwrap();
        assert!(matches!(load(&dir, None), Err(KeyError::ActiveMissing(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh P-256 key, through openssl as the stack makes them.
    pub fn generate_ec_pem() -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .output()
            .expect("openssl");
        assert!(out.status.success());
        out.stdout
    }
}
