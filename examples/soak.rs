//! Soak: keygate under sustained load while keys are created, disabled,
//! re-enabled and deleted through the admin API, with every single answer
//! checked against what the key's state was when the request was sent, and
//! keygate's memory sampled over time.
//!
//! ```sh
//! cargo build --release --bin keygate
//! cargo run --release --example soak -- --duration 10m            # the full soak
//! cargo run --release --example soak -- --duration 60s --connections 64
//! ```
//!
//! keygate runs as a process of its own (`keygate serve`, the binary next to
//! this example's directory, or `--keygate PATH`) with a fresh SQLite file,
//! in front of a small upstream in this process that answers with the key id
//! keygate injected. `--connections` workers send requests with random keys
//! (live, disabled, deleted, and some that never existed) while one task
//! churns keys. Running keygate apart is what lets its memory be measured
//! alone: the harness keeps a record of every key it made, which grows.
//!
//! A request is judged only when no change to its key overlapped it: every
//! change records when it started and when the admin API confirmed it, and a
//! request counts as "in flight during a change" if its [sent, answered]
//! window overlaps a change's [started, confirmed]. Otherwise a live key must
//! get 200 with its own id upstream, and a disabled, deleted or unknown key a
//! 401. The run fails (exit 1) on any wrongly accepted or wrongly refused
//! request, or any 5xx.
//!
//! Memory: every `--sample-every` (30 s) the soak reads keygate's VmRSS from
//! `/proc/<pid>/status` and scrapes `/metrics`, as Prometheus would, for the
//! cache's entries and the per-key series. What keygate keeps per key is
//! bounded by design: cache entries by the ids presented within the last
//! `ttl + stale_if_error` (keys) or `ttl + negative_ttl` (unknown ids), and
//! at most `[cache] capacity`; per-key series by `[metrics] max_key_series`.
//! Those fill during the first half of the run (the series cap is reached
//! after 10,000 keys; the cache is swept every `negative_ttl`, 2 s). The verdict,
//! [`flat`]: over the second half, keygate's *peak* RSS (VmHWM) may rise by
//! at most [`FLAT_BOUND_KIB`]. The peak, because RSS itself saws by tens of
//! MB (each scrape of 10,000 series allocates that much for a moment), and
//! the peak only keeps rising if something keeps growing. 4 MiB is less
//! than 100 bytes per key created in that half at the soak's usual rate
//! (over 100 keys a second), below what keeping any record per key costs
//! (a cache entry is about 300 bytes), so memory that follows the churn
//! fails it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// Growth of keygate's RSS allowed over the second half of a run for it to
/// count as flat (see the module docs).
pub const FLAT_BOUND_KIB: u64 = 4 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Concurrent request loops, each with its own connection.
    pub connections: usize,
    /// The `keygate` binary, run as `keygate serve`.
    pub keygate: PathBuf,
    /// How often keygate's memory is sampled and `/metrics` scraped.
    pub sample_every: Duration,
    /// TOML appended to keygate's config (after `[proxy]`, `[admin]`,
    /// `[store]` and `[usage]`), e.g. a `[cache]` table.
    pub extra_config: String,
    /// After the load stops, how long to wait for keygate's cache to drop
    /// every id that is no longer a live or disabled key (`None`: don't).
    pub settle: Option<Duration>,
}

/// keygate's memory at one moment of the run.
#[derive(Debug, Clone, Copy)]
pub struct MemorySample {
    /// Since the load started.
    pub at: Duration,
    /// VmRSS of the keygate process alone, just before the scrape.
    pub rss_kib: u64,
    /// VmHWM: the highest RSS keygate has had so far. A scrape of 10,000
    /// key series allocates tens of MB for a moment, so RSS saws up and
    /// down by that much; its peak only rises if something keeps growing.
    pub peak_kib: u64,
    /// `keygate_cache_entries`: ids cached, known and unknown.
    pub cache_entries: u64,
    /// Per-key `keygate_requests_total` series (key and route), `_other`
    /// not counted.
    pub key_series: u64,
    /// Keys the harness had created by then.
    pub creates: u64,
}

/// What happened.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub requests: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Requests whose window overlapped a change to their key: not judged.
    pub in_flight_during_change: u64,
    pub wrongly_accepted: u64,
    pub wrongly_refused: u64,
    /// 5xx, transport errors, or a 200 carrying another key's identity.
    pub errors: u64,
    pub creates: u64,
    pub disables: u64,
    pub enables: u64,
    pub deletes: u64,
    /// keygate's memory, from the start of the load to its end.
    pub memory: Vec<MemorySample>,
    /// With `settle`: the cache's entries once the load had stopped, and
    /// the keys that were not deleted (what the cache may still hold).
    pub settled: Option<(u64, u64)>,
    pub elapsed: Duration,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.wrongly_accepted == 0 && self.wrongly_refused == 0 && self.errors == 0
    }
}

/// The flatness verdict on a run's samples: how much keygate's peak RSS
/// rose (KiB) from the sample at half the run to the last one, and the keys
/// created in between; `None` with fewer than four samples (a run too short
/// to judge).
pub fn second_half_growth(memory: &[MemorySample]) -> Option<(i64, u64)> {
    if memory.len() < 4 {
        return None;
    }
    let end = memory.last()?;
    let half = end.at / 2;
    let middle = memory.iter().find(|s| s.at >= half)?;
    Some((
        end.peak_kib as i64 - middle.peak_kib as i64,
        end.creates - middle.creates,
    ))
}

/// Whether memory was flat: second-half growth of the peak within
/// [`FLAT_BOUND_KIB`].
pub fn flat(memory: &[MemorySample]) -> Option<bool> {
    second_half_growth(memory).map(|(growth, _)| growth <= FLAT_BOUND_KIB as i64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    Disabled,
    Deleted,
}

/// One change to a key: the state it leads to, when the admin call started,
/// and when it was confirmed (`None` while in flight).
#[derive(Debug, Clone, Copy)]
struct Change {
    to: State,
    started: Instant,
    confirmed: Option<Instant>,
}

struct Slot {
    id: String,
    token: String,
    /// Starts with the confirmed creation.
    changes: RwLock<Vec<Change>>,
}

/// What the answer to a request on `slot` sent at `sent` and answered at
/// `answered` must be: `None` when a change overlapped it.
fn expected(slot: &Slot, sent: Instant, answered: Instant) -> Option<State> {
    let changes = slot.changes.read().expect("lock");
    let mut state = None;
    for change in changes.iter() {
        match change.confirmed {
            None if change.started <= answered => return None,
            None => {}
            Some(done) if change.started <= answered && done >= sent => return None,
            Some(done) if done < sent => state = Some(change.to),
            Some(_) => {}
        }
    }
    state
}

/// A field (`VmRSS`, `VmHWM`) of process `pid`'s `/proc` status, in KiB
/// (0 where there is none).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The keygate process, killed when dropped (also when the soak panics).
struct Keygate(Child);

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `keygate_cache_entries` and the number of per-key request series, from
/// one scrape of `/metrics`.
async fn scrape(client: &reqwest::Client, admin: SocketAddr) -> (u64, u64) {
    let Ok(text) = async {
        client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await?
            .text()
            .await
    }
    .await
    else {
        return (0, 0);
    };
    let entries = text
        .lines()
        .find_map(|l| l.strip_prefix("keygate_cache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // One line per status class: count one class.
    let series = text
        .lines()
        .filter(|l| {
            l.starts_with("keygate_requests_total{key_id=\"")
                && !l.starts_with("keygate_requests_total{key_id=\"_other\"")
                && l.contains("status_class=\"2xx\"")
        })
        .count() as u64;
    (entries, series)
}

/// An upstream that answers 200 with the `x-keygate-key-id` it received.
async fn upstream() -> SocketAddr {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let id = req
                            .headers()
                            .get("x-keygate-key-id")
                            .map(|v| bytes::Bytes::copy_from_slice(v.as_bytes()))
                            .unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(id)))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

pub async fn run(options: &SoakOptions) -> SoakReport {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("soak.db");
    let upstream = upstream().await;
    let url = format!("sqlite://{}", db.display());
    let out = Command::new(&options.keygate)
        .args(["bootstrap", "--email", "soak@example.com", "--store", &url])
        .args(["--duration", "24h"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", options.keygate.display()));
    assert!(
        out.status.success(),
        "keygate bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin_token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let (proxy, admin): (SocketAddr, SocketAddr) = (
        ([127, 0, 0, 1], free_port()).into(),
        ([127, 0, 0, 1], free_port()).into(),
    );
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"{proxy}\"\nupstream = \"http://{upstream}\"\n\
             [admin]\nlisten = \"{admin}\"\n[store]\nurl = \"{url}\"\n\
             [usage]\nflush_interval = \"1s\"\n{}\n",
            options.extra_config
        ),
    )
    .expect("config");
    // Its logs (an access log line per request) are not wanted here.
    let keygate = Keygate(
        Command::new(&options.keygate)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("keygate serve"),
    );
    let pid = keygate.0.id();
    let admin_client = reqwest::Client::new();
    let api = format!("http://{admin}/api/v1");
    let ready = Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("http://{admin}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < ready, "keygate did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settings: serde_json::Value = admin_client
        .get(format!("{api}/account/settings"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .expect("settings")
        .json()
        .await
        .expect("settings json");
    let r = admin_client
        .post(format!("{api}/account/settings/update"))
        .bearer_auth(&admin_token)
        .json(&serde_json::json!({
            "resourceVersion": settings["resourceVersion"],
            "spec": {"maxKeysPerOwner": 10000}
        }))
        .send()
        .await
        .expect("settings update");
    assert!(r.status().is_success(), "settings update: {}", r.status());

    let slots: Arc<RwLock<Vec<Arc<Slot>>>> = Arc::default();
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + options.duration;

    // The churn: keeps ~30 keys around, changing one at a time.
    let churn = {
        let (slots, counters, api, token) = (
            slots.clone(),
            counters.clone(),
            api.clone(),
            admin_token.clone(),
        );
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut rng = Rng(0x5eed);
            while Instant::now() < deadline {
                let candidates: Vec<Arc<Slot>> = slots
                    .read()
                    .expect("lock")
                    .iter()
                    .filter(|s| current(s) != State::Deleted)
                    .cloned()
                    .collect();
                if candidates.len() < 30 || rng.below(4) == 0 {
                    if let Some(slot) = create(&client, &api, &token).await {
                        slots.write().expect("lock").push(Arc::new(slot));
                        counters.creates.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                let slot = &candidates[rng.below(candidates.len())];
                let (to, path, method) = match (current(slot), rng.below(3)) {
                    (_, 0) => (State::Deleted, String::new(), reqwest::Method::DELETE),
                    (State::Live, _) => (
                        State::Disabled,
                        "/disable".to_string(),
                        reqwest::Method::POST,
                    ),
                    _ => (State::Live, "/enable".to_string(), reqwest::Method::POST),
                };
                let index = {
                    let mut changes = slot.changes.write().expect("lock");
                    changes.push(Change {
                        to,
                        started: Instant::now(),
                        confirmed: None,
                    });
                    changes.len() - 1
                };
                let r = client
                    .request(method, format!("{api}/api-keys/{}{path}", slot.id))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let ok = r.as_ref().is_ok_and(|r| r.status().is_success());
                let mut changes = slot.changes.write().expect("lock");
                if ok {
                    changes[index].confirmed = Some(Instant::now());
                    let counter = match to {
                        State::Deleted => &counters.deletes,
                        State::Disabled => &counters.disables,
                        State::Live => &counters.enables,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Unconfirmed: leave it "in flight" forever, so requests
                    // on this key after it are not judged.
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("admin change failed: {:?}", r.map(|r| r.status()));
                }
            }
        })
    };

    // Warm up: the first keys.
    while slots.read().expect("lock").len() < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let sample = |client: reqwest::Client, counters: Arc<Counters>| async move {
        let rss_kib = status_kib(pid, "VmRSS");
        let (cache_entries, key_series) = scrape(&client, admin).await;
        MemorySample {
            at: started.elapsed(),
            rss_kib,
            peak_kib: status_kib(pid, "VmHWM"),
            cache_entries,
            key_series,
            creates: counters.creates.load(Ordering::Relaxed),
        }
    };
    let mut memory = vec![sample(admin_client.clone(), counters.clone()).await];

    let mut workers = Vec::new();
    for worker in 0..options.connections {
        let (slots, counters) = (slots.clone(), counters.clone());
        workers.push(tokio::spawn(async move {
            // One connection per worker (pool of one, kept alive).
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .expect("client");
            let mut rng = Rng(0xabcd + worker as u64);
            let never_existed = keygate::key::TokenFormat::new("kg").generate().1;
            while Instant::now() < deadline {
                let slot = {
                    let all = slots.read().expect("lock");
                    if all.is_empty() || rng.below(20) == 0 {
                        None
                    } else if rng.below(4) == 0 {
                        // Any key ever made: mostly deleted ones by now.
                        Some(all[rng.below(all.len())].clone())
                    } else {
                        // The recent ones: mostly live or disabled.
                        let recent = all.len().min(60);
                        Some(all[all.len() - 1 - rng.below(recent)].clone())
                    }
                };
                let token = slot
                    .as_ref()
                    .map_or(never_existed.expose(), |s| s.token.as_str());
                let sent = Instant::now();
                let response = client
                    .get(format!("http://{proxy}/soak"))
                    .bearer_auth(token)
                    .send()
                    .await;
                let (status, body) = match response {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        (status, r.text().await.unwrap_or_default())
                    }
                    Err(_) => (0, String::new()),
                };
                let answered = Instant::now();
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if status == 200 {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                } else if status == 401 {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("unexpected status {status}");
                    continue;
                }
                let want = match &slot {
                    None => Some(State::Deleted),
                    Some(slot) => expected(slot, sent, answered),
                };
                match (want, status) {
                    (None, _) => {
                        counters.in_flight.fetch_add(1, Ordering::Relaxed);
                    }
                    (Some(State::Live), 200) => {
                        if Some(body.as_str()) != slot.as_ref().map(|s| s.id.as_str()) {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("200 with the wrong identity");
                        }
                    }
                    (Some(State::Live), _) => {
                        counters.wrongly_refused.fetch_add(1, Ordering::Relaxed);
                        eprintln!("wrongly refused: {status}");
                    }
                    (Some(_), 200) => {
                        counters.wrongly_accepted.fetch_add(1, Ordering::Relaxed);
                        eprintln!("wrongly accepted");
                    }
                    (Some(_), _) => {}
                }
            }
        }));
    }
    // Memory over time, printed as it comes so a long soak shows progress.
    print_sample(&memory[0]);
    let mut next = Instant::now() + options.sample_every;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next {
            let s = sample(admin_client.clone(), counters.clone()).await;
            print_sample(&s);
            memory.push(s);
            next += options.sample_every;
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let _ = churn.await;
    let elapsed = started.elapsed();
    let last = sample(admin_client.clone(), counters.clone()).await;
    print_sample(&last);
    memory.push(last);
    let c = &counters;
    let settled = match options.settle {
        None => None,
        Some(wait) => {
            // Only keys never deleted may stay cached (and the admin's own).
            let kept = c.creates.load(Ordering::Relaxed) - c.deletes.load(Ordering::Relaxed) + 1;
            let until = Instant::now() + wait;
            loop {
                let (entries, _) = scrape(&admin_client, admin).await;
                if entries <= kept || Instant::now() >= until {
                    break Some((entries, kept));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    drop(keygate);
    SoakReport {
        requests: c.requests.load(Ordering::Relaxed),
        accepted: c.accepted.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        in_flight_during_change: c.in_flight.load(Ordering::Relaxed),
        wrongly_accepted: c.wrongly_accepted.load(Ordering::Relaxed),
        wrongly_refused: c.wrongly_refused.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        creates: c.creates.load(Ordering::Relaxed),
        disables: c.disables.load(Ordering::Relaxed),
        enables: c.enables.load(Ordering::Relaxed),
        deletes: c.deletes.load(Ordering::Relaxed),
        memory,
        settled,
        elapsed,
    }
}

fn print_sample(s: &MemorySample) {
    eprintln!(
        "{:>5.0}s  keygate rss {} KiB  peak {} KiB  cache entries {}  key series {}  keys created {}",
        s.at.as_secs_f64(),
        s.rss_kib,
        s.peak_kib,
        s.cache_entries,
        s.key_series,
        s.creates
    );
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    in_flight: AtomicU64,
    wrongly_accepted: AtomicU64,
    wrongly_refused: AtomicU64,
    errors: AtomicU64,
    creates: AtomicU64,
    disables: AtomicU64,
    enables: AtomicU64,
    deletes: AtomicU64,
}

fn current(slot: &Slot) -> State {
    slot.changes
        .read()
        .expect("lock")
        .iter()
        .rev()
        .find(|c| c.confirmed.is_some())
        .map_or(State::Live, |c| c.to)
}

async fn create(client: &reqwest::Client, api: &str, token: &str) -> Option<Slot> {
    let expiry = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(86_400))
        .to_string();
    let r = client
        .post(format!("{api}/api-keys"))
        .bearer_auth(token)
        .json(&serde_json::json!({"spec": {"displayName": "soak", "expiryTime": expiry}}))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        eprintln!("create failed: {}", r.status());
        return None;
    }
    let confirmed = Instant::now();
    let body: serde_json::Value = r.json().await.ok()?;
    Some(Slot {
        id: body["apiKey"]["id"].as_str()?.to_string(),
        token: body["token"].as_str()?.to_string(),
        changes: RwLock::new(vec![Change {
            to: State::Live,
            started: confirmed,
            confirmed: Some(confirmed),
        }]),
    })
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

pub fn print(report: &SoakReport) {
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "soak: {:.0} s, {} requests ({:.0}/s): {} accepted, {} refused, {} in flight during a change (not judged)",
        secs,
        report.requests,
        report.requests as f64 / secs,
        report.accepted,
        report.refused,
        report.in_flight_during_change
    );
    println!(
        "      wrongly accepted {}, wrongly refused {}, errors {}",
        report.wrongly_accepted, report.wrongly_refused, report.errors
    );
    println!(
        "      admin: {} creates, {} disables, {} enables, {} deletes",
        report.creates, report.disables, report.enables, report.deletes
    );
    if let (Some(first), Some(last)) = (report.memory.first(), report.memory.last()) {
        println!(
            "      keygate RSS {} KiB at start, {} KiB at end (peak {} KiB); cache entries {} -> {}, key series {} -> {}",
            first.rss_kib,
            last.rss_kib,
            last.peak_kib,
            first.cache_entries,
            last.cache_entries,
            first.key_series,
            last.key_series
        );
    }
    match second_half_growth(&report.memory) {
        Some((growth, creates)) => println!(
            "      second half: peak RSS {growth:+} KiB over {creates} keys created -> {}",
            if growth <= FLAT_BOUND_KIB as i64 {
                format!("flat (<= {FLAT_BOUND_KIB} KiB)")
            } else {
                format!("NOT FLAT (> {FLAT_BOUND_KIB} KiB)")
            }
        ),
        None => println!("      too few memory samples to judge flatness"),
    }
    if let Some((entries, kept)) = report.settled {
        println!("      after the load: {entries} cache entries, {kept} keys not deleted");
    }
    let verdict = report.passed() && flat(&report.memory) != Some(false);
    println!("      {}", if verdict { "PASS" } else { "FAIL" });
}

#[allow(dead_code)] // tests/soak.rs includes this file and calls `run`.
fn main() {
    // target/<profile>/examples/soak -> target/<profile>/keygate
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("keygate")))
        .unwrap_or_else(|| PathBuf::from("keygate"));
    let mut options = SoakOptions {
        duration: Duration::from_secs(600),
        connections: 32,
        keygate: beside,
        sample_every: Duration::from_secs(30),
        extra_config: String::new(),
        settle: None,
    };
    let usage = || -> ! {
        eprintln!(
            "usage: soak [--duration 10m] [--connections 32] [--sample-every 30s] [--keygate PATH]"
        );
        std::process::exit(64)
    };
    let duration = |value: &str| {
        humantime::parse_duration(value).unwrap_or_else(|e| {
            eprintln!("{value}: {e}");
            std::process::exit(64)
        })
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--duration" => options.duration = duration(&value),
            "--sample-every" => options.sample_every = duration(&value),
            "--connections" => options.connections = value.parse().unwrap_or_else(|_| usage()),
            "--keygate" => options.keygate = PathBuf::from(value),
            _ => usage(),
        }
    }
    if !options.keygate.exists() {
        eprintln!(
            "no keygate binary at {}: build it first (cargo build --release --bin keygate) or pass --keygate PATH",
            options.keygate.display()
        );
        std::process::exit(64);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(run(&options));
    print(&report);
    if !report.passed() || flat(&report.memory) == Some(false) {
        std::process::exit(1);
    }
}
