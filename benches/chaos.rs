//! `make chaos`: converge a tenant of 10 rooms, 60 users and 150 permissions
//! on the local stack while the controller binary is SIGKILLed at random
//! moments (and restarted) and Synapse restarts once, then audit Synapse
//! itself: no duplicate rooms or accounts, no `leave` of a declared member,
//! memberships and power levels as declared, every object Ready for its
//! generation. Prints its figures; exits non-zero when an audit fails.
//!
//! The schedule (creation order, spec updates, kill moments, the Synapse
//! restart) comes from one seeded RNG: `CHAOS_SEED=<n> make chaos` replays it.
//! Knobs: `CHAOS_SEED`, `CHAOS_KILLS` (at least this many kills, default 12),
//! `CHAOS_TIMEOUT_SECONDS` (convergence after the chaos, default 300: the
//! longest backoff, and normally ten times what it takes),
//! `CHAOS_CONTROLLER_LOG` (the controller's `RUST_LOG`, default `info`).

#[allow(dead_code)]
#[path = "../tests/integration/harness.rs"]
mod harness;

use harness::{Options, Stack, TestEnv};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use openmeet_matrix_operator::api::{MatrixRoom, MatrixUser, RoomPermission};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROOMS: usize = 10;
const USERS: usize = 60;
const MIN_KILLS: usize = 12;
/// Kills stop here even if the workload is still running.
const MAX_KILLS: usize = 100;
/// The chaos phase (workload + kills) never runs longer than this.
const CHAOS_LIMIT: Duration = Duration::from_secs(900);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// --- the plan: everything random is drawn here, from the seed ----------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    User,
    Room,
    Permission,
}

#[derive(Clone, Debug)]
struct Step {
    kind: Kind,
    name: String,
    /// The spec to create with, or the merge patch of the spec.
    spec: Value,
    /// Pause after this step.
    pause: Duration,
}

struct Plan {
    creations: Vec<Step>,
    updates: Vec<Step>,
    /// How long each controller incarnation lives before its SIGKILL.
    lifetimes: Vec<Duration>,
    /// How long the controller stays dead after each kill.
    downtimes: Vec<Duration>,
    /// When Synapse stops, from the start of the chaos phase, and for how
    /// long it stays down before it starts again.
    synapse_restart_at: Duration,
    synapse_down_seconds: u64,
    /// Final desired power level of each (room, user) membership.
    levels: BTreeMap<(usize, usize), i64>,
}

fn role_level(role: &str) -> i64 {
    match role {
        "Admin" => 100,
        "Moderator" => 50,
        _ => 0,
    }
}

/// The rooms user `u` is declared in: offsets 0 and 3, and 6 for even users
/// (60 × 2 + 30 = 150 permissions, distinct rooms since the offsets differ mod 10).
fn rooms_of(u: usize) -> Vec<usize> {
    let mut rooms = vec![u % ROOMS, (u + 3) % ROOMS];
    if u.is_multiple_of(2) {
        rooms.push((u + 6) % ROOMS);
    }
    rooms
}

fn make_plan(rng: &mut StdRng, run: &str) -> Plan {
    let mut creations = Vec::new();
    for r in 0..ROOMS {
        let mut spec = json!({"alias": format!("{run}-r{r}"), "name": format!("Chaos room {r}"), "topic": "before"});
        if r.is_multiple_of(3) {
            spec["encrypted"] = json!(true);
        }
        if r % 4 == 1 {
            spec["joinRule"] = json!("public");
        }
        creations.push((Kind::Room, format!("r{r}"), spec));
    }
    let mut levels = BTreeMap::new();
    for u in 0..USERS {
        creations.push((
            Kind::User,
            format!("u{u}"),
            json!({"localpart": format!("{run}-u{u}"), "displayName": format!("Chaos user {u}")}),
        ));
        for (k, r) in rooms_of(u).into_iter().enumerate() {
            // In its first room: users 0-9 are Admins, 10-19 Moderators.
            let role = match (k, u / ROOMS) {
                (0, 0) => "Admin",
                (0, 1) => "Moderator",
                _ => "Member",
            };
            levels.insert((r, u), role_level(role));
            creations.push((
                Kind::Permission,
                format!("u{u}-r{r}"),
                json!({"roomRef": {"name": format!("r{r}")}, "userRef": {"name": format!("u{u}")}, "role": role}),
            ));
        }
    }
    // Any order: permissions may come before their room or user.
    creations.shuffle(rng);
    let creations = creations
        .into_iter()
        .map(|(kind, name, spec)| Step {
            kind,
            name,
            spec,
            // Bursts with pauses between them: about 25 s for 220 objects.
            pause: if rng.random_bool(0.15) {
                Duration::from_millis(rng.random_range(200..1500))
            } else {
                Duration::ZERO
            },
        })
        .collect();

    // Spec updates, so that convergence is judged for new generations too.
    let mut updates = Vec::new();
    for i in 0..5 {
        let r = rng.random_range(0..ROOMS);
        updates.push((
            Kind::Room,
            format!("r{r}"),
            json!({"topic": format!("after {i}")}),
        ));
    }
    for i in 0..10 {
        let u = rng.random_range(0..USERS);
        updates.push((
            Kind::User,
            format!("u{u}"),
            json!({"displayName": format!("Chaos user {u} ({i})")}),
        ));
    }
    let mut memberships: Vec<(usize, usize)> = levels.keys().copied().collect();
    memberships.shuffle(rng);
    for &(r, u) in memberships.iter().take(10) {
        let patch = if rng.random_bool(0.5) {
            levels.insert((r, u), 50);
            json!({"role": "Moderator"})
        } else {
            levels.insert((r, u), 25);
            json!({"role": null, "powerLevel": 25})
        };
        updates.push((Kind::Permission, format!("u{u}-r{r}"), patch));
    }
    updates.shuffle(rng);
    let updates = updates
        .into_iter()
        .map(|(kind, name, spec)| Step {
            kind,
            name,
            spec,
            pause: Duration::from_millis(rng.random_range(0..800)),
        })
        .collect();

    Plan {
        creations,
        updates,
        // Some kills land during start-up, most mid-work.
        lifetimes: (0..MAX_KILLS)
            .map(|_| Duration::from_millis(rng.random_range(150..5000)))
            .collect(),
        downtimes: (0..MAX_KILLS)
            .map(|_| Duration::from_millis(rng.random_range(0..1000)))
            .collect(),
        // Mid-workload, when memberships exist, long enough for the controller
        // to restart (and reconcile everything) while Synapse is away.
        synapse_restart_at: Duration::from_millis(rng.random_range(10_000..30_000)),
        synapse_down_seconds: rng.random_range(5..=15),
        levels,
    }
}

// --- workload ----------------------------------------------------------------

async fn create(env: &TestEnv, step: &Step) {
    match step.kind {
        Kind::User => drop(
            env.create::<MatrixUser>(0, &step.name, step.spec.clone())
                .await,
        ),
        Kind::Room => drop(
            env.create::<MatrixRoom>(0, &step.name, step.spec.clone())
                .await,
        ),
        Kind::Permission => drop(
            env.create::<RoomPermission>(0, &step.name, step.spec.clone())
                .await,
        ),
    }
}

async fn update(env: &TestEnv, step: &Step) {
    let patch = Patch::Merge(json!({ "spec": step.spec }));
    let params = PatchParams::default();
    let result = match step.kind {
        Kind::User => env
            .api::<MatrixUser>(0)
            .patch(&step.name, &params, &patch)
            .await
            .map(drop),
        Kind::Room => env
            .api::<MatrixRoom>(0)
            .patch(&step.name, &params, &patch)
            .await
            .map(drop),
        Kind::Permission => env
            .api::<RoomPermission>(0)
            .patch(&step.name, &params, &patch)
            .await
            .map(drop),
    };
    result.unwrap_or_else(|e| panic!("patching {}: {e}", step.name));
}

// --- the controller, killed and restarted --------------------------------------

struct Controller {
    child: tokio::process::Child,
    metrics: String,
    started: Instant,
}

fn start_controller(env: &TestEnv, log: &std::fs::File) -> Controller {
    let port = harness::free_port();
    let child = harness::controller_command(env)
        .env("METRICS_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "RUST_LOG",
            std::env::var("CHAOS_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1")
        .stdout(log.try_clone().expect("log file"))
        .stderr(log.try_clone().expect("log file"))
        .spawn()
        .expect("controller binary");
    Controller {
        child,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
        started: Instant::now(),
    }
}

impl Controller {
    /// Synapse writes this incarnation made so far (None when it does not
    /// answer yet: killed during start-up).
    async fn writes(&self) -> Option<u64> {
        let text = http()
            .get(&self.metrics)
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(
            text.lines()
                .filter(|l| l.starts_with("openmeet_synapse_requests_total{"))
                .filter(|l| l.contains("write=\"true\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum(),
        )
    }

    /// SIGKILL: no shutdown path runs, as when a node dies. Returns how the
    /// process had ended if it exited by itself before.
    async fn kill(mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
        None
    }
}

struct Kill {
    at: Duration,
    uptime: Duration,
    writes: Option<u64>,
    /// Set when the controller had already exited by itself.
    exited: Option<std::process::ExitStatus>,
}

// --- Synapse, read as the operator's admin account --------------------------

fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client")
    })
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// GET with the appservice token, masquerading as the admin account.
async fn synapse_get(path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
    let stack = Stack::get();
    let admin = format!(
        "@{}:{}",
        stack.var("MATRIX_ADMIN_LOCALPART"),
        stack.var("MATRIX_SERVER_NAME")
    );
    let mut last = String::new();
    for _ in 0..5 {
        // Under MAS, Synapse's admin API takes only a MAS-issued admin token.
        let token = match Stack::get().shared_mas() {
            Some(mas) if path.starts_with("/_synapse/admin/") => mas
                .synapse_admin_token(stack.var("MATRIX_ADMIN_LOCALPART"))
                .await
                .map_err(|e| e.to_string())?,
            _ => stack.as_token.clone(),
        };
        let response = http()
            .get(format!("{}{path}", stack.var("SYNAPSE_URL")))
            .query(&[("user_id", admin.as_str())])
            .query(query)
            .bearer_auth(&token)
            .send()
            .await;
        match response {
            Ok(r) if r.status().is_success() => return r.json().await.map_err(|e| e.to_string()),
            Ok(r) if r.status().is_client_error() => return Err(format!("{path}: {}", r.status())),
            Ok(r) => last = format!("{path}: {}", r.status()),
            Err(e) => last = format!("{path}: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

// --- readiness ------------------------------------------------------------------

/// Objects of one kind that are not Ready=True for their current generation,
/// with what their Ready condition says.
async fn not_ready<K>(api: &Api<K>) -> (usize, Vec<String>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let Ok(list) = api.list(&ListParams::default()).await else {
        return (0, vec!["(list failed)".into()]);
    };
    let mut pending = Vec::new();
    for o in &list.items {
        let v = serde_json::to_value(o).unwrap();
        let generation = &v["metadata"]["generation"];
        let ready = v["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"));
        let current = v["status"]["observedGeneration"] == *generation
            && ready.is_some_and(|c| c["observedGeneration"] == *generation);
        if !(current && ready.is_some_and(|c| c["status"] == "True")) {
            pending.push(format!(
                "{} {}: generation {generation}, observed {}, Ready={} {}",
                v["kind"].as_str().unwrap_or("?"),
                v["metadata"]["name"].as_str().unwrap_or("?"),
                v["status"]["observedGeneration"],
                ready.map_or("-".into(), |c| c["status"].to_string()),
                ready.map_or(String::new(), |c| c["reason"].to_string()),
            ));
        }
    }
    (list.items.len(), pending)
}

async fn readiness(env: &TestEnv) -> (usize, Vec<String>) {
    let (users, rooms, perms) = (
        env.api::<MatrixUser>(0),
        env.api::<MatrixRoom>(0),
        env.api::<RoomPermission>(0),
    );
    let (u, r, p) = tokio::join!(not_ready(&users), not_ready(&rooms), not_ready(&perms));
    (
        u.0 + r.0 + p.0,
        [u.1, r.1, p.1].into_iter().flatten().collect(),
    )
}

// --- audits ---------------------------------------------------------------------

#[derive(Default)]
struct Audit {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Audit {
    fn figure(&mut self, ok: bool, line: String) {
        self.lines
            .push(format!("  {} {line}", if ok { "ok  " } else { "FAIL" }));
        if !ok {
            self.failures.push(line);
        }
    }
}

/// Every room in Synapse, with the state events of each.
async fn all_rooms() -> Result<Vec<(Value, Vec<Value>)>, String> {
    let mut rooms = Vec::new();
    let mut from = 0u64;
    for _ in 0..200 {
        let page = synapse_get(
            "/_synapse/admin/v1/rooms",
            &[("from", &from.to_string()), ("limit", "500")],
        )
        .await?;
        for room in page["rooms"].as_array().cloned().unwrap_or_default() {
            let id = room["room_id"].as_str().unwrap_or_default().to_string();
            let state =
                synapse_get(&format!("/_synapse/admin/v1/rooms/{}/state", enc(&id)), &[]).await?;
            rooms.push((room, state["state"].as_array().cloned().unwrap_or_default()));
        }
        match page["next_batch"].as_u64() {
            Some(next) => from = next,
            None => return Ok(rooms),
        }
    }
    Err("more than 200 pages of rooms".into())
}

/// The `m.room.member` events of a room, oldest first.
async fn member_events(room_id: &str) -> Result<Vec<Value>, String> {
    let filter = json!({"types": ["m.room.member"]}).to_string();
    let path = format!("/_matrix/client/v3/rooms/{}/messages", enc(room_id));
    let mut events = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..100 {
        let mut query = vec![("dir", "f"), ("limit", "500"), ("filter", filter.as_str())];
        if let Some(token) = &from {
            query.push(("from", token));
        }
        let page = synapse_get(&path, &query).await?;
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        let done = chunk.is_empty() || page["end"].is_null();
        events.extend(chunk);
        if done {
            return Ok(events);
        }
        from = page["end"].as_str().map(str::to_string);
    }
    Err(format!("{room_id}: more than 100 pages of member events"))
}

/// Milliseconds since the Unix epoch, as Synapse stamps events.
fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `started_ms`: when the chaos phase began, to place events on its timeline.
async fn audit(
    env: &TestEnv,
    run: &str,
    plan: &Plan,
    started_ms: i64,
    audit: &mut Audit,
) -> Result<(), String> {
    let stack = Stack::get();
    let server = stack.var("MATRIX_SERVER_NAME");
    let ns = env.ns(0);
    let admin = format!("@{}:{server}", stack.var("MATRIX_ADMIN_LOCALPART"));
    let user_id = |u: usize| format!("@{run}-u{u}:{server}");

    // Rooms: exactly one per object, found by its marker, not by the alias.
    let objects = env
        .api::<MatrixRoom>(0)
        .list(&ListParams::default())
        .await
        .map_err(|e| e.to_string())?;
    let uids: BTreeMap<String, String> = objects
        .items
        .iter()
        .map(|r| {
            (
                r.metadata.name.clone().unwrap_or_default(),
                r.metadata.uid.clone().unwrap_or_default(),
            )
        })
        .collect();
    let rooms = all_rooms().await?;
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut room_state: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut foreign = Vec::new();
    // Rooms the operator's account began during this run that carry no marker:
    // a createRoom cut short (Synapse stopped mid-request) leaves exactly that.
    let mut half_made = Vec::new();
    for (room, state) in &rooms {
        let id = room["room_id"].as_str().unwrap_or_default().to_string();
        let marker = state
            .iter()
            .find(|e| e["type"] == "net.openmeet.owner")
            .map(|e| e["content"].clone());
        match marker {
            Some(m) if m["namespace"] == ns => {
                let name = m["name"].as_str().unwrap_or_default().to_string();
                if uids.get(&name).map(String::as_str) != m["uid"].as_str() {
                    foreign.push(format!("{id} marked {name} uid {}", m["uid"]));
                }
                by_name.entry(name).or_default().push(id.clone());
                room_state.insert(id, state.clone());
            }
            Some(_) => {}
            None => {
                let create = state.iter().find(|e| e["type"] == "m.room.create");
                if create.is_some_and(|e| {
                    e["sender"] == admin.as_str()
                        && e["origin_server_ts"].as_i64().unwrap_or(0) >= started_ms
                }) {
                    half_made.push(format!(
                        "{id}: no marker, {} state events ({})",
                        state.len(),
                        state
                            .iter()
                            .filter_map(|e| e["type"].as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
    }
    // Each declared alias must lead to its object's marked room.
    let mut misdirected = Vec::new();
    for r in 0..ROOMS {
        let alias = format!("#openmeet-{run}-r{r}:{server}");
        let target = synapse_get(
            &format!("/_matrix/client/v3/directory/room/{}", enc(&alias)),
            &[],
        )
        .await
        .ok()
        .and_then(|v| v["room_id"].as_str().map(str::to_string));
        let marked = by_name.get(&format!("r{r}"));
        match target {
            Some(id) if marked.is_some_and(|ids| ids.contains(&id)) => {}
            Some(id) => misdirected.push(format!("{alias} -> {id}, a room without r{r}'s marker")),
            None => misdirected.push(format!("{alias} does not resolve")),
        }
    }
    let duplicates: Vec<String> = by_name
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(name, ids)| format!("{name}: {}", ids.join(", ")))
        .collect();
    let missing: Vec<String> = (0..ROOMS)
        .map(|r| format!("r{r}"))
        .filter(|n| !by_name.contains_key(n))
        .collect();
    let unexpected: Vec<&String> = by_name.keys().filter(|n| !uids.contains_key(*n)).collect();
    let marked: usize = by_name.values().map(Vec::len).sum();
    audit.figure(
        duplicates.is_empty()
            && missing.is_empty()
            && unexpected.is_empty()
            && foreign.is_empty()
            && half_made.is_empty()
            && misdirected.is_empty(),
        format!(
            "rooms: {ROOMS} declared, {marked} in Synapse with this tenant's marker \
             ({} rooms on the server); duplicates {}, missing {}, unexpected {}, \
             wrong uid {}, aliases not leading to their marked room {}, \
             half-made rooms (the operator's, no marker) {}",
            rooms.len(),
            duplicates.len(),
            missing.len(),
            unexpected.len(),
            foreign.len(),
            misdirected.len(),
            half_made.len()
        ),
    );
    for d in duplicates
        .iter()
        .chain(&missing)
        .chain(&foreign)
        .chain(&misdirected)
        .chain(&half_made)
    {
        audit.lines.push(format!("         {d}"));
    }
    for room in &objects.items {
        let name = room.metadata.name.clone().unwrap_or_default();
        let status_id = room.status.as_ref().and_then(|s| s.room_id.clone());
        if let (Some(ids), Some(status_id)) = (by_name.get(&name), status_id) {
            if !ids.contains(&status_id) {
                audit.figure(
                    false,
                    format!("room {name}: status.roomId {status_id} is not its marked room"),
                );
            }
        }
    }

    // Accounts: exactly the declared ones, each carrying its object's marker.
    let mut accounts = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..100 {
        // No guests (the operator makes none, and under MAS Synapse refuses the parameter's default).
        let mut query = vec![
            ("name", run),
            ("deactivated", "true"),
            ("guests", "false"),
            ("limit", "500"),
        ];
        if let Some(token) = &from {
            query.push(("from", token));
        }
        let page = synapse_get("/_synapse/admin/v2/users", &query).await?;
        accounts.extend(page["users"].as_array().cloned().unwrap_or_default());
        match page["next_token"].as_str() {
            Some(next) => from = Some(next.to_string()),
            None => break,
        }
    }
    let declared: BTreeSet<String> = (0..USERS).map(user_id).collect();
    // The owner marker names the object with its uid: `<ns>/<name>/<uid>`.
    let uids: BTreeMap<String, String> = env
        .api::<MatrixUser>(0)
        .list(&Default::default())
        .await
        .map_err(|e| format!("listing users: {e}"))?
        .items
        .into_iter()
        .map(|u| {
            (
                u.metadata.name.unwrap_or_default(),
                u.metadata.uid.unwrap_or_default(),
            )
        })
        .collect();
    let mut markers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut unexpected, mut deactivated, mut wrong_marker) = (Vec::new(), Vec::new(), Vec::new());
    let mut found = BTreeSet::new();
    for account in &accounts {
        let id = account["name"].as_str().unwrap_or_default().to_string();
        if !declared.contains(&id) {
            unexpected.push(id);
            continue;
        }
        found.insert(id.clone());
        let full = synapse_get(&format!("/_synapse/admin/v2/users/{}", enc(&id)), &[]).await?;
        if full["deactivated"] == true {
            deactivated.push(id.clone());
        }
        let owner: Vec<String> = full["external_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["auth_provider"] == "net.openmeet.owner")
            .filter_map(|e| e["external_id"].as_str().map(str::to_string))
            .collect();
        let localpart = id.trim_start_matches('@').split(':').next().unwrap_or("");
        let name = localpart.trim_start_matches(&format!("{run}-"));
        let uid = uids.get(name).map(String::as_str).unwrap_or("?");
        if owner != [format!("{ns}/{name}/{uid}")] {
            wrong_marker.push(format!("{id}: {owner:?}"));
        }
        for o in owner {
            markers.entry(o).or_default().push(id.clone());
        }
    }
    let duplicates = markers.values().filter(|ids| ids.len() > 1).count();
    let missing: Vec<&String> = declared.difference(&found).collect();
    audit.figure(
        duplicates == 0
            && missing.is_empty()
            && unexpected.is_empty()
            && deactivated.is_empty()
            && wrong_marker.is_empty(),
        format!(
            "accounts: {USERS} declared, {} found; duplicates {duplicates}, missing {}, \
             unexpected {}, deactivated {}, wrong marker {}",
            found.len(),
            missing.len(),
            unexpected.len(),
            deactivated.len(),
            wrong_marker.len()
        ),
    );
    for d in missing
        .iter()
        .map(|s| s.to_string())
        .chain(unexpected)
        .chain(deactivated)
        .chain(wrong_marker)
        .take(20)
    {
        audit.lines.push(format!("         {d}"));
    }
    // MAS mode: every declared account is in MAS, active (Synapse's
    // accounts above are MAS's mirrors: an account MAS made that no
    // object marked shows there as unexpected or wrongly marked).
    if let Some(mas) = Stack::get().shared_mas() {
        let (mut absent, mut inactive) = (Vec::new(), Vec::new());
        for u in 0..USERS {
            let localpart = format!("{run}-u{u}");
            match mas
                .user_by_username(&localpart)
                .await
                .map_err(|e| e.to_string())?
            {
                None => absent.push(localpart),
                Some(user) if user.deactivated || user.locked => inactive.push(localpart),
                Some(_) => {}
            }
        }
        audit.figure(
            absent.is_empty() && inactive.is_empty(),
            format!(
                "MAS accounts: {USERS} declared; missing {}, locked or deactivated {}",
                absent.len(),
                inactive.len()
            ),
        );
    }

    // Membership history, current members and power levels of each marked room.
    let (mut joins, mut leaves, mut member_events_seen) = (0usize, Vec::new(), 0usize);
    // Declared memberships seen joining in the history: all of them, or the
    // history read is incomplete and a clean leave count proves nothing.
    let mut joined_in_history = BTreeSet::new();
    let (mut joined_ok, mut not_joined, mut undeclared) = (0usize, Vec::new(), Vec::new());
    let (mut levels_ok, mut wrong_level) = (0usize, Vec::new());
    for (name, ids) in &by_name {
        let Some(r) = name.strip_prefix('r').and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        let members: BTreeMap<String, i64> = plan
            .levels
            .iter()
            .filter(|((room, _), _)| *room == r)
            .map(|((_, u), level)| (user_id(*u), *level))
            .collect();
        for id in ids {
            let mut previous: BTreeMap<String, String> = BTreeMap::new();
            for e in member_events(id).await? {
                member_events_seen += 1;
                let target = e["state_key"].as_str().unwrap_or_default().to_string();
                let membership = e["content"]["membership"].as_str().unwrap_or_default();
                let before = previous
                    .insert(target.clone(), membership.to_string())
                    .unwrap_or_else(|| "none".into());
                // Profile changes repeat `join`: count transitions only.
                if membership == "join" && before != "join" && members.contains_key(&target) {
                    joins += 1;
                    joined_in_history.insert((r, target.clone()));
                }
                if members.contains_key(&target) && (membership == "leave" || membership == "ban") {
                    let sender = e["sender"].as_str().unwrap_or_default();
                    let what = match (membership, before.as_str(), sender == target) {
                        ("ban", _, _) => "ban",
                        (_, "invite", true) => "invite rejected",
                        (_, "invite", false) => "invite withdrawn",
                        (_, _, true) => "left",
                        _ => "kicked",
                    };
                    leaves.push(format!(
                        "{name} {id}: {target} {what} ({before} -> {membership}) by {sender} at {:.1}s {}",
                        (e["origin_server_ts"].as_i64().unwrap_or(0) - started_ms) as f64 / 1000.0,
                        e["content"]["reason"].as_str().map(|r| format!("reason {r:?}")).unwrap_or_default()
                    ));
                }
            }
            let state = &room_state[id];
            let power = state
                .iter()
                .find(|e| e["type"] == "m.room.power_levels")
                .map(|e| e["content"].clone())
                .unwrap_or_default();
            let users_default = power["users_default"].as_i64().unwrap_or(0);
            let mut joined = BTreeSet::new();
            for e in state.iter().filter(|e| e["type"] == "m.room.member") {
                if e["content"]["membership"] == "join" {
                    joined.insert(e["state_key"].as_str().unwrap_or_default().to_string());
                }
            }
            for (member, level) in &members {
                if joined.contains(member) {
                    joined_ok += 1;
                } else {
                    not_joined.push(format!("{name} {id}: {member}"));
                }
                let actual = power["users"][member].as_i64().unwrap_or(users_default);
                if actual == *level {
                    levels_ok += 1;
                } else {
                    wrong_level.push(format!(
                        "{name} {id}: {member} has {actual}, declared {level}"
                    ));
                }
            }
            undeclared.extend(
                joined
                    .iter()
                    .filter(|m| **m != admin && !members.contains_key(*m))
                    .map(|m| format!("{name} {id}: {m}")),
            );
        }
    }
    let declared_memberships = plan.levels.len();
    audit.figure(
        leaves.is_empty() && joined_in_history.len() == declared_memberships,
        format!(
            "membership history: {member_events_seen} member events, {joins} joins of declared \
             members ({}/{declared_memberships} memberships seen joining); {} leave/kick/ban \
             events of declared members",
            joined_in_history.len(),
            leaves.len()
        ),
    );
    for l in leaves.iter().take(40) {
        audit.lines.push(format!("         {l}"));
    }
    if leaves.len() > 40 {
        audit
            .lines
            .push(format!("         … and {} more", leaves.len() - 40));
    }
    audit.figure(
        // Members of a room that is missing count as not joined.
        joined_ok == declared_memberships && not_joined.is_empty() && undeclared.is_empty(),
        format!(
            "members now: {joined_ok}/{declared_memberships} declared memberships joined, \
             {} undeclared members",
            undeclared.len()
        ),
    );
    audit.figure(
        levels_ok == declared_memberships && wrong_level.is_empty(),
        format!("power levels: {levels_ok}/{declared_memberships} as declared"),
    );
    for d in not_joined
        .iter()
        .chain(&undeclared)
        .chain(&wrong_level)
        .take(20)
    {
        audit.lines.push(format!("         {d}"));
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let seed: u64 = env_or("CHAOS_SEED", rand::rng().random());
    let min_kills: usize = env_or("CHAOS_KILLS", MIN_KILLS).min(MAX_KILLS);
    let timeout = Duration::from_secs(env_or("CHAOS_TIMEOUT_SECONDS", 300));
    println!("=== make chaos: CHAOS_SEED={seed} (set it to replay this schedule) ===");

    let env = Arc::new(
        TestEnv::with(
            "chaos",
            Options {
                no_operator: true,
                ..Default::default()
            },
        )
        .await,
    );
    let run = env.run_id.clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Arc::new(make_plan(&mut rng, &run));
    let log_path = std::env::temp_dir().join(format!("openmeet-chaos-{run}.log"));
    let log = std::fs::File::create(&log_path).expect("controller log");
    println!(
        "tenant {}: {ROOMS} rooms, {USERS} users, {} permissions, then {} spec updates; \
         controller log {}",
        env.ns(0),
        plan.levels.len(),
        plan.updates.len(),
        log_path.display()
    );

    let started = Instant::now();
    let started_ms = epoch_ms();
    let workload_done = Arc::new(AtomicBool::new(false));
    let workload = {
        let (env, plan, done) = (env.clone(), plan.clone(), workload_done.clone());
        tokio::spawn(async move {
            for step in &plan.creations {
                create(&env, step).await;
                tokio::time::sleep(step.pause).await;
            }
            for step in &plan.updates {
                update(&env, step).await;
                tokio::time::sleep(step.pause).await;
            }
            done.store(true, Ordering::SeqCst);
            started.elapsed()
        })
    };
    let synapse = {
        let (at, down) = (plan.synapse_restart_at, plan.synapse_down_seconds);
        tokio::spawn(async move {
            tokio::time::sleep(at).await;
            let began = started.elapsed();
            (began, harness::restart_synapse(down).await)
        })
    };

    // Kill at random moments until enough kills landed and the workload is in.
    let mut controller = start_controller(&env, &log);
    let mut kills: Vec<Kill> = Vec::new();
    for i in 0..MAX_KILLS {
        if i >= min_kills && workload_done.load(Ordering::SeqCst) {
            break;
        }
        if started.elapsed() > CHAOS_LIMIT {
            println!("chaos phase hit its {CHAOS_LIMIT:?} limit");
            break;
        }
        tokio::time::sleep(plan.lifetimes[i]).await;
        let writes = controller.writes().await;
        let uptime = controller.started.elapsed();
        let exited = controller.kill().await;
        kills.push(Kill {
            at: started.elapsed(),
            uptime,
            writes,
            exited,
        });
        tokio::time::sleep(plan.downtimes[i]).await;
        controller = start_controller(&env, &log);
    }
    let last_kill = started.elapsed();
    let workload_time = workload.await.expect("workload");
    let (restart_began, restart) = synapse.await.expect("synapse restart");
    let chaos_time = started.elapsed();

    // Converge with the last incarnation, bounded.
    let mut outcome = readiness(&env).await;
    let mut said = Instant::now();
    while !(outcome.1.is_empty() && outcome.0 == ROOMS + USERS + plan.levels.len())
        && started.elapsed() < chaos_time + timeout
    {
        if said.elapsed() > Duration::from_secs(30) {
            println!(
                "waiting for convergence: {} objects not Ready yet ({:.0}s of {timeout:?})",
                outcome.1.len(),
                (started.elapsed() - chaos_time).as_secs_f64()
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        outcome = readiness(&env).await;
    }
    let converged = started.elapsed();
    let (total, pending) = outcome;

    let mut report = Audit::default();
    let expected = ROOMS + USERS + plan.levels.len();
    report.figure(
        pending.is_empty() && total == expected,
        format!(
            "readiness: {}/{expected} objects Ready for their current generation",
            total - pending.len()
        ),
    );
    for p in pending.iter().take(20) {
        report.lines.push(format!("         {p}"));
    }
    // Audits read Synapse even when convergence timed out: that is when they matter most.
    if let Err(e) = audit(&env, &run, &plan, started_ms, &mut report).await {
        report.figure(false, format!("audit could not read Synapse: {e}"));
    }
    if let Some(status) = controller.kill().await {
        report.figure(
            false,
            format!("the last controller exited by itself: {status}"),
        );
    }
    let exits: Vec<String> = kills
        .iter()
        .filter_map(|k| Some(format!("{:.1}s: {}", k.at.as_secs_f64(), k.exited?)))
        .collect();
    report.figure(
        exits.is_empty(),
        format!(
            "controller exits before their kill: {} {}",
            exits.len(),
            exits.join(", ")
        ),
    );

    let uptimes: Vec<Duration> = kills.iter().map(|k| k.uptime).collect();
    let mid_work = kills.iter().filter(|k| k.writes.unwrap_or(0) > 0).count();
    let starting = kills.iter().filter(|k| k.writes.is_none()).count();
    println!("\n=== make chaos: figures (CHAOS_SEED={seed}) ===");
    println!(
        "workload: {} objects created and {} updated in {:.1}s",
        plan.creations.len(),
        plan.updates.len(),
        workload_time.as_secs_f64()
    );
    println!(
        "controller SIGKILLed {} times in {:.1}s (uptime before a kill: min {:.1}s, median {:.1}s, \
         max {:.1}s; {mid_work} after it had written to Synapse, {starting} before its metrics answered)",
        kills.len(),
        last_kill.as_secs_f64(),
        uptimes.iter().min().copied().unwrap_or_default().as_secs_f64(),
        median(uptimes.clone()).as_secs_f64(),
        uptimes.iter().max().copied().unwrap_or_default().as_secs_f64(),
    );
    println!(
        "kills at (s): {}",
        kills
            .iter()
            .map(|k| format!("{:.1}", k.at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    match &restart {
        Ok(back) => println!(
            "Synapse restarted once: stopped at {:.1}s, kept down {}s, answering again after {:.1}s",
            restart_began.as_secs_f64(),
            plan.synapse_down_seconds,
            back.as_secs_f64()
        ),
        Err(e) => report.figure(false, format!("Synapse restart failed: {e}")),
    }
    println!(
        "convergence: all Ready {:.1}s after the first object ({:.1}s after the last kill){}",
        converged.as_secs_f64(),
        (converged - last_kill).as_secs_f64(),
        if pending.is_empty() {
            String::new()
        } else {
            format!(" -- NOT converged within {timeout:?}")
        }
    );
    println!("audit:");
    for line in &report.lines {
        println!("{line}");
    }
    if report.failures.is_empty() {
        println!("result: PASS");
    } else {
        println!(
            "result: FAIL ({} audit(s) failed; replay with CHAOS_SEED={seed})",
            report.failures.len()
        );
        std::process::exit(1);
    }
}
