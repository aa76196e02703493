//! The sign-in pages in a real browser: Debian's headless Chromium, driven
//! by Playwright (`tests/fixtures/browser_signin.py`), through Synapse's SSO
//! redirect, the sidecar, the dev platform's login page
//! (`tests/stack/dev-platform.py`, answering the platform login URL the
//! stack's sidecar is configured with), Synapse's confirmation, and back to
//! the Matrix client with a `loginToken`. A first login waits on the
//! sidecar's page until its `MatrixUser` is applied; a locked user gets the
//! refusal page; `prompt=none` without a platform session never shows a
//! login page. Every flow fails on any console error or warning, page
//! error, Content-Security-Policy violation or failed request, and saves a
//! screenshot of each page it stops at under
//! `target/tmp/browser/<flow>/`.

use crate::harness::{default_mode_only, free_port, python_venv, unique, wait_for, Stack, TestEnv};
use crate::sidecar::{platform_token, ready_user, whoami, Authorization};
use openmeet_matrix_operator::sidecar::config::SidecarConfig;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Playwright for Python (PyPI), in a venv cached outside the repository.
/// Its wheel carries its driver; it launches Debian's Chromium, never a
/// browser of its own.
const PLAYWRIGHT_VERSION: &str = "1.65.2";
/// Debian's `chromium` package.
const CHROMIUM: &str = "/usr/bin/chromium";
/// The Matrix client's redirect URL: not in Synapse's `sso.client_whitelist`,
/// so Synapse asks the user to confirm; the browser script answers it with a
/// stand-in page.
const CLIENT: &str = "http://client.openmeet.test/done";
/// What a page may ask for off the stack: the `[matrix]` logo in the header
/// of Synapse's own pages (its `_base.html`). Nothing of the sidecar's or
/// the platform's.
const SYNAPSE_HEADER_LOGO: &str = "https://matrix.org/img/matrix-120x51.png";
/// Why these flows are not run in MAS mode.
const THROUGH_SYNAPSE_SSO: &str = "the browser goes through Synapse's own SSO pages \
    (`oidc_providers`: its SSO redirect, confirmation and OIDC callback), which Synapse has no \
    longer under MAS; the sign-in through MAS's pages is mas_signin::'s";
/// How long one flow may take, waits included.
const FLOW_LIMIT: Duration = Duration::from_secs(120);

fn chromium() -> &'static str {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "the browser tests drive Debian's Chromium ({CHROMIUM}), which is missing: \
         apt-get install chromium"
    );
    CHROMIUM
}

/// Where the stack's sidecar sends browsers without a platform session.
fn platform_login_url() -> String {
    let text = std::fs::read_to_string(Stack::get().var("SIDECAR_CONFIG")).expect("sidecar.yaml");
    SidecarConfig::from_yaml(&text)
        .expect("sidecar.yaml")
        .platform
        .login_url
        .expect("the stack's sidecar has a platform login URL")
}

/// The dev stand-in for the platform's login page, on a port of its own.
struct DevPlatform {
    url: String,
    _child: tokio::process::Child,
}

impl DevPlatform {
    async fn start() -> DevPlatform {
        let stack = Stack::get();
        let port = free_port();
        let child = tokio::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/stack/dev-platform.py"
            ))
            .arg(port.to_string())
            // KUBECTL, KUBECONFIG, SIDECAR_URL and PLATFORM_*.
            .envs(&stack.env)
            .env(
                "OPERATOR_BIN",
                env!("CARGO_BIN_EXE_openmeet-matrix-operator"),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("python3 tests/stack/dev-platform.py");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("the dev login page", || async {
            http.get(format!("{url}/health"))
                .send()
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        DevPlatform { url, _child: child }
    }
}

/// One browser going through one flow; its pages come as it reaches them.
struct BrowserRun {
    name: &'static str,
    started: Instant,
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    _platform: DevPlatform,
}

impl BrowserRun {
    /// Starts the browser at Synapse's SSO redirect, as a Matrix client
    /// sends it there. `sign_in` says whom the platform signs in (see the
    /// script).
    async fn start(name: &'static str, sign_in: Value) -> BrowserRun {
        let stack = Stack::get();
        let mut start = url::Url::parse(&format!(
            "{}/_matrix/client/v3/login/sso/redirect/oidc-{}",
            stack.var("SYNAPSE_URL"),
            stack.var("OIDC_IDP_ID")
        ))
        .unwrap();
        start.query_pairs_mut().append_pair("redirectUrl", CLIENT);
        Self::start_at(name, sign_in, start.as_str()).await
    }

    /// Starts the browser at `start`.
    async fn start_at(name: &'static str, sign_in: Value, start: &str) -> BrowserRun {
        let chromium = chromium();
        let stack = Stack::get();
        let sidecar = stack.sidecar().await;
        let platform = DevPlatform::start().await;
        let python = python_venv("playwright", PLAYWRIGHT_VERSION, "playwright.sync_api").await;
        let out = screenshots(name);
        let _ = std::fs::remove_dir_all(&out);
        let config = json!({
            "chromium": chromium,
            "start": start,
            "synapse": stack.var("SYNAPSE_URL"),
            "sidecar": sidecar,
            "sidecar_cert": stack.var("SIDECAR_CERT"),
            "platform": {"login": platform_login_url(), "served_by": platform.url},
            "client": CLIENT,
            "sign_in": sign_in,
            "out": out,
        });
        let mut child = tokio::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/browser_signin.py"
            ))
            .arg(config.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting tests/fixtures/browser_signin.py");
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            text
        });
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        BrowserRun {
            name,
            started: Instant::now(),
            child,
            lines,
            stderr,
            _platform: platform,
        }
    }

    async fn line(&mut self) -> Option<Value> {
        let left = FLOW_LIMIT.saturating_sub(self.started.elapsed());
        let line = tokio::time::timeout(left, self.lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!("{}: the browser took longer than {FLOW_LIMIT:?}", self.name)
            })
            .expect("reading the browser's output")?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }

    /// The next page the browser stopped at, which must be a `kind` page.
    async fn page(&mut self, kind: &str) -> Value {
        let Some(page) = self.line().await else {
            self.child.wait().await.ok();
            let stderr = (&mut self.stderr).await.unwrap_or_default();
            panic!(
                "{}: the browser ended before a {kind} page:\n{stderr}",
                self.name
            );
        };
        assert_eq!(
            page["page"], kind,
            "{}: a {kind} page, got {page:#}",
            self.name
        );
        eprintln!(
            "browser {}: {kind} ({}) after {:.1?}: {}",
            self.name,
            page["status"],
            self.started.elapsed(),
            page["screenshot"].as_str().unwrap_or_default()
        );
        page
    }

    /// What the browser saw along the way, once it stopped.
    async fn done(mut self) -> Seen {
        let done = self.line().await;
        let status = self.child.wait().await.expect("the browser script");
        let stderr = (&mut self.stderr).await.unwrap_or_default();
        let done = match done {
            Some(done) if status.success() && done.get("done").is_some() => done,
            other => panic!(
                "{}: the browser script failed ({status}): {other:?}\n{stderr}",
                self.name
            ),
        };
        eprintln!(
            "browser {}: done in {:.1?}",
            self.name,
            self.started.elapsed()
        );
        Seen(done)
    }
}

/// Where a flow's screenshots go: the test's output, under `target/`.
fn screenshots(name: &str) -> String {
    format!("{}/browser/{name}", env!("CARGO_TARGET_TMPDIR"))
}

/// The script's last report.
struct Seen(Value);

impl Seen {
    /// No console error or warning, no page error, no CSP violation, no
    /// failed or refused request, and nothing asked off the stack but the
    /// logo in the header of Synapse's own pages. The one console error allowed is
    /// Chromium's report of the last page's own error status (a refusal's
    /// 403), which each test asserts itself.
    fn assert_clean(&self) {
        let last = self.navigations().last().cloned().unwrap_or_default();
        let own_status = |m: &Value| {
            last["status"].as_u64().is_some_and(|s| s >= 400)
                && m["url"] == last["url"]
                && m["text"].as_str().is_some_and(|t| {
                    t.starts_with(&format!(
                        "Failed to load resource: the server responded with a status of {}",
                        last["status"]
                    ))
                })
        };
        let mut problems: Vec<(&str, &Value)> = Vec::new();
        for m in self.0["console"].as_array().unwrap() {
            if (m["type"] == "error" || m["type"] == "warning") && !own_status(m) {
                problems.push(("console", m));
            }
        }
        for key in ["page_errors", "csp_violations", "failed_requests"] {
            problems.extend(self.0[key].as_array().unwrap().iter().map(|v| (key, v)));
        }
        let synapse = format!("{}/", Stack::get().var("SYNAPSE_URL"));
        for r in self.0["off_stack_requests"].as_array().unwrap() {
            let allowed = r["url"] == SYNAPSE_HEADER_LOGO
                && r["document"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&synapse));
            if !allowed {
                problems.push(("off_stack_requests", r));
            }
        }
        assert!(
            problems.is_empty(),
            "what the browser reported: {problems:#?}"
        );
    }

    /// Every navigation as `METHOD <origin><path> STATUS`, with the stack's
    /// addresses named (`synapse`, `sidecar`, `platform`, `client`).
    fn hops(&self) -> Vec<String> {
        let stack = Stack::get();
        let names = [
            (stack.var("SYNAPSE_URL").to_string(), "synapse"),
            (stack.var("SIDECAR_URL").to_string(), "sidecar"),
            (origin(&platform_login_url()), "platform"),
            (origin(CLIENT), "client"),
        ];
        self.navigations()
            .iter()
            .map(|n| {
                let url = url::Url::parse(n["url"].as_str().unwrap()).unwrap();
                let at = origin(url.as_str());
                let name = names
                    .iter()
                    .find(|(o, _)| *o == at)
                    .map_or(at.as_str(), |(_, name)| name);
                format!(
                    "{} {name}{} {}",
                    n["method"].as_str().unwrap(),
                    url.path(),
                    n["status"]
                )
            })
            .collect()
    }

    fn navigations(&self) -> &Vec<Value> {
        self.0["navigations"].as_array().unwrap()
    }

    /// The `loginToken` Synapse handed the client.
    fn login_token(&self) -> String {
        let to = self.0["done"]["client_url"]
            .as_str()
            .unwrap_or_else(|| panic!("the browser never reached the client: {:#}", self.0));
        let to = url::Url::parse(to).unwrap();
        assert!(to.as_str().starts_with(CLIENT), "{to}");
        to.query_pairs()
            .find(|(k, _)| k == "loginToken")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_else(|| panic!("no loginToken in {to}"))
    }
}

fn origin(url: &str) -> String {
    url::Url::parse(url).unwrap().origin().ascii_serialization()
}

/// What the client does with the `loginToken`: `m.login.token`, then
/// `whoami` with the access token it got. Synapse's `/login` answer.
async fn log_in_with(token: &str) -> Value {
    let synapse = Stack::get().var("SYNAPSE_URL");
    // From an address of the client's own, as a real client's: Synapse
    // limits logins per address (`rc_login.address`, a burst of 5), and
    // the rest of the suite's SSO logins come from 127.0.0.1.
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = client
        .post(format!("{synapse}/_matrix/client/v3/login"))
        .json(&json!({"type": "m.login.token", "token": token}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let login: Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "m.login.token: {login}");
    let (status, me) = whoami(synapse, login["access_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user_id"], login["user_id"], "{me}");
    assert_eq!(me["device_id"], login["device_id"], "{me}");
    login
}

/// The first hop of every flow: the Matrix client sends the browser to
/// Synapse's SSO redirect for the sidecar's provider.
fn sso_redirect_hop() -> String {
    format!(
        "GET synapse/_matrix/client/v3/login/sso/redirect/oidc-{} 302",
        Stack::get().var("OIDC_IDP_ID")
    )
}

fn text(page: &Value) -> &str {
    page["text"].as_str().unwrap()
}

#[tokio::test]
async fn a_browser_signs_in_through_synapse_the_sidecar_and_the_platform() {
    default_mode_only!(THROUGH_SYNAPSE_SSO);
    let env = TestEnv::new("browser-sso").await;
    let (_, localpart, user_id) = ready_user(&env, "browser-user").await;
    let pick = format!("browser-user Example (tenant {})", env.ns(0));

    let mut browser = BrowserRun::start("sso", json!({"pick": pick})).await;
    let login = browser.page("platform-login").await;
    assert!(text(&login).contains("Sign in to OpenMeet"), "{login:#}");
    assert!(
        text(&login).contains(&pick),
        "the user is offered: {login:#}"
    );
    let confirm = browser.page("synapse-confirm").await;
    assert_eq!(confirm["status"], 200);
    assert!(
        text(&confirm).contains("Continue to your account"),
        "{confirm:#}"
    );
    assert!(
        text(&confirm).contains(&user_id),
        "Synapse names the account: {confirm:#}"
    );
    assert!(
        text(&confirm).contains("client.openmeet.test"),
        "Synapse names the client: {confirm:#}"
    );
    browser.page("client").await;
    let seen = browser.done().await;
    seen.assert_clean();
    let sso_redirect = sso_redirect_hop();
    assert_eq!(
        seen.hops(),
        [
            sso_redirect.as_str(),
            "GET sidecar/authorize 303",
            "GET platform/login 200",
            "GET platform/login 200",
            "POST sidecar/authorize 303",
            "GET synapse/_synapse/client/oidc/callback 200",
            "GET client/done 200",
        ]
    );

    // The loginToken logs the client in as exactly the operator's account.
    let login = log_in_with(&seen.login_token()).await;
    assert_eq!(login["user_id"], user_id.as_str());
    let devices = env
        .synapse
        .list_devices(&env.user_id(&localpart))
        .await
        .unwrap();
    assert_eq!(devices, [login["device_id"].as_str().unwrap()]);
}

#[tokio::test]
async fn a_first_login_waits_in_the_browser_and_signs_in_once_the_user_is_applied() {
    default_mode_only!(THROUGH_SYNAPSE_SSO);
    let env = TestEnv::new("browser-first").await;
    let subject = unique("sub");
    let localpart = unique("newcomer");
    let user_id = env.user_id(&localpart);

    // The platform has just signed the user up: no MatrixUser yet.
    let sign_in = json!({"subject": subject, "tenant": env.ns(0)});
    let mut browser = BrowserRun::start("first-login", sign_in).await;
    browser.page("platform-login").await;
    let wait = browser.page("sidecar-wait").await;
    assert_eq!(wait["status"], 200);
    assert_eq!(wait["title"], "Your chat account is being prepared");
    assert!(text(&wait).contains("checks again by itself"), "{wait:#}");
    assert!(env.synapse.get_user(&user_id).await.unwrap().is_none());

    // The platform applies the MatrixUser only now; the page, refreshing
    // by itself, carries on into Synapse.
    env.create_user(
        0,
        "newcomer",
        json!({"localpart": localpart, "displayName": "New Comer", "subject": subject}),
    )
    .await;
    let confirm = browser.page("synapse-confirm").await;
    assert!(text(&confirm).contains(user_id.as_str()), "{confirm:#}");
    assert!(text(&confirm).contains("New Comer"), "{confirm:#}");
    browser.page("client").await;
    let seen = browser.done().await;
    seen.assert_clean();
    let hops = seen.hops();
    let posted = hops
        .iter()
        .position(|h| h == "POST sidecar/authorize 200")
        .unwrap_or_else(|| panic!("the platform's form answered by the wait page: {hops:#?}"));
    // The script never navigates on a wait page: every GET of the sidecar
    // after the form is the page's own refresh, the last one the redirect.
    let refreshes = &hops[posted + 1..hops.len() - 2];
    assert!(!refreshes.is_empty(), "{hops:#?}");
    assert!(
        refreshes[..refreshes.len() - 1]
            .iter()
            .all(|h| h == "GET sidecar/authorize 200"),
        "{hops:#?}"
    );
    assert_eq!(refreshes.last().unwrap(), "GET sidecar/authorize 303");
    assert_eq!(
        hops[hops.len() - 2..],
        [
            "GET synapse/_synapse/client/oidc/callback 200",
            "GET client/done 200"
        ]
    );

    let login = log_in_with(&seen.login_token()).await;
    assert_eq!(login["user_id"], user_id.as_str());
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert_eq!(account.displayname.as_deref(), Some("New Comer"));
    assert!(!account.deactivated && !account.locked, "{account:?}");
}

#[tokio::test]
async fn a_locked_user_gets_the_refusal_page_in_the_browser() {
    default_mode_only!(THROUGH_SYNAPSE_SSO);
    let env = TestEnv::new("browser-locked").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, localpart, _) = ready_user(&env, "browser-locked").await;
    env.patch_user(0, "browser-locked", json!({"locked": true}))
        .await;
    env.wait_ready(0, "browser-locked", true, "Converged").await;
    let token = platform_token(&subject, env.ns(0));
    wait_for("the sidecar to know of the lock", || async {
        let r = Authorization::new().send(sidecar, Some(&token)).await;
        (r.status() == StatusCode::FORBIDDEN).then_some(())
    })
    .await;
    let pick = format!("browser-locked Example (tenant {})", env.ns(0));

    let mut browser = BrowserRun::start("locked", json!({"pick": pick})).await;
    browser.page("platform-login").await;
    let refusal = browser.page("sidecar-refusal").await;
    assert_eq!(refusal["status"], 403);
    // Its heading says what is wrong, as its text does (not "No chat
    // account" to someone who has one).
    assert_eq!(refusal["title"], "Chat account locked");
    assert!(
        text(&refusal).starts_with("Chat account locked\n"),
        "{refusal:#}"
    );
    assert!(
        text(&refusal).contains("Your chat account is locked."),
        "{refusal:#}"
    );
    let seen = browser.done().await;
    seen.assert_clean();
    assert_eq!(
        seen.hops().last().map(String::as_str),
        Some("POST sidecar/authorize 403")
    );
    assert!(
        !seen.hops().iter().any(|h| h.contains("oidc/callback")),
        "never back to Synapse: {:#?}",
        seen.hops()
    );
    // Synapse: still locked, and no session was opened.
    let user_id = env.user_id(&localpart);
    let account = env.synapse.get_user(&user_id).await.unwrap().unwrap();
    assert!(account.locked, "{account:?}");
    assert!(env.synapse.list_devices(&user_id).await.unwrap().is_empty());
}

/// A relying party asks the sidecar, with `prompt=none`, whether a browser
/// signed out of the platform is signed in: it must come straight back to
/// the client (Synapse's callback) with `login_required`, never stopping
/// at the platform's login page.
#[tokio::test]
async fn prompt_none_without_a_platform_session_shows_no_login_page() {
    default_mode_only!(THROUGH_SYNAPSE_SSO);
    // A user exists, but this browser is signed out of the platform.
    let env = TestEnv::new("browser-silent").await;
    let (_, localpart, _) = ready_user(&env, "browser-silent").await;
    let sidecar = Stack::get().sidecar().await;
    let mut authorize = url::Url::parse(&format!("{sidecar}/authorize")).unwrap();
    authorize
        .query_pairs_mut()
        .extend_pairs(&Authorization::new().set("prompt", Some("none")).params);

    let mut browser =
        BrowserRun::start_at("prompt-none", json!({"pick": "nobody"}), authorize.as_str()).await;
    let error = browser.page("synapse-error").await;
    assert!(text(&error).contains("no platform session"), "{error:#}");
    let seen = browser.done().await;
    seen.assert_clean();
    let hops = seen.hops();
    assert_eq!(hops.len(), 2, "{hops:#?}");
    assert_eq!(hops[0], "GET sidecar/authorize 303");
    assert!(
        hops[1].starts_with("GET synapse/_synapse/client/oidc/callback "),
        "{hops:#?}"
    );
    let callback = url::Url::parse(seen.navigations()[1]["url"].as_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = callback.query_pairs().into_owned().collect();
    assert_eq!(q.get("error").map(String::as_str), Some("login_required"));
    assert_eq!(q.get("state").map(String::as_str), Some("state-123"));
    assert!(!q.contains_key("code"));
    // Synapse opened no session for anyone.
    let user_id = env.user_id(&localpart);
    assert!(env.synapse.list_devices(&user_id).await.unwrap().is_empty());
}
