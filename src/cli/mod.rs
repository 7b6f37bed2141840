//! The command line: `serve` runs the server; `bootstrap` and `apikey create
//! --local` work on the store directly; the other commands are clients of
//! the admin API.
//!
//! Exit codes: 0 success, 1 runtime failure, 64 bad usage or configuration
//! (EX_USAGE), 69 server or store unavailable (EX_UNAVAILABLE).

mod local;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError};

pub const EX_USAGE: u8 = 64;
pub const EX_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "keygate",
    version,
    about = "Authenticating reverse-proxy sidecar for API keys"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and the admin API.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short, env = "KEYGATE_CONFIG")]
        config: PathBuf,
    },
    /// Create the first account admin and print its API key once.
    Bootstrap {
        /// Email of the first admin.
        #[arg(long)]
        email: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Lifetime of the admin's key (default: the account's maximum).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
    },
    /// Manage API keys.
    #[command(subcommand)]
    Apikey(ApikeyCommand),
}

/// Where the store is, for commands that open it directly.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Read `[store] url` and `[keys] prefix` from this config file.
    #[arg(long, short, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Store URL; overrides the config file.
    #[arg(long)]
    pub store: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ApikeyCommand {
    /// Create an API key; its token is printed once.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Lifetime, e.g. 24h, 30d (default: the account's maximum).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Write straight into the store instead of calling the admin API.
        #[arg(long)]
        local: bool,
        /// With --local: email of the user who will own the key.
        #[arg(long, requires = "local")]
        owner_email: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// A failure with the exit code it deserves.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: EX_USAGE,
            message: message.into(),
        }
    }
    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e.to_string())
    }
}

pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => serve::run(&config),
        other => runtime().and_then(|rt| rt.block_on(local::run(other))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(format!("cannot start the async runtime: {e}")))
}

/// Loads the config file if one was given, else the defaults (which need no
/// upstream for store-only commands).
fn store_settings(args: &StoreArgs) -> Result<(String, String), Failure> {
    let (mut url, prefix) = match &args.config {
        Some(path) => {
            let config = Config::load(path)?;
            (config.store.url, config.keys.prefix)
        }
        None => (
            crate::config::DEFAULT_STORE_URL.to_string(),
            crate::config::DEFAULT_KEY_PREFIX.to_string(),
        ),
    };
    if let Some(store) = &args.store {
        url = store.clone();
    }
    Ok((url, prefix))
}
