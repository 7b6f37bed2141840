//! The data plane: the listener, the request pipeline, header rewriting, the
//! upstream clients, the timeouts and the one place errors become responses.

pub mod cert_validity;
pub mod cors;
pub mod forward_auth;
pub mod handler;
pub mod headers;
pub mod linger;
pub mod path;
pub mod reject;
pub mod relay;
pub mod routes;
pub mod server;
pub mod timeouts;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use prometheus::{Histogram, IntCounter};

use crate::auth::{Authenticator, CredentialExtractor};
use crate::config::Config;
use crate::key::TokenFormat;
use crate::ratelimit::{Buckets, RateLimiter};
use crate::telemetry::counted::CountedBody;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::usage::UsageRecorder;

pub use reject::ProxyError;

/// What the proxy answers with: the upstream's streamed body (counted as
/// bytes out), or a small body of our own (rejections, forward-auth answers).
pub type ProxyBody = Either<CountedBody<Incoming>, Full<Bytes>>;

/// What the proxy sends upstream: the client's streamed body, counted as
/// bytes in, with spoofed identity names removed from its trailers.
pub type UpstreamBody = headers::StripTrailers<CountedBody<Incoming>>;

/// Everything the request pipeline needs, shared by all connections.
pub struct ProxyState {
    /// Route table: upstream, namespace and permission per host/path.
    pub routes: routes::RouteTable,
    /// How paths are normalized before routing and forwarding: as
    /// configured when some route has a path prefix, `Off` when none has
    /// (see [`routes::RouteTable::routes_by_path`]).
    pub path_normalization: crate::config::PathNormalization,
    /// Finds and parses the credential.
    pub credentials: CredentialExtractor,
    /// Verifies keys through the cache.
    pub authenticator: Arc<Authenticator>,
    /// Header rewrite rules (identity names, credential removal).
    pub headers: headers::HeaderRules,
    /// Pooled upstream clients.
    pub upstream: upstream::UpstreamClients,
    /// Per-key usage counting.
    pub usage: UsageRecorder,
    pub metrics: Arc<Metrics>,
    /// Body byte counters, by direction.
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    /// Per-route histograms, resolved once (indexed by `Route::index`).
    pub route_metrics: Vec<RouteMetrics>,
    /// The forward-auth decision endpoint, when enabled.
    pub forward_auth: Option<forward_auth::ForwardAuth>,
    /// The relay's idle upstream connections, per route (by `Route::index`).
    pub relay_pools: Vec<relay::IdlePool>,
    /// Deadline from a request's head to its response head.
    pub request_timeout: std::time::Duration,
    /// Per-key rate limit, when configured.
    pub rate_limiter: Option<RateLimiter>,
    /// Peers whose forwarding headers are kept (`proxy.trusted_proxies`).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// What every generation of the proxy state shares: built once at start,
/// handed to each state a reload builds.
#[derive(Clone)]
pub struct SharedParts {
    pub authenticator: Arc<Authenticator>,
    pub usage: UsageRecorder,
    pub metrics: Arc<Metrics>,
    /// Rate-limit buckets: a reload changes the limit, not the usage so far.
    pub buckets: Arc<Buckets>,
}

/// A route's latency histograms, resolved once so the hot path does not look
/// labels up.
pub struct RouteMetrics {
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
}

impl ProxyState {
    /// Builds the pipeline's state from a validated config. Fails only when
    /// the upstream CA bundle cannot be read.
    pub fn new(config: &Config, shared: &SharedParts) -> Result<ProxyState, tls::TlsError> {
        let SharedParts {
            authenticator,
            usage,
            metrics,
            buckets,
        } = shared.clone();
        let upstream_tls = tls::client_config(config.proxy.upstream_ca_file.as_deref())?;
        let proxy = &config.proxy;
        let routes = routes::RouteTable::from_config(config);
        let path_normalization = if routes.routes_by_path() {
            proxy.path_normalization
        } else {
            crate::config::PathNormalization::Off
        };
        let relay_pools = (0..routes.len())
            .map(|_| relay::IdlePool::default())
            .collect();
        let route_metrics = (0..routes.len())
            .map(|i| {
                let name = routes.name(i);
                RouteMetrics {
                    request_duration: metrics.request_duration(name),
                    upstream_duration: metrics.upstream_duration(name),
                }
            })
            .collect();
        metrics.start_failure_series(
            reject::ProxyError::counted_reasons(),
            (0..routes.len()).map(|i| routes.name(i)),
        );
        let api_key_header = http::HeaderName::from_bytes(proxy.api_key_header.as_bytes())
            .expect("validated by config");
        Ok(ProxyState {
            routes,
            path_normalization,
            credentials: CredentialExtractor::new(
                TokenFormat::new(&config.keys.prefix)
                    .accepting_imported(config.keys.accept_imported),
                api_key_header,
            ),
            authenticator,
            headers: headers::HeaderRules::new(
                &proxy.identity_header_prefix,
                &proxy.api_key_header,
                proxy.keep_credential,
            ),
            upstream: upstream::UpstreamClients::new(
                proxy.connect_timeout,
                proxy.upstream_timeout,
                upstream_tls,
            ),
            usage,
            bytes_in: metrics.bytes("in"),
            bytes_out: metrics.bytes("out"),
            metrics,
            relay_pools,
            route_metrics,
            forward_auth: config
                .forward_auth
                .enabled
                .then(|| forward_auth::ForwardAuth {
                    path: config.forward_auth.path.clone(),
                    cors_allow_preflight: proxy.cors_allow_preflight,
                }),
            request_timeout: proxy.request_timeout,
            rate_limiter: RateLimiter::new(&config.rate_limit, buckets),
            trusted_proxies: proxy.trusted_proxies.clone(),
        })
    }
}
