//! Sidecar configuration: a YAML file (see `config/sidecar.yaml`) whose
//! scalar settings flags and environment variables can override. Secrets
//! are never inline: they are files (mounted Secrets) or a Secret reference.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// HTTPS listen address.
    pub listen: Option<SocketAddr>,
    /// The OIDC issuer URL, exactly as Synapse's `issuer` names it.
    pub issuer: Option<String>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub signing_keys: SigningKeysConfig,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    #[serde(default)]
    pub platform: PlatformConfig,
    #[serde(default)]
    pub homeserver: HomeserverConfig,
    #[serde(default)]
    pub credentials: CredentialsConfig,
    #[serde(default)]
    pub oidc: OidcLifetimes,
    #[serde(default)]
    pub handles: HandlesConfig,
    #[serde(default)]
    pub pending_account: PendingAccountConfig,
    /// MAS mode: credentials are MAS personal sessions.
    #[serde(default)]
    pub mas: Option<MasConfig>,
    /// Only `MatrixUser`s in this namespace (default: all).
    pub namespace: Option<String>,
    /// Only `MatrixUser`s matching this label selector.
    pub label_selector: Option<String>,
    /// How often keys and certificates are re-read from disk, in seconds.
    pub reload_seconds: Option<u64>,
    /// Plain-HTTP listener for `/metrics` (default `0.0.0.0:8082`; "off").
    pub metrics_listen: Option<String>,
    /// Namespace where redeemed authorization codes are recorded as Leases,
    /// so that several replicas can serve (default: in memory, one replica).
    pub state_namespace: Option<String>,
    /// This replica's name (default: random).
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningKeysConfig {
    /// Directory of `<kid>.pem` files (a mounted Secret).
    pub dir: Option<PathBuf>,
    /// The `kid` that signs; the directory's `active-kid` file overrides it.
    pub active_kid: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConfig {
    pub id: String,
    /// File holding the client secret (a mounted Secret key).
    pub secret_file: PathBuf,
    pub redirect_uris: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlatformConfig {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// HS256: file holding the shared secret.
    pub secret_file: Option<PathBuf>,
    /// RS256/ES256: the platform's JWKS document.
    pub jwks_url: Option<String>,
    /// Allowed asymmetric algorithms (default RS256 and ES256).
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub jwks_refresh_seconds: Option<u64>,
    /// Claim naming the tenant (default `tenant`).
    pub tenant_claim: Option<String>,
    pub leeway_seconds: Option<u64>,
    /// Where unauthenticated browsers sign in.
    pub login_url: Option<String>,
    /// Query parameter carrying the return address (default `return_to`).
    pub return_parameter: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HomeserverConfig {
    /// Where the sidecar reaches Synapse.
    pub url: Option<String>,
    /// The homeserver URL handed to clients (default: `url`).
    pub public_url: Option<String>,
    pub server_name: Option<String>,
    pub admin_localpart: Option<String>,
    /// The registration's own bot (default `openmeet-operator`): reserved,
    /// like the admin account.
    pub sender_localpart: Option<String>,
    /// `namespace/name` of the Secret holding `as_token`.
    pub as_token_secret: Option<String>,
    /// Or a file holding it.
    pub as_token_file: Option<PathBuf>,
}

/// MAS, when the homeserver delegates authentication to it: the credential
/// API mints MAS personal sessions through the operator's admin client.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MasConfig {
    pub url: String,
    /// The operator's OAuth client (a ULID in MAS's admin clients).
    pub client_id: String,
    /// A file holding its secret.
    pub client_secret_file: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsConfig {
    pub token_lifetime_seconds: Option<u64>,
    pub renew_before_seconds: Option<u64>,
    pub requests_per_minute: Option<u32>,
    pub burst: Option<u32>,
}

/// The handle API (`GET /api/v1/handles/{localpart}`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandlesConfig {
    /// Reserved localparts besides the built-in ones: the same list as the
    /// controller's `--reserved-localparts`.
    #[serde(default)]
    pub reserved_localparts: Vec<String>,
    /// Per caller.
    pub requests_per_minute: Option<u32>,
    pub burst: Option<u32>,
}

/// A first login whose account is still being prepared waits on a page
/// that refreshes itself.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingAccountConfig {
    /// Longest wait (default 30; 0 answers at once).
    pub wait_seconds: Option<u64>,
    /// Between two looks (default 2).
    pub refresh_seconds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OidcLifetimes {
    pub code_seconds: Option<u64>,
    pub id_token_seconds: Option<u64>,
    pub access_token_seconds: Option<u64>,
}

impl SidecarConfig {
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("../../config/sidecar.yaml");
        let config = SidecarConfig::from_yaml(text).unwrap();
        assert_eq!(config.clients.len(), 1);
        assert!(config.issuer.unwrap().starts_with("https://"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(SidecarConfig::from_yaml("issuer: https://x\nclientz: []\n").is_err());
    }
}
