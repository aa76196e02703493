//! `openmeet-matrix-operator`: one binary, the subcommand picks the role.

use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use openmeet_matrix_operator::controller::{appservice, Operator, OperatorConfig};
use openmeet_matrix_operator::registration::{Registration, RegistrationParams};
use openmeet_matrix_operator::synapse::{SynapseClient, SynapseConfig};
use openmeet_matrix_operator::{api, metrics, sidecar, telemetry};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
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
    /// Serve the sidecar's HTTP endpoints (health for now).
    Sidecar(SidecarArgs),
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

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    server: ServerArgs,
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
    /// Seconds between periodic resyncs (jittered).
    #[arg(long, env = "RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
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
    /// Where `/metrics` and `/healthz` are served ("off" to disable).
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:8081")]
    metrics_listen: String,
    /// Where the application-service transaction endpoint listens ("off" to disable).
    #[arg(long, env = "APPSERVICE_LISTEN", default_value = "0.0.0.0:9000")]
    appservice_listen: String,
}

#[derive(Args)]
struct SidecarArgs {
    /// Address to serve on.
    #[arg(long, env = "SIDECAR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Controller(args) => controller(*args).await,
        Command::Sidecar(args) => sidecar::serve_health(args.listen, shutdown_signal())
            .await
            .map_err(MainError::Io),
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

/// Reads one key of the registration Secret (`as_token` or `hs_token`).
async fn read_token(client: &Client, reference: &str, key: &str) -> Result<String, MainError> {
    let (ns, name) = reference.split_once('/').ok_or_else(|| {
        MainError::Config(format!(
            "--as-token-secret {reference:?} must be namespace/name"
        ))
    })?;
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let bytes = secret
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| MainError::Config(format!("Secret {reference} has no {key} key")))?;
    String::from_utf8(bytes.0)
        .map(|t| t.trim().to_string())
        .map_err(|_| MainError::Config(format!("{key} is not UTF-8")))
}

async fn controller(args: ControllerArgs) -> Result<(), MainError> {
    let client = Client::try_default().await?;
    let as_token = read_token(&client, &args.as_token_secret, "as_token").await?;
    let synapse = SynapseClient::new(SynapseConfig {
        url: args.synapse_url,
        server_name: args.server.server_name,
        admin_localpart: args.server.admin_localpart.clone(),
        as_token,
        timeout: Duration::from_secs(args.synapse_timeout_seconds),
    })?;
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
        namespace: args.namespace,
        label_selector: args.selector,
        instance: args.instance,
        alias_prefix: args.alias_prefix,
        concurrency: args.concurrency.max(1),
    };
    tracing::info!(synapse = ?synapse, "controller starting");
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown_signal()));
    let appservice = async {
        if args.appservice_listen == "off" {
            return Ok(());
        }
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
        let scope = config.namespace.clone();
        appservice::run(client.clone(), scope, hs_token, own, addr, shutdown.clone())
            .await
            .map_err(|e| MainError::Config(e.to_string()))
    };
    let operator = Operator::new(client.clone(), synapse.clone(), config.clone());
    let sources = metrics::Sources {
        synapse: synapse.stats_handle(),
        reconciles: operator.stats(),
    };
    let metrics_server = async {
        if args.metrics_listen == "off" {
            return Ok(());
        }
        let addr: std::net::SocketAddr = args
            .metrics_listen
            .parse()
            .map_err(|e| MainError::Config(format!("--metrics-listen: {e}")))?;
        metrics::serve(addr, sources, shutdown.clone())
            .await
            .map_err(MainError::Io)
    };
    let (served, metrics_served, ()) =
        tokio::join!(appservice, metrics_server, operator.run(shutdown.clone()));
    served.and(metrics_served)
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
