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
//! The changes themselves are written once for both stores (`writes.rs`);
//! the locks above are what this file's `impl Dialect` adds to them.
//!
//! It never sees a secret, and never logs a connection URL (it may hold a
//! password).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::queries::{Sql, NO_LOCK};
use super::sql_store::sql_key_store;
use super::writes::{Changed, Dialect, Lock, UsageSweep};
use super::*;
use crate::key::{Digest, KeyId};

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

/// How long the server lets one of keygate's sessions sit in a
/// transaction without a statement before it ends the session. keygate
/// never waits between the statements of a transaction (milliseconds), so
/// only a session cut off from keygate reaches it.
const ABANDONED_TRANSACTION_TIMEOUT: &str = "15s";

/// Has the server end a transaction whose client went silent.
///
/// Why: a partition that catches keygate between a transaction's last
/// statement and its commit leaves the transaction open on the server, with
/// its locks (a key's row, [`CHANGE_LOCK`], which every change of every
/// replica takes), until the server's TCP notices the client is gone:
/// hours with the default keepalives. Every replica's writes would wait
/// that long. A `SET` after connecting, not a startup option, because
/// poolers such as PgBouncer refuse startup options they do not know.
async fn end_abandoned_transactions(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET idle_in_transaction_session_timeout = '{ABANDONED_TRANSACTION_TIMEOUT}'"
    ))
    .execute(conn)
    .await
    .map(|_| ())
}

/// Whether a connection given back to the pool still answers, within
/// [`ACQUIRE_TIMEOUT`]; one that does not is closed instead of kept.
///
/// Why: sqlx pings every connection it takes back, without a time limit. A
/// read given up on (the authenticator's or the feed's timeout) over a
/// connection that a silent partition cut off would have that ping wait as
/// long as TCP does (about 15 minutes), and the connection's place in the
/// pool with it: after [`MAX_CONNECTIONS`] such reads, no query could get
/// a connection even once the store was reachable again. The price is one
/// more round trip per query given back (sqlx's own ping follows).
async fn answers_in_time(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let ping = tokio::time::timeout(ACQUIRE_TIMEOUT, sqlx::Connection::ping(conn)).await;
    Ok(matches!(ping, Ok(Ok(()))))
}

pub struct PostgresStore {
    /// Every query and transaction; also lends the listener its connection.
    pool: PgPool,
    /// When a usage flush next forgets idle flush streams.
    usage_sweep: UsageSweep,
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
            .after_connect(|conn, _| Box::pin(end_abandoned_transactions(conn)))
            .after_release(|conn, _| Box::pin(answers_in_time(conn)))
            .connect_with(options)
            .await?;
        let migrator = super::tolerant(sqlx::migrate!("./migrations/postgres"));
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Corrupt(format!("migration failed: {e}")))?;
        let (applied,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
                .fetch_one(&pool)
                .await?;
        super::note_newer_schema(&migrator, applied);
        Ok(PostgresStore {
            pool,
            usage_sweep: UsageSweep::default(),
        })
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

// === impl Dialect for Postgres ===

impl Dialect for Postgres {
    fn lock(lock: Lock) -> &'static str {
        match lock {
            Lock::Share => " FOR SHARE",
            Lock::Update => " FOR UPDATE",
            Lock::UpdateKeyRow => " FOR UPDATE OF k",
        }
    }

    /// Takes [`ADMINS_LOCK`]: first, before any row lock (see the module doc).
    async fn lock_admins(tx: &mut PgConnection) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ADMINS_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Share-locks the namespaces, in id order, before the principal's row
    /// (see the module doc's lock order). Locked, they cannot disappear
    /// before commit.
    async fn unknown_namespace(
        tx: &mut PgConnection,
        names: &[&str],
    ) -> Result<Option<String>, StoreError> {
        if names.is_empty() {
            return Ok(None);
        }
        let found: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM namespaces WHERE name = ANY($1) ORDER BY id FOR SHARE",
        )
        .bind(names)
        .fetch_all(&mut *tx)
        .await?;
        Ok(names
            .iter()
            .find(|name| !found.iter().any(|f| f == *name))
            .map(|name| name.to_string()))
    }

    /// Appends under [`CHANGE_LOCK`], held until commit, so that seqs commit
    /// in order; its holder must never wait for a row lock, so this is the
    /// change's last write. Then `NOTIFY`, which PostgreSQL delivers only if
    /// and when the transaction commits.
    async fn record_change(tx: &mut PgConnection, change: Changed<'_>) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CHANGE_LOCK)
            .execute(&mut *tx)
            .await?;
        let seq = Sql::<Postgres>::append_change(tx, change).await?;
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
}

// === impl KeyStore for PostgresStore ===

sql_key_store!(PostgresStore, reads: pool);

/// What `sql_key_store!` forwards to: the parts of `KeyStore` PostgreSQL
/// does its own way.
impl PostgresStore {
    /// Nothing to check: the server owns its files.
    fn still_there(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close_pools(&self) {
        // Ends the sessions now rather than when the server notices the
        // process has gone.
        self.pool.close().await;
    }

    async fn keys_that_exist(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError> {
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

    async fn add_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError> {
        if batch.is_empty() {
            return Ok(Recorded::Applied);
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
        // The flush's claim comes first: it is the only row two attempts
        // of one flush both write, so the later waits there holding nothing.
        if !Sql::<Postgres>::open_usage_flush(&mut tx, flush, &self.usage_sweep).await? {
            tx.rollback().await?;
            return Ok(Recorded::AlreadyApplied);
        }
        // The keys are share-locked first, so none is deleted between the
        // join below and the foreign key's check (a deleted key's usage is
        // dropped, not an error). Every replica flushes usage for the same
        // hot keys: the upsert takes their usage rows in one global order
        // (by id), so two flushes cannot deadlock.
        sqlx::query("SELECT id FROM api_keys WHERE id = ANY($1) ORDER BY id FOR KEY SHARE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO key_usage (key_id, request_count, last_used_ms) \
             SELECT v.id, v.n, v.t FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS v(id, n, t) \
             JOIN api_keys k ON k.id = v.id ORDER BY v.id \
             ON CONFLICT (key_id) DO UPDATE SET \
             request_count = key_usage.request_count + excluded.request_count, \
             last_used_ms = GREATEST(COALESCE(key_usage.last_used_ms, 0), excluded.last_used_ms)",
        )
        .bind(&ids)
        .bind(&counts)
        .bind(&last_used)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Recorded::Applied)
    }

    async fn change_subscription(&self) -> Result<Option<Box<dyn ChangeSubscription>>, StoreError> {
        let channel = heartbeat_channel();
        let listener = listen(&self.pool, &channel).await?;
        Ok(Some(Box::new(PgSubscription::new(
            self.pool.clone(),
            listener,
            channel,
        ))))
    }
}

// === impl ChangeSubscription for PgSubscription ===

/// How long the listening connection may hear nothing before the
/// subscription checks that it still can: it announces to itself, on a
/// channel of its own, and waits [`HEARTBEAT_WAIT`] to hear that.
///
/// Why: a silent partition (a failed-over primary, a firewall change)
/// leaves an idle connection open with nothing to tell it apart from a
/// quiet one, and TCP never gives up on a connection that sends nothing.
/// Announcements would stop for good, leaving only the poll. The cost is
/// one `NOTIFY`, heard by this replica alone, per quiet interval.
const LISTENER_QUIET: Duration = Duration::from_secs(10);

/// How long a self-announcement may take to come back.
const HEARTBEAT_WAIT: Duration = Duration::from_secs(3);

/// `LISTEN keygate_changes` on a connection of its own, re-established
/// after it drops or stops hearing its own heartbeat.
struct PgSubscription {
    /// Where a new listening connection comes from after a failure, and
    /// what heartbeats are sent through.
    pool: PgPool,
    /// The listening connection; `None` after an error, until reconnected.
    listener: Option<PgListener>,
    /// This subscription's own channel, for its heartbeats.
    heartbeat_channel: String,
}

impl PgSubscription {
    fn new(pool: PgPool, listener: PgListener, heartbeat_channel: String) -> PgSubscription {
        PgSubscription {
            pool,
            listener: Some(listener),
            heartbeat_channel,
        }
    }
}

/// Announces on a subscription's own channel, through the pool.
async fn send_heartbeat(pool: &PgPool, channel: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(pool)
        .await?;
    Ok(())
}

async fn listen(pool: &PgPool, heartbeat_channel: &str) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([CHANNEL, heartbeat_channel]).await?;
    Ok(listener)
}

/// A channel name no other subscription uses (lower-case letters and
/// digits, so it needs no quoting).
fn heartbeat_channel() -> String {
    format!("keygate_heartbeat_{}", KeyId::generate())
}

#[async_trait]
impl ChangeSubscription for PgSubscription {
    async fn next(&mut self) -> Result<Announcement, StoreError> {
        let listener = match &mut self.listener {
            Some(listener) => listener,
            None => {
                // A fresh listener rather than PgListener's own reconnect, so
                // that the caller learns the moment it is back and polls.
                self.listener = Some(listen(&self.pool, &self.heartbeat_channel).await?);
                return Ok(Announcement::Reconnected);
            }
        };
        let mut wait = LISTENER_QUIET;
        loop {
            let received = match tokio::time::timeout(wait, listener.try_recv()).await {
                Ok(received) => received,
                Err(_) if wait == LISTENER_QUIET => {
                    // Quiet for a while: check that this connection hears.
                    let heartbeat = send_heartbeat(&self.pool, &self.heartbeat_channel);
                    let sent = tokio::time::timeout(ACQUIRE_TIMEOUT, heartbeat).await;
                    if let Ok(Err(error)) = sent {
                        tracing::debug!(%error, "change feed: heartbeat not sent");
                    }
                    wait = HEARTBEAT_WAIT;
                    continue;
                }
                Err(_) => {
                    // Its own announcement did not come back: the connection
                    // is cut off, or the store is down. Either way, a new one.
                    self.listener = None;
                    return Err(StoreError::NoAnswer(HEARTBEAT_WAIT));
                }
            };
            return match received {
                Ok(Some(notification)) if notification.channel() == CHANNEL => {
                    Ok(Announcement::Changed(notification.payload().parse().ok()))
                }
                // A heartbeat: the connection hears. Wait on.
                Ok(Some(_)) => {
                    wait = LISTENER_QUIET;
                    continue;
                }
                // Lost and already reconnected (try_recv reconnects eagerly).
                Ok(None) => Ok(Announcement::Reconnected),
                Err(error) => {
                    self.listener = None;
                    Err(error.into())
                }
            };
        }
    }
}
