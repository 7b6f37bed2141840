//! Telemetry: tracing setup (pretty or JSON), the Prometheus metrics, and
//! the per-key usage batcher.

pub mod counted;
pub mod metrics;
pub mod usage;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Keeps the log writer thread alive; dropping it flushes what is queued.
pub type LogGuard = tracing_appender::non_blocking::WorkerGuard;

/// Installs the global subscriber. `RUST_LOG` wins over `[log] level`.
///
/// Lines are formatted on the calling thread and handed to a writer thread
/// that writes them to stderr through a buffer, so the access log costs the
/// request path no system call: under load, many lines go out in one write.
/// If the queue is full, lines are dropped rather than stalling requests
/// (the writer counts them as lost).
pub fn init_logging(config: &LogConfig) -> Result<LogGuard, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .map_err(|e| format!("log.level {:?} is not a valid filter: {e}", config.level))?;
    let buffered = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking(buffered);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(guard)
}
