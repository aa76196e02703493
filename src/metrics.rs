//! Prometheus text exposition of the operator's own counters, and health.

use crate::api::conditions::{self, Condition, Health};
use crate::controller::ReconcileStats;
use crate::synapse::RequestStats;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What `/metrics` reads.
#[derive(Clone)]
pub struct Sources {
    pub synapse: Arc<RequestStats>,
    pub reconciles: Arc<ReconcileStats>,
    pub readiness: Option<Arc<Readiness>>,
    /// The application-service endpoint's counters, where it is served.
    pub feed: Option<Arc<crate::controller::appservice::AppserviceStats>>,
    /// Requests to the Kubernetes API server.
    pub kube: Option<Arc<crate::kube_metrics::KubeRequestStats>>,
}

const SYNAPSE_UNREACHABLE: &str = "Synapse is unreachable";
const CREDENTIALS_REFUSED: &str = "MAS refused the operator's client credentials";
/// How often the background probe asks Synapse (and MAS).
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What `/readyz` means: this replica can do its work. On the replica that
/// reconciles, its caches are complete; a standby is ready at once (it
/// serves the application-service endpoint). Synapse being down makes no
/// replica unready (there would be no replica to take Synapse's
/// transactions when it returns, and a node drain would wait on Synapse):
/// the background probe reports it in `openmeet_synapse_reachable`. Only
/// what this replica's configuration gets wrong (MAS refusing its client
/// credentials) keeps it out of service.
pub struct Readiness {
    pub leading: std::sync::atomic::AtomicBool,
    pub synced: Arc<std::sync::atomic::AtomicBool>,
    pub synapse: crate::synapse::SynapseClient,
    last_probe: std::sync::Mutex<Option<Result<(), &'static str>>>,
}

impl Readiness {
    pub fn new(
        synapse: crate::synapse::SynapseClient,
        synced: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Readiness {
            leading: Default::default(),
            synced,
            synapse,
            last_probe: Default::default(),
        }
    }

    /// `Ok(note)` when ready (the note says what the probe last found),
    /// `Err(reason)` when not.
    pub fn check(&self) -> Result<&'static str, &'static str> {
        if self.leading.load(Ordering::Acquire) && !self.synced.load(Ordering::Acquire) {
            return Err("caches are syncing");
        }
        match *self.last_probe.lock().expect("probe lock") {
            Some(Err(CREDENTIALS_REFUSED)) => Err(CREDENTIALS_REFUSED),
            Some(Err(unreachable)) => Ok(unreachable),
            Some(Ok(())) | None => Ok("ok"),
        }
    }

    /// Probes Synapse (and MAS) every `every`, until the process ends.
    pub async fn probe_every(&self, every: std::time::Duration) {
        loop {
            self.probe_now().await;
            tokio::time::sleep(every).await;
        }
    }

    /// Probes Synapse (and MAS) once, for the gauge and `/readyz`.
    pub async fn probe_now(&self) {
        let verdict = self.probe().await;
        *self.last_probe.lock().expect("probe lock") = Some(verdict);
    }

    /// Synapse answers; in MAS mode MAS answers too and grants the
    /// operator's client a token (a wrong secret says so here).
    async fn probe(&self) -> Result<(), &'static str> {
        if !self.synapse.reachable().await {
            return Err(SYNAPSE_UNREACHABLE);
        }
        match self.synapse.mas().map(|mas| mas.check_credentials()) {
            None => Ok(()),
            Some(check) => match check.await {
                Ok(()) => Ok(()),
                Err(crate::mas::MasError::Credentials(_)) => Err(CREDENTIALS_REFUSED),
                Err(_) => Err("MAS is unreachable"),
            },
        }
    }
}

async fn readyz(State(sources): State<Sources>) -> axum::response::Response {
    let verdict = match &sources.readiness {
        Some(r) => r.check(),
        None => Ok("ok"),
    };
    match verdict {
        Ok(note) => note.into_response(),
        Err(reason) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

/// Label sets are small fixed vectors; every value comes from a closed set
/// (object kinds, request kinds, status classes, route templates).
pub type Labels = Vec<(&'static str, String)>;
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// A histogram family of durations in seconds.
pub fn latency_family() -> HistogramFamily {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

/// `2xx`…`5xx`, or `error` when there was no answer.
pub fn status_class(status: Option<u16>) -> String {
    match status {
        Some(s) if (100..600).contains(&s) => format!("{}xx", s / 100),
        _ => "error".to_string(),
    }
}

/// The `(reason, health)` labels an object counts under, from a closed set:
/// reasons outside the known table count as `Other`, and objects without a
/// Ready condition (not reached yet) as `Unobserved`.
pub fn ready_bucket(ready: Option<&Condition>) -> (&'static str, &'static str) {
    let Some(ready) = ready else {
        return ("Unobserved", health_label(Health::Reconciling));
    };
    let reason = conditions::REASONS
        .iter()
        .map(|(r, _)| *r)
        .find(|r| *r == ready.reason)
        .unwrap_or("Other");
    (reason, health_label(conditions::health(ready)))
}

/// Counts objects by (kind, Ready reason, health), as [`ready_bucket`] labels
/// each. The controller keeps these counts from watch events instead
/// (`controller::tally`); this is the recount they must agree with.
pub fn count_by_reason<'c>(
    objects: impl IntoIterator<Item = (&'static str, Option<&'c Condition>)>,
) -> BTreeMap<(&'static str, &'static str, &'static str), i64> {
    let mut counted = BTreeMap::new();
    for (kind, ready) in objects {
        let (reason, health) = ready_bucket(ready);
        *counted.entry((kind, reason, health)).or_insert(0) += 1;
    }
    counted
}

/// The `health` label of a [`Health`].
pub fn health_label(health: Health) -> &'static str {
    match health {
        Health::Ready => "ready",
        Health::Reconciling => "reconciling",
        Health::Stalled => "stalled",
    }
}

/// Renders every metric in the Prometheus text format.
/// `openmeet_build_info`, the same on both binaries.
pub fn register_build_info(registry: &mut Registry) {
    let build = Family::<Labels, Gauge>::default();
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
        .set(1);
    registry.register(
        "openmeet_build_info",
        "The running build: always 1, labelled with its version",
        build,
    );
}

/// Linux reports process times in USER_HZ ticks, 100 a second on every
/// architecture it runs containers on.
const USER_HZ: f64 = 100.0;

/// The process's own figures, by Prometheus's conventional names, read from
/// `/proc/self` at each scrape (nothing is exported where it cannot be read).
#[derive(Debug, Default, PartialEq)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub start_time_seconds: f64,
}

impl ProcessFigures {
    /// Parsed from `/proc/self/stat` and `/proc/stat` (boot time); open
    /// descriptors are counted apart.
    pub fn parse(stat: &str, proc_stat: &str, page_size: u64) -> Option<Self> {
        // Fields after the command name (which may hold spaces and parens).
        let after = stat.rsplit_once(") ")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // stat(5) numbers fields from 1 with pid and comm first: utime is
        // 14, stime 15, starttime 22, vsize 23, rss 24.
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let boot: u64 = proc_stat
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        Some(ProcessFigures {
            cpu_seconds: (field(14)? + field(15)?) as f64 / USER_HZ,
            start_time_seconds: boot as f64 + field(22)? as f64 / USER_HZ,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page_size,
            open_fds: 0,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let proc_stat = std::fs::read_to_string("/proc/stat").ok()?;
        let mut figures = Self::parse(&stat, &proc_stat, 4096)?;
        figures.open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some(figures)
    }
}

/// `process_*`: CPU, memory, open descriptors and start time.
pub fn register_process(registry: &mut Registry) {
    let Some(p) = ProcessFigures::read() else {
        return;
    };
    let gauge = |value: f64| {
        let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        g.set(value);
        g
    };
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(p.cpu_seconds);
    registry.register(
        "process_cpu_seconds",
        "User and system CPU time spent, in seconds",
        cpu,
    );
    registry.register(
        "process_resident_memory_bytes",
        "Resident memory size, in bytes",
        gauge(p.resident_bytes as f64),
    );
    registry.register(
        "process_virtual_memory_bytes",
        "Virtual memory size, in bytes",
        gauge(p.virtual_bytes as f64),
    );
    registry.register(
        "process_open_fds",
        "Open file descriptors",
        gauge(p.open_fds as f64),
    );
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        gauge(p.start_time_seconds),
    );
}

pub fn render(sources: &Sources) -> String {
    let mut registry = Registry::default();
    register_build_info(&mut registry);
    register_process(&mut registry);
    if let Some(readiness) = &sources.readiness {
        let leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        leader.set(readiness.leading.load(Ordering::Acquire) as i64);
        registry.register(
            "openmeet_leader",
            "1 on the replica that holds the leader Lease and reconciles, else 0",
            leader,
        );
        let synced = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        synced.set(readiness.synced.load(Ordering::Acquire) as i64);
        registry.register(
            "openmeet_caches_synced",
            "1 once the controllers' caches are complete (a standby's too: it takes over warm)",
            synced,
        );
        // From the readiness probe's last answer; no sample before the first.
        let reachable = Family::<Labels, Gauge>::default();
        if let Some(verdict) = *readiness.last_probe.lock().expect("probe lock") {
            let ok = verdict != Err(SYNAPSE_UNREACHABLE);
            reachable.get_or_create(&Vec::new()).set(ok as i64);
        }
        registry.register(
            "openmeet_synapse_reachable",
            "1 when Synapse answered this replica's last probe (every 10 s), 0 when it did not",
            reachable,
        );
    }
    sources.synapse.register(&mut registry);
    sources.reconciles.register(&mut registry);
    if let Some(feed) = &sources.feed {
        feed.register(&mut registry);
    }
    if let Some(kube) = &sources.kube {
        kube.register(&mut registry);
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "metrics: encoding failed");
    }
    out
}

async fn metrics(State(sources): State<Sources>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&sources),
    )
}

pub fn router(sources: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(sources)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The address bound (a `:0` port resolved): `make dev` prints it.
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, router(sources))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_come_from_proc() {
        let stat = "1234 (openmeet (op)) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 8 0 1000 123456789 2048 18446744073709551615";
        let figures = ProcessFigures::parse(stat, "cpu  1 2 3\nbtime 1700000000\n", 4096);
        assert_eq!(
            figures,
            Some(ProcessFigures {
                cpu_seconds: 3.0,
                resident_bytes: 2048 * 4096,
                virtual_bytes: 123_456_789,
                open_fds: 0,
                start_time_seconds: 1_700_000_010.0,
            })
        );
        assert_eq!(ProcessFigures::parse("garbage", "", 4096), None);
        // This process's own, as exported.
        let mut registry = Registry::default();
        register_process(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(out.contains(name), "{name} missing from:\n{out}");
        }
    }

    #[test]
    fn renders_counters_and_histograms_with_bounded_labels() {
        let sources = Sources {
            synapse: Arc::default(),
            reconciles: Arc::default(),
            readiness: None,
            feed: Some(Arc::default()),
            kube: None,
        };
        use crate::controller::outcome::Outcome;
        let timer = sources.reconciles.start("MatrixUser", "t/alice");
        timer.finish(Outcome::Ready);
        sources
            .reconciles
            .start("MatrixRoom", "t/a")
            .finish(Outcome::Error);
        sources
            .reconciles
            .start("MatrixRoom", "t/b")
            .finish(Outcome::Stalled);
        sources.synapse.record(
            crate::synapse::RequestKind::GetUser,
            Some(404),
            std::time::Duration::from_millis(3),
        );
        let feed = sources.feed.as_ref().unwrap();
        feed.marks.fetch_add(2, Ordering::Relaxed);
        feed.own_joins.fetch_add(3, Ordering::Relaxed);
        let text = render(&sources);
        for expected in [
            "openmeet_feed_drift_marks_total 2",
            "openmeet_feed_own_joins_total 3",
            "openmeet_feed_transactions_total 0",
            "openmeet_reconciles_total{kind=\"MatrixUser\",outcome=\"ready\"} 1",
            "openmeet_reconciles_total{kind=\"MatrixRoom\",outcome=\"error\"} 1",
            "openmeet_reconciles_total{kind=\"MatrixRoom\",outcome=\"stalled\"} 1",
            &format!(
                "openmeet_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "openmeet_reconciles_in_flight{kind=\"MatrixUser\"} 0",
            "openmeet_reconcile_duration_seconds_count{kind=\"MatrixUser\"} 1",
            "openmeet_synapse_requests_total{endpoint=\"get_user\",status=\"4xx\",write=\"false\"} 1",
            "openmeet_synapse_request_duration_seconds_bucket{le=\"0.004\",endpoint=\"get_user\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }

    #[test]
    fn objects_are_counted_by_a_closed_set_of_reasons() {
        use crate::api::conditions::READY;
        let c = |ok, reason: &str| Condition::new(READY, ok, reason, "", Some(1));
        let (converged, conflict) = (c(true, "Converged"), c(false, "LocalpartConflict"));
        let (unlisted, pending) = (c(false, "SomethingNobodyListed"), c(false, "Pending"));
        let counted = count_by_reason([
            ("MatrixUser", Some(&converged)),
            ("MatrixUser", Some(&converged)),
            ("MatrixUser", Some(&conflict)),
            ("MatrixUser", None),
            ("MatrixRoom", Some(&unlisted)),
            ("RoomPermission", Some(&pending)),
        ]);
        let expected: BTreeMap<_, _> = [
            (("MatrixUser", "Converged", "ready"), 2),
            (("MatrixUser", "LocalpartConflict", "stalled"), 1),
            (("MatrixUser", "Unobserved", "reconciling"), 1),
            (("MatrixRoom", "Other", "reconciling"), 1),
            (("RoomPermission", "Pending", "reconciling"), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(counted, expected);
    }

    #[test]
    fn status_classes_are_bounded() {
        assert_eq!(status_class(Some(204)), "2xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "error");
        assert_eq!(status_class(Some(999)), "error");
    }
}
