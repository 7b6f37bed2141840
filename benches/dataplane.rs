//! Micro-benchmarks of the data plane's per-request work: token parsing,
//! credential extraction, verification on a cache hit (target: under 1 µs)
//! and against a store of 1,000,000 keys, and header rewriting.
//!
//!     cargo bench --bench dataplane

#[path = "support.rs"]
mod support;

use std::sync::Arc;
use std::time::SystemTime;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue};
use keygate::auth::{CredentialExtractor, CredentialSource};
use keygate::proxy::headers::{ConnectionInfo, HeaderRules};
use keygate::proxy::routes::RouteTable;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn parsing(c: &mut Criterion) {
    let format = keygate::key::TokenFormat::new("kg");
    let (_, token, _) = format.generate();
    let bytes = token.expose().as_bytes().to_vec();
    c.bench_function("token/parse_and_hash", |b| {
        b.iter(|| format.parse(black_box(&bytes)).unwrap())
    });
    let extractor =
        CredentialExtractor::new(format.clone(), http::HeaderName::from_static("x-api-key"));
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token.expose())).unwrap(),
    );
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    c.bench_function("credential/extract_bearer", |b| {
        b.iter(|| extractor.extract(black_box(&headers)).unwrap())
    });
}

fn verification(c: &mut Criterion) {
    let rt = runtime();
    let small = rt.block_on(support::with_keys(1_000));
    let token = small
        .tokens
        .parse(small.issued[1].expose().as_bytes())
        .unwrap();
    let now = SystemTime::now();
    rt.block_on(small.auth.verify(&token, now)).unwrap();
    // A cache hit never awaits: `now_or_never` measures it without a runtime.
    c.bench_function("verify/cache_hit", |b| {
        b.iter(|| {
            small
                .auth
                .verify(black_box(&token), now)
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
    let unknown = small
        .tokens
        .parse(small.tokens.generate().1.expose().as_bytes())
        .unwrap();
    let _ = rt.block_on(small.auth.verify(&unknown, now));
    c.bench_function("verify/unknown_id_negative_cache", |b| {
        b.iter(|| {
            small
                .auth
                .verify(black_box(&unknown), now)
                .now_or_never()
                .unwrap()
                .unwrap_err()
        })
    });

    let keys: usize = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let big = rt.block_on(support::with_keys(keys));
    let parsed: Vec<_> = big
        .issued
        .iter()
        .step_by(97)
        .map(|t| big.tokens.parse(t.expose().as_bytes()).unwrap())
        .collect();
    for t in &parsed {
        rt.block_on(big.auth.verify(t, now)).unwrap();
    }
    let mut i = 0;
    c.bench_function("verify/1M_keys_in_store/cache_hit", |b| {
        b.iter(|| {
            i = (i + 1) % parsed.len();
            big.auth
                .verify(&parsed[i], now)
                .now_or_never()
                .unwrap()
                .unwrap()
        })
    });
    let mut j = 0;
    c.bench_function("verify/1M_keys_in_store/cache_miss_store_read", |b| {
        b.iter(|| {
            j = (j + 1) % parsed.len();
            big.auth.invalidate(&[parsed[j].id]);
            rt.block_on(big.auth.verify(&parsed[j], now)).unwrap()
        })
    });
}

fn rewriting(c: &mut Criterion) {
    let rt = runtime();
    let bench = rt.block_on(support::with_keys(10));
    let token = bench
        .tokens
        .parse(bench.issued[0].expose().as_bytes())
        .unwrap();
    let key = rt
        .block_on(bench.auth.verify(&token, SystemTime::now()))
        .unwrap();
    let config: keygate::config::Config = "[proxy]\nupstream = \"http://127.0.0.1:9\"\n"
        .parse()
        .unwrap();
    let routes = RouteTable::from_config(&config);
    let route = routes.select(None, "/").unwrap().clone();
    let rules = HeaderRules::new("x-keygate-", "x-api-key", false);
    let conn = Arc::new(ConnectionInfo {
        peer_ip: HeaderValue::from_static("10.1.2.3"),
        proto: HeaderValue::from_static("http"),
        trusted_proxy: false,
    });
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", bench.issued[0].expose())).unwrap(),
    );
    c.bench_function("headers/rewrite_request", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                rules.rewrite_request(
                    &mut h,
                    &conn,
                    Some((&key, CredentialSource::Authorization)),
                    &route,
                    false,
                );
                h
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, parsing, verification, rewriting);
criterion_main!(benches);
