//! The control plane listener: the admin REST API under `/api/v1`, and
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! It shares the process with the proxy: every change it makes invalidates
//! the affected keys in the proxy's cache before the response is sent.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

pub mod bootstrap;

use crate::auth::Authenticator;
use crate::key::TokenFormat;
use crate::store::KeyStore;
use crate::telemetry::metrics::Metrics;

/// What every admin handler can reach.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn KeyStore>,
    /// The proxy's authenticator, to invalidate its cache on changes.
    pub authenticator: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    /// Issues tokens for create and rotate.
    pub tokens: TokenFormat,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the admin listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(error) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "admin listener failed");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(error) => {
            tracing::warn!(%error, "not ready: key store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: key store unreachable\n",
            )
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state
        .metrics
        .cache_entries
        .set(i64::try_from(state.authenticator.cached_keys()).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
