//! Two real `keygate serve` processes on one PostgreSQL database: a key
//! disabled or deleted through replica A's admin API is refused by replica B
//! within a second (LISTEN/NOTIFY), measured over repeated changes.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::postgres::PgDatabase;
use support::{run_cli, RecordingUpstream};

const KEYGATE: &str = env!("CARGO_BIN_EXE_keygate");

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a config for one replica and starts it; returns (process, proxy, admin).
async fn replica(
    dir: &std::path::Path,
    name: &str,
    db: &str,
    upstream: std::net::SocketAddr,
) -> (Process, u16, u16) {
    let (proxy, admin) = (free_port(), free_port());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{upstream}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[store]\nurl = \"{db}\"\n\
             [cache]\nttl = \"1h\"\npoll_interval = \"30s\"\n"
        ),
    )
    .unwrap();
    let child = Command::new(KEYGATE)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return (process, proxy, admin);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("replica {name} did not become ready");
}

#[tokio::test]
async fn two_processes_share_revocations_within_a_second() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin_token = run_cli([
        "bootstrap",
        "--email",
        "ops@example.com",
        "--store",
        &db.url,
    ]);
    let (_a, _a_proxy, a_admin) = replica(dir.path(), "a", &db.url, upstream.addr).await;
    let (_b, b_proxy, _b_admin) = replica(dir.path(), "b", &db.url, upstream.addr).await;
    let client = reqwest::Client::new();
    let expiry =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();

    let mut delays = Vec::new();
    for round in 0..8 {
        // A new key through A; B learns it on first use.
        let created: serde_json::Value = client
            .post(format!("http://127.0.0.1:{a_admin}/api/v1/api-keys"))
            .bearer_auth(&admin_token)
            .json(&serde_json::json!({ "spec": { "displayName": format!("r{round}"), "expiryTime": expiry } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = created["token"].as_str().expect("token").to_string();
        let id = created["apiKey"]["id"].as_str().expect("id").to_string();
        let at_b = || {
            client
                .get(format!("http://127.0.0.1:{b_proxy}/"))
                .bearer_auth(&token)
                .send()
        };
        assert_eq!(
            at_b().await.unwrap().status(),
            200,
            "B accepts and caches the key"
        );

        // Disable (even rounds) or delete (odd rounds) through A.
        let change = if round % 2 == 0 {
            client.post(format!(
                "http://127.0.0.1:{a_admin}/api/v1/api-keys/{id}/disable"
            ))
        } else {
            client.delete(format!("http://127.0.0.1:{a_admin}/api/v1/api-keys/{id}"))
        };
        let r = change.bearer_auth(&admin_token).send().await.unwrap();
        assert!(r.status().is_success(), "change through A: {}", r.status());
        let since = Instant::now();
        loop {
            let status = at_b().await.unwrap().status();
            if status == 401 {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "B kept accepting a revoked key"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        delays.push(since.elapsed());
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let worst = delays[delays.len() - 1];
    eprintln!(
        "two processes: revocation seen by B after p50 {p50:?}, max {worst:?} ({} changes)",
        delays.len()
    );
    assert!(
        worst < Duration::from_secs(1),
        "a revocation took {worst:?} to reach B"
    );
}
