//! Per-key usage (request count, last used time), counted in memory on the
//! hot path and flushed to the store in batches by one background task.
//!
//! A request touches only its key's `UsageCell` (two relaxed atomics). The
//! first request after a flush also enlists the cell on a channel, so the
//! flusher visits only keys that were used, and a request costs no store
//! write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::key::KeyId;
use crate::store::{from_ms, to_ms, FlushId, KeyStore, Recorded, StoreError, UsageDelta};

/// The in-memory counter of one key.
#[derive(Debug, Default)]
pub struct UsageCell {
    /// Requests since the last flush.
    pending: AtomicU64,
    /// Unix milliseconds of the latest request.
    last_used_ms: AtomicU64,
    /// Whether the cell is already queued for the next flush.
    enlisted: AtomicBool,
}

/// Something that carries a key's usage cell (the cached key itself, so the
/// cell costs no allocation of its own).
pub trait UsageSource: Send + Sync {
    fn usage_id(&self) -> KeyId;
    fn usage_cell(&self) -> &UsageCell;
}

type Enlisted = Arc<dyn UsageSource>;

/// The handle the proxy counts through.
#[derive(Clone)]
pub struct UsageRecorder {
    queue: mpsc::UnboundedSender<Enlisted>,
}

/// The receiving end, drained by [`run_flusher`].
pub struct UsageQueue(mpsc::UnboundedReceiver<Enlisted>);

pub fn channel() -> (UsageRecorder, UsageQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    (UsageRecorder { queue: tx }, UsageQueue(rx))
}

impl UsageRecorder {
    pub fn record<S: UsageSource + 'static>(&self, source: &Arc<S>, now: SystemTime) {
        let cell = source.usage_cell();
        cell.pending.fetch_add(1, Ordering::Relaxed);
        let ms = u64::try_from(to_ms(now)).unwrap_or(0);
        cell.last_used_ms.fetch_max(ms, Ordering::Relaxed);
        // The flusher clears `enlisted` before it takes `pending`, so a count
        // added after the take always finds the cell un-enlisted and queues it.
        if !cell.enlisted.swap(true, Ordering::AcqRel) {
            let _ = self.queue.send(source.clone());
        }
    }
}

impl UsageQueue {
    /// Takes everything counted since the last call, one delta per key,
    /// added to `carried` (counts that waited behind a failed flush).
    pub fn drain(&mut self, carried: Vec<UsageDelta>) -> Vec<UsageDelta> {
        let mut batch: HashMap<KeyId, UsageDelta> =
            carried.into_iter().map(|delta| (delta.id, delta)).collect();
        while let Ok(source) = self.0.try_recv() {
            take(&mut batch, source.usage_id(), source.usage_cell());
        }
        batch.into_values().collect()
    }
}

/// Moves one cell's count into the batch. `enlisted` is cleared before
/// `pending` is taken, so a request counted in between re-enlists the cell.
fn take(batch: &mut HashMap<KeyId, UsageDelta>, id: KeyId, cell: &UsageCell) {
    cell.enlisted.store(false, Ordering::Release);
    let requests = cell.pending.swap(0, Ordering::AcqRel);
    if requests == 0 {
        return;
    }
    let last_used = from_ms(i64::try_from(cell.last_used_ms.load(Ordering::Relaxed)).unwrap_or(0));
    let delta = batch.entry(id).or_insert(UsageDelta {
        id,
        requests: 0,
        last_used,
    });
    delta.requests += requests;
    delta.last_used = delta.last_used.max(last_used);
}

/// Most keys whose counts may wait behind a batch being sent again. An
/// outage longer than a few flushes with this many keys in use drops the
/// waiting counts rather than let them grow without bound.
const MAX_CARRIED_KEYS: usize = 100_000;

/// How long a batch is sent again, as it was, before its counts are given
/// up: a poison batch (one the store refuses whatever its state) must not
/// stop usage for good. A time, not a number of retries, so that it does
/// not shrink with a short `flush_interval`; long enough for a failover or
/// a short outage, and for a first attempt cut off by a partition to be
/// ended by the server (`idle_in_transaction_session_timeout`, 15 s).
pub const MAX_UNSETTLED: Duration = Duration::from_secs(10 * 60);

/// What the flusher counts about itself.
#[derive(Clone)]
pub struct FlushCounters {
    /// Attempts that failed or got no answer (each is sent again).
    pub failures: IntCounter,
    /// Requests whose counts were given up.
    pub dropped: IntCounter,
}

/// How long one attempt may take by default. Past it the attempt is
/// given up, so that a write a silent partition left without an answer
/// does not stop usage for as long as TCP takes to give up (about 15
/// minutes). Far above a flush's milliseconds (1,000 keys among
/// 1,000,000: 4-11 ms on SQLite).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the flusher writes: of the store, the one call it makes. A test
/// can so put a wrapper around a real store (one that loses the answer of
/// a real write) without repeating the whole [`KeyStore`].
#[async_trait::async_trait]
pub trait UsageSink: Send + Sync {
    /// [`KeyStore::record_usage`].
    async fn record_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError>;
}

#[async_trait::async_trait]
impl UsageSink for dyn KeyStore {
    async fn record_usage(
        &self,
        flush: &FlushId,
        batch: &[UsageDelta],
    ) -> Result<Recorded, StoreError> {
        KeyStore::record_usage(self, flush, batch).await
    }
}

/// How the flusher runs.
#[derive(Debug, Clone, Copy)]
pub struct FlushSettings {
    /// Time between flushes (`[usage] flush_interval`).
    pub interval: Duration,
    /// How long one attempt may wait for the store's answer
    /// ([`FLUSH_TIMEOUT`]; tests shorten it).
    pub timeout: Duration,
    /// How long a batch is sent again before it is given up
    /// ([`MAX_UNSETTLED`]; tests shorten it).
    pub give_up_after: Duration,
}

impl FlushSettings {
    /// Flushes every `interval`, each attempt given [`FLUSH_TIMEOUT`], a
    /// batch sent again for [`MAX_UNSETTLED`].
    pub fn every(interval: Duration) -> FlushSettings {
        FlushSettings {
            interval,
            timeout: FLUSH_TIMEOUT,
            give_up_after: MAX_UNSETTLED,
        }
    }
}

/// A batch sent under its id and not known to be in: the store's answer
/// was an error or never came, and an error (a connection lost during
/// COMMIT) does not prove the write did not commit any more than silence
/// does. It goes again as it was, under the same id, so that the store
/// applies it at most once.
struct Unsettled {
    id: FlushId,
    batch: Vec<UsageDelta>,
    /// When its first attempt failed.
    since: tokio::time::Instant,
    /// Times sent again so far (for the log).
    retries: u32,
}

/// Flushes usage every `settings.interval` until `shutdown` resolves, then
/// once more, each flush a batch numbered in this process's flush stream
/// ([`FlushId`]) that the store applies at most once.
///
/// A flush that fails or gets no answer within `settings.timeout` may
/// have committed (its answer may be what was lost), so its batch is sent
/// again at the next flush exactly as it was, under the same id, before
/// any newer counts: the store writes it if the first attempt did not,
/// and nothing if it did. Usage counts each request once. The counts made
/// meanwhile wait, merged, behind it (up to [`MAX_CARRIED_KEYS`] keys;
/// past that they are dropped). A batch still unsettled after
/// `settings.give_up_after` ([`MAX_UNSETTLED`]), or at the last flush, is
/// given up, and so are the counts waiting behind it at the last flush:
/// all are logged and counted in `dropped` (a batch given up may still
/// have been written, so `dropped` is at most the requests missing). Usage
/// is best-effort and never holds traffic up.
pub async fn run_flusher<S: UsageSink + ?Sized>(
    store: Arc<S>,
    mut queue: UsageQueue,
    settings: FlushSettings,
    counters: FlushCounters,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut next_id = FlushId::first_of_new_stream();
    let mut unsettled: Option<Unsettled> = None;
    let mut waiting = Vec::new();
    while !stopping {
        tokio::select! {
            _ = &mut shutdown => stopping = true,
            _ = tokio::time::sleep(settings.interval) => {}
        }
        waiting = queue.drain(waiting);
        // The unsettled batch first: newer counts go only once the store
        // has answered for it, or it is given up.
        let mut blocked = false;
        if let Some(mut batch) = unsettled.take() {
            match send(&*store, &batch.id, &batch.batch, settings.timeout).await {
                Ok(recorded) => {
                    tracing::info!(
                        sequence = batch.id.sequence,
                        keys = batch.batch.len(),
                        ?recorded,
                        "usage flush sent again and settled"
                    );
                }
                Err(failed) => {
                    counters.failures.inc();
                    batch.retries += 1;
                    blocked = true;
                    if stopping || batch.since.elapsed() >= settings.give_up_after {
                        give_up(&counters, &batch.batch, &failed);
                    } else {
                        tracing::warn!(error = %failed, keys = batch.batch.len(), retries = batch.retries, "usage flush failed again; it is sent again as it was with the next flush");
                        unsettled = Some(batch);
                    }
                }
            }
        }
        if blocked {
            if stopping || waiting.len() > MAX_CARRIED_KEYS {
                give_up(&counters, &waiting, &Failed::Behind);
                waiting = Vec::new();
            }
            continue;
        }
        if waiting.is_empty() {
            continue;
        }
        let id = next_id.clone();
        next_id = next_id.next();
        let batch = std::mem::take(&mut waiting);
        if let Err(failed) = send(&*store, &id, &batch, settings.timeout).await {
            counters.failures.inc();
            if stopping {
                give_up(&counters, &batch, &failed);
            } else {
                tracing::warn!(error = %failed, keys = batch.len(), "usage flush failed; it is sent again as it was with the next flush");
                unsettled = Some(Unsettled {
                    id,
                    batch,
                    since: tokio::time::Instant::now(),
                    retries: 0,
                });
            }
        }
    }
}

/// Logs and counts counts that will not be written (by this process).
fn give_up(counters: &FlushCounters, batch: &[UsageDelta], failed: &Failed) {
    if batch.is_empty() {
        return;
    }
    let requests: u64 = batch.iter().map(|delta| delta.requests).sum();
    tracing::warn!(error = %failed, keys = batch.len(), requests, "usage counts given up");
    counters.dropped.inc_by(requests);
}

/// Why a flush's batch is not known to be written.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// The store answered with an error. Usually nothing was written (the
    /// batch is one transaction), but an error while committing leaves it
    /// unknown.
    #[error(transparent)]
    Refused(StoreError),
    /// No answer within the timeout: whether it was written is not known.
    #[error("no answer from the store within {0:?}")]
    NoAnswer(Duration),
    /// Counts that waited behind an unsettled batch and could wait no more.
    #[error("waiting behind a usage flush that failed")]
    Behind,
}

/// Sends one batch under `id`, waiting at most `timeout` for the answer.
async fn send<S: UsageSink + ?Sized>(
    store: &S,
    id: &FlushId,
    batch: &[UsageDelta],
    timeout: Duration,
) -> Result<Recorded, Failed> {
    if batch.is_empty() {
        return Ok(Recorded::Applied);
    }
    match tokio::time::timeout(timeout, store.record_usage(id, batch)).await {
        Ok(answer) => answer.map_err(Failed::Refused),
        Err(_) => Err(Failed::NoAnswer(timeout)),
    }
}
