//! The changes both SQL stores make the same way. Each is one transaction
//! that holds the change's checks (resource versions, the key policies, the
//! last admin), its writes, its audit event and its change-feed entry, and
//! commits them together or not at all: a refused change leaves nothing.
//!
//! What SQLite and PostgreSQL do differently inside a change, each backend
//! says in its `impl Dialect`: PostgreSQL runs transactions at READ
//! COMMITTED and locks the rows a change checks (`FOR UPDATE`, `FOR SHARE`)
//! plus two advisory locks (see `postgres.rs` for the lock order); SQLite
//! has one writer connection whose `BEGIN IMMEDIATE` excludes every other
//! writer, so it locks nothing more. The change feed's append is shared;
//! PostgreSQL also serialises it and announces it (`NOTIFY`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::json;
use sqlx::{
    Arguments, Database, Encode, Executor, FromRow, IntoArguments, Pool, Transaction, Type,
};

use super::queries::{principal_kind, Sql, NO_LOCK};
use super::rows::{
    key_id, key_ids_json, namespace_access_json, without_grants_on, AuditRow, ChangeRow,
    KeyRecordRow, KeyRow, NamespaceRow, PrincipalRow, SettingsRow,
};
use super::*;
use crate::key::{random_id, Digest, KeyId};

/// What a read inside a change locks until the change commits.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lock {
    /// The rows read, against changes; others may hold them too.
    Share,
    /// The rows read, against every other change.
    Update,
    /// A key read with its owner ([`super::rows::KEY_COLUMNS`]): the key's
    /// row only, so that the owner stays free for changes to its other keys.
    UpdateKeyRow,
}

/// When a store's next usage flush also forgets the flush streams idle for
/// [`USAGE_STREAM_RETENTION`]: its first flush, then at most once per
/// [`USAGE_STREAM_SWEEP`], so that the other flushes pay for one statement
/// more than before, not two.
#[derive(Debug, Default)]
pub(super) struct UsageSweep {
    /// Unix milliseconds from which the next flush sweeps.
    next_ms: AtomicI64,
}

impl UsageSweep {
    /// Whether the flush starting at `now_ms` sweeps; if so, the next one
    /// after [`USAGE_STREAM_SWEEP`] does. A sweep in a flush that then
    /// fails waits for the next turn: nothing hurries it.
    pub(super) fn due(&self, now_ms: i64) -> bool {
        let next = self.next_ms.load(Ordering::Relaxed);
        let period = i64::try_from(USAGE_STREAM_SWEEP.as_millis()).unwrap_or(i64::MAX);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(period),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// What a change tells every replica's cache, as its change-feed entry.
#[derive(Debug, Clone, Copy)]
pub(super) enum Changed<'a> {
    /// These keys changed or are gone: every copy is stale.
    Keys(&'a [KeyId]),
    /// These keys were just created: only a note that an id was unknown is
    /// stale (see [`Change::created`]).
    Created(&'a [KeyId]),
    /// The account settings (the `apiKeysEnabled` switch).
    Settings,
}

/// What a backend does differently inside a change.
pub(super) trait Dialect: Database {
    /// The clause that makes a read lock what it returns, `lock`.
    fn lock(lock: Lock) -> &'static str;

    /// Serialises the changes that can demote, disable or delete an admin,
    /// so that two of them cannot each see the other's admin still there
    /// and together leave none. Taken first.
    fn lock_admins(
        tx: &mut Self::Connection,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Of the namespaces a grant names, the first that does not exist. The
    /// ones that do are held until commit: a concurrent namespace deletion
    /// either waits for the grant (and then removes it) or is seen here.
    fn unknown_namespace(
        tx: &mut Self::Connection,
        names: &[&str],
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Appends to the change feed (see [`Sql::append_change`]) and announces
    /// the change where the backend can. The change's last write.
    fn record_change(
        tx: &mut Self::Connection,
        change: Changed<'_>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

impl<DB> Sql<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
    for<'r> PrincipalRow: FromRow<'r, DB::Row>,
    for<'r> NamespaceRow: FromRow<'r, DB::Row>,
    for<'r> KeyRow: FromRow<'r, DB::Row>,
    for<'r> KeyRecordRow: FromRow<'r, DB::Row>,
    for<'r> SettingsRow: FromRow<'r, DB::Row>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
    for<'r> ChangeRow: FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'r> (bool,): FromRow<'r, DB::Row>,
    for<'r> (String,): FromRow<'r, DB::Row>,
    for<'r> (String, String): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
{
    pub(super) async fn update_settings(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        api_keys_enabled: bool,
        max_key_lifetime: Duration,
        max_keys_per_owner: u32,
        expected_version: Option<i64>,
    ) -> Result<AccountSettings, StoreError> {
        let current = Self::settings(&mut *tx, DB::lock(Lock::Update)).await?;
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
        let action = "account.settings.update";
        Self::audit(&mut *tx, actor, action, "account", "settings", detail).await?;
        DB::record_change(&mut tx, Changed::Settings).await?;
        let updated = Self::settings(&mut *tx, NO_LOCK).await?;
        tx.commit().await?;
        Ok(updated)
    }

    pub(super) async fn create_principal(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        kind: OwnerType,
        spec: PrincipalSpec,
    ) -> Result<Principal, StoreError> {
        let created = Self::insert_principal(&mut tx, actor, kind, spec).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Creates the first account admin and its key in one transaction, so
    /// that no failure leaves an admin nobody holds a key of (which would
    /// refuse every later bootstrap), and two bootstraps at once cannot
    /// both find no user. `key.owner_id` and `owner_type` are replaced by
    /// the new admin's.
    pub(super) async fn bootstrap(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        spec: PrincipalSpec,
        mut key: NewKey,
    ) -> Result<(Principal, ApiKey), StoreError> {
        // Taken first: a concurrent bootstrap waits here, then counts the
        // user this one made.
        Self::settings(&mut *tx, DB::lock(Lock::Update)).await?;
        let users = Self::count_principals(&mut *tx, OwnerType::User).await?;
        if users > 0 {
            return Err(PolicyViolation::UsersExist(users).into());
        }
        let admin = Self::insert_principal(&mut tx, actor, OwnerType::User, spec).await?;
        key.owner_id = admin.id.clone();
        key.owner_type = OwnerType::User;
        let created = Self::insert_key(&mut tx, actor, key).await?;
        tx.commit().await?;
        Ok((admin, created))
    }

    async fn insert_principal(
        tx: &mut Transaction<'static, DB>,
        actor: &Actor,
        kind: OwnerType,
        spec: PrincipalSpec,
    ) -> Result<Principal, StoreError> {
        let unknown = DB::unknown_namespace(tx, &granted_names(&spec)).await?;
        namespaces_known(unknown)?;
        let id = random_id();
        let now = to_ms(SystemTime::now());
        let inserted = sqlx::query(
            "INSERT INTO principals (id, kind, name, description, account_role, namespace_access, \
             disabled, created_ms, modified_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id.as_str())
        .bind(kind.as_str())
        .bind(spec.name.as_str())
        .bind(spec.description.as_str())
        .bind(spec.access.account_role.as_str())
        .bind(namespace_access_json(&spec.access))
        .bind(spec.disabled)
        .bind(now)
        .bind(now)
        .execute(&mut **tx)
        .await;
        if let Err(e) = inserted {
            return Err(name_taken(e, principal_kind(kind), spec.name));
        }
        let detail = json!({ "name": spec.name, "role": spec.access.account_role.as_str() });
        let action = format!("{kind}.create");
        Self::audit(&mut **tx, actor, &action, kind.as_str(), &id, detail).await?;
        let created = Self::principal_in(&mut **tx, kind, &id, NO_LOCK).await?;
        Ok(created)
    }

    /// Also returns the principal's keys, whose cached owner is now stale.
    pub(super) async fn update_principal(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
        spec: PrincipalSpec,
        expected_version: Option<i64>,
    ) -> Result<(Principal, Vec<KeyId>), StoreError> {
        DB::lock_admins(&mut tx).await?;
        // Read (and held) before the principal's row, in lock order; the
        // answer waits for the principal's own checks.
        let unknown = DB::unknown_namespace(&mut tx, &granted_names(&spec)).await?;
        let current = Self::principal_in(&mut *tx, kind, id, DB::lock(Lock::Update)).await?;
        check_version(expected_version, current.resource_version)?;
        namespaces_known(unknown)?;
        let updated = sqlx::query(
            "UPDATE principals SET name = $1, description = $2, account_role = $3, \
             namespace_access = $4, disabled = $5, resource_version = resource_version + 1, \
             modified_ms = $6 WHERE id = $7",
        )
        .bind(spec.name.as_str())
        .bind(spec.description.as_str())
        .bind(spec.access.account_role.as_str())
        .bind(namespace_access_json(&spec.access))
        .bind(spec.disabled)
        .bind(to_ms(SystemTime::now()))
        .bind(id)
        .execute(&mut *tx)
        .await;
        if let Err(e) = updated {
            return Err(name_taken(e, principal_kind(kind), spec.name));
        }
        if current.is_enabled_admin() {
            Self::keep_an_admin(&mut tx, &current).await?;
        }
        let detail = json!({
            "name": spec.name,
            "role": spec.access.account_role.as_str(),
            "disabled": spec.disabled,
        });
        let action = format!("{kind}.update");
        Self::audit(&mut *tx, actor, &action, kind.as_str(), id, detail).await?;
        let principal = Self::principal_in(&mut *tx, kind, id, NO_LOCK).await?;
        // The owner row is locked, so no key can be added to it meanwhile.
        let keys = Self::owner_key_ids(&mut tx, id).await?;
        DB::record_change(&mut tx, Changed::Keys(&keys)).await?;
        tx.commit().await?;
        Ok((principal, keys))
    }

    /// Deletes the principal and its keys; returns the keys.
    pub(super) async fn delete_principal(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        kind: OwnerType,
        id: &str,
    ) -> Result<Vec<KeyId>, StoreError> {
        DB::lock_admins(&mut tx).await?;
        // Locked first, so a concurrent create_key for this owner waits and
        // then finds the owner gone, instead of adding a key we would miss.
        let principal = Self::principal_in(&mut *tx, kind, id, DB::lock(Lock::Update)).await?;
        let keys = Self::owner_key_ids(&mut tx, id).await?;
        sqlx::query("DELETE FROM api_keys WHERE owner_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM principals WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if principal.is_enabled_admin() {
            Self::keep_an_admin(&mut tx, &principal).await?;
        }
        let detail = json!({
            "name": principal.name,
            "deletedKeys": keys.iter().map(KeyId::as_str).collect::<Vec<_>>(),
        });
        let action = format!("{kind}.delete");
        Self::audit(&mut *tx, actor, &action, kind.as_str(), id, detail).await?;
        DB::record_change(&mut tx, Changed::Keys(&keys)).await?;
        tx.commit().await?;
        Ok(keys)
    }

    pub(super) async fn create_namespace(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        name: &str,
        description: &str,
    ) -> Result<Namespace, StoreError> {
        let id = random_id();
        let now = to_ms(SystemTime::now());
        let inserted = sqlx::query(
            "INSERT INTO namespaces (id, name, description, created_ms, modified_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(description)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            return Err(name_taken(e, "namespace", name.into()));
        }
        let detail = json!({ "name": name });
        Self::audit(
            &mut *tx,
            actor,
            "namespace.create",
            "namespace",
            &id,
            detail,
        )
        .await?;
        let created = Self::namespace_in(&mut tx, &id, NO_LOCK).await?;
        tx.commit().await?;
        Ok(created)
    }

    pub(super) async fn update_namespace(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        id: &str,
        description: &str,
        expected_version: Option<i64>,
    ) -> Result<Namespace, StoreError> {
        let current = Self::namespace_in(&mut tx, id, DB::lock(Lock::Update)).await?;
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
        let detail = json!({ "name": current.name });
        Self::audit(&mut *tx, actor, "namespace.update", "namespace", id, detail).await?;
        let updated = Self::namespace_in(&mut tx, id, NO_LOCK).await?;
        tx.commit().await?;
        Ok(updated)
    }

    /// Deletes the namespace and every grant on it; returns the keys of the
    /// principals that lost a grant, whose cached owner is now stale.
    pub(super) async fn delete_namespace(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        id: &str,
    ) -> Result<Vec<KeyId>, StoreError> {
        // Deleting the row waits for grants in flight (`unknown_namespace`
        // holds the namespaces they name), so the holders read next
        // include them.
        let deleted: Option<(String,)> =
            sqlx::query_as("DELETE FROM namespaces WHERE id = $1 RETURNING name")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let (name,) = deleted.ok_or_else(|| namespace_not_found(id))?;
        let holders: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT id, namespace_access FROM principals WHERE namespace_access <> '{{}}' \
             ORDER BY id{}",
            DB::lock(Lock::Update)
        ))
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
            .bind(principal.as_str())
            .execute(&mut *tx)
            .await?;
            keys.extend(Self::owner_key_ids(&mut tx, &principal).await?);
            revoked.push(principal);
        }
        let detail = json!({ "name": name, "grantsRemovedFrom": revoked });
        Self::audit(&mut *tx, actor, "namespace.delete", "namespace", id, detail).await?;
        if !keys.is_empty() {
            DB::record_change(&mut tx, Changed::Keys(&keys)).await?;
        }
        tx.commit().await?;
        Ok(keys)
    }

    /// Creates a key within the key policies: lifetime, an owner of the
    /// stated type, known namespaces, and the per-owner cap.
    pub(super) async fn create_key(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        key: NewKey,
    ) -> Result<ApiKey, StoreError> {
        let created = Self::insert_key(&mut tx, actor, key).await?;
        tx.commit().await?;
        Ok(created)
    }

    async fn insert_key(
        tx: &mut Transaction<'static, DB>,
        actor: &Actor,
        key: NewKey,
    ) -> Result<ApiKey, StoreError> {
        let settings = Self::settings(&mut **tx, DB::lock(Lock::Share)).await?;
        check_lifetime(&settings, key.expiry)?;
        Self::lock_owner(&mut *tx, &key.owner_id, key.owner_type).await?;
        let names: Vec<&str> = key.namespaces.iter().map(String::as_str).collect();
        let unknown = Self::first_unknown_namespace(&mut *tx, &names).await?;
        namespaces_known(unknown)?;
        Self::check_room(&mut *tx, &key.owner_id, 1, &settings).await?;
        Self::insert_keys(&mut *tx, std::slice::from_ref(&key)).await?;
        let detail = json!({
            "displayName": key.display_name,
            "ownerId": key.owner_id,
            "ownerType": key.owner_type.as_str(),
            "expiryTime": key.expiry.map(to_ms),
        });
        let id = key.id.as_str();
        Self::audit(&mut **tx, actor, "api-key.create", "api-key", id, detail).await?;
        // Announced too: other replicas may remember this id as unknown.
        // As a creation, so that they drop only that: a replica that has
        // just read the new key keeps it.
        DB::record_change(&mut *tx, Changed::Created(&[key.id])).await?;
        let created = Self::key_in(&mut *tx, &key.id, NO_LOCK).await?;
        Ok(created)
    }

    /// Imports keys all or nothing, each within the key policies (as
    /// [`Sql::create_key`]; namespaces are not checked, an import has none).
    pub(super) async fn import_keys(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        keys: &[NewKey],
    ) -> Result<u64, StoreError> {
        let settings = Self::settings(&mut *tx, DB::lock(Lock::Share)).await?;
        for key in keys {
            check_lifetime(&settings, key.expiry)?;
        }
        let counts = import_counts(keys);
        for (&(owner_id, owner_type), &adding) in &counts {
            Self::lock_owner(&mut tx, owner_id, owner_type).await?;
            Self::check_room(&mut tx, owner_id, adding, &settings).await?;
        }
        for batch in keys.chunks(IMPORT_BATCH) {
            if let Err(e) = Self::insert_keys(&mut tx, batch).await {
                let what = "an imported token (imported twice?)";
                return Err(name_taken(e, "API key", what.into()));
            }
        }
        for ((owner_id, owner_type), added) in counts {
            let detail = json!({ "ownerType": owner_type.as_str(), "imported": added });
            let kind = owner_type.as_str();
            Self::audit(&mut *tx, actor, "api-key.import", kind, owner_id, detail).await?;
        }
        // Announced as a create is: an imported token's id is known before
        // the import (its clients may already be presenting it), so a
        // running keygate may remember it as unknown. One change per batch
        // keeps each row's list of ids small.
        for batch in keys.chunks(IMPORT_BATCH) {
            let ids: Vec<KeyId> = batch.iter().map(|key| key.id).collect();
            DB::record_change(&mut tx, Changed::Created(&ids)).await?;
        }
        tx.commit().await?;
        Ok(keys.len() as u64)
    }

    /// Changes a key's name, description or state (unset fields stay).
    pub(super) async fn update_key(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        id: &KeyId,
        update: KeyUpdate,
        expected_version: Option<i64>,
    ) -> Result<ApiKey, StoreError> {
        let current = Self::key_in(&mut tx, id, DB::lock(Lock::UpdateKeyRow)).await?;
        check_version(expected_version, current.resource_version)?;
        // An admin's disable holds against the owner; only an admin lifts it.
        // (The flag is read only on a disabled key: a replica on the
        // previous keygate enables without clearing it.)
        let disabled = update.disabled.unwrap_or(current.disabled);
        if current.disabled && current.disabled_by_admin && !disabled && !update.by_admin {
            return Err(PolicyViolation::DisabledByAdmin(id.to_string()).into());
        }
        let held = match update.disabled {
            Some(true) => update.by_admin || (current.disabled && current.disabled_by_admin),
            Some(false) => false,
            None => current.disabled && current.disabled_by_admin,
        };
        sqlx::query(
            "UPDATE api_keys SET display_name = $1, description = $2, disabled = $3, \
             disabled_by_admin = $4, resource_version = resource_version + 1, modified_ms = $5 \
             WHERE id = $6",
        )
        .bind(
            update
                .display_name
                .as_deref()
                .unwrap_or(&current.display_name),
        )
        .bind(
            update
                .description
                .as_deref()
                .unwrap_or(&current.description),
        )
        .bind(disabled)
        .bind(held)
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
        Self::audit(&mut *tx, actor, action, "api-key", id.as_str(), detail).await?;
        DB::record_change(&mut tx, Changed::Keys(&[*id])).await?;
        let key = Self::key_in(&mut tx, id, NO_LOCK).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Replaces the key's digest; the old one stays valid until
    /// `grace_until`.
    pub(super) async fn rotate_key(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        id: &KeyId,
        digest: Digest,
        grace_until: SystemTime,
    ) -> Result<ApiKey, StoreError> {
        // Locked, so two concurrent rotations chain (the second keeps the
        // first's new digest as its previous one) instead of racing.
        Self::key_in(&mut tx, id, DB::lock(Lock::UpdateKeyRow)).await?;
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
        Self::audit(
            &mut *tx,
            actor,
            "api-key.rotate",
            "api-key",
            id.as_str(),
            detail,
        )
        .await?;
        DB::record_change(&mut tx, Changed::Keys(&[*id])).await?;
        let key = Self::key_in(&mut tx, id, NO_LOCK).await?;
        tx.commit().await?;
        Ok(key)
    }

    pub(super) async fn delete_key(
        mut tx: Transaction<'static, DB>,
        actor: &Actor,
        id: &KeyId,
    ) -> Result<(), StoreError> {
        let key = Self::key_in(&mut tx, id, DB::lock(Lock::UpdateKeyRow)).await?;
        sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        let detail = json!({ "displayName": key.display_name, "ownerId": key.owner_id });
        Self::audit(
            &mut *tx,
            actor,
            "api-key.delete",
            "api-key",
            id.as_str(),
            detail,
        )
        .await?;
        DB::record_change(&mut tx, Changed::Keys(&[*id])).await?;
        tx.commit().await?;
        Ok(())
    }

    // === usage flushes ===

    /// Opens a usage flush in `tx`, before its counts: records `flush` as
    /// its stream's latest and, when `sweep` says so, forgets idle streams.
    /// False when the stream has reached `flush`'s sequence already: the
    /// batch was applied before, and the caller must write nothing.
    pub(super) async fn open_usage_flush(
        tx: &mut DB::Connection,
        flush: &FlushId,
        sweep: &UsageSweep,
    ) -> Result<bool, StoreError> {
        let now_ms = to_ms(SystemTime::now());
        if !Self::claim_usage_flush(tx, flush, now_ms).await? {
            return Ok(false);
        }
        if sweep.due(now_ms) {
            let retention = i64::try_from(USAGE_STREAM_RETENTION.as_millis()).unwrap_or(i64::MAX);
            Self::forget_usage_streams(tx, now_ms.saturating_sub(retention)).await?;
        }
        Ok(true)
    }

    /// Records `flush` as its stream's latest. False when the stream has
    /// reached `flush`'s sequence already. On PostgreSQL a second attempt of
    /// the same flush (its first one still in flight) waits here for the
    /// stream's row until the first commits or rolls back, then sees what
    /// it did; the streams of different processes never share a row.
    async fn claim_usage_flush(
        tx: &mut DB::Connection,
        flush: &FlushId,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let claimed: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO usage_flushes (stream, last_sequence, flushed_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (stream) DO UPDATE SET \
             last_sequence = excluded.last_sequence, flushed_ms = excluded.flushed_ms \
             WHERE usage_flushes.last_sequence < excluded.last_sequence \
             RETURNING last_sequence",
        )
        .bind(flush.stream.as_str())
        .bind(i64::try_from(flush.sequence).unwrap_or(i64::MAX))
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        Ok(claimed.is_some())
    }

    /// Deletes the rows of flush streams last heard from before
    /// `before_ms` (processes long gone), inside a flush's transaction. Two
    /// PostgreSQL replicas sweeping the same old rows at once may wait for
    /// each other; should the server end one as a deadlock, that flush
    /// fails and is sent again as it was, which is safe.
    async fn forget_usage_streams(
        tx: &mut DB::Connection,
        before_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM usage_flushes WHERE flushed_ms < $1")
            .bind(before_ms)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    // === reads and checks inside a change ===

    /// Appends a change to the feed, inside the change's transaction so
    /// that it is visible exactly when the change commits, and trims the
    /// feed to [`CHANGE_RETENTION`]. `MAX(seq) + 1` is gapless and in commit
    /// order because appends are serialised (SQLite's one writer,
    /// PostgreSQL's change lock). Returns the change's seq.
    ///
    /// A creation's ids are written to `key_ids` like any other's, with
    /// `created` set: a replica of the previous keygate (a rolling upgrade)
    /// reads only `key_ids`, and drops them as it always did.
    pub(super) async fn append_change(
        tx: &mut DB::Connection,
        change: Changed<'_>,
    ) -> Result<i64, StoreError> {
        let (keys, created, settings): (&[KeyId], bool, bool) = match change {
            Changed::Keys(keys) => (keys, false, false),
            Changed::Created(keys) => (keys, true, false),
            Changed::Settings => (&[], false, true),
        };
        let (seq,): (i64,) = sqlx::query_as(
            "INSERT INTO changes (seq, time_ms, key_ids, settings, created) \
             SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4 FROM changes RETURNING seq",
        )
        .bind(to_ms(SystemTime::now()))
        .bind(key_ids_json(keys))
        .bind(settings)
        .bind(created)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM changes WHERE seq <= $1")
            .bind(seq - CHANGE_RETENTION)
            .execute(&mut *tx)
            .await?;
        Ok(seq)
    }

    /// Of `names`, the first that is no namespace (read without locking).
    pub(super) async fn first_unknown_namespace(
        tx: &mut DB::Connection,
        names: &[&str],
    ) -> Result<Option<String>, StoreError> {
        for name in names {
            let found: Option<(String,)> =
                sqlx::query_as("SELECT id FROM namespaces WHERE name = $1")
                    .bind(*name)
                    .fetch_optional(&mut *tx)
                    .await?;
            if found.is_none() {
                return Ok(Some(name.to_string()));
            }
        }
        Ok(None)
    }

    /// Refuses a change that demoted, disabled or deleted `changed` and
    /// left no enabled account admin ([`PolicyViolation::LastAdmin`]); the
    /// caller's transaction then rolls back when dropped.
    async fn keep_an_admin(tx: &mut DB::Connection, changed: &Principal) -> Result<(), StoreError> {
        let (any_left,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM principals WHERE account_role = 'admin' AND NOT disabled)",
        )
        .fetch_one(&mut *tx)
        .await?;
        if any_left {
            return Ok(());
        }
        Err(PolicyViolation::LastAdmin {
            name: changed.name.clone(),
        }
        .into())
    }

    async fn owner_key_ids(
        tx: &mut DB::Connection,
        owner_id: &str,
    ) -> Result<Vec<KeyId>, StoreError> {
        let ids: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM api_keys WHERE owner_id = $1 ORDER BY id")
                .bind(owner_id)
                .fetch_all(&mut *tx)
                .await?;
        ids.iter().map(|(id,)| key_id(id)).collect()
    }

    async fn namespace_in(
        tx: &mut DB::Connection,
        id: &str,
        lock: &str,
    ) -> Result<Namespace, StoreError> {
        let row: Option<NamespaceRow> =
            sqlx::query_as(&format!("SELECT * FROM namespaces WHERE id = $1{lock}"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        row.map(Namespace::from)
            .ok_or_else(|| namespace_not_found(id))
    }

    async fn key_in(tx: &mut DB::Connection, id: &KeyId, lock: &str) -> Result<ApiKey, StoreError> {
        Self::key(&mut *tx, id, lock)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "API key",
                id: id.to_string(),
            })
    }

    /// Checks that the owner exists with the stated type, and locks its row
    /// until commit: concurrent key creations for one owner queue here, so
    /// each counts the keys the ones before it committed.
    async fn lock_owner(
        tx: &mut DB::Connection,
        owner_id: &str,
        owner_type: OwnerType,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "SELECT kind FROM principals WHERE id = $1{}",
            DB::lock(Lock::Update)
        );
        let kind: Option<(String,)> = sqlx::query_as(&sql)
            .bind(owner_id)
            .fetch_optional(&mut *tx)
            .await?;
        if kind.as_ref().map(|(kind,)| kind.as_str()) != Some(owner_type.as_str()) {
            return Err(PolicyViolation::UnknownOwner {
                owner_id: owner_id.into(),
                owner_type,
            }
            .into());
        }
        Ok(())
    }

    /// Refuses `adding` more keys for an owner that would then hold more
    /// than the per-owner cap.
    async fn check_room(
        tx: &mut DB::Connection,
        owner_id: &str,
        adding: u64,
        settings: &AccountSettings,
    ) -> Result<(), StoreError> {
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys WHERE owner_id = $1")
            .bind(owner_id)
            .fetch_one(&mut *tx)
            .await?;
        let after = u64::try_from(count).unwrap_or(0) + adding;
        if after > u64::from(settings.max_keys_per_owner) {
            return Err(PolicyViolation::TooManyKeys {
                owner_id: owner_id.into(),
                max: settings.max_keys_per_owner,
            }
            .into());
        }
        Ok(())
    }

    /// One INSERT of `keys` (at most [`IMPORT_BATCH`]), created now.
    async fn insert_keys(tx: &mut DB::Connection, keys: &[NewKey]) -> Result<(), sqlx::Error> {
        // Each database's own placeholders (`?` for SQLite): SQLite treats
        // `$n` as named parameters and resolves each name by a linear search
        // while preparing, which made a 10,000-parameter INSERT quadratic
        // (1,000,000 keys imported in 2 minutes instead of 12 s). By hand,
        // not with sqlx's QueryBuilder: its arguments borrow the builder for
        // their own lifetime, which generic code cannot shorten.
        let now = to_ms(SystemTime::now());
        let mut sql = String::from(
            "INSERT INTO api_keys (id, secret_digest, display_name, description, owner_id, \
             owner_type, namespaces, expiry_ms, disabled, created_ms, modified_ms) VALUES ",
        );
        let mut args = DB::Arguments::default();
        // Borrowed, not owned: the arguments must outlive the SQL's borrow
        // by the query, which generic code cannot shorten (as above).
        let mut values = Values {
            sql: &mut sql,
            args: &mut args,
        };
        for (row, key) in keys.iter().enumerate() {
            values.sql.push_str(if row == 0 { "(" } else { ", (" });
            values.push(key.id.as_str())?;
            values.push(&key.digest.as_bytes()[..])?;
            values.push(key.display_name.as_str())?;
            values.push(key.description.as_str())?;
            values.push(key.owner_id.as_str())?;
            values.push(key.owner_type.as_str())?;
            let namespaces = serde_json::to_string(&key.namespaces).unwrap_or_else(|_| "[]".into());
            values.push(namespaces)?;
            values.push(key.expiry.map(to_ms))?;
            values.push(key.disabled)?;
            values.push(now)?;
            values.push(now)?;
            values.sql.push(')');
        }
        sqlx::query_with(&sql, args).execute(&mut *tx).await?;
        Ok(())
    }
}

/// An INSERT's VALUES list being written: its SQL, and the arguments its
/// placeholders bind.
struct Values<'v, 'q, DB: Database> {
    sql: &'v mut String,
    args: &'v mut DB::Arguments<'q>,
}

impl<'q, DB: Database> Values<'_, 'q, DB> {
    /// Binds `value` and writes its placeholder, after a comma unless it
    /// opens a row.
    fn push<T>(&mut self, value: T) -> Result<(), sqlx::Error>
    where
        T: 'q + Encode<'q, DB> + Type<DB>,
    {
        if !self.sql.ends_with('(') {
            self.sql.push_str(", ");
        }
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        self.args
            .format_placeholder(self.sql)
            .map_err(|e| sqlx::Error::Encode(e.into()))
    }
}

/// Rows per INSERT when importing keys: 11 parameters a row stays well
/// inside SQLite's and PostgreSQL's limits on bound parameters.
const IMPORT_BATCH: usize = 1000;

/// How many keys each owner in an import gets, for the cap check.
fn import_counts(keys: &[NewKey]) -> BTreeMap<(&str, OwnerType), u64> {
    let mut counts = BTreeMap::new();
    for key in keys {
        *counts
            .entry((key.owner_id.as_str(), key.owner_type))
            .or_insert(0) += 1;
    }
    counts
}

/// The names a principal's grants are on.
fn granted_names(spec: &PrincipalSpec) -> Vec<&str> {
    spec.access.namespaces.keys().map(String::as_str).collect()
}

/// The verdict on a change's namespaces: the first unknown one, if any.
fn namespaces_known(unknown: Option<String>) -> Result<(), StoreError> {
    match unknown {
        Some(name) => Err(PolicyViolation::UnknownNamespace(name).into()),
        None => Ok(()),
    }
}

/// An insert's error, as `AlreadyExists` when it broke a unique name.
fn name_taken(error: sqlx::Error, kind: &'static str, name: String) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::AlreadyExists { kind, name }
        }
        _ => error.into(),
    }
}

fn namespace_not_found(id: &str) -> StoreError {
    StoreError::NotFound {
        kind: "namespace",
        id: id.into(),
    }
}

/// Checks `expected` against the row's current version.
fn check_version(expected: Option<i64>, current: i64) -> Result<(), StoreError> {
    match expected {
        Some(given) if given != current => Err(StoreError::StaleVersion { given, current }),
        _ => Ok(()),
    }
}

fn max_days(d: Duration) -> u64 {
    d.as_secs().div_ceil(86_400)
}

/// The lifetime policy: an expiry is required (unless the limit is zero), in
/// the future, and within the limit. Public for `bootstrap`, which checks
/// it before writing its admin (the key is written after, on its own).
pub fn check_lifetime(
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
