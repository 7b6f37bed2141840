//! The change feed consumer: keeps this replica's key cache in step with
//! changes committed by any replica sharing the store.
//!
//! It reads what changed with [`KeyStore::changes_since`] from a watermark,
//! drops those keys from the [`Authenticator`]'s cache and reloads the
//! `apiKeysEnabled` switch after a settings change. Of keys just created it
//! drops only what says their ids are unknown ([`Change::created`]): a copy
//! of the key read since is current, and the feed arriving after a client's
//! first requests must not make the next one read the store again.
//!
//! It reads when an announcement arrives (PostgreSQL `NOTIFY`, typically a
//! few milliseconds after the commit) and on every `poll_interval` tick,
//! which bounds staleness when announcements are lost (a dropped listening
//! connection, `notify = false`) and is the only path on SQLite.
//!
//! Correctness never depends on an announcement arriving: announcements only
//! say *when* to read. And a fill racing an invalidation is the
//! authenticator's epoch's job, so a key revoked while it was loading is
//! not cached.
//!
//! It never writes to the store and never blocks the proxy: it runs in its
//! own task, and a store outage only makes it retry on the next tick. A
//! read gets [`FEED_READ_TIMEOUT`]: one that a silent partition left
//! without an answer would otherwise hold the feed, and every revocation
//! with it, for as long as TCP takes to give up (about 15 minutes).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::{Announcement, Change, KeyStore, StoreError, CHANGE_BATCH};
use crate::auth::Authenticator;
use crate::key::KeyId;
use crate::telemetry::metrics::Metrics;

/// How the feed runs, from `[cache] poll_interval` and `[store] notify`.
#[derive(Debug, Clone, Copy)]
pub struct FeedSettings {
    /// Longest time between two reads of the feed.
    pub poll_interval: Duration,
    /// Subscribe to announcements where the store has them.
    pub notifications: bool,
}

/// Runs the feed until `shutdown` resolves.
pub async fn run(
    store: Arc<dyn KeyStore>,
    authenticator: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    settings: FeedSettings,
    shutdown: impl Future<Output = ()> + Send,
) {
    let wake = Arc::new(Notify::new());
    let listener: Option<JoinHandle<()>> = settings
        .notifications
        .then(|| tokio::spawn(listen(store.clone(), wake.clone())));
    let mut feed = Feed {
        store,
        authenticator,
        metrics,
        watermark: None,
        failing: false,
    };
    let mut tick = tokio::time::interval(settings.poll_interval);
    // After a slow read (an outage), poll once and carry on, not in a burst.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            _ = wake.notified() => {}
        }
        feed.catch_up().await;
    }
    if let Some(listener) = listener {
        listener.abort();
    }
}

/// How long one step of the feed (a read of the changes and, after a
/// settings change, of the settings) may take before it is given up and
/// tried again at the next tick. Generous next to a read's milliseconds: a
/// batch of [`CHANGE_BATCH`] changes behind a busy store still fits.
pub const FEED_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait before re-subscribing after a failure; doubled up to
/// [`MAX_RETRY`]. Independent of the poll interval, so that announcements
/// come back within a second or so of the store, however long the poll.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Turns announcements into wake-ups of the feed. `Notify` keeps at most one
/// pending wake-up, so a burst of announcements costs one read.
async fn listen(store: Arc<dyn KeyStore>, wake: Arc<Notify>) {
    let mut retry = FIRST_RETRY;
    let mut subscription = loop {
        match store.subscribe().await {
            Ok(Some(subscription)) => break subscription,
            // The backend has no announcements: the poll does everything.
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "change feed: cannot subscribe to announcements; polling meanwhile");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    };
    tracing::debug!("change feed: listening for announcements");
    // Changes committed before LISTEN took effect were never announced.
    wake.notify_one();
    let mut failing = false;
    loop {
        match subscription.next().await {
            Ok(announcement) => {
                if failing || announcement == Announcement::Reconnected {
                    tracing::info!("change feed: listening again; catching up");
                }
                failing = false;
                retry = FIRST_RETRY;
                wake.notify_one();
            }
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "change feed: announcements lost; polling until the store is back");
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// The consumer's state: how far it has applied the feed.
struct Feed {
    store: Arc<dyn KeyStore>,
    authenticator: Arc<Authenticator>,
    /// Where `keygate_invalidation_delay_seconds` is recorded.
    metrics: Arc<Metrics>,
    /// The last change applied; `None` until the store first answered.
    watermark: Option<i64>,
    /// The last read failed: log the outage once, and its end once.
    failing: bool,
}

impl Feed {
    /// Reads and applies everything after the watermark.
    async fn catch_up(&mut self) {
        loop {
            // A step given up half-way is safe to repeat: the watermark
            // moves only once its changes are applied, and applying one
            // twice only drops a key from the cache twice.
            let step = tokio::time::timeout(FEED_READ_TIMEOUT, self.step()).await;
            match step.unwrap_or(Err(StoreError::NoAnswer(FEED_READ_TIMEOUT))) {
                Ok(more) => {
                    if self.failing {
                        tracing::info!("change feed: store reachable again; caught up");
                        self.failing = false;
                    }
                    if !more {
                        return;
                    }
                }
                Err(error) => {
                    if !self.failing {
                        tracing::warn!(%error, "change feed: cannot read changes; retrying every poll");
                        self.failing = true;
                    }
                    return;
                }
            }
        }
    }

    /// Applies one batch; says whether there may be more.
    async fn step(&mut self) -> Result<bool, StoreError> {
        let Some(watermark) = self.watermark else {
            // First contact: start at the head. Anything cached before now
            // may predate changes at or below the head, which this feed will
            // never replay, so start from an empty cache.
            let (head, _) = self.store.changes_since(i64::MAX).await?;
            self.reset().await?;
            self.advance(head);
            return Ok(false);
        };
        let (next, changes) = self.store.changes_since(watermark).await?;
        let Some(first) = changes.first() else {
            // A head above the watermark with nothing returned is a change
            // that committed between the store's two reads: the next read
            // gets it. Only a head *below* the watermark means trouble.
            if next < watermark {
                // Nothing after our watermark, and the head moved backwards:
                // the store was replaced (restored from a backup).
                tracing::warn!(
                    watermark,
                    head = next,
                    "change feed: the store's change log restarted; dropping the whole cache"
                );
                self.reset().await?;
                self.advance(next);
            }
            return Ok(false);
        };
        if first.seq != watermark + 1 {
            // Seqs are gapless: a jump means the changes in between were
            // pruned before we read them (we were away a long time).
            tracing::warn!(
                watermark,
                next = first.seq,
                "change feed: fell behind the change log's retention; dropping the whole cache"
            );
            self.reset().await?;
        }
        self.apply(&changes).await?;
        self.advance(next);
        Ok(i64::try_from(changes.len()).unwrap_or(i64::MAX) >= CHANGE_BATCH)
    }

    /// Moves the watermark, and the metric that shows it.
    fn advance(&mut self, watermark: i64) {
        self.watermark = Some(watermark);
        self.metrics.change_feed_seq.set(watermark);
    }

    async fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        let ids_of = |created: bool| -> Vec<KeyId> {
            changes
                .iter()
                .filter(|c| c.created == created)
                .flat_map(|c| c.key_ids.iter().copied())
                .collect()
        };
        // The order within a batch does not matter: an id created and then
        // changed (or deleted and then imported again) is in both lists,
        // and the full drop covers it.
        let ids = ids_of(false);
        if !ids.is_empty() {
            self.authenticator.invalidate(&ids);
        }
        let created = ids_of(true);
        if !created.is_empty() {
            self.authenticator.invalidate_unknown(&created);
        }
        if changes.iter().any(|c| c.settings) {
            // The latest settings, not the change's: a later change may
            // already have flipped the switch back.
            let settings = self.store.settings().await?;
            self.authenticator
                .set_api_keys_enabled(settings.api_keys_enabled);
        }
        let now = SystemTime::now();
        for change in changes {
            let delay = now.duration_since(change.time).unwrap_or_default();
            self.metrics.invalidation_delay.observe(delay.as_secs_f64());
        }
        tracing::debug!(
            changes = changes.len(),
            keys = ids.len(),
            created = created.len(),
            "change feed: applied"
        );
        Ok(())
    }

    /// Forgets everything cached and rereads the settings.
    async fn reset(&self) -> Result<(), StoreError> {
        self.authenticator.invalidate_all();
        let settings = self.store.settings().await?;
        self.authenticator
            .set_api_keys_enabled(settings.api_keys_enabled);
        Ok(())
    }
}
