//! The sidecar: HTTP endpoints platform users meet. For now it serves health;
//! the OIDC provider and credential API build on it.

use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;

pub fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
}

/// Serves until `shutdown` resolves.
pub async fn serve_health(
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "sidecar listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}
