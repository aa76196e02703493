//! A first login right after sign-up: the platform sends the browser back
//! before the user's `MatrixUser` is written, or while the controller is
//! still creating the account. Instead of refusing, `/authorize` answers
//! with a small page that refreshes itself (`<meta http-equiv="refresh">`
//! back to the same authorization request: no script, so it works under a
//! strict Content-Security-Policy) until the account is usable or the
//! configured wait is over; then the usual answer (a code, or the page
//! saying why not). The refresh address carries no token: who is waiting
//! travels in a sealed, single-use cookie (see `oidc`). The credential API answers `202 account_pending` with
//! `Retry-After` in the same case.

use super::directory::LookupError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a browser waits, and how often it looks again.
#[derive(Clone, Copy, Debug)]
pub struct PendingSettings {
    /// Longest wait from the first pending answer (0: never wait).
    pub wait: Duration,
    /// Seconds between two looks.
    pub refresh: Duration,
}

impl Default for PendingSettings {
    fn default() -> Self {
        PendingSettings {
            wait: Duration::from_secs(30),
            refresh: Duration::from_secs(2),
        }
    }
}

/// The query parameter carrying when the wait began (seconds since the
/// epoch). Not signed: a reload starts the wait over anyway, so the bound
/// spares the user an endless page, not the server a request.
pub const WAIT_STARTED: &str = "wait_started";

/// Seconds a program is told to wait before asking the credential API again.
pub const RETRY_AFTER_SECONDS: u64 = 2;

/// Whether the account may become usable by itself soon: the object is not
/// declared yet (the platform may be writing it), or it is declared and
/// still converging (never reconciled, a newer generation not reconciled
/// yet, or a transient failure on the way). Refusals (conflicts, a
/// reserved localpart, a refused change, locked, deactivated, deleted, an
/// unknown tenant) wait for a change of spec: they are not pending.
pub fn is_pending(e: &LookupError) -> bool {
    match e {
        LookupError::UserNotFound => true,
        LookupError::NotReady(reason) => matches!(
            reason.as_str(),
            "NotReconciled" | "Reconciling" | "NoUserId" | "SynapseUnavailable" | "KubernetesError"
        ),
        _ => false,
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// When the wait began, if the browser should keep waiting: the carried
/// start when it is a past time within the wait, now when absent or not a
/// plausible time; `None` once the wait is over.
pub fn keep_waiting(settings: &PendingSettings, carried: Option<&str>, now: u64) -> Option<u64> {
    let wait = settings.wait.as_secs();
    if wait == 0 {
        return None;
    }
    let started = carried
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s <= now)
        .unwrap_or(now);
    (now - started < wait).then_some(started)
}

/// The wait page: refreshes itself to `again` (the same authorization
/// request, with [`WAIT_STARTED`]) after `settings.refresh`.
pub fn page(settings: &PendingSettings, again: &url::Url) -> Response {
    let seconds = settings.refresh.as_secs().max(1);
    let target = escape(again.as_str());
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{seconds};url={target}\">\
         <title>Your chat account is being prepared</title></head>\
         <body style=\"font-family:sans-serif;max-width:36em;margin:4em auto\">\
         <h1>Your chat account is being prepared</h1>\
         <p>This takes a few seconds. This page checks again by itself and signs you in as soon as \
         your account is ready.</p>\
         <p><a href=\"{target}\">Check now</a></p></body></html>"
    );
    let mut response = (StatusCode::OK, Html(body)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Starts or continues the wait for an account that `e` says is pending,
/// from the authorization request `request` (its query, without the
/// platform token) at `authorize`: the page, and when the wait began.
/// `None` when the browser should get the usual answer instead.
pub fn hold(
    settings: &PendingSettings,
    e: &LookupError,
    authorize: &str,
    request: &str,
    carried: Option<&str>,
) -> Option<(Response, u64)> {
    if !(is_pending(e) || *e == LookupError::Loading) {
        return None;
    }
    let started = keep_waiting(settings, carried, now())?;
    let mut again = url::Url::parse(authorize).ok()?;
    again.set_query(Some(request));
    again
        .query_pairs_mut()
        .append_pair(WAIT_STARTED, &started.to_string());
    Some((page(settings, &again), started))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_accounts_on_their_way_are_pending() {
        assert!(is_pending(&LookupError::UserNotFound));
        for reason in [
            "NotReconciled",
            "Reconciling",
            "NoUserId",
            "SynapseUnavailable",
        ] {
            assert!(
                is_pending(&LookupError::NotReady(reason.into())),
                "{reason}"
            );
        }
        for reason in [
            "LocalpartConflict",
            "ReservedLocalpart",
            "AccountExists",
            "SubjectConflict",
            "SynapseRejected",
        ] {
            assert!(
                !is_pending(&LookupError::NotReady(reason.into())),
                "{reason}"
            );
        }
        for refused in [
            LookupError::Locked,
            LookupError::Deactivated,
            LookupError::Deleted,
            LookupError::UnknownTenant("t".into()),
        ] {
            assert!(!is_pending(&refused), "{refused:?}");
        }
    }

    #[test]
    fn the_wait_is_bounded() {
        let s = PendingSettings::default();
        assert_eq!(keep_waiting(&s, None, 1000), Some(1000));
        assert_eq!(keep_waiting(&s, Some("990"), 1000), Some(990));
        assert_eq!(keep_waiting(&s, Some("970"), 1000), None, "30 s are over");
        // Implausible starts begin the wait anew, as a reload would.
        assert_eq!(keep_waiting(&s, Some("2000"), 1000), Some(1000));
        assert_eq!(keep_waiting(&s, Some("soon"), 1000), Some(1000));
        let off = PendingSettings {
            wait: Duration::ZERO,
            ..s
        };
        assert_eq!(keep_waiting(&off, None, 1000), None);
    }

    #[tokio::test]
    async fn the_page_refreshes_itself_without_script() {
        let (response, started) = hold(
            &PendingSettings::default(),
            &LookupError::UserNotFound,
            "https://auth.example/authorize",
            "client_id=synapse&state=a%26b",
            None,
        )
        .expect("held");
        assert!(started.abs_diff(now()) < 5);
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let page = String::from_utf8(body.to_vec()).unwrap();
        assert!(!page.contains("<script"));
        assert!(page.contains(
            "http-equiv=\"refresh\" content=\"2;url=https://auth.example/authorize?client_id=synapse&amp;state=a%26b&amp;wait_started="
        ), "{page}");
        assert!(hold(
            &PendingSettings::default(),
            &LookupError::Locked,
            "https://auth.example/authorize",
            "",
            None
        )
        .is_none());
    }
}
