//! Stand-ins between an operator and the shared Synapse, so one test can
//! play faults without disturbing the others: a TCP forwarder that can be
//! brought up late ("Synapse is down, then back"), and an HTTP proxy that
//! can fail user calls, slow every call down and log the writes it passes.

use crate::harness::Stack;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// A loopback port with nothing listening on it (yet).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Forwards connections on `port` to `target` until the task is aborted.
pub async fn forward(port: u16, target: String) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind proxy port");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                continue;
            };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// An HTTP proxy in front of the shared Synapse.
pub struct HttpProxy {
    pub url: String,
    state: ProxyState,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    target: String,
    http: reqwest::Client,
    /// Answer `503` to every user admin call, as Synapse does under load or
    /// while restarting, while room calls go through.
    failing_users: Arc<AtomicBool>,
    /// Answer `503` to every call: Synapse down (or restarting).
    failing_all: Arc<AtomicBool>,
    /// Added to every call before it is forwarded.
    delay_ms: Arc<AtomicU64>,
    /// When each write (any method but GET) arrived.
    writes: Arc<Mutex<Vec<Instant>>>,
}

async fn forward_http(State(s): State<ProxyState>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if request.method() != axum::http::Method::GET {
        s.writes.lock().unwrap().push(Instant::now());
    }
    let failing_users =
        s.failing_users.load(Ordering::SeqCst) && path.starts_with("/_synapse/admin/v2/users/");
    if failing_users || s.failing_all.load(Ordering::SeqCst) {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"errcode": "M_UNKNOWN", "error": "overloaded"})),
        )
            .into_response();
    }
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let mut outbound = s
        .http
        .request(parts.method, format!("{}{path}", s.target))
        .body(body.to_vec());
    for (name, value) in &parts.headers {
        if name != "host" {
            outbound = outbound.header(name, value);
        }
    }
    match outbound.send().await {
        Ok(answer) => {
            let status = answer.status();
            let content_type = answer.headers().get("content-type").cloned();
            let bytes = answer.bytes().await.unwrap_or_default();
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            if let Some(ct) = content_type {
                response.headers_mut().insert("content-type", ct);
            }
            response
        }
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}

impl HttpProxy {
    pub async fn start() -> HttpProxy {
        let state = ProxyState {
            target: Stack::get().var("SYNAPSE_URL").trim_end_matches('/').into(),
            http: reqwest::Client::new(),
            failing_users: Arc::default(),
            failing_all: Arc::default(),
            delay_ms: Arc::default(),
            writes: Arc::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(forward_http)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HttpProxy { url, state, task }
    }

    pub fn fail_users(&self, on: bool) {
        self.state.failing_users.store(on, Ordering::SeqCst);
    }

    pub fn fail_all(&self, on: bool) {
        self.state.failing_all.store(on, Ordering::SeqCst);
    }

    pub fn delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// When each write that reached the proxy arrived.
    pub fn writes(&self) -> Vec<Instant> {
        self.state.writes.lock().unwrap().clone()
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
