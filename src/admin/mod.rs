//! The control plane listener: the admin REST API under `/api/v1`, and
//! `/metrics`, `/healthz` and `/readyz`. At shutdown it keeps answering
//! while the proxy drains (`/readyz` then says `not ready: draining`), and
//! stops after.
//!
//! It shares the process with the proxy: every change it makes invalidates
//! the affected keys in the proxy's cache before the response is sent.
//!
//! - [`access`]: who is calling (the same API keys as the proxy) and RBAC.
//! - [`users`], [`service_accounts`] (over [`principals`]), [`namespaces`],
//!   [`api_keys`], [`settings`], [`audit`]: one module per resource.
//! - [`resource`]: the shared Cloud Ops shape (times, versions, pages, access).
//! - [`extract`]: JSON bodies and query strings with typed rejections.
//! - [`error`]: the one place an error becomes a response.
//! - [`openapi`]: the document served at `/api/v1/openapi.json`.
//! - [`bootstrap`]: the first admin, and keys issued straight into the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use tokio::net::TcpListener;

pub mod access;
pub mod api_keys;
pub mod audit;
pub mod bootstrap;
pub mod error;
pub mod extract;
pub mod namespaces;
pub mod openapi;
pub mod principals;
pub mod resource;
pub mod service_accounts;
pub mod settings;
pub mod users;

use crate::auth::{Authenticator, CredentialExtractor, STORE_READ_TIMEOUT};
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
    /// Finds the caller's API key, configured exactly as the proxy's.
    pub credentials: CredentialExtractor,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// True once shutdown has begun and the proxy is draining: `/readyz`
    /// says not ready, so that load balancers stop sending, while
    /// `/healthz`, `/metrics` and the API keep answering until the proxy
    /// has drained (a failing liveness probe would get the process killed
    /// mid-drain).
    pub draining: tokio::sync::watch::Receiver<bool>,
}

pub fn router(state: AdminState) -> Router {
    let api = api_routes()
        .into_iter()
        .fold(Router::new(), |r, (path, methods)| r.route(path, methods))
        .route("/api/v1/openapi.json", get(openapi_json))
        // Past the limit a body is refused with 413 before it is read whole.
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(within_request_timeout));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        // After every route: it is set on the routes registered before it.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every `/api/v1` resource route (all but the OpenAPI document), as the
/// router mounts them; the OpenAPI test compares them with the document.
pub fn api_routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    let mut routes = users::routes();
    routes.extend(service_accounts::routes());
    routes.extend(namespaces::routes());
    routes.extend(api_keys::routes());
    routes.extend(settings::routes());
    routes.extend(audit::routes());
    routes
}

/// The paths of [`api_routes`], plus the OpenAPI document's own.
pub fn api_paths() -> Vec<&'static str> {
    let mut paths: Vec<&'static str> = api_routes().into_iter().map(|(p, _)| p).collect();
    paths.push("/api/v1/openapi.json");
    paths
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn not_found() -> error::AdminError {
    error::AdminError::NotFound("no such endpoint; see /api/v1/openapi.json".into())
}

async fn method_not_allowed(method: axum::http::Method) -> error::AdminError {
    error::AdminError::MethodNotAllowed(method)
}

/// Longest an admin API request may take to answer. Nearly all of it is the
/// store's: behind a lock on a table or a partition that drops packets, a
/// request would otherwise be held as long as the outage lasts. Past it the
/// answer is `503 store_unavailable`, as the proxy answers a key it cannot
/// read. Dropping the handler rolls back a PostgreSQL transaction in
/// progress; a write SQLite's writer thread has already begun still
/// commits, so, as after any timeout, the caller re-reads before retrying.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

async fn within_request_timeout(request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    match tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(%method, %path, timeout = ?ADMIN_REQUEST_TIMEOUT, "admin API: no answer from the key store in time");
            error::AdminError::Unavailable.into_response()
        }
    }
}

/// Serves the admin listener until `shutdown` resolves (at shutdown, once
/// the proxy has drained).
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
    if *state.draining.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n");
    }
    // A store that does not answer is as unready as one that refuses.
    let reason = match tokio::time::timeout(STORE_READ_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => return (StatusCode::OK, "ready\n"),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {STORE_READ_TIMEOUT:?}"),
    };
    tracing::warn!(%reason, "not ready: key store unreachable");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready: key store unreachable\n",
    )
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state
        .metrics
        .cache_entries
        .set(i64::try_from(state.authenticator.cached_keys()).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        axum::body::Body::from_stream(state.metrics.clone().render_chunks()),
    )
}
