//! The key store: the `KeyStore` trait that the proxy's cache and the admin
//! API see, its model types, its backends (SQLite, embedded; PostgreSQL,
//! shared by replicas) and the change feed that keeps replicas' caches fresh.
//!
//! Every mutation is one transaction that also writes its audit event, so a
//! failed call leaves nothing half-done. Key policies (lifetime, per-owner
//! cap) are enforced here, inside that transaction, so concurrent creates can
//! never exceed them. The store never sees a secret: only digests.

pub mod feed;
mod model;
mod postgres;
mod queries;
mod rows;
mod sql_store;
mod sqlite;
mod writes;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub use model::*;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use writes::check_lifetime;

use crate::key::{Digest, KeyId};

/// What can go wrong in the store. The admin API maps these to responses in
/// `admin::error`; the proxy treats any of them as the store being unavailable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("resourceVersion {given} is stale: the current one is {current}")]
    StaleVersion { given: i64, current: i64 },
    #[error("{0}")]
    Policy(#[from] PolicyViolation),
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A read the store did not answer in time (a lock, a silent partition).
    #[error("store unavailable: no answer within {0:?}")]
    NoAnswer(std::time::Duration),
    #[error("store holds an invalid record: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// A key policy that refused a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    #[error("owner {owner_id} already has {max} API keys, the most allowed (maxKeysPerOwner)")]
    TooManyKeys { owner_id: String, max: u32 },
    #[error("an expiry time is required: keys may live at most {max_days} days (maxKeyLifetime)")]
    ExpiryRequired { max_days: u64 },
    #[error("expiry time is more than {max_days} days away (maxKeyLifetime)")]
    LifetimeTooLong { max_days: u64 },
    #[error("expiry time is in the past")]
    ExpiryInPast,
    #[error("owner {owner_id} ({owner_type}) does not exist")]
    UnknownOwner {
        owner_id: String,
        owner_type: OwnerType,
    },
    #[error("namespace {0:?} does not exist")]
    UnknownNamespace(String),
    #[error(
        "{name:?} is the last enabled account admin: make another user or service account an admin first, or nobody could manage the account"
    )]
    LastAdmin { name: String },
    #[error("refusing to bootstrap: {0} user(s) already exist; use an admin's API key instead")]
    UsersExist(u64),
    #[error("API key {0} was disabled by an account admin; only an account admin may enable it")]
    DisabledByAdmin(String),
}

/// Storage behind the proxy cache and the admin API. Object-safe, so both
/// hold an `Arc<dyn KeyStore>`.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// The proxy's one read: a key with its digests and owner.
    async fn find_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Which of `ids` are keys in the store (for letting go of what is kept
    /// per deleted key, such as its metric series).
    async fn existing_keys(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError>;

    async fn settings(&self) -> Result<AccountSettings, StoreError>;
    async fn update_settings(
        &self,
        actor: &Actor,
        api_keys_enabled: bool,
        max_key_lifetime: std::time::Duration,
        max_keys_per_owner: u32,
        expected_version: Option<i64>,
    ) -> Result<AccountSettings, StoreError>;

    async fn create_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        spec: PrincipalSpec,
    ) -> Result<Principal, StoreError>;
    async fn get_principal(
        &self,
        kind: OwnerType,
        id: &str,
    ) -> Result<Option<Principal>, StoreError>;
    async fn find_principal_by_name(
        &self,
        kind: OwnerType,
        name: &str,
    ) -> Result<Option<Principal>, StoreError>;
    async fn list_principals(
        &self,
        kind: OwnerType,
        page: &PageRequest,
    ) -> Result<Page<Principal>, StoreError>;
    /// Returns the updated principal and the ids of its keys, whose cached
    /// copies are now stale.
    async fn update_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
        spec: PrincipalSpec,
        expected_version: Option<i64>,
    ) -> Result<(Principal, Vec<KeyId>), StoreError>;
    /// Deletes a principal and all its keys; returns the deleted key ids.
    async fn delete_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
    ) -> Result<Vec<KeyId>, StoreError>;
    async fn count_principals(&self, kind: OwnerType) -> Result<u64, StoreError>;

    async fn create_namespace(
        &self,
        actor: &Actor,
        name: &str,
        description: &str,
    ) -> Result<Namespace, StoreError>;
    async fn get_namespace(&self, id_or_name: &str) -> Result<Option<Namespace>, StoreError>;
    /// A page of namespaces in id order: all of them (`names` is `None`),
    /// or only those named in `names` (filtered before paging, so every
    /// page but the last is full).
    async fn list_namespaces(
        &self,
        names: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<Namespace>, StoreError>;
    async fn update_namespace(
        &self,
        actor: &Actor,
        id: &str,
        description: &str,
        expected_version: Option<i64>,
    ) -> Result<Namespace, StoreError>;
    /// Deletes a namespace and every grant on it (principals' namespace
    /// access), so that a namespace created later under the same name
    /// starts with no grants. Keys' scopes keep the name: a scope only
    /// narrows what the owner may do, so it grants nothing by itself.
    /// Returns the keys of the principals that lost a grant (the access
    /// cached with them is stale).
    async fn delete_namespace(&self, actor: &Actor, id: &str) -> Result<Vec<KeyId>, StoreError>;

    /// Creates a key, enforcing the account's lifetime and per-owner cap in
    /// the same transaction as the insert.
    async fn create_key(&self, actor: &Actor, key: NewKey) -> Result<ApiKey, StoreError>;
    /// Creates the first account admin (a user, from `spec`) and `key` for
    /// it, in one transaction, refused with [`PolicyViolation::UsersExist`]
    /// when any user exists. `key`'s owner is replaced by the new admin.
    async fn bootstrap(
        &self,
        actor: &Actor,
        spec: PrincipalSpec,
        key: NewKey,
    ) -> Result<(Principal, ApiKey), StoreError>;
    /// Creates many keys in one transaction (migrating keys issued
    /// elsewhere): the same lifetime and per-owner cap as `create_key`, all
    /// or nothing, one audit event per owner.
    async fn import_keys(&self, actor: &Actor, keys: &[NewKey]) -> Result<u64, StoreError>;
    async fn get_key(&self, id: &KeyId) -> Result<Option<ApiKey>, StoreError>;
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError>;
    async fn update_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        update: KeyUpdate,
        expected_version: Option<i64>,
    ) -> Result<ApiKey, StoreError>;
    /// Replaces the key's digest; the old one keeps working until `grace_until`.
    async fn rotate_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        digest: Digest,
        grace_until: SystemTime,
    ) -> Result<ApiKey, StoreError>;
    async fn delete_key(&self, actor: &Actor, id: &KeyId) -> Result<(), StoreError>;

    /// Adds a batch of usage counts (one transaction for the batch), once
    /// per `flush`: the same transaction records `flush` as its stream's
    /// latest, and a flush whose stream has reached its sequence already
    /// writes nothing ([`Recorded::AlreadyApplied`]). So a batch whose
    /// answer was lost may be sent again, as it was, without counting twice.
    /// Streams not heard from for [`USAGE_STREAM_RETENTION`] are forgotten.
    async fn record_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError>;

    async fn list_audit(&self, page: &PageRequest) -> Result<Page<AuditEvent>, StoreError>;

    /// The change feed: changes committed after `watermark`, oldest first,
    /// at most [`CHANGE_BATCH`] of them, and the watermark to ask with next.
    /// That is the last returned change's `seq` or, when nothing is newer,
    /// the feed's head, which is below `watermark` only if the store was
    /// replaced (restored from a backup): the caller must then drop its whole
    /// cache. `changes_since(i64::MAX)` thus reads the head.
    async fn changes_since(&self, watermark: i64) -> Result<(i64, Vec<Change>), StoreError>;

    /// Subscribes to change announcements, on backends that push them
    /// (PostgreSQL `LISTEN`); `None` where only polling works (SQLite).
    async fn subscribe(&self) -> Result<Option<Box<dyn ChangeSubscription>>, StoreError> {
        Ok(None)
    }

    /// Closes the store's connections when the process is done with it
    /// (`serve` after its drain and last usage flush, a local CLI command
    /// when it has finished). Calls made after it fail as the store being
    /// unavailable.
    async fn close(&self);
}

/// What a change subscription delivers. Announcements only say *that*
/// something changed; the feed reads *what* with `changes_since`, so a lost
/// announcement costs latency, never correctness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// A change committed (its `seq`, when the payload carried one).
    Changed(Option<i64>),
    /// The connection was lost and is back: announcements may have been
    /// missed meanwhile, so poll now.
    Reconnected,
}

/// A live subscription to change announcements.
#[async_trait]
pub trait ChangeSubscription: Send {
    /// Waits for the next announcement. An error means the connection is
    /// gone and could not be re-established; calling again retries.
    async fn next(&mut self) -> Result<Announcement, StoreError>;
}

/// Opens the store named by a URL (`sqlite:`, `postgres:` or `postgresql:`),
/// creating and migrating it if needed.
pub async fn open(url: &str) -> Result<Arc<dyn KeyStore>, StoreError> {
    // Config validation checks this first; this guards callers that open a
    // store without a validated config (the local CLI's --store).
    check_url(url)
        .map_err(|rule| StoreError::Unavailable(sqlx::Error::Configuration(rule.into())))?;
    match url.split_once(':').map(|(scheme, _)| scheme) {
        Some("sqlite") => Ok(Arc::new(SqliteStore::open(url).await?)),
        Some("postgres" | "postgresql") => Ok(Arc::new(PostgresStore::open(url).await?)),
        // Config validation refuses other schemes first; this guards callers
        // that open a store without a validated config (the local CLI).
        _ => Err(StoreError::Unavailable(sqlx::Error::Configuration(
            "the store URL must start with sqlite:, postgres: or postgresql:".into(),
        ))),
    }
}

/// The migrations of this build, set to run against a store that may have
/// newer ones: during a rolling upgrade a replica still on the previous
/// keygate may restart after an upgraded one migrated the store, and must
/// start (sqlx refuses, by default, a store holding a migration it does not
/// know). That is safe because migrations from `changes_created` on only
/// add (tables, columns with defaults, indexes; tests/migrations.rs holds
/// them to it), so older code reads and writes a newer schema as it did
/// its own; a migration that could not be read so would have to come with
/// its own upgrade notes.
fn tolerant(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// Says, once at open, that the store was migrated by a newer keygate than
/// this one (`applied` is the newest migration the store holds).
fn note_newer_schema(migrator: &sqlx::migrate::Migrator, applied: Option<i64>) {
    let known = migrator.iter().map(|m| m.version).max();
    if let (Some(applied), Some(known)) = (applied, known) {
        if applied > known {
            tracing::warn!(
                store_migration = applied,
                newest_known = known,
                "the key store was migrated by a newer keygate; serving, as during a rolling upgrade, but this replica should be upgraded"
            );
        }
    }
}

/// Why the store named by `url` could not be opened, found from the URL
/// alone (no file or connection is opened): what [`open`] would refuse as
/// the configuration's fault. The reason never repeats the URL, which may
/// hold a password.
pub fn check_url(url: &str) -> Result<(), String> {
    let refused = |e: sqlx::Error| format!("not a valid store URL: {e}");
    match url.split_once(':').map(|(scheme, _)| scheme) {
        Some("sqlite") => {
            sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(refused)?;
            // No file, no store: each pooled connection (one writer, four
            // readers) would get a temporary database of its own, the
            // readers' never migrated ("no such table").
            let rest = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let in_memory = form_urlencoded::parse(query.as_bytes())
                .any(|(name, value)| name == "mode" && value == "memory");
            if path.is_empty() || path == ":memory:" || in_memory {
                return Err(
                    "must name a database file (sqlite://PATH): with an empty path or \
                            in memory, each of the store's connections would get a database \
                            of its own"
                        .into(),
                );
            }
        }
        Some("postgres" | "postgresql") => {
            // sqlx ignores a parameter it does not know, and logs it with its
            // value, which may be a secret (libpq's `sslpassword`, a
            // misspelt `password`); libpq's others (`connect_timeout`,
            // `target_session_attrs`) would silently not apply. So only
            // what sqlx takes passes, and the refusal names the parameter,
            // never its value.
            let query = url.split_once('?').map_or("", |(_, query)| query);
            for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                let name = form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .map(|(name, _)| name.into_owned())
                    .unwrap_or_default();
                if is_postgres_parameter(&name) {
                    continue;
                }
                if names_a_password(pair) {
                    return Err(format!(
                        "the {name:?} parameter is not supported: use an unencrypted \
                         client key (sslkey), or the password in the URL's userinfo or \
                         the `password` parameter"
                    ));
                }
                return Err(format!(
                    "the {name:?} parameter is not supported; the PostgreSQL driver takes \
                     {}",
                    POSTGRES_PARAMETERS.join(", ")
                ));
            }
            // After that check: sqlx logs what it ignores, values included.
            sqlx::postgres::PgConnectOptions::from_str(url).map_err(refused)?;
        }
        _ => return Err("the scheme must be sqlite:, postgres: or postgresql:".into()),
    }
    Ok(())
}

/// The query parameters sqlx's PostgreSQL driver reads from a URL (its
/// `options/parse.rs`), besides `options[NAME]`.
const POSTGRES_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

fn is_postgres_parameter(name: &str) -> bool {
    POSTGRES_PARAMETERS.contains(&name) || (name.starts_with("options[") && name.ends_with(']'))
}

/// The store URL as it may be logged: any password replaced by `***`, the
/// userinfo's and that of a query parameter naming one (libpq's `password`
/// and `sslpassword`, which a PostgreSQL URL may carry instead).
pub fn display_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut shown = without_userinfo_password(base);
    if let Some(query) = query {
        shown.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                shown.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) if names_a_password(pair) => {
                    shown.push_str(name);
                    shown.push_str("=***");
                }
                _ => shown.push_str(pair),
            }
        }
    }
    shown
}

fn without_userinfo_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Whether a `name=value` query pair's name, decoded as the driver decodes
/// it (`pass%77ord` is `password`), names a password: libpq's `password`
/// and `sslpassword`, and any spelling of another.
fn names_a_password(pair: &str) -> bool {
    form_urlencoded::parse(pair.as_bytes())
        .next()
        .is_some_and(|(name, _)| name.to_ascii_lowercase().contains("password"))
}

/// Most changes one `changes_since` call returns.
pub const CHANGE_BATCH: i64 = 1000;
/// How many of the newest changes the feed keeps; a replica that falls
/// further behind than this drops its whole cache instead.
pub const CHANGE_RETENTION: i64 = 10_000;

/// How long a usage flush stream (a keygate process) may go unheard before
/// its row in `usage_flushes` is deleted. Far above how long a flush is
/// retried, so no flush still being sent loses its record.
pub const USAGE_STREAM_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a store deletes the rows of idle flush streams, at most.
pub const USAGE_STREAM_SWEEP: Duration = Duration::from_secs(3600);

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_url_masks_every_password() {
        for (url, shown) in [
            (
                "postgres://postgres@127.0.0.1:5432/db?password=hunter2secret&application_name=kg",
                "postgres://postgres@127.0.0.1:5432/db?password=***&application_name=kg",
            ),
            (
                "postgres://u:hunter2secret@h/db?sslmode=require&sslpassword=hunter2secret",
                "postgres://u:***@h/db?sslmode=require&sslpassword=***",
            ),
            // Decoded as sqlx decodes it; no path before the query.
            (
                "postgres://h?user=u&pass%77ord=hunter2secret",
                "postgres://h?user=u&pass%77ord=***",
            ),
            (
                "postgresql://u@h/db?PASSWORD=hunter2secret",
                "postgresql://u@h/db?PASSWORD=***",
            ),
            (
                "postgres://u@h/db?sslmode=require",
                "postgres://u@h/db?sslmode=require",
            ),
            (
                "sqlite://keygate.db?mode=rwc",
                "sqlite://keygate.db?mode=rwc",
            ),
            ("sqlite://keygate.db", "sqlite://keygate.db"),
        ] {
            assert_eq!(display_url(url), shown, "{url}");
            assert!(!display_url(url).contains("hunter2secret"));
        }
    }

    #[test]
    fn a_password_parameter_the_driver_ignores_is_refused_without_its_value() {
        let rule = check_url("postgres://u@h/db?sslpassword=hunter2secret").unwrap_err();
        assert!(
            rule.contains("sslpassword") && !rule.contains("hunter2secret"),
            "{rule}"
        );
        check_url("postgres://u@h/db?password=hunter2secret&sslmode=prefer").expect("password");
    }

    #[test]
    fn parameters_the_driver_would_ignore_are_refused_by_name() {
        for (url, name) in [
            // Misspelt: sqlx would log it, value included.
            ("postgres://u@h/db?pasword=hunter2secret", "pasword"),
            ("postgres://u@h/db?PASSWORD=hunter2secret", "PASSWORD"),
            // libpq's, which sqlx would silently not apply.
            ("postgres://u@h/db?connect_timeout=5", "connect_timeout"),
            (
                "postgres://u@h/db?sslmode=require&target_session_attrs=read-write",
                "target_session_attrs",
            ),
        ] {
            let rule = check_url(url).unwrap_err();
            assert!(
                rule.contains(&format!("{name:?}")) && !rule.contains("hunter2secret"),
                "{url}: {rule}"
            );
        }
        for url in [
            "postgres://u@h/db?sslmode=require&application_name=kg&statement-cache-capacity=10",
            "postgresql://h/db?user=u&options[search_path]=keygate&host=10.0.0.1&port=5433",
            "postgres://u@h/db?",
        ] {
            check_url(url).unwrap_or_else(|rule| panic!("{url}: {rule}"));
        }
    }
}
