//! Live reload of the configuration and the TLS certificate: on a trigger
//! (SIGHUP) or when the config, certificate or key file changes on disk.
//!
//! A reload builds everything new first (config parsed and validated,
//! certificate loaded, proxy state built) and only then swaps it in, so a
//! bad file is refused with a logged reason and the old one keeps serving.
//! A new certificate that is expired or not yet valid is such a bad file
//! (the one already served is not new: see [`check_replacement`]); the one
//! swapped in is warned about near its expiry and sets
//! `keygate_tls_certificate_expiry_timestamp_seconds`.
//! Open connections are never dropped: they pick up the new state on their
//! next request. The metric series of routes the new config no longer has
//! are dropped; those of routes it keeps count on. The log level applies at
//! once; what a running process cannot change ([`keep_restart_only`])
//! keeps its value until a restart, with a warning.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::proxy::cert_validity::{check_replacement, now_serving, ValidityError};
use crate::proxy::routes::retire_series_ids;
use crate::proxy::tls::{load_certified_key, CertResolver, TlsError};
use crate::proxy::{ProxyState, SharedParts};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A new certificate that is expired or not yet valid.
    #[error(transparent)]
    Validity(#[from] ValidityError),
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
    /// What the watched files were at the last (re)load.
    stamps: Vec<Option<Stamp>>,
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

    fn current_stamps(&self) -> Vec<Option<Stamp>> {
        stamps(&self.path, &self.active)
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
        let config_stamp = self.stamps[0].clone();
        let mut config = Config::load(&self.path)?;
        // What is loaded is what the files were when stamped, never later:
        // an edit made while this reload runs (building the state reads
        // the CA bundle or the system's roots) is a change the next check
        // finds. The config file as it was before it was read, the new
        // config's certificate and key before they are read.
        let mut loaded = stamps(&self.path, &config);
        loaded[0] = config_stamp;
        let now = SystemTime::now();
        let certificate = match (&config.proxy.tls, &self.certs) {
            (Some(tls), Some(served)) => {
                let new = load_certified_key(&tls.cert_file, &tls.key_file)?;
                if let Some(leaf) = new.cert.first() {
                    let served = served.current();
                    check_replacement(&tls.cert_file, leaf, served.cert.first(), now)?;
                }
                Some(new)
            }
            (None, None) => None,
            (Some(_), None) => return Err(ReloadError::TlsToggled("turned on")),
            (None, Some(_)) => return Err(ReloadError::TlsToggled("turned off")),
        };
        let kept = keep_restart_only(&self.active, &mut config);
        let state = ProxyState::new(&config, &self.shared)?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        for field in kept {
            tracing::warn!(
                field,
                "changed in the config file; the running value stays until a restart"
            );
        }
        if config.log.level != self.active.log.level {
            crate::telemetry::reload_log_level(&config.log.level);
        }
        if let (Some(resolver), Some(certificate), Some(tls)) =
            (&self.certs, certificate, &config.proxy.tls)
        {
            now_serving(&tls.cert_file, &certificate, now, &self.shared.metrics);
            resolver.replace(certificate);
        }
        // Names, not numbers: the metric series of a route are labelled
        // by its name, and a route kept under the same name keeps them.
        let kept_names: HashSet<&str> = state.routes.names().collect();
        let removed: Vec<String> = self
            .proxy
            .load()
            .routes
            .names()
            .filter(|name| !kept_names.contains(name))
            .map(str::to_owned)
            .collect();
        self.proxy.store(Arc::new(state));
        // After the swap, so that no new request finds a removed route. A
        // request still in flight on the old state that ends after this
        // can bring one of its route's series back (an upstream error, or a
        // key counted on that route for the first time): a race left open,
        // as it needs a request to outlive the reload.
        self.shared
            .metrics
            .forget_routes(removed.iter().map(String::as_str));
        retire_series_ids(removed.iter().map(String::as_str));
        self.active = config;
        self.stamps = loaded;
        Ok(())
    }
}

/// The files a reload watches, `config`'s certificate and key after the
/// config file (`path`), as they are now.
fn stamps(path: &Path, config: &Config) -> Vec<Option<Stamp>> {
    let mut files = vec![path];
    if let Some(tls) = &config.proxy.tls {
        files.push(&tls.cert_file);
        files.push(&tls.key_file);
    }
    files.into_iter().map(Stamp::of).collect()
}

/// What tells one version of a watched file from another: its inode as
/// well as its modification time, for a file replaced by one of the same
/// mtime (a symlink swapped to a new NixOS store path, where every file's
/// mtime is 1; a copy that keeps its source's), and its size and change
/// time, for two writes within one tick of the file system's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
}

impl Stamp {
    /// The file `path` names, through symlinks; `None` when it cannot be read.
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            device: meta.dev(),
            inode: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// What a reload cannot apply to a running process: the listeners, the
/// store, the cache, the connection limits, the runtime, the key format and
/// key header (the admin API keeps its own), the log format, the metrics,
/// usage and echo settings. A changed one keeps its value in force (it is
/// copied into `new`, so everything built from `new` agrees with what
/// runs) and is named in a warning each time until a restart.
fn keep_restart_only(active: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    keep(
        &mut kept,
        "proxy.listen",
        &active.proxy.listen,
        &mut new.proxy.listen,
    );
    keep(&mut kept, "admin", &active.admin, &mut new.admin);
    keep(&mut kept, "store", &active.store, &mut new.store);
    keep(&mut kept, "cache", &active.cache, &mut new.cache);
    keep(&mut kept, "keys", &active.keys, &mut new.keys);
    keep(
        &mut kept,
        "proxy.api_key_header",
        &active.proxy.api_key_header,
        &mut new.proxy.api_key_header,
    );
    keep(
        &mut kept,
        "proxy.max_header_bytes",
        &active.proxy.max_header_bytes,
        &mut new.proxy.max_header_bytes,
    );
    keep(
        &mut kept,
        "proxy.max_headers",
        &active.proxy.max_headers,
        &mut new.proxy.max_headers,
    );
    keep(
        &mut kept,
        "proxy.max_connections",
        &active.proxy.max_connections,
        &mut new.proxy.max_connections,
    );
    keep(
        &mut kept,
        "proxy.header_read_timeout",
        &active.proxy.header_read_timeout,
        &mut new.proxy.header_read_timeout,
    );
    keep(
        &mut kept,
        "proxy.idle_timeout",
        &active.proxy.idle_timeout,
        &mut new.proxy.idle_timeout,
    );
    keep(
        &mut kept,
        "proxy.drain_timeout",
        &active.proxy.drain_timeout,
        &mut new.proxy.drain_timeout,
    );
    keep(
        &mut kept,
        "proxy.http1_relay",
        &active.proxy.http1_relay,
        &mut new.proxy.http1_relay,
    );
    keep(
        &mut kept,
        "proxy.worker_threads",
        &active.proxy.worker_threads,
        &mut new.proxy.worker_threads,
    );
    keep(
        &mut kept,
        "log.format",
        &active.log.format,
        &mut new.log.format,
    );
    keep(&mut kept, "metrics", &active.metrics, &mut new.metrics);
    keep(&mut kept, "usage", &active.usage, &mut new.usage);
    keep(&mut kept, "echo", &active.echo, &mut new.echo);
    kept
}

/// Puts `old` back in `new`'s place when they differ, naming it in `kept`.
/// Compared by their Debug text: not every config type is `PartialEq`.
fn keep<T: std::fmt::Debug + Clone>(
    kept: &mut Vec<&'static str>,
    name: &'static str,
    old: &T,
    new: &mut T,
) {
    if format!("{old:?}") != format!("{new:?}") {
        *new = old.clone();
        kept.push(name);
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
