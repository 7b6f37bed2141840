//! The embedded SQLite store: one file in WAL mode, created and migrated on
//! first start.
//!
//! Writes go through a pool of exactly one connection and each opens with
//! `BEGIN IMMEDIATE`, so a read-check-write transaction (the per-owner key
//! cap) is atomic against every other writer, in this process or another.
//! Reads use a separate pool and never wait for writers (WAL).
//!
//! SQLite has no notifications: the change feed here is polled, which is
//! also what lets several processes on one file keep their caches in step.
//! The row types and pure helpers are shared with the PostgreSQL backend.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, SqliteConnection, SqlitePool, Transaction};

use super::*;
use crate::key::{random_id, Digest, KeyId};

/// Keys per statement that binds parameters per key (usage UPDATEs bind
/// three each): under SQLite's default limit on bound parameters in older
/// builds (999).
const KEYS_PER_STATEMENT: usize = 300;

pub struct SqliteStore {
    /// Read-only connections for lookups and listings.
    reader: SqlitePool,
    /// The single writer connection: serialises every change.
    writer: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `sqlite://PATH` and runs
    /// the migrations.
    ///
    /// On a read-only filesystem a WAL database opens read-only only while
    /// its `-wal` and `-shm` files exist (SQLite cannot create them), and
    /// they exist or not depending on how the last writer closed. When they
    /// do not, the WAL holds nothing to replay, so the file alone is the
    /// whole database: it is opened `immutable` instead. Keys verify either
    /// way; writes fail as the store being unavailable.
    pub async fn open(url: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        match Self::connect(options.clone()).await {
            Err(StoreError::Unavailable(error))
                if cannot_open(&error) && !wal_file(&options).exists() =>
            {
                let frozen = SqliteConnectOptions::from_str(url)?
                    .read_only(true)
                    .immutable(true);
                // Not there at all, or not readable either: the first error
                // says so best.
                let store = Self::connect(frozen)
                    .await
                    .map_err(|_| StoreError::Unavailable(error))?;
                tracing::warn!(
                    "the key store's directory is not writable: opened it read-only and immutable; \
                     keys verify, admin writes fail until it is writable and keygate restarts"
                );
                Ok(store)
            }
            opened => opened,
        }
    }

    /// The writer (which runs the migrations) and the readers.
    async fn connect(options: SqliteConnectOptions) -> Result<SqliteStore, StoreError> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|e| StoreError::Corrupt(format!("migration failed: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { reader, writer })
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Sqlite>, StoreError> {
        match self.writer.begin_with("BEGIN IMMEDIATE").await {
            // When SQLite rolls a transaction back by itself (SQLITE_FULL or
            // an I/O error during COMMIT), sqlx's own transaction depth stays
            // at 1 and every later BEGIN on the one writer connection fails
            // with this error: writes would stay broken after the disk has
            // room again. Replace the wedged connection and try once more.
            Err(sqlx::Error::InvalidSavePointStatement) => {
                let mut wedged = self.writer.acquire().await?;
                wedged.close_on_drop();
                drop(wedged);
                tracing::warn!("replaced the SQLite writer connection after a failed transaction");
                Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
            }
            other => Ok(other?),
        }
    }
}

/// SQLITE_CANTOPEN: the file, or a file it needs beside it, cannot be opened.
fn cannot_open(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("14"))
}

/// The database's write-ahead log beside it.
fn wal_file(options: &SqliteConnectOptions) -> std::path::PathBuf {
    let mut name = options.get_filename().as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

// === rows ===

#[derive(FromRow)]
pub(super) struct PrincipalRow {
    id: String,
    kind: String,
    name: String,
    description: String,
    account_role: String,
    namespace_access: String,
    disabled: bool,
    resource_version: i64,
    created_ms: i64,
    modified_ms: i64,
}

pub(super) fn owner_type(text: &str) -> Result<OwnerType, StoreError> {
    text.parse()
        .map_err(|()| StoreError::Corrupt(format!("owner type {text:?}")))
}

pub(super) fn access(role: &str, namespaces: &str) -> Result<Access, StoreError> {
    let account_role = role
        .parse()
        .map_err(|()| StoreError::Corrupt(format!("account role {role:?}")))?;
    let namespaces: BTreeMap<String, Permission> = serde_json::from_str(namespaces)
        .map_err(|e| StoreError::Corrupt(format!("namespace access: {e}")))?;
    Ok(Access {
        account_role,
        namespaces,
    })
}

/// Of `holders` (principal id, `namespace_access` JSON), those with a grant
/// on `namespace`, each with its access JSON without that grant.
pub(super) fn without_grants_on(
    holders: Vec<(String, String)>,
    namespace: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut changed = Vec::new();
    for (principal, access) in holders {
        let mut grants: BTreeMap<String, Permission> = serde_json::from_str(&access)
            .map_err(|e| StoreError::Corrupt(format!("namespace access: {e}")))?;
        if grants.remove(namespace).is_some() {
            let stripped = serde_json::to_string(&grants).unwrap_or_else(|_| "{}".into());
            changed.push((principal, stripped));
        }
    }
    Ok(changed)
}

pub(super) fn namespace_access_json(access: &Access) -> String {
    serde_json::to_string(&access.namespaces).unwrap_or_else(|_| "{}".into())
}

impl TryFrom<PrincipalRow> for Principal {
    type Error = StoreError;
    fn try_from(r: PrincipalRow) -> Result<Principal, StoreError> {
        Ok(Principal {
            kind: owner_type(&r.kind)?,
            access: access(&r.account_role, &r.namespace_access)?,
            id: r.id,
            name: r.name,
            description: r.description,
            disabled: r.disabled,
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
        })
    }
}

#[derive(FromRow)]
pub(super) struct NamespaceRow {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) description: String,
    pub(super) resource_version: i64,
    pub(super) created_ms: i64,
    pub(super) modified_ms: i64,
}

impl From<NamespaceRow> for Namespace {
    fn from(r: NamespaceRow) -> Namespace {
        Namespace {
            id: r.id,
            name: r.name,
            description: r.description,
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
        }
    }
}

pub(super) const KEY_COLUMNS: &str =
    "k.id, k.display_name, k.description, k.owner_id, p.kind AS owner_type, \
     k.namespaces, k.expiry_ms, k.disabled, k.previous_valid_until_ms, k.resource_version, \
     k.created_ms, k.modified_ms, k.last_used_ms, k.request_count \
     FROM api_keys k JOIN principals p ON p.id = k.owner_id";

#[derive(FromRow)]
pub(super) struct KeyRow {
    id: String,
    display_name: String,
    description: String,
    owner_id: String,
    owner_type: String,
    namespaces: String,
    expiry_ms: Option<i64>,
    disabled: bool,
    previous_valid_until_ms: Option<i64>,
    resource_version: i64,
    created_ms: i64,
    modified_ms: i64,
    last_used_ms: Option<i64>,
    request_count: i64,
}

pub(super) fn key_id(text: &str) -> Result<KeyId, StoreError> {
    KeyId::parse(text).map_err(|_| StoreError::Corrupt(format!("key id {text:?}")))
}

pub(super) fn namespace_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("key namespaces: {e}")))
}

impl TryFrom<KeyRow> for ApiKey {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: key_id(&r.id)?,
            owner_type: owner_type(&r.owner_type)?,
            namespaces: namespace_list(&r.namespaces)?,
            display_name: r.display_name,
            description: r.description,
            owner_id: r.owner_id,
            expiry: r.expiry_ms.map(from_ms),
            disabled: r.disabled,
            previous_secret_valid_until: r.previous_valid_until_ms.map(from_ms),
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
            last_used: r.last_used_ms.map(from_ms),
            request_count: u64::try_from(r.request_count).unwrap_or(0),
        })
    }
}

#[derive(FromRow)]
pub(super) struct KeyRecordRow {
    id: String,
    secret_digest: Vec<u8>,
    previous_digest: Option<Vec<u8>>,
    previous_valid_until_ms: Option<i64>,
    disabled: bool,
    expiry_ms: Option<i64>,
    namespaces: String,
    owner_id: String,
    owner_type: String,
    owner_name: String,
    account_role: String,
    namespace_access: String,
    owner_disabled: bool,
}

pub(super) fn digest(bytes: &[u8]) -> Result<Digest, StoreError> {
    Digest::from_slice(bytes).ok_or_else(|| StoreError::Corrupt("digest is not 32 bytes".into()))
}

impl TryFrom<KeyRecordRow> for KeyRecord {
    type Error = StoreError;
    fn try_from(r: KeyRecordRow) -> Result<KeyRecord, StoreError> {
        let previous = match (r.previous_digest, r.previous_valid_until_ms) {
            (Some(d), Some(until)) => Some((digest(&d)?, from_ms(until))),
            _ => None,
        };
        Ok(KeyRecord {
            id: key_id(&r.id)?,
            digest: digest(&r.secret_digest)?,
            previous,
            disabled: r.disabled,
            expiry: r.expiry_ms.map(from_ms),
            namespaces: namespace_list(&r.namespaces)?,
            owner_id: r.owner_id,
            owner_type: owner_type(&r.owner_type)?,
            owner_name: r.owner_name,
            owner_access: access(&r.account_role, &r.namespace_access)?,
            owner_disabled: r.owner_disabled,
        })
    }
}

#[derive(FromRow)]
pub(super) struct SettingsRow {
    api_keys_enabled: bool,
    max_key_lifetime_secs: i64,
    max_keys_per_owner: i64,
    resource_version: i64,
    modified_ms: i64,
}

impl From<SettingsRow> for AccountSettings {
    fn from(r: SettingsRow) -> AccountSettings {
        AccountSettings {
            api_keys_enabled: r.api_keys_enabled,
            max_key_lifetime: Duration::from_secs(
                u64::try_from(r.max_key_lifetime_secs).unwrap_or(0),
            ),
            max_keys_per_owner: u32::try_from(r.max_keys_per_owner).unwrap_or(0),
            resource_version: r.resource_version,
            modified: from_ms(r.modified_ms),
        }
    }
}

#[derive(FromRow)]
pub(super) struct AuditRow {
    pub(super) seq: i64,
    pub(super) id: String,
    pub(super) time_ms: i64,
    pub(super) actor_id: String,
    pub(super) actor_type: String,
    pub(super) actor_name: String,
    pub(super) action: String,
    pub(super) target_type: String,
    pub(super) target_id: String,
    pub(super) detail: String,
}

#[derive(FromRow)]
pub(super) struct ChangeRow {
    seq: i64,
    time_ms: i64,
    key_ids: String,
    settings: bool,
}

impl TryFrom<ChangeRow> for Change {
    type Error = StoreError;
    fn try_from(r: ChangeRow) -> Result<Change, StoreError> {
        let ids: Vec<String> = serde_json::from_str(&r.key_ids)
            .map_err(|e| StoreError::Corrupt(format!("change key ids: {e}")))?;
        Ok(Change {
            seq: r.seq,
            time: from_ms(r.time_ms),
            key_ids: ids.iter().map(|id| key_id(id)).collect::<Result<_, _>>()?,
            settings: r.settings,
        })
    }
}

pub(super) fn key_ids_json(keys: &[KeyId]) -> String {
    serde_json::to_string(&keys.iter().map(KeyId::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

// === helpers used inside a write transaction ===

/// Appends to the change feed inside the mutation's transaction, so the
/// change is visible exactly when the mutation commits. `MAX(seq) + 1` is
/// gapless and in commit order because every write goes through the one
/// writer connection under `BEGIN IMMEDIATE`.
async fn record_change(
    tx: &mut SqliteConnection,
    keys: &[KeyId],
    settings: bool,
) -> Result<(), StoreError> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO changes (seq, time_ms, key_ids, settings) \
         SELECT COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM changes RETURNING seq",
    )
    .bind(to_ms(SystemTime::now()))
    .bind(key_ids_json(keys))
    .bind(settings)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM changes WHERE seq <= ?")
        .bind(seq - CHANGE_RETENTION)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Checks `expected` against the row's current version.
pub(super) fn check_version(expected: Option<i64>, current: i64) -> Result<(), StoreError> {
    match expected {
        Some(given) if given != current => Err(StoreError::StaleVersion { given, current }),
        _ => Ok(()),
    }
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub(super) fn page_size(page: &PageRequest) -> i64 {
    i64::from(page.size.clamp(1, MAX_PAGE_SIZE))
}

/// Cuts the extra row fetched to learn whether a next page exists.
pub(super) fn paginate<T>(mut items: Vec<T>, size: i64, cursor: impl Fn(&T) -> String) -> Page<T> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let next = if items.len() > size {
        items.truncate(size);
        items.last().map(cursor)
    } else {
        None
    };
    Page { items, next }
}

/// Refuses a change that left no enabled account admin; the caller's
/// transaction then rolls back when dropped. Writers are serialised
/// (`BEGIN IMMEDIATE`), so two changes cannot each leave the other's admin.
async fn keep_an_admin(tx: &mut SqliteConnection, changed: &Principal) -> Result<(), StoreError> {
    let any_left: bool = sqlx::query_scalar(ANY_ENABLED_ADMIN)
        .fetch_one(&mut *tx)
        .await?;
    admin_left(any_left, changed)
}

pub(super) fn principal_kind(kind: OwnerType) -> &'static str {
    match kind {
        OwnerType::User => "user",
        OwnerType::ServiceAccount => "service account",
    }
}

async fn owner_key_ids(
    tx: &mut SqliteConnection,
    owner_id: &str,
) -> Result<Vec<KeyId>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM api_keys WHERE owner_id = ?")
        .bind(owner_id)
        .fetch_all(tx)
        .await?;
    ids.iter().map(|id| key_id(id)).collect()
}

async fn require_namespaces<'a>(
    tx: &mut SqliteConnection,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), StoreError> {
    for name in names {
        let found: Option<String> = sqlx::query_scalar("SELECT id FROM namespaces WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(PolicyViolation::UnknownNamespace(name.clone()).into());
        }
    }
    Ok(())
}

async fn key_in(tx: &mut SqliteConnection, id: &KeyId) -> Result<ApiKey, StoreError> {
    let row: Option<KeyRow> = sqlx::query_as(&format!("SELECT {KEY_COLUMNS} WHERE k.id = ?"))
        .bind(id.as_str())
        .fetch_optional(tx)
        .await?;
    row.ok_or_else(|| StoreError::NotFound {
        kind: "API key",
        id: id.to_string(),
    })?
    .try_into()
}

fn max_days(d: Duration) -> u64 {
    d.as_secs().div_ceil(86_400)
}

/// The lifetime policy: an expiry is required (unless the limit is zero), in
/// the future, and within the limit.
pub(super) fn check_lifetime(
    settings: &AccountSettings,
    expiry: Option<SystemTime>,
) -> Result<(), PolicyViolation> {
    let now = SystemTime::now();
    let max = settings.max_key_lifetime;
    match expiry {
        Some(at) if at <= now => Err(PolicyViolation::ExpiryInPast),
        // A small allowance for the client's clock and the request's flight.
        Some(at) if !max.is_zero() && at > now + max + Duration::from_secs(60) => {
            Err(PolicyViolation::LifetimeTooLong {
                max_days: max_days(max),
            })
        }
        None if !max.is_zero() => Err(PolicyViolation::ExpiryRequired {
            max_days: max_days(max),
        }),
        _ => Ok(()),
    }
}

async fn settings_in(tx: &mut SqliteConnection) -> Result<AccountSettings, StoreError> {
    let row: SettingsRow = sqlx::query_as("SELECT * FROM account_settings WHERE id = 1")
        .fetch_one(tx)
        .await?;
    Ok(row.into())
}

// === impl KeyStore for SqliteStore ===

#[async_trait]
impl KeyStore for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn find_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        queries::key_record(&self.reader, id).await
    }

    async fn existing_keys(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError> {
        let mut existing = Vec::new();
        for chunk in ids.chunks(KEYS_PER_STATEMENT) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT id FROM api_keys WHERE id IN ({marks})");
            // Not kept in the statement cache: the text varies with the chunk.
            let mut query = sqlx::query_scalar::<_, String>(&sql).persistent(false);
            for id in chunk {
                query = query.bind(id.as_str());
            }
            let found = query.fetch_all(&self.reader).await?;
            existing.extend(found.iter().filter_map(|id| KeyId::parse(id).ok()));
        }
        Ok(existing)
    }

    async fn settings(&self) -> Result<AccountSettings, StoreError> {
        let row: SettingsRow = sqlx::query_as("SELECT * FROM account_settings WHERE id = 1")
            .fetch_one(&self.reader)
            .await?;
        Ok(row.into())
    }

    async fn update_settings(
        &self,
        actor: &Actor,
        api_keys_enabled: bool,
        max_key_lifetime: Duration,
        max_keys_per_owner: u32,
        expected_version: Option<i64>,
    ) -> Result<AccountSettings, StoreError> {
        let mut tx = self.begin().await?;
        let current = settings_in(&mut tx).await?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE account_settings SET api_keys_enabled = ?, max_key_lifetime_secs = ?, \
             max_keys_per_owner = ?, resource_version = resource_version + 1, modified_ms = ? \
             WHERE id = 1",
        )
        .bind(api_keys_enabled)
        .bind(i64::try_from(max_key_lifetime.as_secs()).unwrap_or(i64::MAX))
        .bind(i64::from(max_keys_per_owner))
        .bind(to_ms(SystemTime::now()))
        .execute(&mut *tx)
        .await?;
        let detail = json!({
            "apiKeysEnabled": api_keys_enabled,
            "maxKeyLifetimeSecs": max_key_lifetime.as_secs(),
            "maxKeysPerOwner": max_keys_per_owner,
        });
        queries::audit(
            &mut *tx,
            actor,
            "account.settings.update",
            "account",
            "settings",
            detail,
        )
        .await?;
        record_change(&mut tx, &[], true).await?;
        let updated = settings_in(&mut tx).await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn create_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        spec: PrincipalSpec,
    ) -> Result<Principal, StoreError> {
        let mut tx = self.begin().await?;
        require_namespaces(&mut tx, spec.access.namespaces.keys()).await?;
        let id = random_id();
        let now = to_ms(SystemTime::now());
        let inserted = sqlx::query(
            "INSERT INTO principals (id, kind, name, description, account_role, namespace_access, \
             disabled, created_ms, modified_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(kind.as_str())
        .bind(&spec.name)
        .bind(&spec.description)
        .bind(spec.access.account_role.as_str())
        .bind(namespace_access_json(&spec.access))
        .bind(spec.disabled)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            return Err(if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    kind: principal_kind(kind),
                    name: spec.name,
                }
            } else {
                e.into()
            });
        }
        let detail = json!({ "name": spec.name, "role": spec.access.account_role.as_str() });
        queries::audit(
            &mut *tx,
            actor,
            &format!("{kind}.create"),
            kind.as_str(),
            &id,
            detail,
        )
        .await?;
        let created = queries::principal_in(&mut *tx, kind, &id).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn get_principal(
        &self,
        kind: OwnerType,
        id: &str,
    ) -> Result<Option<Principal>, StoreError> {
        queries::principal_by(&self.reader, "id", kind, id).await
    }

    async fn find_principal_by_name(
        &self,
        kind: OwnerType,
        name: &str,
    ) -> Result<Option<Principal>, StoreError> {
        queries::principal_by(&self.reader, "name", kind, name).await
    }

    async fn list_principals(
        &self,
        kind: OwnerType,
        page: &PageRequest,
    ) -> Result<Page<Principal>, StoreError> {
        queries::list_principals(&self.reader, kind, page).await
    }

    async fn update_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
        spec: PrincipalSpec,
        expected_version: Option<i64>,
    ) -> Result<(Principal, Vec<KeyId>), StoreError> {
        let mut tx = self.begin().await?;
        let current = queries::principal_in(&mut *tx, kind, id).await?;
        check_version(expected_version, current.resource_version)?;
        require_namespaces(&mut tx, spec.access.namespaces.keys()).await?;
        let updated = sqlx::query(
            "UPDATE principals SET name = ?, description = ?, account_role = ?, \
             namespace_access = ?, disabled = ?, resource_version = resource_version + 1, \
             modified_ms = ? WHERE id = ?",
        )
        .bind(&spec.name)
        .bind(&spec.description)
        .bind(spec.access.account_role.as_str())
        .bind(namespace_access_json(&spec.access))
        .bind(spec.disabled)
        .bind(to_ms(SystemTime::now()))
        .bind(id)
        .execute(&mut *tx)
        .await;
        if let Err(e) = updated {
            return Err(if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    kind: principal_kind(kind),
                    name: spec.name,
                }
            } else {
                e.into()
            });
        }
        if current.is_enabled_admin() {
            keep_an_admin(&mut tx, &current).await?;
        }
        let detail = json!({
            "name": spec.name,
            "role": spec.access.account_role.as_str(),
            "disabled": spec.disabled,
        });
        queries::audit(
            &mut *tx,
            actor,
            &format!("{kind}.update"),
            kind.as_str(),
            id,
            detail,
        )
        .await?;
        let principal = queries::principal_in(&mut *tx, kind, id).await?;
        let keys = owner_key_ids(&mut tx, id).await?;
        record_change(&mut tx, &keys, false).await?;
        tx.commit().await?;
        Ok((principal, keys))
    }

    async fn delete_principal(
        &self,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
    ) -> Result<Vec<KeyId>, StoreError> {
        let mut tx = self.begin().await?;
        let principal = queries::principal_in(&mut *tx, kind, id).await?;
        let keys = owner_key_ids(&mut tx, id).await?;
        sqlx::query("DELETE FROM api_keys WHERE owner_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM principals WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if principal.is_enabled_admin() {
            keep_an_admin(&mut tx, &principal).await?;
        }
        let detail = json!({
            "name": principal.name,
            "deletedKeys": keys.iter().map(KeyId::as_str).collect::<Vec<_>>(),
        });
        queries::audit(
            &mut *tx,
            actor,
            &format!("{kind}.delete"),
            kind.as_str(),
            id,
            detail,
        )
        .await?;
        record_change(&mut tx, &keys, false).await?;
        tx.commit().await?;
        Ok(keys)
    }

    async fn count_principals(&self, kind: OwnerType) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM principals WHERE kind = ?")
            .bind(kind.as_str())
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn create_namespace(
        &self,
        actor: &Actor,
        name: &str,
        description: &str,
    ) -> Result<Namespace, StoreError> {
        let mut tx = self.begin().await?;
        let id = random_id();
        let now = to_ms(SystemTime::now());
        let inserted = sqlx::query(
            "INSERT INTO namespaces (id, name, description, created_ms, modified_ms) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(name)
        .bind(description)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            return Err(if is_unique_violation(&e) {
                StoreError::AlreadyExists {
                    kind: "namespace",
                    name: name.into(),
                }
            } else {
                e.into()
            });
        }
        queries::audit(
            &mut *tx,
            actor,
            "namespace.create",
            "namespace",
            &id,
            json!({ "name": name }),
        )
        .await?;
        let row: NamespaceRow = sqlx::query_as("SELECT * FROM namespaces WHERE id = ?")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.into())
    }

    async fn get_namespace(&self, id_or_name: &str) -> Result<Option<Namespace>, StoreError> {
        queries::namespace(&self.reader, id_or_name).await
    }

    async fn list_namespaces(&self, page: &PageRequest) -> Result<Page<Namespace>, StoreError> {
        queries::list_namespaces(&self.reader, page).await
    }

    async fn update_namespace(
        &self,
        actor: &Actor,
        id: &str,
        description: &str,
        expected_version: Option<i64>,
    ) -> Result<Namespace, StoreError> {
        let mut tx = self.begin().await?;
        let current: Option<NamespaceRow> = sqlx::query_as("SELECT * FROM namespaces WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let current = current.ok_or_else(|| StoreError::NotFound {
            kind: "namespace",
            id: id.into(),
        })?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE namespaces SET description = ?, resource_version = resource_version + 1, \
             modified_ms = ? WHERE id = ?",
        )
        .bind(description)
        .bind(to_ms(SystemTime::now()))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        queries::audit(
            &mut *tx,
            actor,
            "namespace.update",
            "namespace",
            id,
            json!({ "name": current.name }),
        )
        .await?;
        let row: NamespaceRow = sqlx::query_as("SELECT * FROM namespaces WHERE id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.into())
    }

    async fn delete_namespace(&self, actor: &Actor, id: &str) -> Result<Vec<KeyId>, StoreError> {
        let mut tx = self.begin().await?;
        let name: Option<String> = sqlx::query_scalar("SELECT name FROM namespaces WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let name = name.ok_or_else(|| StoreError::NotFound {
            kind: "namespace",
            id: id.into(),
        })?;
        sqlx::query("DELETE FROM namespaces WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let holders: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, namespace_access FROM principals WHERE namespace_access <> '{}' ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let (mut revoked, mut keys) = (Vec::new(), Vec::new());
        for (principal, stripped) in without_grants_on(holders, &name)? {
            sqlx::query(
                "UPDATE principals SET namespace_access = ?, \
                 resource_version = resource_version + 1, modified_ms = ? WHERE id = ?",
            )
            .bind(stripped)
            .bind(to_ms(SystemTime::now()))
            .bind(&principal)
            .execute(&mut *tx)
            .await?;
            keys.extend(owner_key_ids(&mut tx, &principal).await?);
            revoked.push(principal);
        }
        queries::audit(
            &mut *tx,
            actor,
            "namespace.delete",
            "namespace",
            id,
            json!({ "name": name, "grantsRemovedFrom": revoked }),
        )
        .await?;
        if !keys.is_empty() {
            record_change(&mut tx, &keys, false).await?;
        }
        tx.commit().await?;
        Ok(keys)
    }

    async fn create_key(&self, actor: &Actor, key: NewKey) -> Result<ApiKey, StoreError> {
        let mut tx = self.begin().await?;
        let settings = settings_in(&mut tx).await?;
        check_lifetime(&settings, key.expiry)?;
        let owner_kind: Option<String> =
            sqlx::query_scalar("SELECT kind FROM principals WHERE id = ?")
                .bind(&key.owner_id)
                .fetch_optional(&mut *tx)
                .await?;
        if owner_kind.as_deref() != Some(key.owner_type.as_str()) {
            return Err(PolicyViolation::UnknownOwner {
                owner_id: key.owner_id,
                owner_type: key.owner_type,
            }
            .into());
        }
        require_namespaces(&mut tx, &key.namespaces).await?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE owner_id = ?")
            .bind(&key.owner_id)
            .fetch_one(&mut *tx)
            .await?;
        if count >= i64::from(settings.max_keys_per_owner) {
            return Err(PolicyViolation::TooManyKeys {
                owner_id: key.owner_id,
                max: settings.max_keys_per_owner,
            }
            .into());
        }
        let now = to_ms(SystemTime::now());
        sqlx::query(
            "INSERT INTO api_keys (id, secret_digest, display_name, description, owner_id, \
             namespaces, expiry_ms, disabled, created_ms, modified_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(key.id.as_str())
        .bind(&key.digest.as_bytes()[..])
        .bind(&key.display_name)
        .bind(&key.description)
        .bind(&key.owner_id)
        .bind(serde_json::to_string(&key.namespaces).unwrap_or_else(|_| "[]".into()))
        .bind(key.expiry.map(to_ms))
        .bind(key.disabled)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let detail = json!({
            "displayName": key.display_name,
            "ownerId": key.owner_id,
            "ownerType": key.owner_type.as_str(),
            "expiryTime": key.expiry.map(to_ms),
        });
        queries::audit(
            &mut *tx,
            actor,
            "api-key.create",
            "api-key",
            key.id.as_str(),
            detail,
        )
        .await?;
        // Announced too: other replicas may remember this id as unknown.
        record_change(&mut tx, &[key.id], false).await?;
        let created = key_in(&mut tx, &key.id).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn import_keys(&self, actor: &Actor, keys: &[NewKey]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let settings = settings_in(&mut tx).await?;
        for key in keys {
            check_lifetime(&settings, key.expiry)?;
        }
        for ((owner_id, owner_type), adding) in import_counts(keys) {
            let kind: Option<String> =
                sqlx::query_scalar("SELECT kind FROM principals WHERE id = ?")
                    .bind(owner_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if kind.as_deref() != Some(owner_type.as_str()) {
                return Err(PolicyViolation::UnknownOwner {
                    owner_id: owner_id.to_string(),
                    owner_type,
                }
                .into());
            }
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE owner_id = ?")
                .bind(owner_id)
                .fetch_one(&mut *tx)
                .await?;
            let after = u64::try_from(count).unwrap_or(0) + adding;
            if after > u64::from(settings.max_keys_per_owner) {
                return Err(PolicyViolation::TooManyKeys {
                    owner_id: owner_id.to_string(),
                    max: settings.max_keys_per_owner,
                }
                .into());
            }
        }
        let now = to_ms(SystemTime::now());
        for batch in keys.chunks(IMPORT_BATCH) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO api_keys (id, secret_digest, display_name, description, owner_id, \
                 namespaces, expiry_ms, disabled, created_ms, modified_ms) ",
            );
            insert.push_values(batch, |mut row, key| {
                row.push_bind(key.id.as_str())
                    .push_bind(&key.digest.as_bytes()[..])
                    .push_bind(&key.display_name)
                    .push_bind(&key.description)
                    .push_bind(&key.owner_id)
                    .push_bind(
                        serde_json::to_string(&key.namespaces).unwrap_or_else(|_| "[]".into()),
                    )
                    .push_bind(key.expiry.map(to_ms))
                    .push_bind(key.disabled)
                    .push_bind(now)
                    .push_bind(now);
            });
            if let Err(e) = insert.build().execute(&mut *tx).await {
                return Err(if is_unique_violation(&e) {
                    StoreError::AlreadyExists {
                        kind: "API key",
                        name: "an imported token (imported twice?)".into(),
                    }
                } else {
                    e.into()
                });
            }
        }
        for ((owner_id, owner_type), added) in import_counts(keys) {
            let detail = json!({ "ownerType": owner_type.as_str(), "imported": added });
            queries::audit(
                &mut *tx,
                actor,
                "api-key.import",
                owner_type.as_str(),
                owner_id,
                detail,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(keys.len() as u64)
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<ApiKey>, StoreError> {
        queries::key(&self.reader, id).await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let size = page_size(page);
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} WHERE k.id > ?1 AND (?2 IS NULL OR k.owner_id = ?2) \
             AND (?3 IS NULL OR p.kind = ?3) ORDER BY k.id LIMIT ?4"
        ))
        .bind(page.after.as_deref().unwrap_or(""))
        .bind(filter.owner_id.as_deref())
        .bind(filter.owner_type.map(OwnerType::as_str))
        .bind(size + 1)
        .fetch_all(&self.reader)
        .await?;
        let items = rows
            .into_iter()
            .map(ApiKey::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(paginate(items, size, |k| k.id.to_string()))
    }

    async fn update_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        update: KeyUpdate,
        expected_version: Option<i64>,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.begin().await?;
        let current = key_in(&mut tx, id).await?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE api_keys SET display_name = ?, description = ?, disabled = ?, \
             resource_version = resource_version + 1, modified_ms = ? WHERE id = ?",
        )
        .bind(
            update
                .display_name
                .as_ref()
                .unwrap_or(&current.display_name),
        )
        .bind(update.description.as_ref().unwrap_or(&current.description))
        .bind(update.disabled.unwrap_or(current.disabled))
        .bind(to_ms(SystemTime::now()))
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        let action = match update.disabled {
            Some(true) if !current.disabled => "api-key.disable",
            Some(false) if current.disabled => "api-key.enable",
            _ => "api-key.update",
        };
        let detail = json!({
            "displayName": update.display_name,
            "description": update.description,
            "disabled": update.disabled,
        });
        queries::audit(&mut *tx, actor, action, "api-key", id.as_str(), detail).await?;
        record_change(&mut tx, &[*id], false).await?;
        let key = key_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn rotate_key(
        &self,
        actor: &Actor,
        id: &KeyId,
        digest: Digest,
        grace_until: SystemTime,
    ) -> Result<ApiKey, StoreError> {
        let mut tx = self.begin().await?;
        key_in(&mut tx, id).await?;
        sqlx::query(
            "UPDATE api_keys SET previous_digest = secret_digest, previous_valid_until_ms = ?, \
             secret_digest = ?, resource_version = resource_version + 1, modified_ms = ? \
             WHERE id = ?",
        )
        .bind(to_ms(grace_until))
        .bind(&digest.as_bytes()[..])
        .bind(to_ms(SystemTime::now()))
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        let detail = json!({ "previousSecretValidUntil": to_ms(grace_until) });
        queries::audit(
            &mut *tx,
            actor,
            "api-key.rotate",
            "api-key",
            id.as_str(),
            detail,
        )
        .await?;
        record_change(&mut tx, &[*id], false).await?;
        let key = key_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn delete_key(&self, actor: &Actor, id: &KeyId) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let key = key_in(&mut tx, id).await?;
        sqlx::query("DELETE FROM api_keys WHERE id = ?")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        let detail = json!({ "displayName": key.display_name, "ownerId": key.owner_id });
        queries::audit(
            &mut *tx,
            actor,
            "api-key.delete",
            "api-key",
            id.as_str(),
            detail,
        )
        .await?;
        record_change(&mut tx, &[*id], false).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        // One UPDATE per chunk of keys, not per key: a flush of thousands
        // of keys was as many statements through the worker thread.
        let mut tx = self.begin().await?;
        for chunk in batch.chunks(KEYS_PER_STATEMENT) {
            let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "UPDATE api_keys SET request_count = request_count + v.column2, \
                 last_used_ms = MAX(COALESCE(last_used_ms, 0), v.column3) \
                 FROM (VALUES {rows}) AS v WHERE api_keys.id = v.column1"
            );
            // Not kept in the statement cache: the text varies with the chunk.
            let mut query = sqlx::query(&sql).persistent(false);
            for delta in chunk {
                query = query
                    .bind(delta.id.as_str())
                    .bind(i64::try_from(delta.requests).unwrap_or(i64::MAX))
                    .bind(to_ms(delta.last_used));
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit(&self, page: &PageRequest) -> Result<Page<AuditEvent>, StoreError> {
        queries::list_audit(&self.reader, page).await
    }

    async fn changes_since(&self, watermark: i64) -> Result<(i64, Vec<Change>), StoreError> {
        queries::changes_since(&self.reader, watermark).await
    }
}
