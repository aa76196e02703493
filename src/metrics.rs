//! Prometheus text exposition of the operator's own counters, and health.

use crate::controller::ReconcileStats;
use crate::synapse::{RequestKind, RequestStats};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::fmt::Write;
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
}

/// What `/readyz` means: Synapse answers, and — on the replica that
/// reconciles — the controllers' caches are complete. A standby replica is
/// ready once Synapse answers: it serves the application-service endpoint.
pub struct Readiness {
    pub leading: std::sync::atomic::AtomicBool,
    pub synced: Arc<std::sync::atomic::AtomicBool>,
    pub synapse: crate::synapse::SynapseClient,
    last_probe: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
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

    /// `Err(reason)` when not ready. Synapse is probed at most every 5 s.
    pub async fn check(&self) -> Result<(), &'static str> {
        if self.leading.load(Ordering::Acquire) && !self.synced.load(Ordering::Acquire) {
            return Err("caches are syncing");
        }
        let cached = *self.last_probe.lock().expect("probe lock");
        let reachable = match cached {
            Some((at, ok)) if at.elapsed() < std::time::Duration::from_secs(5) => ok,
            _ => {
                let ok = self.synapse.reachable().await;
                *self.last_probe.lock().expect("probe lock") =
                    Some((std::time::Instant::now(), ok));
                ok
            }
        };
        if reachable {
            Ok(())
        } else {
            Err("Synapse is unreachable")
        }
    }
}

async fn readyz(State(sources): State<Sources>) -> axum::response::Response {
    let verdict = match &sources.readiness {
        Some(r) => r.check().await,
        None => Ok(()),
    };
    match verdict {
        Ok(()) => "ok".into_response(),
        Err(reason) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

/// Renders every counter; label values are bounded (request kinds, object kinds).
pub fn render(sources: &Sources) -> String {
    let mut out = String::new();
    out.push_str("# HELP openmeet_synapse_requests_total Requests sent to Synapse, by kind.\n");
    out.push_str("# TYPE openmeet_synapse_requests_total counter\n");
    for (kind, count) in sources.synapse.by_kind() {
        let write = if RequestKind::is_write(kind) {
            "true"
        } else {
            "false"
        };
        let _ = writeln!(
            out,
            "openmeet_synapse_requests_total{{kind=\"{}\",write=\"{write}\"}} {count}",
            kind.as_str()
        );
    }
    out.push_str("# HELP openmeet_synapse_request_failures_total Synapse requests that failed or were refused.\n");
    out.push_str("# TYPE openmeet_synapse_request_failures_total counter\n");
    let _ = writeln!(
        out,
        "openmeet_synapse_request_failures_total {}",
        sources.synapse.failures()
    );
    out.push_str("# HELP openmeet_reconciles_total Reconciles run, by kind.\n");
    out.push_str("# TYPE openmeet_reconciles_total counter\n");
    let r = &sources.reconciles;
    for (kind, count) in [
        ("MatrixUser", r.user_reconciles.load(Ordering::Relaxed)),
        ("MatrixRoom", r.room_reconciles.load(Ordering::Relaxed)),
        (
            "RoomPermission",
            r.permission_reconciles.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(out, "openmeet_reconciles_total{{kind=\"{kind}\"}} {count}");
    }
    out.push_str("# HELP openmeet_reconcile_failures_total Reconciles that failed, by kind.\n");
    out.push_str("# TYPE openmeet_reconcile_failures_total counter\n");
    for (kind, count) in [
        ("MatrixUser", r.user_failures.load(Ordering::Relaxed)),
        ("MatrixRoom", r.room_failures.load(Ordering::Relaxed)),
    ] {
        let _ = writeln!(
            out,
            "openmeet_reconcile_failures_total{{kind=\"{kind}\"}} {count}"
        );
    }
    out
}

async fn metrics(State(sources): State<Sources>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
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
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, router(sources))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_bounded_labels() {
        let sources = Sources {
            synapse: Arc::default(),
            reconciles: Arc::default(),
            readiness: None,
        };
        sources
            .reconciles
            .user_reconciles
            .fetch_add(3, Ordering::Relaxed);
        let text = render(&sources);
        assert!(
            text.contains("openmeet_reconciles_total{kind=\"MatrixUser\"} 3"),
            "{text}"
        );
        assert!(text.contains("# TYPE openmeet_synapse_requests_total counter"));
    }
}
