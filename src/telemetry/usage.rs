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
use crate::store::{from_ms, to_ms, KeyStore, UsageDelta};

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
    /// Takes everything counted since the last call, one delta per key.
    pub fn drain(&mut self) -> Vec<UsageDelta> {
        let mut batch: HashMap<KeyId, UsageDelta> = HashMap::new();
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

/// Flushes usage every `interval` until `shutdown` resolves, then once more.
/// A failed flush is logged and its counts dropped: usage is best-effort and
/// must never hold traffic up.
pub async fn run_flusher(
    store: Arc<dyn KeyStore>,
    mut queue: UsageQueue,
    interval: Duration,
    dropped: IntCounter,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            _ = &mut shutdown => stopping = true,
            _ = tokio::time::sleep(interval) => {}
        }
        let batch = queue.drain();
        flush(&*store, &batch, &dropped).await;
    }
}

async fn flush(store: &dyn KeyStore, batch: &[UsageDelta], dropped: &IntCounter) {
    if batch.is_empty() {
        return;
    }
    if let Err(error) = store.record_usage(batch).await {
        tracing::warn!(%error, keys = batch.len(), "usage flush failed; these counts are dropped");
        dropped.inc_by(batch.len() as u64);
    }
}
