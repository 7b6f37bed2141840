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
use crate::store::{from_ms, to_ms, FlushId, KeyStore, UsageDelta};

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
    /// added to `carried` (what a failed flush left to try again).
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

/// Most keys whose counts a failed flush keeps for the next one. An outage
/// longer than a few flushes with this many keys in use drops the counts
/// rather than let them grow without bound.
const MAX_CARRIED_KEYS: usize = 100_000;

/// What the flusher counts about itself.
#[derive(Clone)]
pub struct FlushCounters {
    /// Flushes the store refused.
    pub failures: IntCounter,
    /// Requests whose counts were given up.
    pub dropped: IntCounter,
}

/// How long one flush may take. Past it the flush is given up, so that a
/// write a silent partition left without an answer does not stop usage
/// for as long as TCP takes to give up (about 15 minutes). Far above a
/// flush's milliseconds (1,000 keys among 1,000,000: 4-11 ms on SQLite).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Flushes usage every `interval` until `shutdown` resolves, then once more.
/// A failed flush is logged, counted, and its counts are tried again with
/// the next one (a store write lock held by another process, a short
/// outage), up to [`MAX_CARRIED_KEYS`] keys; past that, and at the last
/// flush, they are dropped and counted. A flush given up after
/// [`FLUSH_TIMEOUT`] may still commit (its answer may be what was lost),
/// so its counts are dropped, not tried again: usage may then count too
/// few requests, never too many. Usage is best-effort and never holds
/// traffic up.
pub async fn run_flusher(
    store: Arc<dyn KeyStore>,
    mut queue: UsageQueue,
    interval: Duration,
    counters: FlushCounters,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut carried = Vec::new();
    let mut next_id = FlushId::first_of_new_stream();
    while !stopping {
        tokio::select! {
            _ = &mut shutdown => stopping = true,
            _ = tokio::time::sleep(interval) => {}
        }
        let batch = queue.drain(carried);
        let id = next_id.clone();
        next_id = next_id.next();
        let failed = match tokio::time::timeout(FLUSH_TIMEOUT, flush(&*store, &id, &batch)).await {
            Ok(failed) => failed,
            Err(_) => Some(Failed::NoAnswer),
        };
        if failed.is_some() {
            counters.failures.inc();
        }
        carried = match failed {
            None => Vec::new(),
            Some(Failed::Refused(error)) if !stopping && batch.len() <= MAX_CARRIED_KEYS => {
                tracing::warn!(%error, keys = batch.len(), "usage flush failed; its counts are kept for the next flush");
                batch
            }
            Some(failed) => {
                let requests: u64 = batch.iter().map(|delta| delta.requests).sum();
                tracing::warn!(error = %failed, keys = batch.len(), requests, "usage flush failed; these counts are dropped");
                counters.dropped.inc_by(requests);
                Vec::new()
            }
        };
    }
}

/// Why a flush did not write its batch.
#[derive(Debug, thiserror::Error)]
enum Failed {
    /// The store refused it: the batch is one transaction, so nothing of
    /// it was written.
    #[error(transparent)]
    Refused(crate::store::StoreError),
    /// No answer within [`FLUSH_TIMEOUT`]: whether it was written is not
    /// known.
    #[error("no answer from the store within {FLUSH_TIMEOUT:?}")]
    NoAnswer,
}

/// Writes one batch.
async fn flush(store: &dyn KeyStore, id: &FlushId, batch: &[UsageDelta]) -> Option<Failed> {
    if batch.is_empty() {
        return None;
    }
    store
        .record_usage(id, batch)
        .await
        .err()
        .map(Failed::Refused)
}
