//! Wiring: opens the store, builds the cache, the proxy and the admin API,
//! and runs them on listeners the caller bound, until a shutdown future
//! resolves (or the proxy or the admin API stops by itself, which is an
//! error). It owns the order of shutdown: the proxy drains while the admin
//! API still answers, then the rest stops. Binaries and tests both start
//! keygate through [`run`], so tests can bind port 0.

use std::future::Future;
use std::sync::Arc;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
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

/// Why keygate could not start, or stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the key store at {url}: {source}")]
    Store { url: String, source: StoreError },
    #[error("TLS: {0}")]
    Tls(TlsError),
    /// A task that serves for keygate's whole life (the proxy, the admin
    /// API) ended before the shutdown signal. Running on would leave a
    /// process that looks alive, and ready, with nothing behind it.
    #[error("the {task} stopped before any shutdown signal ({how}); keygate stopped with it")]
    Ended { task: &'static str, how: String },
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
            StartError::Ended { .. } => false,
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
/// the proxy (the admin API answering meanwhile, not ready), stops the
/// admin API and flushes usage. The proxy or the admin API ending before
/// `shutdown` stops everything the same way and is an error.
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
    // Shutdown comes in two steps, each a signal fanned out to its tasks.
    // `drain`: the proxy stops accepting and finishes its requests, for up
    // to drain_timeout. Meanwhile the admin API keeps answering (/healthz
    // alive, /readyz not ready, /metrics scraped), so that an orchestrator
    // neither kills the process mid-drain nor sends it traffic, and the
    // change feed, the cache sweeper and the usage flusher keep working
    // for the requests still running. `stop`: once the proxy has drained,
    // the rest winds down, the final usage flush last.
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let on = |rx: &watch::Receiver<bool>| {
        let rx = rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|signalled| *signalled).await;
            }
        }
    };
    let (draining, stopped) = (on(&drain_rx), on(&stop_rx));
    let admin_state = AdminState {
        store: store.clone(),
        authenticator: authenticator.clone(),
        metrics: metrics.clone(),
        tokens: TokenFormat::new(&config.keys.prefix),
        max_body_bytes: config.admin.max_body_bytes,
        credentials: proxy_state.credentials.clone(),
        draining: drain_rx,
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
            draining(),
        ))
    });
    let pool_sweeper = tokio::spawn(crate::proxy::relay::run_pool_sweeper(
        live_state.clone(),
        draining(),
    ));
    let proxy = tokio::spawn(server::serve(
        proxy_listener,
        live_state,
        acceptor,
        ServerLimits::from(&config.proxy),
        draining(),
    ));
    let admin = tokio::spawn(admin::serve(admin_listener, admin_state, stopped()));
    let flusher = tokio::spawn(usage::run_flusher(
        store.clone(),
        queue,
        usage::FlushSettings::every(config.usage.flush_interval),
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
    // Asks a failing store whether it is back, so that requests need not.
    let store_probe = tokio::spawn(crate::auth::run_store_probe(
        authenticator.clone(),
        stopped(),
    ));
    let echo = match config.echo.listen {
        Some(addr) => match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "echo upstream serving");
                Some(tokio::spawn(crate::echo::serve(listener, draining())))
            }
            Err(error) => {
                tracing::warn!(%error, %addr, "cannot start the echo upstream");
                None
            }
        },
        None => None,
    };
    let (mut proxy, mut admin) = (Some(proxy), Some(admin));
    let ended = until_shutdown(shutdown, [("proxy", &mut proxy), ("admin API", &mut admin)]).await;
    match &ended {
        Ok(()) => tracing::info!("shutting down: draining in-flight requests"),
        Err(error) => tracing::error!(%error, "shutting down"),
    }
    let _ = drain_tx.send(true);
    if let Some(proxy) = proxy {
        let _ = proxy.await;
    }
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
    let _ = stop_tx.send(true);
    let wind_down = async {
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        let _ = flusher.await;
        let _ = feed.await;
        let _ = sweeper.await;
        let _ = store_probe.await;
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
    ended
}

/// Waits for `shutdown`, watching `tasks` that must run until it: the first
/// that ends before it (returns or panics) is taken out of its slot, as its
/// handle has nothing more to give, and named in the error.
async fn until_shutdown(
    shutdown: impl Future<Output = ()>,
    tasks: [(&'static str, &mut Option<JoinHandle<()>>); 2],
) -> Result<(), StartError> {
    let [(first, first_slot), (second, second_slot)] = tasks;
    let (Some(first_task), Some(second_task)) = (first_slot.as_mut(), second_slot.as_mut()) else {
        shutdown.await;
        return Ok(());
    };
    let (task, slot, result) = tokio::select! {
        _ = shutdown => return Ok(()),
        result = first_task => (first, first_slot, result),
        result = second_task => (second, second_slot, result),
    };
    *slot = None;
    let how = match result {
        Ok(()) => "it returned".to_owned(),
        Err(error) => error.to_string(),
    };
    Err(StartError::Ended { task, how })
}

/// How long, once the proxy has drained, the admin API, the final usage
/// flush and the store's connections may take to finish before keygate
/// exits without them.
pub const STORE_WIND_DOWN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounded, so that a watcher that waits for the signal alone fails
    /// rather than hangs.
    async fn within(watch: impl Future<Output = Result<(), StartError>>) -> Result<(), StartError> {
        tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("the watcher saw the task end")
    }

    /// `server::serve` and `admin::serve` return only after their shutdown
    /// signal (an accept error is retried), so no request can make one end
    /// early; what would is a bug (a panic) or a future change. The watcher
    /// is tested here on tasks that end as those would.
    #[tokio::test]
    async fn a_serving_task_that_ends_before_the_signal_is_an_error() {
        let never = || tokio::spawn(std::future::pending::<()>());
        let panics = tokio::spawn(async { panic!("a bug in the proxy") });
        let returns = tokio::spawn(async {});
        for (ended, expected) in [(panics, "panicked"), (returns, "it returned")] {
            let (mut proxy, mut admin) = (Some(ended), Some(never()));
            let result = within(until_shutdown(
                std::future::pending(),
                [("proxy", &mut proxy), ("admin API", &mut admin)],
            ))
            .await;
            let error = result.expect_err("the proxy ended first").to_string();
            assert!(error.contains("the proxy stopped"), "{error}");
            assert!(error.contains(expected), "{error}");
            assert!(proxy.is_none(), "an ended task is taken out");
            assert!(admin.is_some(), "the other is left to stop in order");
        }
        // The admin API alike.
        let (mut proxy, mut admin) = (Some(never()), Some(tokio::spawn(async {})));
        let result = within(until_shutdown(
            std::future::pending(),
            [("proxy", &mut proxy), ("admin API", &mut admin)],
        ))
        .await;
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("the admin API stopped"));
        assert!(proxy.is_some() && admin.is_none());
        // The signal first: both are left to drain and stop.
        let (mut proxy, mut admin) = (Some(never()), Some(never()));
        until_shutdown(async {}, [("proxy", &mut proxy), ("admin API", &mut admin)])
            .await
            .expect("the signal came first");
        assert!(proxy.is_some() && admin.is_some());
    }
}
