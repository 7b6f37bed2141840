//! Live reload of the configuration and the TLS certificate: on a trigger
//! (SIGHUP) or when the config, certificate or key file changes on disk.
//!
//! A reload builds everything new first (config parsed and validated,
//! certificate loaded, proxy state built) and only then swaps it in, so a
//! bad file is refused with a logged reason and the old one keeps serving.
//! Open connections are never dropped: they pick up the new state on their
//! next request. Listen addresses, the store and the cache need a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::proxy::tls::{load_certified_key, CertResolver, TlsError};
use crate::proxy::{ProxyState, SharedParts};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS was {0} in the new config; turning TLS on or off needs a restart")]
    TlsToggled(&'static str),
}

/// Holds what a reload swaps, and what it needs to build a new proxy state.
pub struct Reloader {
    /// The config file.
    path: PathBuf,
    /// The config now in force.
    active: Config,
    proxy: Arc<ArcSwap<ProxyState>>,
    /// The listener's certificate, when it serves TLS.
    certs: Option<Arc<CertResolver>>,
    shared: SharedParts,
    /// Modification times of the watched files at the last (re)load.
    stamps: Vec<Option<SystemTime>>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        active: Config,
        proxy: Arc<ArcSwap<ProxyState>>,
        certs: Option<Arc<CertResolver>>,
        shared: SharedParts,
    ) -> Reloader {
        let mut reloader = Reloader {
            path,
            active,
            proxy,
            certs,
            shared,
            stamps: Vec::new(),
        };
        reloader.stamps = reloader.current_stamps();
        reloader
    }

    fn watched(&self) -> Vec<&Path> {
        let mut files = vec![self.path.as_path()];
        if let Some(tls) = &self.active.proxy.tls {
            files.push(&tls.cert_file);
            files.push(&tls.key_file);
        }
        files
    }

    fn current_stamps(&self) -> Vec<Option<SystemTime>> {
        self.watched()
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Whether a watched file changed since the last load.
    pub fn changed_on_disk(&self) -> bool {
        self.current_stamps() != self.stamps
    }

    /// Loads the file again and swaps in the new state, or changes nothing.
    pub fn reload(&mut self) -> Result<(), ReloadError> {
        // Remember the stamps first: a failed reload is not retried until the
        // files change again.
        self.stamps = self.current_stamps();
        let config = Config::load(&self.path)?;
        let certificate = match (&config.proxy.tls, &self.certs) {
            (Some(tls), Some(_)) => Some(load_certified_key(&tls.cert_file, &tls.key_file)?),
            (None, None) => None,
            (Some(_), None) => return Err(ReloadError::TlsToggled("turned on")),
            (None, Some(_)) => return Err(ReloadError::TlsToggled("turned off")),
        };
        let state = ProxyState::new(&config, &self.shared)?;
        self.warn_about_restart_only_changes(&config);
        if let (Some(resolver), Some(certificate)) = (&self.certs, certificate) {
            resolver.replace(certificate);
        }
        self.proxy.store(Arc::new(state));
        self.active = config;
        self.stamps = self.current_stamps();
        Ok(())
    }

    fn warn_about_restart_only_changes(&self, new: &Config) {
        let old = &self.active;
        let changed = [
            ("proxy.listen", old.proxy.listen != new.proxy.listen),
            ("admin.listen", old.admin.listen != new.admin.listen),
            (
                "store",
                format!("{:?}", old.store) != format!("{:?}", new.store),
            ),
            (
                "cache",
                format!("{:?}", old.cache) != format!("{:?}", new.cache),
            ),
            (
                "proxy limits",
                format!(
                    "{:?}",
                    (
                        old.proxy.max_header_bytes,
                        old.proxy.max_headers,
                        old.proxy.max_connections,
                        old.proxy.header_read_timeout,
                        old.proxy.idle_timeout
                    )
                ) != format!(
                    "{:?}",
                    (
                        new.proxy.max_header_bytes,
                        new.proxy.max_headers,
                        new.proxy.max_connections,
                        new.proxy.header_read_timeout,
                        new.proxy.idle_timeout
                    )
                ),
            ),
        ];
        for (field, differs) in changed {
            if differs {
                tracing::warn!(
                    field,
                    "changed in the config file; it takes effect only after a restart"
                );
            }
        }
    }
}

/// Reloads on every trigger and whenever a watched file changes (checked
/// every `poll`), until `shutdown` resolves.
pub async fn run(
    mut reloader: Reloader,
    mut triggers: mpsc::UnboundedReceiver<()>,
    poll: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut signals_open = true;
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reason = tokio::select! {
            _ = &mut shutdown => return,
            trigger = triggers.recv(), if signals_open => match trigger {
                Some(()) => "signal",
                // No more signals can come; keep watching the files.
                None => {
                    signals_open = false;
                    continue;
                }
            },
            _ = tick.tick() => {
                if !reloader.changed_on_disk() {
                    continue;
                }
                "file change"
            }
        };
        match reloader.reload() {
            Ok(()) => {
                tracing::info!(reason, path = %reloader.path.display(), "configuration reloaded")
            }
            Err(error) => tracing::error!(
                reason,
                %error,
                path = %reloader.path.display(),
                "configuration reload refused; the previous configuration keeps serving"
            ),
        }
    }
}
