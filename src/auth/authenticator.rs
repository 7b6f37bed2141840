//! The `Authenticator`: verifies a parsed token against a cache in front of
//! the key store, with a constant-time digest comparison, and checks the
//! key's state and expiry on every call.
//!
//! Timing: an unknown id takes the same path as a known one. Known and
//! unknown ids live in the same cache (one lookup either way), and an
//! unknown id is verified against a dummy key with the same two digest
//! comparisons, so that only the final boolean differs; both are answered
//! `invalid_api_key`. Only a verified secret may learn that its key is
//! disabled or expired. `examples/timing.rs` checks this statistically.
//!
//! Freshness: entries are trusted for `ttl`; past it they are re-read, and if
//! the store is down they keep working until `ttl + stale_if_error`. A store
//! read is given [`STORE_READ_TIMEOUT`]: a store that stops answering (a
//! table lock, a network partition that drops packets) is an unavailable
//! store, not a request held until the client gives up. Once a read has
//! failed, a key past `ttl` is served as it is without asking the store,
//! while [`run_store_probe`] asks the store, every [`STORE_RETRY_AFTER`],
//! whether it is back, so that through an outage where every read waits
//! out its timeout, cached keys do not pay that wait, however light the
//! traffic (before the probe, the first request after each quiet second
//! asked, and waited). Every
//! change invalidates the affected ids at once, and bumps an epoch so that a
//! lookup that was in flight during the change never caches what it read
//! before it. A key's creation is the one change that leaves a cached key
//! alone ([`Authenticator::invalidate_unknown`]): what can predate it is
//! only a note that its id was unknown, and a lookup that read the key has
//! read it after the creation committed. Dropping that key too made the
//! first requests of a new key read the store twice, the second time when
//! the creation reached this replica's change feed, and fail with 503 if the
//! store was down by then.
//!
//! Memory: the cache is `quick_cache` rather than moka because moka spends
//! about 320 bytes of bookkeeping per entry (measured here: 1,000,000
//! entries of an 8-byte value cost 353 bytes each in moka, 90 in
//! quick_cache), which alone breaks the budget of 300 bytes per cached key.
//! Expiry is ours (`fresh_until`), so no per-entry timer is needed; instead
//! [`run_sweeper`] drops, every `negative_ttl` (1 s at least, `ttl` at
//! most), the entries nothing can use any more (an unknown id past
//! `negative_ttl`, a key past `ttl + stale_if_error`). Without it every id
//! ever presented stayed until `capacity` pushed it out: under key churn
//! that is one entry per deleted key (the soak measured the growth), and
//! `capacity` is sized for the keys in use, not for history.
//! Owners are shared: every key of one owner points at one `Owner`, with its
//! header values built once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use quick_cache::sync::Cache;
use subtle::Choice;
use tokio::sync::Notify;

use crate::key::{Digest, KeyId, ParsedToken};
use crate::store::{Access, KeyRecord, KeyStore, OwnerType, StoreError};
use crate::telemetry::metrics::{KeyCounts, Metrics};
use crate::telemetry::usage::{UsageCell, UsageSource};

/// Longest wait for the store on a cache miss; past it the read counts as
/// failed (a stale entry is served, else `503 store_unavailable`). The
/// same as the PostgreSQL pool's wait for a connection, so an outage is
/// answered in the same time whichever of the two it hits.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failed store read, how long keys past `ttl` are served from the
/// cache (within `stale_if_error`) without asking the store first, and how
/// often [`run_store_probe`] asks it meanwhile. Short, so that a store
/// that is back is read again within a second; misses (unknown ids) still
/// ask the store meanwhile.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why verification failed. `Invalid` covers both an unknown id and a wrong
/// secret, so the answer never reveals which ids exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the API key is not valid")]
    Invalid,
    #[error("the API key is disabled")]
    Disabled,
    #[error("the API key has expired")]
    Expired,
    #[error("the API key's owner is disabled")]
    OwnerDisabled,
    #[error("API keys are disabled for this account")]
    ApiKeysDisabled,
    #[error("the key store is unavailable")]
    StoreUnavailable,
}

/// Cache tuning, from `[cache]`.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
}

/// The owner of a key as the proxy needs it, shared by all its keys.
#[derive(Debug, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub kind: OwnerType,
    /// Email of a user, name of a service account.
    pub name: String,
    pub access: Access,
    pub disabled: bool,
    /// Identity header values, built once per owner.
    pub headers: OwnerHeaders,
}

#[derive(Debug, PartialEq, Eq)]
pub struct OwnerHeaders {
    pub owner_id: HeaderValue,
    pub owner_type: HeaderValue,
    pub owner_name: HeaderValue,
    pub role: HeaderValue,
}

/// A key as the cache holds it: compact (about 200 bytes), its owner shared.
#[derive(Debug)]
pub struct VerifiedKey {
    pub id: KeyId,
    digest: Digest,
    /// The digest replaced by the last rotation, and until when it works.
    previous: Option<Box<(Digest, SystemTime)>>,
    pub disabled: bool,
    pub expiry: Option<SystemTime>,
    /// Namespaces the key is limited to; empty means all of its owner's.
    pub namespaces: Box<[Box<str>]>,
    pub owner: Arc<Owner>,
    /// Requests counted since the last usage flush.
    pub usage: UsageCell,
    /// The request counts of the first route this key was used on,
    /// resolved once.
    pub counts: OnceLock<Arc<KeyCounts>>,
    /// False for the stand-ins cached for unknown ids.
    real: bool,
}

impl VerifiedKey {
    /// Builds the cached form of a store record (its owner not shared).
    pub fn new(record: KeyRecord) -> VerifiedKey {
        let owner = Arc::new(owner_of(&record));
        VerifiedKey::with_owner(record, owner)
    }

    fn with_owner(record: KeyRecord, owner: Arc<Owner>) -> VerifiedKey {
        VerifiedKey {
            id: record.id,
            digest: record.digest,
            previous: record.previous.map(Box::new),
            disabled: record.disabled,
            expiry: record.expiry,
            namespaces: record
                .namespaces
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            owner,
            usage: UsageCell::default(),
            counts: OnceLock::new(),
            real: true,
        }
    }

    /// Whether `presented` is the key's current secret (and not the one
    /// its last rotation replaced, which works through the grace period).
    pub fn is_current_secret(&self, presented: &Digest) -> bool {
        self.digest.ct_eq(presented).into()
    }

    /// The `x-keygate-key-id` value. Built per request from the 16-byte id
    /// (an allocation of about 30 ns) instead of kept: a kept `HeaderValue`
    /// costs about 100 bytes per cached key.
    pub fn key_id_header(&self) -> HeaderValue {
        HeaderValue::from_str(self.id.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Whether the key is limited to namespaces and `namespace` is not one.
    pub fn out_of_scope(&self, namespace: &str) -> bool {
        !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| &**n == namespace)
    }
}

impl UsageSource for VerifiedKey {
    fn usage_id(&self) -> KeyId {
        self.id
    }
    fn usage_cell(&self) -> &UsageCell {
        &self.usage
    }
}

fn owner_of(record: &KeyRecord) -> Owner {
    Owner {
        headers: OwnerHeaders {
            owner_id: header_value(&record.owner_id),
            owner_type: HeaderValue::from_static(record.owner_type.as_str()),
            owner_name: header_value(&record.owner_name),
            role: HeaderValue::from_static(record.owner_access.account_role.as_str()),
        },
        id: record.owner_id.clone(),
        kind: record.owner_type,
        name: record.owner_name.clone(),
        access: record.owner_access.clone(),
        disabled: record.owner_disabled,
    }
}

/// What the cache holds for an id: the key, or the shared dummy key when
/// the store said there is no such id, so that both cost the same.
#[derive(Clone)]
struct Cached {
    key: Arc<VerifiedKey>,
    /// Trusted until this many milliseconds after `started` (`ttl` for a
    /// key, `negative_ttl` for an unknown id); a key is served up to
    /// `stale_if_error` longer while the store is down.
    fresh_until: u64,
}

pub struct Authenticator {
    /// Where keys come from on a cache miss.
    store: Arc<dyn KeyStore>,
    /// Known and unknown ids alike, so both cost one lookup.
    cache: Cache<KeyId, Cached>,
    /// The time origin of `Cached::fresh_until`.
    started: Instant,
    /// One `Owner` per owner id, so that keys share it.
    owners: Cache<String, Arc<Owner>>,
    settings: CacheSettings,
    /// Bumped by every invalidation; a fill that saw it change does not cache.
    epoch: AtomicU64,
    /// Bumped by every creation; a fill of an unknown id that saw it change
    /// does not cache (the id may have been created since it was read), a
    /// fill of a key does (see [`Authenticator::invalidate_unknown`]).
    creations: AtomicU64,
    /// The account-wide switch (`apiKeysEnabled`).
    api_keys_enabled: AtomicBool,
    /// Until when (milliseconds after `started`) a key past `ttl` is served
    /// without a store read, because a read has just failed or a read made
    /// after a failure (the probe's, or a request's) is still waiting; 0
    /// when the last read succeeded.
    store_failing_until: AtomicU64,
    /// Wakes [`run_store_probe`] when a read fails.
    store_failed: Notify,
    /// The template of the stand-ins verified when an id is unknown.
    dummy: VerifiedKey,
    /// Cache hit/miss and store error counters.
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn KeyStore>,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Authenticator {
        let capacity = usize::try_from(settings.capacity)
            .unwrap_or(usize::MAX)
            .max(1);
        Authenticator {
            store,
            cache: Cache::new(capacity),
            started: Instant::now(),
            owners: Cache::new(capacity.min(100_000)),
            settings,
            epoch: AtomicU64::new(0),
            creations: AtomicU64::new(0),
            api_keys_enabled: AtomicBool::new(true),
            store_failing_until: AtomicU64::new(0),
            store_failed: Notify::new(),
            dummy: dummy_key(),
            metrics,
        }
    }

    /// Verifies a presented token at `now`.
    pub async fn verify(
        &self,
        token: &ParsedToken,
        now: SystemTime,
    ) -> Result<Arc<VerifiedKey>, AuthError> {
        self.verify_noting(token, now, &mut None).await
    }

    /// [`Self::verify`], noting in `verified` the key whose secret was
    /// presented as soon as it has verified, so that a refusal that may
    /// say more than `invalid_api_key` (disabled, expired, owner disabled,
    /// API keys off) can be logged and counted under its key. Nothing is
    /// noted for an unknown id or a wrong secret.
    pub async fn verify_noting(
        &self,
        token: &ParsedToken,
        now: SystemTime,
        verified: &mut Option<Arc<VerifiedKey>>,
    ) -> Result<Arc<VerifiedKey>, AuthError> {
        let presented = token.digest;
        // An unknown id comes back as a stand-in key of its own, whose
        // digest no secret hashes to: from here on both take exactly the
        // same steps, on a key object of their own.
        let key = self.lookup(&token.id).await?;
        let exists = key.real;
        let current = key.digest.ct_eq(&presented);
        let previous = match key.previous.as_deref() {
            Some((digest, until)) => {
                digest.ct_eq(&presented) & Choice::from(u8::from(now < *until))
            }
            None => self.dummy.digest.ct_eq(&presented) & Choice::from(0),
        };
        // One branch on one combined Choice: branching on `exists` first
        // gave a wrong secret for an existing id one more branch than an
        // unknown id (about 0.9 ns, found by examples/timing).
        let accepted = Choice::from(u8::from(exists)) & (current | previous);
        if !bool::from(accepted) {
            return Err(AuthError::Invalid);
        }
        let key = verified.insert(key).clone();
        if key.disabled {
            return Err(AuthError::Disabled);
        }
        if key.expiry.is_some_and(|at| at <= now) {
            return Err(AuthError::Expired);
        }
        if key.owner.disabled {
            return Err(AuthError::OwnerDisabled);
        }
        if !self.api_keys_enabled.load(Ordering::Relaxed) {
            return Err(AuthError::ApiKeysDisabled);
        }
        Ok(key)
    }

    fn millis_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The key for an id, or the dummy key if there is none.
    async fn lookup(&self, id: &KeyId) -> Result<Arc<VerifiedKey>, AuthError> {
        let now = self.millis_since_start();
        let grace = duration_millis(self.settings.stale_if_error);
        let failing_until = self.store_failing_until.load(Ordering::Relaxed);
        // A real key past its ttl may still serve within stale_if_error.
        let servable_stale =
            |cached: &Cached| cached.key.real && now < cached.fresh_until.saturating_add(grace);
        let stale = match self.cache.get(id) {
            Some(cached) if now < cached.fresh_until => {
                self.metrics.cache_hits.inc();
                return Ok(cached.key);
            }
            // The store has just failed a read: serve what is still usable
            // rather than wait for it to fail again.
            Some(cached) if now < failing_until && servable_stale(&cached) => {
                self.metrics.cache_hits.inc();
                return Ok(cached.key);
            }
            stale => stale,
        };
        self.metrics.cache_misses.inc();
        if failing_until != 0 {
            // The store failed the last read: this one finds out whether it
            // is back. Until it is answered (or times out), and a moment
            // more, other keys past their ttl do not queue behind it.
            let probing = duration_millis(STORE_READ_TIMEOUT + STORE_RETRY_AFTER);
            self.store_failing_until
                .fetch_max(now.saturating_add(probing), Ordering::Relaxed);
        }
        let seen = Epochs {
            all: self.epoch.load(Ordering::Acquire),
            creations: self.creations.load(Ordering::Acquire),
        };
        let read = tokio::time::timeout(STORE_READ_TIMEOUT, self.store.find_key(id)).await;
        let read = match read {
            Ok(Ok(found)) => {
                if self.store_failing_until.load(Ordering::Relaxed) != 0 {
                    self.store_failing_until.store(0, Ordering::Relaxed);
                }
                found
            }
            failed => {
                self.metrics.store_errors.inc();
                match failed {
                    Ok(Err(error)) => {
                        tracing::warn!(%error, key_id = %id, "key store lookup failed");
                    }
                    _ => tracing::warn!(
                        key_id = %id,
                        timeout = ?STORE_READ_TIMEOUT,
                        "key store lookup timed out"
                    ),
                }
                let retry_at = self
                    .millis_since_start()
                    .saturating_add(duration_millis(STORE_RETRY_AFTER));
                // The most of this and the probe's hold: shortening the
                // hold would send keys back to waiting on the store.
                self.store_failing_until
                    .fetch_max(retry_at, Ordering::Relaxed);
                self.store_failed.notify_one();
                return match stale {
                    Some(cached) if servable_stale(&cached) => Ok(cached.key),
                    _ => Err(AuthError::StoreUnavailable),
                };
            }
        };
        match read {
            Some(record) => {
                let owner = self.shared_owner(&record);
                let key = Arc::new(VerifiedKey::with_owner(record, owner));
                let fresh_until = now.saturating_add(duration_millis(self.settings.ttl));
                self.fill(
                    id,
                    Cached {
                        key: key.clone(),
                        fresh_until,
                    },
                    seen,
                );
                Ok(key)
            }
            None => {
                let fresh_until = now.saturating_add(duration_millis(self.settings.negative_ttl));
                let stand_in = Arc::new(self.stand_in(id));
                self.fill(
                    id,
                    Cached {
                        key: stand_in.clone(),
                        fresh_until,
                    },
                    seen,
                );
                Ok(stand_in)
            }
        }
    }

    /// A stand-in for an unknown id: its own object, like a real key, so
    /// that verifying it touches memory the way verifying a key does.
    fn stand_in(&self, id: &KeyId) -> VerifiedKey {
        VerifiedKey {
            id: *id,
            digest: self.dummy.digest,
            previous: None,
            disabled: true,
            expiry: None,
            namespaces: Box::default(),
            owner: self.dummy.owner.clone(),
            usage: UsageCell::default(),
            counts: OnceLock::new(),
            real: false,
        }
    }

    /// Caches what the store said, unless an invalidation that concerns it
    /// ran since the read began (`seen`): then the answer may predate it.
    fn fill(&self, id: &KeyId, entry: Cached, seen: Epochs) {
        let real = entry.key.real;
        if self.overtaken(seen, real) {
            self.drop_filled(id, real);
            return;
        }
        self.cache.insert(*id, entry);
        // An invalidation may have landed between the check and the insert
        // (its own removal then ran before our insert): look again, so a
        // slow fill never brings back a key revoked while it was loading,
        // nor an id as unknown after its key was created.
        if self.overtaken(seen, real) {
            self.drop_filled(id, real);
        }
    }

    /// Whether an invalidation that concerns a fill begun at `seen` has run
    /// since: any, for a key; any or a creation, for an unknown id.
    fn overtaken(&self, seen: Epochs, real: bool) -> bool {
        self.epoch.load(Ordering::Acquire) != seen.all
            || (!real && self.creations.load(Ordering::Acquire) != seen.creations)
    }

    /// Drops what an overtaken fill may have cached. An unknown id's fill
    /// drops only an unknown entry: a key there was cached by a later read.
    fn drop_filled(&self, id: &KeyId, real: bool) {
        if real {
            self.cache.remove(id);
        } else {
            self.cache.remove_if(id, |cached| !cached.key.real);
        }
    }

    /// The owner of a freshly read key: the one already shared by its other
    /// keys if the store still says the same about it, else a new one.
    fn shared_owner(&self, record: &KeyRecord) -> Arc<Owner> {
        let fresh = owner_of(record);
        if let Some(existing) = self.owners.get(&record.owner_id) {
            if *existing == fresh {
                return existing;
            }
        }
        let fresh = Arc::new(fresh);
        self.owners.insert(record.owner_id.clone(), fresh.clone());
        fresh
    }

    /// Drops these keys from the cache, so the next request reads the store.
    pub fn invalidate(&self, ids: &[KeyId]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for id in ids {
            self.cache.remove(id);
        }
    }

    /// For keys just created: drops the ids cached as unknown (presented
    /// before the key existed, as imported tokens are), and keeps any
    /// cached key, which was read after the creation committed. A key id
    /// can be used again only by importing a token after its key was
    /// deleted, and the deletion, earlier in the change feed, has dropped
    /// the old key by then (or kept a read racing it from caching).
    pub fn invalidate_unknown(&self, ids: &[KeyId]) {
        self.creations.fetch_add(1, Ordering::AcqRel);
        for id in ids {
            self.cache.remove_if(id, |cached| !cached.key.real);
        }
    }

    /// Drops every cached key and unknown id: for when the change feed
    /// cannot tell what changed (it fell behind the feed's retention, or the
    /// store was replaced).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }

    /// Sets the account-wide `apiKeysEnabled` switch.
    pub fn set_api_keys_enabled(&self, enabled: bool) {
        self.api_keys_enabled.store(enabled, Ordering::Relaxed);
    }

    /// Reads the account settings from the store (at start).
    pub async fn load_settings(&self) -> Result<(), StoreError> {
        let settings = self.store.settings().await?;
        self.set_api_keys_enabled(settings.api_keys_enabled);
        Ok(())
    }

    /// Drops the entries past any use: an unknown id past `negative_ttl`,
    /// a key past `ttl + stale_if_error` (the longest it may still answer
    /// while the store is down). A later request reads the store, as it
    /// would have anyway.
    pub fn evict_expired(&self) {
        let now = self.millis_since_start();
        let grace = duration_millis(self.settings.stale_if_error);
        self.cache.retain(|_, cached| {
            let usable_until = if cached.key.real {
                cached.fresh_until.saturating_add(grace)
            } else {
                cached.fresh_until
            };
            now < usable_until
        });
    }

    /// Frees the metric series of deleted keys once the series cap is
    /// nearly full: the candidates (no cached copy counts through them) are
    /// checked against the store in one query. A store error leaves them
    /// for the next sweep.
    pub async fn forget_deleted_key_series(&self) {
        let idle = self.metrics.idle_series_keys();
        if idle.is_empty() {
            return;
        }
        let existing: HashSet<KeyId> = match self.store.existing_keys(&idle).await {
            Ok(existing) => existing.into_iter().collect(),
            Err(error) => {
                tracing::debug!(%error, "could not check idle key series against the store");
                return;
            }
        };
        let deleted: Vec<KeyId> = idle
            .into_iter()
            .filter(|id| !existing.contains(id))
            .collect();
        self.metrics.forget_deleted_keys(&deleted);
    }

    /// Number of ids cached (known and unknown), for the metrics scrape.
    pub fn cached_keys(&self) -> u64 {
        self.cache.len() as u64
    }
}

/// Runs [`Authenticator::evict_expired`] every `negative_ttl` (at least a
/// second, at most `ttl`) until `shutdown` resolves, so the cache holds the
/// keys presented within about the last `ttl + stale_if_error` and the
/// unknown ids of about the last two `negative_ttl`s, not every id ever
/// presented. Every `ttl` was not enough: ids presented at a high rate (a
/// client retrying deleted keys, or guessing) then piled up for a minute.
///
/// A sweep walks the whole cache: 37.6 ms for 1,000,000 entries
/// (benches/cache_memory.rs). So it runs on the blocking pool, not on the
/// proxy's event loop, holding one shard's lock at a time; and a large
/// cache is swept less often, at most 0.5% of a core (the pause after a
/// sweep is 200 times its length, up to `ttl`). After each sweep, the
/// metric series of deleted keys are let go
/// ([`Authenticator::forget_deleted_key_series`]).
pub async fn run_sweeper(
    authenticator: Arc<Authenticator>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let settings = authenticator.settings;
    let every = settings
        .negative_ttl
        .min(settings.ttl)
        .max(Duration::from_secs(1));
    let longest = every.max(settings.ttl);
    let mut pause = every;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let sweeping = Instant::now();
        let swept = authenticator.clone();
        if tokio::task::spawn_blocking(move || swept.evict_expired())
            .await
            .is_err()
        {
            return;
        }
        let took = sweeping.elapsed();
        // With deleted keys gone from the cache, their series are idle.
        authenticator.forget_deleted_key_series().await;
        pause = took.saturating_mul(200).clamp(every, longest);
    }
}

/// While the store is failing, asks it every [`STORE_RETRY_AFTER`] whether
/// it is back, and until it is, keeps keys past `ttl` (within
/// `stale_if_error`) served from the cache without a read. Without it, the
/// first request after each quiet [`STORE_RETRY_AFTER`] made that read
/// itself and, the store answering nothing, waited [`STORE_READ_TIMEOUT`]
/// for it: under light traffic, every request of an outage.
///
/// The probe reads a key that does not exist, through the same query as a
/// request's miss, so that what makes those reads fail (a lock on the keys'
/// table, a partition) makes it fail too, where a bare ping would pass.
pub async fn run_store_probe(
    authenticator: Arc<Authenticator>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let probe = KeyId::generate();
    // The retry period, the probe's read and a retry period of margin: the
    // next round extends the hold before this one lapses.
    let hold = duration_millis(STORE_READ_TIMEOUT + STORE_RETRY_AFTER * 2);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = authenticator.store_failed.notified() => {}
        }
        loop {
            let now = authenticator.millis_since_start();
            // Only while failing: a request's read may have found the store
            // back meanwhile, and cleared it.
            let held = authenticator.store_failing_until.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |until| (until != 0).then(|| until.max(now.saturating_add(hold))),
            );
            if held.is_err() {
                break;
            }
            let answered = tokio::select! {
                _ = &mut shutdown => return,
                answered = async {
                    tokio::time::sleep(STORE_RETRY_AFTER).await;
                    tokio::time::timeout(STORE_READ_TIMEOUT, authenticator.store.find_key(&probe)).await
                } => answered,
            };
            if let Ok(Ok(_)) = answered {
                authenticator
                    .store_failing_until
                    .store(0, Ordering::Relaxed);
                tracing::info!("key store answering again");
                break;
            }
        }
    }
}

/// The invalidation counters as a store read began.
#[derive(Clone, Copy)]
struct Epochs {
    /// [`Authenticator::epoch`].
    all: u64,
    /// [`Authenticator::creations`].
    creations: u64,
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The template of stand-ins for unknown ids: a digest of a string that is
/// not a possible secret (secrets are 32 base62 characters), disabled, with a
/// disabled owner, in case anything ever got past the `exists` check.
fn dummy_key() -> VerifiedKey {
    let mut key = VerifiedKey::new(KeyRecord {
        id: KeyId::generate(),
        digest: Digest::of(b"keygate-dummy-secret-for-unknown-ids"),
        previous: None,
        disabled: true,
        expiry: None,
        namespaces: Vec::new(),
        owner_id: String::new(),
        owner_type: OwnerType::User,
        owner_name: String::new(),
        owner_access: Access {
            account_role: crate::store::AccountRole::Read,
            namespaces: Default::default(),
        },
        owner_disabled: true,
    });
    key.real = false;
    key
}

/// A header value from stored text. The admin API refuses control
/// characters, so the fallback only guards against a hand-edited store.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_bytes(text.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
