//! `make bench`: converge a tenant of 100 rooms, 1,000 users and 2,000
//! permissions from empty on the local stack, and compare with the minimal
//! request sequence a plain client would issue directly against Synapse.
//! Prints figures; asserts nothing about time.
//!
//! `BENCH_SCALE=10` multiplies the tenant (10,000 users, 1,000 rooms,
//! 20,000 permissions); `BENCH_USERS` / `BENCH_ROOMS` set it directly.
//! `SYNAPSE_DATABASE=postgres` runs it against Synapse on PostgreSQL.
//! `MATRIX_AUTH=mas` runs it against Synapse with MAS (accounts in MAS).
//! `BENCH_MINIMAL=0` skips replaying the minimal sequence (it doubles a
//! large run; the ratio is then taken from the smaller size).
//! `BENCH_IDLE_SECS` sets the idle window measured after a restart (600).
//! `BENCH_DECLARE_FIRST=1` creates the whole tenant before the controller
//! starts and the clock runs, so the bench's own creates do not share the
//! machine with Synapse while it converges.
//! After it: drift samples, a failover (the leader SIGKILLed while a warm
//! standby waits), and a Synapse outage met by a controller taking over.
//! `STACK_CONTROL_PLANE_CPUS=1` pins etcd and kube-apiserver to CPU 1, so
//! they cannot take Synapse's core; the header says so when it is set.
//! `STACK_CONTROL_PLANE_NICE=19` runs them at that nice level instead: they
//! get only the CPU the rest leaves, as a control plane on other machines.

#[allow(dead_code)]
#[path = "../tests/integration/harness.rs"]
mod harness;

use futures::StreamExt;
use harness::{Options, Stack, TestEnv, LABEL};
use kube::api::PostParams;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use openmeet_matrix_operator::api::conditions::{self, Condition};
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const USERS: usize = 1000;
const ROOMS: usize = 100;
const PERMISSIONS_PER_USER: usize = 2;
/// Synapse requests in flight at once: the operator's cap, and the minimal
/// sequence's. The operator's reconciles per kind stay at their default.
const CONCURRENCY: usize = 16;
const DRIFT_SAMPLES: usize = 100;

/// API-server requests the bench itself makes (creates and Ready counts),
/// subtracted from the API server's own count to leave the operator's.
static BENCH_API_REQUESTS: AtomicU64 = AtomicU64::new(0);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Controller {
    child: tokio::process::Child,
    metrics: String,
}

/// The endpoint every controller of the run serves the feed on, one at a
/// time: as in production, the process that joins members also receives
/// their membership events.
fn feed_endpoint() -> std::net::SocketAddr {
    static FEED: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();
    *FEED.get_or_init(|| {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], harness::free_port()));
        harness::route_feed(Some(addr));
        addr
    })
}

async fn start_controller(env: &TestEnv) -> Controller {
    start_replica(env, None, feed_endpoint()).await
}

/// A controller serving the feed on `feed`; with `lease` (its name and this
/// replica's), a replica electing its leader there, at the product's lease
/// settings.
async fn start_replica(
    env: &TestEnv,
    lease: Option<(&str, &str)>,
    feed: std::net::SocketAddr,
) -> Controller {
    // The previous controller, killed, may hold the feed's port a moment longer.
    while std::net::TcpListener::bind(feed).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = harness::controller_command(env);
    if let Some((lease, name)) = lease {
        command
            .env("LEADER_ELECT", "true")
            .env("LEASE_NAME", lease)
            .env("POD_NAMESPACE", env.ns(0))
            .env("POD_NAME", name);
    }
    command.env("APPSERVICE_LISTEN", feed.to_string());
    let child = command
        .env("SYNAPSE_CONCURRENCY", CONCURRENCY.to_string())
        // The periodic resync (every 240 to 360 s) is not part of converging
        // and would fall inside a slow run; it is measured on its own below.
        .env("RESYNC_SECONDS", "36000")
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .expect("controller binary");
    Controller {
        child,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
    }
}

impl Controller {
    async fn requests(&self) -> BTreeMap<String, (u64, bool)> {
        let text = loop {
            match reqwest::get(&self.metrics).await {
                Ok(r) => break r.text().await.unwrap(),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        // One line per endpoint and status class: summed per endpoint.
        let mut by_kind: BTreeMap<String, (u64, bool)> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("openmeet_synapse_requests_total{endpoint=\"")
            else {
                continue;
            };
            let Some((kind, rest)) = rest.split_once('"') else {
                continue;
            };
            let write = rest.contains("write=\"true\"");
            let Some(count) = rest.rsplit(' ').next().and_then(|c| c.parse::<u64>().ok()) else {
                continue;
            };
            let entry = by_kind.entry(kind.to_string()).or_insert((0, write));
            entry.0 += count;
        }
        by_kind
    }

    /// The feed's counters: drift marks, and joins recognised as its own.
    async fn feed(&self) -> (u64, u64) {
        let text = reqwest::get(&self.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counter = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (
            counter("openmeet_feed_drift_marks_total"),
            counter("openmeet_feed_own_joins_total"),
        )
    }

    /// Totals the timeline samples: Synapse requests completed, the sum of
    /// their latencies (seconds), and reconciles in flight.
    async fn totals(&self) -> Option<Totals> {
        let text = reqwest::get(&self.metrics).await.ok()?.text().await.ok()?;
        let mut t = Totals::default();
        for line in text.lines() {
            let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if line.starts_with("openmeet_synapse_requests_total{") {
                t.requests += value().unwrap_or(0.0) as u64;
            } else if line.starts_with("openmeet_synapse_request_duration_seconds_sum") {
                t.latency_seconds += value().unwrap_or(0.0);
            } else if line.starts_with("openmeet_reconciles_in_flight") {
                t.reconciles_in_flight += value().unwrap_or(0.0);
            }
        }
        Some(t)
    }

    /// CPU time (user + system) the controller process has used, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and
        // stime are the 12th and 13th.
        let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        ticks / clock_ticks_per_second()
    }

    /// Peak resident memory of the controller process, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// CPU-seconds used so far by the stack's processes, by part: Synapse,
/// PostgreSQL, the API server with etcd, and this bench (its watches and
/// its replay). They share the machine's cores with the operator: what the
/// others spend, Synapse may lack.
#[derive(Clone, Copy, Debug, Default)]
struct StackCpu {
    synapse: f64,
    postgres: f64,
    api_server: f64,
    bench: f64,
}

impl StackCpu {
    fn now() -> Self {
        let mut cpu = StackCpu::default();
        let ticks = clock_ticks_per_second();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        let own = std::process::id().to_string();
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let part = if entry.file_name().to_str() == Some(own.as_str()) {
                &mut cpu.bench
            } else if cmdline.contains("synapse.app.homeserver") {
                &mut cpu.synapse
            } else if cmdline.starts_with("postgres") || cmdline.contains("/bin/postgres ") {
                &mut cpu.postgres
            } else if cmdline.contains("/kube-apiserver ") || cmdline.contains("/etcd ") {
                &mut cpu.api_server
            } else {
                continue;
            };
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or("");
            let fields: Vec<&str> = after.split_whitespace().collect();
            *part += [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
                .sum::<f64>()
                / ticks;
        }
        cpu
    }

    fn since(self, earlier: StackCpu) -> StackCpu {
        StackCpu {
            synapse: self.synapse - earlier.synapse,
            postgres: self.postgres - earlier.postgres,
            api_server: self.api_server - earlier.api_server,
            bench: self.bench - earlier.bench,
        }
    }

    fn line(&self, what: &str, seconds: f64) -> String {
        format!(
            "  {what:<26} Synapse {:>6.1} s   API server + etcd {:>6.1} s   PostgreSQL {:>6.1} s   bench {:>5.1} s   (of {:.0} s x 2 cores)",
            self.synapse, self.api_server, self.postgres, self.bench, seconds
        )
    }
}

fn clock_ticks_per_second() -> f64 {
    // Asked once: the timeline reads CPU every second.
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[derive(Clone, Copy, Default)]
struct Totals {
    requests: u64,
    latency_seconds: f64,
    reconciles_in_flight: f64,
}

/// One second of convergence as the controller's metrics show it.
struct Second {
    /// Synapse requests completed in this second.
    requests: u64,
    /// Latency completed in this second: the mean number of Synapse
    /// requests in flight (Little's law, one-second resolution).
    in_flight: f64,
    reconciles_in_flight: f64,
    /// CPU-seconds the stack's parts and the controller used in this second:
    /// where Synapse lost its core, if it did.
    stack: StackCpu,
    controller: f64,
}

/// Samples the controller's metrics every second until `done` is set.
async fn sample_timeline(
    controller: Arc<Controller>,
    done: Arc<tokio::sync::Notify>,
) -> Vec<Second> {
    let mut seconds = Vec::new();
    let mut previous = controller.totals().await.unwrap_or_default();
    let (mut previous_stack, mut previous_cpu) = (StackCpu::now(), controller.cpu_seconds());
    let mut tick = seconds_ticker().await;
    while next_second(&mut tick, &done).await {
        let Some(now) = controller.totals().await else {
            continue;
        };
        let (stack, cpu) = (StackCpu::now(), controller.cpu_seconds());
        seconds.push(Second {
            requests: now.requests.saturating_sub(previous.requests),
            in_flight: (now.latency_seconds - previous.latency_seconds).max(0.0),
            reconciles_in_flight: now.reconciles_in_flight,
            stack: stack.since(previous_stack),
            controller: cpu - previous_cpu,
        });
        (previous, previous_stack, previous_cpu) = (now, stack, cpu);
    }
    seconds
}

/// A once-a-second ticker whose first tick has passed.
async fn seconds_ticker() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    tick
}

/// Waits for the next second; false once `done` is notified.
async fn next_second(tick: &mut tokio::time::Interval, done: &tokio::sync::Notify) -> bool {
    tokio::select! {
        _ = tick.tick() => true,
        _ = done.notified() => false,
    }
}

fn print_timeline(seconds: &[Second]) {
    if seconds.is_empty() {
        return;
    }
    let idle: Vec<usize> = seconds
        .iter()
        .enumerate()
        .filter(|(_, s)| s.requests == 0)
        .map(|(i, _)| i)
        .collect();
    let mean_in_flight = seconds.iter().map(|s| s.in_flight).sum::<f64>() / seconds.len() as f64;
    let mut rates: Vec<f64> = seconds.iter().map(|s| s.requests as f64).collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "timeline: {} s sampled; Synapse requests/s p50 {:.0}, max {:.0}; mean Synapse requests in flight {:.1} (of {CONCURRENCY} allowed)",
        seconds.len(),
        rates[rates.len() / 2],
        rates[rates.len() - 1],
        mean_in_flight
    );
    println!(
        "seconds with Synapse idle (no request completed) before all Ready: {} {}",
        idle.len(),
        ranges(&idle)
    );
    // One line per tenth of the run: where the tail is.
    let step = seconds.len().div_ceil(10).max(1);
    for (k, chunk) in seconds.chunks(step).enumerate() {
        let requests: u64 = chunk.iter().map(|s| s.requests).sum();
        let in_flight = chunk.iter().map(|s| s.in_flight).sum::<f64>() / chunk.len() as f64;
        let reconciles =
            chunk.iter().map(|s| s.reconciles_in_flight).sum::<f64>() / chunk.len() as f64;
        let cpu = tenth_cpu(chunk.iter().map(|s| s.stack));
        let controller = chunk.iter().map(|s| s.controller).sum::<f64>() / chunk.len() as f64;
        println!(
            "  {:>5}-{:<5}s {:>6.0} req/s  {:>5.1} Synapse requests in flight  {:>5.1} reconciles in flight  CPU: {cpu}, controller {:>3.0} %",
            k * step,
            k * step + chunk.len(),
            requests as f64 / chunk.len() as f64,
            in_flight,
            reconciles,
            controller * 100.0
        );
    }
}

/// Mean share of one core per part over some seconds, as "Synapse 97 %, ...".
fn tenth_cpu(seconds: impl Iterator<Item = StackCpu>) -> String {
    let (mut sum, mut n) = (StackCpu::default(), 0.0);
    for s in seconds {
        sum.synapse += s.synapse;
        sum.api_server += s.api_server;
        sum.postgres += s.postgres;
        sum.bench += s.bench;
        n += 1.0;
    }
    let n = f64::max(n, 1.0);
    let mut line = format!(
        "Synapse {:>3.0} %, API server + etcd {:>3.0} %",
        sum.synapse * 100.0 / n,
        sum.api_server * 100.0 / n
    );
    if sum.postgres > 0.0 {
        line += &format!(", PostgreSQL {:>3.0} %", sum.postgres * 100.0 / n);
    }
    line + &format!(", bench {:>3.0} %", sum.bench * 100.0 / n)
}

/// The stack's CPU each second until `done`: the minimal sequence's profile,
/// to set beside the operator's timeline.
async fn sample_stack_cpu(done: Arc<tokio::sync::Notify>) -> Vec<StackCpu> {
    let mut seconds = Vec::new();
    let mut previous = StackCpu::now();
    let mut tick = seconds_ticker().await;
    while next_second(&mut tick, &done).await {
        let now = StackCpu::now();
        seconds.push(now.since(previous));
        previous = now;
    }
    seconds
}

fn print_stack_cpu(what: &str, seconds: &[StackCpu]) {
    if seconds.is_empty() {
        return;
    }
    println!("{what}, CPU per tenth (share of one core):");
    let step = seconds.len().div_ceil(10).max(1);
    for (k, chunk) in seconds.chunks(step).enumerate() {
        println!(
            "  {:>5}-{:<5}s {}",
            k * step,
            k * step + chunk.len(),
            tenth_cpu(chunk.iter().copied())
        );
    }
}

/// `[3-5, 9]` for seconds 3, 4, 5 and 9.
fn ranges(seconds: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seconds.len() {
        let start = seconds[i];
        while i + 1 < seconds.len() && seconds[i + 1] == seconds[i] + 1 {
            i += 1;
        }
        parts.push(if seconds[i] == start {
            format!("{start}")
        } else {
            format!("{start}-{}", seconds[i])
        });
        i += 1;
    }
    format!("[{}]", parts.join(", "))
}

/// Requests the API server has served for the operator's kinds and events
/// (its own `apiserver_request_total`), by resource, subresource and verb.
/// Includes the bench's own creates and Ready lists (counted apart).
async fn api_requests_by_kind() -> BTreeMap<String, u64> {
    let stack = Stack::get();
    let output = tokio::process::Command::new(stack.var("KUBECTL"))
        .args(["get", "--raw", "/metrics"])
        .env("KUBECONFIG", stack.var("KUBECONFIG"))
        .output()
        .await
        .expect("kubectl");
    let text = String::from_utf8_lossy(&output.stdout);
    let label = |line: &str, name: &str| -> String {
        let start = format!("{name}=\"");
        line.split(&start)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    let mut by_kind = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        if !(line.contains("group=\"matrix.openmeet.net\"") || line.contains("resource=\"events\""))
        {
            continue;
        }
        let Some(count) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let subresource = label(line, "subresource");
        let kind = format!(
            "{}{}{} {}",
            label(line, "resource"),
            if subresource.is_empty() { "" } else { "/" },
            subresource,
            label(line, "verb")
        );
        *by_kind.entry(kind).or_insert(0) += count as u64;
    }
    by_kind
}

/// The operator's share: everything but the bench's own requests.
async fn operator_api_requests() -> (u64, BTreeMap<String, u64>) {
    let by_kind = api_requests_by_kind().await;
    let total: u64 = by_kind.values().sum();
    (
        total.saturating_sub(BENCH_API_REQUESTS.load(Ordering::Relaxed)),
        by_kind,
    )
}

/// Objects Ready, kept from a watch of one kind. Listing every object each
/// second cost the API server more CPU than all of the operator's requests,
/// and on a shared machine that CPU comes out of Synapse's.
struct ReadyWatch<K: kube::Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    conditions: fn(&K) -> Option<&[Condition]>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> ReadyWatch<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn start(api: Api<K>, conditions: fn(&K) -> Option<&[Condition]>) -> Self {
        // Its list and its watch (a watch the API server ends is resumed: a few more).
        BENCH_API_REQUESTS.fetch_add(2, Ordering::Relaxed);
        let (store, writer) = reflector::store();
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o| o.meta_mut().managed_fields = None);
        let task = tokio::spawn(reflector(writer, stream).for_each(|_| futures::future::ready(())));
        ReadyWatch {
            store,
            conditions,
            task,
        }
    }

    fn count(&self) -> usize {
        self.store
            .state()
            .iter()
            .filter(|o| {
                (self.conditions)(o)
                    .and_then(|c| conditions::find(c, conditions::READY))
                    .is_some_and(Condition::is_true)
            })
            .count()
    }
}

impl<K: kube::Resource<DynamicType = ()>> Drop for ReadyWatch<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn create_all<K>(api: Api<K>, objects: Vec<K>)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for o in objects {
        let (api, gate) = (api.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            BENCH_API_REQUESTS.fetch_add(1, Ordering::Relaxed);
            api.create(&PostParams::default(), &o).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn object<K: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>>(
    run: &str,
    name: &str,
    spec: Value,
) -> K {
    serde_json::from_value(json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": {"name": name, "labels": {LABEL: run}}, "spec": spec,
    }))
    .unwrap()
}

/// Which rooms user `u` belongs to, and with what role.
fn memberships(u: usize, rooms: usize) -> Vec<(usize, &'static str)> {
    (0..PERMISSIONS_PER_USER)
        .map(|k| {
            let room = (u + k * rooms / PERMISSIONS_PER_USER) % rooms;
            let role = match u / rooms {
                0 => "Admin",
                1 | 2 => "Moderator",
                _ => "Member",
            };
            (room, role)
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let scale = env_usize("BENCH_SCALE", 1).max(1);
    let users = env_usize("BENCH_USERS", USERS * scale);
    let rooms = env_usize("BENCH_ROOMS", ROOMS * scale);
    let converge_limit = Duration::from_secs(env_usize("BENCH_TIMEOUT_SECS", 1800 * scale) as u64);
    let env = TestEnv::with(
        "bench",
        Options {
            no_operator: true,
            ..Default::default()
        },
    )
    .await;
    let run = env.run_id.clone();
    let declare_first = env_usize("BENCH_DECLARE_FIRST", 0) == 1;
    let (api_before, kinds_before) = operator_api_requests().await;

    // --- converge from empty -------------------------------------------------
    let ready_users = ReadyWatch::start(env.api::<MatrixUser>(0), |u| {
        u.status.as_ref().map(|s| s.conditions.as_slice())
    });
    let ready_rooms = ReadyWatch::start(env.api::<MatrixRoom>(0), |r| {
        r.status.as_ref().map(|s| s.conditions.as_slice())
    });
    let ready_perms = ReadyWatch::start(env.api::<RoomPermission>(0), |p| {
        p.status.as_ref().map(|s| s.conditions.as_slice())
    });
    let objects = users * (1 + PERMISSIONS_PER_USER) + rooms;
    let poll = Duration::from_millis(100 * (objects / 3000).max(1) as u64);
    let user_objects: Vec<MatrixUser> = (0..users)
        .map(|u| {
            object(
                &run,
                &format!("u{u}"),
                json!({"localpart": format!("{run}-u{u}")}),
            )
        })
        .collect();
    let room_objects: Vec<MatrixRoom> = (0..rooms)
        .map(|r| {
            object(
                &run,
                &format!("r{r}"),
                json!({"alias": format!("{run}-r{r}"), "name": format!("Room {r}")}),
            )
        })
        .collect();
    let mut perm_objects: Vec<RoomPermission> = Vec::new();
    for u in 0..users {
        for (room, role) in memberships(u, rooms) {
            let spec = json!({"roomRef": {"name": format!("r{room}")}, "userRef": {"name": format!("u{u}")}, "role": role});
            perm_objects.push(object(&run, &format!("u{u}-r{room}"), spec));
        }
    }
    let permission_count = perm_objects.len();
    let create_tenant = async {
        let creating = Instant::now();
        tokio::join!(
            create_all(env.api::<MatrixUser>(0), user_objects),
            create_all(env.api::<MatrixRoom>(0), room_objects),
            create_all(env.api::<RoomPermission>(0), perm_objects),
        );
        creating.elapsed()
    };
    // By default the clock runs from an empty tenant with the controller up,
    // and the bench's creates share the machine with Synapse; declared first,
    // the controller starts on the whole tenant (as on a separate control
    // plane, or an install onto a running platform).
    let start = || async {
        let controller = Arc::new(start_controller(&env).await);
        let done = Arc::new(tokio::sync::Notify::new());
        let timeline = tokio::spawn(sample_timeline(controller.clone(), done.clone()));
        (controller, done, timeline, StackCpu::now(), Instant::now())
    };
    let (created, (controller, timeline_done, timeline, stack_cpu_before, started)) =
        if declare_first {
            let created = create_tenant.await;
            (created, start().await)
        } else {
            let running = start().await;
            (create_tenant.await, running)
        };
    // At the limit the run still reports what it measured, for that partial
    // convergence, and fails at the end.
    let mut shortfall = None;
    loop {
        let (u, r, p) = (
            ready_users.count(),
            ready_rooms.count(),
            ready_perms.count(),
        );
        if u == users && r == rooms && p == permission_count {
            break;
        }
        if started.elapsed() >= converge_limit {
            shortfall = Some((u, r, p));
            break;
        }
        // Counted in this process, from the watches: every 100 ms per 3,000 objects.
        tokio::time::sleep(poll).await;
    }
    drop((ready_users, ready_rooms, ready_perms));
    let converge_time = started.elapsed();
    let requests = controller.requests().await;
    let (drift_marks, own_joins) = controller.feed().await;
    timeline_done.notify_one();
    let timeline = timeline.await.unwrap();
    let cpu_seconds = controller.cpu_seconds();
    let stack_cpu = StackCpu::now().since(stack_cpu_before);
    let (api_after, kinds_after) = operator_api_requests().await;
    let api_requests = api_after.saturating_sub(api_before);
    let mut api_by_kind: Vec<(String, u64)> = kinds_after
        .into_iter()
        .map(|(k, n)| {
            let before = kinds_before.get(&k).copied().unwrap_or(0);
            (k, n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    api_by_kind.sort_by_key(|k| std::cmp::Reverse(k.1));

    // --- the minimal sequence, issued directly ------------------------------
    // Skippable at large sizes, where it doubles the run: the ratio is then
    // the smaller size's.
    let minimal = if env_usize("BENCH_MINIMAL", 1) == 0 || shortfall.is_some() {
        None
    } else {
        let before = StackCpu::now();
        let sampled = Arc::new(tokio::sync::Notify::new());
        let sampler = tokio::spawn(sample_stack_cpu(sampled.clone()));
        let (time, requests) = minimal_sequence(&run, users, rooms).await;
        sampled.notify_one();
        let profile = sampler.await.unwrap();
        Some((time, requests, StackCpu::now().since(before), profile))
    };

    // --- a restart, idle, then drift (a fresh controller) -------------------
    let rss_kib = controller.peak_rss_kib();
    drop(Arc::into_inner(controller).expect("the sampler has stopped"));
    // Both need a converged tenant: a fresh controller would otherwise
    // carry on converging, and drift would be measured against that.
    let quiet_and_drift = if shortfall.is_none() {
        Some(restart_idle_and_drift(&env, &run, users, rooms).await)
    } else {
        None
    };
    let failover = if shortfall.is_none() {
        Some(failover(&env, &run, rooms).await)
    } else {
        None
    };
    let outage = if shortfall.is_none() {
        Some(outage(&env).await)
    } else {
        None
    };

    let total: u64 = requests.values().map(|(c, _)| c).sum();
    println!("\n=== make bench: {users} users, {rooms} rooms, {permission_count} permissions, Synapse concurrency {CONCURRENCY} ===");
    if Stack::get().shared_mas().is_some() {
        println!("MAS mode (MATRIX_AUTH=mas): accounts through MAS's admin API; MAS's requests count with Synapse's");
    }
    if let Ok(cpus) = std::env::var("STACK_CONTROL_PLANE_CPUS") {
        println!("etcd and kube-apiserver pinned to CPUs {cpus} (STACK_CONTROL_PLANE_CPUS); everything else unpinned");
    }
    if let Ok(level) = std::env::var("STACK_CONTROL_PLANE_NICE") {
        println!("etcd and kube-apiserver at nice level {level} (STACK_CONTROL_PLANE_NICE)");
    }
    let declared = if declare_first {
        ", before the controller started and the clock ran (BENCH_DECLARE_FIRST=1)"
    } else {
        ""
    };
    println!(
        "objects created in the API server in {:.2}s{declared}",
        created.as_secs_f64()
    );
    match shortfall {
        None => println!(
            "operator: all Ready after {:.2}s",
            converge_time.as_secs_f64()
        ),
        Some((u, r, p)) => println!(
            "operator: NOT all Ready at the {:.0}s limit: users {u}/{users}, rooms {r}/{rooms}, permissions {p}/{permission_count}; the figures below are for that partial convergence",
            converge_time.as_secs_f64()
        ),
    }
    println!("Synapse requests by kind (operator, {total} in all):");
    for (kind, (count, write)) in &requests {
        println!(
            "  {kind:<18} {count:>6}{}",
            if *write { "  (write)" } else { "" }
        );
    }
    println!("CPU used by the stack (the operator's own is below):");
    println!(
        "{}",
        stack_cpu.line("operator converging:", converge_time.as_secs_f64())
    );
    match &minimal {
        Some((minimal_time, minimal_requests, minimal_cpu, _)) => {
            println!(
                "{}",
                minimal_cpu.line("minimal sequence:", minimal_time.as_secs_f64())
            );
            println!(
                "minimal sequence replayed directly: {minimal_requests} requests in {:.2}s",
                minimal_time.as_secs_f64()
            );
            println!(
                "ratio operator / minimal time: {:.2}",
                converge_time.as_secs_f64() / minimal_time.as_secs_f64()
            );
            println!(
                "Synapse requests operator / minimal: {total} / {minimal_requests} ({:+.1} %)",
                (total as f64 / *minimal_requests as f64 - 1.0) * 100.0
            );
        }
        None => println!("minimal sequence: not replayed (BENCH_MINIMAL=0)"),
    }
    print_timeline(&timeline);
    if let Some((.., profile)) = &minimal {
        print_stack_cpu("minimal sequence", profile);
    }
    let objects = (users + rooms + permission_count) as f64;
    match &quiet_and_drift {
        Some((quiet, drift)) => {
            let (writes, reads) = quiet.first_minute;
            println!(
                "restart: a fresh controller's first minute: {writes} writes, {reads} reads ({:.1} % of {objects} objects)",
                reads as f64 * 100.0 / objects
            );
            let (writes, reads) = quiet.idle;
            let secs = quiet.idle_for.as_secs_f64();
            let rate = (writes + reads) as f64 / secs;
            println!(
                "idle: {} Synapse requests in {secs:.0} s ({rate:.3}/s, {:.3}/s per 1,000 objects; {writes} writes)",
                writes + reads,
                rate * 1000.0 / objects
            );
            let reverted: Vec<f64> = drift.iter().map(|d| d.reverted_ms).collect();
            println!(
                "drift reverted after an out-of-band rename ({} samples): p50 {:.0} ms, p99 {:.0} ms from the client's change",
                drift.len(),
                percentile(&reverted, 0.50),
                percentile(&reverted, 0.99)
            );
            // The operator's share: from the mark (Synapse has pushed the
            // change, the endpoint recorded it) to the revert.
            let (marked, after_mark): (Vec<f64>, Vec<f64>) = drift
                .iter()
                .filter_map(|d| Some((d.marked_ms?, d.reverted_ms - d.marked_ms?)))
                .unzip();
            println!(
                "  of which Synapse pushing it and the mark recorded: p50 {:.0} ms, p99 {:.0} ms; from the mark to the revert: p50 {:.0} ms, p99 {:.0} ms ({} samples with a mark seen)",
                percentile(&marked, 0.50),
                percentile(&marked, 0.99),
                percentile(&after_mark, 0.50),
                percentile(&after_mark, 0.99),
                marked.len()
            );
        }
        None => println!("restart, idle and drift: not measured (not converged)"),
    }
    match &failover {
        Some(f) => {
            let first_write = f.first_write.map_or("none within 120 s".to_string(), |t| {
                format!("{:.1} s", t.as_secs_f64())
            });
            let reverted: Vec<f64> = f.drift.iter().map(|d| d.reverted_ms).collect();
            let marked: Vec<f64> = f.drift.iter().filter_map(|d| d.marked_ms).collect();
            println!(
                "failover (leader SIGKILLed, warm standby, lease {} s): first write after {first_write}, {} Synapse reads in the first minute ({:.1} % of {objects} objects; {} of them reverting the drift samples), drift p50 {:.0} ms, p99 {:.0} ms ({} samples made once it led, inside its first minute; {} with a mark seen, p99 {:.0} ms to the mark)",
                f.lease.as_secs(),
                f.reads_first_minute,
                f.reads_first_minute as f64 * 100.0 / objects,
                f.drift_reads,
                percentile(&reverted, 0.50),
                percentile(&reverted, 0.99),
                f.drift.len(),
                marked.len(),
                percentile(&marked, 0.99)
            );
        }
        None => println!("failover: not measured (not converged)"),
    }
    // A revert with no mark seen cannot be the operator's: say what it was.
    for d in failover.iter().flat_map(|f| &f.drift) {
        if d.marked_ms.is_none() {
            println!(
                "failover drift sample without a mark: {} reverted after {:.0} ms by {}",
                d.change, d.reverted_ms, d.revert
            );
        }
    }
    match &outage {
        Some(writes) => {
            let line: Vec<String> = writes.iter().map(|(k, n)| format!("{k} {n}")).collect();
            println!(
                "status writes and Events during a {OUTAGE_SECONDS} s Synapse outage met by a controller taking over, until it converged again: {}",
                if line.is_empty() { "none".to_string() } else { line.join(", ") }
            );
        }
        None => println!("outage: not measured (not converged)"),
    }
    println!(
        "controller peak resident memory: {:.1} MiB ({:.1} KiB per object)",
        rss_kib as f64 / 1024.0,
        rss_kib as f64 / objects
    );
    println!(
        "controller CPU while converging: {cpu_seconds:.1} s ({:.2} ms per object)",
        cpu_seconds * 1000.0 / objects
    );
    println!(
        "API-server requests for the operator's kinds and events while converging: {api_requests} ({:.2} per object)",
        api_requests as f64 / objects
    );
    println!(
        "feed while converging: {drift_marks} rooms marked as drifted, {own_joins} membership events recognised as the operator's own joins"
    );
    // The bench's own creates and Ready lists are in these lines.
    for (kind, n) in api_by_kind.iter().take(12) {
        println!(
            "  {kind:<40} {n:>7}  ({:.2} per object)",
            *n as f64 / objects
        );
    }
    assert!(
        shortfall.is_none(),
        "not converged within BENCH_TIMEOUT_SECS"
    );
}

/// Synapse writes and reads among a controller's requests so far.
fn split(requests: &BTreeMap<String, (u64, bool)>) -> (u64, u64) {
    let sum = |write: bool| {
        requests
            .values()
            .filter(|(_, w)| *w == write)
            .map(|(c, _)| c)
            .sum()
    };
    (sum(true), sum(false))
}

/// What the converged tenant costs a fresh controller (a restart, no memory
/// but the API server's): its first minute, then `idle` more of nothing
/// changing.
struct Quiet {
    first_minute: (u64, u64),
    idle: (u64, u64),
    idle_for: Duration,
}

/// A restart (a fresh controller's first minute), the idle window after
/// it, then drift samples (revert times in ms) against that controller.
async fn restart_idle_and_drift(
    env: &TestEnv,
    run: &str,
    users: usize,
    rooms: usize,
) -> (Quiet, Vec<DriftSample>) {
    let fresh = start_controller(env).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let first_minute = split(&fresh.requests().await);
    let idle_for = Duration::from_secs(env_usize("BENCH_IDLE_SECS", 600) as u64);
    tokio::time::sleep(idle_for).await;
    let (writes, reads) = split(&fresh.requests().await);
    let idle = (writes - first_minute.0, reads - first_minute.1);

    // Drift: out-of-band power-level changes, reverted via the feed.
    // One sample per room (its admin changes it), at most one per ten users.
    let drift = drift_samples(env, run, DRIFT_SAMPLES.min(users / 10).min(rooms)).await;

    drop(fresh);
    (
        Quiet {
            first_minute,
            idle,
            idle_for,
        },
        drift,
    )
}

/// The product's lease duration (`--lease-duration-seconds`).
const LEASE: Duration = Duration::from_secs(15);

/// A leader SIGKILLed while a warm standby waits.
struct Failover {
    lease: Duration,
    /// From the kill to the standby's first Synapse write (a rename made
    /// right after the kill is there to be reverted).
    first_write: Option<Duration>,
    reads_first_minute: u64,
    /// Of those, the ones reverting the drift samples.
    drift_reads: u64,
    /// Drift made once the standby leads, inside its first minute.
    drift: Vec<DriftSample>,
}

async fn failover(env: &TestEnv, run: &str, rooms: usize) -> Failover {
    use k8s_openapi::api::coordination::v1::Lease;
    let lease_name = harness::unique("bench-lease");
    let holder = || async {
        let leases: Api<Lease> = Api::namespaced(env.client.clone(), env.ns(0));
        leases
            .get_opt(&lease_name)
            .await
            .ok()??
            .spec?
            .holder_identity
    };
    let mut leader = start_replica(env, Some((&lease_name, "leader")), feed_endpoint()).await;
    harness::wait_for("the first replica to lead", || async {
        (holder().await.as_deref() == Some("leader")).then_some(())
    })
    .await;
    // Every replica serves the feed, as behind a Service in production.
    let standby_feed = std::net::SocketAddr::from(([127, 0, 0, 1], harness::free_port()));
    let standby = start_replica(env, Some((&lease_name, "standby")), standby_feed).await;
    harness::wait_for("the standby's caches", || async {
        let text = reqwest::get(&standby.metrics)
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| l == "openmeet_caches_synced 1")
            .then_some(())
    })
    .await;
    // Let the leader's start-up pass settle.
    tokio::time::sleep(Duration::from_secs(5)).await;

    leader.child.start_kill().unwrap();
    leader.child.wait().await.unwrap();
    let killed = Instant::now();
    // The Service's endpoints lose the dead pod: Synapse's next transaction
    // reaches the standby.
    harness::route_feed(Some(standby_feed));
    rename_out_of_band(env, run, 0).await;
    let mut first_write = None;
    while killed.elapsed() < Duration::from_secs(120) {
        if split(&standby.requests().await).0 > 0 {
            first_write = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Drift made as soon as it leads, inside its first minute.
    let reads_before_drift = split(&standby.requests().await).1;
    let drift = drift_samples(env, run, 20.min(rooms)).await;
    let drift_reads = split(&standby.requests().await).1 - reads_before_drift;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(killed.elapsed())).await;
    let reads_first_minute = split(&standby.requests().await).1;
    drop(standby);
    harness::route_feed(Some(feed_endpoint()));
    Failover {
        lease: LEASE,
        first_write,
        reads_first_minute,
        drift_reads,
        drift,
    }
}

/// Renames room `r<i>` as its admin, in a client: drift for the operator.
async fn rename_out_of_band(env: &TestEnv, run: &str, i: usize) {
    let stack = Stack::get();
    let room = env
        .api::<MatrixRoom>(0)
        .get(&format!("r{i}"))
        .await
        .unwrap();
    let room_id = room.status.unwrap().room_id.unwrap();
    let admin_user = format!("@{run}-u{i}:{}", stack.var("MATRIX_SERVER_NAME"));
    rename(&user_token(&admin_user).await, &room_id).await;
}

/// Renames the room in a client, as `token`'s user: the change's event id.
async fn rename(token: &str, room_id: &str) -> String {
    let response = http()
        .put(format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.name/",
            Stack::get().var("SYNAPSE_URL"),
            enc(room_id)
        ))
        .bearer_auth(token)
        .json(&json!({"name": DRIFTED_NAME}))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "out-of-band change refused: {}",
        response.status()
    );
    response.json::<Value>().await.unwrap()["event_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// How long the outage keeps Synapse down.
const OUTAGE_SECONDS: u64 = 15;

/// A Synapse outage met by a controller taking over (as after a leader
/// hand-over, it reconciles every object, and every reconcile fails): the
/// status writes and Events it costs, from the outage until every object
/// is Ready again, by resource and verb. Nothing changed in the tenant, so
/// the budget is none.
async fn outage(env: &TestEnv) -> BTreeMap<String, u64> {
    let before = api_requests_by_kind().await;
    let down = tokio::spawn(harness::restart_synapse(OUTAGE_SECONDS));
    // restart-synapse.sh has stopped Synapse well within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let takeover = start_controller(env).await;
    down.await
        .expect("restart task")
        .expect("Synapse restarted");
    // Its backoff (up to 16 s between tries by now) brings every object
    // back; then nothing moves for 30 s.
    let (mut last, mut still) = (BTreeMap::new(), 0);
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = api_requests_by_kind().await;
        still = if now == last { still + 1 } else { 0 };
        if still == 15 {
            break;
        }
        last = now;
    }
    drop(takeover);
    last.into_iter()
        .filter(|(kind, _)| kind.contains("/status ") || kind.starts_with("events "))
        .filter_map(|(kind, n)| {
            let added = n.saturating_sub(before.get(&kind).copied().unwrap_or(0));
            (added > 0).then_some((kind, added))
        })
        .collect()
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

/// The token for a call to `path`: under MAS, Synapse's admin API takes
/// only a MAS-issued admin token; everything else goes as the
/// application service.
async fn token_for(path: &str) -> String {
    let stack = Stack::get();
    match Stack::get().shared_mas() {
        Some(mas) if path.starts_with("/_synapse/admin/") => mas
            .synapse_admin_token(stack.var("MATRIX_ADMIN_LOCALPART"))
            .await
            .expect("Synapse admin token from MAS"),
        _ => stack.as_token.clone(),
    }
}

/// An access token of `user_id`'s own: login-as-user, or under MAS (where
/// Synapse has no login-as) a personal session.
async fn user_token(user_id: &str) -> String {
    match Stack::get().shared_mas() {
        Some(mas) => {
            let localpart = user_id.trim_start_matches('@').split(':').next().unwrap();
            let user = mas.user_by_username(localpart).await.unwrap().unwrap();
            mas.personal_session(
                &user.id,
                "bench",
                &format!("BENCH{}", user.id),
                Duration::from_secs(3600),
            )
            .await
            .unwrap()
            .access_token
        }
        None => synapse_call(
            reqwest::Method::POST,
            &format!("/_synapse/admin/v1/users/{}/login", enc(user_id)),
            Some(json!({"valid_until_ms": 4_102_444_800_000u64})),
        )
        .await["access_token"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

async fn synapse_call(method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let stack = Stack::get();
    let admin = format!(
        "@{}:{}",
        stack.var("MATRIX_ADMIN_LOCALPART"),
        stack.var("MATRIX_SERVER_NAME")
    );
    let mut request = http()
        .request(method, format!("{}{path}", stack.var("SYNAPSE_URL")))
        .query(&[("user_id", admin.as_str())])
        .bearer_auth(token_for(path).await);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap_or(Value::Null)
}

fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Per user: one existence check and one create (in MAS mode: in MAS, and
/// the owner marker on Synapse's account). Per room: one create with
/// its initial state and power levels, one state read; per member: one admin
/// join. Same concurrency as the operator.
async fn minimal_sequence(run: &str, users: usize, rooms: usize) -> (Duration, u64) {
    let server = Stack::get().var("MATRIX_SERVER_NAME").to_string();
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for u in 0..users {
        let id = format!("@{run}-min-u{u}:{server}");
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let path = format!("/_synapse/admin/v2/users/{}", enc(&id));
            let marker = json!({"external_ids": [{"auth_provider": "bench", "external_id": id}]});
            if let Some(mas) = Stack::get().shared_mas() {
                // MAS mode: MAS holds the account (and provisions Synapse's
                // before it answers); the marker goes on Synapse's.
                let localpart = id.trim_start_matches('@').split(':').next().unwrap();
                assert!(mas.user_by_username(localpart).await.unwrap().is_none());
                mas.create_user(localpart, None, None, false).await.unwrap();
                synapse_call(reqwest::Method::PUT, &path, Some(marker)).await;
                return;
            }
            let stack = Stack::get();
            let admin = format!(
                "@{}:{}",
                stack.var("MATRIX_ADMIN_LOCALPART"),
                stack.var("MATRIX_SERVER_NAME")
            );
            let status = http()
                .get(format!("{}{path}", stack.var("SYNAPSE_URL")))
                .query(&[("user_id", admin.as_str())])
                .bearer_auth(&stack.as_token)
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status, 404);
            synapse_call(reqwest::Method::PUT, &path, Some(marker)).await;
        }));
    }
    for t in tasks.drain(..) {
        t.await.unwrap();
    }
    let mut members: Vec<Vec<(String, &'static str)>> = vec![Vec::new(); rooms];
    for u in 0..users {
        for (room, role) in memberships(u, rooms) {
            members[room].push((format!("@{run}-min-u{u}:{server}"), role));
        }
    }
    let mut joins = 0u64;
    for (r, room_members) in members.into_iter().enumerate() {
        joins += room_members.len() as u64;
        let gate = gate.clone();
        let alias = format!("openmeet-{run}-min-r{r}");
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let users: serde_json::Map<String, Value> = room_members
                .iter()
                .filter(|(_, role)| *role != "Member")
                .map(|(id, role)| (id.clone(), json!(if *role == "Admin" { 100 } else { 50 })))
                .collect();
            let body = json!({
                "room_alias_name": alias, "name": format!("Room {r}"), "preset": "private_chat",
                "initial_state": [{"type": "net.openmeet.owner", "state_key": "", "content": {"bench": r}}],
                "power_level_content_override": {"users": users},
            });
            let created = synapse_call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(body)).await;
            let room_id = created["room_id"].as_str().unwrap().to_string();
            synapse_call(reqwest::Method::GET, &format!("/_matrix/client/v3/rooms/{}/state", enc(&room_id)), None).await;
            for (id, _) in room_members {
                let path = format!("/_synapse/admin/v1/join/{}", enc(&room_id));
                synapse_call(reqwest::Method::POST, &path, Some(json!({"user_id": id}))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Per user: an existence check and a create (MAS mode: and the marker).
    let per_user = if Stack::get().shared_mas().is_some() {
        3
    } else {
        2
    };
    (
        started.elapsed(),
        users as u64 * per_user + rooms as u64 * 2 + joins,
    )
}

/// The name a room's admin gives the room out of band.
const DRIFTED_NAME: &str = "Renamed in a client";

/// One out-of-band change: from the client's change to the operator's
/// revert as a client sees it, and to the room's drift mark (Synapse has
/// pushed the change and the endpoint has recorded it), in ms.
struct DriftSample {
    reverted_ms: f64,
    marked_ms: Option<f64>,
    /// The change and the event taken for its revert (sender, id, content).
    change: String,
    revert: String,
}

/// Out-of-band renames made by each room's admin in a client (power levels
/// are the operator's alone: only a creator reaches their level).
/// The revert is seen through the admin's own `/sync` long-poll (no polling
/// load on Synapse while the operator works), the mark through a watch on
/// the rooms.
async fn drift_samples(env: &TestEnv, run: &str, samples: usize) -> Vec<DriftSample> {
    let stack = Stack::get();
    let server = stack.var("MATRIX_SERVER_NAME");
    // When each drift mark (an event id) first appeared on a room.
    let marks = harness::DriftMarks::watch(env.api::<MatrixRoom>(0), watcher::Config::default());
    let mut out = Vec::new();
    for i in 0..samples {
        // Users 0..rooms are their room's Admin.
        let room = env
            .api::<MatrixRoom>(0)
            .get(&format!("r{i}"))
            .await
            .unwrap();
        let room_id = room.status.unwrap().room_id.unwrap();
        let admin_user = format!("@{run}-u{i}:{server}");
        let token = user_token(&admin_user).await;
        let client_api = format!("{}/_matrix/client/v3", stack.var("SYNAPSE_URL"));
        // Synapse answers a `/sync` it saw in the last two minutes from its
        // response cache (`sync_response_cache_duration`): an event type no
        // room carries makes each sample's request its own, or a later phase
        // would read an earlier phase's answer, and its revert.
        let filter = json!({
            "presence": {"types": []}, "account_data": {"types": []},
            "room": {"rooms": [room_id],
                     "timeline": {"limit": 1, "types": ["m.room.name"], "not_types": [harness::unique("bench.sample")]},
                     "state": {"types": []}, "ephemeral": {"types": []}, "account_data": {"types": []}},
        })
        .to_string();
        let sync = |since: Option<String>| {
            let mut query = vec![("filter", filter.clone()), ("timeout", "30000".to_string())];
            if let Some(since) = since {
                query.push(("since", since));
            }
            let request = http()
                .get(format!("{client_api}/sync"))
                .query(&query)
                .bearer_auth(&token);
            async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
        };
        let mut since = sync(None).await["next_batch"].as_str().unwrap().to_string();
        let event_id = rename(&token, &room_id).await;
        let changed = Instant::now();
        // The first rename after ours that puts the declared name back.
        let reverted = 'reverted: loop {
            assert!(
                changed.elapsed() < Duration::from_secs(60),
                "drift not reverted"
            );
            let batch = sync(Some(since.clone())).await;
            let events = batch["rooms"]["join"][&room_id]["timeline"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for event in events {
                if event["event_id"] != event_id.as_str()
                    && event["content"]["name"] != DRIFTED_NAME
                {
                    let seen = format!(
                        "{} {} {}",
                        event["sender"], event["event_id"], event["content"]
                    );
                    break 'reverted (Instant::now(), seen);
                }
            }
            since = batch["next_batch"].as_str().unwrap().to_string();
        };
        let (reverted, revert) = reverted;
        let marked = marks.seen_at(&event_id);
        out.push(DriftSample {
            reverted_ms: (reverted - changed).as_secs_f64() * 1000.0,
            marked_ms: marked.map(|m| m.saturating_duration_since(changed).as_secs_f64() * 1000.0),
            change: format!("{admin_user} {event_id} in {room_id}"),
            revert,
        });
    }
    out
}
