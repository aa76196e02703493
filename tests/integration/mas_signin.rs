//! A Matrix 2.0 client's sign-in, end to end, in MAS mode: what Element X
//! (matrix-rust-sdk) does against Synapse delegating to MAS, whose upstream
//! provider is the sidecar. Discovery from Synapse, dynamic client
//! registration (MSC2966), the authorization code flow with PKCE through
//! MAS's pages, the sidecar and the platform's sign-in, the token, and
//! Synapse's answer; then a credential-API token used by a real client
//! library (matrix-nio) to sync and send; then a lock, which must kill both
//! tokens within a second of the MatrixUser saying so, for good.

use crate::harness::{https_client, python_venv, unique, wait_for, Stack, TestEnv};
use crate::rooms::perm;
use crate::sidecar::{credentials, platform_token, query, ready_user, refresh_of, whoami};
use base64::Engine;
use openmeet_matrix_operator::api::conditions::find;
use openmeet_matrix_operator::api::{MatrixRoom, RoomPermission};
use openmeet_matrix_operator::mas::{MasClient, SessionKind};
use rand::distr::{Alphanumeric, SampleString};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The matrix-nio release the test drives (PyPI), in a venv cached outside
/// the repository.
const NIO_VERSION: &str = "0.26.0";

/// The client's own address, as Element X registers one: a private-use
/// scheme, the reverse of its `client_uri`'s host (MAS's client
/// registration policy ties the two).
const CLIENT_URI: &str = "https://element.openmeet.test/";
const REDIRECT_URI: &str = "test.openmeet.element:/callback";

/// How long a lock may take to kill a token once the MatrixUser shows it.
const LOCK_BOUND: Duration = Duration::from_secs(1);

fn mas() -> MasClient {
    Stack::get()
        .mas()
        .expect("this test needs the stack in MAS mode (MATRIX_AUTH=mas)")
}

/// A browser: follows nothing by itself, keeps each origin's cookies (MAS's
/// session and upstream-login cookies, the sidecar's wait ticket).
struct Browser {
    http: reqwest::Client,
    jars: HashMap<String, BTreeMap<String, String>>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: https_client(),
            jars: HashMap::new(),
        }
    }

    fn origin(url: &url::Url) -> String {
        url.origin().ascii_serialization()
    }

    fn cookie_header(&self, url: &url::Url) -> Option<String> {
        let jar = self.jars.get(&Self::origin(url))?;
        (!jar.is_empty()).then(|| {
            jar.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn keep_cookies(&mut self, url: &url::Url, r: &reqwest::Response) {
        let jar = self.jars.entry(Self::origin(url)).or_default();
        for set in r.headers().get_all("set-cookie") {
            let Ok(set) = set.to_str() else { continue };
            let mut parts = set.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            let removed = value.is_empty()
                || parts.any(|a| a.eq_ignore_ascii_case("max-age=0"))
                || set.contains("1970");
            if removed {
                jar.remove(name);
            } else {
                jar.insert(name.to_string(), value.to_string());
            }
        }
    }

    async fn send(&mut self, url: &url::Url, form: Option<&[(&str, &str)]>) -> Page {
        let mut request = match form {
            Some(form) => self.http.post(url.as_str()).form(form),
            None => self.http.get(url.as_str()),
        };
        if let Some(cookies) = self.cookie_header(url) {
            request = request.header("cookie", cookies);
        }
        let r = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        self.keep_cookies(url, &r);
        let status = r.status();
        let location = r.headers().get("location").map(|l| {
            url.join(l.to_str().unwrap())
                .unwrap_or_else(|e| panic!("Location from {url}: {e}"))
        });
        let body = r.text().await.unwrap_or_default();
        Page {
            url: url.clone(),
            status,
            location,
            body,
        }
    }
}

/// One answer the browser got.
struct Page {
    url: url::Url,
    status: StatusCode,
    location: Option<url::Url>,
    body: String,
}

impl Page {
    fn excerpt(&self) -> String {
        let text: String = self.body.chars().take(1500).collect();
        format!("{} from {}: {text}", self.status, self.url)
    }

    fn redirect(&self) -> &url::Url {
        match (&self.location, self.status.is_redirection()) {
            (Some(to), true) => to,
            _ => panic!("expected a redirect, got {}", self.excerpt()),
        }
    }

    /// The value of the hidden form field `name` in a server-rendered page.
    fn hidden(&self, name: &str) -> Option<String> {
        let at = self.body.find(&format!("name=\"{name}\""))?;
        let tag_start = self.body[..at].rfind('<')?;
        let tag_end = at + self.body[at..].find('>')?;
        let tag = &self.body[tag_start..tag_end];
        let value = tag.split("value=\"").nth(1)?.split('"').next()?;
        Some(value.replace("&amp;", "&"))
    }
}

/// Follows redirects from `start` until one leaves for an address `stop`
/// accepts (not fetched), answering MAS's consent page (its one form: a
/// `csrf` field, posted back to the page) on the way. Returns that address
/// and every address visited, in order.
async fn follow(
    browser: &mut Browser,
    start: url::Url,
    stop: impl Fn(&url::Url) -> bool,
) -> (url::Url, Vec<url::Url>) {
    let mut visited = Vec::new();
    let mut next = start;
    let mut consented = false;
    for _ in 0..20 {
        visited.push(next.clone());
        let mut page = browser.send(&next, None).await;
        if page.status == StatusCode::OK {
            assert!(
                !consented && page.url.path().starts_with("/consent/"),
                "a page the flow does not expect: {}",
                page.excerpt()
            );
            let csrf = page
                .hidden("csrf")
                .unwrap_or_else(|| panic!("no csrf field in {}", page.excerpt()));
            assert!(
                page.body.contains("urn:matrix:client:api:*")
                    || page.body.to_lowercase().contains("consent"),
                "the consent page: {}",
                page.excerpt()
            );
            let url = page.url.clone();
            page = browser.send(&url, Some(&[("csrf", &csrf)])).await;
            consented = true;
        }
        let to = page.redirect().clone();
        if stop(&to) {
            return (to, visited);
        }
        next = to;
    }
    panic!("too many redirects: {visited:?}");
}

/// The addresses visited, without their queries (codes, state).
fn hops(visited: &[url::Url]) -> String {
    visited
        .iter()
        .map(|u| format!("{}{}", u.origin().ascii_serialization(), u.path()))
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn pkce() -> (String, String) {
    let verifier = Alphanumeric.sample_string(&mut rand::rng(), 64);
    let challenge =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&verifier));
    (verifier, challenge)
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// What Element X does to sign in: discovery, registration, authorization
/// code with PKCE through the browser, token. Returns the token response.
async fn sign_in(synapse: &str, subject: &str, tenant: &str, device: &str) -> Value {
    let no_wait: Option<std::future::Ready<()>> = None;
    let (token, waits) = sign_in_waiting(synapse, subject, tenant, device, no_wait).await;
    assert_eq!(waits, 0, "the account was ready: no wait page");
    token
}

/// [`sign_in`] for a user whose account may not be ready: while the sidecar
/// holds the browser on its wait page (which refreshes itself), `prepare`
/// runs once. Returns the token response and how many wait pages the
/// browser was shown.
async fn sign_in_waiting(
    synapse: &str,
    subject: &str,
    tenant: &str,
    device: &str,
    mut prepare: Option<impl std::future::Future<Output = ()>>,
) -> (Value, usize) {
    let stack = Stack::get();
    let sidecar = url::Url::parse(stack.sidecar().await).unwrap();
    let mas_url = url::Url::parse(stack.var("MAS_URL")).unwrap();
    let provider = stack.var("MAS_UPSTREAM_PROVIDER");
    let http = reqwest::Client::new();

    // 1. Discovery: Synapse names MAS as its authorization server.
    let (status, meta) = json_of(
        http.get(format!("{synapse}/_matrix/client/v1/auth_metadata"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "auth_metadata: {meta}");
    assert_eq!(
        meta["issuer"].as_str().map(|i| i.trim_end_matches('/')),
        Some(mas_url.as_str().trim_end_matches('/')),
        "{meta}"
    );
    assert!(
        meta["code_challenge_methods_supported"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("S256"))),
        "{meta}"
    );
    let endpoint = |name: &str| {
        let e = meta[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {meta}"));
        url::Url::parse(e).unwrap()
    };

    // 2. Dynamic client registration: a native, public client.
    let registration = json!({
        "client_name": "Element X (openmeet test)",
        "client_uri": CLIENT_URI,
        "application_type": "native",
        "redirect_uris": [REDIRECT_URI],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    let (status, client) = json_of(
        http.post(endpoint("registration_endpoint"))
            .json(&registration)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "MAS refused {registration}: {client}"
    );
    let client_id = client["client_id"].as_str().expect("client_id").to_string();
    eprintln!("mas_signin: MAS registered client {client_id} from {registration}");

    // 3. The authorization request, in the browser.
    let (verifier, challenge) = pkce();
    let state = unique("state");
    let scope = format!("openid urn:matrix:client:api:* urn:matrix:client:device:{device}");
    let mut authorize = endpoint("authorization_endpoint");
    authorize
        .query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &client_id)
        .append_pair("redirect_uri", REDIRECT_URI)
        .append_pair("scope", &scope)
        .append_pair("state", &state)
        .append_pair("nonce", &unique("nonce"))
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let mut browser = Browser::new();
    // MAS's login (no passwords, one provider) goes to the sidecar, which
    // sends a browser without a platform session to the platform's login.
    let (login, visited) = follow(&mut browser, authorize, |to| {
        to.host_str() == Some("platform.openmeet.test")
    })
    .await;
    assert!(
        visited.iter().any(|u| u.origin() == mas_url.origin()
            && u.path() == format!("/upstream/authorize/{provider}")),
        "MAS went to its upstream provider: {visited:?}"
    );
    assert!(
        visited
            .last()
            .is_some_and(|u| u.origin() == sidecar.origin() && u.path() == "/authorize"),
        "{visited:?}"
    );
    eprintln!("mas_signin: to the platform through {}", hops(&visited));
    assert_eq!(login.path(), "/login");
    let return_to = url::Url::parse(&query(&login)["return_to"]).unwrap();
    assert_eq!(return_to.origin(), sidecar.origin());

    // The platform signs the user in and posts its token back. The sidecar
    // answers with the redirect to MAS's callback once the account is ready,
    // and until then with its wait page.
    let mut back = browser
        .send(
            &return_to,
            Some(&[("platform_token", &platform_token(subject, tenant))]),
        )
        .await;
    let mut waits = 0;
    while back.status == StatusCode::OK {
        assert!(waits < 60, "still waiting: {}", back.excerpt());
        assert!(back.body.contains("being prepared"), "{}", back.excerpt());
        waits += 1;
        let (seconds, again) = refresh_of(&back.body);
        if let Some(prepare) = prepare.take() {
            prepare.await;
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        back = browser.send(&again, None).await;
    }
    let callback = back.redirect().clone();
    assert_eq!(
        (callback.origin(), callback.path()),
        (
            mas_url.origin(),
            format!("/upstream/callback/{provider}").as_str()
        ),
        "the sidecar sends the browser back to MAS: {}",
        back.excerpt()
    );
    assert!(query(&callback).contains_key("code"), "{callback}");

    // MAS redeems the code, finds the operator's link, logs the browser in,
    // asks for consent and sends the browser to the client.
    let (done, visited) = follow(&mut browser, callback, |to| {
        to.as_str().starts_with(REDIRECT_URI)
    })
    .await;
    assert!(
        visited
            .iter()
            .any(|u| u.path().starts_with("/upstream/link/")),
        "MAS found the upstream link: {visited:?}"
    );
    eprintln!("mas_signin: back to the client through {}", hops(&visited));
    let q = query(&done);
    assert_eq!(q.get("state"), Some(&state), "{done}");
    let code = q
        .get("code")
        .unwrap_or_else(|| panic!("no code: {done}"))
        .clone();

    // 4. The token, with the PKCE verifier.
    let (status, token) = json_of(
        http.post(endpoint("token_endpoint"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT_URI),
                ("client_id", client_id.as_str()),
                ("code_verifier", verifier.as_str()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "token endpoint: {token}");
    let mut token = token;
    token["client_id"] = json!(client_id);
    token["token_endpoint"] = json!(endpoint("token_endpoint").as_str());
    (token, waits)
}

/// Syncs and sends `body` into `room` with matrix-nio; the event id.
async fn nio_sync_send(
    synapse: &str,
    user_id: &str,
    device_id: &str,
    token: &str,
    room: &str,
    body: &str,
) -> String {
    let python = python_venv("matrix-nio", NIO_VERSION, "nio").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/nio_sync_send.py"
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args([synapse, user_id, device_id, room, body])
        .env("MATRIX_ACCESS_TOKEN", token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "matrix-nio: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        answer["joined"].as_array().unwrap().contains(&json!(room)),
        "{answer}"
    );
    answer["event_id"].as_str().unwrap().to_string()
}

/// Whether the user's `Locked` condition is true.
fn shows_locked(user: &openmeet_matrix_operator::api::MatrixUser) -> bool {
    user.status
        .as_ref()
        .and_then(|s| find(&s.conditions, "Locked"))
        .is_some_and(|c| c.status == "True")
}

#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn a_matrix_2_client_signs_in_through_mas_and_a_lock_ends_every_session() {
    let env = TestEnv::new("mas-signin").await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let synapse = stack.var("SYNAPSE_URL");
    let (subject, localpart, user_id) = ready_user(&env, "signer").await;
    let tenant = env.ns(0).to_string();

    // Element X signs in, with a device of its own choosing.
    let device = Alphanumeric.sample_string(&mut rand::rng(), 10);
    let token = sign_in(synapse, &subject, &tenant, &device).await;
    let oauth = token["access_token"].as_str().expect("access_token");
    let refresh = token["refresh_token"].as_str().expect("refresh_token");
    assert!(
        token["scope"]
            .as_str()
            .is_some_and(|s| s.contains(&format!("urn:matrix:client:device:{device}"))),
        "{token}"
    );
    let (status, me) = whoami(synapse, oauth).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user_id"], user_id.as_str(), "{me}");
    assert_eq!(me["device_id"], device.as_str(), "{me}");
    let account = mas().user_by_username(&localpart).await.unwrap().unwrap();
    assert_eq!(
        mas()
            .active_sessions(&account.id, SessionKind::OAuth2)
            .await
            .unwrap()
            .len(),
        1,
        "MAS holds the client's session"
    );

    // The credential API's token, driven by a real client library in a
    // room the operator joined the user to.
    env.create::<MatrixRoom>(
        0,
        "lounge",
        json!({"alias": unique("mas-signin"), "name": "Lounge"}),
    )
    .await;
    perm(&env, 0, "p-signer", "lounge", "signer", json!({})).await;
    env.wait_condition::<RoomPermission>(0, "p-signer", true, "Converged")
        .await;
    let room = env
        .wait_condition::<MatrixRoom>(0, "lounge", true, "Converged")
        .await;
    let room_id = room.status.unwrap().room_id.unwrap();
    let (status, creds) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    assert_eq!(status, StatusCode::OK, "{creds}");
    let api = creds["access_token"].as_str().unwrap().to_string();
    let (status, api_me) = whoami(synapse, &api).await;
    assert_eq!(status, StatusCode::OK, "{api_me}");
    assert_eq!(api_me["user_id"], user_id.as_str());
    let api_device = api_me["device_id"].as_str().expect("a device").to_string();
    let body = unique("hello from matrix-nio");
    let event_id = nio_sync_send(synapse, &user_id, &api_device, &api, &room_id, &body).await;
    // On the server, read with the other session (Element X's).
    let (status, event) = json_of(
        reqwest::Client::new()
            .get(format!(
                "{synapse}/_matrix/client/v3/rooms/{}/event/{}",
                urlencode(&room_id),
                urlencode(&event_id)
            ))
            .bearer_auth(oauth)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{event}");
    assert_eq!(
        (
            event["sender"].as_str(),
            event["content"]["body"].as_str(),
            event["room_id"].as_str()
        ),
        (
            Some(user_id.as_str()),
            Some(body.as_str()),
            Some(room_id.as_str())
        ),
        "{event}"
    );

    // A lock: both tokens die within a second of the MatrixUser showing it.
    let users = env.users(0);
    let patched = Instant::now();
    env.patch_user(0, "signer", json!({"locked": true})).await;
    let mut locked_at = None;
    let mut dead_at: [Option<(Instant, Value)>; 2] = [None, None];
    let deadline = patched + Duration::from_secs(60);
    while locked_at.is_none() || dead_at.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "after 60 s: Locked seen {:?}, tokens dead {:?}",
            locked_at.map(|t: Instant| t - patched),
            dead_at
                .iter()
                .map(|d| d.as_ref().map(|(t, _)| *t - patched))
                .collect::<Vec<_>>()
        );
        if locked_at.is_none() && users.get("signer").await.is_ok_and(|u| shows_locked(&u)) {
            locked_at = Some(Instant::now());
        }
        for (slot, token) in dead_at.iter_mut().zip([oauth, api.as_str()]) {
            if slot.is_none() {
                let (status, body) = whoami(synapse, token).await;
                if status == StatusCode::UNAUTHORIZED {
                    *slot = Some((Instant::now(), body));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let locked_at = locked_at.unwrap();
    let since = |t: Instant| t.saturating_duration_since(locked_at);
    let [Some((oauth_dead, oauth_body)), Some((api_dead, api_body))] = dead_at else {
        unreachable!()
    };
    eprintln!(
        "mas_signin: Locked=True {:?} after the patch; OAuth token 401 ({}) {:?} and \
         credential token 401 ({}) {:?} after the patch, {:?} / {:?} after Locked=True",
        locked_at - patched,
        oauth_body["errcode"],
        oauth_dead - patched,
        api_body["errcode"],
        api_dead - patched,
        since(oauth_dead),
        since(api_dead),
    );
    assert!(
        since(oauth_dead) <= LOCK_BOUND && since(api_dead) <= LOCK_BOUND,
        "a lock kills every token within {LOCK_BOUND:?} of Locked=True: OAuth {:?}, credential {:?}",
        since(oauth_dead),
        since(api_dead)
    );

    // Unlocked: the old tokens stay dead, MAS holds no session of the user.
    env.patch_user(0, "signer", json!({"locked": false})).await;
    env.wait_ready(0, "signer", true, "Converged").await;
    assert!(!mas().user(&account.id).await.unwrap().unwrap().locked);
    for (name, token) in [("OAuth", oauth), ("credential", api.as_str())] {
        let (status, body) = whoami(synapse, token).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "the {name} token from before the lock never comes back: {body}"
        );
    }
    let (status, refreshed) = json_of(
        reqwest::Client::new()
            .post(token["token_endpoint"].as_str().unwrap())
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh),
                ("client_id", token["client_id"].as_str().unwrap()),
            ])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "nor does its refresh token: {refreshed}"
    );
    for kind in [SessionKind::OAuth2, SessionKind::Personal] {
        let active = wait_for("MAS to list the sessions", || async {
            mas().active_sessions(&account.id, kind).await.ok()
        })
        .await;
        assert!(
            active.is_empty(),
            "{kind:?} sessions still active: {active:?}"
        );
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A first login right after sign-up, in MAS mode: the platform sends the
/// browser back before the `MatrixUser` exists. The sidecar holds it on its
/// wait page, so MAS gets its callback only once the operator has made the
/// account and its upstream link: MAS signs the browser in to that account
/// and makes none of its own.
#[tokio::test]
#[ignore = "MAS mode: make integration-mas"]
async fn a_first_login_waits_for_the_account_before_mas_gets_its_callback() {
    let env = TestEnv::new("mas-first-login").await;
    let synapse = Stack::get().var("SYNAPSE_URL");
    let (subject, localpart) = (unique("sub"), unique("newcomer"));
    let tenant = env.ns(0).to_string();
    let device = Alphanumeric.sample_string(&mut rand::rng(), 10);
    assert!(mas().user_by_username(&localpart).await.unwrap().is_none());

    // The platform writes the MatrixUser only while the browser waits.
    let prepare = async {
        env.create_user(
            0,
            "newcomer",
            json!({"localpart": localpart, "displayName": "New Comer", "subject": subject}),
        )
        .await;
    };
    let (token, waits) = sign_in_waiting(synapse, &subject, &tenant, &device, Some(prepare)).await;
    assert!(waits >= 1, "the browser waited");
    let user_id = env.user_id(&localpart).to_string();
    let (status, me) = whoami(synapse, token["access_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["user_id"], user_id.as_str(), "{me}");

    // In MAS: the operator's account, with the one link to the tenant-qualified subject.
    let account = mas().user_by_username(&localpart).await.unwrap().unwrap();
    let links = mas().links_of(&account.id).await.unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].subject, format!("{tenant}/{subject}"));
    let user = env.wait_ready(0, "newcomer", true, "Converged").await;
    assert_eq!(
        user.status.unwrap().user_id.as_deref(),
        Some(user_id.as_str())
    );
}
