//! Shared set-up of the benchmarks: a real SQLite store holding N keys and
//! an `Authenticator` in front of it, as the proxy builds them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keygate::admin::bootstrap::bootstrap;
use keygate::auth::{Authenticator, CacheSettings};
use keygate::key::{IssuedToken, TokenFormat};
use keygate::store::{self, Actor, NewKey, OwnerType};
use keygate::telemetry::metrics::Metrics;

pub struct Bench {
    pub auth: Arc<Authenticator>,
    pub tokens: TokenFormat,
    /// Tokens of the keys in the store (the bootstrap admin's first).
    pub issued: Vec<IssuedToken>,
    _dir: tempfile::TempDir,
}

/// A store with `n` keys (plus the bootstrap admin's) spread over owners of
/// 10,000 keys, each a real token.
pub async fn with_keys(n: usize) -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = store::open(&url).await.expect("store");
    let tokens = TokenFormat::new("kg");
    let (admin, _, admin_token) = bootstrap(&*store, &tokens, "bench@example.com", None)
        .await
        .expect("bootstrap");
    let actor = Actor::system("bench");
    store
        .update_settings(&actor, true, Duration::from_secs(90 * 86_400), 10_000, None)
        .await
        .expect("settings");
    let mut issued = vec![admin_token];
    let expiry = Some(SystemTime::now() + Duration::from_secs(86_400));
    let mut owner = admin;
    let mut batch = Vec::new();
    for i in 0..n {
        if i % 9_999 == 0 && i > 0 {
            store.import_keys(&actor, &batch).await.expect("import");
            batch.clear();
            let spec = keygate::store::PrincipalSpec {
                name: format!("owner{i}@example.com"),
                description: String::new(),
                access: keygate::store::Access {
                    account_role: keygate::store::AccountRole::Developer,
                    namespaces: Default::default(),
                },
                disabled: false,
            };
            owner = store
                .create_principal(&actor, OwnerType::User, spec)
                .await
                .expect("owner");
        }
        let (id, token, digest) = tokens.generate();
        batch.push(NewKey {
            id,
            digest,
            display_name: format!("k{i}"),
            description: String::new(),
            owner_id: owner.id.clone(),
            owner_type: owner.kind,
            namespaces: Vec::new(),
            expiry,
            disabled: false,
        });
        issued.push(token);
    }
    store.import_keys(&actor, &batch).await.expect("import");
    let settings = CacheSettings {
        capacity: 2_000_000,
        ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(3600),
        stale_if_error: Duration::from_secs(300),
    };
    let auth = Arc::new(Authenticator::new(
        store.clone(),
        settings,
        Arc::new(Metrics::new(10_000)),
    ));
    Bench {
        auth,
        tokens,
        issued,
        _dir: dir,
    }
}
