//! Telemetry: tracing setup (pretty or JSON), the access log, the
//! Prometheus metrics, and the per-key usage batcher.

// The log buffer is a plain Mutex: held to copy one formatted line, never
// across an await.
#![allow(clippy::disallowed_types)]

pub mod access;
pub mod compact;
pub mod counted;
pub mod metrics;
pub mod usage;

use std::io::{BufWriter, Stderr, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Flushes the log buffer when dropped (at exit), and stops its flusher.
pub struct LogGuard {
    buffer: Arc<Mutex<BufWriter<Stderr>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = lock(&self.buffer).flush();
    }
}

/// The buffer [`init_logging`] installed, for [`flush_logs`].
static LOG_BUFFER: OnceLock<Arc<Mutex<BufWriter<Stderr>>>> = OnceLock::new();

/// Writes out buffered log lines now: for an exit that skips the
/// [`LogGuard`]'s drop (`std::process::exit`).
pub fn flush_logs() {
    if let Some(buffer) = LOG_BUFFER.get() {
        let _ = lock(buffer).flush();
    }
}

/// How long a log line may wait in the buffer before it reaches stderr.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Installs the global subscriber. `RUST_LOG` wins over `[log] level`.
///
/// Lines are formatted on the calling thread into a 64 KiB buffer that a
/// small thread flushes every 200 ms (and that flushes itself when full),
/// so the access log costs a request a memory copy, not a system call or a
/// thread wake-up: under load, hundreds of lines go out in one write. The
/// price is that a line can reach stderr up to 200 ms late; the buffer is
/// flushed at exit.
pub fn init_logging(config: &LogConfig) -> Result<LogGuard, String> {
    let configured = || {
        EnvFilter::try_new(&config.level)
            .map_err(|e| format!("log.level {:?} is not a valid filter: {e}", config.level))
    };
    // An unusable RUST_LOG is said once logging runs, not silently dropped.
    let mut unusable_env = None;
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(env) => match EnvFilter::try_new(&env) {
            Ok(filter) => filter,
            Err(error) => {
                unusable_env = Some((env, error));
                configured()?
            }
        },
        Err(_) => configured()?,
    };
    let buffer = Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        std::io::stderr(),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let _ = LOG_BUFFER.set(buffer.clone());
    let writer = BufferedStderr(buffer.clone());
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer);
    // Each format is its own subscriber type, so is its reload handle.
    macro_rules! init_reloadable {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            let _ = LEVEL_RELOAD.set(Box::new(move |filter| {
                handle.reload(filter).map_err(|e| e.to_string())
            }));
            builder.try_init()
        }};
    }
    let result = match config.format {
        LogFormat::Json => init_reloadable!(builder.json().flatten_event(true)),
        // Colours for people; the cheaper twin for files and collectors.
        LogFormat::Pretty if terminal => init_reloadable!(builder.compact()),
        LogFormat::Pretty => init_reloadable!(builder.event_format(compact::FastCompact)),
    };
    result.map_err(|e| e.to_string())?;
    if let Some((env, error)) = unusable_env {
        tracing::warn!(rust_log = %env, %error, "RUST_LOG is not a valid filter; using log.level");
    }
    match config.format {
        LogFormat::Json => access::install(access::LineFormat::Json, buffer.clone()),
        LogFormat::Pretty if !terminal => {
            access::install(access::LineFormat::Compact, buffer.clone())
        }
        LogFormat::Pretty => {}
    }
    let (flushed, stopping) = (buffer.clone(), stop.clone());
    std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                std::thread::sleep(FLUSH_EVERY);
                let _ = lock(&flushed).flush();
            }
        })
        .map_err(|e| format!("cannot start the log flusher: {e}"))?;
    Ok(LogGuard { buffer, stop })
}

/// An error and every error beneath it, `outer: inner: …`: hyper's and
/// reqwest's errors say "client error (Connect)" on top and keep the cause
/// (a refused connection, a certificate rejected) in their sources.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Swaps the filter of the subscriber [`init_logging`] installed.
type LevelReload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static LEVEL_RELOAD: OnceLock<LevelReload> = OnceLock::new();

/// Applies a reloaded `[log] level` to the running process. `RUST_LOG`, when
/// set, stays in force as it did at start; without [`init_logging`] (tests)
/// there is nothing to change.
pub fn reload_log_level(level: &str) {
    if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() {
        tracing::warn!("log.level changed, but RUST_LOG is set and stays in force");
        return;
    }
    let Some(reload) = LEVEL_RELOAD.get() else {
        return;
    };
    match EnvFilter::try_new(level) {
        Ok(filter) => {
            // Said at the old level, which may be the last to show it.
            tracing::info!(level, "log level changing");
            if let Err(error) = reload(filter) {
                tracing::warn!(level, %error, "log.level not applied");
            }
        }
        Err(error) => tracing::warn!(level, %error, "log.level not applied"),
    }
}

/// The shared, buffered stderr that log lines are written into.
#[derive(Clone)]
struct BufferedStderr(Arc<Mutex<BufWriter<Stderr>>>);

/// One formatted event being written; holds the lock for a memory copy.
struct LockedStderr<'a>(MutexGuard<'a, BufWriter<Stderr>>);

impl Write for LockedStderr<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // Flushing is the flusher thread's job; a per-line flush would undo
        // the buffering.
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LockedStderr<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LockedStderr(lock(&self.0))
    }
}

/// A plain mutex, not an async one: it is held only to copy a formatted line
/// into the buffer (or by the flusher for one write), never across an await.
fn lock(buffer: &Mutex<BufWriter<Stderr>>) -> MutexGuard<'_, BufWriter<Stderr>> {
    buffer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
