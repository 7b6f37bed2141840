//! The shared PostgreSQL store, for several keygate replicas on one
//! database. It behaves exactly like the SQLite store (same errors, audit
//! events, cursors; the same test suite runs against both) and adds
//! change announcements with `LISTEN/NOTIFY`.
//!
//! Concurrency: transactions run at READ COMMITTED, so every read-check-write
//! locks the row it checks (`SELECT ... FOR UPDATE`): the owner row for the
//! per-owner key cap, the key or principal row for `resourceVersion` checks,
//! the settings row for policy changes. Every mutation that can change what a
//! cache holds appends to `changes` as its last statement, under a
//! transaction-scoped advisory lock, so `seq` is gapless and in commit order,
//! and sends `NOTIFY keygate_changes, '<seq>'`, which PostgreSQL delivers
//! only if and when the transaction commits. Lock order is always the admins
//! lock (changes to principals, for the last-admin guard), settings,
//! namespace, principal, key, then the change lock, and the change lock's
//! holder never waits for a row, so these locks cannot deadlock.
//!
//! It never sees a secret, and never logs a connection URL (it may hold a
//! password).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Transaction};

use super::sqlite::{
    check_lifetime, check_version, is_unique_violation, key_id, key_ids_json,
    namespace_access_json, page_size, paginate, principal_kind, without_grants_on, KeyRow,
    NamespaceRow, PrincipalRow, SettingsRow, KEY_COLUMNS,
};
use super::*;
use crate::key::{random_id, Digest, KeyId};

/// The channel every replica listens on.
const CHANNEL: &str = "keygate_changes";

/// Advisory lock key that serialises appends to `changes` ("keygate" in
/// ASCII), so that `seq` order is commit order.
const CHANGE_LOCK: i64 = 0x006b_6579_6761_7465;

/// Advisory lock key that serialises the changes that can demote, disable
/// or delete an admin ("kgadmin" in ASCII), so that two of them cannot each
/// see the other's admin still there and together leave none.
const ADMINS_LOCK: i64 = 0x006b_6761_646d_696e;

/// How long a query waits for a connection. Short, because during an outage
/// every cache miss waits this long before the proxy answers 503 (or serves
/// a stale entry), and `/readyz` waits this long before saying not ready.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections per replica: the proxy's misses, the admin API, the usage
/// flusher, the feed poll, and one held by the change listener.
const MAX_CONNECTIONS: u32 = 16;

pub struct PostgresStore {
    /// Every query and transaction; also lends the listener its connection.
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `postgres://...` and runs the migrations (under
    /// PostgreSQL's migration advisory lock, so replicas starting together
    /// migrate once).
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("keygate");
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Corrupt(format!("migration failed: {e}")))?;
        Ok(PostgresStore { pool })
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

// === helpers used inside a write transaction ===

/// Appends to the change feed and announces it. Must be the transaction's
/// last write: the advisory lock it takes is held until commit, and its
/// holder must never wait for a row lock (see the module doc).
async fn record_change(
    tx: &mut PgConnection,
    keys: &[KeyId],
    settings: bool,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHANGE_LOCK)
        .execute(&mut *tx)
        .await?;
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO changes (seq, time_ms, key_ids, settings) \
         SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3 FROM changes RETURNING seq",
    )
    .bind(to_ms(SystemTime::now()))
    .bind(key_ids_json(keys))
    .bind(settings)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM changes WHERE seq <= $1")
        .bind(seq - CHANGE_RETENTION)
        .execute(&mut *tx)
        .await?;
    // The payload is only the seq: replicas read what changed from the
    // table, so a payload never nears NOTIFY's 8000-byte limit and a lost
    // notification loses nothing but time.
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(seq.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Takes [`ADMINS_LOCK`]: first, before any row lock (see the module doc).
async fn lock_admins(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ADMINS_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Refuses a change that left no enabled account admin; the caller's
/// transaction then rolls back when dropped.
async fn keep_an_admin(tx: &mut PgConnection, changed: &Principal) -> Result<(), StoreError> {
    let any_left: bool = sqlx::query_scalar(ANY_ENABLED_ADMIN)
        .fetch_one(&mut *tx)
        .await?;
    admin_left(any_left, changed)
}

/// Reads a principal for a change, locking its row until commit.
async fn principal_for_update(
    tx: &mut PgConnection,
    kind: OwnerType,
    id: &str,
) -> Result<Principal, StoreError> {
    let row: Option<PrincipalRow> =
        sqlx::query_as("SELECT * FROM principals WHERE id = $1 AND kind = $2 FOR UPDATE")
            .bind(id)
            .bind(kind.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    row.ok_or_else(|| StoreError::NotFound {
        kind: principal_kind(kind),
        id: id.into(),
    })?
    .try_into()
}

async fn owner_key_ids(tx: &mut PgConnection, owner_id: &str) -> Result<Vec<KeyId>, StoreError> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM api_keys WHERE owner_id = $1 ORDER BY id")
            .bind(owner_id)
            .fetch_all(tx)
            .await?;
    ids.iter().map(|id| key_id(id)).collect()
}

async fn require_namespaces<'a>(
    tx: &mut PgConnection,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), StoreError> {
    for name in names {
        let found: Option<String> = sqlx::query_scalar("SELECT id FROM namespaces WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(PolicyViolation::UnknownNamespace(name.clone()).into());
        }
    }
    Ok(())
}

/// Share-locks the namespaces a grant names, before the principal's row (see
/// the module doc's lock order): a concurrent `delete_namespace` then waits
/// for the grant to commit and removes it, or the grant waits and finds the
/// namespace gone. Returns the verdict on the names for the caller to give
/// when its own checks come first: the first name that does not exist, as
/// `UnknownNamespace`. (Locked, they cannot disappear before commit, so
/// this one read stands for `require_namespaces`.)
async fn share_namespaces<'a>(
    tx: &mut PgConnection,
    names: impl IntoIterator<Item = &'a String>,
) -> Result<Result<(), StoreError>, StoreError> {
    let names: Vec<&String> = names.into_iter().collect();
    if names.is_empty() {
        return Ok(Ok(()));
    }
    let found: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM namespaces WHERE name = ANY($1) ORDER BY id FOR SHARE",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?;
    Ok(match names.into_iter().find(|name| !found.contains(name)) {
        Some(unknown) => Err(PolicyViolation::UnknownNamespace(unknown.clone()).into()),
        None => Ok(()),
    })
}

/// Reads a key; with `lock`, also locks its row until commit.
async fn key_in(tx: &mut PgConnection, id: &KeyId, lock: bool) -> Result<ApiKey, StoreError> {
    let lock = if lock { " FOR UPDATE OF k" } else { "" };
    let row: Option<KeyRow> =
        sqlx::query_as(&format!("SELECT {KEY_COLUMNS} WHERE k.id = $1{lock}"))
            .bind(id.as_str())
            .fetch_optional(tx)
            .await?;
    row.ok_or_else(|| StoreError::NotFound {
        kind: "API key",
        id: id.to_string(),
    })?
    .try_into()
}

/// Reads the settings; `FOR SHARE` while creating keys (many creates may
/// hold it at once), `FOR UPDATE` while changing them.
async fn settings_in(tx: &mut PgConnection, lock: &str) -> Result<AccountSettings, StoreError> {
    let row: SettingsRow = sqlx::query_as(&format!(
        "SELECT * FROM account_settings WHERE id = 1 {lock}"
    ))
    .fetch_one(tx)
    .await?;
    Ok(row.into())
}

fn namespace_not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: "namespace",
        id: id.into(),
    }
}

// === impl KeyStore for PostgresStore ===

#[async_trait]
impl KeyStore for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn find_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        queries::key_record(&self.pool, id).await
    }

    async fn existing_keys(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(KeyId::as_str).collect();
        let found: Vec<String> = sqlx::query_scalar("SELECT id FROM api_keys WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(found
            .iter()
            .filter_map(|id| KeyId::parse(id).ok())
            .collect())
    }

    async fn settings(&self) -> Result<AccountSettings, StoreError> {
        let row: SettingsRow = sqlx::query_as("SELECT * FROM account_settings WHERE id = 1")
            .fetch_one(&self.pool)
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
        let current = settings_in(&mut tx, "FOR UPDATE").await?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE account_settings SET api_keys_enabled = $1, max_key_lifetime_secs = $2, \
             max_keys_per_owner = $3, resource_version = resource_version + 1, modified_ms = $4 \
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
        let updated = settings_in(&mut tx, "").await?;
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
        share_namespaces(&mut tx, spec.access.namespaces.keys()).await??;
        let id = random_id();
        let now = to_ms(SystemTime::now());
        let inserted = sqlx::query(
            "INSERT INTO principals (id, kind, name, description, account_role, namespace_access, \
             disabled, created_ms, modified_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        queries::principal_by(&self.pool, "id", kind, id).await
    }

    async fn find_principal_by_name(
        &self,
        kind: OwnerType,
        name: &str,
    ) -> Result<Option<Principal>, StoreError> {
        queries::principal_by(&self.pool, "name", kind, name).await
    }

    async fn list_principals(
        &self,
        kind: OwnerType,
        page: &PageRequest,
    ) -> Result<Page<Principal>, StoreError> {
        queries::list_principals(&self.pool, kind, page).await
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
        lock_admins(&mut tx).await?;
        let namespaces = share_namespaces(&mut tx, spec.access.namespaces.keys()).await?;
        let current = principal_for_update(&mut tx, kind, id).await?;
        check_version(expected_version, current.resource_version)?;
        namespaces?;
        let updated = sqlx::query(
            "UPDATE principals SET name = $1, description = $2, account_role = $3, \
             namespace_access = $4, disabled = $5, resource_version = resource_version + 1, \
             modified_ms = $6 WHERE id = $7",
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
        // The owner row is locked, so no key can be added to it meanwhile.
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
        lock_admins(&mut tx).await?;
        // Locked first, so a concurrent create_key for this owner waits and
        // then finds the owner gone, instead of adding a key we would miss.
        let principal = principal_for_update(&mut tx, kind, id).await?;
        let keys = owner_key_ids(&mut tx, id).await?;
        sqlx::query("DELETE FROM api_keys WHERE owner_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM principals WHERE id = $1")
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM principals WHERE kind = $1")
            .bind(kind.as_str())
            .fetch_one(&self.pool)
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
             VALUES ($1, $2, $3, $4, $5)",
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
        let row: NamespaceRow = sqlx::query_as("SELECT * FROM namespaces WHERE id = $1")
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.into())
    }

    async fn get_namespace(&self, id_or_name: &str) -> Result<Option<Namespace>, StoreError> {
        queries::namespace(&self.pool, id_or_name).await
    }

    async fn list_namespaces(&self, page: &PageRequest) -> Result<Page<Namespace>, StoreError> {
        queries::list_namespaces(&self.pool, page).await
    }

    async fn update_namespace(
        &self,
        actor: &Actor,
        id: &str,
        description: &str,
        expected_version: Option<i64>,
    ) -> Result<Namespace, StoreError> {
        let mut tx = self.begin().await?;
        let current: Option<NamespaceRow> =
            sqlx::query_as("SELECT * FROM namespaces WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let current = current.ok_or_else(|| namespace_not_found(id))?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE namespaces SET description = $1, resource_version = resource_version + 1, \
             modified_ms = $2 WHERE id = $3",
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
        let row: NamespaceRow = sqlx::query_as("SELECT * FROM namespaces WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.into())
    }

    async fn delete_namespace(&self, actor: &Actor, id: &str) -> Result<Vec<KeyId>, StoreError> {
        let mut tx = self.begin().await?;
        // Deleting the row waits for grants in flight (`share_namespaces`),
        // so the holders read next include them.
        let name: Option<String> =
            sqlx::query_scalar("DELETE FROM namespaces WHERE id = $1 RETURNING name")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let name = name.ok_or_else(|| namespace_not_found(id))?;
        let holders: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, namespace_access FROM principals WHERE namespace_access <> '{}' \
             ORDER BY id FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        let (mut revoked, mut keys) = (Vec::new(), Vec::new());
        for (principal, stripped) in without_grants_on(holders, &name)? {
            sqlx::query(
                "UPDATE principals SET namespace_access = $1, \
                 resource_version = resource_version + 1, modified_ms = $2 WHERE id = $3",
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
        let settings = settings_in(&mut tx, "FOR SHARE").await?;
        check_lifetime(&settings, key.expiry)?;
        // The owner row lock makes count-then-insert atomic: concurrent
        // creates for one owner queue here, and each counts the keys the
        // ones before it committed.
        let owner_kind: Option<String> =
            sqlx::query_scalar("SELECT kind FROM principals WHERE id = $1 FOR UPDATE")
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
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE owner_id = $1")
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
        let created = key_in(&mut tx, &key.id, false).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn import_keys(&self, actor: &Actor, keys: &[NewKey]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let settings = settings_in(&mut tx, "FOR SHARE").await?;
        for key in keys {
            check_lifetime(&settings, key.expiry)?;
        }
        for ((owner_id, owner_type), adding) in import_counts(keys) {
            let kind: Option<String> =
                sqlx::query_scalar("SELECT kind FROM principals WHERE id = $1 FOR UPDATE")
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
            let count: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE owner_id = $1")
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
        queries::key(&self.pool, id).await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let size = page_size(page);
        let rows: Vec<KeyRow> = sqlx::query_as(&format!(
            "SELECT {KEY_COLUMNS} WHERE k.id > $1 AND ($2::text IS NULL OR k.owner_id = $2) \
             AND ($3::text IS NULL OR p.kind = $3) ORDER BY k.id LIMIT $4"
        ))
        .bind(page.after.as_deref().unwrap_or(""))
        .bind(filter.owner_id.as_deref())
        .bind(filter.owner_type.map(OwnerType::as_str))
        .bind(size + 1)
        .fetch_all(&self.pool)
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
        let current = key_in(&mut tx, id, true).await?;
        check_version(expected_version, current.resource_version)?;
        sqlx::query(
            "UPDATE api_keys SET display_name = $1, description = $2, disabled = $3, \
             resource_version = resource_version + 1, modified_ms = $4 WHERE id = $5",
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
        let key = key_in(&mut tx, id, false).await?;
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
        // Locked, so two concurrent rotations chain (the second keeps the
        // first's new digest as its previous one) instead of racing.
        key_in(&mut tx, id, true).await?;
        sqlx::query(
            "UPDATE api_keys SET previous_digest = secret_digest, previous_valid_until_ms = $1, \
             secret_digest = $2, resource_version = resource_version + 1, modified_ms = $3 \
             WHERE id = $4",
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
        let key = key_in(&mut tx, id, false).await?;
        tx.commit().await?;
        Ok(key)
    }

    async fn delete_key(&self, actor: &Actor, id: &KeyId) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let key = key_in(&mut tx, id, true).await?;
        sqlx::query("DELETE FROM api_keys WHERE id = $1")
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
        let mut ordered: Vec<&UsageDelta> = batch.iter().collect();
        ordered.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        let ids: Vec<&str> = ordered.iter().map(|d| d.id.as_str()).collect();
        let counts: Vec<i64> = ordered
            .iter()
            .map(|d| i64::try_from(d.requests).unwrap_or(i64::MAX))
            .collect();
        let last_used: Vec<i64> = ordered.iter().map(|d| to_ms(d.last_used)).collect();
        let mut tx = self.begin().await?;
        // Every replica flushes usage for the same hot keys: the rows are
        // locked in one global order (by id) first, so two flushes cannot
        // deadlock; then one UPDATE applies every key's delta.
        sqlx::query("SELECT id FROM api_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE api_keys SET request_count = request_count + v.n, \
             last_used_ms = GREATEST(COALESCE(api_keys.last_used_ms, 0), v.t) \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS v(id, n, t) \
             WHERE api_keys.id = v.id",
        )
        .bind(&ids)
        .bind(&counts)
        .bind(&last_used)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_audit(&self, page: &PageRequest) -> Result<Page<AuditEvent>, StoreError> {
        queries::list_audit(&self.pool, page).await
    }

    async fn changes_since(&self, watermark: i64) -> Result<(i64, Vec<Change>), StoreError> {
        queries::changes_since(&self.pool, watermark).await
    }

    async fn subscribe(&self) -> Result<Option<Box<dyn ChangeSubscription>>, StoreError> {
        let listener = listen(&self.pool).await?;
        Ok(Some(Box::new(PgSubscription {
            pool: self.pool.clone(),
            listener: Some(listener),
        })))
    }
}

// === impl ChangeSubscription for PgSubscription ===

/// `LISTEN keygate_changes` on a connection of its own, re-established
/// after it drops.
struct PgSubscription {
    /// Where a new listening connection comes from after a failure.
    pool: PgPool,
    /// The listening connection; `None` after an error, until reconnected.
    listener: Option<PgListener>,
}

async fn listen(pool: &PgPool) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[async_trait]
impl ChangeSubscription for PgSubscription {
    async fn next(&mut self) -> Result<Announcement, StoreError> {
        let listener = match &mut self.listener {
            Some(listener) => listener,
            None => {
                // A fresh listener rather than PgListener's own reconnect, so
                // that the caller learns the moment it is back and polls.
                self.listener = Some(listen(&self.pool).await?);
                return Ok(Announcement::Reconnected);
            }
        };
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                Ok(Announcement::Changed(notification.payload().parse().ok()))
            }
            // Lost and already reconnected (try_recv reconnects eagerly).
            Ok(None) => Ok(Announcement::Reconnected),
            Err(error) => {
                self.listener = None;
                Err(error.into())
            }
        }
    }
}
