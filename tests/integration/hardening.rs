//! The sidecar faces the internet: what it logs, what its codes reveal, how
//! much it reads, which headers its answers carry, and how it behaves when
//! the platform's keys are out of reach.

use crate::harness::{https_client, unique, TestEnv};
use crate::sidecar::{
    hs256_platform_yaml, own_sidecar, platform_claims, platform_token, platform_token_with,
    ready_user, Authorization,
};
use base64::Engine;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

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
