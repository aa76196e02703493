//! Reading secret material: one key of a Kubernetes Secret, or a file
//! (a mounted Secret). Values are trimmed and never logged.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret reference {0:?} must be namespace/name")]
    Reference(String),
    #[error("reading Secret {reference}: {source}")]
    Kube {
        reference: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {reference} has no {key:?} key")]
    MissingKey { reference: String, key: String },
    #[error("reading {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is empty or not UTF-8")]
    Invalid(String),
}

/// One key of the Secret `namespace/name`.
pub async fn read_secret_key(
    client: &Client,
    reference: &str,
    key: &str,
) -> Result<String, SecretError> {
    let (ns, name) = reference
        .split_once('/')
        .ok_or_else(|| SecretError::Reference(reference.to_string()))?;
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|source| SecretError::Kube {
            reference: reference.to_string(),
            source,
        })?;
    let bytes = secret
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| SecretError::MissingKey {
            reference: reference.to_string(),
            key: key.to_string(),
        })?;
    text(bytes.0, &format!("{reference}[{key}]"))
}

/// A whole file, trimmed (mounted Secret keys usually end in a newline).
pub fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::File {
        path: path.display().to_string(),
        source,
    })?;
    text(bytes, &path.display().to_string())
}

fn text(bytes: Vec<u8>, what: &str) -> Result<String, SecretError> {
    String::from_utf8(bytes)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| SecretError::Invalid(what.to_string()))
}
