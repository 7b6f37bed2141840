//! Test support: start keygate on 127.0.0.1:0 with a fresh SQLite file, real
//! upstreams, and fixtures written through the real store.
#![allow(dead_code)]
// Test servers record what they saw behind a plain Mutex; no hot path here.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keygate::admin::bootstrap::{bootstrap, issue_key};
use keygate::config::Config;
use keygate::key::TokenFormat;
use keygate::store::{
    self, Access, AccountRole, Actor, KeyStore, OwnerType, Permission, Principal, PrincipalSpec,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A self-signed certificate for `localhost`, written as PEM files.
pub struct TestCert {
    pub der: rustls::pki_types::CertificateDer<'static>,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

pub fn make_cert(dir: &std::path::Path, name: &str) -> TestCert {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).unwrap();
    TestCert {
        der: certified.cert.der().clone(),
        cert_path,
        key_path,
    }
}

/// [`make_cert`], valid from `not_before` to `not_after` (rcgen's default
/// is 1975 to 4096).
pub fn make_cert_valid(
    dir: &std::path::Path,
    name: &str,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
) -> TestCert {
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.self_signed(&key_pair).unwrap();
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    TestCert {
        der: cert.der().clone(),
        cert_path,
        key_path,
    }
}

/// `now` moved by `days` (back when negative), in whole seconds as a
/// certificate holds it: (the time, its Unix seconds).
pub fn days_from_now(days: i64) -> (std::time::SystemTime, i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let secs = i64::try_from(now).unwrap() + days * 86_400;
    let time = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap());
    (time, secs)
}

/// Accepts any server certificate (signatures still checked), so that a
/// test can see which one an expired or untrusted listener presents.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that takes whatever certificate the server presents.
pub fn any_certificate_client() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth()
}

/// The leaf certificate the TLS listener at `addr` presents now.
pub async fn presented_leaf(addr: SocketAddr) -> rustls::pki_types::CertificateDer<'static> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(any_certificate_client()));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Runs a keygate command to completion; its stdout, trimmed, once it has
/// succeeded (its stderr in the failure otherwise).
pub fn run_cli<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A running keygate.
pub struct Gate {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// A second handle on the same SQLite file, for fixtures.
    pub store: Arc<dyn KeyStore>,
    pub db_path: std::path::PathBuf,
    pub admin_user: Principal,
    /// The bootstrap admin's token.
    pub admin_token: String,
    pub tokens: TokenFormat,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The config file keygate reloads from.
    pub config_path: std::path::PathBuf,
    /// Sends a reload request (what SIGHUP does).
    pub reload_tx: tokio::sync::mpsc::UnboundedSender<()>,
    _dir: Option<tempfile::TempDir>,
    _config_dir: tempfile::TempDir,
}

pub struct GateBuilder {
    upstream: Option<String>,
    /// `[proxy] upstream` is written (the default route); off for a gate
    /// that routes only by `[[routes]]`.
    default_route: bool,
    extra: String,
    proxy_extra: String,
}

impl Gate {
    /// A gate to `upstream` serving HTTP/1.1 through the relay (`relay`) or
    /// through hyper's path, for tests that hold both paths to one answer.
    pub async fn with_relay(upstream: SocketAddr, relay: bool) -> Gate {
        Gate::builder()
            .upstream(upstream)
            .proxy(&format!("http1_relay = {relay}"))
            .start()
            .await
    }

    pub fn builder() -> GateBuilder {
        GateBuilder {
            upstream: None,
            default_route: true,
            extra: String::new(),
            proxy_extra: String::new(),
        }
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Creates a user with an account role and namespace permissions.
    pub async fn user(
        &self,
        email: &str,
        role: AccountRole,
        namespaces: &[(&str, Permission)],
    ) -> Principal {
        self.principal(OwnerType::User, email, role, namespaces)
            .await
    }

    pub async fn principal(
        &self,
        kind: OwnerType,
        name: &str,
        role: AccountRole,
        namespaces: &[(&str, Permission)],
    ) -> Principal {
        for (ns, _) in namespaces {
            if self.store.get_namespace(ns).await.expect("store").is_none() {
                self.store
                    .create_namespace(&Actor::system("test"), ns, "")
                    .await
                    .expect("namespace");
            }
        }
        let spec = PrincipalSpec {
            name: name.into(),
            description: String::new(),
            access: Access {
                account_role: role,
                namespaces: namespaces
                    .iter()
                    .map(|(n, p)| (n.to_string(), *p))
                    .collect::<BTreeMap<_, _>>(),
            },
            disabled: false,
        };
        self.store
            .create_principal(&Actor::system("test"), kind, spec)
            .await
            .expect("principal")
    }

    /// Issues a key for `owner` straight into the store; returns (id, token).
    pub async fn key_for(&self, owner: &Principal) -> (String, String) {
        let (key, token) = issue_key(
            &*self.store,
            &self.tokens,
            &Actor::system("test"),
            owner,
            "test key",
            "",
            Some(Duration::from_secs(3600)),
        )
        .await
        .expect("issue key");
        (key.id.to_string(), token.expose().to_string())
    }

    /// Runs raw SQL on the store file (for states the API refuses to
    /// create, such as an already-expired key).
    pub async fn sql(&self, statement: &str) {
        use sqlx::Connection;
        let url = format!("sqlite://{}", self.db_path.display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("connect");
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect("sql");
    }

    /// Rewrites the config file and asks keygate to reload it.
    pub fn rewrite_config(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
        let _ = self.reload_tx.send(());
    }

    /// Stops keygate and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl GateBuilder {
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = Some(format!("http://{addr}"));
        self
    }

    /// Any upstream URL (e.g. `https://localhost:PORT`).
    pub fn upstream_url(mut self, url: &str) -> Self {
        self.upstream = Some(url.to_string());
        self
    }

    /// No `[proxy] upstream`: only `[[routes]]` (from [`Self::extra`]) route.
    pub fn without_default_route(mut self) -> Self {
        self.default_route = false;
        self
    }

    /// Extra `key = value` lines inside the generated `[proxy]` table.
    pub fn proxy(mut self, lines: &str) -> Self {
        self.proxy_extra.push_str(lines);
        self.proxy_extra.push('\n');
        self
    }

    /// Extra TOML appended to the generated config (sections other than
    /// [proxy], [admin], [store], or whole [[routes]] tables).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Starts keygate on a fresh SQLite file with a bootstrap admin.
    pub async fn start(self) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("keygate.db");
        let url = format!("sqlite://{}", db_path.display());
        let store = store::open(&url).await.expect("open store");
        let tokens = TokenFormat::new(keygate::config::DEFAULT_KEY_PREFIX);
        let (admin_user, _, admin_token) = bootstrap(
            &*store,
            &tokens,
            "admin@example.com",
            Some(Duration::from_secs(3600)),
        )
        .await
        .expect("bootstrap");
        let admin_token = admin_token.expose().to_string();
        self.launch(Some(dir), db_path, store, admin_user, admin_token)
            .await
    }

    /// Starts a second keygate on the store file of `other` (a replica).
    pub async fn start_on(self, other: &Gate) -> Gate {
        let url = format!("sqlite://{}", other.db_path.display());
        let store = store::open(&url).await.expect("open store");
        self.launch(
            None,
            other.db_path.clone(),
            store,
            other.admin_user.clone(),
            other.admin_token.clone(),
        )
        .await
    }

    async fn launch(
        self,
        dir: Option<tempfile::TempDir>,
        db_path: std::path::PathBuf,
        store: Arc<dyn KeyStore>,
        admin_user: Principal,
        admin_token: String,
    ) -> Gate {
        let upstream = match (self.default_route, self.upstream) {
            (false, _) => String::new(),
            (true, upstream) => format!(
                "upstream = \"{}\"\n",
                upstream.as_deref().unwrap_or("http://127.0.0.1:9")
            ),
        };
        let text = format!(
            "[proxy]\n{upstream}upstream_timeout = \"2s\"\nconnect_timeout = \"1s\"\n\
             drain_timeout = \"2s\"\n{}[store]\nurl = \"sqlite://{}\"\n[usage]\nflush_interval = \"100ms\"\n{}",
            self.proxy_extra,
            db_path.display(),
            self.extra
        );
        let config: Config = text
            .parse()
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config_path = config_dir.path().join("keygate.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let (reload_tx, triggers) = tokio::sync::mpsc::unbounded_channel();
        let reload = keygate::app::ReloadSource {
            path: config_path.clone(),
            triggers,
            poll: Duration::from_millis(200),
        };
        let tokens = TokenFormat::new(&config.keys.prefix);
        let proxy_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = proxy_listener.local_addr().expect("addr");
        let admin = admin_listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            keygate::app::run_with_reload(
                config,
                Some(reload),
                proxy_listener,
                admin_listener,
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .expect("keygate runs");
        });
        // Serving once the admin listener answers (the store is open and the
        // certificate loaded by then).
        for _ in 0..100 {
            let ok = reqwest::get(format!("http://{admin}/healthz"))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Gate {
            proxy,
            admin,
            store,
            db_path,
            admin_user,
            admin_token,
            tokens,
            stop: Some(stop_tx),
            task: Some(task),
            config_path,
            reload_tx,
            _dir: dir,
            _config_dir: config_dir,
        }
    }
}

/// Status codes of every response in a (possibly pipelined) answer read
/// off a raw connection, in order (HTTP/1.1 and HTTP/1.0 status lines).
pub fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Starts keygate's echo upstream on 127.0.0.1:0.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(keygate::echo::serve(listener, std::future::pending()));
    addr
}

/// An address where nothing listens (bound, then closed).
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// What a [`RecordingUpstream`] received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: http::Method,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body_len: usize,
    /// Whether the request body arrived whole (false: the sender aborted it).
    pub body_complete: bool,
}

/// A real HTTP upstream (HTTP/1.1 and h2c) that records every request it
/// gets, once its body has ended. Paths: `/slow` answers after 5 s;
/// `/stream/N` streams N 1 KiB chunks; `/drip/N` streams N 1-byte chunks
/// 100 ms apart; `/echo-body` returns the request body; anything else "ok".
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<std::sync::Mutex<Vec<SeenRequest>>>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        use http_body_util::{BodyExt, Full, StreamBody};
        use hyper::body::Frame;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<std::sync::Mutex<Vec<SeenRequest>>> = Arc::default();
        let recorder = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let recorder = recorder.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes());
                                let body_complete = body.is_ok();
                                let body = body.unwrap_or_default();
                                recorder.lock().unwrap().push(SeenRequest {
                                    method: parts.method.clone(),
                                    path: parts
                                        .uri
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default(),
                                    version: parts.version,
                                    headers: parts.headers.clone(),
                                    body_len: body.len(),
                                    body_complete,
                                });
                                let path = parts.uri.path().to_string();
                                type Body = http_body_util::combinators::BoxBody<
                                    bytes::Bytes,
                                    std::convert::Infallible,
                                >;
                                let body: Body = if path == "/slow" {
                                    tokio::time::sleep(Duration::from_secs(5)).await;
                                    Full::new(bytes::Bytes::from_static(b"slow")).boxed()
                                } else if let Some(n) = path.strip_prefix("/stream/") {
                                    let n: usize = n.parse().unwrap_or(1);
                                    let chunks = (0..n).map(|_| {
                                        Ok::<_, std::convert::Infallible>(Frame::data(
                                            bytes::Bytes::from(vec![b'x'; 1024]),
                                        ))
                                    });
                                    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
                                } else if let Some(n) = path.strip_prefix("/drip/") {
                                    let n: usize = n.parse().unwrap_or(1);
                                    let chunks =
                                        futures_util::stream::unfold(0, move |i| async move {
                                            if i == n {
                                                return None;
                                            }
                                            tokio::time::sleep(Duration::from_millis(100)).await;
                                            let frame =
                                                Frame::data(bytes::Bytes::from_static(b"x"));
                                            Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
                                        });
                                    StreamBody::new(chunks).boxed()
                                } else if path == "/echo-body" {
                                    Full::new(body).boxed()
                                } else {
                                    Full::new(bytes::Bytes::from_static(b"ok")).boxed()
                                };
                                let mut response = http::Response::new(body);
                                response
                                    .headers_mut()
                                    .insert("x-upstream", http::HeaderValue::from_static("yes"));
                                response
                                    .headers_mut()
                                    .insert("connection", http::HeaderValue::from_static("x-hop"));
                                response
                                    .headers_mut()
                                    .insert("x-hop", http::HeaderValue::from_static("1"));
                                Ok::<_, std::convert::Infallible>(response)
                            }
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
        RecordingUpstream { addr, seen }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> SeenRequest {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
}

/// PostgreSQL test databases (see `support/postgres.rs`).
pub mod postgres;

impl GateBuilder {
    /// Starts keygate with its SQLite file in `dir` (a directory the test
    /// controls, e.g. a small tmpfs to fill up), with a bootstrap admin.
    pub async fn start_in(self, dir: &std::path::Path) -> Gate {
        let db_path = dir.join("keygate.db");
        let url = format!("sqlite://{}", db_path.display());
        let store = store::open(&url).await.expect("open store");
        let tokens = TokenFormat::new(keygate::config::DEFAULT_KEY_PREFIX);
        let (admin_user, _, admin_token) = bootstrap(
            &*store,
            &tokens,
            "admin@example.com",
            Some(Duration::from_secs(3600)),
        )
        .await
        .expect("bootstrap");
        let admin_token = admin_token.expose().to_string();
        self.launch(None, db_path, store, admin_user, admin_token)
            .await
    }
}

/// The access log of the keygates this test process runs, as the compact
/// tracing format prints it (tests/lifecycle.rs checks the real binary's
/// own output). Lines are told apart by their request id or path.
#[derive(Clone)]
pub struct AccessLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl AccessLog {
    /// The process's access log, capturing from the first call on (one
    /// subscriber per process; tests running in threads share it).
    pub fn capture() -> AccessLog {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        static LOG: std::sync::OnceLock<AccessLog> = std::sync::OnceLock::new();
        LOG.get_or_init(|| {
            let log = AccessLog(Arc::default());
            let writer = log.clone();
            tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(false)
                        .with_writer(move || writer.clone()),
                )
                .with(
                    tracing_subscriber::filter::Targets::new()
                        .with_target("keygate::access", tracing::Level::INFO),
                )
                .init();
            log
        })
        .clone()
    }

    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits up to `within` for a line that contains `needle`.
    pub async fn line_with(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(line) = self.lines_with(needle).pop() {
                return Some(line);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl std::io::Write for AccessLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
