//! Upgrading a store that holds data: a database left by an earlier
//! keygate, at the schema before usage moved into `key_usage` and keys
//! carried their owner's kind, keeps every key's usage and learns the kinds
//! when the current keygate opens it, on both backends; `keygate backup`
//! copies such a store without upgrading it.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keygate::key::KeyId;
use keygate::store::{
    self, Actor, FlushId, KeyFilter, KeyStore, OwnerType, PageRequest, UsageDelta,
};
use sqlx::migrate::Migrator;
use support::postgres::PgDatabase;
use support::run_cli;

/// `migrator` cut to the migrations before `first_new`.
fn before(mut migrator: Migrator, first_new: i64) -> Migrator {
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version < first_new)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator
}

/// An owner and two keys as the earlier schema kept them: usage in the
/// keys' own rows, one key used 42 times, one never. `digest` is the SQL
/// of a 32-byte value in the backend's dialect.
fn old_rows(used: &KeyId, unused: &KeyId, digest: &str) -> Vec<String> {
    vec![
        "INSERT INTO principals (id, kind, name, account_role, created_ms, modified_ms) \
         VALUES ('owner1', 'user', 'old@example.com', 'developer', 1, 1)"
            .into(),
        format!(
            "INSERT INTO api_keys (id, secret_digest, display_name, owner_id, created_ms, \
             modified_ms, last_used_ms, request_count) \
             VALUES ('{used}', {digest}, 'used', 'owner1', 1, 1, 1700000000000, 42)"
        ),
        format!(
            "INSERT INTO api_keys (id, secret_digest, display_name, owner_id, created_ms, \
             modified_ms) VALUES ('{unused}', {digest}, 'unused', 'owner1', 1, 1)"
        ),
    ]
}

/// What the upgraded store shows and does: the old counts, none for the
/// unused key, new counts landing, and a deleted key's usage going with it.
async fn check_upgraded(store: &dyn KeyStore, used: &KeyId, unused: &KeyId) {
    let key = store.get_key(used).await.unwrap().expect("the used key");
    assert_eq!(key.request_count, 42);
    assert_eq!(
        key.last_used,
        Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
    );
    let key = store
        .get_key(unused)
        .await
        .unwrap()
        .expect("the unused key");
    assert_eq!((key.request_count, key.last_used), (0, None));
    // The keys learnt their owner's kind, and list by it.
    for (kind, expected) in [(OwnerType::User, 2), (OwnerType::ServiceAccount, 0)] {
        let filter = KeyFilter {
            owner_id: None,
            owner_type: Some(kind),
        };
        let page = PageRequest {
            size: 10,
            after: None,
        };
        let listed = store.list_keys(&filter, &page).await.unwrap();
        assert_eq!(listed.items.len(), expected, "{kind:?}");
        assert!(listed.items.iter().all(|k| k.owner_type == kind));
    }

    let now = SystemTime::now();
    let deltas = [used, unused].map(|id| UsageDelta {
        id: *id,
        requests: 1,
        last_used: now,
    });
    store
        .record_usage(&FlushId::first_of_new_stream(), &deltas)
        .await
        .unwrap();
    assert_eq!(
        store.get_key(used).await.unwrap().unwrap().request_count,
        43
    );
    assert_eq!(
        store.get_key(unused).await.unwrap().unwrap().request_count,
        1
    );
    store
        .delete_key(&Actor::system("test"), used)
        .await
        .unwrap();
    assert!(store.get_key(used).await.unwrap().is_none());
}

/// Runs the earlier migrations on `pool`, then `rows`.
async fn seed<DB>(pool: &sqlx::Pool<DB>, old: Migrator, rows: Vec<String>)
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    old.run(pool).await.unwrap();
    for sql in rows {
        sqlx::raw_sql(&sql).execute(pool).await.unwrap();
    }
}

/// A SQLite store at `url` as the earlier schema (before migration 3)
/// left it, holding [`old_rows`]: the used key and the unused one.
async fn old_sqlite_store(url: &str) -> (KeyId, KeyId) {
    let (used, unused) = (KeyId::generate(), KeyId::generate());
    let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc"))
        .await
        .unwrap();
    let old = before(sqlx::migrate!("./migrations/sqlite"), 3);
    seed(&pool, old, old_rows(&used, &unused, "zeroblob(32)")).await;
    pool.close().await;
    (used, unused)
}

const USAGE_ROWS: &str = "SELECT key_id, request_count FROM key_usage";

/// The usage table after [`check_upgraded`]: the deleted key's row went
/// with it, the other key's holds its one request.
fn assert_only(rows: Vec<(String, i64)>, unused: &KeyId) {
    assert_eq!(rows, vec![(unused.to_string(), 1)]);
}

#[tokio::test]
async fn sqlite_keeps_usage_across_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let (used, unused) = old_sqlite_store(&url).await;
    let store = store::open(&url).await.unwrap();
    check_upgraded(&*store, &used, &unused).await;
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows = sqlx::query_as(USAGE_ROWS).fetch_all(&pool).await;
    assert_only(rows.unwrap(), &unused);
}

#[tokio::test]
async fn postgres_keeps_usage_across_the_upgrade() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let (used, unused) = (KeyId::generate(), KeyId::generate());
    {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let old = before(sqlx::migrate!("./migrations/postgres"), 2);
        seed(
            &pool,
            old,
            old_rows(&used, &unused, "decode(repeat('00', 32), 'hex')"),
        )
        .await;
        pool.close().await;
    }
    let store = store::open(&db.url).await.unwrap();
    check_upgraded(&*store, &used, &unused).await;
    store.close().await;

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let rows = sqlx::query_as(USAGE_ROWS).fetch_all(&pool).await;
    assert_only(rows.unwrap(), &unused);
}

/// The highest migration a SQLite store at `url` has run.
async fn sqlite_schema_version(url: &str) -> i64 {
    let pool = sqlx::SqlitePool::connect(url).await.unwrap();
    let (version,) = sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    version
}

/// `keygate backup` copies a store as it is: one left by an earlier
/// keygate (which may still be serving it) is neither upgraded by the
/// newer binary that backs it up nor in the copy, and the copy upgrades
/// like the original when a keygate opens it.
#[tokio::test]
async fn sqlite_backup_leaves_an_older_store_at_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("keygate.db");
    let url = format!("sqlite://{}", original.display());
    let (used, unused) = old_sqlite_store(&url).await;
    let before_backup = std::fs::read(&original).unwrap();

    let copy = dir.path().join("copy.db");
    run_cli(["backup", "--to", copy.to_str().unwrap(), "--store", &url]);
    assert_eq!(sqlite_schema_version(&url).await, 2);
    assert_eq!(std::fs::read(&original).unwrap(), before_backup);
    let copy_url = format!("sqlite://{}", copy.display());
    assert_eq!(sqlite_schema_version(&copy_url).await, 2);

    let store = store::open(&copy_url).await.unwrap();
    check_upgraded(&*store, &used, &unused).await;
    store.close().await;
}

/// What a newer keygate's migration would leave: a column older code does
/// not know, and the migration's row, which older code has no file for.
const NEWER_MIGRATION: [&str; 2] = [
    "ALTER TABLE api_keys ADD COLUMN from_the_future TEXT NOT NULL DEFAULT ''",
    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
     VALUES (99990101000000, 'from a newer keygate', TRUE, X'00', 0)",
];

/// A replica on this keygate opens a store that a newer one has migrated
/// (a rolling upgrade, this replica restarting before its turn) and serves
/// it: reads keys, creates them. Before, sqlx refused to start ("migration
/// 99990101000000 was previously applied but is missing").
async fn a_store_migrated_by_a_newer_keygate_opens(url: &str, newer: &[&str]) {
    let store = store::open(url).await.unwrap();
    let owner = store
        .create_principal(
            &Actor::system("test"),
            OwnerType::User,
            keygate::store::PrincipalSpec {
                name: "old@example.com".into(),
                description: String::new(),
                access: keygate::store::Access {
                    account_role: keygate::store::AccountRole::Developer,
                    namespaces: Default::default(),
                },
                disabled: false,
            },
        )
        .await
        .unwrap();
    store.close().await;
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        for statement in newer {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        for statement in newer {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
    let store = store::open(url)
        .await
        .expect("a store migrated by a newer keygate opens");
    let tokens = keygate::key::TokenFormat::new("kg");
    let (key, _) = keygate::admin::bootstrap::issue_key(
        &*store,
        &tokens,
        &Actor::system("test"),
        &owner,
        "made by the older keygate",
        "",
        Some(Duration::from_secs(3600)),
    )
    .await
    .expect("the older keygate writes keys");
    assert!(store.find_key(&key.id).await.unwrap().is_some());
    store.close().await;
}

#[tokio::test]
async fn sqlite_a_store_migrated_by_a_newer_keygate_opens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    a_store_migrated_by_a_newer_keygate_opens(&url, &NEWER_MIGRATION).await;
}

#[tokio::test]
async fn postgres_a_store_migrated_by_a_newer_keygate_opens() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let newer = NEWER_MIGRATION.map(|s| s.replace("X'00'", "'\\x00'::bytea"));
    let newer: Vec<&str> = newer.iter().map(String::as_str).collect();
    a_store_migrated_by_a_newer_keygate_opens(&db.url, &newer).await;
}

/// The rule that lets a replica on the previous keygate serve a store the
/// next one migrated (`store::tolerant`): from `changes_created` on, a
/// migration adds and never drops, renames or retypes what older code
/// reads.
#[test]
fn later_migrations_only_add() {
    let forbidden = ["DROP TABLE", "DROP COLUMN", "RENAME", "ALTER COLUMN"];
    for (dir, first_additive) in [("migrations/postgres", 6), ("migrations/sqlite", 7)] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&path).unwrap() {
            let file = entry.unwrap().path();
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let version: u32 = name[..4].parse().unwrap();
            if version < first_additive {
                continue;
            }
            let sql: String = std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .to_uppercase();
            for word in forbidden {
                assert!(!sql.contains(word), "{dir}/{name} holds {word}");
            }
        }
    }
}
