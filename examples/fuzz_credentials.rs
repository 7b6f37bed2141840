//! A stable-toolchain fuzzer for the bytes keygate reads before it trusts
//! anything: credential extraction (Bearer, Basic, the key header) and the
//! identity-header rewrite. cargo-fuzz needs nightly; this needs nothing.
//!
//! It mutates a corpus of nasty seeds (and freshly issued valid tokens) with
//! a seeded PRNG, builds header maps from the results, and checks:
//!
//! - nothing panics;
//! - the parser agrees with an independent reference implementation of the
//!   token format on every input (accept and reject alike);
//! - a credential is only ever taken from a header present exactly once;
//! - after the rewrite the upstream would see our identity headers only, one
//!   value each, no credential and no hop-by-hop header.
//!
//! Run it longer than CI does (tests/fuzz_smoke.rs runs a bounded pass):
//!
//! ```sh
//! cargo run --release --example fuzz_credentials -- --seconds 600
//! cargo run --release --example fuzz_credentials -- --iterations 50000000 --seed 42
//! cargo run --release --example fuzz_credentials -- --corpus my-seeds/   # one raw value per file
//! ```
//!
//! A failure prints the seed, the iteration and the offending headers
//! (escaped), and exits 1; `--seed` replays it.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use keygate::auth::{CredentialExtractor, CredentialSource, VerifiedKey};
use keygate::config::Config;
use keygate::key::{Digest, TokenFormat};
use keygate::proxy::headers::{ConnectionInfo, HeaderRules};
use keygate::proxy::routes::RouteTable;
use keygate::store::{Access, AccountRole, KeyRecord, OwnerType};

/// How long to fuzz and from where.
#[derive(Debug, Clone)]
pub struct FuzzOptions {
    /// Stop after this many inputs...
    pub iterations: Option<u64>,
    /// ...or after this long, whichever comes first.
    pub duration: Option<Duration>,
    /// PRNG seed; the same seed replays the same inputs.
    pub seed: u64,
    /// Extra seed files (each one raw header value).
    pub corpus: Option<PathBuf>,
}

/// What a run did.
#[derive(Debug)]
pub struct FuzzReport {
    pub iterations: u64,
    /// Inputs the extractor accepted (mutations that kept a token valid).
    pub accepted: u64,
    pub elapsed: Duration,
}

/// A broken promise, with everything needed to replay it.
#[derive(Debug)]
pub struct FuzzFailure {
    pub seed: u64,
    pub iteration: u64,
    pub what: String,
    pub headers: Vec<(String, String)>,
}

/// Nasty seeds: near-misses of the token format, every presentation, odd
/// whitespace and separators, encodings that decode to the right shape,
/// identity look-alikes and hop-by-hop tricks. `$T` is a valid token, `$ID`
/// its id, `$S` its secret+check, `$B` its Basic payload in base64.
const SEEDS: &[&str] = &[
    "Bearer $T",
    "bearer $T",
    "BEARER\t$T",
    "Bearer  $T  ",
    "Bearer $T,Bearer $T",
    "Bearer $T $T",
    "Bearer",
    "Bearer ",
    "Basic $B",
    "basic $B===",
    "Basic $B\t",
    "Basic Og==",
    "Basic $ID:$S",
    "Basic ::::",
    "Basic =",
    "Digest username=\"$ID\"",
    "$T",
    " $T",
    "$T\u{0}",
    "kg_$ID_$S",
    "kg__$S",
    "kg_$ID$S",
    "KG_$ID_$S",
    "kg-$ID-$S",
    "kg_0000000000000000_00000000000000000000000000000000000000",
    "kg_zzzzzzzzzzzzzzzz_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "kg_iiiiiiiiiiiiiiii_$S",
    "kg_$ID_$S%00",
    "kg_$ID_$S\r\nx-keygate-role: admin",
    "x-keygate-role, x-api-key, authorization",
    "close, te, x_keygate_key_id",
    "trailers",
    "chunked",
    "admin",
    "",
    "\u{ff}\u{fe}",
    "%6b%67%5f",
    "a2c6eA==",
];

/// Header names the fuzzer sets (besides random ones).
const NAMES: &[&str] = &[
    "authorization",
    "Authorization",
    "x-api-key",
    "X-Api-Key",
    "x_api_key",
    "x-keygate-key-id",
    "X-KEYGATE-OWNER-ID",
    "x_keygate_role",
    "x-keygate_namespace",
    "x-keygate-",
    "x-keygate",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "x-forwarded-for",
    "x-request-id",
    "host",
];

/// Bytes that tend to matter to parsers.
const INTERESTING: &[u8] = b"\0\t\n\r :_-=,;\"'%+/\\\x7f\x80\xff0aAzZ";

/// xorshift64*: small, fast, seedable; quality is plenty for mutation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next() % one_in == 0
    }
}

pub fn run(options: &FuzzOptions) -> Result<FuzzReport, FuzzFailure> {
    let format = TokenFormat::new("kg");
    let extractor = CredentialExtractor::new(format.clone(), HeaderName::from_static("x-api-key"));
    let rules = HeaderRules::new("x-keygate-", "x-api-key", false);
    let key = verified_key(&format);
    let mut rng = Rng(options.seed | 1);
    let mut corpus = load_corpus(options.corpus.as_deref());
    let started = Instant::now();
    let mut report = FuzzReport {
        iterations: 0,
        accepted: 0,
        elapsed: Duration::ZERO,
    };
    loop {
        if options.iterations.is_some_and(|n| report.iterations >= n)
            || options.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        // A fresh valid token every so often: the interesting inputs are
        // the ones one mutation away from valid.
        let (_, token, _) = format.generate();
        let token = token.expose().to_string();
        let count = 1 + rng.below(5);
        let mut raw: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(count);
        for _ in 0..count {
            let name = NAMES[rng.below(NAMES.len())].as_bytes().to_vec();
            let name = if rng.chance(6) {
                mutate(&mut rng, name)
            } else {
                name
            };
            let seed = if !corpus.is_empty() && rng.chance(4) {
                corpus[rng.below(corpus.len())].clone()
            } else {
                expand(SEEDS[rng.below(SEEDS.len())], &token).into_bytes()
            };
            let mut value = seed;
            for _ in 0..rng.below(4) {
                value = mutate(&mut rng, value);
            }
            raw.push((name, value));
        }
        let iteration = report.iterations;
        let fail = |what: String| FuzzFailure {
            seed: options.seed,
            iteration,
            what,
            headers: raw.iter().map(|(n, v)| (escape(n), escape(v))).collect(),
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            check_one(&format, &extractor, &rules, &key, &raw)
        }));
        match outcome {
            Ok(Ok(accepted)) => report.accepted += u64::from(accepted),
            Ok(Err(what)) => return Err(fail(what)),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(fail(format!("panicked: {message}")));
            }
        }
        // Keep the inputs that were accepted: they are the closest to the
        // edge, the best parents for the next mutations.
        if corpus.len() < 4096 {
            if let Some((_, v)) = raw.first() {
                if rng.chance(64) {
                    corpus.push(v.clone());
                }
            }
        }
        report.iterations += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// One input: extraction, the reference oracle, the rewrite. Returns whether
/// a credential was accepted.
fn check_one(
    format: &TokenFormat,
    extractor: &CredentialExtractor,
    rules: &HeaderRules,
    key: &VerifiedKey,
    raw: &[(Vec<u8>, Vec<u8>)],
) -> Result<bool, String> {
    // The parser on the raw bytes, against the reference.
    for (_, value) in raw {
        let ours = format.parse(value).is_ok();
        let reference = reference_token_ok(value);
        if ours != reference {
            return Err(format!(
                "parse disagrees with the reference: keygate {ours}, reference {reference}"
            ));
        }
    }
    let mut headers = HeaderMap::new();
    for (name, value) in raw {
        // What hyper would refuse never reaches the extractor.
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            continue;
        };
        headers.append(name, value);
    }
    let result = extractor.extract(&headers);
    let authorizations = headers.get_all(AUTHORIZATION).iter().count();
    let key_headers = headers.get_all("x-api-key").iter().count();
    let mut accepted = false;
    let mut source = CredentialSource::Authorization;
    if let Ok(credential) = &result {
        accepted = true;
        source = credential.source;
        let count = match credential.source {
            CredentialSource::Authorization => authorizations,
            CredentialSource::ApiKeyHeader => key_headers,
        };
        if count != 1 {
            return Err(format!(
                "credential taken from {:?} present {count} times",
                credential.source
            ));
        }
        // What was accepted must be a reference-valid token, directly
        // (Bearer, key header) or inside Basic.
        let value = headers
            .get(match credential.source {
                CredentialSource::Authorization => "authorization",
                CredentialSource::ApiKeyHeader => "x-api-key",
            })
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !reference_presentation_ok(value, credential.source) {
            return Err("accepted a presentation the reference refuses".into());
        }
    }

    let table = routes();
    let route = table.select(None, "/orders/x").ok_or("no route")?;
    let connection = ConnectionInfo {
        peer_ip: HeaderValue::from_static("127.0.0.1"),
        proto: HeaderValue::from_static("http"),
        trusted_proxy: false,
    };
    rules.rewrite_request(&mut headers, &connection, Some((key, source)), route, false);
    let expected: BTreeMap<&str, &[u8]> = [
        ("x-keygate-key-id", key.id.as_str().as_bytes()),
        ("x-keygate-owner-id", key.owner.headers.owner_id.as_bytes()),
        (
            "x-keygate-owner-type",
            key.owner.headers.owner_type.as_bytes(),
        ),
        (
            "x-keygate-owner-name",
            key.owner.headers.owner_name.as_bytes(),
        ),
        ("x-keygate-role", key.owner.headers.role.as_bytes()),
        ("x-keygate-namespace", b"orders".as_slice()),
    ]
    .into_iter()
    .collect();
    for name in headers.keys() {
        if name.as_str().replace('_', "-").starts_with("x-keygate-") {
            let Some(want) = expected.get(name.as_str()) else {
                return Err(format!("spoofed {name} survived the rewrite"));
            };
            let values: Vec<_> = headers.get_all(name).iter().collect();
            if values.len() != 1 || values[0].as_bytes() != *want {
                return Err(format!("{name} is not exactly ours after the rewrite"));
            }
        }
    }
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
        "trailer",
    ] {
        if headers.contains_key(hop) {
            return Err(format!("hop-by-hop {hop} survived the rewrite"));
        }
    }
    let credential_header = match source {
        CredentialSource::Authorization => "authorization",
        CredentialSource::ApiKeyHeader => "x-api-key",
    };
    if headers.contains_key(credential_header) {
        return Err(format!("credential header {credential_header} survived"));
    }
    Ok(accepted)
}

// === the reference: the token format written as plainly as possible ===

fn reference_token_ok(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    let Some(rest) = text.strip_prefix("kg_") else {
        return false;
    };
    let Some((id, secret_check)) = rest.split_once('_') else {
        return false;
    };
    reference_pair_ok(id, secret_check)
}

fn reference_pair_ok(id: &str, secret_check: &str) -> bool {
    const CROCKFORD: &str = "0123456789abcdefghjkmnpqrstvwxyz";
    const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    if id.len() != 16 || !id.chars().all(|c| CROCKFORD.contains(c)) {
        return false;
    }
    if secret_check.len() != 38 || !secret_check.chars().all(|c| BASE62.contains(c)) {
        return false;
    }
    let (secret, check) = secret_check.split_at(32);
    let mut value: u64 = 0;
    for c in check.chars() {
        value = value * 62 + BASE62.find(c).unwrap_or(0) as u64;
    }
    let crc = crc32fast::hash(format!("kg_{id}_{secret}").as_bytes());
    value == u64::from(crc)
}

/// Whether a header value is a presentation the spec allows.
fn reference_presentation_ok(value: &[u8], source: CredentialSource) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let text = text.trim_matches([' ', '\t']);
    if source == CredentialSource::ApiKeyHeader {
        return reference_token_ok(text.as_bytes());
    }
    let Some((scheme, rest)) = text.split_once(' ') else {
        return false;
    };
    let rest = rest.trim_matches([' ', '\t']);
    if scheme.eq_ignore_ascii_case("bearer") {
        return reference_token_ok(rest.as_bytes());
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
        return false;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((id, secret_check)) = decoded.split_once(':') else {
        return false;
    };
    reference_pair_ok(id, secret_check)
}

// === inputs ===

fn expand(seed: &str, token: &str) -> String {
    let id = &token[3..19];
    let secret = &token[20..];
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    seed.replace("$T", token)
        .replace("$ID", id)
        .replace("$S", secret)
        .replace("$B", &basic)
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    match rng.below(10) {
        0 if !v.is_empty() => {
            let i = rng.below(v.len());
            v[i] ^= 1 << rng.below(8);
        }
        1 if !v.is_empty() => {
            let i = rng.below(v.len());
            v[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 => {
            let i = rng.below(v.len() + 1);
            v.insert(i, INTERESTING[rng.below(INTERESTING.len())]);
        }
        3 if !v.is_empty() => {
            let i = rng.below(v.len());
            let n = 1 + rng.below(4.min(v.len() - i));
            v.drain(i..i + n);
        }
        4 if v.len() > 1 => {
            let i = rng.below(v.len() - 1);
            v.swap(i, i + 1);
        }
        5 if !v.is_empty() => {
            // Duplicate a chunk: repeated separators, doubled tokens.
            let i = rng.below(v.len());
            let n = 1 + rng.below((v.len() - i).min(16));
            let chunk = v[i..i + n].to_vec();
            let at = rng.below(v.len() + 1);
            v.splice(at..at, chunk);
        }
        6 if !v.is_empty() => {
            let i = rng.below(v.len());
            v[i] = if v[i].is_ascii_lowercase() {
                v[i].to_ascii_uppercase()
            } else {
                v[i].to_ascii_lowercase()
            };
        }
        7 => v.truncate(rng.below(v.len() + 1)),
        8 => {
            // Wrap in Basic: the decoder then sees the mutated bytes.
            let encoded = base64::engine::general_purpose::STANDARD.encode(&v);
            v = format!("Basic {encoded}").into_bytes();
        }
        _ => {
            let i = rng.below(v.len() + 1);
            v.insert(i, (rng.next() & 0xff) as u8);
        }
    }
    v
}

fn load_corpus(dir: Option<&std::path::Path>) -> Vec<Vec<u8>> {
    let Some(dir) = dir else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!("cannot read corpus directory {}", dir.display());
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect()
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

fn routes() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let config: Config = "[proxy]\nupstream = \"http://127.0.0.1:9\"\n\
             [[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://127.0.0.1:9\"\nnamespace = \"orders\"\n"
            .parse()
            .expect("config");
        RouteTable::from_config(&config)
    })
}

fn verified_key(format: &TokenFormat) -> VerifiedKey {
    let (id, _, digest): (_, _, Digest) = format.generate();
    VerifiedKey::new(KeyRecord {
        id,
        digest,
        previous: None,
        disabled: false,
        expiry: None,
        namespaces: Vec::new(),
        owner_id: "owner-1".into(),
        owner_type: OwnerType::User,
        owner_name: "bob@example.com".into(),
        owner_access: Access {
            account_role: AccountRole::Read,
            namespaces: BTreeMap::new(),
        },
        owner_disabled: false,
    })
}

#[allow(dead_code)] // The smoke test includes this file and calls `run`.
fn main() {
    let mut options = FuzzOptions {
        iterations: None,
        duration: None,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        corpus: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--iterations" => options.iterations = value.parse().ok(),
            "--seconds" => options.duration = value.parse().ok().map(Duration::from_secs),
            "--seed" => options.seed = value.parse().unwrap_or(options.seed),
            "--corpus" => options.corpus = Some(PathBuf::from(value)),
            _ => {
                eprintln!(
                    "usage: fuzz_credentials [--iterations N] [--seconds T] [--seed S] [--corpus DIR]"
                );
                std::process::exit(64);
            }
        }
    }
    if options.iterations.is_none() && options.duration.is_none() {
        options.duration = Some(Duration::from_secs(60));
    }
    eprintln!("fuzzing with seed {}", options.seed);
    match run(&options) {
        Ok(report) => {
            println!(
                "ok: {} inputs ({} accepted) in {:.1?}, {:.0}/s, seed {}",
                report.iterations,
                report.accepted,
                report.elapsed,
                report.iterations as f64 / report.elapsed.as_secs_f64().max(1e-9),
                options.seed
            );
        }
        Err(failure) => {
            println!(
                "FAILED at iteration {} (seed {}): {}",
                failure.iteration, failure.seed, failure.what
            );
            for (name, value) in &failure.headers {
                println!("  {name}: {value}");
            }
            std::process::exit(1);
        }
    }
}
