//! Every Prometheus metric keygate exports, registered in one registry and
//! served as text at `/metrics` on the admin listener.
//!
//! Labels are bounded: the route's name (from config), the status class,
//! the failure reason, and the key *id* (never a secret), capped at
//! `[metrics] max_key_series` distinct keys; further keys count under
//! `key_id="_other"`. A key's counters are resolved once and kept with its
//! usage cell, so counting a request is an atomic add, not a label lookup.

// The key-series admission set is a plain Mutex: taken once per key when the
// key is first counted, never per request and never across an await.
#![allow(clippy::disallowed_types)]

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::key::KeyId;

/// The label value that collects keys beyond the series cap.
pub const OTHER_KEY: &str = "_other";

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub struct Metrics {
    registry: Registry,
    /// Proxied requests by key, owner, route and status class.
    requests: IntCounterVec,
    /// Authentication and authorization refusals by reason.
    auth_failures: IntCounterVec,
    /// Whole-request latency as seen by the proxy, by route.
    request_duration: HistogramVec,
    /// Time to the upstream's response headers, by route.
    upstream_duration: HistogramVec,
    /// Upstream failures by route and kind (`unavailable`, `timeout`).
    upstream_errors: IntCounterVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_entries: IntGauge,
    pub store_errors: IntCounter,
    /// Request and response body bytes, by direction.
    bytes: IntCounterVec,
    /// Usage records dropped because the store refused the flush.
    pub usage_dropped: IntCounter,
    /// Time from a key change to its cache invalidation here.
    pub invalidation_delay: Histogram,
    max_key_series: usize,
    /// Keys that have their own series. A lock, not an atomic structure:
    /// it is taken once per key when the key is first counted, never per
    /// request and never across an await.
    admitted: Mutex<HashSet<KeyId>>,
}

/// A key's resolved request counters, one per status class.
#[derive(Debug, Clone)]
pub struct KeySeries {
    by_class: [IntCounter; 5],
}

impl KeySeries {
    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].inc();
    }
}

impl Metrics {
    pub fn new(max_key_series: usize) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Proxied requests by key, owner, route and status class.",
            ),
            &["key_id", "owner_id", "route", "status_class"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "keygate_auth_failures_total",
                "Requests refused or cut short by the proxy, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from request to response headers, by route.",
            )
            .buckets(buckets.clone()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time the upstream took to answer, by route.",
            )
            .buckets(buckets.clone()),
            &["route"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "keygate_upstream_errors_total",
                "Upstream failures by route and kind.",
            ),
            &["route", "kind"],
        )
        .expect("valid metric");
        let cache_hits = IntCounter::new(
            "keygate_cache_hits_total",
            "Key lookups answered by the cache.",
        )
        .expect("valid metric");
        let cache_misses = IntCounter::new(
            "keygate_cache_misses_total",
            "Key lookups that went to the store.",
        )
        .expect("valid metric");
        let cache_entries = IntGauge::new(
            "keygate_cache_entries",
            "Key ids in the cache, known and unknown.",
        )
        .expect("valid metric");
        let store_errors =
            IntCounter::new("keygate_store_errors_total", "Failed key store operations.")
                .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "keygate_bytes_total",
                "Body bytes proxied, by direction (in: from clients, out: to clients).",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let usage_dropped = IntCounter::new(
            "keygate_usage_dropped_total",
            "Per-key usage counts dropped because the store refused the flush.",
        )
        .expect("valid metric");
        let invalidation_delay = Histogram::with_opts(
            HistogramOpts::new(
                "keygate_invalidation_delay_seconds",
                "Time from a key change in the store to its cache invalidation on this replica.",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(auth_failures.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(cache_entries.clone()),
            Box::new(store_errors.clone()),
            Box::new(bytes.clone()),
            Box::new(usage_dropped.clone()),
            Box::new(invalidation_delay.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            auth_failures,
            request_duration,
            upstream_duration,
            upstream_errors,
            cache_hits,
            cache_misses,
            cache_entries,
            store_errors,
            bytes,
            usage_dropped,
            invalidation_delay,
            max_key_series,
            admitted: Mutex::new(HashSet::new()),
        }
    }

    /// Resolves the request counters of a key on one route: its own series
    /// while fewer than `max_key_series` keys have one, `_other` after.
    pub fn key_series(&self, id: &KeyId, owner_id: &str, route: &str) -> KeySeries {
        let own = {
            let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
            admitted.contains(id) || (admitted.len() < self.max_key_series && admitted.insert(*id))
        };
        let (key, owner) = if own {
            (id.as_str(), owner_id)
        } else {
            (OTHER_KEY, OTHER_KEY)
        };
        KeySeries {
            by_class: STATUS_CLASSES
                .map(|class| self.requests.with_label_values(&[key, owner, route, class])),
        }
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    pub fn request_duration(&self, route: &str) -> Histogram {
        self.request_duration.with_label_values(&[route])
    }

    pub fn upstream_duration(&self, route: &str) -> Histogram {
        self.upstream_duration.with_label_values(&[route])
    }

    pub fn upstream_error(&self, route: &str, kind: &str) {
        self.upstream_errors.with_label_values(&[route, kind]).inc();
    }

    pub fn bytes(&self, direction: &'static str) -> IntCounter {
        self.bytes.with_label_values(&[direction])
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "metrics encoding failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
