//! The reads that SQLite and PostgreSQL run the same way, and the audit
//! event every change writes. They are methods of [`Sql`], generic over the
//! sqlx database, called by both backends with their pool or transaction;
//! sqlx's trait bounds are written once, on the impl block. The SQL is
//! written once with `$n` parameters, which SQLite binds by number as
//! PostgreSQL does.
//!
//! The changes both stores make the same way are in `writes.rs`; what stays
//! in `sqlite.rs` and `postgres.rs` is what differs (opening, transactions,
//! locks, the change announcement, the few statements whose SQL differs).

use std::marker::PhantomData;

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use super::rows::{
    AuditRow, ChangeRow, KeyRecordRow, KeyRow, NamespaceRow, PrincipalRow, SettingsRow, KEY_COLUMNS,
};
use super::*;
use crate::key::{random_id, KeyId};

/// The lock clause of a read that locks nothing.
pub(super) const NO_LOCK: &str = "";

/// The statements shared by the SQL stores, for the sqlx database `DB`.
/// Never built: a namespace for functions that share one set of bounds.
pub(super) struct Sql<DB>(PhantomData<DB>);

impl<DB> Sql<DB>
where
    DB: Database,
    for<'r> PrincipalRow: FromRow<'r, DB::Row>,
    for<'r> NamespaceRow: FromRow<'r, DB::Row>,
    for<'r> KeyRow: FromRow<'r, DB::Row>,
    for<'r> KeyRecordRow: FromRow<'r, DB::Row>,
    for<'r> SettingsRow: FromRow<'r, DB::Row>,
    for<'r> AuditRow: FromRow<'r, DB::Row>,
    for<'r> ChangeRow: FromRow<'r, DB::Row>,
    for<'r> (i64,): FromRow<'r, DB::Row>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'c> &'c Pool<DB>: Executor<'c, Database = DB>,
{
    /// The principal of `kind` whose `column` (`id` or `name`, both unique
    /// within a kind) is `value`; `lock` is the clause that locks its row
    /// inside a change (empty outside one). A user's name, its email,
    /// matches ignoring case, as its unique index compares it.
    pub(super) async fn principal_by<'e>(
        store: impl Executor<'e, Database = DB>,
        column: &'static str,
        kind: OwnerType,
        value: &str,
        lock: &str,
    ) -> Result<Option<Principal>, StoreError> {
        let sql = if column == "name" && kind == OwnerType::User {
            // `kind = 'user'` written out, as the partial index's WHERE is,
            // so that the planners can use `users_email_unique_ignoring_case`.
            format!(
                "SELECT * FROM principals WHERE lower(name) = lower($1) AND kind = 'user' \
                 AND kind = $2{lock}"
            )
        } else {
            format!("SELECT * FROM principals WHERE {column} = $1 AND kind = $2{lock}")
        };
        let row: Option<PrincipalRow> = sqlx::query_as(&sql)
            .bind(value)
            .bind(kind.as_str())
            .fetch_optional(store)
            .await?;
        row.map(Principal::try_from).transpose()
    }

    /// The principal of `kind` with this id, which must exist: read inside a
    /// change's transaction, before its checks (with `lock`) or after its
    /// write.
    pub(super) async fn principal_in<'e>(
        tx: impl Executor<'e, Database = DB>,
        kind: OwnerType,
        id: &str,
        lock: &str,
    ) -> Result<Principal, StoreError> {
        Self::principal_by(tx, "id", kind, id, lock)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: principal_kind(kind),
                id: id.into(),
            })
    }

    /// A page of the principals of one kind, in id order.
    pub(super) async fn list_principals(
        pool: &Pool<DB>,
        kind: OwnerType,
        page: &PageRequest,
    ) -> Result<Page<Principal>, StoreError> {
        let size = page_size(page);
        let rows: Vec<PrincipalRow> = sqlx::query_as(
            "SELECT * FROM principals WHERE kind = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(kind.as_str())
        .bind(page.after.as_deref().unwrap_or(""))
        .bind(size + 1)
        .fetch_all(pool)
        .await?;
        let items = rows
            .into_iter()
            .map(Principal::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(paginate(items, size, |p| p.id.clone()))
    }

    /// How many principals of one kind there are.
    pub(super) async fn count_principals<'e>(
        store: impl Executor<'e, Database = DB>,
        kind: OwnerType,
    ) -> Result<u64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM principals WHERE kind = $1")
            .bind(kind.as_str())
            .fetch_one(store)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The namespace with this id, or else this name. Both are unique, but
    /// a name may equal another namespace's id (the admin API refuses such
    /// names now; older stores may hold one): the id wins, so that an id
    /// always names the namespace it was given to.
    pub(super) async fn namespace<'e>(
        store: impl Executor<'e, Database = DB>,
        id_or_name: &str,
    ) -> Result<Option<Namespace>, StoreError> {
        let row: Option<NamespaceRow> = sqlx::query_as(
            "SELECT * FROM namespaces WHERE id = $1 OR name = $1 \
             ORDER BY CASE WHEN id = $1 THEN 0 ELSE 1 END LIMIT 1",
        )
        .bind(id_or_name)
        .fetch_optional(store)
        .await?;
        Ok(row.map(Namespace::from))
    }

    /// A page of namespaces, in id order: all of them, or only those named
    /// in `names`. The filter is in the SQL, before the page is cut, so
    /// that every page but the last is full and a page token is always the
    /// id of a namespace the page showed.
    pub(super) async fn list_namespaces(
        pool: &Pool<DB>,
        names: Option<&[String]>,
        page: &PageRequest,
    ) -> Result<Page<Namespace>, StoreError> {
        let size = page_size(page);
        let mut sql = String::from("SELECT * FROM namespaces WHERE id > $1");
        let mut params = 1;
        if let Some(names) = names {
            if names.is_empty() {
                return Ok(Page {
                    items: Vec::new(),
                    next: None,
                });
            }
            let placeholders: Vec<String> = (0..names.len())
                .map(|i| format!("${}", params + 1 + i))
                .collect();
            params += names.len();
            sql.push_str(&format!(" AND name IN ({})", placeholders.join(", ")));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", params + 1));
        let mut query = sqlx::query_as(&sql).bind(page.after.as_deref().unwrap_or(""));
        for name in names.unwrap_or_default() {
            query = query.bind(name.as_str());
        }
        let rows: Vec<NamespaceRow> = query.bind(size + 1).fetch_all(pool).await?;
        let items = rows.into_iter().map(Namespace::from).collect();
        Ok(paginate(items, size, |n: &Namespace| n.id.clone()))
    }

    /// The account settings; `lock` as for [`Sql::principal_by`].
    pub(super) async fn settings<'e>(
        store: impl Executor<'e, Database = DB>,
        lock: &str,
    ) -> Result<AccountSettings, StoreError> {
        let sql = format!("SELECT * FROM account_settings WHERE id = 1{lock}");
        let row: SettingsRow = sqlx::query_as(&sql).fetch_one(store).await?;
        Ok(row.into())
    }

    /// A key as the admin API shows it, with its owner; `lock` as for
    /// [`Sql::principal_by`] (it must lock the key's row, `k`, alone).
    pub(super) async fn key<'e>(
        store: impl Executor<'e, Database = DB>,
        id: &KeyId,
        lock: &str,
    ) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<KeyRow> =
            sqlx::query_as(&format!("SELECT {KEY_COLUMNS} WHERE k.id = $1{lock}"))
                .bind(id.as_str())
                .fetch_optional(store)
                .await?;
        row.map(ApiKey::try_from).transpose()
    }

    /// A page of keys, in id order, of one owner or kind of owner if asked.
    pub(super) async fn list_keys(
        pool: &Pool<DB>,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let size = page_size(page);
        // Only the filters given are in the SQL, so that the keys are read
        // in id order through the (owner_id, id) or (owner_type, id) index:
        // written as `$2 IS NULL OR k.owner_id = $2`, SQLite walked every
        // key (2.1 s for one owner's key among 1,000,000).
        let mut sql = format!("SELECT {KEY_COLUMNS} WHERE k.id > $1");
        let mut params = 1;
        let mut owner_param = None;
        if filter.owner_id.is_some() {
            params += 1;
            owner_param = Some(params);
            sql.push_str(&format!(" AND k.owner_id = ${params}"));
        }
        if filter.owner_type.is_some() {
            params += 1;
            sql.push_str(&match owner_param {
                // One owner has one kind: checked once, as a constant, so
                // that the planner keeps to the owner's index (SQLite, with
                // no statistics, took the kind's and read 65 ms of keys).
                Some(owner) => {
                    format!(" AND (SELECT kind FROM principals WHERE id = ${owner}) = ${params}")
                }
                None => format!(" AND k.owner_type = ${params}"),
            });
        }
        sql.push_str(&format!(" ORDER BY k.id LIMIT ${}", params + 1));
        let mut query = sqlx::query_as(&sql).bind(page.after.as_deref().unwrap_or(""));
        if let Some(owner_id) = &filter.owner_id {
            query = query.bind(owner_id.as_str());
        }
        if let Some(owner_type) = filter.owner_type {
            query = query.bind(owner_type.as_str());
        }
        let rows: Vec<KeyRow> = query.bind(size + 1).fetch_all(pool).await?;
        let items = rows
            .into_iter()
            .map(ApiKey::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(paginate(items, size, |k| k.id.to_string()))
    }

    /// What the proxy needs to verify a key and authorize its owner: the
    /// digests, state and expiry, and the owner's role, grants and state.
    pub(super) async fn key_record(
        pool: &Pool<DB>,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRecordRow> = sqlx::query_as(
            "SELECT k.id, k.secret_digest, k.previous_digest, k.previous_valid_until_ms, \
             k.disabled, k.expiry_ms, k.namespaces, p.id AS owner_id, p.kind AS owner_type, \
             p.name AS owner_name, p.account_role, p.namespace_access, p.disabled AS owner_disabled \
             FROM api_keys k JOIN principals p ON p.id = k.owner_id WHERE k.id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(pool)
        .await?;
        row.map(KeyRecord::try_from).transpose()
    }

    /// A page of the audit trail, newest first; the cursor is the last
    /// event's sequence number.
    pub(super) async fn list_audit(
        pool: &Pool<DB>,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>, StoreError> {
        let size = page_size(page);
        let before: i64 = match page.after.as_deref() {
            Some(cursor) => cursor.parse().unwrap_or(i64::MAX),
            None => i64::MAX,
        };
        let rows: Vec<AuditRow> =
            sqlx::query_as("SELECT * FROM audit_events WHERE seq < $1 ORDER BY seq DESC LIMIT $2")
                .bind(before)
                .bind(size + 1)
                .fetch_all(pool)
                .await?;
        let size_usize = usize::try_from(size).unwrap_or(usize::MAX);
        let next = (rows.len() > size_usize).then(|| rows[size_usize - 1].seq.to_string());
        let items = rows
            .into_iter()
            .take(size_usize)
            .map(|r| AuditEvent {
                id: r.id,
                time: from_ms(r.time_ms),
                actor_id: r.actor_id,
                actor_type: r.actor_type,
                actor_name: r.actor_name,
                action: r.action,
                target_type: r.target_type,
                target_id: r.target_id,
                detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null),
            })
            .collect();
        Ok(Page { items, next })
    }

    /// Up to [`CHANGE_BATCH`] changes after `watermark`, and the watermark to
    /// ask with next. Seqs are assigned one writer at a time (SQLite's single
    /// writer, PostgreSQL's change lock) and committed before the next is
    /// assigned, so `seq > watermark` never skips a change that commits later
    /// with a smaller seq.
    pub(super) async fn changes_since(
        pool: &Pool<DB>,
        watermark: i64,
    ) -> Result<(i64, Vec<Change>), StoreError> {
        let rows: Vec<ChangeRow> =
            sqlx::query_as("SELECT * FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(watermark)
                .bind(CHANGE_BATCH)
                .fetch_all(pool)
                .await?;
        let changes = rows
            .into_iter()
            .map(Change::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let next = match changes.last() {
            Some(last) => last.seq,
            None => {
                let (head,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM changes")
                    .fetch_one(pool)
                    .await?;
                head
            }
        };
        Ok((next, changes))
    }

    /// Records who did what to which resource, inside the change's own
    /// transaction: the audit trail has every change that committed and
    /// nothing that did not.
    pub(super) async fn audit<'e>(
        tx: impl Executor<'e, Database = DB>,
        actor: &Actor,
        action: &str,
        target_type: &str,
        target_id: &str,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO audit_events (id, time_ms, actor_id, actor_type, actor_name, action, \
             target_type, target_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(random_id())
        .bind(to_ms(SystemTime::now()))
        .bind(actor.id.as_str())
        .bind(actor.kind.as_str())
        .bind(actor.name.as_str())
        .bind(action)
        .bind(target_type)
        .bind(target_id)
        .bind(detail.to_string())
        .execute(tx)
        .await?;
        Ok(())
    }
}

/// How a principal's kind is named in errors.
pub(super) fn principal_kind(kind: OwnerType) -> &'static str {
    match kind {
        OwnerType::User => "user",
        OwnerType::ServiceAccount => "service account",
    }
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
