//! The shared local stack and per-test operators.
//!
//! One stack (etcd, kube-apiserver, Synapse) serves every test in this binary:
//! started on first use by `tests/stack/up.sh`, which exits when this process
//! does. Set `OPENMEET_STACK_ENV` to a running stack's `stack.env` to reuse it.
//! Each test works in its own namespaces, runs its own operator scoped to them
//! by a label selector, and so runs in parallel with the others.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use openmeet_matrix_operator::api::conditions::{find, READY};
use openmeet_matrix_operator::api::MatrixUser;
use openmeet_matrix_operator::controller::own_joins::OwnJoins;
use openmeet_matrix_operator::controller::{appservice, Operator, OperatorConfig, ReconcileStats};
use openmeet_matrix_operator::mas::{MasClient, MasConfig};
use openmeet_matrix_operator::sidecar;
use openmeet_matrix_operator::synapse::{SynapseClient, SynapseConfig};
use rand::distr::{Alphanumeric, SampleString};
use serde::de::DeserializeOwned;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const LABEL: &str = "openmeet.test/run";
pub const WAIT: Duration = Duration::from_secs(60);
/// The in-process operators' credential token lifetime: a lock lifts this
/// long after it began.
pub const CREDENTIAL_TOKEN_LIFETIME_SECS: u64 = 8;

/// Connection details of the running stack.
pub struct Stack {
    pub env: HashMap<String, String>,
    pub as_token: String,
    /// Admin joins of the in-process operators, which the test process's
    /// endpoint does not mark as drift (as one controller process would not).
    pub own_joins: Arc<OwnJoins>,
    _child: Option<Mutex<Child>>,
}

static STACK: OnceLock<Stack> = OnceLock::new();
static SIDECAR: OnceLock<()> = OnceLock::new();

/// Whether the feed (Synapse's transactions to the test process) is paused.
static FEED_PAUSED: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::channel(false).0);

/// Pauses or resumes the feed: while paused, Synapse's transactions reach
/// the endpoint but get no answer, as with a stopped controller. The feed is
/// shared: keep pauses short, other tests' drift waits behind them. (No
/// effect when a `make dev` controller holds the port instead.)
pub fn pause_feed(paused: bool) {
    FEED_PAUSED.send_replace(paused);
}

/// Where the feed goes instead of the test process's own endpoint, if set.
static FEED_ROUTE: LazyLock<tokio::sync::watch::Sender<Option<std::net::SocketAddr>>> =
    LazyLock::new(|| tokio::sync::watch::channel(None).0);

/// Sends the feed to another endpoint (a controller process serving its
/// own, as in production), or back to the test process's with `None`.
/// Open connections are closed, so Synapse's next transaction takes the
/// new route.
#[allow(dead_code)] // the bench's
pub fn route_feed(to: Option<std::net::SocketAddr>) {
    FEED_ROUTE.send_replace(to);
}

/// The drift marks rooms receive from now on, each with when it was first
/// seen (a mark repeated on later changes of the object counts once).
pub struct DriftMarks {
    pub seen: Arc<Mutex<Vec<(String, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DriftMarks {
    pub fn watch(
        api: Api<openmeet_matrix_operator::api::MatrixRoom>,
        config: kube::runtime::watcher::Config,
    ) -> DriftMarks {
        use futures::StreamExt;
        use kube::runtime::WatchStreamExt;
        let seen: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(
            kube::runtime::watcher(api, config)
                .applied_objects()
                .for_each(move |room| {
                    let mark = room.ok().and_then(|r| {
                        r.metadata
                            .annotations?
                            .get(openmeet_matrix_operator::controller::room::DRIFT_ANNOTATION)
                            .cloned()
                    });
                    if let Some(mark) = mark {
                        let mut seen = record.lock().unwrap();
                        if !seen.iter().any(|(m, _)| *m == mark) {
                            seen.push((mark, Instant::now()));
                        }
                    }
                    futures::future::ready(())
                }),
        );
        DriftMarks { seen, task }
    }

    /// The marks seen so far, in order.
    pub fn marks(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// When `mark` was first seen.
    #[allow(dead_code)] // the bench's
    pub fn seen_at(&self, mark: &str) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().find(|(m, _)| m == mark).map(|(_, at)| *at)
    }
}

impl Drop for DriftMarks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parse_env(path: &str) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Stack {
    pub fn get() -> &'static Stack {
        STACK.get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let (env_path, child) = match std::env::var("OPENMEET_STACK_ENV") {
                Ok(path) => (path, None),
                Err(_) => start_stack(),
            };
            let env = parse_env(&env_path);
            let dir = &env["STACK_DIR"];
            let secrets = parse_env(&format!("{dir}/synapse/appservice.env"));
            let stack = Stack {
                as_token: secrets["AS_TOKEN"].clone(),
                env,
                own_joins: Arc::new(OwnJoins::recording()),
                _child: child.map(Mutex::new),
            };
            stack.serve_appservice(secrets["HS_TOKEN"].clone());
            stack
        })
    }

    /// One application-service endpoint for the whole test process, reached
    /// on the port the registration names through a forwarder that
    /// [`pause_feed`] can stop. It marks rooms in the API server, so the
    /// operator of whichever test owns a room sees the drift.
    fn serve_appservice(&self, hs_token: String) {
        let kubeconfig = self.var("KUBECONFIG").to_string();
        let addr: std::net::SocketAddr = self
            .var("APPSERVICE_LISTEN")
            .parse()
            .expect("APPSERVICE_LISTEN");
        let backend = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let server = self.var("MATRIX_SERVER_NAME").to_string();
        let own = vec![
            format!("@{}:{server}", self.var("MATRIX_ADMIN_LOCALPART")),
            format!("@openmeet-operator:{server}"),
        ];
        let paused = FEED_PAUSED.subscribe();
        let own_joins = self.own_joins.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            runtime.block_on(async move {
                let kubeconfig = Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                let options = KubeConfigOptions::default();
                let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .expect("config");
                let client = Client::try_from(config).expect("client");
                let forwarder = async {
                    if let Err(e) = forward_pausable(addr, backend, paused).await {
                        // A `make dev` controller may serve it already; it marks rooms just the same.
                        eprintln!("test appservice forwarder not started: {e}");
                    }
                };
                let served = async {
                    let served = appservice::run(
                        client,
                        None,
                        hs_token,
                        appservice::Feed {
                            own_senders: own,
                            own_joins,
                            ..Default::default()
                        },
                        backend,
                        std::future::pending(),
                    );
                    if let Err(e) = served.await {
                        eprintln!("test appservice endpoint not started: {e}");
                    }
                };
                tokio::join!(forwarder, served);
            });
        });
    }

    /// The stack's sidecar (the OIDC provider Synapse is configured with),
    /// served in-process for the whole test binary from the stack's own
    /// configuration. Returns once it answers.
    pub async fn sidecar(&self) -> &str {
        SIDECAR.get_or_init(|| {
            let kubeconfig = self.var("KUBECONFIG").to_string();
            let config_path = self.var("SIDECAR_CONFIG").to_string();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                runtime.block_on(async move {
                    let kubeconfig = Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
                    let config =
                        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                            .await
                            .expect("config");
                    let client = Client::try_from(config).expect("client");
                    let text = std::fs::read_to_string(&config_path).expect("sidecar config");
                    let config = sidecar::config::SidecarConfig::from_yaml(&text).expect("parse");
                    let settings = sidecar::Settings::resolve(config, &client)
                        .await
                        .expect("sidecar settings");
                    if let Err(e) = sidecar::run(settings, client, std::future::pending()).await {
                        // A `make dev` sidecar may serve it already.
                        eprintln!("test sidecar not started: {e}");
                    }
                });
            });
        });
        let base = self.var("SIDECAR_URL");
        let http = https_client();
        wait_for("the sidecar to be ready", || async {
            let r = http.get(format!("{base}/readyz")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        base
    }

    /// The operator's admin account, `@<admin localpart>:<server>`.
    pub fn admin_user_id(&self) -> String {
        format!(
            "@{}:{}",
            self.var("MATRIX_ADMIN_LOCALPART"),
            self.var("MATRIX_SERVER_NAME")
        )
    }

    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("stack.env has no {key}"))
    }

    pub async fn kube(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.var("KUBECONFIG")).expect("kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("config");
        Client::try_from(config).expect("client")
    }

    pub fn synapse_at(&self, url: &str) -> SynapseClient {
        SynapseClient::new(SynapseConfig {
            url: url.to_string(),
            server_name: self.var("MATRIX_SERVER_NAME").to_string(),
            admin_localpart: self.var("MATRIX_ADMIN_LOCALPART").to_string(),
            as_token: self.as_token.clone(),
            timeout: Duration::from_secs(10),
        })
        .expect("synapse client")
    }

    pub fn synapse(&self) -> SynapseClient {
        self.synapse_at(self.var("SYNAPSE_URL"))
    }

    /// Whether the stack runs Synapse with MAS (`MATRIX_AUTH=mas`).
    pub fn is_mas(&self) -> bool {
        self.env.get("MATRIX_AUTH").map(String::as_str) == Some("mas")
    }

    /// The operator's MAS admin client, in MAS mode.
    pub fn mas(&self) -> Option<MasClient> {
        self.mas_with(None, None)
    }

    /// The same, at another URL or with another secret.
    pub fn mas_with(&self, url: Option<&str>, secret: Option<&str>) -> Option<MasClient> {
        if !self.is_mas() {
            return None;
        }
        let secret = match secret {
            Some(s) => s.to_string(),
            None => std::fs::read_to_string(self.var("MAS_CLIENT_SECRET_FILE"))
                .expect("MAS client secret"),
        };
        Some(
            MasClient::new(MasConfig {
                url: url.unwrap_or(self.var("MAS_URL")).to_string(),
                client_id: self.var("MAS_CLIENT_ID").to_string(),
                client_secret: secret.trim().to_string(),
                upstream_provider: self.var("MAS_UPSTREAM_PROVIDER").to_string(),
                timeout: Duration::from_secs(10),
            })
            .expect("MAS client"),
        )
    }

    /// One MAS client for a whole process (so one Synapse admin token), in
    /// MAS mode: what the benches' own reads of Synapse's admin API use.
    /// Each test runs its own tokio runtime, and a pooled connection dies
    /// with the runtime that opened it ("dispatch task is gone" in the
    /// next test), so this client opens a connection per request.
    pub fn shared_mas(&'static self) -> Option<&'static MasClient> {
        static MAS: OnceLock<Option<MasClient>> = OnceLock::new();
        MAS.get_or_init(|| {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(0)
                .build()
                .expect("an HTTP client");
            self.mas().map(|mas| mas.with_http(http))
        })
        .as_ref()
    }

    /// `synapse` as the operator holds it in the stack's auth mode.
    pub fn in_auth_mode(&self, synapse: SynapseClient) -> SynapseClient {
        match self.mas() {
            Some(mas) => synapse.with_mas(mas),
            None => synapse,
        }
    }

    /// A token Synapse's admin API takes as the operator's admin account's,
    /// in the stack's auth mode: the application service's (which
    /// masquerades as the admin account with `user_id`), or in MAS mode,
    /// where Synapse takes only MAS-issued admin tokens, the admin
    /// account's personal session with the admin scope, as the operator
    /// holds it ([`MasClient::synapse_admin_token`]).
    pub async fn synapse_admin_token(&'static self) -> String {
        match self.shared_mas() {
            Some(mas) => mas
                .synapse_admin_token(self.var("MATRIX_ADMIN_LOCALPART"))
                .await
                .expect("a Synapse admin token from MAS"),
            None => self.as_token.clone(),
        }
    }

    /// A request to Synapse's admin API (`path` from `/_synapse/admin/`
    /// on), as the operator's admin account in the stack's auth mode.
    pub async fn admin_api(
        &'static self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.var("SYNAPSE_URL")))
            .query(&[("user_id", self.admin_user_id())])
            .bearer_auth(self.synapse_admin_token().await)
    }

    /// An access token of the local user `user_id`, with a device of its
    /// own, valid for `valid`, minted as the stack's auth mode allows: by
    /// Synapse's admin login-as-user, or in MAS mode (where Synapse has no
    /// login-as) as a MAS personal session through MAS's admin API, as the
    /// credential API mints them there.
    pub async fn login_as(&'static self, user_id: &str, valid: Duration) -> String {
        if let Some(mas) = self.shared_mas() {
            let localpart = user_id
                .strip_prefix('@')
                .and_then(|u| u.split_once(':'))
                .map(|(l, _)| l)
                .unwrap_or_else(|| panic!("not a user id: {user_id}"));
            let user = mas
                .user_by_username(localpart)
                .await
                .expect("MAS answers")
                .unwrap_or_else(|| panic!("{user_id} is not in MAS"));
            let device = Alphanumeric
                .sample_string(&mut rand::rng(), 10)
                .to_uppercase();
            return mas
                .personal_session(&user.id, "integration test", &device, valid)
                .await
                .expect("a personal session from MAS")
                .access_token;
        }
        let until = std::time::SystemTime::now() + valid;
        let until_ms = until
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let path = format!(
            "/_synapse/admin/v1/users/{}/login",
            url::form_urlencoded::byte_serialize(user_id.as_bytes()).collect::<String>()
        );
        let response: serde_json::Value = self
            .admin_api(reqwest::Method::POST, &path)
            .await
            .json(&serde_json::json!({"valid_until_ms": until_ms}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token: {response}"))
            .to_string()
    }
}

/// Skips the rest of a test when the stack runs in MAS mode, saying why:
/// the one way a test of the default mode's own paths (Synapse's SSO,
/// login-as, its account store) stays out of the MAS-mode run.
/// docs/development.md lists every such test and why.
#[allow(unused_macros)] // the benches include this file too
macro_rules! default_mode_only {
    ($why:expr) => {
        if $crate::harness::skipped_in_mas_mode(module_path!(), $why) {
            return;
        }
    };
}
#[allow(unused_imports)] // the benches'
pub(crate) use default_mode_only;

/// Whether the stack runs in MAS mode, in which case the running test is
/// skipped: said on stderr past the test harness's capture, so every run
/// shows which tests it did not run, and why.
pub fn skipped_in_mas_mode(module: &str, why: &str) -> bool {
    if !Stack::get().is_mas() {
        return false;
    }
    // The test harness names a test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().filter(|n| n.contains("::")).unwrap_or(module);
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "test {test}: skipped in MAS mode: {why}");
    true
}

fn start_stack() -> (String, Option<Child>) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::env::temp_dir().join(format!("openmeet-test-stack-{}", std::process::id()));
    let mut child = Command::new("bash")
        .arg(format!("{root}/tests/stack/up.sh"))
        .args([
            "--dir",
            dir.to_str().unwrap(),
            "--watch-pid",
            &std::process::id().to_string(),
            "--ephemeral",
        ])
        .env(
            "OPERATOR_BIN",
            env!("CARGO_BIN_EXE_openmeet-matrix-operator"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting tests/stack/up.sh");
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reading up.sh output");
        if let Some(path) = line.strip_prefix("stack ready: ") {
            return (path.trim().to_string(), Some(child));
        }
    }
    panic!(
        "tests/stack/up.sh exited before the stack was ready: {:?}",
        child.wait()
    );
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        Alphanumeric
            .sample_string(&mut rand::rng(), 6)
            .to_lowercase()
    )
}

/// One test's world: its namespaces, label and operator.
pub struct TestEnv {
    pub client: Client,
    pub run_id: String,
    pub namespaces: Vec<String>,
    pub synapse: SynapseClient,
    pub operator_synapse: SynapseClient,
    pub stats: Arc<ReconcileStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<()>>,
    config: OperatorConfig,
    options: Options,
}

/// Knobs a test may turn on its operator.
#[derive(Default, Clone)]
pub struct Options {
    /// How many namespaces to create (default 1).
    pub namespaces: usize,
    /// Indices into `namespaces` allowed to adopt / to have admins.
    pub adopt: Vec<usize>,
    pub admin: Vec<usize>,
    /// Point the operator at this URL instead of Synapse.
    pub synapse_url: Option<String>,
    /// Do not start an operator.
    pub no_operator: bool,
    /// MAS mode: point the operator at this URL instead of MAS.
    pub mas_url: Option<String>,
    /// MAS mode: give the operator this client secret instead of its own.
    pub mas_secret: Option<String>,
    /// The sweep period (default: the product's six hours).
    pub sweep_period: Option<Duration>,
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        Self::with(name, Options::default()).await
    }

    pub async fn with(name: &str, options: Options) -> TestEnv {
        let stack = Stack::get();
        let client = stack.kube().await;
        let run_id = unique(name);
        let mut namespaces = Vec::new();
        for i in 0..options.namespaces.max(1) {
            let ns = format!("{run_id}-{i}");
            let object: Namespace = serde_json::from_value(serde_json::json!({
                "metadata": {"name": ns, "labels": {LABEL: run_id, "matrix.openmeet.net/tenant": ns}}
            }))
            .unwrap();
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &object)
                .await
                .expect("namespace");
            namespaces.push(ns);
        }
        let pick = |idx: &[usize]| {
            idx.iter()
                .map(|&i| namespaces[i].clone())
                .collect::<BTreeSet<_>>()
        };
        let config = OperatorConfig {
            sso_idp_id: "openmeet".into(),
            reserved_localparts: OperatorConfig::builtin_reserved(
                stack.var("MATRIX_ADMIN_LOCALPART"),
                "openmeet-operator",
            ),
            adopt_namespaces: pick(&options.adopt),
            admin_namespaces: pick(&options.admin),
            resync_interval: Duration::from_secs(300),
            sweep_period: options
                .sweep_period
                .unwrap_or(Duration::from_secs(6 * 3600)),
            sweep_budget: 20.0,
            namespace: None,
            label_selector: Some(format!("{LABEL}={run_id}")),
            instance: Some(run_id.clone()),
            alias_prefix: "openmeet-".into(),
            // The product's defaults (see `--concurrency`, `--synapse-concurrency`).
            concurrency: 16,
            room_version: "12".into(),
            // Short, so that the lock tests see a lock lift.
            credential_token_lifetime: Duration::from_secs(CREDENTIAL_TOKEN_LIFETIME_SECS),
        };
        let operator_synapse = match &options.synapse_url {
            Some(url) => stack.synapse_at(url),
            None => stack.synapse(),
        };
        let mut env = TestEnv {
            client,
            run_id,
            namespaces,
            synapse: stack.in_auth_mode(stack.synapse()),
            operator_synapse,
            stats: Default::default(),
            stop: None,
            running: None,
            config,
            options,
        };
        if !env.options.no_operator {
            env.start_operator();
        }
        env
    }

    /// Starts an operator in this process (the test's one).
    fn start_operator(&mut self) {
        let stack = Stack::get();
        let options = &self.options;
        let synapse = self.operator_synapse.clone().with_request_limit(16);
        let operator = Operator::new(
            self.client.clone(),
            match stack.mas_with(options.mas_url.as_deref(), options.mas_secret.as_deref()) {
                Some(mas) => synapse.with_mas(mas),
                None => synapse,
            },
            self.config.clone(),
        )
        // The test process's endpoint serves every in-process operator.
        .with_own_joins(stack.own_joins.clone());
        self.stats = operator.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(stop);
        self.running = Some(tokio::spawn(operator.run(async move {
            let _ = stopped.await;
        })));
    }

    /// Stops the operator (its reconciles in flight finish) and starts a new
    /// one, which remembers nothing but what the API server holds. Its
    /// Synapse requests count on with `operator_synapse.stats()`; `stats`
    /// are the new one's.
    pub async fn restart_operator(&mut self) {
        self.stop_operator().await;
        self.start_operator();
    }

    /// Stops the operator; its reconciles in flight finish first.
    pub async fn stop_operator(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running.await.expect("operator task");
        }
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// Creates a `MatrixUser` from the `spec` JSON, labelled for this test.
    pub async fn create_user(&self, ns: usize, name: &str, spec: serde_json::Value) -> MatrixUser {
        let object: MatrixUser = serde_json::from_value(serde_json::json!({
            "apiVersion": "matrix.openmeet.net/v1alpha1",
            "kind": "MatrixUser",
            "metadata": {"name": name, "namespace": self.ns(ns), "labels": {LABEL: self.run_id}},
            "spec": spec,
        }))
        .expect("user object");
        self.users(ns)
            .create(&PostParams::default(), &object)
            .await
            .expect("create MatrixUser")
    }

    pub fn users(&self, ns: usize) -> Api<MatrixUser> {
        Api::namespaced(self.client.clone(), self.ns(ns))
    }

    /// Merge-patches a user's spec.
    pub async fn patch_user(&self, ns: usize, name: &str, spec: serde_json::Value) {
        self.users(ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": spec})),
            )
            .await
            .expect("patch MatrixUser");
    }

    pub async fn delete_user(&self, ns: usize, name: &str) {
        self.users(ns)
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete MatrixUser");
    }

    /// Waits until the user's Ready condition has this status and reason,
    /// for the current generation.
    pub async fn wait_ready(
        &self,
        ns: usize,
        name: &str,
        status: bool,
        reason: &str,
    ) -> MatrixUser {
        let want = if status { "True" } else { "False" };
        let api = self.users(ns);
        wait_for(&format!("{name} Ready={want} reason={reason}"), || async {
            let user = api.get(name).await.ok()?;
            let st = user.status.as_ref()?;
            let ready = find(&st.conditions, READY)?;
            (ready.status == want
                && ready.reason == reason
                && ready.observed_generation == user.metadata.generation)
                .then_some(user.clone())
        })
        .await
    }

    /// Waits until the object is gone (its finalizer done).
    pub async fn wait_gone<K>(&self, api: &Api<K>, name: &str)
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        wait_for(&format!("{name} deleted"), || async {
            match api.get_opt(name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        })
        .await
    }

    pub fn user_id(&self, localpart: &str) -> ruma::OwnedUserId {
        self.synapse.user_id(localpart).unwrap()
    }

    /// Reasons of Events recorded about an object, once per occurrence.
    pub async fn event_reasons(&self, ns: usize, name: &str) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), self.ns(ns));
        let list = events.list(&Default::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .flat_map(|e| {
                // Repeats are folded into one Event's series.
                let count = e.series.as_ref().map_or(1, |s| s.count.max(1)) as usize;
                std::iter::repeat_n(e.reason.unwrap_or_default(), count)
            })
            .collect()
    }
}

impl TestEnv {
    /// Waits until at least `count` Events with `reason` were recorded about an object.
    pub async fn wait_event(&self, ns: usize, name: &str, reason: &str, count: usize) {
        wait_for(&format!("{count} {reason} event(s) on {name}"), || async {
            let seen = self
                .event_reasons(ns, name)
                .await
                .iter()
                .filter(|r| *r == reason)
                .count();
            (seen >= count).then_some(())
        })
        .await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `probe` every 100 ms until it yields, or panics after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestEnv {
    pub fn api<K>(&self, ns: usize) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), self.ns(ns))
    }

    /// Creates an object of kind `K` from its `spec`, labelled for this test.
    pub async fn create<K>(&self, ns: usize, name: &str, spec: serde_json::Value) -> K
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let object: K = serde_json::from_value(serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"name": name, "namespace": self.ns(ns), "labels": {LABEL: self.run_id}},
            "spec": spec,
        }))
        .expect("object");
        self.api::<K>(ns)
            .create(&PostParams::default(), &object)
            .await
            .expect("create")
    }

    /// Waits until `Ready` has this status and reason for the current generation.
    pub async fn wait_condition<K>(&self, ns: usize, name: &str, status: bool, reason: &str) -> K
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let want = if status { "True" } else { "False" };
        let api = self.api::<K>(ns);
        wait_for(
            &format!("{} {name} Ready={want} reason={reason}", K::kind(&())),
            || async {
                let object = api.get(name).await.ok()?;
                let value = serde_json::to_value(&object).ok()?;
                let ready = value["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Ready")?
                    .clone();
                let current = ready["observedGeneration"] == value["metadata"]["generation"];
                (ready["status"] == want && ready["reason"] == reason && current).then_some(object)
            },
        )
        .await
    }
}

/// The shipped controller binary, configured from the stack like a
/// Deployment would configure it, watching only this test's objects.
pub fn controller_command(env: &TestEnv) -> tokio::process::Command {
    let stack = Stack::get();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_openmeet-matrix-operator"));
    cmd.arg("controller")
        .env("KUBECONFIG", stack.var("KUBECONFIG"))
        .env("SYNAPSE_URL", stack.var("SYNAPSE_URL"))
        .env("MATRIX_SERVER_NAME", stack.var("MATRIX_SERVER_NAME"))
        .env(
            "MATRIX_ADMIN_LOCALPART",
            stack.var("MATRIX_ADMIN_LOCALPART"),
        )
        .env("AS_TOKEN_SECRET", stack.var("AS_TOKEN_SECRET"))
        .env("WATCH_SELECTOR", format!("{LABEL}={}", env.run_id))
        // The test process serves the appservice feed (see `serve_appservice`).
        .env("APPSERVICE_LISTEN", "off")
        .env("METRICS_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    if stack.is_mas() {
        for key in [
            "MATRIX_AUTH",
            "MAS_URL",
            "MAS_CLIENT_ID",
            "MAS_CLIENT_SECRET_FILE",
            "MAS_UPSTREAM_PROVIDER",
        ] {
            cmd.env(key, stack.var(key));
        }
    }
    cmd
}

/// An HTTP client that trusts the stack's CA and follows no redirects.
pub fn https_client() -> reqwest::Client {
    let stack = Stack::get();
    let pem = std::fs::read(stack.var("STACK_CA")).expect("stack CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA certificate"))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("https client")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Forwards connections on `listen` to `target`, passing no bytes either way
/// while `paused` says so: as if the process behind it were stopped (SIGSTOP,
/// a long GC pause). Connections are still accepted, as the kernel would.
async fn forward_pausable(
    listen: std::net::SocketAddr,
    target: std::net::SocketAddr,
    paused: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let paused = paused.clone();
        let mut route = FEED_ROUTE.subscribe();
        tokio::spawn(async move {
            let to = route.borrow_and_update().unwrap_or(target);
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let piped = async {
                tokio::join!(
                    pipe(in_read, out_write, paused.clone()),
                    pipe(out_read, in_write, paused)
                )
            };
            tokio::select! {
                _ = piped => {}
                _ = route.changed() => {}
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Held here while paused: the sender's writes back up in TCP buffers.
        if paused.wait_for(|p| !*p).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Stops the stack's Synapse, keeps it down `down_seconds`, starts it again
/// on the same port and database (`tests/stack/restart-synapse.sh`), and
/// returns once it answers: how long that took.
#[allow(dead_code)] // the benches'
pub async fn restart_synapse(down_seconds: u64) -> Result<Duration, String> {
    let stack = Stack::get();
    let started = Instant::now();
    let status = tokio::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/stack/restart-synapse.sh"
    ))
    .arg(format!("{}/stack.env", stack.var("STACK_DIR")))
    .args(["--down", &down_seconds.to_string()])
    .status()
    .await
    .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(started.elapsed())
    } else {
        Err(format!("restart-synapse.sh: {status}"))
    }
}

/// The Python of a virtualenv with `requirement` (`name==version`, from
/// PyPI) installed, made once per machine outside the repository (in
/// `~/.cache/openmeet-matrix-operator/<name>-<version>-py<X.Y>`) and
/// checked by importing `module`.
pub async fn python_venv(name: &str, version: &str, module: &str) -> std::path::PathBuf {
    // One install at a time in this process: concurrent tests wait for it.
    static INSTALLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let requirement = format!("{name}=={version}");
    let python_version = tokio::process::Command::new("python3")
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .await
        .unwrap_or_else(|e| panic!("python3 is needed to run {name}: {e}"));
    let python_version = String::from_utf8(python_version.stdout)
        .unwrap()
        .trim()
        .to_string();
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
        .join("openmeet-matrix-operator");
    let dir = format!("{name}-{version}-py{python_version}");
    let venv = cache.join(&dir);
    let python = venv.join("bin/python");
    let ready = |python: std::path::PathBuf| async move {
        tokio::process::Command::new(python)
            .args(["-c", &format!("import {module}")])
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    };
    let _installing = INSTALLING.lock().await;
    if ready(python.clone()).await {
        return python;
    }
    // Made aside, then moved into place: a half-made venv is never used.
    let partial = cache.join(format!("{dir}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&cache).unwrap();
    let run = |cmd: &mut tokio::process::Command| {
        let out = cmd.output();
        let requirement = &requirement;
        async move {
            let out = out.await.expect("running python3");
            assert!(
                out.status.success(),
                "installing {requirement}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    run(tokio::process::Command::new("python3")
        .args(["-m", "venv"])
        .arg(&partial))
    .await;
    run(tokio::process::Command::new(partial.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(&requirement))
    .await;
    if std::fs::rename(&partial, &venv).is_err() {
        // Another test process made it meanwhile.
        let _ = std::fs::remove_dir_all(&partial);
    }
    assert!(ready(python.clone()).await, "{requirement} in {venv:?}");
    python
}
