//! Test support: start keygate on 127.0.0.1:0 with a fresh SQLite file, real
//! upstreams, and fixtures written through the real store.
#![allow(dead_code)]

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
    _dir: tempfile::TempDir,
}

pub struct GateBuilder {
    upstream: Option<SocketAddr>,
    extra: String,
}

impl Gate {
    pub fn builder() -> GateBuilder {
        GateBuilder {
            upstream: None,
            extra: String::new(),
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
        self.upstream = Some(addr);
        self
    }

    /// Extra TOML appended to the generated config (sections other than
    /// [proxy], [admin], [store], or whole [[routes]] tables).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub async fn start(self) -> Gate {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("keygate.db");
        let upstream = self.upstream.map_or_else(
            || "http://127.0.0.1:9".to_string(),
            |a| format!("http://{a}"),
        );
        let text = format!(
            "[proxy]\nupstream = \"{upstream}\"\nupstream_timeout = \"2s\"\nconnect_timeout = \"1s\"\n\
             drain_timeout = \"2s\"\n[store]\nurl = \"sqlite://{}\"\n[usage]\nflush_interval = \"100ms\"\n{}",
            db_path.display(),
            self.extra
        );
        let config: Config = text
            .parse()
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        let proxy_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy = proxy_listener.local_addr().expect("addr");
        let admin = admin_listener.local_addr().expect("addr");
        let store = store::open(&config.store.url).await.expect("open store");
        let tokens = TokenFormat::new(&config.keys.prefix);
        let (admin_user, _, admin_token) = bootstrap(
            &*store,
            &tokens,
            "admin@example.com",
            Some(Duration::from_secs(3600)),
        )
        .await
        .expect("bootstrap");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            keygate::app::run(config, proxy_listener, admin_listener, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("keygate runs");
        });
        Gate {
            proxy,
            admin,
            store,
            db_path,
            admin_user,
            admin_token: admin_token.expose().to_string(),
            tokens,
            stop: Some(stop_tx),
            task: Some(task),
            _dir: dir,
        }
    }
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
