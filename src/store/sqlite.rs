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
//! The statements are shared with the PostgreSQL backend (`queries.rs`,
//! `writes.rs`); here are the ones whose SQL differs, and the [`Dialect`]:
//! inside a change, the one writer needs no locks.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection, SqlitePool, Transaction};

use super::queries::{Sql, NO_LOCK};
use super::sql_store::sql_key_store;
use super::writes::{Changed, Dialect, Lock, UsageSweep};
use super::*;
use crate::key::{Digest, KeyId};

/// Keys per statement that binds parameters per key (usage UPDATEs bind
/// three each): under SQLite's default limit on bound parameters in older
/// builds (999).
const KEYS_PER_STATEMENT: usize = 300;

pub struct SqliteStore {
    /// Read-only connections for lookups and listings.
    reader: SqlitePool,
    /// The single writer connection: serialises every change.
    writer: SqlitePool,
    /// The database file as opened, to notice it deleted or replaced under
    /// the running process ([`SqliteStore::still_there`]).
    file: OpenedFile,
    /// When a usage flush next forgets idle flush streams.
    usage_sweep: UsageSweep,
}

/// A database file's path and identity (device and inode) when opened.
/// SQLite goes on reading and writing the file it opened whatever happens
/// to its name: after a `rm keygate.db` (a clean-up script, a volume
/// remounted) or a backup copied over it, every change would be confirmed
/// and then lost at the next start, which opens whatever the path names.
struct OpenedFile {
    path: std::path::PathBuf,
    /// `None` where the identity cannot be read (not Unix): not checked.
    identity: Option<(u64, u64)>,
}

impl OpenedFile {
    fn of(path: &std::path::Path) -> OpenedFile {
        OpenedFile {
            path: path.to_path_buf(),
            identity: file_identity(path),
        }
    }
}

#[cfg(unix)]
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(_: &std::path::Path) -> Option<(u64, u64)> {
    None
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
        let options = SqliteConnectOptions::from_str(url)?;
        create_private(options.get_filename());
        let options = options
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
        let migrator = super::tolerant(sqlx::migrate!("./migrations/sqlite"));
        migrator
            .run(&writer)
            .await
            .map_err(|e| StoreError::Corrupt(format!("migration failed: {e}")))?;
        let (applied,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
                .fetch_one(&writer)
                .await?;
        super::note_newer_schema(&migrator, applied);
        let file = OpenedFile::of(options.get_filename());
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore {
            reader,
            writer,
            file,
            usage_sweep: UsageSweep::default(),
        })
    }

    /// The database file a `sqlite:` URL names; `None` when the URL cannot
    /// be read as one.
    pub fn file_of(url: &str) -> Option<std::path::PathBuf> {
        let options = SqliteConnectOptions::from_str(url).ok()?;
        Some(options.get_filename().to_path_buf())
    }

    /// Writes a consistent copy of the whole store at `url`, what the
    /// write-ahead log holds included, into the new file `to` (`VACUUM
    /// INTO`: one read transaction, so a server may go on writing
    /// meanwhile).
    ///
    /// The store is opened through one read-only connection, not [`open`]:
    /// a backup copies the store as it is, so it neither creates a missing
    /// one nor runs this binary's migrations on a store a running (perhaps
    /// older) keygate is serving.
    ///
    /// [`open`]: SqliteStore::open
    pub async fn back_up(url: &str, to: &std::path::Path) -> Result<(), StoreError> {
        let to = to.to_str().ok_or_else(|| {
            StoreError::Unavailable(sqlx::Error::Configuration(
                "the backup path must be UTF-8".into(),
            ))
        })?;
        // The copy holds what the store does: private too. Created here
        // (VACUUM INTO writes into an empty file), so an existing one is
        // refused rather than made private.
        create_new_private(std::path::Path::new(to))
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        let copied = Self::vacuum_into(url, to).await;
        if copied.is_err() {
            // Nothing worth keeping: the empty file made above.
            let _ = std::fs::remove_file(to);
        }
        copied
    }

    async fn vacuum_into(url: &str, to: &str) -> Result<(), StoreError> {
        let mut source = SqliteConnectOptions::from_str(url)?
            .read_only(true)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        let copied = sqlx::query("VACUUM INTO ?")
            .bind(to)
            .execute(&mut source)
            .await;
        // Closed whatever the copy returned: the connection is the
        // process's only one, and closing it lets SQLite tidy its files.
        let closed = source.close().await;
        copied?;
        Ok(closed?)
    }

    /// Fails when the database file this store opened is no longer the
    /// one its path names (deleted, or replaced by another file): changes
    /// written now would be lost at the next start, so writes are refused
    /// and `/readyz` says not ready until keygate is restarted.
    fn still_there(&self) -> Result<(), StoreError> {
        let Some(opened) = self.file.identity else {
            return Ok(());
        };
        if file_identity(&self.file.path) == Some(opened) {
            return Ok(());
        }
        Err(StoreError::Unavailable(sqlx::Error::Io(
            std::io::Error::other(format!(
                "the database file {} was deleted or replaced while keygate ran; \
             restart keygate to open what is there now",
                self.file.path.display()
            )),
        )))
    }

    async fn begin(&self) -> Result<Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.still_there()?;
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

/// Creates the database file empty, readable and writable by this user only
/// (0600), when nothing is there yet: the store holds key digests and the
/// audit log. SQLite would create it 0644 less the umask (world-readable
/// under the usual 022), and creates the `-wal` and `-shm` files with the
/// database file's mode, so they follow. An empty file is an empty database
/// to SQLite.
///
/// Done here rather than with a umask around the open: the umask is the
/// whole process's, and other threads create files meanwhile (and sqlx
/// opens on a worker thread of its own). An existing file keeps the mode
/// its operator gave it. Any failure (a read-only directory, a missing one)
/// is left for SQLite to report, as it would have.
fn create_private(path: &std::path::Path) {
    if path.as_os_str().is_empty() || path.exists() {
        return;
    }
    let _ = create_new_private(path);
}

/// Creates `path` empty with mode 0600 (on Unix), failing if it exists.
fn create_new_private(path: &std::path::Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
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

// === impl Dialect for Sqlite ===

/// Every change runs on the one writer connection under `BEGIN IMMEDIATE`,
/// which already excludes every other writer, in this process or another:
/// nothing to lock, and the feed's appends are serialised by it.
impl Dialect for Sqlite {
    fn lock(_: Lock) -> &'static str {
        NO_LOCK
    }

    async fn lock_admins(_: &mut SqliteConnection) -> Result<(), StoreError> {
        Ok(())
    }

    async fn unknown_namespace(
        tx: &mut SqliteConnection,
        names: &[&str],
    ) -> Result<Option<String>, StoreError> {
        Sql::<Sqlite>::first_unknown_namespace(tx, names).await
    }

    async fn record_change(
        tx: &mut SqliteConnection,
        change: Changed<'_>,
    ) -> Result<(), StoreError> {
        Sql::<Sqlite>::append_change(tx, change).await?;
        Ok(())
    }
}

// === impl KeyStore for SqliteStore ===

sql_key_store!(SqliteStore, reads: reader);

/// What `sql_key_store!` forwards to: the parts of `KeyStore` SQLite does
/// its own way.
impl SqliteStore {
    /// Moves the write-ahead log into the database file and empties it
    /// before closing: until then the latest changes live only in
    /// `keygate.db-wal` (after a first start, everything did, beside a 4 KiB
    /// `keygate.db`), so a copy of the file alone, the usual backup, would
    /// miss them, and the next process to write would pay for the whole log
    /// at its first commit (184 MB after importing 1,000,000 keys). When
    /// this is the file's last connection SQLite also removes the log.
    async fn close_pools(&self) {
        // Read-only connections cannot checkpoint: they close first, so the
        // writer is the last connection.
        self.reader.close().await;
        // Another process still reading the file (a server beside a CLI
        // command) can keep the checkpoint from finishing; its own
        // checkpoints then do it.
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.writer)
            .await
        {
            Ok((0, _, _)) => {}
            Ok(_) => tracing::debug!(
                "another process is using the key store; its log stays for it to checkpoint"
            ),
            Err(error) => {
                tracing::warn!(%error, "could not checkpoint the key store's write-ahead log")
            }
        }
        self.writer.close().await;
    }

    async fn keys_that_exist(&self, ids: &[KeyId]) -> Result<Vec<KeyId>, StoreError> {
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

    async fn add_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError> {
        if batch.is_empty() {
            return Ok(Recorded::Applied);
        }
        // One statement per chunk of keys, not per key: a flush of
        // thousands of keys was as many statements through the worker
        // thread. The join drops keys deleted since they were counted (the
        // one writer holds the file, so none goes while this runs); `WHERE
        // true` is SQLite's way to tell the upsert's ON CONFLICT from a
        // join's ON.
        let mut tx = self.begin().await?;
        if !Sql::<Sqlite>::open_usage_flush(&mut tx, flush, &self.usage_sweep).await? {
            tx.rollback().await?;
            return Ok(Recorded::AlreadyApplied);
        }
        for chunk in batch.chunks(KEYS_PER_STATEMENT) {
            let rows = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO key_usage (key_id, request_count, last_used_ms) \
                 SELECT v.column1, v.column2, v.column3 FROM (VALUES {rows}) AS v \
                 JOIN api_keys k ON k.id = v.column1 WHERE true \
                 ON CONFLICT (key_id) DO UPDATE SET \
                 request_count = request_count + excluded.request_count, \
                 last_used_ms = MAX(COALESCE(last_used_ms, 0), excluded.last_used_ms)"
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
        Ok(Recorded::Applied)
    }

    /// No notifications: the feed polls `changes_since`.
    async fn change_subscription(&self) -> Result<Option<Box<dyn ChangeSubscription>>, StoreError> {
        Ok(None)
    }
}
