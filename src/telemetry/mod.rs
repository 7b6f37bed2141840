//! Telemetry: tracing setup (pretty or JSON), the Prometheus metrics, and
//! the per-key usage batcher.

pub mod counted;
pub mod metrics;
pub mod usage;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` wins over `[log] level`.
/// Returns an error if one is already installed (tests start several apps).
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .map_err(|e| format!("log.level {:?} is not a valid filter: {e}", config.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    result.map_err(|e| e.to_string())
}
