//! A dudect-style timing check (Reparaz, Balasch, Verbauwhede, "Dude, is my
//! code constant time?", 2017): two classes of inputs, many interleaved
//! samples in random order, Welch's t-test on the timings. |t| above 4.5 is
//! evidence that the time depends on the class; below it, no evidence.
//!
//! Three experiments, on the library's real code (`--release` matters):
//!
//! 1. `Authenticator` verification (parse + verify, as on a request) of a
//!    wrong secret for one of 1,024 existing, cached key ids, against one of
//!    1,024 random unknown ids (answered from the cache too). Both must take
//!    the same time, or timing would tell an attacker which ids exist.
//! 2. The control: the same with two sets of unknown ids, where existence
//!    does not differ; its |t| is the check's own floor on this machine.
//! 3. `Digest::ct_eq` on equal digests against digests that differ in the
//!    first byte (where an early-exit comparison would be fastest).
//!
//! ```sh
//! cargo run --release --example timing                  # 1,000,000 samples each
//! cargo run --release --example timing -- --samples 5000000
//! ```
//!
//! Exits 1 if either experiment shows |t| >= 4.5. It measures wall-clock
//! time on a shared machine: run it on a quiet one, and read a single high
//! |t| next to the means before concluding anything.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use keygate::auth::{Authenticator, CacheSettings};
use keygate::key::{Digest, TokenFormat};
use keygate::telemetry::metrics::Metrics;

/// dudect's threshold: |t| beyond this is "definitely not constant time".
const THRESHOLD: f64 = 4.5;

/// Ids per class. Each id sits somewhere of its own in the cache's table and
/// in the CPU caches; with few ids, those placements differ between two sets
/// by chance and the t-test detects the sets, not existence (the control
/// experiment showed |t| > 80 for two sets of 64 unknown ids). Many ids per
/// class average placement out.
const IDS: usize = 1024;

/// Welch's t statistic between two samples, with the means (ns).
fn welch(a: &[f64], b: &[f64]) -> (f64, f64, f64) {
    let stats = |x: &[f64]| {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (n, mean, var)
    };
    let (na, ma, va) = stats(a);
    let (nb, mb, vb) = stats(b);
    ((ma - mb) / (va / na + vb / nb).sqrt(), ma, mb)
}

/// dudect crops the slow tail (interrupts, preemption), which only adds
/// noise; it tests the raw samples and those below several percentiles, and
/// reports the largest |t|.
fn dudect(a: &[f64], b: &[f64]) -> Verdict {
    let mut all: Vec<f64> = a.iter().chain(b).copied().collect();
    all.sort_by(f64::total_cmp);
    let mut worst: Option<Verdict> = None;
    for (cut, q) in [("none", 1.0), ("p99", 0.99), ("p90", 0.90), ("p50", 0.50)] {
        let limit = all[((all.len() - 1) as f64 * q) as usize];
        let keep = |x: &[f64]| {
            x.iter()
                .copied()
                .filter(|v| *v <= limit)
                .collect::<Vec<_>>()
        };
        let (ka, kb) = (keep(a), keep(b));
        if ka.len() < 100 || kb.len() < 100 {
            continue;
        }
        let (t, mean_a, mean_b) = welch(&ka, &kb);
        if worst.as_ref().is_none_or(|w| t.abs() > w.t.abs()) {
            worst = Some(Verdict {
                t,
                mean_a,
                mean_b,
                cut,
            });
        }
    }
    worst.expect("enough samples in at least one crop")
}

struct Verdict {
    t: f64,
    mean_a: f64,
    mean_b: f64,
    cut: &'static str,
}

impl Verdict {
    fn leaks(&self) -> bool {
        self.t.abs() >= THRESHOLD
    }

    fn print(&self, name: &str, a: &str, b: &str) {
        println!(
            "{name}: |t| = {:.2} (worst crop: {}), mean {a} {:.1} ns, {b} {:.1} ns -> {}",
            self.t.abs(),
            self.cut,
            self.mean_a,
            self.mean_b,
            if self.leaks() {
                "LEAKAGE (|t| >= 4.5)"
            } else {
                "no evidence of leakage (|t| < 4.5)"
            }
        );
    }
}

/// xorshift64: picks the class of each sample, so that drift in the machine
/// (frequency, caches, other processes) hits both classes alike.
struct Rng(u64);

impl Rng {
    fn bit(&mut self) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 & 1 == 1
    }
}

fn main() {
    let mut samples: usize = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--samples", Some(n)) => samples = n,
            _ => {
                eprintln!("usage: timing [--samples N]");
                std::process::exit(64);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let verify = runtime.block_on(verification(samples, false));
    // The same experiment with a second set of unknown ids in place of the
    // existing ones: nothing differs in existence, so a large |t| here means
    // the check is seeing where particular ids sit in the cache, not
    // whether they exist.
    let control = runtime.block_on(verification(samples, true));
    let compare = digest_comparison(samples);
    println!("samples per class: ~{samples} (interleaved at random)");
    verify.print(
        "verify: wrong secret for an existing id vs unknown id",
        "existing",
        "unknown",
    );
    control.print(
        "control: unknown ids vs other unknown ids (no difference in existence)",
        "set A",
        "set B",
    );
    compare.print(
        "Digest::ct_eq: equal vs differing at the first byte (x32 per sample)",
        "equal",
        "differing",
    );
    if verify.leaks() || compare.leaks() {
        std::process::exit(1);
    }
}

async fn verification(samples: usize, control: bool) -> Verdict {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("timing.db").display());
    let store = keygate::store::open(&url).await.expect("store");
    let format = TokenFormat::new("kg");
    let (_, _, admin) = keygate::admin::bootstrap::bootstrap(
        &*store,
        &format,
        "timing@example.com",
        Some(Duration::from_secs(3600)),
    )
    .await
    .expect("bootstrap");
    drop(admin);
    // IDS existing keys and IDS unknown ids, each probed in turn: the same
    // number of distinct ids on both sides, so that neither side is favoured
    // by one hot entry in the CPU caches (the question is whether an id
    // exists, so that is what varies).
    let actor = keygate::store::Actor::system("timing");
    store
        .update_settings(&actor, true, Duration::from_secs(90 * 86_400), 10_000, None)
        .await
        .expect("settings");
    let owner = store
        .find_principal_by_name(keygate::store::OwnerType::User, "timing@example.com")
        .await
        .expect("store")
        .expect("the bootstrap admin");
    let mut existing_ids = Vec::new();
    for i in 0..IDS {
        let (key, _) = keygate::admin::bootstrap::issue_key(
            &*store,
            &format,
            &actor,
            &owner,
            &format!("probe {i}"),
            "",
            Some(Duration::from_secs(3600)),
        )
        .await
        .expect("key");
        existing_ids.push(key.id);
    }
    // Long TTLs: every sample is served from the caches, as an attacker's
    // repeated probes would be.
    let settings = CacheSettings {
        capacity: 10_000,
        ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(3600),
        stale_if_error: Duration::from_secs(3600),
    };
    let auth = Authenticator::new(store, settings, Arc::new(Metrics::new(10)));
    // A wrong secret for each existing id, and 64 unknown ids (valid format
    // and checksum, so both reach verification).
    let wrong: Vec<String> = if control {
        (0..IDS)
            .map(|_| format.generate().1.expose().to_string())
            .collect()
    } else {
        existing_ids
            .iter()
            .map(|id| format.issue_secret(id).0.expose().to_string())
            .collect()
    };
    let unknown: Vec<String> = (0..IDS)
        .map(|_| format.generate().1.expose().to_string())
        .collect();
    let now = SystemTime::now();
    // Warm up: the key into the cache, the unknown ids into the negative cache.
    for t in wrong.iter().chain(&unknown) {
        let parsed = format.parse(t.as_bytes()).expect("parses");
        assert!(auth.verify(&parsed, now).await.is_err());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut a, mut b) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for i in 0..2 * samples {
        let existing = rng.bit();
        let token = if existing {
            &wrong[i % IDS]
        } else {
            &unknown[i % IDS]
        };
        let start = Instant::now();
        // What a request costs: parse (hashes the secret), then verify. A
        // cache hit never awaits, so polling once completes it.
        let result = format
            .parse(black_box(token.as_bytes()))
            .map(|parsed| auth.verify(&parsed, now).now_or_never());
        let elapsed = start.elapsed();
        match black_box(result) {
            Ok(Some(Err(_))) => {}
            _ => panic!("a sample was not answered from the cache with a refusal"),
        }
        let ns = elapsed.as_nanos() as f64;
        if existing {
            a.push(ns);
        } else {
            b.push(ns);
        }
    }
    dudect(&a, &b)
}

fn digest_comparison(samples: usize) -> Verdict {
    let x = Digest::of(b"the stored secret");
    let same = Digest::from_slice(x.as_bytes()).expect("32 bytes");
    let mut differ_bytes = *x.as_bytes();
    differ_bytes[0] ^= 0xff;
    let differ = Digest::from_slice(&differ_bytes).expect("32 bytes");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut a, mut b) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for _ in 0..2 * samples {
        let equal = rng.bit();
        let other = if equal { &same } else { &differ };
        let start = Instant::now();
        // One comparison is a few ns, under the clock's resolution: time a
        // batch of 32.
        for _ in 0..32 {
            black_box(black_box(&x).ct_eq(black_box(other)));
        }
        let ns = start.elapsed().as_nanos() as f64;
        if equal {
            a.push(ns);
        } else {
            b.push(ns);
        }
    }
    dudect(&a, &b)
}
