//! The usage flusher against the real stores (SQLite and PostgreSQL): a
//! flush whose answer never comes is sent again, as it was, and its
//! requests are counted once, whether its first attempt committed (the
//! answer was what got lost) or not (the write itself got stuck).
//!
//! The lost answer is made by a thin wrapper around the real store
//! ([`LosesAnswers`]): the write it lets through is the store's own, in its
//! own transaction; only the answer is held back until the flusher's
//! timeout gives up on it. A real lock cannot hold an answer back after a
//! commit, and a real partition is `tests/replicas.rs`' business.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use keygate::key::{KeyId, TokenFormat};
use keygate::store::{
    self, Access, AccountRole, Actor, FlushId, KeyStore, OwnerType, PrincipalSpec, Recorded,
    StoreError, UsageDelta,
};
use keygate::telemetry::usage::{
    self, FlushCounters, FlushSettings, UsageCell, UsageSink, UsageSource,
};
use prometheus::IntCounter;
use support::postgres::PgDatabase;

/// Where the wrapper loses an answer.
#[derive(Debug, Clone, Copy)]
enum Lose {
    /// After the real write has committed: the flush is in, and the
    /// flusher does not know it.
    AfterTheWrite,
    /// Before the write: the attempt hangs until the flusher's timeout
    /// cancels it, and nothing is written.
    BeforeTheWrite,
}

/// The real store, whose first answer to a usage flush never comes.
struct LosesAnswers {
    store: Arc<dyn KeyStore>,
    lose: Lose,
    /// Answers still to lose.
    left: AtomicU32,
    /// Attempts seen, the lost one included.
    calls: AtomicU32,
}

#[async_trait::async_trait]
impl UsageSink for LosesAnswers {
    async fn record_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let losing = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if losing && matches!(self.lose, Lose::BeforeTheWrite) {
            std::future::pending::<()>().await;
        }
        let answer = self.store.record_usage(flush, batch).await;
        if losing {
            assert!(
                matches!(answer, Ok(Recorded::Applied)),
                "the first write: {answer:?}"
            );
            std::future::pending::<()>().await;
        }
        answer
    }
}

/// A key's usage counter, as the cached key carries it.
struct Used {
    id: KeyId,
    cell: UsageCell,
}

impl UsageSource for Used {
    fn usage_id(&self) -> KeyId {
        self.id
    }

    fn usage_cell(&self) -> &UsageCell {
        &self.cell
    }
}

async fn a_key(store: &dyn KeyStore) -> KeyId {
    let owner = store
        .create_principal(
            &Actor::system("test"),
            OwnerType::User,
            PrincipalSpec {
                name: "flush@example.com".into(),
                description: String::new(),
                access: Access {
                    account_role: AccountRole::Developer,
                    namespaces: Default::default(),
                },
                disabled: false,
            },
        )
        .await
        .unwrap();
    let (key, _) = keygate::admin::bootstrap::issue_key(
        store,
        &TokenFormat::new("kg"),
        &Actor::system("test"),
        &owner,
        "counted",
        "",
        Some(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    key.id
}

async fn count(store: &dyn KeyStore, id: &KeyId) -> u64 {
    store.get_key(id).await.unwrap().unwrap().request_count
}

/// Three requests whose flush loses its answer (`lose`), two more after
/// it: five counted, none twice, none given up.
async fn a_lost_answer_counts_once(store: Arc<dyn KeyStore>, lose: Lose) {
    let settings = FlushSettings {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
        give_up_after: Duration::from_secs(60),
    };
    let mut gate = Flushing::start(store, lose, 1, settings).await;
    gate.requests(3);

    // The first attempt's answer is lost; the batch is sent again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(gate.sink.calls.load(Ordering::SeqCst) >= 2 && gate.counted().await >= 3) {
        assert!(
            Instant::now() < deadline,
            "{lose:?}: the flush was not sent again and settled: {} attempts, {} of 3 counted, \
             {} given up",
            gate.sink.calls.load(Ordering::SeqCst),
            gate.counted().await,
            gate.counters.dropped.get()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Newer counts flush after it, under the next number.
    gate.requests(2);
    gate.stop().await;

    assert_eq!(gate.counted().await, 5, "{lose:?}");
    assert_eq!(gate.counters.dropped.get(), 0, "{lose:?}: counts given up");
    assert_eq!(gate.counters.failures.get(), 1, "{lose:?}");
    assert_eq!(gate.sink.calls.load(Ordering::SeqCst), 3, "{lose:?}");
}

async fn sqlite() -> (Arc<dyn KeyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    (store::open(&url).await.unwrap(), dir)
}

async fn postgres() -> Option<(Arc<dyn KeyStore>, PgDatabase)> {
    let db = PgDatabase::create().await?;
    Some((store::open(&db.url).await.unwrap(), db))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_answer_lost_after_the_commit_counts_once() {
    let (store, _dir) = sqlite().await;
    a_lost_answer_counts_once(store, Lose::AfterTheWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_answer_lost_after_the_commit_counts_once() {
    let Some((store, _db)) = postgres().await else {
        return;
    };
    a_lost_answer_counts_once(store, Lose::AfterTheWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_that_never_answered_is_sent_again() {
    let (store, _dir) = sqlite().await;
    a_lost_answer_counts_once(store, Lose::BeforeTheWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_that_never_answered_is_sent_again() {
    let Some((store, _db)) = postgres().await else {
        return;
    };
    a_lost_answer_counts_once(store, Lose::BeforeTheWrite).await;
}

/// The rows of `usage_flushes` by stream, as `(stream, last_sequence)`.
const FLUSH_ROWS: &str = "SELECT stream, last_sequence FROM usage_flushes ORDER BY stream";

/// What a store's flushes do to `usage_flushes`, seen with `sql` (which
/// runs a statement on the store's database and returns [`FLUSH_ROWS`]):
/// the first flush of a store deletes the streams not heard from for 7
/// days, keeps the others and adds its own; later ones within the hour
/// leave old rows for the next sweep.
async fn idle_streams_are_forgotten<F, Fut>(store: Arc<dyn KeyStore>, sql: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Vec<(String, i64)>>,
{
    let id = a_key(&*store).await;
    let now_ms = store::to_ms(SystemTime::now());
    let day_ms = 24 * 3600 * 1000;
    sql(format!(
        "INSERT INTO usage_flushes (stream, last_sequence, flushed_ms) VALUES \
         ('gone', 7, {}), ('quiet', 9, {})",
        now_ms - 8 * day_ms,
        now_ms - 6 * day_ms
    ))
    .await;
    let batch = [UsageDelta {
        id,
        requests: 1,
        last_used: SystemTime::now(),
    }];
    let flush = FlushId {
        stream: "this".into(),
        sequence: 1,
    };
    store.record_usage(&flush, &batch).await.unwrap();
    let rows = sql(String::new()).await;
    assert_eq!(
        rows,
        vec![("quiet".to_string(), 9), ("this".to_string(), 1)]
    );

    // Within the hour: no sweep, the old row stays for the next one.
    sql(format!(
        "INSERT INTO usage_flushes (stream, last_sequence, flushed_ms) VALUES ('gone', 7, {})",
        now_ms - 8 * day_ms
    ))
    .await;
    store.record_usage(&flush.next(), &batch).await.unwrap();
    let rows = sql(String::new()).await;
    assert_eq!(
        rows,
        vec![
            ("gone".to_string(), 7),
            ("quiet".to_string(), 9),
            ("this".to_string(), 2)
        ]
    );
    assert_eq!(count(&*store, &id).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_idle_streams_are_forgotten() {
    let (store, dir) = sqlite().await;
    let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    idle_streams_are_forgotten(store, |statement| {
        let pool = pool.clone();
        async move {
            if !statement.is_empty() {
                sqlx::query(&statement).execute(&pool).await.unwrap();
            }
            sqlx::query_as(FLUSH_ROWS).fetch_all(&pool).await.unwrap()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_idle_streams_are_forgotten() {
    let Some((store, db)) = postgres().await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    idle_streams_are_forgotten(store, |statement| {
        let pool = pool.clone();
        async move {
            if !statement.is_empty() {
                sqlx::query(&statement).execute(&pool).await.unwrap();
            }
            sqlx::query_as(FLUSH_ROWS).fetch_all(&pool).await.unwrap()
        }
    })
    .await;
    pool.close().await;
}

/// A flusher writing to `store` through [`LosesAnswers`], and a key's
/// requests to feed it.
struct Flushing {
    store: Arc<dyn KeyStore>,
    sink: Arc<LosesAnswers>,
    counters: FlushCounters,
    recorder: usage::UsageRecorder,
    used: Arc<Used>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    flusher: tokio::task::JoinHandle<()>,
}

impl Flushing {
    /// The first `lost` answers are lost (`lose`).
    async fn start(
        store: Arc<dyn KeyStore>,
        lose: Lose,
        lost: u32,
        settings: FlushSettings,
    ) -> Flushing {
        let id = a_key(&*store).await;
        let sink = Arc::new(LosesAnswers {
            store: store.clone(),
            lose,
            left: AtomicU32::new(lost),
            calls: AtomicU32::new(0),
        });
        let counters = FlushCounters {
            failures: IntCounter::new("failures", "failures").unwrap(),
            dropped: IntCounter::new("dropped", "dropped").unwrap(),
        };
        let (recorder, queue) = usage::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let flusher = tokio::spawn(usage::run_flusher(
            sink.clone(),
            queue,
            settings,
            counters.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let used = Arc::new(Used {
            id,
            cell: UsageCell::default(),
        });
        Flushing {
            store,
            sink,
            counters,
            recorder,
            used,
            stop: Some(stop),
            flusher,
        }
    }

    /// A flusher over a SQLite store that loses every answer before the
    /// write until told otherwise, giving a batch up after `give_up_after`.
    async fn unanswered(give_up_after: Duration) -> (Flushing, tempfile::TempDir) {
        let (store, dir) = sqlite().await;
        let settings = FlushSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(100),
            give_up_after,
        };
        let flushing = Flushing::start(store, Lose::BeforeTheWrite, u32::MAX, settings).await;
        (flushing, dir)
    }

    fn requests(&self, n: usize) {
        for _ in 0..n {
            self.recorder.record(&self.used, SystemTime::now());
        }
    }

    async fn counted(&self) -> u64 {
        count(&*self.store, &self.used.id).await
    }

    /// Waits until `done` holds of the counters.
    async fn until(&self, what: &str, done: impl Fn(&FlushCounters) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.counters) {
            assert!(
                Instant::now() < deadline,
                "{what}: {} failures, {} given up",
                self.counters.failures.get(),
                self.counters.dropped.get()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.flusher).await.unwrap();
    }
}

/// A batch that never gets an answer is sent again until `give_up_after`,
/// then given up and counted, and the counts behind it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_answered_is_given_up_in_the_end() {
    let (mut gate, _dir) = Flushing::unanswered(Duration::from_millis(400)).await;
    gate.requests(3);
    gate.until("the batch given up", |c| c.dropped.get() == 3)
        .await;
    assert!(
        gate.counters.failures.get() >= 3,
        "sent again until given up"
    );
    gate.sink.left.store(0, Ordering::SeqCst);
    gate.requests(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.counted().await != 2 {
        assert!(Instant::now() < deadline, "the newer counts never went");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.stop().await;
    assert_eq!(gate.counted().await, 2);
    assert_eq!(gate.counters.dropped.get(), 3);
}

/// At the last flush, a batch still unanswered is sent once more, then
/// given up with the counts waiting behind it; stopping does not wait on
/// the store for longer than that attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_flush_gives_up_what_the_store_does_not_answer() {
    let (mut gate, _dir) = Flushing::unanswered(Duration::from_secs(60)).await;
    gate.requests(3);
    gate.until("the first attempt lost", |c| c.failures.get() >= 1)
        .await;
    gate.requests(2);
    let calls = gate.sink.calls.load(Ordering::SeqCst);
    let stopping = Instant::now();
    gate.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        gate.sink.calls.load(Ordering::SeqCst) > calls,
        "not sent again at the end"
    );
    assert_eq!(gate.counters.dropped.get(), 5);
    assert_eq!(gate.counted().await, 0);
}
