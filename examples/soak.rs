//! Soak: keygate under sustained load while keys are created, disabled,
//! re-enabled and deleted through the admin API, with every single answer
//! checked against what the key's state was when the request was sent.
//!
//! ```sh
//! cargo run --release --example soak -- --duration 10m            # the full soak
//! cargo run --release --example soak -- --duration 60s --connections 64
//! ```
//!
//! keygate runs in this process on 127.0.0.1:0 with a fresh SQLite file, in
//! front of a small upstream that answers with the key id keygate injected.
//! `--connections` workers send requests with random keys (live, disabled,
//! deleted, and some that never existed) while one task churns keys.
//!
//! A request is judged only when no change to its key overlapped it: every
//! change records when it started and when the admin API confirmed it, and a
//! request counts as "in flight during a change" if its [sent, answered]
//! window overlaps a change's [started, confirmed]. Otherwise a live key must
//! get 200 with its own id upstream, and a disabled, deleted or unknown key a
//! 401. The run fails (exit 1) on any wrongly accepted or wrongly refused
//! request, or any 5xx. RSS is reported at start (after warm-up) and end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Concurrent request loops, each with its own connection.
    pub connections: usize,
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
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub elapsed: Duration,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.wrongly_accepted == 0 && self.wrongly_refused == 0 && self.errors == 0
    }
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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
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
    let store = keygate::store::open(&url).await.expect("store");
    let format = keygate::key::TokenFormat::new("kg");
    let (_, _, admin_token) = keygate::admin::bootstrap::bootstrap(
        &*store,
        &format,
        "soak@example.com",
        Some(Duration::from_secs(24 * 3600)),
    )
    .await
    .expect("bootstrap");
    let admin_token = admin_token.expose().to_string();
    drop(store);
    let config: keygate::config::Config = format!(
        "[proxy]\nupstream = \"http://{upstream}\"\n[store]\nurl = \"{url}\"\n[usage]\nflush_interval = \"1s\"\n"
    )
    .parse()
    .expect("config");
    let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy = proxy_listener.local_addr().expect("addr");
    let admin = admin_listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keygate::app::run(
        config,
        proxy_listener,
        admin_listener,
        async {
            let _ = stop_rx.await;
        },
    ));
    let admin_client = reqwest::Client::new();
    let api = format!("http://{admin}/api/v1");
    for _ in 0..200 {
        if reqwest::get(format!("http://{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
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

    // Warm up, then the starting RSS.
    while slots.read().expect("lock").len() < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let rss_start = rss_kib();

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
    // Progress, so a long soak shows memory over time.
    let mut next = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() >= next {
            eprintln!(
                "{:>5.0}s  requests {}  rss {} KiB",
                started.elapsed().as_secs_f64(),
                counters.requests.load(Ordering::Relaxed),
                rss_kib()
            );
            next += Duration::from_secs(30);
        }
    }
    for w in workers {
        let _ = w.await;
    }
    let _ = churn.await;
    let elapsed = started.elapsed();
    let rss_end = rss_kib();
    let _ = stop_tx.send(());
    let _ = server.await;
    let c = &counters;
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
        rss_start_kib: rss_start,
        rss_end_kib: rss_end,
        elapsed,
    }
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
    println!(
        "      RSS {} KiB at start, {} KiB at end ({:+} KiB)",
        report.rss_start_kib,
        report.rss_end_kib,
        report.rss_end_kib as i64 - report.rss_start_kib as i64
    );
    println!("      {}", if report.passed() { "PASS" } else { "FAIL" });
}

#[allow(dead_code)] // tests/soak.rs includes this file and calls `run`.
fn main() {
    let mut options = SoakOptions {
        duration: Duration::from_secs(600),
        connections: 32,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--duration" => {
                options.duration = humantime::parse_duration(&value).unwrap_or_else(|e| {
                    eprintln!("--duration {value}: {e}");
                    std::process::exit(64)
                })
            }
            "--connections" => options.connections = value.parse().unwrap_or(32),
            _ => {
                eprintln!("usage: soak [--duration 10m] [--connections 32]");
                std::process::exit(64);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(run(&options));
    print(&report);
    if !report.passed() {
        std::process::exit(1);
    }
}
