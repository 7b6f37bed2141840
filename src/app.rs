//! Wiring: opens the store, builds the cache, the proxy and the admin API,
//! and runs them on listeners the caller bound, until a shutdown future
//! resolves. Binaries and tests both start keygate through [`run`], so tests
//! can bind port 0.

use std::future::Future;
use std::sync::Arc;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::admin::{self, AdminState};
use crate::auth::{Authenticator, CacheSettings};
use crate::config::Config;
use crate::key::TokenFormat;
use crate::proxy::cert_validity;
use crate::proxy::server::{self, ServerLimits};
use crate::proxy::tls::{load_certified_key, server_config, CertResolver, TlsError};
use crate::proxy::{ProxyState, SharedParts};
use crate::ratelimit::Buckets;
use crate::reload::{self, Reloader};
use crate::store::{self, StoreError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::usage;

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the key store at {url}: {source}")]
    Store { url: String, source: StoreError },
    #[error("TLS: {0}")]
    Tls(TlsError),
}

impl StartError {
    /// Whether the configuration is at fault (a certificate, key or CA file
    /// that cannot be used, a store URL that cannot be read), so that
    /// starting again unchanged would fail the same way; otherwise something
    /// it names is unavailable (the store unreachable), which may pass.
    pub fn is_configuration(&self) -> bool {
        match self {
            StartError::Tls(_) => true,
            StartError::Store { source, .. } => matches!(
                source,
                StoreError::Unavailable(sqlx::Error::Configuration(_))
            ),
        }
    }
}

/// Where a running keygate reloads its configuration from.
pub struct ReloadSource {
    /// The config file, re-read on a trigger or when it changes.
    pub path: PathBuf,
    /// One message per reload request (SIGHUP).
    pub triggers: mpsc::UnboundedReceiver<()>,
    /// How often the config and certificate files are checked for changes.
    pub poll: Duration,
}

/// Runs the proxy and the admin API until `shutdown` resolves, then drains
/// the proxy and flushes usage.
pub async fn run(
    config: Config,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    run_with_reload(config, None, proxy_listener, admin_listener, shutdown).await
}

/// [`run`], reloading the configuration and certificate from `reload`.
pub async fn run_with_reload(
    config: Config,
    reload: Option<ReloadSource>,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(Metrics::new(config.metrics.max_key_series));
    // TLS first: a bad certificate must stop the start before anything runs.
    // An expired or not yet valid one starts, with a warning
    // (proxy::cert_validity says why).
    let certs = match &config.proxy.tls {
        Some(tls) => {
            let certified =
                load_certified_key(&tls.cert_file, &tls.key_file).map_err(StartError::Tls)?;
            cert_validity::now_serving(&tls.cert_file, &certified, SystemTime::now(), &metrics);
            Some(CertResolver::new(certified))
        }
        None => None,
    };
    let acceptor = match &certs {
        Some(resolver) => Some(TlsAcceptor::from(
            server_config(resolver.clone()).map_err(StartError::Tls)?,
        )),
        None => None,
    };
    let store = store::open(&config.store.url)
        .await
        .map_err(|source| StartError::Store {
            url: store::display_url(&config.store.url),
            source,
        })?;
    let cache = CacheSettings {
        capacity: config.cache.capacity,
        ttl: config.cache.ttl,
        negative_ttl: config.cache.negative_ttl,
        stale_if_error: config.cache.stale_if_error,
    };
    let authenticator = Arc::new(Authenticator::new(store.clone(), cache, metrics.clone()));
    if let Err(error) = authenticator.load_settings().await {
        tracing::warn!(%error, "could not read account settings; assuming API keys are enabled");
    }
    let (recorder, queue) = usage::channel();
    let shared = SharedParts {
        authenticator: authenticator.clone(),
        usage: recorder.clone(),
        metrics: metrics.clone(),
        buckets: Arc::new(Buckets::new(
            usize::try_from(config.cache.capacity).unwrap_or(usize::MAX),
        )),
    };
    let proxy_state = Arc::new(ProxyState::new(&config, &shared).map_err(StartError::Tls)?);
    let admin_state = AdminState {
        store: store.clone(),
        authenticator: authenticator.clone(),
        metrics: metrics.clone(),
        tokens: TokenFormat::new(&config.keys.prefix),
        max_body_bytes: config.admin.max_body_bytes,
        credentials: proxy_state.credentials.clone(),
    };

    // One shutdown signal fanned out to every task.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tracing::info!(
        proxy = %proxy_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        store = %store::display_url(&config.store.url),
        "keygate serving"
    );
    let live_state = Arc::new(ArcSwap::new(proxy_state.clone()));
    let reloader = reload.map(|source| {
        let reloader = Reloader::new(
            source.path,
            config.clone(),
            live_state.clone(),
            certs.clone(),
            shared,
        );
        tokio::spawn(reload::run(
            reloader,
            source.triggers,
            source.poll,
            stopped(),
        ))
    });
    let pool_sweeper = tokio::spawn(crate::proxy::relay::run_pool_sweeper(
        live_state.clone(),
        stopped(),
    ));
    let proxy = tokio::spawn(server::serve(
        proxy_listener,
        live_state,
        acceptor,
        ServerLimits::from(&config.proxy),
        stopped(),
    ));
    let admin = tokio::spawn(admin::serve(admin_listener, admin_state, stopped()));
    let flusher = tokio::spawn(usage::run_flusher(
        store.clone(),
        queue,
        config.usage.flush_interval,
        usage::FlushCounters {
            failures: metrics.usage_flush_failures.clone(),
            dropped: metrics.usage_dropped.clone(),
        },
        stopped(),
    ));
    // Drops keys changed by other replicas from this one's cache.
    let feed = tokio::spawn(store::feed::run(
        store.clone(),
        authenticator.clone(),
        metrics.clone(),
        store::feed::FeedSettings {
            poll_interval: config.cache.poll_interval,
            notifications: config.store.notify,
        },
        stopped(),
    ));
    // Drops cached ids nothing can use any more, so the cache follows the
    // ids in use rather than every id ever presented.
    let sweeper = tokio::spawn(crate::auth::run_sweeper(authenticator.clone(), stopped()));
    let echo = match config.echo.listen {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "echo upstream serving");
                Some(tokio::spawn(crate::echo::serve(listener, stopped())))
            }
            Err(error) => {
                tracing::warn!(%error, %addr, "cannot start the echo upstream");
                None
            }
        },
        None => None,
    };
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = proxy.await;
    if let Some(reloader) = reloader {
        let _ = reloader.await;
    }
    let _ = pool_sweeper.await;
    if let Some(echo) = echo {
        let _ = echo.await;
    }
    // What is left waits on the store: admin requests in flight, the final
    // usage flush, the feed's and the sweeper's reads, closing the pool
    // (which waits for every connection lent out). A store that has stopped
    // answering (a partition that drops packets, a lock on a table) would
    // hold the exit for as long as it lasts, so it gets STORE_WIND_DOWN; the
    // usage not flushed by then is lost, and said so.
    let wind_down = async {
        let _ = admin.await;
        let _ = flusher.await;
        let _ = feed.await;
        let _ = sweeper.await;
        // Last: the flusher has written the final usage counts.
        store.close().await;
    };
    if tokio::time::timeout(STORE_WIND_DOWN, wind_down)
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?STORE_WIND_DOWN,
            "the key store did not answer at shutdown; exiting without it (usage counted since the last flush may be lost)"
        );
    }
    Ok(())
}

/// How long, once the proxy has drained, the admin API, the final usage
/// flush and the store's connections may take to finish before keygate
/// exits without them.
pub const STORE_WIND_DOWN: Duration = Duration::from_secs(5);
