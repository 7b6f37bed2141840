//! Every Prometheus metric keygate exports, served as text at `/metrics` on
//! the admin listener: one registry, and the per-key request counters
//! written beside it.
//!
//! Labels are bounded: the route's name (from config), the status class,
//! the failure reason, the listener's certificate file (one at a time), and
//! the key *id* (never a secret), capped at
//! `[metrics] max_key_series` distinct keys; further keys count under
//! `key_id="_other"` (a deleted key's slot is freed by the cache sweeper).
//! A key's counters are resolved once and kept with the cached key, so
//! counting a request is an atomic add, not a label lookup.
//!
//! The per-key request counters are our own ([`KeyRequests`]) rather than
//! an `IntCounterVec`: a vec's child is one `Arc` per label set, so a key's
//! five status classes were five allocations behind a sixth that held them,
//! and counting a request cost two cache misses on top of the cached key
//! (perf, benches/load.sh). Here a key's five counts share one cache line,
//! and a scrape writes them as text without building protobuf metrics, a
//! few hundred series per chunk of the response ([`Metrics::render_chunks`])
//! so that a scrape of 10,000 keys never holds its whole 6 MB text.

// The key-series map is a plain Mutex: taken once per key and route when the
// key is first counted, and by a scrape; never per request and never across
// an await.
#![allow(clippy::disallowed_types)]

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::fmt::Write;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::Stream;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::key::KeyId;

/// The label value that collects keys beyond the series cap.
pub const OTHER_KEY: &str = "_other";

const REQUESTS_NAME: &str = "keygate_requests_total";
const REQUESTS_HELP: &str = "Proxied requests by key, owner, route and status class.";

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `kind` of `keygate_upstream_errors_total`: the upstream refused or
/// failed (502).
pub const UPSTREAM_UNAVAILABLE: &str = "unavailable";
/// `kind` of `keygate_upstream_errors_total`: it did not answer in time (504).
pub const UPSTREAM_TIMEOUT: &str = "timeout";

/// Key series written per chunk of a scrape: about 80 KB of text, enough
/// that a chunk is worth a write, small enough that what a scrape holds at
/// once does not grow with the number of keys.
const SERIES_PER_CHUNK: usize = 128;

/// A generous size of one key series' text (its five sample lines), to
/// size a chunk's buffer once.
const SERIES_TEXT_BYTES: usize = STATUS_CLASSES.len() * 128;

pub struct Metrics {
    registry: Registry,
    /// Proxied requests by key, owner, route and status class.
    requests: KeyRequests,
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
    /// Requests whose usage count was given up (see `usage::run_flusher`).
    pub usage_dropped: IntCounter,
    /// Usage flush attempts that failed or got no answer (each batch is
    /// sent again as it was).
    pub usage_flush_failures: IntCounter,
    /// Time from a key change to its cache invalidation here.
    pub invalidation_delay: Histogram,
    /// The change log's sequence number this replica has applied up to.
    pub change_feed_seq: IntGauge,
    /// notAfter of the listener's served certificate, by certificate file:
    /// one series while TLS serves, none without TLS or when the period
    /// cannot be read.
    tls_certificate_expiry: IntGaugeVec,
}

/// A key's request counts on one route, one per status class. Aligned to a
/// cache line so that a request touches exactly one.
#[derive(Debug)]
#[repr(align(64))]
pub struct KeyCounts {
    /// [`crate::proxy::routes::Route::series_id`] of the route counted
    /// here, so a key used on another route resolves again.
    pub route_id: u64,
    by_class: [AtomicU64; 5],
}

impl KeyCounts {
    fn new(route_id: u64) -> KeyCounts {
        KeyCounts {
            route_id,
            by_class: Default::default(),
        }
    }

    pub fn count(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, class: usize) -> u64 {
        self.by_class[class].load(Ordering::Relaxed)
    }
}

/// The labels of one key's series: key id, owner id, route.
type SeriesLabels = (Box<str>, Box<str>, Box<str>);

/// `keygate_requests_total`: the counts of every key that has been counted,
/// exported by status class. Counts outlive the cached key (a key evicted
/// and loaded again counts on), as a counter must.
struct KeyRequests {
    max_key_series: usize,
    series: Mutex<SeriesMap>,
}

#[derive(Default)]
struct SeriesMap {
    /// Keys that have their own series; at most `max_key_series`.
    admitted: HashSet<KeyId>,
    /// Ordered, so that a scrape can write it a chunk at a time and resume
    /// after the last labels written, whatever was added or removed since.
    counts: BTreeMap<SeriesLabels, Arc<KeyCounts>>,
}

impl KeyRequests {
    fn new(max_key_series: usize) -> KeyRequests {
        KeyRequests {
            max_key_series,
            series: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SeriesMap> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resolve(&self, id: &KeyId, owner_id: &str, route: &str, route_id: u64) -> Arc<KeyCounts> {
        let mut series = self.lock();
        let own = series.admitted.contains(id)
            || (series.admitted.len() < self.max_key_series && series.admitted.insert(*id));
        let (key, owner) = if own {
            (id.as_str(), owner_id)
        } else {
            (OTHER_KEY, OTHER_KEY)
        };
        let labels: SeriesLabels = (key.into(), owner.into(), route.into());
        series
            .counts
            .entry(labels)
            .or_insert_with(|| Arc::new(KeyCounts::new(route_id)))
            .clone()
    }

    /// Keys with their own series that nothing counts through (held by this
    /// map alone: no cached copy of the key), once at least 90% of
    /// `max_key_series` slots are taken; otherwise none.
    fn idle_keys(&self) -> Vec<KeyId> {
        let series = self.lock();
        if series.admitted.len() < self.max_key_series.saturating_mul(9) / 10 {
            return Vec::new();
        }
        let mut idle: Vec<KeyId> = series
            .counts
            .iter()
            .filter(|(_, counts)| Arc::strong_count(counts) == 1)
            .filter_map(|((key, _, _), _)| KeyId::parse(key).ok())
            .collect();
        idle.sort_unstable();
        idle.dedup();
        idle
    }

    /// Drops every series of `deleted` keys and frees their slots.
    fn forget(&self, deleted: &[KeyId]) -> usize {
        let mut series = self.lock();
        let before = series.admitted.len();
        for id in deleted {
            series.admitted.remove(id);
        }
        let SeriesMap { admitted, counts } = &mut *series;
        counts.retain(|(key, _, _), _| KeyId::parse(key).map_or(true, |id| admitted.contains(&id)));
        before - series.admitted.len()
    }

    /// Drops every series of the `routes` named, and frees the slot of a
    /// key left with no series at all (nothing else would: the sweeper
    /// looks for keys by their series).
    fn forget_routes(&self, routes: &HashSet<&str>) {
        let mut series = self.lock();
        let SeriesMap { admitted, counts } = &mut *series;
        counts.retain(|(_, _, route), _| !routes.contains(&**route));
        let counted: HashSet<KeyId> = counts
            .keys()
            .filter_map(|(key, _, _)| KeyId::parse(key).ok())
            .collect();
        admitted.retain(|id| counted.contains(id));
    }

    /// Appends, in Prometheus' text format, up to `limit` series that come
    /// after `after` (from the first when `None`), and returns the labels of
    /// the last one written, to resume after; `None` when none was left.
    /// Written directly: as a `Collector` (protobuf `Metric`s, then the text
    /// encoder) a scrape of 10,000 keys built 50,000 metric objects first,
    /// tens of MB for a moment. The lock is held for one chunk only, so
    /// counting new keys waits at most that long.
    fn write_text(
        &self,
        after: Option<&SeriesLabels>,
        limit: usize,
        out: &mut String,
    ) -> Option<SeriesLabels> {
        let series = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut last = None;
        for (labels, counts) in series.counts.range((start, Bound::Unbounded)).take(limit) {
            let (key, owner, route) = labels;
            for (class, name) in STATUS_CLASSES.iter().enumerate() {
                out.push_str(REQUESTS_NAME);
                out.push_str("{key_id=\"");
                push_label_value(out, key);
                out.push_str("\",owner_id=\"");
                push_label_value(out, owner);
                out.push_str("\",route=\"");
                push_label_value(out, route);
                let _ = writeln!(out, "\",status_class=\"{name}\"}} {}", counts.get(class));
            }
            last = Some(labels);
        }
        last.cloned()
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn push_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Metrics {
    pub fn new(max_key_series: usize) -> Metrics {
        let registry = Registry::new();
        let requests = KeyRequests::new(max_key_series);
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
            "Requests whose usage count was given up (a flush unsettled after its retries or at shutdown); some may still have been written, none twice.",
        )
        .expect("valid metric");
        let usage_flush_failures = IntCounter::new(
            "keygate_usage_flush_failures_total",
            "Usage flush attempts that failed or got no answer; each batch is sent again as it was, and the store applies it once.",
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
        let change_feed_seq = IntGauge::new(
            "keygate_change_feed_seq",
            "The sequence number of the last store change this replica's cache has applied; replicas at the same value have seen the same changes.",
        )
        .expect("valid metric");
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "keygate_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate the TLS listener serves, in seconds since the Unix epoch.",
            ),
            &["cert_file"],
        )
        .expect("valid metric");
        // `requests` is not registered: a scrape writes it after the
        // registry's metrics (see `render_chunks`).
        for collector in [
            Box::new(auth_failures.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(cache_entries.clone()),
            Box::new(store_errors.clone()),
            Box::new(bytes.clone()),
            Box::new(usage_dropped.clone()),
            Box::new(usage_flush_failures.clone()),
            Box::new(invalidation_delay.clone()),
            Box::new(change_feed_seq.clone()),
            Box::new(tls_certificate_expiry.clone()),
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
            usage_flush_failures,
            invalidation_delay,
            change_feed_seq,
            tls_certificate_expiry,
        }
    }

    /// Resolves the request counts of a key on one route: its own series
    /// while fewer than `max_key_series` keys have one, `_other` after.
    pub fn key_counts(
        &self,
        id: &KeyId,
        owner_id: &str,
        route: &str,
        route_id: u64,
    ) -> Arc<KeyCounts> {
        self.requests.resolve(id, owner_id, route, route_id)
    }

    /// Candidates for [`Self::forget_deleted_keys`]: keys with a series of
    /// their own that no cached key counts through, once the series cap is
    /// nearly full (below that, keeping them costs nothing).
    pub fn idle_series_keys(&self) -> Vec<KeyId> {
        self.requests.idle_keys()
    }

    /// Drops the series of keys the store no longer has, freeing their
    /// slots for new keys. Without this, under key churn the first
    /// `max_key_series` keys ever counted kept every slot and all newer
    /// keys counted under `_other` until a restart. Only deleted keys lose
    /// their series: an existing key's counter is never reset.
    pub fn forget_deleted_keys(&self, deleted: &[KeyId]) -> usize {
        self.requests.forget(deleted)
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// Starts the series of every refusal reason and, for each route, of
    /// every upstream error kind at zero. A series that appears only at its
    /// first increment has no earlier sample, so `rate()` and
    /// `increase()` miss that first failure and an alert on it stays
    /// silent; creating them is idempotent, so a reload's new routes get
    /// theirs too. No per-key label is involved.
    pub fn start_failure_series<'r, 'n>(
        &self,
        reasons: impl IntoIterator<Item = &'r str>,
        routes: impl IntoIterator<Item = &'n str>,
    ) {
        for reason in reasons {
            self.auth_failures.with_label_values(&[reason]);
        }
        for route in routes {
            for kind in [UPSTREAM_UNAVAILABLE, UPSTREAM_TIMEOUT] {
                self.upstream_errors.with_label_values(&[route, kind]);
            }
        }
    }

    /// Drops every series labelled with one of `routes`, which a reload
    /// has removed: their request counts, latency histograms and upstream
    /// errors. Without this a removed route was exported, frozen, until a
    /// restart, and every reload that renamed routes added more. Routes
    /// still served must not be named here: their counts would restart.
    pub fn forget_routes<'r>(&self, routes: impl IntoIterator<Item = &'r str>) {
        let routes: HashSet<&str> = routes.into_iter().collect();
        if routes.is_empty() {
            return;
        }
        for &route in &routes {
            // Err: no such series (a histogram never observed, say).
            let _ = self.request_duration.remove_label_values(&[route]);
            let _ = self.upstream_duration.remove_label_values(&[route]);
            for kind in [UPSTREAM_UNAVAILABLE, UPSTREAM_TIMEOUT] {
                let _ = self.upstream_errors.remove_label_values(&[route, kind]);
            }
        }
        self.requests.forget_routes(&routes);
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

    /// The served certificate is now the one in `cert_file`, valid until
    /// `not_after` (Unix seconds; `None`: unknown, no series). Replaces the
    /// series of the certificate served before, whatever its file.
    pub fn set_tls_certificate_expiry(&self, cert_file: &std::path::Path, not_after: Option<i64>) {
        self.tls_certificate_expiry.reset();
        if let Some(not_after) = not_after {
            self.tls_certificate_expiry
                .with_label_values(&[&*cert_file.to_string_lossy()])
                .set(not_after);
        }
    }

    /// The registry's metrics and the head of the per-key family: the
    /// first chunk of a scrape.
    fn render_head(&self) -> String {
        let mut out = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%error, "metrics encoding failed");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        let _ = write!(
            text,
            "# HELP {REQUESTS_NAME} {REQUESTS_HELP}\n# TYPE {REQUESTS_NAME} counter\n"
        );
        text
    }

    /// The Prometheus text exposition of every metric, as the chunks of a
    /// response body: the registry first, then [`SERIES_PER_CHUNK`] key
    /// series at a time, each written when the connection takes the one
    /// before. Like any scrape it is not one instant: counts move while it
    /// is written, and keys added meanwhile may or may not appear.
    pub fn render_chunks(self: Arc<Self>) -> impl Stream<Item = Result<Bytes, Infallible>> {
        enum Next {
            Head,
            SeriesAfter(Option<SeriesLabels>),
        }
        futures_util::stream::unfold((self, Next::Head), |(metrics, next)| async move {
            let after = match next {
                Next::Head => {
                    let head = Bytes::from(metrics.render_head());
                    return Some((Ok(head), (metrics, Next::SeriesAfter(None))));
                }
                Next::SeriesAfter(after) => after,
            };
            let mut text = String::with_capacity(SERIES_PER_CHUNK * SERIES_TEXT_BYTES);
            // None: every series has been written.
            let last = metrics
                .requests
                .write_text(after.as_ref(), SERIES_PER_CHUNK, &mut text)?;
            Some((
                Ok(Bytes::from(text)),
                (metrics, Next::SeriesAfter(Some(last))),
            ))
        })
    }

    /// The whole exposition as one string, the chunks joined.
    #[cfg(test)]
    fn render(&self) -> String {
        let mut text = self.render_head();
        let mut after = None;
        while let Some(last) = self
            .requests
            .write_text(after.as_ref(), SERIES_PER_CHUNK, &mut text)
        {
            after = Some(last);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, labels: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(&format!("keygate_requests_total{{{labels}}}")))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn key_counts_are_exported_by_class_and_outlive_their_holder() {
        let metrics = Metrics::new(1);
        let (a, b) = (KeyId::generate(), KeyId::generate());
        let first = metrics.key_counts(&a, "owner-a", "api", 7);
        first.count(200);
        first.count(204);
        first.count(503);
        // The key is evicted and loaded again: same labels, same counts.
        drop(first);
        metrics.key_counts(&a, "owner-a", "api", 7).count(200);
        // Over the cap of one key: counted under _other.
        metrics.key_counts(&b, "owner-b", "api", 7).count(401);

        let text = metrics.render();
        let own = format!(
            "key_id=\"{}\",owner_id=\"owner-a\",route=\"api\"",
            a.as_str()
        );
        assert_eq!(
            line(&text, &format!("{own},status_class=\"2xx\"")),
            Some("3")
        );
        assert_eq!(
            line(&text, &format!("{own},status_class=\"5xx\"")),
            Some("1")
        );
        assert_eq!(
            line(&text, &format!("{own},status_class=\"4xx\"")),
            Some("0")
        );
        let other = "key_id=\"_other\",owner_id=\"_other\",route=\"api\",status_class=\"4xx\"";
        assert_eq!(line(&text, other), Some("1"));
        assert!(
            !text.contains(b.as_str()),
            "a key over the cap has no series"
        );
        assert!(text.contains("# TYPE keygate_requests_total counter"));
    }

    #[test]
    fn the_certificate_expiry_has_one_series_for_the_served_file() {
        let metrics = Metrics::new(10);
        let series = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.starts_with("keygate_tls_certificate_expiry_timestamp_seconds{"))
                .map(str::to_owned)
                .collect()
        };
        // No TLS: no series.
        assert!(series(&metrics.render()).is_empty());
        let path = std::path::Path::new("/etc/keygate/a.crt");
        metrics.set_tls_certificate_expiry(path, Some(1_700_000_000));
        assert_eq!(
            series(&metrics.render()),
            ["keygate_tls_certificate_expiry_timestamp_seconds{cert_file=\"/etc/keygate/a.crt\"} 1700000000"]
        );
        // A reload to another file replaces it; an unreadable period drops it.
        let other = std::path::Path::new("/etc/keygate/b.crt");
        metrics.set_tls_certificate_expiry(other, Some(1_800_000_000));
        assert_eq!(
            series(&metrics.render()),
            ["keygate_tls_certificate_expiry_timestamp_seconds{cert_file=\"/etc/keygate/b.crt\"} 1800000000"]
        );
        metrics.set_tls_certificate_expiry(other, None);
        assert!(series(&metrics.render()).is_empty());
    }

    #[test]
    fn route_names_are_escaped_and_the_family_is_declared_once() {
        let metrics = Metrics::new(10);
        let id = KeyId::generate();
        metrics.key_counts(&id, "o", "a\"b\\c\nd", 1).count(200);
        metrics.key_counts(&id, "o", "plain", 2).count(200);
        let text = metrics.render();
        assert!(
            text.contains("route=\"a\\\"b\\\\c\\nd\""),
            "escaped as the text format wants: {text}"
        );
        assert_eq!(
            text.matches("# TYPE keygate_requests_total counter")
                .count(),
            1
        );
        assert_eq!(text.matches("# HELP keygate_requests_total ").count(), 1);
        // Every sample line is `name{labels} value`, one per line.
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("keygate_requests_total{"))
            .collect();
        assert_eq!(samples.len(), 2 * STATUS_CLASSES.len());
        assert!(samples.iter().all(|l| l
            .rsplit(' ')
            .next()
            .is_some_and(|v| v.parse::<u64>().is_ok())));
    }

    #[test]
    fn deleted_keys_free_their_series_slots() {
        let metrics = Metrics::new(2);
        let (a, b, c) = (KeyId::generate(), KeyId::generate(), KeyId::generate());
        metrics.key_counts(&a, "o", "api", 1).count(200);
        metrics.key_counts(&a, "o", "web", 2).count(200);
        // Below 90% of the cap there are no candidates.
        let roomy = Metrics::new(10);
        roomy.key_counts(&a, "o", "api", 1).count(200);
        assert!(roomy.idle_series_keys().is_empty());
        // At the cap: b is still cached (held), a is not.
        let held_b = metrics.key_counts(&b, "o", "api", 1);
        held_b.count(200);
        assert_eq!(metrics.idle_series_keys(), vec![a]);
        assert_eq!(metrics.forget_deleted_keys(&[a]), 1);
        let text = metrics.render();
        assert!(!text.contains(a.as_str()), "a's series are gone");
        assert!(text.contains(b.as_str()), "b's series stays");
        // The freed slot goes to a new key instead of `_other`.
        metrics.key_counts(&c, "o", "api", 1).count(200);
        let text = metrics.render();
        assert!(text.contains(c.as_str()));
        assert!(!text.contains(OTHER_KEY));
    }

    #[test]
    fn forgotten_routes_lose_every_series_and_free_key_slots() {
        let metrics = Metrics::new(2);
        let (a, b, c) = (KeyId::generate(), KeyId::generate(), KeyId::generate());
        metrics.start_failure_series([], ["gone", "kept"]);
        metrics.key_counts(&a, "o", "gone", 1).count(200);
        metrics.key_counts(&a, "o", "kept", 2).count(200);
        metrics.key_counts(&b, "o", "gone", 1).count(200);
        metrics.request_duration("gone").observe(0.1);
        metrics.upstream_duration("kept").observe(0.1);
        metrics.upstream_error("gone", UPSTREAM_TIMEOUT);
        metrics.forget_routes(["gone"]);
        let text = metrics.render();
        assert!(!text.contains("\"gone\""), "{text}");
        assert_eq!(
            line(
                &text,
                &format!(
                    "key_id=\"{}\",owner_id=\"o\",route=\"kept\",status_class=\"2xx\"",
                    a.as_str()
                )
            ),
            Some("1")
        );
        assert!(text.contains("keygate_upstream_duration_seconds_count{route=\"kept\"} 1"));
        assert!(text.contains("keygate_upstream_errors_total{kind=\"timeout\",route=\"kept\"} 0"));
        // b had series on the removed route only: its slot is c's now.
        metrics.key_counts(&c, "o", "kept", 2).count(200);
        assert!(metrics.render().contains(c.as_str()));
    }

    /// A scrape's chunks, as the admin listener would send them.
    async fn chunks(metrics: &Arc<Metrics>) -> Vec<String> {
        use futures_util::StreamExt;
        metrics
            .clone()
            .render_chunks()
            .map(|chunk| String::from_utf8(chunk.unwrap().to_vec()).unwrap())
            .collect()
            .await
    }

    fn sample_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("keygate_requests_total{"))
            .collect()
    }

    #[tokio::test]
    async fn a_scrape_is_written_a_chunk_at_a_time() {
        let metrics = Arc::new(Metrics::new(10_000));
        let keys: Vec<KeyId> = (0..2 * SERIES_PER_CHUNK + 44)
            .map(|_| KeyId::generate())
            .collect();
        for key in &keys {
            metrics.key_counts(key, "o", "api", 1).count(200);
        }
        let sent = chunks(&metrics).await;
        // The registry, then two full chunks of series and the rest.
        assert_eq!(
            sent.len(),
            4,
            "{:?}",
            sent.iter().map(String::len).collect::<Vec<_>>()
        );
        assert!(sent[0].contains("# TYPE keygate_cache_hits_total counter"));
        assert!(sent[0].ends_with("# TYPE keygate_requests_total counter\n"));
        for (chunk, series) in sent[1..]
            .iter()
            .zip([SERIES_PER_CHUNK, SERIES_PER_CHUNK, 44])
        {
            assert_eq!(sample_lines(chunk).len(), series * STATUS_CLASSES.len());
        }
        assert_eq!(sent.concat(), metrics.render());

        // A whole number of chunks ends without an empty one.
        let exact = Arc::new(Metrics::new(10_000));
        for key in &keys[..SERIES_PER_CHUNK] {
            exact.key_counts(key, "o", "api", 1).count(200);
        }
        let sent = chunks(&exact).await;
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|chunk| !chunk.is_empty()));
    }

    #[tokio::test]
    async fn series_added_or_removed_during_a_scrape_do_not_repeat_or_hide_others() {
        use futures_util::StreamExt;
        let metrics = Arc::new(Metrics::new(10_000));
        let keys: Vec<KeyId> = (0..3 * SERIES_PER_CHUNK)
            .map(|_| KeyId::generate())
            .collect();
        for key in &keys {
            metrics.key_counts(key, "o", "api", 1).count(200);
        }
        let mut scrape = Box::pin(metrics.clone().render_chunks());
        let mut text = String::new();
        for _ in 0..2 {
            let chunk = scrape.next().await.unwrap().unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        // Between chunks: a third of the keys are deleted, new ones counted.
        let (gone, kept) = keys.split_at(SERIES_PER_CHUNK);
        metrics.forget_deleted_keys(gone);
        let newcomers: Vec<KeyId> = (0..50).map(|_| KeyId::generate()).collect();
        for key in &newcomers {
            metrics.key_counts(key, "o", "api", 1).count(200);
        }
        while let Some(chunk) = scrape.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        let lines = sample_lines(&text);
        let unique: HashSet<&&str> = lines.iter().collect();
        assert_eq!(unique.len(), lines.len(), "no series written twice");
        for key in kept {
            let written = lines.iter().filter(|l| l.contains(key.as_str())).count();
            assert_eq!(
                written,
                STATUS_CLASSES.len(),
                "{} in every class once",
                key.as_str()
            );
        }
    }
}
