//! A dudect-style timing check (Reparaz, Balasch, Verbauwhede, "Dude, is my
//! code constant time?", 2017): two classes of inputs, many interleaved
//! samples in random order, Welch's t-test. |t| above 4.5 is evidence that
//! the time depends on the class; below it, no evidence. The test runs on
//! per-input means, not on single samples (see `dudect` for why).
//!
//! Four experiments, on the library's real code (`--release` matters):
//!
//! 1. `Authenticator` verification (parse + verify, as on a request) of a
//!    wrong secret for one of 1,024 existing, cached key ids, against one of
//!    1,024 random unknown ids (answered from the cache too), over 64
//!    rounds that each start a new cache. Both must take the same time, or
//!    timing would tell an attacker which ids exist.
//! 2. The control: the same with two sets of unknown ids, where existence
//!    does not differ. It must pass, or the check is not calibrated here.
//! 3. Sensitivity: the control with a planted difference of about a
//!    nanosecond. It must be found, or a pass of (1) means nothing.
//! 4. `Digest::ct_eq` on equal digests against digests that differ in the
//!    first byte (where an early-exit comparison would be fastest).
//!
//! ```sh
//! cargo run --release --example timing                  # 1,000,000 samples each
//! cargo run --release --example timing -- --samples 5000000
//! ```
//!
//! Exits 1 if (1) or (4) shows |t| >= 4.5, and 2 if the check itself is off
//! on this machine (the control fails or the planted difference is missed).
//! It measures wall-clock time: run it pinned, on a quiet machine.

use std::collections::HashMap;
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

/// Rounds of the verification experiments, each with a new cache and new
/// cached objects. Within one round an id's place (its slot in the cache's
/// table, its object's address and CPU cache set) is fixed, and it costs a
/// little more or less than another id for that reason alone: with one
/// round, 1,024 ids per class still left two sets of *unknown* ids
/// |t| = 12-24 apart (the control, 2026-11-23), the same as existing
/// against unknown. dudect assumes each sample's input is drawn afresh
/// from its class; drawing the places afresh each round is what makes a
/// fixed set of ids approximate that. A cost that depends on existence is
/// the same in every round and still adds up over all samples.
const ROUNDS: usize = 64;

/// Rounds of the digest comparison, each with new copies of the digests:
/// the inputs `dudect` averages over.
const DIGEST_ROUNDS: usize = 1024;

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
/// noise; it tests the samples below several percentiles (and all of them),
/// and reports the largest |t|.
///
/// The unit of the test is the *input*, not the sample: each sample carries
/// the input it timed (`unit`), the samples of one input are averaged (after
/// the crop), and Welch's test runs on those means. An input's cost has a
/// part of its own (where its cache entry, its object and its string sit in
/// memory) that every repetition of it shares; testing the repetitions as if
/// each were drawn afresh counts one draw of that part many times, and the
/// control experiment (two sets of unknown ids, no difference in existence)
/// then failed in 2 runs of 3 with |t| up to 11.6. Averaging per input is the
/// usual analysis of repeated measures: a cost that depends on the class
/// shifts every input of that class and is still found (the sensitivity
/// experiment adds about a nanosecond to one class and must be found).
fn dudect(timed: &[Sample]) -> Verdict {
    let mut all: Vec<f64> = timed.iter().map(|s| s.ns).collect();
    all.sort_by(f64::total_cmp);
    let mut worst: Option<Verdict> = None;
    for (cut, q) in [("none", 1.0), ("p99", 0.99), ("p90", 0.90), ("p50", 0.50)] {
        let limit = all[((all.len() - 1) as f64 * q) as usize];
        // unit -> (class, sum, count) of its samples under the limit.
        let mut units: HashMap<usize, (usize, f64, u32)> = HashMap::new();
        for sample in timed.iter().filter(|s| s.ns <= limit) {
            let entry = units.entry(sample.unit).or_insert((sample.class, 0.0, 0));
            entry.1 += sample.ns;
            entry.2 += 1;
        }
        let means = |class| {
            units
                .values()
                .filter(|(c, _, _)| *c == class)
                .map(|(_, sum, n)| sum / f64::from(*n))
                .collect::<Vec<f64>>()
        };
        let (ka, kb) = (means(0), means(1));
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
                units: (ka.len(), kb.len()),
            });
        }
    }
    worst.expect("enough inputs in at least one crop")
}

/// One timing: which class, which input of it, how long.
struct Sample {
    class: usize,
    unit: usize,
    ns: f64,
}

struct Verdict {
    t: f64,
    mean_a: f64,
    mean_b: f64,
    cut: &'static str,
    /// Inputs tested per class.
    units: (usize, usize),
}

impl Verdict {
    fn leaks(&self) -> bool {
        self.t.abs() >= THRESHOLD
    }

    fn print(&self, name: &str, a: &str, b: &str) {
        println!(
            "{name}: |t| = {:.2} (worst crop: {}, {}+{} inputs), mean {a} {:.1} ns, {b} {:.1} ns -> {}",
            self.t.abs(),
            self.cut,
            self.units.0,
            self.units.1,
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
    let mut planted_spins = PLANTED_SPINS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--samples", Some(n)) => samples = n,
            ("--planted", Some(n)) => planted_spins = u32::try_from(n).unwrap_or(u32::MAX),
            _ => {
                eprintln!("usage: timing [--samples N] [--planted SPINS]");
                std::process::exit(64);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let verify = runtime.block_on(verification(samples, Experiment::Verify, 0));
    let control = runtime.block_on(verification(samples, Experiment::Control, 0));
    let sensitivity = runtime.block_on(verification(
        samples,
        Experiment::Sensitivity,
        planted_spins,
    ));
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
    sensitivity.print(
        "sensitivity: the control with a few instructions more for set B (must be found)",
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
    if control.leaks() || !sensitivity.leaks() {
        println!(
            "the check itself is off on this machine (a control that fails, or a planted difference it missed): its verdicts mean nothing here"
        );
        std::process::exit(2);
    }
}

/// What the two classes of the verification experiment are.
#[derive(Clone, Copy, PartialEq)]
enum Experiment {
    /// Wrong secrets for existing ids against unknown ids: the question.
    Verify,
    /// Two sets of unknown ids: nothing differs in existence, so a large
    /// |t| means the check sees something other than existence (where ids
    /// sit in memory): it is the check's floor on this machine.
    Control,
    /// The control with `--planted` more trips through memory for the
    /// second set (about a nanosecond, the size of the one extra branch this
    /// check once found in `verify`): if the check misses that, a pass of
    /// `Verify` means nothing.
    Sensitivity,
}

/// The planted difference of [`Experiment::Sensitivity`], in trips through
/// memory (`--planted N` to change it).
const PLANTED_SPINS: u32 = 12;

async fn verification(samples: usize, experiment: Experiment, planted_spins: u32) -> Verdict {
    // Both the control and the sensitivity experiment compare unknown ids
    // with unknown ids; only the latter plants a difference.
    let control = experiment != Experiment::Verify;
    let planted = experiment == Experiment::Sensitivity;
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
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut timed = Vec::with_capacity(2 * samples);
    let per_round = (2 * samples).div_ceil(ROUNDS);
    for round in 0..ROUNDS {
        // A new authenticator each round: a new cache, whose table hashes
        // with a new random seed, and new cached objects, so that where an
        // id sits is drawn afresh (see ROUNDS).
        let auth = Authenticator::new(store.clone(), settings, Arc::new(Metrics::new(10)));
        // A wrong secret for each existing id, and IDS unknown ids (valid
        // format and checksum, so both reach verification). Made in pairs,
        // one of each class, which first drawn at random, so that neither
        // class's strings sit together or always first in memory.
        let (mut wrong, mut unknown) = (Vec::with_capacity(IDS), Vec::with_capacity(IDS));
        let mut first = Vec::with_capacity(IDS);
        for id in &existing_ids {
            let wrong_first = rng.bit();
            let make_wrong = || {
                if control {
                    format.generate().1.expose().to_string()
                } else {
                    format.issue_secret(id).0.expose().to_string()
                }
            };
            let make_unknown = || format.generate().1.expose().to_string();
            if wrong_first {
                wrong.push(make_wrong());
                unknown.push(make_unknown());
            } else {
                unknown.push(make_unknown());
                wrong.push(make_wrong());
            }
            first.push(wrong_first);
        }
        let now = SystemTime::now();
        // Warm up: the keys into the cache, the unknown ids into the
        // negative cache, in the pairs and order above, so that the cached
        // objects of both classes are allocated alike (in one burst per
        // class, their placement in the heap and in the CPU caches
        // differed, and the check measured that; with one class always
        // first in each pair, that class was faster by 0.4-0.6 ns, in the
        // control as much as in the experiment).
        for ((w, u), wrong_first) in wrong.iter().zip(&unknown).zip(first) {
            let pair = if wrong_first { [w, u] } else { [u, w] };
            for t in pair {
                let parsed = format.parse(t.as_bytes()).expect("parses");
                assert!(auth.verify(&parsed, now).await.is_err());
            }
        }
        let classes = [&wrong, &unknown];
        for i in 0..per_round {
            // The same instructions for both classes: the class only picks
            // which list the token comes from, chosen before the clock
            // starts.
            let class = usize::from(rng.bit());
            let index = i % IDS;
            let token = black_box(classes[class][index].as_bytes());
            let spins = black_box(if planted && class == 1 {
                planted_spins
            } else {
                0
            });
            let start = Instant::now();
            // What a request costs: parse (hashes the secret), then verify.
            // A cache hit never awaits, so polling once completes it.
            let result = format
                .parse(token)
                .map(|parsed| auth.verify(&parsed, now).now_or_never());
            for spin in 0..spins {
                black_box(spin);
            }
            let elapsed = start.elapsed();
            match black_box(result) {
                Ok(Some(Err(_))) => {}
                _ => panic!("a sample was not answered from the cache with a refusal"),
            }
            timed.push(Sample {
                class,
                unit: (round * 2 + class) * IDS + index,
                ns: elapsed.as_nanos() as f64,
            });
        }
    }
    dudect(&timed)
}

fn digest_comparison(samples: usize) -> Verdict {
    let stored = Digest::of(b"the stored secret");
    let mut differ_bytes = *stored.as_bytes();
    differ_bytes[0] ^= 0xff;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut timed = Vec::with_capacity(2 * samples);
    let per_round = (2 * samples).div_ceil(DIGEST_ROUNDS);
    for round in 0..DIGEST_ROUNDS {
        // New copies each round, side by side in an order drawn at random,
        // so that where each sits in memory is drawn afresh (see `dudect`).
        let same = Digest::from_slice(stored.as_bytes()).expect("32 bytes");
        let differ = Digest::from_slice(&differ_bytes).expect("32 bytes");
        let x = Box::new(stored);
        let equal_first = rng.bit();
        let others = Box::new(if equal_first {
            [same, differ]
        } else {
            [differ, same]
        });
        let slot = |class: usize| usize::from((class == 0) != equal_first);
        for _ in 0..per_round {
            let class = usize::from(rng.bit());
            let other = black_box(&others[slot(class)]);
            let start = Instant::now();
            // One comparison is a few ns, under the clock's resolution: time
            // a batch of 32.
            for _ in 0..32 {
                black_box(black_box(&*x).ct_eq(black_box(other)));
            }
            timed.push(Sample {
                class,
                unit: round * 2 + class,
                ns: start.elapsed().as_nanos() as f64,
            });
        }
    }
    dudect(&timed)
}
