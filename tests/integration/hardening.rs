//! The sidecar faces the internet: what it logs, what its codes reveal, how
//! much it reads, which headers its answers carry, and how it behaves when
//! the platform's keys are out of reach.

use crate::harness::{free_port, https_client, unique, Stack, TestEnv};
use crate::sidecar::{
    callback, client_secret, credentials, generate_ec_key, hs256_platform_yaml, location,
    own_sidecar, platform_claims, platform_token, platform_token_with, query, ready_user, redeem,
    Authorization, PLATFORM_AUDIENCE, PLATFORM_ISSUER,
};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use openmeet_matrix_operator::api::MatrixUser;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// An unauthenticated request whose client id carries a line break must not
/// write a line of its own into the log; nor may a tenant claim.
#[tokio::test]
async fn untrusted_values_never_forge_log_lines() {
    let env = TestEnv::new("log-forge").await;
    let own = own_sidecar(&hs256_platform_yaml()).await;
    let marker = unique("FORGED");
    let forged = format!(
        "{marker} 2030-01-01T00:00:00.000000Z  INFO openmeet_matrix_operator::sidecar::oidc: token: issued user=@root:evil"
    );

    // 1. Client id in HTTP Basic, form-encoded: %0A is a line feed.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "intruder%0A{}%0D%0A{}:secret",
        url::form_urlencoded::byte_serialize(forged.as_bytes()).collect::<String>(),
        url::form_urlencoded::byte_serialize(forged.as_bytes()).collect::<String>()
    ));
    let r = https_client()
        .post(format!("{}/token", own.base))
        .header("authorization", format!("Basic {basic}"))
        .form(&[("grant_type", "authorization_code"), ("code", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The same through client_secret_post.
    let r = https_client()
        .post(format!("{}/token", own.base))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", &format!("intruder\n{forged}")),
            ("client_secret", "secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // 2. A tenant claim with a line break (a validly signed token naming no
    //    tenant the sidecar knows).
    let (subject, _, _) = ready_user(&env, "forger").await;
    let token = platform_token(&subject, &format!("nowhere\n{forged}"));
    let r = Authorization::new().send(&own.base, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // And a refused token whose claims say anything at all.
    let mut claims = platform_claims(&subject, env.ns(0));
    claims["iss"] = json!(format!("https://evil.test\n{forged}"));
    let r = Authorization::new()
        .send(&own.base, Some(&platform_token_with(&claims)))
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The log saw the requests, and no line starts with the injected text.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = own.log();
    assert!(
        log.contains("token: client authentication failed"),
        "the refusal is logged:\n{log}"
    );
    assert!(log.contains("authorize: no usable account"), "{log}");
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with(&marker),
            "a forged line reached the log: {line:?}"
        );
    }
}

/// Every way a decoder might read a code or token: each dot-separated part,
/// base64url or standard, padded or not; and the text itself.
fn readings(sealed: &str) -> Vec<String> {
    let mut out = vec![sealed.to_string()];
    for part in sealed.split('.') {
        for engine in [
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            let trimmed = part.trim_end_matches('=');
            // Any alignment: a value may start at any of the first 4 characters.
            for skip in 0..4.min(trimmed.len()) {
                let body = &trimmed[skip..];
                let body = &body[..body.len() - body.len() % 4];
                if let Ok(bytes) = engine.decode(body) {
                    out.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn codes_and_tokens_reveal_nothing_about_the_user() {
    let env = TestEnv::new("opaque").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, localpart, user_id) = ready_user(&env, "opaque").await;
    let user: MatrixUser = env.users(0).get("opaque").await.unwrap();
    let uid = user.metadata.uid.clone().unwrap();
    let token = platform_token(&subject, env.ns(0));

    let auth = Authorization::new();
    let code = auth.code(sidecar, &token).await;
    let r = redeem(sidecar, &code, &auth.verifier, &client_secret()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    let access = answer["access_token"].as_str().unwrap().to_string();
    // Still a working token.
    let r = https_client()
        .get(format!("{sidecar}/userinfo"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let secrets = [
        ("namespace / tenant", env.ns(0).to_string()),
        ("uid", uid),
        ("email", format!("{localpart}@example.test")),
        ("display name", "opaque Example".to_string()),
        ("subject", subject.clone()),
        ("localpart", localpart.clone()),
        ("user id", user_id.clone()),
        ("object name", "\"opaque\"".to_string()),
        ("redirect URI", callback()),
    ];
    for (what, sealed) in [("code", &code), ("access token", &access)] {
        for reading in readings(sealed) {
            for (field, value) in &secrets {
                assert!(
                    !reading.contains(value.as_str()),
                    "the {what} reveals the {field}: {reading}"
                );
            }
        }
    }
}

/// A valid platform token of about `bytes` bytes (a padding claim).
fn platform_token_of(subject: &str, tenant: &str, bytes: usize) -> String {
    let mut claims = platform_claims(subject, tenant);
    let base = platform_token_with(&claims).len();
    // base64url: 4 characters per 3 bytes of claims.
    let pad = (bytes.saturating_sub(base + 12)) * 3 / 4;
    claims["pad"] = json!("a".repeat(pad));
    platform_token_with(&claims)
}

const CAP: usize = 16 * 1024;

/// The client of the stack's CA, speaking HTTP/1.1 only (the default one
/// negotiates HTTP/2).
fn http1_client() -> reqwest::Client {
    let pem = std::fs::read(Stack::get().var("STACK_CA")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A request carrying a platform token one way.
type Carrier<'a> = dyn Fn(&str) -> reqwest::RequestBuilder + 'a;

#[tokio::test]
async fn platform_tokens_are_capped_on_every_carrier() {
    let env = TestEnv::new("token-cap").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, _, _) = ready_user(&env, "capped").await;
    let fits = platform_token_of(&subject, env.ns(0), CAP - 1024);
    let big = platform_token_of(&subject, env.ns(0), CAP + 1024);
    assert!(
        fits.len() < CAP && big.len() > CAP,
        "{} {}",
        fits.len(),
        big.len()
    );

    for (protocol, http) in [("HTTP/2", https_client()), ("HTTP/1.1", http1_client())] {
        // The credential API (Bearer header): a JSON refusal.
        let r = http
            .post(format!("{sidecar}/api/v1/credentials"))
            .bearer_auth(&big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{protocol}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "token_too_large", "{protocol}");
        let r = http
            .post(format!("{sidecar}/api/v1/credentials"))
            .bearer_auth(&fits)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{protocol} below the cap");

        // A token in the address is refused unread, whatever its size:
        // browsers, proxies and logs keep addresses.
        for t in [&big, &fits] {
            let auth = Authorization::new().set("platform_token", Some(t));
            for r in [
                http.get(format!("{sidecar}/authorize"))
                    .query(&auth.params)
                    .send()
                    .await
                    .unwrap(),
                http.post(format!("{sidecar}/authorize"))
                    .query(&[("platform_token", t.as_str())])
                    .form(&Authorization::new().params)
                    .send()
                    .await
                    .unwrap(),
            ] {
                assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{protocol}");
                assert!(r.text().await.unwrap().contains("address"), "{protocol}");
            }
        }

        // The browser routes: a page, whichever carrier.
        let form_carrier = |t: &str| {
            let auth = Authorization::new().set("platform_token", Some(t));
            http.post(format!("{sidecar}/authorize")).form(&auth.params)
        };
        let bearer_carrier = |t: &str| {
            let auth = Authorization::new();
            http.get(format!("{sidecar}/authorize"))
                .query(&auth.params)
                .bearer_auth(t)
        };
        // The platform posts the token to the return address (whose query
        // holds the authorization request).
        let return_carrier = |t: &str| {
            let auth = Authorization::new();
            http.post(format!("{sidecar}/authorize"))
                .query(&auth.params)
                .form(&[("platform_token", t)])
        };
        let carriers: [(&str, &Carrier); 3] = [
            ("return", &return_carrier),
            ("form", &form_carrier),
            ("bearer", &bearer_carrier),
        ];
        for (carrier, request) in carriers {
            let r = request(&big).send().await.unwrap();
            let status = r.status();
            let kind = r.headers()["content-type"].to_str().unwrap().to_string();
            let text = r.text().await.unwrap();
            assert_eq!(
                status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{protocol} {carrier}: {text}"
            );
            assert!(
                kind.starts_with("text/html"),
                "{protocol} {carrier}: {kind}"
            );
            assert!(text.contains("too large"), "{protocol} {carrier}: {text}");
            let r = request(&fits).send().await.unwrap();
            assert_eq!(
                r.status(),
                StatusCode::SEE_OTHER,
                "{protocol} {carrier} below the cap"
            );
            assert!(
                query(&location(&r)).contains_key("code"),
                "{protocol} {carrier}"
            );
        }
        // A form far over any token's size is refused with a page too.
        let auth = Authorization::new().set("platform_token", Some(&"a".repeat(200 * 1024)));
        let r = http
            .post(format!("{sidecar}/authorize"))
            .form(&auth.params)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{protocol}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
    }
}

/// A body over the limit is answered 413 whatever its size up to the
/// drain bound, on both protocols: never a reset connection while the
/// client is still sending.
#[tokio::test]
async fn oversized_bodies_always_get_413() {
    let sidecar = Stack::get().sidecar().await;
    for (protocol, http) in [("HTTP/2", https_client()), ("HTTP/1.1", http1_client())] {
        for size in [200 * 1024, 1024 * 1024, 4 * 1024 * 1024] {
            for path in ["/authorize", "/token"] {
                for round in 0..3 {
                    let body = format!("client_id=synapse&platform_token={}", "a".repeat(size));
                    let r = http
                        .post(format!("{sidecar}{path}"))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(body)
                        .send()
                        .await
                        .unwrap_or_else(|e| {
                            panic!("{protocol} {path} {size} bytes, round {round}: {e:?}")
                        });
                    assert_eq!(
                        r.status(),
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "{protocol} {path} {size} bytes"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn answers_carry_security_headers() {
    let sidecar = Stack::get().sidecar().await;
    let http = https_client();
    let hsts = |r: &reqwest::Response| {
        let v = r.headers()["strict-transport-security"].to_str().unwrap();
        assert!(v.contains("max-age="), "{v}");
    };

    // HTML: an error page (unknown client).
    let r = Authorization::new()
        .set("client_id", Some("intruder"))
        .send(sidecar, None)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    hsts(&r);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    // A form's answer may redirect to the client (Synapse's callback).
    let synapse = url::Url::parse(&callback()).unwrap();
    assert!(
        csp.contains(&synapse.origin().ascii_serialization()),
        "{csp}"
    );
    // The page's inline style is all it needs: no script is allowed.
    assert!(!csp.contains("script-src"), "{csp}");

    // JSON: discovery, a refusal of the credential API, a token error.
    for r in [
        http.get(format!("{sidecar}/.well-known/openid-configuration"))
            .send()
            .await
            .unwrap(),
        http.post(format!("{sidecar}/api/v1/credentials"))
            .send()
            .await
            .unwrap(),
        http.post(format!("{sidecar}/token"))
            .form(&[("grant_type", "x")])
            .send()
            .await
            .unwrap(),
    ] {
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(
            r.headers()["x-content-type-options"],
            "nosniff",
            "{}",
            r.url()
        );
        hsts(&r);
    }
}

#[tokio::test]
async fn prompt_none_without_a_session_answers_login_required() {
    let env = TestEnv::new("prompt-none").await;
    let sidecar = Stack::get().sidecar().await;
    let (subject, _, _) = ready_user(&env, "silent").await;

    let r = Authorization::new()
        .set("prompt", Some("none"))
        .send(sidecar, None)
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = location(&r);
    assert!(to.as_str().starts_with(&callback()), "{to}");
    let q = query(&to);
    assert_eq!(q["error"], "login_required");
    assert_eq!(q["state"], "state-123");
    assert!(!q.contains_key("code"));

    // An expired platform session is no session either.
    let mut claims = platform_claims(&subject, env.ns(0));
    claims["exp"] = json!(jsonwebtoken::get_current_timestamp() - 600);
    let r = Authorization::new()
        .set("prompt", Some("none"))
        .send(sidecar, Some(&platform_token_with(&claims)))
        .await;
    assert_eq!(query(&location(&r))["error"], "login_required");

    // With a session, prompt=none signs in silently.
    let r = Authorization::new()
        .set("prompt", Some("none"))
        .send(sidecar, Some(&platform_token(&subject, env.ns(0))))
        .await;
    assert!(query(&location(&r)).contains_key("code"));

    // An unregistered redirect URI is never redirected to, prompt or not.
    let r = Authorization::new()
        .set("prompt", Some("none"))
        .set("redirect_uri", Some("https://evil.test/cb"))
        .send(sidecar, None)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("location").is_none());
}

/// Accepts connections and never answers: the platform's JWKS, hung.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

/// The sidecar's fetch timeout for the platform's JWKS.
const FETCH_TIMEOUT: Duration = openmeet_matrix_operator::sidecar::platform::FETCH_TIMEOUT;

#[tokio::test]
async fn an_unreachable_platform_jwks_fails_fast_and_in_parallel() {
    let (jwks_url, hole) = black_hole().await;
    let own = own_sidecar(&format!(
        "  issuer: \"{PLATFORM_ISSUER}\"\n  audience: \"{PLATFORM_AUDIENCE}\"\n  jwksUrl: \"{jwks_url}\"\n  algorithms: [ES256]"
    ))
    .await;
    let key = EncodingKey::from_ec_pem(&generate_ec_key()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("platform-1".into());
    let token =
        jsonwebtoken::encode(&header, &platform_claims("someone", "some-tenant"), &key).unwrap();

    // Ten browsers at once: they share one fetch, not ten in a row.
    let started = Instant::now();
    let answers = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all((0..10).map(|_| {
            let (base, token) = (own.base.clone(), token.clone());
            async move {
                let r = https_client()
                    .post(format!("{base}/api/v1/credentials"))
                    .bearer_auth(token)
                    .timeout(Duration::from_secs(50))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let status = r.status();
                        (Some(status), r.json::<Value>().await.unwrap_or(Value::Null))
                    }
                    Err(e) => (None, json!(e.to_string())),
                }
            }
        })),
    )
    .await
    .expect("every request answers");
    let elapsed = started.elapsed();
    for (status, body) in &answers {
        assert_eq!(*status, Some(StatusCode::SERVICE_UNAVAILABLE), "{body}");
        assert_eq!(body["error"], "platform_keys_unavailable");
    }
    assert!(
        elapsed < FETCH_TIMEOUT * 2,
        "10 concurrent requests took {elapsed:?}: they waited for each other"
    );

    // Right after a failed fetch, requests fail fast instead of waiting.
    let started = Instant::now();
    let (status, body) = credentials(&own.base, Some(&token)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "platform_keys_unavailable");
    assert!(
        started.elapsed() < FETCH_TIMEOUT / 2,
        "a request in the negative-cache window took {:?}",
        started.elapsed()
    );
    hole.abort();
}

/// The dev stand-in for the platform's login page sends browsers back only
/// to the sidecar's own authorize URL.
#[tokio::test]
async fn dev_login_returns_only_to_the_sidecars_authorize_url() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(unique("dev-platform"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("platform_secret");
    std::fs::write(&secret, "a-dev-platform-secret-of-at-least-32-bytes").unwrap();
    let port = free_port();
    let issuer = "https://127.0.0.1:8443";
    let _platform = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/stack/dev-platform.py"
        ))
        .arg(port.to_string())
        .env(
            "OPERATOR_BIN",
            env!("CARGO_BIN_EXE_openmeet-matrix-operator"),
        )
        .env("SIDECAR_URL", issuer)
        .env("KUBECTL", "/nonexistent/kubectl")
        .env("PLATFORM_SECRET_FILE", &secret)
        .env("PLATFORM_ISSUER", PLATFORM_ISSUER)
        .env("PLATFORM_AUDIENCE", PLATFORM_AUDIENCE)
        .kill_on_drop(true)
        .spawn()
        .expect("python3 tests/stack/dev-platform.py");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = format!("http://127.0.0.1:{port}/login");
    crate::harness::wait_for("the dev login page", || async {
        http.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let pick = |return_to: Option<&str>| {
        let mut q = vec![("subject", "sub-1"), ("tenant", "demo")];
        if let Some(r) = return_to {
            q.push(("return_to", r));
        }
        http.get(&login).query(&q).send()
    };

    let good = format!("{issuer}/authorize?client_id=synapse&state=s");
    let r = pick(Some(&good)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("location").is_none(), "never in an address");
    let page = r.text().await.unwrap();
    // A form posted to the return address, the token in its body.
    let action = good.replace('&', "&amp;");
    assert!(
        page.contains(&format!("<form method=\"post\" action=\"{action}\">")),
        "{page}"
    );
    assert!(
        page.contains("name=\"platform_token\" value=\"ey"),
        "{page}"
    );

    for bad in [
        None,
        Some("https://evil.test/authorize?client_id=synapse"),
        Some("https://127.0.0.1:8443.evil.test/authorize"),
        Some("https://127.0.0.1:8444/authorize"),
        Some("http://127.0.0.1:8443/authorize"),
        Some("https://127.0.0.1:8443/token"),
        Some("https://127.0.0.1:8443/authorize/../token"),
        Some("https://127.0.0.1:8443/authorizex"),
        Some("https://user@127.0.0.1:8443/authorize"),
        Some("//evil.test/authorize"),
        Some("/authorize"),
        Some("javascript:alert(1)//127.0.0.1:8443/authorize"),
        Some("https://127.0.0.1:8443/authorize#fragment"),
        // Line breaks, which Python's URL parser would silently drop.
        Some("https://127.0.0.1:8443/authorize?x=1\r\nSet-Cookie: a=b"),
        Some("https://127.0.0.1:84\n43/authorize"),
    ] {
        let r = pick(bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(r.headers().get("location").is_none(), "{bad:?}");
    }
    // The sign-in page itself refuses to offer a foreign return address.
    let r = http
        .get(&login)
        .query(&[("return_to", "https://evil.test/authorize")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let _ = std::fs::remove_dir_all(dir);
}
