//! `keygate serve`: load and validate the config before any runtime starts,
//! bind the listeners, reload on SIGHUP or file change, run until SIGTERM or
//! SIGINT. `keygate check`: the same checks of the config, then stop.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;

use super::{Failure, EX_UNAVAILABLE, EX_USAGE};
use crate::app::StartError;
use crate::config::Config;
use crate::proxy::cert_validity;

/// What `serve` checks before it binds or opens anything: the config's
/// fields, then the files it names (certificate and key, CA bundle).
/// What `Config::warnings` finds, and a certificate that is expired, not
/// yet valid or due within 14 days, is a warning on stderr, not a failure:
/// `serve` starts with it too (and logs it).
pub fn check(path: &Path) -> Result<(), Failure> {
    let config = Config::load(path)?;
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    if let Some(tls) = &config.proxy.tls {
        let certified = crate::proxy::tls::load_certified_key(&tls.cert_file, &tls.key_file)
            .map_err(|e| Failure::usage(format!("proxy.tls: {e}")))?;
        if let Some(leaf) = certified.cert.first() {
            let (_, notice) = cert_validity::inspect(&tls.cert_file, leaf, SystemTime::now());
            if let Some(notice) = notice {
                eprintln!("warning: proxy.tls: {notice}");
            }
        }
    }
    crate::proxy::tls::client_config(config.proxy.upstream_ca_file.as_deref())
        .map_err(|e| Failure::usage(format!("proxy.upstream_ca_file: {e}")))?;
    println!("{}: configuration OK", path.display());
    Ok(())
}

pub fn run(path: &Path) -> Result<(), Failure> {
    let config = Config::load(path)?;
    // Held until exit: dropping it flushes the log lines still queued.
    let _log_guard = crate::telemetry::init_logging(&config.log).map_err(Failure::usage)?;
    let workers = match config.proxy.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let bind = |addr| async move {
            TcpListener::bind(addr).await.map_err(|e| Failure {
                code: EX_UNAVAILABLE,
                message: format!("cannot listen on {addr}: {e}"),
            })
        };
        let proxy = bind(config.proxy.listen).await?;
        let admin = bind(config.admin.listen).await?;
        let (triggers, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(forward_sighup(triggers));
        let reload = crate::app::ReloadSource {
            path: path.to_owned(),
            triggers: receiver,
            poll: Duration::from_secs(2),
        };
        crate::app::run_with_reload(config, Some(reload), proxy, admin, shutdown_signal())
            .await
            .map_err(|e| Failure {
                // 64 tells systemd (RestartPreventExitStatus) and the
                // operator that restarting will not help until the file is
                // fixed; 69, that what it names may come back; 1, a
                // runtime failure (the proxy or the admin API stopped by
                // itself), which a restart may get past.
                code: match e {
                    _ if e.is_configuration() => EX_USAGE,
                    StartError::Ended { .. } => 1,
                    _ => EX_UNAVAILABLE,
                },
                message: e.to_string(),
            })
    })
}

/// Turns every SIGHUP into a reload request.
async fn forward_sighup(triggers: tokio::sync::mpsc::UnboundedSender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; reload only on file change");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading configuration");
        if triggers.send(()).is_err() {
            return;
        }
    }
}

/// Resolves on SIGTERM or SIGINT, which starts the drain. A second one
/// during the drain stops the process at once (exit 1), as an operator who
/// sends it again means, rather than waiting out `drain_timeout`.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM; stopping only on Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second stop signal: exiting now without finishing the drain");
        crate::telemetry::flush_logs();
        std::process::exit(1);
    });
}
