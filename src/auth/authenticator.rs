//! The `Authenticator`: verifies a parsed token against a moka cache in front
//! of the key store, with a constant-time digest comparison, and checks the
//! key's state and expiry on every call.
//!
//! Timing: an unknown id costs the same hash and comparison as a known one
//! (against a dummy digest), and both are answered `invalid_api_key`. Only a
//! verified secret may learn that its key is disabled or expired.
//!
//! Freshness: entries are trusted for `ttl`; past it they are re-read, and if
//! the store is down they keep working until `ttl + stale_if_error`. Every
//! local change invalidates the affected ids at once, and bumps an epoch so
//! that a lookup that was in flight during the change never caches what it
//! read before it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use moka::sync::Cache;
use subtle::Choice;

use crate::key::{Digest, KeyId, ParsedToken};
use crate::store::{KeyRecord, KeyStore, StoreError};
use crate::telemetry::metrics::{KeySeries, Metrics};
use crate::telemetry::usage::UsageCell;

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

/// Identity header values, built once when a key is loaded so that the hot
/// path only clones them.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub key_id: HeaderValue,
    pub owner_id: HeaderValue,
    pub owner_type: HeaderValue,
    pub owner_name: HeaderValue,
    pub role: HeaderValue,
}

/// A key that passed verification: its record, its prebuilt identity
/// headers and its usage counter.
#[derive(Debug)]
pub struct VerifiedKey {
    pub record: KeyRecord,
    pub headers: IdentityHeaders,
    pub usage: Arc<UsageCell>,
    /// The request counters of the first route this key was used on,
    /// resolved once (index of the route, counters).
    pub series: OnceLock<(usize, KeySeries)>,
}

#[derive(Clone)]
struct CacheEntry {
    key: Arc<VerifiedKey>,
    loaded_at: Instant,
}

pub struct Authenticator {
    /// Where keys come from on a cache miss.
    store: Arc<dyn KeyStore>,
    /// Verified keys by id; lives `ttl + stale_if_error`, trusted for `ttl`.
    cache: Cache<KeyId, CacheEntry>,
    /// Ids the store said do not exist, for `negative_ttl`.
    unknown: Cache<KeyId, ()>,
    settings: CacheSettings,
    /// Bumped by every invalidation; a fill that saw it change does not cache.
    epoch: AtomicU64,
    /// The account-wide switch (`apiKeysEnabled`).
    api_keys_enabled: AtomicBool,
    /// Compared against when the id is unknown, to spend the same time.
    dummy: Digest,
    /// Cache hit/miss and store error counters.
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn KeyStore>,
        settings: CacheSettings,
        metrics: Arc<Metrics>,
    ) -> Authenticator {
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .time_to_live(settings.ttl + settings.stale_if_error)
            .build();
        let unknown = Cache::builder()
            .max_capacity(settings.capacity.min(100_000))
            .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
            .build();
        Authenticator {
            store,
            cache,
            unknown,
            settings,
            epoch: AtomicU64::new(0),
            api_keys_enabled: AtomicBool::new(true),
            dummy: Digest::of(b"keygate-dummy-secret-for-unknown-ids"),
            metrics,
        }
    }

    /// Verifies a presented token at `now`.
    pub async fn verify(
        &self,
        token: &ParsedToken,
        now: SystemTime,
    ) -> Result<Arc<VerifiedKey>, AuthError> {
        let presented = token.digest;
        let Some(key) = self.lookup(&token.id).await? else {
            let _ = self.dummy.ct_eq(&presented);
            return Err(AuthError::Invalid);
        };
        let record = &key.record;
        let current = record.digest.ct_eq(&presented);
        let previous = match &record.previous {
            Some((digest, until)) => {
                digest.ct_eq(&presented) & Choice::from(u8::from(now < *until))
            }
            // Same work whether or not the key was rotated.
            None => self.dummy.ct_eq(&presented) & Choice::from(0),
        };
        if !bool::from(current | previous) {
            return Err(AuthError::Invalid);
        }
        if record.disabled {
            return Err(AuthError::Disabled);
        }
        if record.expiry.is_some_and(|at| at <= now) {
            return Err(AuthError::Expired);
        }
        if record.owner_disabled {
            return Err(AuthError::OwnerDisabled);
        }
        if !self.api_keys_enabled.load(Ordering::Relaxed) {
            return Err(AuthError::ApiKeysDisabled);
        }
        Ok(key)
    }

    async fn lookup(&self, id: &KeyId) -> Result<Option<Arc<VerifiedKey>>, AuthError> {
        let cached = self.cache.get(id);
        if let Some(entry) = &cached {
            if entry.loaded_at.elapsed() < self.settings.ttl {
                self.metrics.cache_hits.inc();
                return Ok(Some(entry.key.clone()));
            }
        } else if self.unknown.contains_key(id) {
            self.metrics.cache_hits.inc();
            return Ok(None);
        }
        self.metrics.cache_misses.inc();
        let epoch = self.epoch.load(Ordering::Acquire);
        match self.store.find_key(id).await {
            Ok(Some(record)) => {
                // Keep counting into the same cell across a refresh.
                let usage = cached
                    .as_ref()
                    .map(|e| e.key.usage.clone())
                    .unwrap_or_default();
                let key = Arc::new(VerifiedKey {
                    headers: identity_headers(&record),
                    record,
                    usage,
                    series: OnceLock::new(),
                });
                if self.epoch.load(Ordering::Acquire) == epoch {
                    let entry = CacheEntry {
                        key: key.clone(),
                        loaded_at: Instant::now(),
                    };
                    self.cache.insert(*id, entry);
                    // An invalidation may have landed between the check and
                    // the insert (its own cache.invalidate then ran before
                    // our insert): look again, so a slow fill never brings
                    // back a key revoked while it was loading.
                    if self.epoch.load(Ordering::Acquire) != epoch {
                        self.cache.invalidate(id);
                    }
                }
                Ok(Some(key))
            }
            Ok(None) => {
                self.cache.invalidate(id);
                if self.epoch.load(Ordering::Acquire) == epoch {
                    self.unknown.insert(*id, ());
                }
                Ok(None)
            }
            Err(error) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%error, key_id = %id, "key store lookup failed");
                // Serve the stale entry while it is inside stale_if_error
                // (moka expires it after ttl + stale_if_error).
                match cached {
                    Some(entry) => Ok(Some(entry.key)),
                    None => Err(AuthError::StoreUnavailable),
                }
            }
        }
    }

    /// Drops these keys from the cache, so the next request reads the store.
    pub fn invalidate(&self, ids: &[KeyId]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for id in ids {
            self.cache.invalidate(id);
            self.unknown.invalidate(id);
        }
    }

    /// Drops every cached key and unknown id: for when the change feed
    /// cannot tell what changed (it fell behind the feed's retention, or the
    /// store was replaced).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.unknown.invalidate_all();
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

    /// Number of verified keys cached, for the metrics scrape. Runs the
    /// cache's pending maintenance first: moka counts lazily.
    pub fn cached_keys(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

fn identity_headers(record: &KeyRecord) -> IdentityHeaders {
    IdentityHeaders {
        key_id: header_value(record.id.as_str()),
        owner_id: header_value(&record.owner_id),
        owner_type: HeaderValue::from_static(record.owner_type.as_str()),
        owner_name: header_value(&record.owner_name),
        role: HeaderValue::from_static(record.owner_access.account_role.as_str()),
    }
}

/// A header value from stored text. The admin API refuses control
/// characters, so the fallback only guards against a hand-edited store.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_bytes(text.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
