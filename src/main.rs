//! `openmeet-matrix-operator`: one binary, the subcommand picks the role.

use clap::{Args, Parser, Subcommand};
use kube::Client;
use openmeet_matrix_operator::controller::own_joins::OwnJoins;
use openmeet_matrix_operator::controller::{appservice, leader, Leading, Operator, OperatorConfig};
use openmeet_matrix_operator::kube_metrics::{CountLayer, KubeRequestStats};
use openmeet_matrix_operator::mas::{MasClient, MasConfig};
use openmeet_matrix_operator::registration::{Registration, RegistrationParams};
use openmeet_matrix_operator::synapse::{SynapseClient, SynapseConfig, WriteGate};
use openmeet_matrix_operator::{api, metrics, secrets, sidecar, telemetry};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "openmeet-matrix-operator",
    version,
    about = "Converges Synapse to OpenMeet's Matrix resources"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t, global = true)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch MatrixUser, MatrixRoom and RoomPermission objects and converge Synapse.
    Controller(Box<ControllerArgs>),
    /// Serve the sidecar: the OIDC provider for Synapse's SSO and the credential API (HTTPS).
    Sidecar(Box<SidecarArgs>),
    /// Print a platform JWT signed with an HS256 secret (for development and testing).
    DevToken(DevTokenArgs),
    /// Print every CRD as YAML.
    Crd,
    /// Generate the application-service registration Synapse loads.
    Registration(RegistrationArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// The homeserver's server_name.
    #[arg(long, env = "MATRIX_SERVER_NAME")]
    server_name: String,
    /// Localpart of the admin account the operator acts as.
    #[arg(long, env = "MATRIX_ADMIN_LOCALPART", default_value = "openmeet-admin")]
    admin_localpart: String,
    /// Localpart of the application service's own bot (never the admin).
    #[arg(
        long,
        env = "MATRIX_SENDER_LOCALPART",
        default_value = "openmeet-operator"
    )]
    sender_localpart: String,
}

/// Where accounts, logins and access tokens live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AuthMode {
    /// Synapse's own: accounts through its admin API, SSO through its
    /// `oidc_providers`, credentials by login-as-user.
    Synapse,
    /// The Matrix Authentication Service: accounts through MAS's admin API.
    Mas,
}

#[derive(Args)]
struct MasArgs {
    /// Where accounts live: Synapse's legacy login, or MAS (Synapse with
    /// `matrix_authentication_service` enabled).
    #[arg(
        long = "auth",
        env = "MATRIX_AUTH",
        value_enum,
        default_value = "synapse"
    )]
    auth: AuthMode,
    /// MAS's base URL (MAS mode).
    #[arg(long, env = "MAS_URL", required_if_eq("auth", "mas"))]
    mas_url: Option<String>,
    /// The operator's OAuth client in MAS (a ULID, listed in MAS's
    /// `policy.data.admin_clients`).
    #[arg(long, env = "MAS_CLIENT_ID", required_if_eq("auth", "mas"))]
    mas_client_id: Option<String>,
    /// File holding that client's secret (mounted from a Secret).
    #[arg(long, env = "MAS_CLIENT_SECRET_FILE", required_if_eq("auth", "mas"))]
    mas_client_secret_file: Option<PathBuf>,
    /// The id (a ULID) of MAS's upstream OAuth provider that is the sidecar:
    /// SSO subjects are linked on it.
    #[arg(long, env = "MAS_UPSTREAM_PROVIDER", required_if_eq("auth", "mas"))]
    mas_upstream_provider: Option<String>,
}

impl MasArgs {
    /// The MAS client in MAS mode; `None` in Synapse mode.
    fn client(&self, timeout: Duration) -> Result<Option<MasClient>, MainError> {
        if self.auth != AuthMode::Mas {
            return Ok(None);
        }
        let missing = |flag: &str| MainError::Config(format!("--auth mas needs {flag}"));
        let secret_file = self
            .mas_client_secret_file
            .as_ref()
            .ok_or_else(|| missing("--mas-client-secret-file"))?;
        let client_secret = secrets::read_secret_file(secret_file)?;
        let client = MasClient::new(MasConfig {
            url: self.mas_url.clone().ok_or_else(|| missing("--mas-url"))?,
            client_id: self
                .mas_client_id
                .clone()
                .ok_or_else(|| missing("--mas-client-id"))?,
            client_secret,
            upstream_provider: self
                .mas_upstream_provider
                .clone()
                .ok_or_else(|| missing("--mas-upstream-provider"))?,
            timeout,
        })
        .map_err(|e| MainError::Config(e.to_string()))?;
        Ok(Some(client))
    }
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    mas: MasArgs,
    /// Base URL of Synapse's client API.
    #[arg(long, env = "SYNAPSE_URL")]
    synapse_url: String,
    /// Secret holding the registration's `as_token`, as namespace/name.
    #[arg(long, env = "AS_TOKEN_SECRET")]
    as_token_secret: String,
    /// `idp_id` of the sidecar in Synapse's `oidc_providers`.
    #[arg(long, env = "OIDC_IDP_ID", default_value = "openmeet")]
    idp_id: String,
    /// More reserved localparts (comma-separated), besides the built-in ones.
    #[arg(long, env = "RESERVED_LOCALPARTS", value_delimiter = ',')]
    reserved_localparts: Vec<String>,
    /// Namespaces allowed to adopt pre-existing Synapse accounts (comma-separated).
    #[arg(long, env = "ADOPT_NAMESPACES", value_delimiter = ',')]
    adopt_namespaces: Vec<String>,
    /// Namespaces whose users may be server admins (comma-separated).
    #[arg(long, env = "ADMIN_NAMESPACES", value_delimiter = ',')]
    admin_namespaces: Vec<String>,
    /// Seconds between periodic resyncs (jittered): each object is folded
    /// again from the caches; Synapse is read only for a change or the sweep.
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds a converged, unchanged object is trusted before the sweep
    /// reads it again: the longest an out-of-band change no event reports
    /// (an account edited through the admin API) stays uncorrected.
    #[arg(long, env = "SWEEP_PERIOD_SECONDS", default_value_t = 21_600)]
    sweep_period_seconds: u64,
    /// Synapse requests per second the sweep may spend, spread evenly (a
    /// tenant too large for the period at this budget is swept more slowly).
    #[arg(long, env = "SWEEP_BUDGET", default_value_t = 1.0)]
    sweep_budget: f64,
    /// Watch only this namespace.
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Watch only objects matching this label selector.
    #[arg(long, env = "WATCH_SELECTOR")]
    selector: Option<String>,
    /// Timeout of one Synapse request, in seconds.
    #[arg(long, env = "SYNAPSE_TIMEOUT_SECONDS", default_value_t = 30)]
    synapse_timeout_seconds: u64,
    /// This replica's name, for Events.
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Managed aliases start with this prefix (the registration's exclusive alias namespace).
    #[arg(long, env = "MATRIX_ALIAS_PREFIX", default_value = "openmeet-")]
    alias_prefix: String,
    /// Reconciles of one kind running at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Room version of the rooms the operator creates. From 12 on the operator
    /// is each room's creator, and only creators reach the level that
    /// ownership state (marker, tombstone, server ACL, power levels) requires.
    #[arg(long, env = "MATRIX_ROOM_VERSION", default_value = "12")]
    room_version: String,
    /// The sidecar's credential token lifetime, in seconds: a lock is lifted
    /// only once every token issued before it has expired.
    #[arg(
        long,
        env = "CREDENTIAL_TOKEN_LIFETIME_SECONDS",
        default_value_t = 3600
    )]
    credential_token_lifetime_seconds: u64,
    /// Requests to Synapse in flight at once, across all controllers.
    #[arg(long, env = "SYNAPSE_CONCURRENCY", default_value_t = 16)]
    synapse_concurrency: u16,
    /// Where `/metrics` and `/healthz` are served ("off" to disable).
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:8081")]
    metrics_listen: String,
    /// Where the application-service transaction endpoint listens ("off" to disable).
    #[arg(long, env = "APPSERVICE_LISTEN", default_value = "0.0.0.0:9000")]
    appservice_listen: String,
    /// Reconcile only while holding a Lease (run several replicas with this on).
    #[arg(long, env = "LEADER_ELECT", default_value_t = false)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "openmeet-matrix-operator")]
    lease_name: String,
    /// Namespace of the Lease (the pod's own).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long the Lease holds without renewal, in seconds.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// How often the leader renews, in seconds.
    #[arg(long, env = "LEASE_RENEW_SECONDS", default_value_t = 5)]
    lease_renew_seconds: u64,
}

/// Every setting can come from the config file; flags and environment
/// variables override it.
#[derive(Args)]
struct SidecarArgs {
    /// YAML configuration file (see config/sidecar.yaml).
    #[arg(long, env = "SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// HTTPS listen address.
    #[arg(long, env = "SIDECAR_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// OIDC issuer URL (https), exactly as Synapse's `issuer`.
    #[arg(long, env = "OIDC_ISSUER")]
    issuer: Option<String>,
    /// TLS certificate chain (PEM).
    #[arg(long, env = "TLS_CERT_FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TLS_KEY_FILE")]
    tls_key: Option<PathBuf>,
    /// Directory of `<kid>.pem` signing keys.
    #[arg(long, env = "OIDC_SIGNING_KEYS_DIR")]
    signing_keys_dir: Option<PathBuf>,
    /// The kid that signs (the directory's `active-kid` file overrides it).
    #[arg(long, env = "OIDC_ACTIVE_KID")]
    active_kid: Option<String>,
    /// Register (or replace) one OIDC client with this id.
    #[arg(long, env = "OIDC_CLIENT_ID", requires_all = ["client_secret_file", "redirect_uri"])]
    client_id: Option<String>,
    /// File holding that client's secret.
    #[arg(long, env = "OIDC_CLIENT_SECRET_FILE")]
    client_secret_file: Option<PathBuf>,
    /// That client's redirect URIs (comma-separated).
    #[arg(long, env = "OIDC_REDIRECT_URIS", value_delimiter = ',')]
    redirect_uri: Vec<String>,
    /// Issuer of the platform's JWTs.
    #[arg(long, env = "PLATFORM_ISSUER")]
    platform_issuer: Option<String>,
    /// Audience the platform's JWTs must name.
    #[arg(long, env = "PLATFORM_AUDIENCE")]
    platform_audience: Option<String>,
    /// File holding the platform's HS256 secret.
    #[arg(long, env = "PLATFORM_SECRET_FILE")]
    platform_secret_file: Option<PathBuf>,
    /// The platform's JWKS URL (RS256/ES256).
    #[arg(long, env = "PLATFORM_JWKS_URL")]
    platform_jwks_url: Option<String>,
    /// Where unauthenticated browsers sign in to the platform.
    #[arg(long, env = "PLATFORM_LOGIN_URL")]
    platform_login_url: Option<String>,
    /// Claim of the platform JWT that names the tenant.
    #[arg(long, env = "PLATFORM_TENANT_CLAIM")]
    tenant_claim: Option<String>,
    /// Where the sidecar reaches Synapse.
    #[arg(long, env = "SYNAPSE_URL")]
    synapse_url: Option<String>,
    /// Homeserver URL handed to clients (default: --synapse-url).
    #[arg(long, env = "HOMESERVER_PUBLIC_URL")]
    homeserver_public_url: Option<String>,
    /// The homeserver's server_name.
    #[arg(long, env = "MATRIX_SERVER_NAME")]
    server_name: Option<String>,
    /// Localpart of the operator's admin account.
    #[arg(long, env = "MATRIX_ADMIN_LOCALPART")]
    admin_localpart: Option<String>,
    /// Localpart of the application service's own bot (reserved).
    #[arg(long, env = "MATRIX_SENDER_LOCALPART")]
    sender_localpart: Option<String>,
    /// More reserved localparts (comma-separated), besides the built-in ones:
    /// the controller's list, for the handle API.
    #[arg(long, env = "RESERVED_LOCALPARTS", value_delimiter = ',')]
    reserved_localparts: Vec<String>,
    /// Secret holding the registration's `as_token`, as namespace/name.
    #[arg(long, env = "AS_TOKEN_SECRET")]
    as_token_secret: Option<String>,
    /// Only MatrixUsers in this namespace.
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Only MatrixUsers matching this label selector.
    #[arg(long, env = "WATCH_SELECTOR")]
    selector: Option<String>,
    /// Plain-HTTP listener for /metrics ("off" to disable; default 0.0.0.0:8082).
    #[arg(long, env = "SIDECAR_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Record redeemed codes as Leases in this namespace, so several replicas can serve.
    #[arg(long, env = "POD_NAMESPACE")]
    state_namespace: Option<String>,
    /// This replica's name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

impl SidecarArgs {
    /// The file's configuration with every given flag applied on top.
    fn into_config(self) -> Result<sidecar::config::SidecarConfig, MainError> {
        let mut c = match &self.config {
            Some(path) => {
                sidecar::config::SidecarConfig::from_yaml(&std::fs::read_to_string(path)?)?
            }
            None => Default::default(),
        };
        fn set<T>(slot: &mut Option<T>, value: Option<T>) {
            if value.is_some() {
                *slot = value;
            }
        }
        set(&mut c.listen, self.listen);
        set(&mut c.issuer, self.issuer);
        set(&mut c.tls.cert_file, self.tls_cert);
        set(&mut c.tls.key_file, self.tls_key);
        set(&mut c.signing_keys.dir, self.signing_keys_dir);
        set(&mut c.signing_keys.active_kid, self.active_kid);
        if let (Some(id), Some(secret_file)) = (self.client_id, self.client_secret_file) {
            c.clients.retain(|client| client.id != id);
            c.clients.push(sidecar::config::ClientConfig {
                id,
                secret_file,
                redirect_uris: self
                    .redirect_uri
                    .into_iter()
                    .filter(|u| !u.is_empty())
                    .collect(),
            });
        }
        set(&mut c.platform.issuer, self.platform_issuer);
        set(&mut c.platform.audience, self.platform_audience);
        set(&mut c.platform.secret_file, self.platform_secret_file);
        set(&mut c.platform.jwks_url, self.platform_jwks_url);
        set(&mut c.platform.login_url, self.platform_login_url);
        set(&mut c.platform.tenant_claim, self.tenant_claim);
        set(&mut c.homeserver.url, self.synapse_url);
        set(&mut c.homeserver.public_url, self.homeserver_public_url);
        set(&mut c.homeserver.server_name, self.server_name);
        set(&mut c.homeserver.admin_localpart, self.admin_localpart);
        set(&mut c.homeserver.sender_localpart, self.sender_localpart);
        c.handles.reserved_localparts.extend(
            self.reserved_localparts
                .into_iter()
                .filter(|s| !s.is_empty()),
        );
        set(&mut c.homeserver.as_token_secret, self.as_token_secret);
        set(&mut c.namespace, self.namespace);
        set(&mut c.label_selector, self.selector);
        set(&mut c.metrics_listen, self.metrics_listen);
        set(&mut c.state_namespace, self.state_namespace);
        set(&mut c.identity, self.identity);
        Ok(c)
    }
}

#[derive(Args)]
struct DevTokenArgs {
    /// File holding the HS256 secret the sidecar trusts.
    #[arg(long, env = "PLATFORM_SECRET_FILE")]
    secret_file: PathBuf,
    #[arg(long, env = "PLATFORM_ISSUER")]
    issuer: String,
    #[arg(long, env = "PLATFORM_AUDIENCE")]
    audience: String,
    /// The platform user id (`sub`), as in MatrixUser.spec.subject.
    #[arg(long)]
    subject: String,
    /// The tenant id, as in the namespace label matrix.openmeet.net/tenant.
    #[arg(long)]
    tenant: String,
    /// Claim that carries the tenant.
    #[arg(long, env = "PLATFORM_TENANT_CLAIM", default_value = "tenant")]
    tenant_claim: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

#[derive(Args)]
struct RegistrationArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Managed aliases start with this prefix (the exclusive alias namespace).
    #[arg(long, env = "MATRIX_ALIAS_PREFIX", default_value = "openmeet-")]
    alias_prefix: String,
    /// Where Synapse pushes transactions to the operator.
    #[arg(long)]
    url: Option<String>,
    /// Write the registration here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write AS_TOKEN/HS_TOKEN/ADMIN_LOCALPART as shell assignments here.
    #[arg(long)]
    secret_env: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error(transparent)]
    Synapse(#[from] openmeet_matrix_operator::synapse::SynapseError),
    #[error(transparent)]
    Secret(#[from] openmeet_matrix_operator::secrets::SecretError),
    #[error("sidecar: {0}")]
    Sidecar(#[from] sidecar::Error),
    #[error("leader election: {0}")]
    Leader(#[from] openmeet_matrix_operator::controller::leader::LeaderError),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Controller(args) => controller(*args).await,
        Command::Sidecar(args) => run_sidecar(*args).await,
        Command::DevToken(args) => dev_token(args),
        Command::Crd => api::crds_yaml()
            .map(|y| print!("{y}"))
            .map_err(MainError::Yaml),
        Command::Registration(args) => registration(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

async fn read_token(client: &Client, reference: &str, key: &str) -> Result<String, MainError> {
    Ok(secrets::read_secret_key(client, reference, key).await?)
}

async fn run_sidecar(args: SidecarArgs) -> Result<(), MainError> {
    let config = args.into_config()?;
    // The sidecar's requests are counted, not exported.
    let client = kube_client(Arc::default()).await?;
    let settings = sidecar::Settings::resolve(config, &client).await?;
    Ok(sidecar::run(settings, client, shutdown_signal()).await?)
}

fn dev_token(args: DevTokenArgs) -> Result<(), MainError> {
    let secret = secrets::read_secret_file(&args.secret_file)?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({
        "iss": args.issuer, "aud": args.audience, "sub": args.subject,
        "iat": now, "nbf": now, "exp": now + args.ttl,
    });
    claims[args.tenant_claim.as_str()] = serde_json::Value::String(args.tenant);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| MainError::Config(e.to_string()))?;
    println!("{token}");
    Ok(())
}

/// The Kubernetes client, with connect and read timeouts: a hung API server
/// must fail a call, never hold it (and with it a lease renewal) forever.
/// The read timeout sits above the watches' 290 s server-side timeout.
/// Every request it sends is counted in `stats`.
async fn kube_client(stats: Arc<KubeRequestStats>) -> Result<Client, MainError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| MainError::Config(format!("Kubernetes client configuration: {e}")))?;
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(295));
    config.reset_reader_on_write = true;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&CountLayer(stats))
        .build())
}

async fn controller(args: ControllerArgs) -> Result<(), MainError> {
    let kube_stats = Arc::new(KubeRequestStats::default());
    let client = kube_client(kube_stats.clone()).await?;
    let as_token = read_token(&client, &args.as_token_secret, "as_token").await?;
    let timeout = Duration::from_secs(args.synapse_timeout_seconds);
    let mut synapse = SynapseClient::new(SynapseConfig {
        url: args.synapse_url,
        server_name: args.server.server_name,
        admin_localpart: args.server.admin_localpart.clone(),
        as_token,
        timeout,
    })?
    .with_request_limit(args.synapse_concurrency.into());
    if let Some(mas) = args.mas.client(timeout)? {
        // Said at start-up, and by /readyz until fixed; account writes
        // wait for a token meanwhile, so nothing is written.
        match mas.check_credentials().await {
            Ok(()) => tracing::info!(mas = ?mas, "MAS mode: accounts through MAS's admin API"),
            Err(e) => {
                tracing::error!(error = %e, "MAS mode: the operator's MAS client cannot get a token")
            }
        }
        synapse = synapse.with_mas(mas);
    }
    let mut reserved = OperatorConfig::builtin_reserved(
        &args.server.admin_localpart,
        &args.server.sender_localpart,
    );
    reserved.extend(
        args.reserved_localparts
            .into_iter()
            .filter(|s| !s.is_empty()),
    );
    let set = |v: Vec<String>| {
        v.into_iter()
            .filter(|s| !s.is_empty())
            .collect::<BTreeSet<_>>()
    };
    let config = OperatorConfig {
        sso_idp_id: args.idp_id,
        reserved_localparts: reserved,
        adopt_namespaces: set(args.adopt_namespaces),
        admin_namespaces: set(args.admin_namespaces),
        resync_interval: Duration::from_secs(args.resync_seconds.max(1)),
        sweep_period: Duration::from_secs(args.sweep_period_seconds.max(1)),
        sweep_budget: args.sweep_budget,
        namespace: args.namespace,
        label_selector: args.selector,
        instance: args.instance,
        alias_prefix: args.alias_prefix,
        concurrency: args.concurrency.max(1),
        room_version: args.room_version,
        credential_token_lifetime: Duration::from_secs(args.credential_token_lifetime_seconds),
    };
    tracing::info!(synapse = ?synapse, "controller starting");
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    // The operator's admin joins, which this process's endpoint is not to mark as drift.
    let own_joins = Arc::new(if args.appservice_listen == "off" {
        OwnJoins::default()
    } else {
        OwnJoins::recording()
    });
    let feed_stats = Arc::new(appservice::AppserviceStats::default());
    // Writes to Synapse leave only while this replica leads.
    let write_gate = if args.leader_elect {
        WriteGate::default()
    } else {
        WriteGate::open()
    };
    let mut operator = Operator::new(
        client.clone(),
        synapse.clone().with_write_gate(write_gate.clone()),
        config.clone(),
    )
    .with_own_joins(own_joins.clone());
    // The feed maps events to rooms through the controller's own cache.
    let feed_rooms = (args.appservice_listen != "off").then(|| operator.feed_rooms());
    let appservice = async {
        let Some(feed_rooms) = feed_rooms else {
            return Ok(());
        };
        let addr: std::net::SocketAddr = args
            .appservice_listen
            .parse()
            .map_err(|e| MainError::Config(format!("--appservice-listen: {e}")))?;
        let hs_token = read_token(&client, &args.as_token_secret, "hs_token").await?;
        let own = vec![
            format!("@{}:{}", args.server.admin_localpart, synapse.server_name()),
            format!(
                "@{}:{}",
                args.server.sender_localpart,
                synapse.server_name()
            ),
        ];
        // Scoped by the controller's watch of rooms it maps events through.
        let feed = appservice::Feed {
            own_senders: own,
            own_joins: own_joins.clone(),
            stats: feed_stats.clone(),
            ..Default::default()
        };
        appservice::run_on(
            client.clone(),
            feed_rooms,
            hs_token,
            feed,
            addr,
            shutdown.clone(),
        )
        .await
        .map_err(|e| MainError::Config(e.to_string()))
    };
    let readiness = Arc::new(metrics::Readiness::new(synapse.clone(), operator.synced()));
    let sources = metrics::Sources {
        synapse: synapse.stats_handle(),
        reconciles: operator.stats(),
        readiness: Some(readiness.clone()),
        feed: (args.appservice_listen != "off").then(|| feed_stats.clone()),
        kube: Some(kube_stats),
    };
    let metrics_server = async {
        if args.metrics_listen == "off" {
            return Ok(());
        }
        let addr: std::net::SocketAddr = args
            .metrics_listen
            .parse()
            .map_err(|e| MainError::Config(format!("--metrics-listen: {e}")))?;
        // The reachability gauge stays current whether or not anyone asks.
        let probe = readiness.probe_every(metrics::PROBE_EVERY);
        tokio::select! {
            served = metrics::serve(addr, sources, shutdown.clone()) => served.map_err(MainError::Io),
            () = probe => Ok(()),
        }
    };
    let lease = if args.leader_elect {
        let namespace = args.lease_namespace.clone().ok_or_else(|| {
            MainError::Config("--leader-elect needs --lease-namespace (POD_NAMESPACE)".into())
        })?;
        let identity = config
            .instance
            .clone()
            .unwrap_or_else(|| format!("openmeet-{}", rand::random::<u32>()));
        let renew = Duration::from_secs(args.lease_renew_seconds.max(1));
        let duration = Duration::from_secs(args.lease_duration_seconds.max(1));
        if renew * 2 > duration {
            return Err(MainError::Config(
                "--lease-renew-seconds must be at most half of --lease-duration-seconds".into(),
            ));
        }
        Some(leader::LeaseSettings {
            name: args.lease_name.clone(),
            namespace,
            identity,
            duration,
            renew,
        })
    } else {
        None
    };
    let reconcile = async {
        let Some(lease) = lease else {
            readiness.leading.store(true, Ordering::Release);
            operator.run(shutdown.clone()).await;
            return Ok(());
        };
        // A standby runs its watches, caches and queues from the start; its
        // reconciles wait for the lease (and read nothing from Synapse).
        let (lead, leading) = Leading::channel();
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
        let lost = Arc::new(std::sync::Mutex::new(None));
        let stop = {
            let (shutdown, lost) = (shutdown.clone(), lost.clone());
            async move {
                tokio::select! {
                    _ = shutdown => {},
                    Ok(e) = lost_rx => { *lost.lock().expect("lost lock") = Some(e); },
                    Ok(()) = failed_rx => {},
                }
            }
        };
        let warm = operator.with_leading(leading).run(stop);
        let win = async {
            let held_since = tokio::select! {
                acquired = leader::acquire(&client, &lease) => match acquired {
                    Ok(at) => at,
                    Err(e) => {
                        let _ = failed_tx.send(());
                        return Err(MainError::Leader(e));
                    }
                },
                _ = shutdown.clone() => return Ok(None),
            };
            write_gate.open_until(leader::held_until(held_since, &lease));
            readiness.leading.store(true, Ordering::Release);
            lead.send_replace(true);
            let (client, lease, gate) = (client.clone(), lease.clone(), write_gate.clone());
            // Keeps the failure sender alive while leading: dropping it is no stop.
            let keeper = tokio::spawn(async move {
                let _failed = failed_tx;
                let _ = lost_tx.send(leader::keep(&client, &lease, held_since, &gate).await);
            });
            Ok(Some(keeper))
        };
        // In-flight reconciles finish before `run` returns; after a loss the
        // closed gate fails their next write.
        let ((), won) = tokio::join!(warm, win);
        write_gate.close();
        let keeper = won?;
        if let Some(keeper) = &keeper {
            keeper.abort();
        }
        if let Some(e) = lost.lock().expect("lost lock").take() {
            // Another replica may lead now: never reconcile on.
            return Err(MainError::Leader(e));
        }
        if keeper.is_some() {
            leader::release(&client, &lease).await;
        }
        Ok(())
    };
    // The first error (a lost lease among them) ends the process: the other
    // servers are dropped with it.
    tokio::try_join!(appservice, metrics_server, reconcile).map(|_| ())
}

fn registration(args: RegistrationArgs) -> Result<(), MainError> {
    let registration = Registration::generate(&RegistrationParams {
        server_name: args.server.server_name,
        admin_localpart: args.server.admin_localpart.clone(),
        sender_localpart: args.server.sender_localpart,
        alias_prefix: args.alias_prefix,
        url: args.url,
    });
    let yaml = serde_yaml::to_string(&registration)?;
    match &args.out {
        Some(path) => write_private(path, &yaml)?,
        None => print!("{yaml}"),
    }
    if let Some(path) = &args.secret_env {
        let env = format!(
            "AS_TOKEN={}\nHS_TOKEN={}\nADMIN_LOCALPART={}\n",
            registration.as_token, registration.hs_token, args.server.admin_localpart
        );
        write_private(path, &env)?;
    }
    Ok(())
}

/// Writes a file only its owner can read: it holds tokens.
fn write_private(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content.as_bytes())
}
