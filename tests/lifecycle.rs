//! The real binary as an operator runs it: bootstrap, serve, SIGHUP reload,
//! SIGTERM drain, and configuration errors with exit code 64.

mod support;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{run_cli, RecordingUpstream};

const KEYGATE: &str = env!("CARGO_BIN_EXE_keygate");

struct Server {
    child: Child,
    proxy: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(
    dir: &std::path::Path,
    upstream: std::net::SocketAddr,
    extra: &str,
) -> (std::path::PathBuf, u16, u16) {
    let (proxy, admin) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"http://{upstream}\"\ndrain_timeout = \"10s\"\n{extra}\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n[store]\nurl = \"sqlite://{}/keygate.db\"\n",
        dir.display()
    );
    let path = dir.join("keygate.toml");
    std::fs::write(&path, text).unwrap();
    (path, proxy, admin)
}

fn bootstrap(config: &std::path::Path) -> String {
    let config = config.as_os_str();
    run_cli([
        "bootstrap".as_ref(),
        "--email".as_ref(),
        "ops@example.com".as_ref(),
        "--config".as_ref(),
        config,
    ])
}

async fn serve(config: &std::path::Path, proxy: u16, admin: u16) -> Server {
    let child = spawn_keygate(config, None);
    wait_ready(admin).await;
    Server { child, proxy }
}

/// `keygate serve` with its stderr piped; `[log] level` decides what is
/// logged unless `rust_log` is given (a reload may change the level).
fn spawn_keygate(config: &std::path::Path, rust_log: Option<&str>) -> Child {
    let mut command = Command::new(KEYGATE);
    command
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    command.spawn().unwrap()
}

/// `keygate serve` that is expected to stop by itself (a refused start):
/// its exit code and what it logged. One that is still serving after 30 s
/// (a config it should have refused) is killed and the test fails.
fn serve_to_exit(config: &std::path::Path, rust_log: Option<&str>) -> (Option<i32>, String) {
    let child = spawn_keygate(config, rust_log);
    let pid = child.id().to_string();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output().unwrap()));
    let Ok(out) = exited.recv_timeout(Duration::from_secs(30)) else {
        let _ = Command::new("kill").args(["-9", &pid]).status();
        panic!("keygate serve --config {config:?} did not exit within 30 s");
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), stderr)
}

async fn wait_ready(admin: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("keygate did not become ready");
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args(["-s", name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;

    // A request the upstream answers after 5 s is in flight at SIGTERM.
    let slow = slow_request_in_flight(server.proxy, &key, &upstream).await;
    signal(&server.child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once draining.
    let refused = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/", server.proxy))
        .bearer_auth(&key)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(refused.is_err(), "accepted a new connection while draining");
    let response = slow.await.unwrap().expect("in-flight request completed");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "slow");
    let (status, _) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}

/// A request for `/slow` (the upstream answers it after 5 s) through the
/// proxy at `proxy`, once the upstream has it.
async fn slow_request_in_flight(
    proxy: u16,
    key: &str,
    upstream: &RecordingUpstream,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    let slow = tokio::spawn(
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{proxy}/slow"))
            .bearer_auth(key)
            .timeout(Duration::from_secs(20))
            .send(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow
}

/// During the drain the admin listener keeps answering: `/healthz` 200
/// (a liveness probe that failed would get the pod killed mid-drain),
/// `/readyz` 503 "not ready: draining" (so load balancers stop sending),
/// `/metrics` scraped; it closes once the proxy has drained. Before, it
/// stopped at SIGTERM with the proxy's accept loop.
#[tokio::test]
async fn the_admin_api_answers_until_the_proxy_has_drained() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    // The upstream answers /slow after 5 s; drain_timeout is 10 s.
    let slow = slow_request_in_flight(proxy, &key, &upstream).await;
    signal(&server.child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let get = |path: &str| {
        let url = format!("http://127.0.0.1:{admin}{path}");
        async move {
            // A new connection each time: the listener must still accept.
            let response = reqwest::Client::new()
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .expect("the admin listener answers during the drain");
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let mut checks = 0;
    while !slow.is_finished() {
        assert_eq!(get("/healthz").await, (200, "ok\n".to_owned()));
        assert_eq!(
            get("/readyz").await,
            (503, "not ready: draining\n".to_owned())
        );
        let (status, metrics) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(metrics.contains("keygate_requests_total"), "{metrics}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(checks >= 5, "only {checks} checks during the drain");
    let response = slow
        .await
        .unwrap()
        .expect("the in-flight request completed");
    assert_eq!(response.status(), 200);
    let (status, _) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_err(),
        "the admin listener is closed"
    );
    // The usage flusher ran through the drain too: the request that ended
    // in it is counted (its count had been lost, the final flush made at
    // SIGTERM).
    let store = keygate::store::open(&format!("sqlite://{}/keygate.db", dir.path().display()))
        .await
        .unwrap();
    let used = store.get_key(&key_id(&key)).await.unwrap().unwrap();
    assert_eq!(used.request_count, 1);
    store.close().await;
}

/// A response that was in flight at SIGTERM says `Connection: close`, and
/// the connection takes no further request. The relay (the default for
/// plain HTTP/1.1) read the drain once, when the request arrived: the
/// response said nothing, the client took the connection as reusable and
/// its next request met a closed connection (or, sent at once, was served
/// during the drain). hyper's path said `close`.
#[tokio::test]
async fn a_response_in_flight_at_sigterm_closes_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy))
        .await
        .unwrap();
    let request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: a\r\nx-api-key: {key}\r\n\r\n");
    conn.write_all(request("/slow").as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&server.child, "TERM");
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).ends_with("slow") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("the in-flight response")
            .unwrap();
        assert!(n > 0, "closed before the response: {seen:?}");
        seen.extend_from_slice(&chunk[..n]);
    }
    let response = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{response}");
    assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
    // The client's next request on it is not served.
    let _ = conn.write_all(request("/again").as_bytes()).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk)).await;
    assert!(
        matches!(rest, Ok(Ok(0)) | Ok(Err(_))),
        "the connection served on: {rest:?}"
    );
    assert_eq!(
        upstream.count(),
        1,
        "a request reached the upstream while draining"
    );
    let (status, _) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}

/// A client that leaves before the response head still gets its access
/// line (status 499, as nginx logs a client that closed its request), with
/// the key that was verified. On hyper's path (here HTTP/1 without the
/// relay) the request's future was dropped with the connection and nothing
/// was logged: a request that reached the upstream left no trace.
#[tokio::test]
async fn a_request_whose_client_left_is_logged() {
    use tokio::io::AsyncWriteExt;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "http1_relay = false");
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy))
        .await
        .unwrap();
    let request = format!(
        "GET /slow HTTP/1.1\r\nhost: a\r\nx-api-key: {key}\r\nx-request-id: client-left\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.count() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&server.child, "TERM");
    let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    let line = logs
        .lines()
        .find(|l| l.contains("keygate::access") && l.contains("client-left"))
        .unwrap_or_else(|| panic!("no access line for the request: {logs}"));
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("path=\"/slow\""), "{line}");
    assert!(
        line.contains(&format!("key_id=\"{}\"", &key[3..19])),
        "{line}"
    );
    assert!(!line.contains(&key), "{line}");
}

/// The status of `GET /` through the proxy with `key`.
async fn root_status(proxy: u16, key: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{proxy}/"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
}

/// Waits (8 s at most) until a reloaded config that points at a dead
/// upstream is in force: `GET /` answers 502 instead of 200.
async fn until_the_dead_upstream_answers(proxy: u16, key: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(8);
    while root_status(proxy, key).await == 200 {
        assert!(Instant::now() < deadline, "{what} was never loaded");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(root_status(proxy, key).await, 502);
}

/// A config file swapped for another by its symlink (NixOS points
/// /etc at a new store path, whose files all have mtime 1; a ConfigMap's
/// `..data` swap) is a change even when both files have the same mtime:
/// only the mtime was compared, so the swap was never noticed.
#[tokio::test]
async fn a_symlink_swap_to_a_file_of_the_same_mtime_is_reloaded() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (written, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&written);
    let text = std::fs::read_to_string(&written).unwrap();
    let dead = support::dead_address().await;
    let (old, new) = (dir.path().join("old.toml"), dir.path().join("new.toml"));
    std::fs::write(&old, &text).unwrap();
    std::fs::write(
        &new,
        text.replace(&upstream.addr.to_string(), &dead.to_string()),
    )
    .unwrap();
    let nix_epoch = std::time::UNIX_EPOCH + Duration::from_secs(1);
    for file in [&old, &new] {
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(nix_epoch)
            .unwrap();
    }
    let link = dir.path().join("keygate-link.toml");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    let server = serve(&link, proxy, admin).await;
    assert_eq!(root_status(server.proxy, &key).await, 200);
    let swapping = dir.path().join("swapping");
    std::os::unix::fs::symlink(&new, &swapping).unwrap();
    std::fs::rename(&swapping, &link).unwrap();
    until_the_dead_upstream_answers(server.proxy, &key, "the swapped config").await;
}

/// An edit made while a reload runs is loaded after it. The reload
/// stamped the files again once it had swapped its config in, so an edit
/// made after the file was read but before that (while the proxy state was
/// built: the CA bundle, or the system's roots, read on every reload) was
/// taken as loaded, and never was. The CA bundle here is a FIFO, so the
/// test holds the reload at that point.
#[tokio::test]
async fn an_edit_made_during_a_reload_is_loaded_after_it() {
    use std::io::Write;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pem = std::fs::read(support::make_cert(dir.path(), "ca").cert_path).unwrap();
    let fifo = dir.path().join("ca-fifo.pem");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let (config, proxy, admin) = write_config(
        dir.path(),
        upstream.addr,
        &format!("upstream_ca_file = \"{}\"", fifo.display()),
    );
    let key = bootstrap(&config);
    // Each read of the bundle waits for a writer; opening it for writing
    // waits for keygate to read.
    let feed = |pem: Vec<u8>, fifo: std::path::PathBuf| {
        std::thread::spawn(move || std::fs::write(fifo, pem).unwrap())
    };
    let start = feed(pem.clone(), fifo.clone());
    let server = serve(&config, proxy, admin).await;
    start.join().unwrap();
    assert_eq!(root_status(server.proxy, &key).await, 200);

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}# edit 1\n")).unwrap();
    // The reload of edit 1 has read the file and waits on the bundle.
    let mut held = std::fs::File::options().write(true).open(&fifo).unwrap();
    let dead = support::dead_address().await;
    std::fs::write(
        &config,
        text.replace(&upstream.addr.to_string(), &dead.to_string()),
    )
    .unwrap();
    held.write_all(&pem).unwrap();
    drop(held);
    // A writer that opened before keygate saw the end of this one would
    // feed the same read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _next = feed(pem, fifo);
    until_the_dead_upstream_answers(server.proxy, &key, "edit 2").await;
}

/// A second stop signal during the drain stops keygate at once (exit 1),
/// not after the in-flight request or `drain_timeout`.
#[tokio::test]
async fn a_second_stop_signal_ends_the_drain_at_once() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    // The upstream answers /slow after 5 s; drain_timeout is 10 s.
    let slow = slow_request_in_flight(server.proxy, &key, &upstream).await;
    signal(&server.child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Instant::now();
    signal(&server.child, "INT");
    let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(3));
    assert!(second.elapsed() < Duration::from_secs(2), "{logs}");
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("second stop signal"), "{logs}");
    assert!(
        slow.await.unwrap().is_err(),
        "the cut request did not complete"
    );
}

/// The store's write-ahead log beside `keygate.db`: gone, or empty, once
/// everything in it has been checkpointed into the file.
fn assert_log_checkpointed(dir: &std::path::Path, after: &str) {
    let wal = dir.join("keygate.db-wal");
    let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(len, 0, "{after} left {len} bytes in {}", wal.display());
}

fn key_id(token: &str) -> keygate::key::KeyId {
    let tokens = keygate::key::TokenFormat::new("kg").accepting_imported(true);
    tokens.parse(token.as_bytes()).unwrap().id
}

/// A stopped keygate leaves its SQLite store in `keygate.db` alone, so a
/// copy of that file (the usual backup) is the whole store, and the next
/// start does not inherit a log: the bootstrap, a local CLI command run
/// beside the server, and the server's own shutdown each checkpoint it.
#[tokio::test]
async fn a_stopped_keygate_leaves_its_store_in_one_file() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let first = bootstrap(&config);
    assert_log_checkpointed(dir.path(), "bootstrap");
    let imported = "kg_a1b2c3d4e5f6_Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe";
    let tsv = dir.path().join("keys.tsv");
    std::fs::write(&tsv, format!("{imported}\tmigrated\n")).unwrap();
    let (tsv, config_arg) = (tsv.to_str().unwrap(), config.to_str().unwrap());
    run_cli([
        "apikey",
        "import",
        "--owner-email",
        "ops@example.com",
        "--tsv",
        tsv,
        "--config",
        config_arg,
    ]);
    assert_log_checkpointed(dir.path(), "an import");
    let mut server = serve(&config, proxy, admin).await;

    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/", server.proxy))
        .bearer_auth(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Another process writes while the server has the file open.
    let second = run_cli([
        "apikey",
        "create",
        "--local",
        "--owner-email",
        "ops@example.com",
        "--name",
        "beside",
        "--duration",
        "1d",
        "--config",
        config_arg,
    ]);

    signal(&server.child, "TERM");
    let (status, _) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert_log_checkpointed(dir.path(), "the server's shutdown");

    let backup = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("keygate.db"),
        backup.path().join("keygate.db"),
    )
    .unwrap();
    let store = keygate::store::open(&format!("sqlite://{}/keygate.db", backup.path().display()))
        .await
        .unwrap();
    let used = store
        .get_key(&key_id(&first))
        .await
        .unwrap()
        .expect("the bootstrap key");
    // The usage flushed at shutdown is in the file too.
    assert_eq!(used.request_count, 1);
    let created = store.get_key(&key_id(&second)).await.unwrap();
    assert_eq!(
        created
            .expect("the key created beside the server")
            .display_name,
        "beside"
    );
    let migrated = store.get_key(&key_id(imported)).await.unwrap();
    assert_eq!(migrated.expect("the imported key").display_name, "migrated");
    store.close().await;
}

/// `keygate backup` copies the store while the server writes to it: the
/// copy holds what the log held too, it never overwrites a file, a
/// PostgreSQL store is pointed at pg_dump, and a mistyped path is not a new
/// empty store.
#[tokio::test]
async fn backup_copies_a_serving_store_into_a_new_file() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let config_arg = config.to_str().unwrap();
    let first = bootstrap(&config);
    let _server = serve(&config, proxy, admin).await;
    // A key the server writes: it sits in the log, not yet in keygate.db.
    let created = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{admin}/api/v1/api-keys"))
        .bearer_auth(&first)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"spec": {{"displayName": "late", "expiryTime": "{}"}}}}"#,
            humantime::format_rfc3339_seconds(
                std::time::SystemTime::now() + Duration::from_secs(86_400)
            )
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    let second = created["token"].as_str().unwrap().to_string();
    let wal = std::fs::metadata(dir.path().join("keygate.db-wal")).unwrap();
    assert!(
        wal.len() > 0,
        "the server's write went straight to keygate.db"
    );

    let copy = dir.path().join("copy.db");
    let copy_arg = copy.to_str().unwrap();
    run_cli(["backup", "--to", copy_arg, "--config", config_arg]);
    let store = keygate::store::open(&format!("sqlite://{copy_arg}"))
        .await
        .unwrap();
    for (token, name) in [(&first, "bootstrap"), (&second, "late")] {
        let key = store.get_key(&key_id(token)).await.unwrap();
        assert!(key.is_some(), "the copy lacks the {name} key");
    }
    store.close().await;

    // An existing file is never overwritten, nor is a PostgreSQL store
    // copied: both refused as usage errors that say why.
    let before = std::fs::read(&copy).unwrap();
    for (args, expected) in [
        (
            vec!["backup", "--to", copy_arg, "--config", config_arg],
            "already exists",
        ),
        (
            vec![
                "backup",
                "--to",
                "/tmp/x.db",
                "--store",
                "postgres://localhost/test",
            ],
            "pg_dump",
        ),
        (
            vec![
                "backup",
                "--to",
                "/tmp/x.db",
                "--store",
                "sqlite:///nonexistent/k.db",
            ],
            "no SQLite store at /nonexistent/k.db",
        ),
    ] {
        let out = Command::new(KEYGATE).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(std::fs::read(&copy).unwrap(), before);
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let key = bootstrap(&config);
    let server = serve(&config, proxy, admin).await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/", server.proxy);
    client.get(&url).bearer_auth(&key).send().await.unwrap();
    assert!(!upstream.last().headers.contains_key("x-api-key"));

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("[proxy]\n", "[proxy]\nkeep_credential = true\n", 1),
    )
    .unwrap();
    signal(&server.child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client
            .get(&url)
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if upstream.last().headers.contains_key("x-api-key") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the config"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The log level applies at once; what a running process cannot change
    // keeps its value, with a warning naming it. keep_credential, turned
    // off again, shows when the reload has run.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replacen("keep_credential = true", "keep_credential = false", 1)
        .replacen("[proxy]\n", "[proxy]\napi_key_header = \"x-gate-key\"\n", 1)
        .replacen("drain_timeout = \"10s\"", "drain_timeout = \"2s\"", 1)
        + "[log]\nlevel = \"warn\"\n";
    std::fs::write(&config, text).unwrap();
    let mut server = server;
    signal(&server.child, "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let quiet = format!("http://127.0.0.1:{}/before-warn-level", server.proxy);
    loop {
        // The old key header stays in force.
        let r = client
            .get(&quiet)
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        if !upstream.last().headers.contains_key("x-api-key") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .get(&quiet)
        .header("x-gate-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "proxy.api_key_header was applied by a reload"
    );
    let silent = format!("http://127.0.0.1:{}/never-logged", server.proxy);
    let r = client.get(&silent).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // At warn, the drain says nothing: wait for the exit alone.
    signal(&server.child, "TERM");
    let mut logs = String::new();
    let mut stderr = server.child.stderr.take().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
    assert!(server.child.wait().unwrap().success(), "{logs}");
    for field in ["proxy.api_key_header", "proxy.drain_timeout"] {
        assert!(
            logs.lines()
                .any(|l| l.contains(field) && l.contains("until a restart")),
            "{field} not named: {logs}"
        );
    }
    assert!(logs.contains("log level changing"), "{logs}");
    assert!(
        !logs.contains("/never-logged"),
        "an info line after the level went to warn: {logs}"
    );
}

/// An expired certificate does not stop `serve` (refusing would turn the
/// expiry into an outage): it serves it, with a warning naming the file
/// and the notAfter. A reload then takes a valid one, and refuses an expired
/// one again, naming it: the valid one keeps serving.
#[tokio::test]
async fn an_expired_certificate_starts_with_a_warning_and_a_reload_refuses_one() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (long_ago, _) = support::days_from_now(-60);
    let (yesterday, _) = support::days_from_now(-1);
    let expired = support::make_cert_valid(dir.path(), "expired", long_ago, yesterday);
    let renewed = support::make_cert_valid(
        dir.path(),
        "renewed",
        yesterday,
        support::days_from_now(90).0,
    );
    let expired_again = support::make_cert_valid(dir.path(), "again", long_ago, long_ago);
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let install = |cert: &support::TestCert| {
        std::fs::copy(&cert.cert_path, &cert_file).unwrap();
        std::fs::copy(&cert.key_path, &key_file).unwrap();
    };
    install(&expired);
    let (config, proxy, admin) = write_config(
        dir.path(),
        upstream.addr,
        &format!(
            "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
            cert_file.display(),
            key_file.display()
        ),
    );
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    let proxy_addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy));
    assert_eq!(support::presented_leaf(proxy_addr).await, expired.der);

    let presents = |expected: rustls::pki_types::CertificateDer<'static>| async move {
        for _ in 0..100 {
            if support::presented_leaf(proxy_addr).await == expected {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    install(&renewed);
    signal(&server.child, "HUP");
    assert!(
        presents(renewed.der.clone()).await,
        "the renewal was not taken"
    );
    install(&expired_again);
    signal(&server.child, "HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(support::presented_leaf(proxy_addr).await, renewed.der);

    signal(&server.child, "TERM");
    let mut logs = String::new();
    let mut stderr = server.child.stderr.take().unwrap();
    stderr.read_to_string(&mut logs).unwrap();
    let expired_at = humantime::format_rfc3339_seconds(yesterday).to_string();
    let cert_file = cert_file.display().to_string();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains(&format!(
                "the certificate in {cert_file} expired at {expired_at}"
            ))
            && l.contains("serving it anyway")),
        "no start warning naming {cert_file} and {expired_at}: {logs}"
    );
    let refused_at = humantime::format_rfc3339_seconds(long_ago).to_string();
    assert!(
        logs.lines().any(|l| l.contains("ERROR")
            && l.contains("reload refused")
            && l.contains(&format!(
                "the certificate in {cert_file} expired at {refused_at}"
            ))),
        "no refused reload naming {cert_file} and {refused_at}: {logs}"
    );
    // The key files' content and the admin key are never logged.
    for secret in [&expired, &renewed, &expired_again] {
        let pem = std::fs::read_to_string(&secret.key_path).unwrap();
        let body = pem.lines().nth(1).unwrap();
        assert!(!logs.contains(body), "a private key was logged: {logs}");
    }
    assert!(!logs.contains(&key), "{logs}");
}

#[test]
fn invalid_configs_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\nmax_headers = 0\n",
            "max_headers",
        ),
        ("[proxy]\nupstream = \"gopher://x\"\n", "upstream"),
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\n[cache]\nttl = \"soon\"\n",
            "ttl",
        ),
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\nlisten = \"nowhere\"\n",
            "listen",
        ),
        ("[proxi]\nupstream = \"http://127.0.0.1:1\"\n", "proxi"),
        // Had exited 69 "Address already in use", as if another process
        // held the port.
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\nlisten = \"127.0.0.1:32530\"\n\
             [admin]\nlisten = \"127.0.0.1:32530\"\n",
            "admin.listen",
        ),
        // Both were taken: zero cut every request in flight at SIGTERM,
        // and refused every admin request with a body.
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\ndrain_timeout = \"0s\"\n",
            "proxy.drain_timeout",
        ),
        // A stop that could wait for hours: past any supervisor's patience.
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\ndrain_timeout = \"2h\"\n",
            "proxy.drain_timeout",
        ),
        (
            "[proxy]\nupstream = \"http://127.0.0.1:1\"\n[admin]\nmax_body_bytes = 0\n",
            "admin.max_body_bytes",
        ),
    ];
    for (text, field) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (code, stderr) = serve_to_exit(&path, None);
        assert_eq!(code, Some(64), "{text}");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
    let (code, _) = serve_to_exit("/nonexistent/keygate.toml".as_ref(), None);
    assert_eq!(code, Some(64));
}

/// What `serve` finds wrong with the files and URLs the configuration names
/// while starting exits 64, as any configuration error: restarting cannot
/// help (the shipped unit has RestartPreventExitStatus=64). A listener or a
/// store that is not there stays 69. Each had exited 69.
#[test]
fn configuration_errors_found_while_starting_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let pem = |name: &str| {
        let cert = support::make_cert(dir.path(), name);
        (
            cert.cert_path.display().to_string(),
            cert.key_path.display().to_string(),
        )
    };
    let ((cert, key), (_, other_key)) = (pem("a"), pem("b"));
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let garbage = garbage.display().to_string();
    let upstream = "127.0.0.1:9".parse().unwrap();
    let serve = |extra: &str| {
        let (config, _, _) = write_config(dir.path(), upstream, extra);
        serve_to_exit(&config, None)
    };
    for (extra, named) in [
        (
            format!("tls = {{ cert_file = \"{cert}\", key_file = \"{cert}\" }}"),
            "private key file",
        ),
        (
            format!("tls = {{ cert_file = \"{cert}\", key_file = \"{other_key}\" }}"),
            "does not belong to the certificate",
        ),
        (
            "upstream_ca_file = \"/nonexistent/ca.pem\"".to_string(),
            "CA file",
        ),
        (
            format!("upstream_ca_file = \"{garbage}\""),
            "holds no certificate",
        ),
    ] {
        let (code, stderr) = serve(&extra);
        assert_eq!(code, Some(64), "{extra}: {stderr}");
        assert!(stderr.contains(named), "{named}: {stderr}");
    }
    // The store URL is the configuration's too; its password is not shown.
    let path = dir.path().join("pg.toml");
    std::fs::write(
        &path,
        "[proxy]\nupstream = \"http://127.0.0.1:9\"\n\
         [store]\nurl = \"postgres://u:hunter2secret@h:notaport/db\"\n",
    )
    .unwrap();
    let (code, stderr) = serve_to_exit(&path, None);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("store.url"), "{stderr}");
    assert!(!stderr.contains("hunter2secret"), "{stderr}");

    // A port taken by another process: unavailable, not misconfigured.
    let (config, proxy, _) = write_config(
        dir.path(),
        upstream,
        &format!("tls = {{ cert_file = \"{cert}\", key_file = \"{key}\" }}"),
    );
    let _taken = std::net::TcpListener::bind(("127.0.0.1", proxy)).unwrap();
    let (code, stderr) = serve_to_exit(&config, None);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
}

/// A PostgreSQL password given as a query parameter is masked where the
/// URL is logged, as one in the userinfo is; an unreachable store exits 69.
#[test]
fn a_store_password_in_the_query_is_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pg.toml");
    std::fs::write(
        &path,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{}\"\nupstream = \"http://127.0.0.1:9\"\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\n[store]\n\
             url = \"postgres://postgres@127.0.0.1:1/db?password=hunter2secret&application_name=kg\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let (code, stderr) = serve_to_exit(&path, Some("trace"));
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("cannot open the key store at postgres://postgres@127.0.0.1:1/db?password=***&application_name=kg"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
}

/// The store holds key digests and the audit log: the database file keygate
/// creates, its write-ahead log and shared memory, and a backup are 0600
/// under the usual umask (022), which had left them 0644. A store file that
/// exists keeps the mode its operator gave it.
#[tokio::test]
async fn a_new_store_its_wal_and_a_backup_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    // The real binary under the umask most services run with.
    let under_umask_022 = |args: &[&std::ffi::OsStr]| {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("umask 022 && exec \"$@\"")
            .arg("sh")
            .arg(KEYGATE)
            .args(args);
        command
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, proxy, admin) = write_config(dir.path(), upstream.addr, "");
    let child = under_umask_022(&["serve".as_ref(), "--config".as_ref(), config.as_os_str()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server { child, proxy };
    wait_ready(admin).await;
    for file in ["keygate.db", "keygate.db-wal", "keygate.db-shm"] {
        assert_eq!(mode(&dir.path().join(file)), 0o600, "{file}");
    }
    let copy = dir.path().join("copy.db");
    let out = under_umask_022(&[
        "backup".as_ref(),
        "--to".as_ref(),
        copy.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&copy), 0o600);

    let shared = dir.path().join("shared.db");
    std::fs::write(&shared, b"").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = under_umask_022(&[
        "bootstrap".as_ref(),
        "--email".as_ref(),
        "ops@example.com".as_ref(),
        "--store".as_ref(),
        format!("sqlite://{}", shared.display()).as_ref(),
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&shared), 0o640);
}

#[test]
fn bootstrap_refuses_once_a_user_exists() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = "127.0.0.1:9".parse().unwrap();
    let (config, _, _) = write_config(dir.path(), upstream, "");
    let key = bootstrap(&config);
    assert!(
        key.starts_with("kg_") && key.len() == 3 + 16 + 1 + 38,
        "{key}"
    );
    let out = Command::new(KEYGATE)
        .args(["bootstrap", "--email", "again@example.com", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exist"));
    assert!(out.stdout.is_empty(), "no key printed");
    let out = Command::new(KEYGATE)
        .args(["bootstrap", "--email", "not-an-email", "--store"])
        .arg(format!("sqlite://{}/other.db", dir.path().display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// Waits for a SIGTERMed keygate to exit; its status and what it logged.
fn wait_exit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut text);
                assert!(
                    text.contains("drained") || text.contains("shutting down"),
                    "{text}"
                );
            }
            return (status, text);
        }
        assert!(Instant::now() < deadline, "keygate did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The access log as an operator's collector reads it (stderr not a
/// terminal): one line per request in the compact format by default and in
/// JSON with `[log] format = "json"`, naming key, owner, client, path, route,
/// status, refusal and the request id the upstream received, and never the
/// secret or the query. The compact run goes through the relay, the JSON one
/// through hyper's path.
#[tokio::test]
async fn access_log_lines_in_compact_and_json_formats() {
    let upstream = RecordingUpstream::start().await;
    for (format, relay) in [("pretty", true), ("json", false)] {
        upstream.seen.lock().unwrap().clear();
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("http1_relay = {relay}\n[log]\nformat = \"{format}\"");
        let (config, proxy, admin) = write_config(dir.path(), upstream.addr, &extra);
        let key = bootstrap(&config);
        let mut server = serve(&config, proxy, admin).await;
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{proxy}/logged");
        let ok = client
            .get(format!("{url}?q=query-not-logged"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let forwarded_id = upstream.seen.lock().unwrap()[0].headers["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        // A broken checksum: refused before any lookup, with the client's id.
        let last = if key.ends_with('x') { 'y' } else { 'x' };
        let wrong = format!("{}{last}", &key[..key.len() - 1]);
        let refused = client
            .get(&url)
            .bearer_auth(&wrong)
            .header("x-request-id", "client-chosen-7")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        // A head that does not parse: hyper answers it, and it is logged.
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", proxy))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut raw, b"GARBAGE\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut answer).await;
        assert!(answer.starts_with(b"HTTP/1.1 400 "));
        signal(&server.child, "TERM");
        let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(10));
        assert!(status.success());
        assert!(!logs.contains(&key[20..]), "the secret was logged");
        assert!(!logs.contains("query-not-logged"), "the query was logged");
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("keygate::access"))
            .collect();
        assert_eq!(access.len(), 3, "{logs}");
        let key_id = &key[3..19];
        if format == "json" {
            let lines: Vec<serde_json::Value> = access
                .iter()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect();
            assert_eq!(lines[0]["level"], "INFO");
            assert_eq!(lines[0]["target"], "keygate::access");
            assert_eq!(lines[0]["key_id"], key_id);
            assert_eq!(lines[0]["client"], "127.0.0.1");
            assert_eq!(lines[0]["method"], "GET");
            assert_eq!(lines[0]["path"], "/logged");
            assert_eq!(lines[0]["route"], "default");
            assert_eq!(lines[0]["status"], 200);
            assert_eq!(lines[0]["request_id"], forwarded_id.as_str());
            assert!(lines[0]["latency_us"].is_u64());
            assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'));
            assert!(lines[1].get("key_id").is_none());
            assert_eq!(lines[1]["status"], 401);
            assert_eq!(lines[1]["refusal"], "malformed_api_key");
            assert_eq!(lines[1]["request_id"], "client-chosen-7");
            assert_eq!(lines[2]["client"], "127.0.0.1");
            assert_eq!(lines[2]["method"], "-");
            assert!(lines[2].get("path").is_none());
            assert!(lines[2].get("request_id").is_none());
            assert_eq!(lines[2]["status"], 400);
            assert_eq!(lines[2]["refusal"], "malformed_request");
        } else {
            let ok = access[0];
            assert!(ok.contains("  INFO keygate::access: "), "{ok}");
            assert!(ok.contains(&format!(" key_id=\"{key_id}\" ")), "{ok}");
            assert!(
                ok.contains(
                    " client=\"127.0.0.1\" method=\"GET\" path=\"/logged\" route=\"default\" "
                ),
                "{ok}"
            );
            assert!(ok.contains(" status=200 latency_us="), "{ok}");
            assert!(
                ok.ends_with(&format!(" request_id=\"{forwarded_id}\"")),
                "{ok}"
            );
            let refused = access[1];
            assert!(!refused.contains("key_id="), "{refused}");
            assert!(
                refused.contains(" status=401 refusal=\"malformed_api_key\" latency_us="),
                "{refused}"
            );
            assert!(
                refused.ends_with(" request_id=\"client-chosen-7\""),
                "{refused}"
            );
            let unparsed = access[2];
            assert!(
                unparsed.contains(" client=\"127.0.0.1\" method=\"-\" status=400 "),
                "{unparsed}"
            );
            assert!(
                unparsed.contains(" refusal=\"malformed_request\" latency_us="),
                "{unparsed}"
            );
            assert!(!unparsed.contains("request_id="), "{unparsed}");
        }
    }
}

/// A client that puts its key in the path (by mistake, or a badly written
/// client) does not get it written to the access log: the path field has
/// `<redacted>` where the token was, on the relay's path and hyper's, in
/// the compact and the JSON format. Before, the path was logged as sent.
#[tokio::test]
async fn a_token_in_the_path_is_not_logged() {
    let upstream = RecordingUpstream::start().await;
    for (format, relay) in [("pretty", true), ("json", false)] {
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("http1_relay = {relay}\n[log]\nformat = \"{format}\"");
        let (config, proxy, admin) = write_config(dir.path(), upstream.addr, &extra);
        let key = bootstrap(&config);
        let mut server = serve(&config, proxy, admin).await;
        let client = reqwest::Client::new();
        // Forwarded (with the key in the header too) and refused (none).
        let ok = client
            .get(format!("http://127.0.0.1:{proxy}/v1/{key}/thing"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        let refused = client
            .get(format!("http://127.0.0.1:{proxy}/keys/{key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
        signal(&server.child, "TERM");
        let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(10));
        assert!(status.success());
        let secret = &key[20..];
        assert!(
            !logs.contains(secret),
            "relay {relay}: the secret was logged: {logs}"
        );
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("keygate::access"))
            .collect();
        assert_eq!(access.len(), 2, "{logs}");
        let paths: Vec<String> = if format == "json" {
            access
                .iter()
                .map(|l| {
                    let line: serde_json::Value = serde_json::from_str(l).unwrap();
                    line["path"].as_str().unwrap().to_owned()
                })
                .collect()
        } else {
            access
                .iter()
                .map(|l| {
                    let rest = l.split_once(" path=\"").unwrap().1;
                    rest.split_once('"').unwrap().0.to_owned()
                })
                .collect()
        };
        assert_eq!(
            paths,
            ["/v1/<redacted>/thing", "/keys/<redacted>"],
            "{logs}"
        );
    }
}

/// A key whose secret verified but whose state refuses it (here disabled)
/// is named in its access-log line and counted under its id, on both
/// paths: the operator can tell which key is being refused. A wrong secret
/// for the same id names nothing (it proves nothing about the id). Before,
/// every 401 was logged without a key id, so `api_key_disabled` lines could
/// not be traced to a key.
#[tokio::test]
async fn refusals_of_a_verified_key_name_it_in_the_access_log() {
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("http1_relay = {relay}\n[log]\nformat = \"json\"");
        let (config, proxy, admin) = write_config(dir.path(), upstream.addr, &extra);
        let admin_key = bootstrap(&config);
        let mut server = serve(&config, proxy, admin).await;
        let client = reqwest::Client::new();
        let api = format!("http://127.0.0.1:{admin}/api/v1/api-keys");
        let expiry = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(3600),
        )
        .to_string();
        let created: serde_json::Value = client
            .post(&api)
            .bearer_auth(&admin_key)
            .json(&serde_json::json!({"spec": {"displayName": "d", "expiryTime": expiry}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = created["token"].as_str().unwrap().to_string();
        let id = created["apiKey"]["id"].as_str().unwrap().to_string();
        let owner = created["apiKey"]["spec"]["ownerId"].as_str().unwrap();
        let disabled = client
            .post(format!("{api}/{id}/disable"))
            .bearer_auth(&admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(disabled.status(), 200);
        let url = format!("http://127.0.0.1:{proxy}/refused");
        let refused = client.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(refused.status(), 401);
        // The same id with another (well-formed) secret.
        let other = keygate::key::TokenFormat::new("kg")
            .issue_secret(&keygate::key::KeyId::parse(&id).unwrap())
            .0;
        let wrong = client
            .get(&url)
            .bearer_auth(other.expose())
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        let metrics = client
            .get(format!("http://127.0.0.1:{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        signal(&server.child, "TERM");
        let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(10));
        assert!(status.success());
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .filter(|l| l.contains("keygate::access"))
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 2, "{logs}");
        assert_eq!(lines[0]["refusal"], "api_key_disabled", "relay {relay}");
        assert_eq!(lines[0]["key_id"], id.as_str(), "relay {relay}: {logs}");
        assert_eq!(lines[0]["owner_id"], owner, "relay {relay}");
        assert_eq!(lines[1]["refusal"], "invalid_api_key", "relay {relay}");
        assert!(lines[1].get("key_id").is_none(), "relay {relay}: {logs}");
        assert!(lines[1].get("owner_id").is_none(), "relay {relay}");
        let series = format!("keygate_requests_total{{key_id=\"{id}\",owner_id=\"{owner}\",route=\"default\",status_class=\"4xx\"}} 1");
        assert!(metrics.contains(&series), "relay {relay}: {metrics}");
    }
}

/// A failed upstream is logged once per request at warn with its cause, on
/// both paths: hyper's client error alone said "client error (Connect)".
#[tokio::test]
async fn upstream_failures_are_logged_with_their_cause() {
    let dead = support::dead_address().await;
    let dir = tempfile::tempdir().unwrap();
    let routes = format!("[[routes]]\npath_prefix = \"/tls\"\nupstream = \"https://{dead}\"");
    let (config, proxy, admin) = write_config(dir.path(), dead, &routes);
    let key = bootstrap(&config);
    let mut server = serve(&config, proxy, admin).await;
    let client = reqwest::Client::new();
    for path in ["/plain", "/tls/x"] {
        let r = client
            .get(format!("http://127.0.0.1:{proxy}{path}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{path}");
    }
    signal(&server.child, "TERM");
    let (status, logs) = wait_exit(&mut server.child, Duration::from_secs(10));
    assert!(status.success());
    let failures: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains(&dead.to_string()))
        .collect();
    assert_eq!(failures.len(), 2, "{logs}");
    for line in failures {
        assert!(line.contains("Connection refused"), "no cause: {line}");
    }
}

/// An unusable RUST_LOG is named in a warning, and [log] level applies.
#[tokio::test]
async fn an_unusable_rust_log_is_named_not_dropped_silently() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, _, admin) = write_config(dir.path(), upstream.addr, "");
    let mut child = spawn_keygate(&config, Some("keygate=loud"));
    wait_ready(admin).await;
    signal(&child, "TERM");
    let (status, logs) = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{logs}");
    assert!(
        logs.contains("RUST_LOG is not a valid filter") && logs.contains("keygate=loud"),
        "{logs}"
    );
    // log.level (info) applied: the start line is there.
    assert!(logs.contains("keygate serving"), "{logs}");
}
