//! The command line: `serve` runs the server; `bootstrap`, `backup`,
//! `apikey create --local` and `apikey import` work on the store directly
//! (`local`); the other commands are
//! clients of the admin API (`commands` over `remote`, printed by `output`).
//!
//! Exit codes: 0 success (and `--help`, `--version`), 1 runtime failure,
//! 64 bad usage or configuration, or a request the admin API refused
//! (EX_USAGE; clap's own usage errors too, which would exit 2), 69 server or
//! store unavailable (EX_UNAVAILABLE).

mod commands;
mod local;
mod output;
mod remote;
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
    /// Check a configuration file without starting, as `nginx -t` does:
    /// every field, the TLS certificate and key, the upstream CA bundle.
    /// Exits 0 when `serve` would start with it (the store is not opened
    /// and nothing is bound).
    Check {
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
        #[arg(long, value_parser = key_lifetime)]
        duration: Option<Duration>,
    },
    /// Copy the SQLite store into a new file while keygate may be serving
    /// from it (a consistent snapshot, the write-ahead log included). For
    /// PostgreSQL, use pg_dump.
    Backup {
        /// The file to write; must not exist yet.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Manage API keys.
    Apikey {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Manage users (account admins).
    User {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage service accounts (account admins).
    ServiceAccount {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: ServiceAccountCommand,
    },
    /// Manage namespaces.
    Namespace {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: NamespaceCommand,
    },
    /// Read or change the account settings (key policy, API-key switch).
    Account {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Read the audit log (account admins).
    Audit {
        #[command(flatten)]
        remote: RemoteArgs,
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Where the admin API is and how to authenticate to it. Given before or
/// after the subcommand.
#[derive(Args)]
pub struct RemoteArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "KEYGATE_SERVER",
        global = true,
        default_value = "http://127.0.0.1:8081"
    )]
    pub server: String,
    /// API key to call the admin API with.
    #[arg(long, env = "KEYGATE_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, global = true, default_value = "table")]
    pub output: output::Output,
}

impl std::fmt::Debug for RemoteArgs {
    // By hand, so that the API key never reaches a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteArgs")
            .field("server", &self.server)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("output", &self.output)
            .finish()
    }
}

/// Paging flags of the list commands.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page (1-1000).
    #[arg(long)]
    pub page_size: Option<u32>,
    /// The token a previous page printed.
    #[arg(long)]
    pub page_token: Option<String>,
}

/// The `--id` of the resource a command acts on.
///
/// The doc comment of a flattened `Args` struct is what clap shows for a
/// subcommand that has none of its own, so every subcommand has its own.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The resource's id, as its list command shows it.
    #[arg(long)]
    pub id: String,
}

/// Access flags of user and service-account commands.
#[derive(Debug, Args)]
pub struct AccessArgs {
    /// Account role: admin, developer or read.
    #[arg(long)]
    pub role: Option<String>,
    /// Namespace permission as NAMESPACE=admin|write|read; repeatable. On
    /// update, replaces all of them.
    #[arg(long = "namespace-access", value_name = "NS=PERMISSION")]
    pub namespace_access: Vec<String>,
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
        /// What the key is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Lifetime, e.g. 24h, 30d (default: the account's maximum).
        #[arg(long, value_parser = key_lifetime)]
        duration: Option<Duration>,
        /// Write straight into the store instead of calling the admin API.
        #[arg(long)]
        local: bool,
        /// With --local: email of the user who will own the key.
        #[arg(long, requires = "local")]
        owner_email: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
        /// Owner id (default: yourself).
        #[arg(long, conflicts_with = "local")]
        owner_id: Option<String>,
        /// Owner type: user or service-account (default: found from the id).
        #[arg(long, conflicts_with = "local")]
        owner_type: Option<String>,
        /// Limit the key to this namespace; repeatable (default: all of the owner's).
        #[arg(long = "namespace", conflicts_with = "local")]
        namespaces: Vec<String>,
    },
    /// Import keys issued by another system, straight into the store.
    ///
    /// One `token<TAB>name[<TAB>owner-email]` per line. Needs `[keys]
    /// accept_imported = true` on the servers that should accept them.
    Import {
        /// The file of `token<TAB>name[<TAB>owner-email]` lines (`-` for
        /// standard input).
        #[arg(long)]
        tsv: PathBuf,
        /// Email of the user who owns keys whose line names no owner.
        #[arg(long)]
        owner_email: String,
        /// Lifetime of the imported keys (default: the account's maximum).
        #[arg(long, value_parser = key_lifetime)]
        duration: Option<Duration>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List API keys (yours; admins: everyone's).
    List {
        /// Only the keys of this user or service account.
        #[arg(long)]
        owner_id: Option<String>,
        /// Only the keys of owners of this type: user or service-account.
        #[arg(long)]
        owner_type: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one API key.
    Get(IdArg),
    /// Delete an API key for good.
    Delete(IdArg),
    /// Enable a disabled API key.
    Enable(IdArg),
    /// Disable an API key: it fails on the proxy at once.
    Disable(IdArg),
    /// Issue a new secret; the old one keeps working for the grace period.
    Rotate {
        /// The key's id.
        #[arg(long)]
        id: String,
        /// How long the old secret keeps working, e.g. 1h, 0s (default 24h).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Change an API key's display name or description.
    Update {
        /// The key's id.
        #[arg(long)]
        id: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Fail if the key changed since this version (default: the current one).
        #[arg(long)]
        resource_version: Option<String>,
    },
    /// Request count and last use of an API key.
    Usage(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user with an account role (read unless given) and namespace permissions.
    Create {
        /// The user's email, their name in keygate.
        #[arg(long)]
        email: String,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// List users.
    List(PageArgs),
    /// Show one user.
    Get(IdArg),
    /// Delete a user and all their API keys.
    Delete(IdArg),
    /// Change a user's email, role, namespace permissions or disabled state.
    Update {
        /// The user's id.
        #[arg(long)]
        id: String,
        /// New email.
        #[arg(long)]
        email: Option<String>,
        #[command(flatten)]
        access: AccessArgs,
        /// Disable (true) or enable (false) the user and so all their keys.
        #[arg(long)]
        disabled: Option<bool>,
        /// Fail if the user changed since this version (default: the current one).
        #[arg(long)]
        resource_version: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceAccountCommand {
    /// Create a service account with an account role (read unless given) and namespace permissions.
    Create {
        /// The service account's name.
        #[arg(long)]
        name: String,
        /// What the service account is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// List service accounts.
    List(PageArgs),
    /// Show one service account.
    Get(IdArg),
    /// Delete a service account and all its API keys.
    Delete(IdArg),
    /// Change a service account's name, description, role, namespace permissions or disabled state.
    Update {
        /// The service account's id.
        #[arg(long)]
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        access: AccessArgs,
        /// Disable (true) or enable (false) the service account and so all its keys.
        #[arg(long)]
        disabled: Option<bool>,
        /// Fail if the service account changed since this version (default: the current one).
        #[arg(long)]
        resource_version: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Create a namespace (account admins).
    Create {
        /// Its name: lowercase letters, digits and '-'; it cannot be changed.
        #[arg(long)]
        name: String,
        /// What the namespace holds.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the namespaces you have access to.
    List(PageArgs),
    /// Show a namespace (by id or name).
    Get(IdArg),
    /// Delete a namespace (by id or name) and every permission granted on it.
    Delete(IdArg),
    /// Change a namespace's description (by id or name).
    Update {
        /// The namespace's id or name.
        #[arg(long)]
        id: String,
        /// New description.
        #[arg(long)]
        description: String,
        /// Fail if the namespace changed since this version (default: the current one).
        #[arg(long)]
        resource_version: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Show the account settings.
    Get,
    /// Change the account settings.
    Update {
        /// Turn every API key on or off at once.
        #[arg(long)]
        api_keys_enabled: Option<bool>,
        /// Longest key lifetime, e.g. 90d; 0s lets keys live forever.
        #[arg(long)]
        max_key_lifetime: Option<String>,
        /// Most API keys one user or service account may hold.
        #[arg(long)]
        max_keys_per_owner: Option<u32>,
        /// Fail if the settings changed since this version (default: the current one).
        #[arg(long)]
        resource_version: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The audit log, newest first.
    List(PageArgs),
}

/// A failure with the exit code it deserves. Its message is printed, so it
/// never holds a secret, and `Debug` shows it as it is.
#[derive(Debug)]
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

/// What becomes of arguments clap did not take: `--help` and `--version`
/// print to stdout and exit 0; a usage error prints clap's message and
/// exits 64 (EX_USAGE, as every other usage error here) where clap's
/// `exit` would give 2.
pub fn arguments_refused(refused: &clap::Error) -> ExitCode {
    // Nothing better to do when stderr or stdout is gone.
    let _ = refused.print();
    if refused.use_stderr() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve { config } => serve::run(&config),
        Command::Check { config } => serve::check(&config),
        command @ (Command::Bootstrap { .. }
        | Command::Backup { .. }
        | Command::Apikey {
            command: ApikeyCommand::Create { local: true, .. } | ApikeyCommand::Import { .. },
            ..
        }) => runtime().and_then(|rt| rt.block_on(local::run(command))),
        other => runtime().and_then(|rt| rt.block_on(commands::run(other))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// A key's lifetime on the command line: humantime's reading, with what a
/// lifetime looks like when it is not one (its own message names only the
/// character it stopped at).
fn key_lifetime(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}: a lifetime is a number and a unit, e.g. 12h, 30d or 1w 2d"))
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
