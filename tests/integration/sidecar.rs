//! The sidecar against the real stack: Synapse's SSO login through the
//! sidecar as its OIDC provider, the credential API, and every refusal.

use crate::harness::{
    default_mode_only, free_port, https_client, unique, wait_for, Options, Stack, TestEnv,
};
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use openmeet_matrix_operator::sidecar::config::{ClientConfig, SidecarConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub const PLATFORM_ISSUER: &str = "https://platform.openmeet.test";
pub const PLATFORM_AUDIENCE: &str = "openmeet-matrix";

pub(crate) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn platform_secret() -> String {
    let path = Stack::get().var("PLATFORM_SECRET_FILE");
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// Claims of a valid platform token for `subject` in `tenant`.
pub fn platform_claims(subject: &str, tenant: &str) -> Value {
    json!({"iss": PLATFORM_ISSUER, "aud": PLATFORM_AUDIENCE, "sub": subject,
           "tenant": tenant, "iat": now(), "exp": now() + 600})
}

/// A platform token as the platform would issue it (HS256, shared secret).
pub fn platform_token_with(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(platform_secret().as_bytes()),
    )
    .unwrap()
}

pub fn platform_token(subject: &str, tenant: &str) -> String {
    platform_token_with(&platform_claims(subject, tenant))
}

pub(crate) fn client_secret() -> String {
    let path = Stack::get().var("OIDC_CLIENT_SECRET_FILE");
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// The stack's sidecar configuration (`sidecar.yaml`, written by `up.sh`).
pub(crate) fn stack_sidecar_config() -> SidecarConfig {
    let text = std::fs::read_to_string(Stack::get().var("SIDECAR_CONFIG")).expect("sidecar.yaml");
    SidecarConfig::from_yaml(&text).expect("sidecar.yaml")
}

/// The one OIDC client of the stack's sidecar: Synapse (its
/// `oidc_providers`), or in MAS mode MAS (its upstream provider). The
/// sidecar's OIDC provider is the same for either: the tests of it play
/// the client of the stack's auth mode.
fn stack_client() -> &'static ClientConfig {
    static CLIENT: std::sync::OnceLock<ClientConfig> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut clients = stack_sidecar_config().clients;
        assert_eq!(clients.len(), 1, "the stack's sidecar has one client");
        clients.remove(0)
    })
}

/// That client's id (`synapse`, or `mas` in MAS mode).
pub(crate) fn client_id() -> &'static str {
    &stack_client().id
}

/// That client's redirect URI: Synapse's OIDC callback, or in MAS mode
/// MAS's upstream callback.
pub(crate) fn callback() -> String {
    stack_client().redirect_uris[0].clone()
}

fn pkce() -> (String, String) {
    let verifier = format!("{}{}", unique("verifier"), "x".repeat(40));
    let challenge =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&verifier));
    (verifier, challenge)
}

pub(crate) fn location(r: &reqwest::Response) -> url::Url {
    let raw = r
        .headers()
        .get("location")
        .unwrap_or_else(|| panic!("no Location in {} answer", r.status()))
        .to_str()
        .unwrap();
    url::Url::parse(raw).unwrap()
}

pub(crate) fn query(url: &url::Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

/// Creates a user with a subject and waits until it is Ready.
pub(crate) async fn ready_user(env: &TestEnv, name: &str) -> (String, String, String) {
    let subject = unique("sub");
    let localpart = unique(name);
    env.create_user(
        0,
        name,
        json!({"localpart": localpart, "displayName": format!("{name} Example"),
               "email": format!("{localpart}@example.test"), "subject": subject}),
    )
    .await;
    let user = env.wait_ready(0, name, true, "Converged").await;
    let user_id = user.status.unwrap().user_id.unwrap();
    (subject, localpart, user_id)
}

pub(crate) async fn whoami(synapse: &str, token: &str) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .get(format!("{synapse}/_matrix/client/v3/account/whoami"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// One authorization request, as a client of the sidecar.
pub(crate) struct Authorization {
    pub(crate) params: Vec<(String, String)>,
    pub(crate) verifier: String,
    nonce: String,
}

impl Authorization {
    pub(crate) fn new() -> Self {
        let (verifier, challenge) = pkce();
        let nonce = unique("nonce");
        let params = [
            ("response_type", "code"),
            ("client_id", client_id()),
            ("redirect_uri", callback().as_str()),
            ("scope", "openid profile email"),
            ("state", "state-123"),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Authorization {
            params,
            verifier,
            nonce,
        }
    }

    pub(crate) fn set(mut self, key: &str, value: Option<&str>) -> Self {
        self.params.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.params.push((key.to_string(), v.to_string()));
        }
        self
    }

    pub(crate) async fn send(&self, base: &str, platform_token: Option<&str>) -> reqwest::Response {
        let mut request = https_client()
            .get(format!("{base}/authorize"))
            .query(&self.params);
        if let Some(t) = platform_token {
            request = request.bearer_auth(t);
        }
        request.send().await.unwrap()
    }

    /// The code from a successful authorization.
    pub(crate) async fn code(&self, base: &str, platform_token: &str) -> String {
        let r = self.send(base, Some(platform_token)).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "authorize redirects");
        let to = location(&r);
        assert!(to.as_str().starts_with(&callback()));
        let q = query(&to);
        assert_eq!(q.get("state").map(String::as_str), Some("state-123"));
        q.get("code").expect("code").clone()
    }
}

pub(crate) async fn redeem(
    base: &str,
    code: &str,
    verifier: &str,
    secret: &str,
) -> reqwest::Response {
    https_client()
        .post(format!("{base}/token"))
        .basic_auth(client_id(), Some(secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &callback()),
            ("code_verifier", verifier),
        ])
        .send()
        .await
        .unwrap()
}

async fn jwks(base: &str) -> JwkSet {
    https_client()
        .get(format!("{base}/jwks"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Verifies an id_token the way a relying party does: key by kid from the
/// JWKS, issuer, audience, expiry.
async fn verify_id_token(base: &str, id_token: &str) -> Value {
    let header = jsonwebtoken::decode_header(id_token).unwrap();
    let keys = jwks(base).await;
    let jwk = keys
        .find(header.kid.as_deref().expect("kid"))
        .expect("the kid is published");
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[base]);
    validation.set_audience(&[client_id()]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(id_token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .expect("id_token verifies")
        .claims
}

/// A browser in the middle of Synapse's SSO login: the cookies Synapse set
/// and the address it sent the browser to (the sidecar's `/authorize`).
struct SsoBrowser {
    cookies: String,
    authorize: url::Url,
}

impl SsoBrowser {
    /// Step 1: the Matrix client asks Synapse for SSO; Synapse sends it to us.
    async fn begin() -> SsoBrowser {
        let stack = Stack::get();
        let sidecar = stack.sidecar().await;
        let r = https_client()
            .get(format!(
                "{}/_matrix/client/v3/login/sso/redirect/oidc-{}?redirectUrl=http://localhost/done",
                stack.var("SYNAPSE_URL"),
                stack.var("OIDC_IDP_ID")
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        let cookies: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|c| c.to_str().ok()?.split(';').next().map(str::to_string))
            .collect();
        let authorize = location(&r);
        assert!(authorize
            .as_str()
            .starts_with(&format!("{sidecar}/authorize")));
        assert_eq!(query(&authorize)["code_challenge_method"], "S256");
        SsoBrowser {
            cookies: cookies.join("; "),
            authorize,
        }
    }

    /// Steps 2 and 3: without a platform session the sidecar sends the
    /// browser to the platform, which signs the user in and posts its
    /// token back, in a form, to the return address: the sidecar's answer.
    async fn back_from_platform(&self, platform_token: &str) -> reqwest::Response {
        let back = self.return_address().await;
        assert!(!back.as_str().contains(platform_token));
        https_client()
            .post(back.as_str())
            .form(&[("platform_token", platform_token)])
            .send()
            .await
            .unwrap()
    }

    /// The address the platform is to send the browser back to.
    async fn return_address(&self) -> url::Url {
        let sidecar = Stack::get().sidecar().await;
        let r = https_client()
            .get(self.authorize.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let login = location(&r);
        assert_eq!(login.path(), "/login");
        let return_to = query(&login)["return_to"].clone();
        assert!(return_to.starts_with(&format!("{sidecar}/authorize?")));
        url::Url::parse(&return_to).unwrap()
    }

    /// Steps 4 and 5: Synapse redeems the code (PKCE, client secret),
    /// checks the id_token and hands the client a login token, which
    /// `m.login.token` turns into a session: Synapse's answer to `/login`.
    async fn complete(&self, callback: &url::Url) -> Value {
        let synapse = Stack::get().var("SYNAPSE_URL");
        assert!(callback.as_str().starts_with(&self::callback()));
        let r = https_client()
            .get(callback.as_str())
            .header("cookie", &self.cookies)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let login_token = if status.is_redirection() {
            query(&location(&r))
                .get("loginToken")
                .cloned()
                .expect("loginToken")
        } else {
            let body = r.text().await.unwrap();
            let start = body
                .find("loginToken=")
                .unwrap_or_else(|| panic!("no loginToken in Synapse's {status} page: {body}"));
            body[start + "loginToken=".len()..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .next()
                .unwrap()
                .to_string()
        };
        let r = reqwest::Client::new()
            .post(format!("{synapse}/_matrix/client/v3/login"))
            .json(&json!({"type": "m.login.token", "token": login_token}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }
}

/// A whole SSO login through Synapse for a platform user with a usable
/// account: Synapse's answer to `/login` (a session with a device).
async fn sso_login(subject: &str, tenant: &str) -> Value {
    let browser = SsoBrowser::begin().await;
    let r = browser
        .back_from_platform(&platform_token(subject, tenant))
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    browser.complete(&location(&r)).await
}

#[tokio::test]
async fn sso_login_through_synapse_lands_on_the_operators_account() {
    default_mode_only!(
        "Synapse's own SSO (`oidc_providers`, its login/sso/redirect and OIDC callback), which \
         Synapse has no longer under MAS; the sign-in through MAS is mas_signin::'s"
    );
    let env = TestEnv::new("sso").await;
    let stack = Stack::get();
    let synapse = stack.var("SYNAPSE_URL");
    let (subject, _, user_id) = ready_user(&env, "sso-user").await;

    let browser = SsoBrowser::begin().await;
    let r = browser
        .back_from_platform(&platform_token(&subject, env.ns(0)))
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()["referrer-policy"],
        "no-referrer",
        "the platform token must not leak through Referer"
    );
    let login = browser.complete(&location(&r)).await;

    // An access token for exactly the operator's account.
    assert_eq!(login["user_id"], user_id);
    let (status, me) = whoami(synapse, login["access_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], user_id);
}

#[tokio::test]
async fn authorize_refuses_users_without_a_ready_account() {
    let env = TestEnv::new("sso-refuse").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, localpart, _) = ready_user(&env, "locked-soon").await;

    // Unknown tenant: a clear page, never another account.
    let r = Authorization::new()
        .send(sidecar, Some(&platform_token(&subject, "no-such-tenant")))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("no chat account"));
    // Unknown subject: it may be signing up right now, so it waits a
    // bounded time on a page that refreshes itself; then the same page.
    let nobody = platform_token("nobody", env.ns(0));
    let r = Authorization::new().send(sidecar, Some(&nobody)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let (_, refresh) = refresh_of(&r.text().await.unwrap());
    let started: u64 = query(&refresh)["wait_started"].parse().unwrap();
    assert!(started.abs_diff(now()) < 60);
    let r = Authorization::new()
        .set("wait_started", Some(&(now() - 3600).to_string()))
        .send(sidecar, Some(&nobody))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "the wait is bounded");
    assert!(r.text().await.unwrap().contains("no chat account"));
    // A declared but not Ready account (its localpart is taken).
    let other_subject = unique("sub");
    env.create_user(
        0,
        "twin",
        json!({"localpart": localpart, "subject": other_subject}),
    )
    .await;
    env.wait_ready(0, "twin", false, "LocalpartConflict").await;
    let r = Authorization::new()
        .send(sidecar, Some(&platform_token(&other_subject, env.ns(0))))
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.text().await.unwrap().contains("not ready"));
    // Locked.
    env.patch_user(0, "locked-soon", json!({"locked": true}))
        .await;
    let token = platform_token(&subject, env.ns(0));
    wait_for("authorize refuses the locked user", || async {
        let r = Authorization::new().send(sidecar, Some(&token)).await;
        (r.status() == StatusCode::FORBIDDEN).then_some(())
    })
    .await;
    // An invalid platform token is refused with a page, not a redirect loop.
    let r = Authorization::new()
        .send(sidecar, Some("not.a.token"))
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn authorization_code_flow_enforces_every_binding() {
    let env = TestEnv::new("oidc").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, localpart, _) = ready_user(&env, "flow").await;
    let token = platform_token(&subject, env.ns(0));
    let secret = client_secret();

    // The redirect URI must match exactly; no redirect to an unregistered one.
    for bad in [
        format!("{}/", callback()),
        "https://evil.test/cb".to_string(),
    ] {
        let r = Authorization::new()
            .set("redirect_uri", Some(&bad))
            .send(sidecar, Some(&token))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.headers().get("location").is_none());
    }
    let r = Authorization::new()
        .set("client_id", Some("intruder"))
        .send(sidecar, Some(&token))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // PKCE S256 is required: missing or `plain` is an error sent back.
    for method in [None, Some("plain")] {
        let r = Authorization::new()
            .set("code_challenge_method", method)
            .send(sidecar, Some(&token))
            .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let q = query(&location(&r));
        assert_eq!(q["error"], "invalid_request");
        assert_eq!(q["state"], "state-123");
        assert!(!q.contains_key("code"));
    }
    let r = Authorization::new()
        .set("code_challenge", None)
        .send(sidecar, Some(&token))
        .await;
    assert_eq!(query(&location(&r))["error"], "invalid_request");
    let r = Authorization::new()
        .set("scope", Some("profile"))
        .send(sidecar, Some(&token))
        .await;
    assert_eq!(query(&location(&r))["error"], "invalid_scope");

    // Client authentication.
    let auth = Authorization::new();
    let code = auth.code(sidecar, &token).await;
    let r = redeem(sidecar, &code, &auth.verifier, "wrong-secret").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_client");

    // The code is bound to the PKCE verifier (and consumed by the attempt).
    let auth = Authorization::new();
    let code = auth.code(sidecar, &token).await;
    let r = redeem(sidecar, &code, &format!("{}y", auth.verifier), &secret).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");

    // The code is bound to the redirect URI.
    let auth = Authorization::new();
    let code = auth.code(sidecar, &token).await;
    let r = https_client()
        .post(format!("{sidecar}/token"))
        .basic_auth(client_id(), Some(&secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", "https://evil.test/cb"),
            ("code_verifier", auth.verifier.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A good redemption: a signed id_token with the claims Synapse maps.
    let auth = Authorization::new();
    let code = auth.code(sidecar, &token).await;
    let r = redeem(sidecar, &code, &auth.verifier, &secret).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let answer: Value = r.json().await.unwrap();
    let claims = verify_id_token(sidecar, answer["id_token"].as_str().unwrap()).await;
    // The subject is tenant-qualified: equal subjects of two tenants differ.
    assert_eq!(claims["sub"], format!("{}/{subject}", env.ns(0)));
    assert_eq!(claims["nonce"], auth.nonce.as_str());
    assert_eq!(claims["preferred_username"], localpart.as_str());
    assert_eq!(claims["name"], "flow Example");
    assert_eq!(claims["email"], format!("{localpart}@example.test"));
    assert_eq!(claims["tenant"], env.ns(0));
    assert!(claims["iat"].as_u64().unwrap() <= now());
    let access = answer["access_token"].as_str().unwrap().to_string();
    let userinfo = || async {
        https_client()
            .get(format!("{sidecar}/userinfo"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap()
    };
    let r = userinfo().await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<Value>().await.unwrap()["sub"],
        format!("{}/{subject}", env.ns(0))
    );

    // Replaying the code fails and revokes what the code issued.
    let r = redeem(sidecar, &code, &auth.verifier, &secret).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(userinfo().await.status(), StatusCode::UNAUTHORIZED);

    // Discovery lists only what we sign with.
    let discovery: Value = https_client()
        .get(format!("{sidecar}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], sidecar);
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    assert_eq!(
        discovery["code_challenge_methods_supported"],
        json!(["S256"])
    );
}

pub(crate) async fn credentials(sidecar: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = https_client().post(format!("{sidecar}/api/v1/credentials"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn credential_api_hands_out_a_working_token_and_reuses_it() {
    let env = TestEnv::new("creds").await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let (subject, _, user_id) = ready_user(&env, "cred-user").await;
    let token = platform_token(&subject, env.ns(0));

    let (status, first) = credentials(sidecar, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["user_id"], user_id);
    assert_eq!(first["homeserver_url"], stack.var("SYNAPSE_URL"));
    assert!(first["expires_in"].as_u64().unwrap() > 3000);
    let access = first["access_token"].as_str().unwrap();
    let (status, me) = whoami(stack.var("SYNAPSE_URL"), access).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], user_id);

    let (_, second) = credentials(sidecar, Some(&token)).await;
    assert_eq!(
        second["access_token"], first["access_token"],
        "a live token is reused"
    );
    assert_eq!(second["expires_at"], first["expires_at"]);
}

#[tokio::test]
async fn credential_api_refusals_have_stable_codes() {
    let env = TestEnv::new("creds-refuse").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, localpart, _) = ready_user(&env, "refused").await;
    let tenant = env.ns(0).to_string();

    let (status, body) = credentials(sidecar, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );

    let mut invalid = Vec::new();
    let mut c = platform_claims(&subject, &tenant);
    c["exp"] = json!(now() - 600);
    invalid.push(("expired", platform_token_with(&c)));
    let mut c = platform_claims(&subject, &tenant);
    c["iss"] = json!("https://evil.test");
    invalid.push(("issuer", platform_token_with(&c)));
    let mut c = platform_claims(&subject, &tenant);
    c["aud"] = json!("another-app");
    invalid.push(("audience", platform_token_with(&c)));
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &platform_claims(&subject, &tenant),
        &EncodingKey::from_secret(b"guessed-secret-guessed-secret-guessed"),
    )
    .unwrap();
    invalid.push(("signature", forged));
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    invalid.push((
        "alg none",
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&platform_claims(&subject, &tenant))
        ),
    ));
    for (what, token) in &invalid {
        let (status, body) = credentials(sidecar, Some(token)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"], "invalid_token", "{what}");
    }

    let (status, body) = credentials(sidecar, Some(&platform_token(&subject, "no-tenant"))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_tenant"))
    );
    // No account declared (yet): the platform may be writing it.
    let (status, body) = credentials(sidecar, Some(&platform_token("stranger", &tenant))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::ACCEPTED, Some("account_pending"))
    );

    // Declared but not Ready (the localpart is held by the older object).
    let twin_subject = unique("sub");
    env.create_user(
        0,
        "twin",
        json!({"localpart": localpart, "subject": twin_subject}),
    )
    .await;
    env.wait_ready(0, "twin", false, "LocalpartConflict").await;
    let (status, body) = credentials(sidecar, Some(&platform_token(&twin_subject, &tenant))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("user_not_ready"))
    );

    // Per-user rate limit (burst 10): the rest get 429 with Retry-After.
    let token = platform_token(&subject, &tenant);
    let mut limited = None;
    for _ in 0..15 {
        let r = https_client()
            .post(format!("{sidecar}/api/v1/credentials"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    let limited = limited.expect("the per-user limit applies");
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(
        limited.json::<Value>().await.unwrap()["error"],
        "rate_limited"
    );
    // Another user is not affected.
    let (status, _) = credentials(sidecar, Some(&platform_token(&twin_subject, &tenant))).await;
    assert_ne!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn tokens_die_when_the_user_is_locked_deactivated_or_deleted() {
    let env = TestEnv::with("creds-revoke", Options::default()).await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let synapse = stack.var("SYNAPSE_URL");
    let tenant = env.ns(0).to_string();

    // Locked: the token stops working and no new one is issued.
    let (subject, _, _) = ready_user(&env, "to-lock").await;
    let (_, creds) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    let access = creds["access_token"].as_str().unwrap().to_string();
    assert_eq!(whoami(synapse, &access).await.0, StatusCode::OK);
    env.patch_user(0, "to-lock", json!({"locked": true})).await;
    env.wait_ready(0, "to-lock", true, "Converged").await;
    wait_for("the locked user's token to die", || async {
        (whoami(synapse, &access).await.0 != StatusCode::OK).then_some(())
    })
    .await;
    let (status, body) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("user_locked"))
    );
    // Unlocking does not bring the old token back: a locked account cannot
    // log out, so the sidecar logs the token out as soon as the lock lifts.
    env.patch_user(0, "to-lock", json!({"locked": false})).await;
    env.wait_ready(0, "to-lock", true, "Converged").await;
    wait_for("the unlocked user's old token to stay dead", || async {
        let (status, body) = whoami(synapse, &access).await;
        (status == StatusCode::UNAUTHORIZED && body["errcode"] == "M_UNKNOWN_TOKEN").then_some(())
    })
    .await;
    let (status, fresh) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(fresh["access_token"].as_str(), Some(access.as_str()));

    // Deactivated.
    let (subject, _, _) = ready_user(&env, "to-deactivate").await;
    let (_, creds) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    let access = creds["access_token"].as_str().unwrap().to_string();
    env.patch_user(0, "to-deactivate", json!({"deactivated": true}))
        .await;
    wait_for("the deactivated user's token to die", || async {
        (whoami(synapse, &access).await.0 == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    let (status, body) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("user_deactivated"))
    );

    // Deleted with Retain: Synapse keeps the account, but the sidecar logs
    // out what it handed out.
    let subject = unique("sub");
    let localpart = unique("retained");
    env.create_user(
        0,
        "retained",
        json!({"localpart": localpart, "subject": subject, "deletionPolicy": "Retain"}),
    )
    .await;
    env.wait_ready(0, "retained", true, "Converged").await;
    let (_, creds) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    let access = creds["access_token"].as_str().unwrap().to_string();
    assert_eq!(whoami(synapse, &access).await.0, StatusCode::OK);
    env.delete_user(0, "retained").await;
    env.wait_gone(&env.users(0), "retained").await;
    wait_for("the deleted user's token to die", || async {
        (whoami(synapse, &access).await.0 == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    // Gone: no account is declared for the user any more. As for one not
    // declared yet, no token, and the answer is "pending" (the platform
    // knows whether it will declare one).
    let (status, body) = credentials(sidecar, Some(&platform_token(&subject, &tenant))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::ACCEPTED, Some("account_pending"))
    );
}

/// A sidecar of the test's own: the shipped binary with its own config file,
/// key directory and port (Synapse never talks to it; the test is the client).
pub(crate) struct OwnSidecar {
    pub(crate) base: String,
    metrics: String,
    keys: std::path::PathBuf,
    dir: std::path::PathBuf,
    _child: tokio::process::Child,
}

impl Drop for OwnSidecar {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The platform part of the config as YAML (indented under `platform:`).
pub(crate) async fn own_sidecar(platform_yaml: &str) -> OwnSidecar {
    own_sidecar_with(platform_yaml, None, "").await
}

/// With a key directory of another sidecar (replicas share their Secret),
/// and more top-level YAML.
pub(crate) async fn own_sidecar_with(
    platform_yaml: &str,
    shared_keys: Option<&std::path::Path>,
    extra_yaml: &str,
) -> OwnSidecar {
    let stack = Stack::get();
    let dir = std::env::temp_dir().join(unique("own-sidecar"));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = match shared_keys {
        Some(k) => k.to_path_buf(),
        None => {
            let keys = dir.join("keys");
            std::fs::create_dir_all(&keys).unwrap();
            std::fs::write(keys.join("first.pem"), generate_ec_key()).unwrap();
            keys
        }
    };
    let port = free_port();
    let metrics_port = free_port();
    let base = format!("https://127.0.0.1:{port}");
    // The stack's sidecar's `mas` block, in MAS mode: tokens are MAS's.
    let mas_yaml = match stack_sidecar_config().mas {
        Some(mas) => format!(
            "mas:\n  url: \"{}\"\n  clientId: \"{}\"\n  clientSecretFile: \"{}\"",
            mas.url,
            mas.client_id,
            mas.client_secret_file.display()
        ),
        None => String::new(),
    };
    let config = format!(
        r#"listen: "127.0.0.1:{port}"
issuer: "{base}"
tls: {{certFile: "{cert}", keyFile: "{key}"}}
signingKeys: {{dir: "{keys}"}}
clients:
  - id: {client_id}
    secretFile: "{client_secret}"
    redirectUris: ["{callback}"]
platform:
{platform_yaml}
homeserver:
  url: "{synapse}"
  serverName: "{server_name}"
  adminLocalpart: "{admin}"
  asTokenSecret: "{as_secret}"
oidc: {{codeSeconds: 2}}
reloadSeconds: 1
metricsListen: "127.0.0.1:{metrics_port}"
{mas_yaml}
{extra_yaml}
"#,
        cert = stack.var("SIDECAR_CERT"),
        key = stack.var("SIDECAR_KEY"),
        keys = keys.display(),
        client_id = client_id(),
        client_secret = stack.var("OIDC_CLIENT_SECRET_FILE"),
        callback = callback(),
        synapse = stack.var("SYNAPSE_URL"),
        server_name = stack.var("MATRIX_SERVER_NAME"),
        admin = stack.var("MATRIX_ADMIN_LOCALPART"),
        as_secret = stack.var("AS_TOKEN_SECRET"),
    );
    let config_path = dir.join("sidecar.yaml");
    std::fs::write(&config_path, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_openmeet-matrix-operator"))
        .args(["sidecar", "--config"])
        .arg(&config_path)
        .env_clear()
        .env("KUBECONFIG", stack.var("KUBECONFIG"))
        // Everything, dependencies included, to check what reaches the log.
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("sidecar.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sidecar binary");
    let http = https_client();
    wait_for("the test's own sidecar", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    OwnSidecar {
        base,
        metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
        keys,
        dir,
        _child: child,
    }
}

impl OwnSidecar {
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap()
    }
}

pub(crate) fn generate_ec_key() -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .output()
        .expect("openssl");
    assert!(out.status.success());
    out.stdout
}

pub(crate) fn hs256_platform_yaml() -> String {
    format!(
        "  issuer: \"{PLATFORM_ISSUER}\"\n  audience: \"{PLATFORM_AUDIENCE}\"\n  secretFile: \"{}\"",
        Stack::get().var("PLATFORM_SECRET_FILE")
    )
}

#[tokio::test]
async fn signing_keys_rotate_with_overlap() {
    let env = TestEnv::new("rotation").await;
    let own = own_sidecar(&hs256_platform_yaml()).await;
    let (subject, _, _) = ready_user(&env, "rotating").await;
    let token = platform_token(&subject, env.ns(0));
    let secret = client_secret();
    let id_token = |auth: Authorization| {
        let (base, token, secret) = (own.base.clone(), token.clone(), secret.clone());
        async move {
            let code = auth.code(&base, &token).await;
            let r = redeem(&base, &code, &auth.verifier, &secret).await;
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<Value>().await.unwrap()["id_token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let kid = |t: &str| jsonwebtoken::decode_header(t).unwrap().kid.unwrap();

    let old = id_token(Authorization::new()).await;
    assert_eq!(kid(&old), "first");

    // Rotate: a second key becomes active; the first stays published.
    std::fs::write(own.keys.join("second.pem"), generate_ec_key()).unwrap();
    std::fs::write(own.keys.join("active-kid"), "second").unwrap();
    wait_for("the new key to be published", || async {
        let set = jwks(&own.base).await;
        (set.find("second").is_some()).then_some(())
    })
    .await;
    let new = id_token(Authorization::new()).await;
    assert_eq!(kid(&new), "second");
    verify_id_token(&own.base, &new).await;
    verify_id_token(&own.base, &old).await;

    // Retire the first key: tokens it signed stop verifying.
    std::fs::remove_file(own.keys.join("first.pem")).unwrap();
    wait_for("the old key to be withdrawn", || async {
        jwks(&own.base).await.find("first").is_none().then_some(())
    })
    .await;
    verify_id_token(&own.base, &new).await;

    // A broken update keeps the current keys.
    std::fs::write(own.keys.join("active-kid"), "missing").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(kid(&id_token(Authorization::new()).await), "second");
}

#[tokio::test]
async fn codes_expire() {
    let env = TestEnv::new("code-expiry").await;
    let own = own_sidecar(&hs256_platform_yaml()).await;
    let (subject, _, _) = ready_user(&env, "slow").await;
    let auth = Authorization::new();
    let code = auth
        .code(&own.base, &platform_token(&subject, env.ns(0)))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let r = redeem(&own.base, &code, &auth.verifier, &client_secret()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");
}

/// The platform signs with an ES256 key published in its JWKS.
#[tokio::test]
async fn platform_tokens_verified_through_a_jwks() {
    use jsonwebtoken::jwk::Jwk;
    let env = TestEnv::new("jwks").await;
    let (subject, _, user_id) = ready_user(&env, "jwks-user").await;
    let tenant = env.ns(0).to_string();

    // The platform's keys, served over HTTP by the test.
    let platform_pem = generate_ec_key();
    let platform_key = EncodingKey::from_ec_pem(&platform_pem).unwrap();
    let mut jwk = Jwk::from_encoding_key(&platform_key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("platform-1".into());
    let document = serde_json::to_string(&JwkSet {
        keys: vec![jwk.clone()],
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let document = document.clone();
            async move { ([("content-type", "application/json")], document) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let own = own_sidecar(&format!(
        "  issuer: \"{PLATFORM_ISSUER}\"\n  audience: \"{PLATFORM_AUDIENCE}\"\n  jwksUrl: \"{jwks_url}\"\n  algorithms: [ES256]"
    ))
    .await;

    let sign = |kid: Option<&str>, key: &EncodingKey| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, &platform_claims(&subject, &tenant), key).unwrap()
    };
    let (status, body) =
        credentials(&own.base, Some(&sign(Some("platform-1"), &platform_key))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], user_id);

    let refused = |token: String, what: &'static str| {
        let base = own.base.clone();
        async move {
            let (status, body) = credentials(&base, Some(&token)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
            assert_eq!(body["error"], "invalid_token", "{what}");
        }
    };
    refused(sign(Some("unknown"), &platform_key), "unknown kid").await;
    refused(sign(None, &platform_key), "no kid").await;
    // The right kid, another key.
    let stranger = EncodingKey::from_ec_pem(&generate_ec_key()).unwrap();
    refused(sign(Some("platform-1"), &stranger), "wrong key").await;
    // Algorithm confusion: HS256 keyed with the public key's bytes.
    let public_material = serde_json::to_vec(&jwk).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("platform-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &platform_claims(&subject, &tenant),
        &EncodingKey::from_secret(&public_material),
    )
    .unwrap();
    refused(confused, "HS256 against a JWKS").await;
    // An HS256 token signed with the stack's shared secret is not accepted
    // by a sidecar configured for the JWKS.
    refused(platform_token(&subject, &tenant), "shared secret").await;
}

#[tokio::test]
async fn nothing_secret_reaches_the_log() {
    let env = TestEnv::new("log-secrets").await;
    let own = own_sidecar(&hs256_platform_yaml()).await;
    let (subject, _, _) = ready_user(&env, "quiet").await;
    let platform = platform_token(&subject, env.ns(0));
    let secret = client_secret();

    // Browser round trip with the platform token posted back.
    let auth = Authorization::new();
    let r = https_client()
        .post(format!("{}/authorize", own.base))
        .query(&auth.params)
        .form(&[("platform_token", platform.as_str())])
        .send()
        .await
        .unwrap();
    let code = query(&location(&r))["code"].clone();
    let answer: Value = redeem(&own.base, &code, &auth.verifier, &secret)
        .await
        .json()
        .await
        .unwrap();
    let access = answer["access_token"].as_str().unwrap().to_string();
    let id_token = answer["id_token"].as_str().unwrap().to_string();
    https_client()
        .get(format!("{}/userinfo", own.base))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    redeem(&own.base, &code, &auth.verifier, &secret).await;
    let (_, creds) = credentials(&own.base, Some(&platform)).await;
    let matrix_token = creds["access_token"].as_str().unwrap().to_string();
    let mut expired = platform_claims(&subject, env.ns(0));
    expired["exp"] = json!(now() - 600);
    let expired = platform_token_with(&expired);
    credentials(&own.base, Some(&expired)).await;

    let metrics = reqwest::get(&own.metrics)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The token is minted by Synapse's login-as, or in MAS mode by MAS.
    let minted = if Stack::get().is_mas() {
        "mas_add_personal_session"
    } else {
        "login_as_user"
    };
    for expected in [
        "openmeet_sidecar_requests_total{endpoint=\"/api/v1/credentials\",status=\"2xx\"} 1",
        "openmeet_sidecar_requests_total{endpoint=\"/api/v1/credentials\",status=\"4xx\"} 1",
        "openmeet_sidecar_requests_total{endpoint=\"/token\",status=\"2xx\"} 1",
        "openmeet_sidecar_requests_total{endpoint=\"/token\",status=\"4xx\"} 1",
        "openmeet_sidecar_request_duration_seconds_count{endpoint=\"/authorize\"} 1",
        &format!(
            "openmeet_synapse_requests_total{{endpoint=\"{minted}\",status=\"2xx\",write=\"true\"}} 1"
        ),
        &format!(
            "openmeet_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(metrics.contains(expected), "{expected} missing from:\n{metrics}");
    }

    let log = own.log();
    assert!(log.contains("token: issued"), "the sidecar logs its work");
    assert!(log.contains("credentials: token minted"));
    let mut secrets = vec![
        ("platform token", platform.as_str()),
        ("expired platform token", expired.as_str()),
        ("client secret", secret.as_str()),
        ("authorization code", code.as_str()),
        ("PKCE verifier", auth.verifier.as_str()),
        ("OIDC access token", access.as_str()),
        ("id_token", id_token.as_str()),
        ("Matrix access token", matrix_token.as_str()),
        ("as_token", Stack::get().as_token.as_str()),
    ];
    // In MAS mode, the secret the sidecar holds for MAS too.
    let mas_secret = (stack_sidecar_config().mas).map(|mas| {
        let secret = std::fs::read_to_string(mas.client_secret_file).unwrap();
        secret.trim().to_string()
    });
    if let Some(mas_secret) = &mas_secret {
        secrets.push(("MAS client secret", mas_secret));
    }
    for (what, value) in secrets {
        assert!(!log.contains(value), "the {what} reached the log");
        assert!(!metrics.contains(value), "the {what} reached the metrics");
    }
}

/// Replicas share nothing but their Secrets and the API server: a code
/// issued by one is redeemed by another, once.
#[tokio::test]
async fn replicas_redeem_each_others_codes_once() {
    let env = TestEnv::new("replicas").await;
    let state = format!("stateNamespace: \"{}\"\nidentity: replica", env.ns(0));
    let a = own_sidecar_with(&hs256_platform_yaml(), None, &state).await;
    let b = own_sidecar_with(&hs256_platform_yaml(), Some(&a.keys), &state).await;
    let (subject, _, _) = ready_user(&env, "replicated").await;
    let token = platform_token(&subject, env.ns(0));
    let secret = client_secret();

    let auth = Authorization::new();
    let code = auth.code(&a.base, &token).await;
    let r = redeem(&b.base, &code, &auth.verifier, &secret).await;
    assert_eq!(r.status(), StatusCode::OK, "any replica redeems the code");
    let answer: Value = r.json().await.unwrap();
    let access = answer["access_token"].as_str().unwrap().to_string();
    let userinfo = |base: String| {
        let access = access.clone();
        async move {
            https_client()
                .get(format!("{base}/userinfo"))
                .bearer_auth(access)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(userinfo(a.base.clone()).await, StatusCode::OK);

    // Replayed at the other replica: refused, and the token dies everywhere.
    let r = redeem(&a.base, &code, &auth.verifier, &secret).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_grant");
    assert_eq!(userinfo(a.base.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(userinfo(b.base.clone()).await, StatusCode::UNAUTHORIZED);
}

async fn handle(sidecar: &str, token: Option<&str>, localpart: &str) -> reqwest::Response {
    let mut url = url::Url::parse(sidecar).unwrap();
    url.path_segments_mut()
        .unwrap()
        .pop_if_empty()
        .extend(["api", "v1", "handles", localpart]);
    let mut request = https_client().get(url);
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    request.send().await.unwrap()
}

async fn handle_status(sidecar: &str, token: &str, localpart: &str) -> Value {
    let r = handle(sidecar, Some(token), localpart).await;
    assert_eq!(r.status(), StatusCode::OK, "{localpart}");
    assert_eq!(r.headers()["cache-control"], "no-store");
    r.json().await.unwrap()
}

#[tokio::test]
async fn handle_availability_never_names_the_holder() {
    let env = TestEnv::with(
        "handles",
        Options {
            namespaces: 2,
            ..Default::default()
        },
    )
    .await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    // The holder lives in one tenant; the caller, in another, has no account.
    let (_, held, _) = ready_user(&env, "holder").await;
    let caller = platform_token(&unique("sub"), env.ns(1));

    let free = unique("free");
    assert_eq!(
        handle_status(sidecar, &caller, &free).await,
        json!({"status": "available"})
    );
    // `/` is part of the grammar: sent percent-encoded.
    assert_eq!(
        handle_status(sidecar, &caller, &format!("{free}/x+y=z")).await,
        json!({"status": "available"})
    );
    // Claimed by another tenant's object: taken, and nothing more is said.
    assert_eq!(
        handle_status(sidecar, &caller, &held).await,
        json!({"status": "taken"})
    );
    // Claimed by an object the controller has not converged (or refused).
    let pending = unique("pending");
    env.create_user(
        0,
        "not-yet",
        json!({"localpart": pending, "deactivated": true}),
    )
    .await;
    wait_for("the new claim to be seen", || async {
        (handle_status(sidecar, &caller, &pending).await == json!({"status": "taken"}))
            .then_some(())
    })
    .await;
    // An account in Synapse (or MAS) that no MatrixUser declares.
    let outside = unique("outside");
    let by_hand = crate::users::Foreign {
        displayname: Some("Made by hand"),
        ..Default::default()
    };
    crate::users::foreign_account(&env, &outside, by_hand).await;
    assert_eq!(
        handle_status(sidecar, &caller, &outside).await,
        json!({"status": "taken"})
    );
    // The operator's reserved list, its own accounts included.
    for reserved in ["admin", "root", stack.var("MATRIX_ADMIN_LOCALPART")] {
        assert_eq!(
            handle_status(sidecar, &caller, reserved).await,
            json!({"status": "reserved"}),
            "{reserved}"
        );
    }
    // The schema's grammar, with the rule broken.
    for (bad, rule) in [
        ("Alice", "characters"),
        ("al:ice", "characters"),
        ("_bridge", "leading_underscore"),
        ("20261206", "numeric"),
        (&"a".repeat(201) as &str, "length"),
    ] {
        assert_eq!(
            handle_status(sidecar, &caller, bad).await,
            json!({"status": "invalid", "reason": rule}),
            "{bad}"
        );
    }

    // Only signed-in platform users ask.
    let r = handle(sidecar, None, &free).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "missing_token");
    let r = handle(sidecar, Some("not.a.token"), &free).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_token");

    // Rate-limited per caller (burst 20), with Retry-After.
    let busy = platform_token(&unique("sub"), env.ns(1));
    let mut limited = None;
    for _ in 0..40 {
        let r = handle(sidecar, Some(&busy), &free).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    let limited = limited.expect("the per-caller limit applies");
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(
        limited.json::<Value>().await.unwrap()["error"],
        "rate_limited"
    );
    // Another caller is not affected.
    assert_eq!(
        handle_status(sidecar, &caller, &free).await,
        json!({"status": "available"})
    );
}

/// Locking a `MatrixUser` ends the sessions its account opened through
/// SSO (devices), so they do not come back when the lock is lifted.
#[tokio::test]
async fn locking_ends_sso_sessions() {
    default_mode_only!(
        "Synapse's own SSO (`oidc_providers`) sessions; in MAS mode a lock ends every MAS \
         session (mas_signin::a_matrix_2_client_signs_in_through_mas_and_a_lock_ends_every_session)"
    );
    let env = TestEnv::new("sso-lock").await;
    let stack = Stack::get();
    let synapse = stack.var("SYNAPSE_URL");
    let (subject, _, user_id) = ready_user(&env, "sso-locked").await;
    let login = sso_login(&subject, env.ns(0)).await;
    assert_eq!(login["user_id"], user_id);
    let access = login["access_token"].as_str().unwrap().to_string();
    assert_eq!(whoami(synapse, &access).await.0, StatusCode::OK);

    env.patch_user(0, "sso-locked", json!({"locked": true}))
        .await;
    env.wait_ready(0, "sso-locked", true, "Converged").await;
    assert_eq!(whoami(synapse, &access).await.0, StatusCode::UNAUTHORIZED);
    env.patch_user(0, "sso-locked", json!({"locked": false}))
        .await;
    env.wait_ready(0, "sso-locked", true, "Converged").await;
    let (status, body) = whoami(synapse, &access).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("M_UNKNOWN_TOKEN")),
        "the session opened before the lock stays ended: {body}"
    );
    // A new SSO login works again.
    let again = sso_login(&subject, env.ns(0)).await;
    assert_eq!(
        whoami(synapse, again["access_token"].as_str().unwrap())
            .await
            .0,
        StatusCode::OK
    );
}

/// The wait ticket a wait page sets: sealed, HTTPS only, out of scripts' reach.
fn wait_ticket(r: &reqwest::Response) -> String {
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "/authorize;"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    let (name, rest) = cookie.split_once('=').unwrap();
    assert_eq!(name, "openmeet_wait");
    rest.split(';').next().unwrap().to_string()
}

/// The address a wait page refreshes to (`<meta http-equiv="refresh">`),
/// and after how many seconds.
pub(crate) fn refresh_of(page: &str) -> (u64, url::Url) {
    let start = page
        .find("http-equiv=\"refresh\" content=\"")
        .unwrap_or_else(|| panic!("no refresh in the page: {page}"))
        + "http-equiv=\"refresh\" content=\"".len();
    let content = &page[start..start + page[start..].find('"').unwrap()];
    let (seconds, target) = content.split_once(";url=").expect("seconds;url=...");
    let target = target.replace("&amp;", "&");
    (seconds.parse().unwrap(), url::Url::parse(&target).unwrap())
}

/// A new user signs up: the platform returns the browser before the
/// `MatrixUser` exists; the sidecar holds it on a self-refreshing page and
/// lets it through to Synapse as soon as the account is ready.
#[tokio::test]
async fn a_first_login_waits_for_the_account_being_prepared() {
    default_mode_only!(
        "the wait page in Synapse's own SSO (`oidc_providers`); in MAS mode \
         mas_signin::a_first_login_waits_for_the_account_before_mas_gets_its_callback"
    );
    let env = TestEnv::new("first-login").await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let subject = unique("sub");
    let localpart = unique("newcomer");
    let token = platform_token(&subject, env.ns(0));

    let browser = SsoBrowser::begin().await;
    let r = browser.back_from_platform(&token).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let mut ticket = wait_ticket(&r);
    let page = r.text().await.unwrap();
    assert!(page.contains("being prepared"), "{page}");
    assert!(
        !page.contains("<script"),
        "no script: the page works under a strict CSP"
    );
    assert!(!page.contains(&token), "the token is nowhere in the page");
    let (seconds, mut next) = refresh_of(&page);
    assert!(next.as_str().starts_with(&format!("{sidecar}/authorize?")));
    assert!(!next.query_pairs().any(|(k, _)| k == "platform_token"));
    assert!((1..=5).contains(&seconds));
    // Without its ticket the refresh proves nothing: back to the platform.
    let r = https_client().get(next.as_str()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&r).path(), "/login");
    // The credential API says the same to programs.
    let r = https_client()
        .post(format!("{sidecar}/api/v1/credentials"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "account_pending");

    // The platform writes the MatrixUser only now.
    env.create_user(
        0,
        "newcomer",
        json!({"localpart": localpart, "displayName": "New Comer", "subject": subject}),
    )
    .await;
    let mut redirected = None;
    for _ in 0..30 {
        let r = https_client()
            .get(next.as_str())
            .header("cookie", format!("openmeet_wait={ticket}"))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::SEE_OTHER {
            let cleared = r.headers()["set-cookie"].to_str().unwrap();
            assert!(
                cleared.contains("Max-Age=0"),
                "the ticket is removed: {cleared}"
            );
            redirected = Some(location(&r));
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
        let used = std::mem::replace(&mut ticket, wait_ticket(&r));
        let (seconds, again) = refresh_of(&r.text().await.unwrap());
        next = again;
        // A ticket is good for one look.
        let replay = https_client()
            .get(next.as_str())
            .header("cookie", format!("openmeet_wait={used}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            location(&replay).path(),
            "/login",
            "a used ticket proves nothing"
        );
        tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    }
    let callback = redirected.expect("the wait page continues the flow");
    let login = browser.complete(&callback).await;
    assert_eq!(
        login["user_id"],
        format!("@{localpart}:{}", stack.var("MATRIX_SERVER_NAME"))
    );
    let (status, _) = credentials(sidecar, Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_token_survives_a_profile_change() {
    let env = TestEnv::new("creds-keep").await;
    let stack = Stack::get();
    let sidecar = stack.sidecar().await;
    let (subject, _, user_id) = ready_user(&env, "keeper").await;
    let token = platform_token(&subject, env.ns(0));
    let (status, minted) = credentials(sidecar, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let access = minted["access_token"].as_str().unwrap().to_string();
    // A spec change is converging for a moment: the account is not taken
    // away, so the token handed out must not be logged out.
    env.patch_user(0, "keeper", json!({"displayName": "Keeper Renamed"}))
        .await;
    env.wait_ready(0, "keeper", true, "Converged").await;
    // Longer than the sidecar's revocation sweep (1 s).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (status, me) = whoami(stack.var("SYNAPSE_URL"), &access).await;
    assert_eq!(status, StatusCode::OK, "the token still works: {me}");
    assert_eq!(me["user_id"], user_id);
}
