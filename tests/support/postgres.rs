//! PostgreSQL for tests: a fresh database per test on the machine's server
//! (`KEYGATE_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped afterwards, and the means to make it unreachable and bring it back
//! without touching the server itself.
//!
//! When the server is unreachable the tests FAIL, saying why, unless
//! `KEYGATE_SKIP_POSTGRES=1` is set; then they say loudly that they were
//! skipped. They never pass silently.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use sqlx::{Connection, PgConnection};

/// The server's maintenance database, where test databases are created.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Every database this helper creates starts with this, and carries the
/// creating process's id, so leftovers of crashed runs can be found.
const PREFIX: &str = "kg_test_";

pub fn admin_url() -> String {
    std::env::var("KEYGATE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into())
}

fn skip_allowed() -> bool {
    std::env::var("KEYGATE_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

/// A database of its own for one test.
pub struct PgDatabase {
    /// The URL keygate opens.
    pub url: String,
    pub name: String,
    admin_url: String,
}

impl PgDatabase {
    /// Creates a fresh, empty database. Returns `None` only when the server
    /// is unreachable and `KEYGATE_SKIP_POSTGRES=1`; panics with the reason
    /// when it is unreachable otherwise.
    pub async fn create() -> Option<PgDatabase> {
        let admin_url = admin_url();
        let mut admin = match PgConnection::connect(&admin_url).await {
            Ok(conn) => conn,
            Err(error) if skip_allowed() => {
                // Straight to the process's stderr: the test harness hides
                // eprintln! output of passing tests, and this must be seen.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED (KEYGATE_SKIP_POSTGRES=1): PostgreSQL is unreachable at {admin_url}: \
                     {error}. These PostgreSQL tests did NOT run."
                );
                return None;
            }
            Err(error) => panic!(
                "PostgreSQL is unreachable at {admin_url}: {error}.\n\
                 The PostgreSQL store tests need a server: start one (trust auth, database \
                 `test`), or point KEYGATE_TEST_POSTGRES at one, or set KEYGATE_SKIP_POSTGRES=1 \
                 to skip them explicitly."
            ),
        };
        static CLEANUP: Once = Once::new();
        let mut first = false;
        CLEANUP.call_once(|| first = true);
        if first {
            drop_leftovers(&mut admin).await;
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            keygate::key::random_id()
        );
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {admin_url}: {e}"));
        let url = with_database(&admin_url, &name);
        Some(PgDatabase {
            url,
            name,
            admin_url,
        })
    }

    /// A connection to the maintenance database (not this one).
    pub async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to the maintenance database")
    }

    /// A direct connection to this database, for fixtures and checks.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Makes the database unreachable, as an outage would: refuses new
    /// connections and ends every open one (the listener's too). The server
    /// keeps running for everyone else.
    pub async fn cut(&self) {
        let mut admin = self.admin().await;
        sqlx::query(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("ALTER DATABASE");
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut admin)
        .await
        .expect("terminate backends");
    }

    /// Ends the outage.
    pub async fn restore(&self) {
        let mut admin = self.admin().await;
        sqlx::query(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("ALTER DATABASE");
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Async work cannot run in drop, and the test's runtime may be
        // shutting down: drop the database from a thread of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// Drops test databases left by runs that crashed (their process is gone).
async fn drop_leftovers(admin: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'kg\\_test\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for name in names {
        let pid = name[PREFIX.len()..].split('_').next().unwrap_or_default();
        let alive = std::path::Path::new("/proc").join(pid).exists();
        if !alive {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// A TCP path to the database server that can fail silently, as a network
/// partition or a failed-over primary does: after [`Self::partition`] the
/// connections open through it stay open and carry nothing more (no reset,
/// no close, so the client learns nothing until TCP gives up, minutes
/// later or, on an idle connection, never), while new connections get
/// through.
pub struct SilentPartition {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
}

impl SilentPartition {
    /// Starts a path to the server that `url` names.
    pub async fn start(url: &str) -> SilentPartition {
        let parsed = reqwest::Url::parse(url).expect("database URL");
        let server = format!(
            "{}:{}",
            parsed.host_str().expect("host"),
            parsed.port().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, watch) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut cut = watch.clone();
                cut.borrow_and_update();
                let server = server.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(server).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        _ = cut.changed() => {}
                    }
                    // Partitioned: both ends held open, nothing carried.
                    std::future::pending::<()>().await;
                    drop((client, server));
                });
            }
        });
        SilentPartition { addr, cut }
    }

    /// `url` with its server replaced by this path.
    pub fn url(&self, url: &str) -> String {
        let mut parsed = reqwest::Url::parse(url).expect("database URL");
        parsed.set_ip_host(self.addr.ip()).expect("ip host");
        parsed.set_port(Some(self.addr.port())).expect("port");
        parsed.into()
    }

    /// Every connection open through this path goes silent, for good.
    pub fn partition(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}
