//! Per-key rate limiting (`[rate_limit]`): each key may make
//! `per_key_per_second` requests per second on average, in bursts of up to
//! `burst`, across every route; beyond that the proxy answers
//! `429 rate_limited` with `Retry-After`.
//!
//! The bucket is GCRA, the token bucket kept as one number per key: the
//! "theoretical arrival time" of the key's next request. A request at `now`
//! is allowed when that time is at most `burst - 1` intervals ahead of
//! `now`, and moves it one interval on. One atomic compare-and-swap per
//! request, no refill task, no lock.
//!
//! The numbers live in [`Buckets`], which outlives configuration reloads
//! (a reload changes the rate, not what keys have used). They are bounded
//! like the key cache: a key whose bucket is evicted starts again with a
//! full burst. Each replica limits on its own; N replicas allow N times
//! the rate.
//!
//! Why by hand: the algorithm is a dozen lines over an atomic; the crates
//! that offer it (governor) bring their own keyed map and clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;

use crate::config::RateLimitConfig;
use crate::key::KeyId;

/// The per-key state, shared by every configuration generation.
pub struct Buckets {
    /// Theoretical arrival time per key, in nanoseconds since `epoch`.
    arrivals: Cache<KeyId, Arc<AtomicU64>>,
    epoch: Instant,
}

impl Buckets {
    /// Room for `capacity` keys' buckets.
    pub fn new(capacity: usize) -> Buckets {
        Buckets {
            arrivals: Cache::new(capacity.max(1)),
            epoch: Instant::now(),
        }
    }
}

/// The configured limit over the shared buckets.
pub struct RateLimiter {
    /// Nanoseconds between requests at the average rate.
    interval: u64,
    /// How far ahead of now a key's arrival time may run: `burst - 1`
    /// intervals.
    tolerance: u64,
    buckets: Arc<Buckets>,
}

/// A request over the key's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited;

impl RateLimiter {
    /// The limiter `config` asks for; `None` when rate limiting is off.
    pub fn new(config: &RateLimitConfig, buckets: Arc<Buckets>) -> Option<RateLimiter> {
        if config.per_key_per_second == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(config.per_key_per_second);
        let burst = u64::from(config.burst());
        Some(RateLimiter {
            interval,
            tolerance: interval.saturating_mul(burst.saturating_sub(1)),
            buckets,
        })
    }

    /// Counts a request of `key` now, or refuses it.
    pub fn check(&self, key: &KeyId) -> Result<(), Limited> {
        self.check_at(key, self.buckets.epoch.elapsed())
    }

    fn check_at(&self, key: &KeyId, since_epoch: Duration) -> Result<(), Limited> {
        let now = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
        let arrival = self
            .buckets
            .arrivals
            .get_or_insert_with(key, || Ok::<_, ()>(Arc::new(AtomicU64::new(0))))
            .unwrap_or_else(|()| Arc::new(AtomicU64::new(0)));
        let mut expected = arrival.load(Ordering::Acquire);
        loop {
            let start = expected.max(now);
            if start - now > self.tolerance {
                return Err(Limited);
            }
            match arrival.compare_exchange_weak(
                expected,
                start.saturating_add(self.interval),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => expected = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32) -> RateLimiter {
        let config = RateLimitConfig {
            per_key_per_second: per_second,
            burst,
        };
        RateLimiter::new(&config, Arc::new(Buckets::new(100))).unwrap()
    }

    #[test]
    fn a_burst_then_the_average_rate() {
        let limiter = limiter(10, 3);
        let key = KeyId::generate();
        let at = |ms: u64| Duration::from_millis(1_000 + ms);
        // Three at once, the fourth refused.
        for _ in 0..3 {
            assert_eq!(limiter.check_at(&key, at(0)), Ok(()));
        }
        assert_eq!(limiter.check_at(&key, at(0)), Err(Limited));
        // One interval (100 ms) later there is room for one more.
        assert_eq!(limiter.check_at(&key, at(99)), Err(Limited));
        assert_eq!(limiter.check_at(&key, at(100)), Ok(()));
        assert_eq!(limiter.check_at(&key, at(100)), Err(Limited));
        // A quiet second refills the whole burst, no more.
        for _ in 0..3 {
            assert_eq!(limiter.check_at(&key, at(1_100)), Ok(()));
        }
        assert_eq!(limiter.check_at(&key, at(1_100)), Err(Limited));
        // Another key has a bucket of its own.
        assert_eq!(limiter.check_at(&KeyId::generate(), at(1_100)), Ok(()));
    }

    #[test]
    fn refused_requests_do_not_use_up_the_rate() {
        let limiter = limiter(1, 1);
        let key = KeyId::generate();
        let second = |s: u64| Duration::from_secs(10 + s);
        assert_eq!(limiter.check_at(&key, second(0)), Ok(()));
        for _ in 0..100 {
            assert_eq!(limiter.check_at(&key, second(0)), Err(Limited));
        }
        assert_eq!(limiter.check_at(&key, second(1)), Ok(()));
    }

    #[test]
    fn zero_means_off() {
        let config = RateLimitConfig::default();
        assert!(RateLimiter::new(&config, Arc::new(Buckets::new(1))).is_none());
    }
}
