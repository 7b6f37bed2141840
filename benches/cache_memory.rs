//! Memory per cached key: fills the `Authenticator`'s cache with every key of
//! a store of N keys (default 1,000,000; `KEYS=...`) and reports the growth
//! of the process's resident memory divided by N. Also times one sweep of
//! the full cache (`Authenticator::evict_expired`, which keeps every entry
//! here), the work `run_sweeper` repeats every `negative_ttl`.
//!
//!     cargo bench --bench cache_memory

#[path = "support.rs"]
mod support;

use std::time::{Instant, SystemTime};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss");
    pages * 4096
}

fn main() {
    // `cargo bench` passes --bench; anything else (e.g. `cargo test`) only
    // checks that this builds and runs on a few keys.
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 1_000 });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let started = Instant::now();
        let bench = support::with_keys(n).await;
        let parsed: Vec<_> = bench
            .issued
            .iter()
            .map(|t| bench.tokens.parse(t.expose().as_bytes()).expect("parses"))
            .collect();
        let tokens_bytes = bench.issued.len() * std::mem::size_of::<keygate::key::ParsedToken>();
        eprintln!("store of {n} keys ready in {:.1} s", started.elapsed().as_secs_f64());
        let before = rss_bytes();
        let now = SystemTime::now();
        let filling = Instant::now();
        for token in &parsed {
            bench.auth.verify(token, now).await.expect("valid key");
        }
        let cached = bench.auth.cached_keys();
        let after = rss_bytes();
        let per_key = (after.saturating_sub(before)) as f64 / cached as f64;
        println!(
            "cache_memory: {cached} keys cached in {:.1} s; resident memory {:.1} MiB -> {:.1} MiB; {:.0} bytes per cached key \
             (the bench's own token list, {} bytes, was allocated before the first reading)",
            filling.elapsed().as_secs_f64(),
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per_key,
            tokens_bytes,
        );
        let sweeping = Instant::now();
        bench.auth.evict_expired();
        println!(
            "cache_sweep: one sweep of {} entries took {:.1} ms",
            bench.auth.cached_keys(),
            sweeping.elapsed().as_secs_f64() * 1000.0
        );
    });
}
