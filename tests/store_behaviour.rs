//! The KeyStore behaviour suite: the SAME test functions run against the
//! SQLite store (a fresh temp file) and the PostgreSQL store (a fresh
//! database on the machine's server), as `sqlite::<name>` and
//! `postgres::<name>`. Whatever one backend does, the other must do too:
//! errors, audit events, pagination cursors, policies, the change feed.
//!
//! Without a reachable PostgreSQL the `postgres::*` tests fail with the
//! reason, unless `KEYGATE_SKIP_POSTGRES=1` (then each prints that it was
//! skipped).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keygate::auth::{AuthError, Authenticator, CacheSettings};
use keygate::key::{KeyId, TokenFormat};
use keygate::store::{
    self, Access, AccountRole, Actor, ApiKey, FlushId, KeyFilter, KeyStore, KeyUpdate, NewKey,
    OwnerType, PageRequest, Permission, PolicyViolation, Principal, PrincipalSpec, Recorded,
    StoreError, UsageDelta,
};
use keygate::telemetry::metrics::Metrics;
use support::postgres::PgDatabase;

/// A store under test and what keeps it alive (its file or database).
struct Backend {
    store: Arc<dyn KeyStore>,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDatabase>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("keygate.db").display());
        let store = store::open(&url).await.expect("open sqlite store");
        Backend {
            store,
            _dir: Some(dir),
            _db: None,
        }
    }

    async fn postgres() -> Option<Backend> {
        let db = PgDatabase::create().await?;
        let store = store::open(&db.url).await.expect("open postgres store");
        Some(Backend {
            store,
            _dir: None,
            _db: Some(db),
        })
    }
}

/// Declares each behaviour once per backend.
macro_rules! behaviour {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let backend = super::Backend::sqlite().await;
                    super::$name(backend.store.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(backend) = super::Backend::postgres().await else {
                        return;
                    };
                    super::$name(backend.store.clone()).await;
                }
            )*
        }
    };
}

behaviour!(
    principals_crud,
    service_accounts_are_apart_from_users,
    namespaces_crud,
    a_namespace_id_wins_over_another_namespaces_name,
    deleting_a_namespace_removes_its_grants,
    a_grant_racing_a_namespace_delete_does_not_outlive_it,
    keys_crud_and_find_key,
    stale_resource_version_is_refused,
    pagination_covers_everything_once,
    audit_pagination_newest_first,
    lifetime_policy,
    owner_and_namespace_must_exist,
    cap_holds_under_50_concurrent_creates,
    owner_deletion_cascades_to_keys,
    the_last_enabled_admin_stays,
    concurrent_deletes_of_two_admins_leave_one,
    owner_update_reports_its_keys,
    rotation_keeps_previous_digest_until_grace,
    cache_sweep_drops_only_what_nothing_can_use,
    usage_is_recorded,
    a_flush_sent_again_counts_once,
    concurrent_sends_of_one_flush_count_once,
    concurrent_usage_flushes_add_up,
    existing_keys_are_told_from_deleted_and_unknown_ones,
    every_change_is_audited_and_no_digest_appears,
    change_feed_lists_every_key_affecting_change,
    settings_round_trip,
    imports_span_batches_all_or_nothing,
    concurrent_bootstraps_make_one_admin,
    a_refused_bootstrap_leaves_nothing,
    an_admins_disable_holds_against_the_owner,
);

// === fixtures ===

fn actor() -> Actor {
    Actor {
        id: "u-actor".into(),
        kind: "user".into(),
        name: "actor@example.com".into(),
    }
}

fn spec(name: &str, role: AccountRole, namespaces: &[(&str, Permission)]) -> PrincipalSpec {
    PrincipalSpec {
        name: name.into(),
        description: format!("{name} for tests"),
        access: Access {
            account_role: role,
            namespaces: namespaces
                .iter()
                .map(|(n, p)| (n.to_string(), *p))
                .collect::<BTreeMap<_, _>>(),
        },
        disabled: false,
    }
}

async fn user(store: &dyn KeyStore, email: &str) -> Principal {
    store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec(email, AccountRole::Developer, &[]),
        )
        .await
        .expect("create user")
}

fn in_a_day() -> Option<SystemTime> {
    Some(SystemTime::now() + Duration::from_secs(86_400))
}

fn new_key(owner: &Principal, tokens: &TokenFormat) -> (NewKey, String) {
    let (id, token, digest) = tokens.generate();
    let key = NewKey {
        id,
        digest,
        display_name: "k".into(),
        description: "a test key".into(),
        owner_id: owner.id.clone(),
        owner_type: owner.kind,
        namespaces: Vec::new(),
        expiry: in_a_day(),
        disabled: false,
    };
    (key, token.expose().to_string())
}

async fn key(store: &dyn KeyStore, owner: &Principal) -> (ApiKey, String) {
    let (new, token) = new_key(owner, &TokenFormat::new("kg"));
    (
        store.create_key(&actor(), new).await.expect("create key"),
        token,
    )
}

fn page(size: u32, after: Option<String>) -> PageRequest {
    PageRequest { size, after }
}

fn is_not_found(r: &StoreError) -> bool {
    matches!(r, StoreError::NotFound { .. })
}

async fn head(store: &dyn KeyStore) -> i64 {
    store.changes_since(i64::MAX).await.expect("head").0
}

// === behaviours ===

async fn principals_crud(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let a = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec("a@example.com", AccountRole::Admin, &[]),
        )
        .await
        .expect("create");
    assert_eq!(a.kind, OwnerType::User);
    assert_eq!(a.name, "a@example.com");
    assert_eq!(a.description, "a@example.com for tests");
    assert_eq!(a.access.account_role, AccountRole::Admin);
    assert_eq!(a.resource_version, 1);
    assert!(!a.disabled);
    assert_eq!(
        store.get_principal(OwnerType::User, &a.id).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store
            .find_principal_by_name(OwnerType::User, "a@example.com")
            .await
            .unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.count_principals(OwnerType::User).await.unwrap(), 1);

    let dup = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec("a@example.com", AccountRole::Read, &[]),
        )
        .await
        .expect_err("duplicate email");
    assert!(
        matches!(&dup, StoreError::AlreadyExists { kind: "user", name } if name == "a@example.com"),
        "{dup:?}"
    );
    // An email is one address in any case: unique and found ignoring it.
    let dup = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec("A@Example.COM", AccountRole::Read, &[]),
        )
        .await
        .expect_err("duplicate email in another case");
    assert!(
        matches!(&dup, StoreError::AlreadyExists { kind: "user", .. }),
        "{dup:?}"
    );
    assert_eq!(
        store
            .find_principal_by_name(OwnerType::User, "A@EXAMPLE.com")
            .await
            .unwrap(),
        Some(a.clone())
    );

    store.create_namespace(&actor(), "prod", "").await.unwrap();
    // Another admin, so that `a` may step down (the_last_enabled_admin_stays).
    store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("root", AccountRole::Admin, &[]),
        )
        .await
        .unwrap();
    let mut changed = spec(
        "a2@example.com",
        AccountRole::Developer,
        &[("prod", Permission::Write)],
    );
    changed.disabled = true;
    let (updated, keys) = store
        .update_principal(&actor(), OwnerType::User, &a.id, changed, Some(1))
        .await
        .expect("update");
    assert!(keys.is_empty());
    assert_eq!(updated.name, "a2@example.com");
    assert_eq!(updated.resource_version, 2);
    assert!(updated.disabled);
    assert_eq!(
        updated.access.namespaces.get("prod"),
        Some(&Permission::Write)
    );
    assert_eq!(updated.created, a.created);

    // Renaming onto another principal's name is refused like a create.
    let b = user(store, "b@example.com").await;
    let err = store
        .update_principal(
            &actor(),
            OwnerType::User,
            &b.id,
            spec("a2@example.com", AccountRole::Read, &[]),
            None,
        )
        .await
        .expect_err("rename onto a taken name");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err:?}");

    store
        .delete_principal(&actor(), OwnerType::User, &a.id)
        .await
        .expect("delete");
    assert_eq!(
        store.get_principal(OwnerType::User, &a.id).await.unwrap(),
        None
    );
    let again = store
        .delete_principal(&actor(), OwnerType::User, &a.id)
        .await
        .expect_err("deleted twice");
    assert!(is_not_found(&again), "{again:?}");
    let missing = store
        .update_principal(
            &actor(),
            OwnerType::User,
            "nope",
            spec("x@example.com", AccountRole::Read, &[]),
            None,
        )
        .await
        .expect_err("update of a missing principal");
    assert!(
        matches!(&missing, StoreError::NotFound { kind: "user", id } if id == "nope"),
        "{missing:?}"
    );
    assert_eq!(store.count_principals(OwnerType::User).await.unwrap(), 1);
}

async fn service_accounts_are_apart_from_users(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let sa = store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("ci-bot", AccountRole::Developer, &[]),
        )
        .await
        .unwrap();
    // The same name may be a user too: names are unique per kind.
    user(store, "ci-bot").await;
    assert_eq!(
        store.get_principal(OwnerType::User, &sa.id).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .get_principal(OwnerType::ServiceAccount, &sa.id)
            .await
            .unwrap()
            .map(|p| p.name),
        Some("ci-bot".to_string())
    );
    assert_eq!(
        store
            .count_principals(OwnerType::ServiceAccount)
            .await
            .unwrap(),
        1
    );
    let err = store
        .delete_principal(&actor(), OwnerType::User, &sa.id)
        .await
        .expect_err("a service account is not a user");
    assert!(
        matches!(err, StoreError::NotFound { kind: "user", .. }),
        "{err:?}"
    );
    let err = store
        .delete_principal(&actor(), OwnerType::ServiceAccount, "missing")
        .await
        .expect_err("missing");
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                kind: "service account",
                ..
            }
        ),
        "{err:?}"
    );
}

/// A name may equal another namespace's id (the admin API refuses such
/// names, the store holds what older versions let in): looked up by that
/// string, the namespace whose id it is comes back, never the other.
async fn a_namespace_id_wins_over_another_namespaces_name(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let first = store.create_namespace(&actor(), "first", "").await.unwrap();
    let shadow = store
        .create_namespace(&actor(), &first.id, "named after first's id")
        .await
        .unwrap();
    // Rewritten after the other, so that a scan in storage order meets it
    // second.
    let first = store
        .update_namespace(&actor(), &first.id, "the first", Some(1))
        .await
        .unwrap();
    assert_eq!(
        store.get_namespace(&first.id).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.get_namespace(&shadow.id).await.unwrap(),
        Some(shadow.clone())
    );
    assert_eq!(store.get_namespace("first").await.unwrap(), Some(first));
}

async fn namespaces_crud(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let ns = store
        .create_namespace(&actor(), "orders", "the orders service")
        .await
        .unwrap();
    assert_eq!(ns.name, "orders");
    assert_eq!(ns.description, "the orders service");
    assert_eq!(ns.resource_version, 1);
    assert_eq!(store.get_namespace(&ns.id).await.unwrap(), Some(ns.clone()));
    assert_eq!(
        store.get_namespace("orders").await.unwrap(),
        Some(ns.clone())
    );
    let dup = store
        .create_namespace(&actor(), "orders", "")
        .await
        .expect_err("duplicate");
    assert!(
        matches!(&dup, StoreError::AlreadyExists { kind: "namespace", name } if name == "orders"),
        "{dup:?}"
    );
    let updated = store
        .update_namespace(&actor(), &ns.id, "new words", Some(1))
        .await
        .unwrap();
    assert_eq!(updated.description, "new words");
    assert_eq!(updated.resource_version, 2);
    let stale = store
        .update_namespace(&actor(), &ns.id, "x", Some(1))
        .await
        .expect_err("stale");
    assert!(
        matches!(
            stale,
            StoreError::StaleVersion {
                given: 1,
                current: 2
            }
        ),
        "{stale:?}"
    );
    store.delete_namespace(&actor(), &ns.id).await.unwrap();
    assert_eq!(store.get_namespace("orders").await.unwrap(), None);
    let err = store
        .delete_namespace(&actor(), &ns.id)
        .await
        .expect_err("gone");
    assert!(
        matches!(&err, StoreError::NotFound { kind: "namespace", id } if *id == ns.id),
        "{err:?}"
    );
    let err = store
        .update_namespace(&actor(), "missing", "", None)
        .await
        .expect_err("missing");
    assert!(is_not_found(&err), "{err:?}");
}

/// Grants on a deleted namespace go with it: a namespace created later under
/// the same name starts with none. The owners' keys are reported (their
/// cached access is stale) and the change feed lists them.
async fn deleting_a_namespace_removes_its_grants(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let prod = store.create_namespace(&actor(), "prod", "").await.unwrap();
    store.create_namespace(&actor(), "dev", "").await.unwrap();
    let both = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec(
                "both@example.com",
                AccountRole::Developer,
                &[("prod", Permission::Write), ("dev", Permission::Read)],
            ),
        )
        .await
        .unwrap();
    let robot = store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("robot", AccountRole::Read, &[("prod", Permission::Admin)]),
        )
        .await
        .unwrap();
    let bystander = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec(
                "dev-only@example.com",
                AccountRole::Read,
                &[("dev", Permission::Write)],
            ),
        )
        .await
        .unwrap();
    let (both_key, _) = key(store, &both).await;
    let (robot_key, _) = key(store, &robot).await;
    key(store, &bystander).await;
    let feed_before = head(store).await;

    let mut keys = store.delete_namespace(&actor(), &prod.id).await.unwrap();
    keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = vec![both_key.id, robot_key.id];
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(keys, expected);

    let both_now = store
        .get_principal(OwnerType::User, &both.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        both_now.access.namespaces,
        BTreeMap::from([("dev".to_string(), Permission::Read)])
    );
    assert_eq!(both_now.resource_version, both.resource_version + 1);
    let robot_now = store
        .get_principal(OwnerType::ServiceAccount, &robot.id)
        .await
        .unwrap()
        .unwrap();
    assert!(robot_now.access.namespaces.is_empty());
    assert_eq!(
        store
            .get_principal(OwnerType::User, &bystander.id)
            .await
            .unwrap(),
        Some(bystander.clone()),
        "a principal without a grant on it is untouched"
    );
    // What the proxy reads with a key carries the narrowed access.
    let record = store.find_key(&both_key.id).await.unwrap().unwrap();
    assert_eq!(record.owner_access.permission_on("prod"), None);
    // Recreated under the same name, it starts with no grants.
    store.create_namespace(&actor(), "prod", "").await.unwrap();
    let again = store
        .get_principal(OwnerType::User, &both.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.access.permission_on("prod"), None);
    // Audited with who lost a grant; announced for the caches.
    let audit = store.list_audit(&page(2, None)).await.unwrap();
    let event = audit
        .items
        .iter()
        .find(|e| e.action == "namespace.delete")
        .expect("namespace.delete audited");
    let mut revoked: Vec<&str> = event.detail["grantsRemovedFrom"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    revoked.sort();
    let mut principals = vec![both.id.as_str(), robot.id.as_str()];
    principals.sort();
    assert_eq!(revoked, principals);
    assert!(head(store).await > feed_before, "the change feed moved");
}

/// A grant and the namespace's deletion at once: either the grant is
/// refused (the namespace is gone) or the deletion removes it; never a
/// grant on a namespace that no longer exists.
async fn a_grant_racing_a_namespace_delete_does_not_outlive_it(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let grantee = user(store, "racer@example.com").await;
    let actor = actor();
    for round in 0..10 {
        let name = format!("ns{round}");
        let ns = store.create_namespace(&actor, &name, "").await.unwrap();
        let current = store
            .get_principal(OwnerType::User, &grantee.id)
            .await
            .unwrap()
            .unwrap();
        let grant = spec(
            "racer@example.com",
            AccountRole::Developer,
            &[(name.as_str(), Permission::Write)],
        );
        let (granted, deleted) = tokio::join!(
            store.update_principal(&actor, OwnerType::User, &grantee.id, grant, None),
            store.delete_namespace(&actor, &ns.id),
        );
        deleted.expect("the delete never fails");
        if let Err(refused) = granted {
            assert!(
                matches!(&refused, StoreError::Policy(PolicyViolation::UnknownNamespace(n)) if *n == name),
                "{refused:?}"
            );
        }
        let after = store
            .get_principal(OwnerType::User, &grantee.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            after.access.permission_on(&name),
            None,
            "round {round}: a grant on deleted {name} survived (was {:?})",
            current.access.namespaces
        );
    }
}

async fn keys_crud_and_find_key(store: Arc<dyn KeyStore>) {
    let store = &*store;
    store.create_namespace(&actor(), "prod", "").await.unwrap();
    let owner = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec(
                "dev@example.com",
                AccountRole::Developer,
                &[("prod", Permission::Read)],
            ),
        )
        .await
        .unwrap();
    let tokens = TokenFormat::new("kg");
    let (mut new, _token) = new_key(&owner, &tokens);
    new.namespaces = vec!["prod".into()];
    new.display_name = "deploy".into();
    let expiry = new.expiry;
    let digest = new.digest;
    let created = store.create_key(&actor(), new.clone()).await.unwrap();
    assert_eq!(created.id, new.id);
    assert_eq!(created.display_name, "deploy");
    assert_eq!(created.owner_id, owner.id);
    assert_eq!(created.owner_type, OwnerType::User);
    assert_eq!(created.namespaces, vec!["prod".to_string()]);
    assert_eq!(created.expiry.map(store::to_ms), expiry.map(store::to_ms));
    assert_eq!(created.resource_version, 1);
    assert!(!created.disabled);
    assert_eq!(created.last_used, None);
    assert_eq!(created.request_count, 0);
    assert_eq!(created.previous_secret_valid_until, None);
    assert_eq!(store.get_key(&new.id).await.unwrap(), Some(created.clone()));

    let record = store.find_key(&new.id).await.unwrap().expect("found");
    assert_eq!(record.digest.as_bytes(), digest.as_bytes());
    assert!(record.previous.is_none());
    assert_eq!(record.owner_id, owner.id);
    assert_eq!(record.owner_name, "dev@example.com");
    assert_eq!(record.owner_type, OwnerType::User);
    assert_eq!(record.owner_access, owner.access);
    assert!(!record.owner_disabled && !record.disabled);
    assert_eq!(record.namespaces, vec!["prod".to_string()]);

    let updated = store
        .update_key(
            &actor(),
            &new.id,
            KeyUpdate {
                display_name: Some("renamed".into()),
                description: Some("new words".into()),
                disabled: Some(true),
                by_admin: false,
            },
            Some(1),
        )
        .await
        .unwrap();
    assert_eq!(updated.display_name, "renamed");
    assert_eq!(updated.description, "new words");
    assert!(updated.disabled);
    assert_eq!(updated.resource_version, 2);
    assert!(store.find_key(&new.id).await.unwrap().unwrap().disabled);
    // `None` fields stay as they are.
    let enabled = store
        .update_key(
            &actor(),
            &new.id,
            KeyUpdate {
                disabled: Some(false),
                ..KeyUpdate::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(enabled.display_name, "renamed");
    assert!(!enabled.disabled);

    store.delete_key(&actor(), &new.id).await.unwrap();
    assert!(store.find_key(&new.id).await.unwrap().is_none());
    assert!(store.get_key(&new.id).await.unwrap().is_none());
    for err in [
        store.delete_key(&actor(), &new.id).await.expect_err("gone"),
        store
            .update_key(&actor(), &new.id, KeyUpdate::default(), None)
            .await
            .expect_err("gone"),
        store
            .rotate_key(&actor(), &new.id, digest, SystemTime::now())
            .await
            .expect_err("gone"),
    ] {
        assert!(
            matches!(&err, StoreError::NotFound { kind: "API key", id } if *id == new.id.to_string()),
            "{err:?}"
        );
    }
    // Disabling the owner shows on its keys.
    let (k2, _) = key(store, &owner).await;
    let mut off = spec(
        "dev@example.com",
        AccountRole::Developer,
        &[("prod", Permission::Read)],
    );
    off.disabled = true;
    store
        .update_principal(&actor(), OwnerType::User, &owner.id, off, None)
        .await
        .unwrap();
    assert!(
        store
            .find_key(&k2.id)
            .await
            .unwrap()
            .unwrap()
            .owner_disabled
    );
}

async fn stale_resource_version_is_refused(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "v@example.com").await;
    let (k, _) = key(store, &owner).await;
    store
        .update_key(&actor(), &k.id, KeyUpdate::default(), Some(1))
        .await
        .unwrap();
    let err = store
        .update_key(&actor(), &k.id, KeyUpdate::default(), Some(1))
        .await
        .expect_err("stale");
    assert!(
        matches!(
            err,
            StoreError::StaleVersion {
                given: 1,
                current: 2
            }
        ),
        "{err:?}"
    );
    let err = store
        .update_principal(
            &actor(),
            OwnerType::User,
            &owner.id,
            spec("v@example.com", AccountRole::Read, &[]),
            Some(7),
        )
        .await
        .expect_err("stale");
    assert!(
        matches!(
            err,
            StoreError::StaleVersion {
                given: 7,
                current: 1
            }
        ),
        "{err:?}"
    );
    let settings = store.settings().await.unwrap();
    let err = store
        .update_settings(
            &actor(),
            true,
            settings.max_key_lifetime,
            3,
            Some(settings.resource_version + 1),
        )
        .await
        .expect_err("stale");
    assert!(matches!(err, StoreError::StaleVersion { .. }), "{err:?}");
    // Nothing of a refused update was written.
    assert_eq!(store.settings().await.unwrap(), settings);
    assert_eq!(
        store
            .get_key(&k.id)
            .await
            .unwrap()
            .unwrap()
            .resource_version,
        2
    );
    // Concurrent updates with the same version: exactly one wins.
    let attempts = (0..10).map(|i| {
        let id = k.id;
        async move {
            store
                .update_key(
                    &actor(),
                    &id,
                    KeyUpdate {
                        display_name: Some(format!("n{i}")),
                        ..KeyUpdate::default()
                    },
                    Some(2),
                )
                .await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| matches!(
            e,
            StoreError::StaleVersion {
                given: 2,
                current: 3
            }
        )));
}

async fn pagination_covers_everything_once(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let mut user_ids = BTreeSet::new();
    for i in 0..7 {
        user_ids.insert(user(store, &format!("u{i}@example.com")).await.id);
    }
    let owner = store
        .get_principal(OwnerType::User, user_ids.iter().next().unwrap())
        .await
        .unwrap()
        .unwrap();
    let other = store
        .get_principal(OwnerType::User, user_ids.iter().nth(1).unwrap())
        .await
        .unwrap()
        .unwrap();
    let sa = store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("bot", AccountRole::Developer, &[]),
        )
        .await
        .unwrap();
    let mut owner_keys = BTreeSet::new();
    for _ in 0..5 {
        owner_keys.insert(key(store, &owner).await.0.id.to_string());
    }
    key(store, &other).await;
    let sa_key = key(store, &sa).await.0.id.to_string();
    for name in ["a", "b", "c", "d"] {
        store.create_namespace(&actor(), name, "").await.unwrap();
    }

    // Users, three a page: every id once, in id order, the cursor being the
    // last id of the page and no cursor after the last page.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = store
            .list_principals(OwnerType::User, &page(3, after.clone()))
            .await
            .unwrap();
        assert!(p.items.len() <= 3);
        seen.extend(p.items.iter().map(|u| u.id.clone()));
        match p.next {
            Some(next) => {
                assert_eq!(Some(&next), p.items.last().map(|u| &u.id));
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen, user_ids.iter().cloned().collect::<Vec<_>>());
    // A page that ends exactly at the last item says there is no next one.
    let exact = store
        .list_principals(OwnerType::User, &page(7, None))
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 7);
    assert_eq!(exact.next, None);

    // Keys filtered by owner, two a page.
    let filter = KeyFilter {
        owner_id: Some(owner.id.clone()),
        owner_type: None,
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = store
            .list_keys(&filter, &page(2, after.clone()))
            .await
            .unwrap();
        seen.extend(p.items.iter().map(|k| k.id.to_string()));
        assert!(p.items.iter().all(|k| k.owner_id == owner.id));
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, owner_keys.iter().cloned().collect::<Vec<_>>());
    // By owner type; and all keys.
    let by_type = store
        .list_keys(
            &KeyFilter {
                owner_id: None,
                owner_type: Some(OwnerType::ServiceAccount),
            },
            &page(100, None),
        )
        .await
        .unwrap();
    assert_eq!(
        by_type
            .items
            .iter()
            .map(|k| k.id.to_string())
            .collect::<Vec<_>>(),
        vec![sa_key]
    );
    // Both filters: they must agree (the owner is a user).
    for (kind, expected) in [
        (OwnerType::User, owner_keys.len()),
        (OwnerType::ServiceAccount, 0),
    ] {
        let both = KeyFilter {
            owner_id: Some(owner.id.clone()),
            owner_type: Some(kind),
        };
        let listed = store.list_keys(&both, &page(100, None)).await.unwrap();
        assert_eq!(listed.items.len(), expected, "{kind:?}");
    }
    let all = store
        .list_keys(&KeyFilter::default(), &page(100, None))
        .await
        .unwrap();
    assert_eq!(all.items.len(), 7);
    assert!(all
        .items
        .windows(2)
        .all(|w| w[0].id.as_str() < w[1].id.as_str()));

    let first = store.list_namespaces(None, &page(3, None)).await.unwrap();
    assert_eq!(first.items.len(), 3);
    let second = store
        .list_namespaces(None, &page(3, first.next.clone()))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.next, None);
    // Sizes are clamped: 0 means one item.
    assert_eq!(
        store
            .list_namespaces(None, &page(0, None))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // Only the named namespaces, filtered before the page is cut: full
    // pages, and each token the id of a namespace the page showed.
    let named = ["b".to_string(), "d".to_string(), "ghost".to_string()];
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let listed = store
            .list_namespaces(Some(&named), &page(1, after))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1, "{listed:?}");
        seen.push(listed.items[0].name.clone());
        match listed.next {
            Some(next) => {
                assert_eq!(next, listed.items[0].id);
                after = Some(next);
            }
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["b", "d"]);
    let none = store.list_namespaces(Some(&[]), &page(10, None)).await;
    assert_eq!(none.unwrap().items.len(), 0);
}

async fn audit_pagination_newest_first(store: Arc<dyn KeyStore>) {
    let store = &*store;
    for name in ["n1", "n2", "n3", "n4", "n5"] {
        store.create_namespace(&actor(), name, "").await.unwrap();
    }
    let mut names = Vec::new();
    let mut after = None;
    loop {
        let p = store.list_audit(&page(2, after.clone())).await.unwrap();
        names.extend(
            p.items
                .iter()
                .map(|e| e.detail["name"].as_str().unwrap_or_default().to_string()),
        );
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(names, ["n5", "n4", "n3", "n2", "n1"]);
}

async fn lifetime_policy(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "life@example.com").await;
    let tokens = TokenFormat::new("kg");
    let settings = store.settings().await.unwrap();
    assert_eq!(settings.max_key_lifetime, store::DEFAULT_MAX_KEY_LIFETIME);
    let create = |expiry: Option<SystemTime>| {
        let (mut new, _) = new_key(&owner, &tokens);
        new.expiry = expiry;
        async move { store.create_key(&actor(), new).await }
    };
    let policy = |r: Result<ApiKey, StoreError>| match r {
        Err(StoreError::Policy(p)) => p,
        other => panic!("expected a policy violation, got {other:?}"),
    };
    assert_eq!(
        policy(create(None).await),
        PolicyViolation::ExpiryRequired { max_days: 90 }
    );
    assert_eq!(
        policy(create(Some(SystemTime::now() - Duration::from_secs(1))).await),
        PolicyViolation::ExpiryInPast
    );
    assert_eq!(
        policy(create(Some(SystemTime::now() + Duration::from_secs(91 * 86_400))).await),
        PolicyViolation::LifetimeTooLong { max_days: 90 }
    );
    create(Some(SystemTime::now() + Duration::from_secs(89 * 86_400)))
        .await
        .expect("within the lifetime");
    // maxKeyLifetime 0: keys may never expire.
    store
        .update_settings(&actor(), true, Duration::ZERO, 10, None)
        .await
        .unwrap();
    let forever = create(None).await.expect("never expiring");
    assert_eq!(forever.expiry, None);
    store
        .update_settings(&actor(), true, Duration::from_secs(86_400), 10, None)
        .await
        .unwrap();
    assert_eq!(
        policy(create(Some(SystemTime::now() + Duration::from_secs(3 * 86_400))).await),
        PolicyViolation::LifetimeTooLong { max_days: 1 }
    );
}

async fn owner_and_namespace_must_exist(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "o@example.com").await;
    let tokens = TokenFormat::new("kg");
    let (mut new, _) = new_key(&owner, &tokens);
    new.owner_id = "nobody".into();
    let err = store.create_key(&actor(), new).await.expect_err("no owner");
    assert!(
        matches!(&err, StoreError::Policy(PolicyViolation::UnknownOwner { owner_id, owner_type: OwnerType::User }) if owner_id == "nobody"),
        "{err:?}"
    );
    // The right id with the wrong type is unknown too.
    let (mut new, _) = new_key(&owner, &tokens);
    new.owner_type = OwnerType::ServiceAccount;
    let err = store
        .create_key(&actor(), new)
        .await
        .expect_err("wrong type");
    assert!(
        matches!(
            err,
            StoreError::Policy(PolicyViolation::UnknownOwner { .. })
        ),
        "{err:?}"
    );
    let (mut new, _) = new_key(&owner, &tokens);
    new.namespaces = vec!["ghost".into()];
    let err = store
        .create_key(&actor(), new)
        .await
        .expect_err("no namespace");
    assert!(
        matches!(&err, StoreError::Policy(PolicyViolation::UnknownNamespace(n)) if n == "ghost"),
        "{err:?}"
    );
    let err = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec(
                "p@example.com",
                AccountRole::Read,
                &[("ghost", Permission::Read)],
            ),
        )
        .await
        .expect_err("no namespace");
    assert!(
        matches!(
            err,
            StoreError::Policy(PolicyViolation::UnknownNamespace(_))
        ),
        "{err:?}"
    );
    // Nothing refused was written.
    let all = store
        .list_keys(&KeyFilter::default(), &page(100, None))
        .await
        .unwrap();
    assert!(all.items.is_empty());
    assert_eq!(store.count_principals(OwnerType::User).await.unwrap(), 1);
}

async fn cap_holds_under_50_concurrent_creates(store: Arc<dyn KeyStore>) {
    let owner = user(&*store, "cap@example.com").await;
    let other = user(&*store, "other@example.com").await;
    store
        .update_settings(&actor(), true, store::DEFAULT_MAX_KEY_LIFETIME, 5, None)
        .await
        .unwrap();
    key(&*store, &other).await;
    let tokens = TokenFormat::new("kg");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            let (new, _) = new_key(&owner, &tokens);
            tokio::spawn(async move { store.create_key(&actor(), new).await })
        })
        .collect();
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => created += 1,
            Err(StoreError::Policy(PolicyViolation::TooManyKeys { owner_id, max: 5 }))
                if owner_id == owner.id =>
            {
                refused += 1
            }
            Err(other) => panic!("unexpected error: {other:?}"),
        }
    }
    assert_eq!((created, refused), (5, 45));
    let listed = store
        .list_keys(
            &KeyFilter {
                owner_id: Some(owner.id.clone()),
                owner_type: None,
            },
            &page(100, None),
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 5);
    // Other owners have caps of their own.
    key(&*store, &other).await;
}

async fn owner_deletion_cascades_to_keys(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "gone@example.com").await;
    let keeper = user(store, "stays@example.com").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(key(store, &owner).await.0.id);
    }
    let (kept, _) = key(store, &keeper).await;
    let mut deleted = store
        .delete_principal(&actor(), OwnerType::User, &owner.id)
        .await
        .unwrap();
    deleted.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(deleted, ids);
    for id in &ids {
        assert!(store.find_key(id).await.unwrap().is_none());
    }
    assert!(store.find_key(&kept.id).await.unwrap().is_some());
    let audit = store.list_audit(&page(1, None)).await.unwrap();
    let event = &audit.items[0];
    assert_eq!(event.action, "user.delete");
    assert_eq!(
        event.detail["deletedKeys"].as_array().map(Vec::len),
        Some(3)
    );
}

fn is_last_admin(result: &StoreError, name: &str) -> bool {
    matches!(result, StoreError::Policy(PolicyViolation::LastAdmin { name: n }) if n == name)
}

/// The account always keeps an enabled admin: demoting, disabling or
/// deleting the last one is refused and changes nothing (its keys stay); a
/// disabled admin does not count; with another enabled admin each works.
async fn the_last_enabled_admin_stays(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let root = store
        .create_principal(
            &actor(),
            OwnerType::User,
            spec("root@example.com", AccountRole::Admin, &[]),
        )
        .await
        .unwrap();
    let (root_key, _) = key(store, &root).await;
    let demoted = spec("root@example.com", AccountRole::Developer, &[]);
    let mut disabled = spec("root@example.com", AccountRole::Admin, &[]);
    disabled.disabled = true;
    for change in [demoted.clone(), disabled] {
        let refused = store
            .update_principal(&actor(), OwnerType::User, &root.id, change, Some(1))
            .await
            .expect_err("the last admin demoted or disabled");
        assert!(is_last_admin(&refused, "root@example.com"), "{refused:?}");
        assert!(refused.to_string().contains("last enabled account admin"));
    }
    let refused = store
        .delete_principal(&actor(), OwnerType::User, &root.id)
        .await
        .expect_err("the last admin deleted");
    assert!(is_last_admin(&refused, "root@example.com"), "{refused:?}");
    // Nothing of the refused changes is left: same version, same key.
    let kept = store
        .get_principal(OwnerType::User, &root.id)
        .await
        .unwrap();
    assert_eq!(kept, Some(root.clone()));
    assert!(store.find_key(&root_key.id).await.unwrap().is_some());
    let audit = store.list_audit(&page(1, None)).await.unwrap();
    assert_eq!(
        audit.items[0].action, "api-key.create",
        "no refused change audited"
    );

    // A disabled admin service account does not count.
    let mut robot_spec = spec("robot", AccountRole::Admin, &[]);
    robot_spec.disabled = true;
    let robot = store
        .create_principal(&actor(), OwnerType::ServiceAccount, robot_spec.clone())
        .await
        .unwrap();
    let refused = store
        .delete_principal(&actor(), OwnerType::User, &root.id)
        .await
        .expect_err("the only enabled admin deleted");
    assert!(is_last_admin(&refused, "root@example.com"), "{refused:?}");

    // Enabled, it does: root may go, and then the robot is the last one.
    robot_spec.disabled = false;
    store
        .update_principal(
            &actor(),
            OwnerType::ServiceAccount,
            &robot.id,
            robot_spec,
            Some(1),
        )
        .await
        .expect("enable the robot");
    let (_, keys) = store
        .update_principal(&actor(), OwnerType::User, &root.id, demoted, Some(1))
        .await
        .expect("demote root: the robot is an admin");
    assert_eq!(keys, vec![root_key.id]);
    store
        .delete_principal(&actor(), OwnerType::User, &root.id)
        .await
        .expect("delete root: not an admin any more");
    let refused = store
        .delete_principal(&actor(), OwnerType::ServiceAccount, &robot.id)
        .await
        .expect_err("the robot is the last admin now");
    assert!(is_last_admin(&refused, "robot"), "{refused:?}");
    // A principal that is not an admin is changed and deleted freely.
    let dev = user(store, "dev@example.com").await;
    store
        .delete_principal(&actor(), OwnerType::User, &dev.id)
        .await
        .expect("delete a developer");
}

/// Two admins deleted at once: each delete alone leaves the other admin,
/// so only serialising them keeps one. Exactly one wins, every round.
async fn concurrent_deletes_of_two_admins_leave_one(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let admin = |name: String| async move {
        store
            .create_principal(
                &actor(),
                OwnerType::User,
                spec(&name, AccountRole::Admin, &[]),
            )
            .await
            .unwrap()
    };
    let mut survivor = admin("admin0@example.com".into()).await;
    for round in 1..=10 {
        let newcomer = admin(format!("admin{round}@example.com")).await;
        let actor = actor();
        let (old, new) = tokio::join!(
            store.delete_principal(&actor, OwnerType::User, &survivor.id),
            store.delete_principal(&actor, OwnerType::User, &newcomer.id),
        );
        let refused = match (old, new) {
            // The old survivor went: the newcomer is the one admin now.
            (Ok(_), Err(refused)) => {
                survivor = newcomer;
                refused
            }
            // The newcomer went: the survivor stays.
            (Err(refused), Ok(_)) => refused,
            other => panic!("round {round}: exactly one delete must win: {other:?}"),
        };
        assert!(
            matches!(
                refused,
                StoreError::Policy(PolicyViolation::LastAdmin { .. })
            ),
            "{refused:?}"
        );
        let kept = store.get_principal(OwnerType::User, &survivor.id).await;
        assert!(kept.unwrap().is_some_and(|p| p.is_enabled_admin()));
    }
}

async fn owner_update_reports_its_keys(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "keys@example.com").await;
    let (a, _) = key(store, &owner).await;
    let (b, _) = key(store, &owner).await;
    let (_, mut keys) = store
        .update_principal(
            &actor(),
            OwnerType::User,
            &owner.id,
            spec("keys@example.com", AccountRole::Read, &[]),
            None,
        )
        .await
        .unwrap();
    keys.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    let mut expected = vec![a.id, b.id];
    expected.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(keys, expected);
    let record = store.find_key(&a.id).await.unwrap().unwrap();
    assert_eq!(record.owner_access.account_role, AccountRole::Read);
}

async fn rotation_keeps_previous_digest_until_grace(store: Arc<dyn KeyStore>) {
    let owner = user(&*store, "rot@example.com").await;
    let tokens = TokenFormat::new("kg");
    let (created, old_token) = key(&*store, &owner).await;
    let old_digest = store.find_key(&created.id).await.unwrap().unwrap().digest;
    let (new_token, new_digest) = tokens.issue_secret(&created.id);
    let grace = SystemTime::now() + Duration::from_secs(3600);
    let rotated = store
        .rotate_key(&actor(), &created.id, new_digest, grace)
        .await
        .unwrap();
    assert_eq!(rotated.resource_version, 2);
    assert_eq!(
        rotated.previous_secret_valid_until.map(store::to_ms),
        Some(store::to_ms(grace))
    );
    let record = store.find_key(&created.id).await.unwrap().unwrap();
    assert_eq!(record.digest.as_bytes(), new_digest.as_bytes());
    let (previous, until) = record.previous.expect("previous digest kept");
    assert_eq!(previous.as_bytes(), old_digest.as_bytes());
    assert_eq!(store::to_ms(until), store::to_ms(grace));

    // Through the real authenticator: the old secret works until the grace
    // deadline and not after; the new one works throughout.
    let auth = Authenticator::new(
        store.clone(),
        CacheSettings {
            capacity: 100,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(1),
            stale_if_error: Duration::from_secs(60),
        },
        Arc::new(Metrics::new(10)),
    );
    let old = tokens.parse(old_token.as_bytes()).unwrap();
    let new = tokens.parse(new_token.expose().as_bytes()).unwrap();
    let before = grace - Duration::from_secs(1);
    let after = grace + Duration::from_secs(1);
    assert!(auth.verify(&old, before).await.is_ok());
    assert!(auth.verify(&new, before).await.is_ok());
    assert_eq!(
        auth.verify(&old, after).await.err(),
        Some(AuthError::Invalid)
    );
    assert!(auth.verify(&new, after).await.is_ok());

    // A second rotation replaces the previous digest with the current one.
    let (_, third) = tokens.issue_secret(&created.id);
    store
        .rotate_key(&actor(), &created.id, third, grace)
        .await
        .unwrap();
    let record = store.find_key(&created.id).await.unwrap().unwrap();
    assert_eq!(
        record.previous.map(|(d, _)| *d.as_bytes()),
        Some(*new_digest.as_bytes())
    );
}

/// The authenticator's sweep drops an unknown id once past `negative_ttl`
/// and a key once past `ttl + stale_if_error`, and nothing sooner: without
/// it every id ever presented stayed cached (examples/soak.rs measured it).
async fn cache_sweep_drops_only_what_nothing_can_use(store: Arc<dyn KeyStore>) {
    let owner = user(&*store, "sweep@example.com").await;
    let (_, token) = key(&*store, &owner).await;
    let tokens = TokenFormat::new("kg");
    let known = tokens.parse(token.as_bytes()).unwrap();
    let (_, unknown_token, _) = tokens.generate();
    let unknown = tokens.parse(unknown_token.expose().as_bytes()).unwrap();
    let now = SystemTime::now();
    // Both entries are past their ttl at once; only the key may still
    // answer while the store is down, and only with a grace to do it in.
    for (stale_if_error, kept) in [(Duration::from_secs(3600), 1), (Duration::ZERO, 0)] {
        let auth = Authenticator::new(
            store.clone(),
            CacheSettings {
                capacity: 100,
                ttl: Duration::ZERO,
                negative_ttl: Duration::ZERO,
                stale_if_error,
            },
            Arc::new(Metrics::new(10)),
        );
        assert!(auth.verify(&known, now).await.is_ok());
        assert_eq!(
            auth.verify(&unknown, now).await.err(),
            Some(AuthError::Invalid)
        );
        assert_eq!(auth.cached_keys(), 2);
        auth.evict_expired();
        assert_eq!(
            auth.cached_keys(),
            kept,
            "stale_if_error {stale_if_error:?}"
        );
    }
}

async fn usage_is_recorded(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "use@example.com").await;
    let (a, _) = key(store, &owner).await;
    let (b, _) = key(store, &owner).await;
    let t1 = SystemTime::now();
    let t2 = t1 + Duration::from_secs(5);
    let mut flush = FlushId::first_of_new_stream();
    let mut next = || {
        let this = flush.clone();
        flush = flush.next();
        this
    };
    store
        .record_usage(
            &next(),
            &[
                UsageDelta {
                    id: a.id,
                    requests: 3,
                    last_used: t2,
                },
                UsageDelta {
                    id: b.id,
                    requests: 1,
                    last_used: t1,
                },
            ],
        )
        .await
        .unwrap();
    // An older timestamp never moves last_used back; counts add up.
    store
        .record_usage(
            &next(),
            &[UsageDelta {
                id: a.id,
                requests: 4,
                last_used: t1,
            }],
        )
        .await
        .unwrap();
    store.record_usage(&next(), &[]).await.unwrap();
    // Usage of a deleted key is dropped, not an error.
    store
        .record_usage(
            &next(),
            &[UsageDelta {
                id: KeyId::generate(),
                requests: 1,
                last_used: t1,
            }],
        )
        .await
        .unwrap();
    let a = store.get_key(&a.id).await.unwrap().unwrap();
    let b = store.get_key(&b.id).await.unwrap().unwrap();
    assert_eq!(a.request_count, 7);
    assert_eq!(a.last_used.map(store::to_ms), Some(store::to_ms(t2)));
    assert_eq!(b.request_count, 1);
    assert_eq!(b.last_used.map(store::to_ms), Some(store::to_ms(t1)));
    // Usage is not a change: it alters nothing a cache holds... but it must
    // not bump resourceVersion either, or every client update would 409.
    assert_eq!(a.resource_version, 1);

    // A flush of many keys (more than one statement's worth), the two real
    // ones far apart among ids that do not exist.
    let mut many: Vec<UsageDelta> = (0..650)
        .map(|_| UsageDelta {
            id: KeyId::generate(),
            requests: 1,
            last_used: t1,
        })
        .collect();
    many[10].id = a.id;
    many[640].id = b.id;
    many[640].requests = 5;
    store.record_usage(&next(), &many).await.unwrap();
    let a = store.get_key(&a.id).await.unwrap().unwrap();
    let b = store.get_key(&b.id).await.unwrap().unwrap();
    assert_eq!(a.request_count, 8);
    assert_eq!(b.request_count, 6);
    assert_eq!(b.last_used.map(store::to_ms), Some(store::to_ms(t1)));
}

/// A flush sent again because its answer was lost (its first attempt
/// committed) is applied once: the store knows each stream's latest flush.
/// A later flush of the stream counts, an earlier one sent late does not,
/// and another stream's flush of the same number counts (its own stream).
async fn a_flush_sent_again_counts_once(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "again@example.com").await;
    let (a, _) = key(store, &owner).await;
    let (b, _) = key(store, &owner).await;
    let t1 = SystemTime::now();
    let t2 = t1 + Duration::from_secs(5);
    let delta = |id: KeyId, requests: u64, last_used: SystemTime| UsageDelta {
        id,
        requests,
        last_used,
    };
    let count = |id: KeyId| async move { store.get_key(&id).await.unwrap().unwrap().request_count };

    let first = FlushId::first_of_new_stream();
    let batch = [delta(a.id, 3, t1), delta(b.id, 1, t1)];
    assert_eq!(
        store.record_usage(&first, &batch).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(
        store.record_usage(&first, &batch).await.unwrap(),
        Recorded::AlreadyApplied
    );
    assert_eq!((count(a.id).await, count(b.id).await), (3, 1));

    let second = first.next();
    let later = [delta(a.id, 2, t2)];
    assert_eq!(
        store.record_usage(&second, &later).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(count(a.id).await, 5);
    // The first flush arriving late, after the second: still once.
    assert_eq!(
        store.record_usage(&first, &batch).await.unwrap(),
        Recorded::AlreadyApplied
    );
    assert_eq!(
        store.record_usage(&second, &later).await.unwrap(),
        Recorded::AlreadyApplied
    );
    assert_eq!((count(a.id).await, count(b.id).await), (5, 1));
    let a_now = store.get_key(&a.id).await.unwrap().unwrap();
    assert_eq!(a_now.last_used.map(store::to_ms), Some(store::to_ms(t2)));

    // Another process's stream, at the same number: its own counts.
    let other = FlushId {
        stream: "another-process".to_string(),
        sequence: first.sequence,
    };
    assert_eq!(
        store.record_usage(&other, &batch).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!((count(a.id).await, count(b.id).await), (8, 2));
    // Numbers may skip (a flush given up): a higher one counts.
    let skipped = FlushId {
        sequence: second.sequence + 5,
        ..second.clone()
    };
    assert_eq!(
        store.record_usage(&skipped, &later).await.unwrap(),
        Recorded::Applied
    );
    assert_eq!(count(a.id).await, 10);
}

/// Two attempts of one flush in flight at once (the first not yet given
/// up by the server when the second comes): one applies, the other finds
/// it applied (on PostgreSQL it waits for the first's transaction).
async fn concurrent_sends_of_one_flush_count_once(store: Arc<dyn KeyStore>) {
    let owner = user(&*store, "twice@example.com").await;
    let (a, _) = key(&*store, &owner).await;
    let flush = FlushId::first_of_new_stream();
    let batch = [UsageDelta {
        id: a.id,
        requests: 3,
        last_used: SystemTime::now(),
    }];
    let sends = (0..4).map(|_| {
        let (store, flush) = (store.clone(), flush.clone());
        tokio::spawn(async move { store.record_usage(&flush, &batch).await })
    });
    let mut applied = 0;
    for send in futures_util::future::join_all(sends).await {
        if send.unwrap().expect("a send failed") == Recorded::Applied {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    let a = store.get_key(&a.id).await.unwrap().unwrap();
    assert_eq!(a.request_count, 3);
}

/// Replicas flush usage of the same hot keys at the same time: no flush
/// fails (no deadlock between them) and every count lands.
async fn concurrent_usage_flushes_add_up(store: Arc<dyn KeyStore>) {
    let mut ids = Vec::new();
    for owner in ["flush1@example.com", "flush2@example.com"] {
        let owner = user(&*store, owner).await;
        for _ in 0..10 {
            ids.push(key(&*store, &owner).await.0.id);
        }
    }
    let now = SystemTime::now();
    let batch = |reverse: bool| {
        let mut deltas: Vec<UsageDelta> = ids
            .iter()
            .map(|id| UsageDelta {
                id: *id,
                requests: 1,
                last_used: now,
            })
            .collect();
        if reverse {
            deltas.reverse();
        }
        deltas
    };
    let flushes = (0..8).map(|i| {
        let store = store.clone();
        let deltas = batch(i % 2 == 1);
        // One flush stream per replica.
        let flush = FlushId::first_of_new_stream();
        tokio::spawn(async move { store.record_usage(&flush, &deltas).await })
    });
    for flush in futures_util::future::join_all(flushes).await {
        flush.unwrap().expect("a concurrent flush failed");
    }
    for id in &ids {
        let key = store.get_key(id).await.unwrap().unwrap();
        assert_eq!(key.request_count, 8);
    }
}

async fn existing_keys_are_told_from_deleted_and_unknown_ones(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let owner = user(store, "exists@example.com").await;
    let (kept, _) = key(store, &owner).await;
    let (deleted, _) = key(store, &owner).await;
    store
        .delete_key(&Actor::system("test"), &deleted.id)
        .await
        .unwrap();
    // More ids than one statement binds, the two real ones among them.
    let mut ids: Vec<KeyId> = (0..700).map(|_| KeyId::generate()).collect();
    ids[5] = kept.id;
    ids[650] = deleted.id;
    let existing = store.existing_keys(&ids).await.unwrap();
    assert_eq!(existing, vec![kept.id]);
    assert!(store.existing_keys(&[]).await.unwrap().is_empty());
}

async fn every_change_is_audited_and_no_digest_appears(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let tokens = TokenFormat::new("kg");
    let ns = store.create_namespace(&actor(), "ns", "").await.unwrap();
    store
        .update_namespace(&actor(), &ns.id, "d", None)
        .await
        .unwrap();
    let owner = user(store, "aud@example.com").await;
    let sa = store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("svc", AccountRole::Read, &[]),
        )
        .await
        .unwrap();
    let (new, token) = new_key(&owner, &tokens);
    let id = new.id;
    let mut digests = vec![new.digest];
    store.create_key(&actor(), new).await.unwrap();
    let disable = KeyUpdate {
        disabled: Some(true),
        ..KeyUpdate::default()
    };
    store
        .update_key(&actor(), &id, disable, None)
        .await
        .unwrap();
    let enable = KeyUpdate {
        disabled: Some(false),
        ..KeyUpdate::default()
    };
    store.update_key(&actor(), &id, enable, None).await.unwrap();
    let rename = KeyUpdate {
        display_name: Some("r".into()),
        ..KeyUpdate::default()
    };
    store.update_key(&actor(), &id, rename, None).await.unwrap();
    let (new_token, new_digest) = tokens.issue_secret(&id);
    digests.push(new_digest);
    store
        .rotate_key(&actor(), &id, new_digest, SystemTime::now())
        .await
        .unwrap();
    store.delete_key(&actor(), &id).await.unwrap();
    store
        .update_principal(
            &actor(),
            OwnerType::User,
            &owner.id,
            spec("aud@example.com", AccountRole::Read, &[]),
            None,
        )
        .await
        .unwrap();
    store
        .delete_principal(&actor(), OwnerType::ServiceAccount, &sa.id)
        .await
        .unwrap();
    store
        .update_settings(&actor(), false, Duration::ZERO, 3, None)
        .await
        .unwrap();
    store.delete_namespace(&actor(), &ns.id).await.unwrap();
    // A refused change writes no event.
    let _ = store.delete_key(&actor(), &id).await;

    let events = store.list_audit(&page(100, None)).await.unwrap().items;
    let actions: Vec<&str> = events.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "namespace.create",
            "namespace.update",
            "user.create",
            "service-account.create",
            "api-key.create",
            "api-key.disable",
            "api-key.enable",
            "api-key.update",
            "api-key.rotate",
            "api-key.delete",
            "user.update",
            "service-account.delete",
            "account.settings.update",
            "namespace.delete",
        ]
    );
    let key_events: Vec<_> = events
        .iter()
        .filter(|e| e.target_type == "api-key")
        .collect();
    assert!(key_events.iter().all(|e| e.target_id == id.as_str()));
    for e in &events {
        assert_eq!(e.actor_id, "u-actor");
        assert_eq!(e.actor_type, "user");
        assert_eq!(e.actor_name, "actor@example.com");
        assert!(!e.id.is_empty());
        assert!(e.time <= SystemTime::now());
    }
    // Neither a secret nor a digest, in any common encoding, anywhere.
    let text = format!("{events:?}");
    let secrets = [token.as_str(), new_token.expose()];
    for secret in secrets {
        let secret_part = &secret[secret.len() - 38..];
        assert!(!text.contains(secret_part), "a secret is in the audit log");
    }
    for digest in digests {
        let bytes = digest.as_bytes();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let array = format!("{:?}", &bytes[..8]);
        let upper = hex.to_uppercase();
        for form in [&hex[..], &upper[..], &b64[..20], &b64url[..20], &array[..]] {
            assert!(!text.contains(form), "a digest is in the audit log");
        }
    }
}

async fn change_feed_lists_every_key_affecting_change(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let tokens = TokenFormat::new("kg");
    let (start, none) = store.changes_since(0).await.unwrap();
    assert_eq!((start, none.len()), (0, 0), "a fresh store has no changes");
    let before_any = SystemTime::now() - Duration::from_secs(1);

    // Not key-affecting: namespaces, creating principals, usage.
    let ns = store.create_namespace(&actor(), "ns", "").await.unwrap();
    let owner = user(store, "feed@example.com").await;
    let sa = store
        .create_principal(
            &actor(),
            OwnerType::ServiceAccount,
            spec("svc", AccountRole::Read, &[]),
        )
        .await
        .unwrap();
    assert_eq!(head(store).await, 0);

    let (a, _) = key(store, &owner).await; // 1
    let (b, _) = key(store, &owner).await; // 2
    let (c, _) = key(store, &sa).await; // 3
    store
        .record_usage(
            &FlushId::first_of_new_stream(),
            &[UsageDelta {
                id: a.id,
                requests: 1,
                last_used: SystemTime::now(),
            }],
        )
        .await
        .unwrap();
    store
        .update_namespace(&actor(), &ns.id, "x", None)
        .await
        .unwrap();
    let off = KeyUpdate {
        disabled: Some(true),
        ..KeyUpdate::default()
    };
    store.update_key(&actor(), &a.id, off, None).await.unwrap(); // 4
    let (_, digest) = tokens.issue_secret(&b.id);
    store
        .rotate_key(&actor(), &b.id, digest, SystemTime::now())
        .await
        .unwrap(); // 5
    store.delete_key(&actor(), &a.id).await.unwrap(); // 6
    store
        .update_principal(
            &actor(),
            OwnerType::User,
            &owner.id,
            spec("feed@example.com", AccountRole::Read, &[]),
            None,
        )
        .await
        .unwrap(); // 7: b (a is gone)
    store
        .update_settings(&actor(), false, store::DEFAULT_MAX_KEY_LIFETIME, 10, None)
        .await
        .unwrap(); // 8
    store
        .delete_principal(&actor(), OwnerType::ServiceAccount, &sa.id)
        .await
        .unwrap(); // 9: c
                   // A refused change is not a change.
    let _ = store
        .update_key(&actor(), &b.id, KeyUpdate::default(), Some(99))
        .await
        .expect_err("stale");
    store.delete_namespace(&actor(), &ns.id).await.unwrap();

    let (watermark, changes) = store.changes_since(0).await.unwrap();
    assert_eq!(watermark, 9);
    let seqs: Vec<i64> = changes.iter().map(|c| c.seq).collect();
    assert_eq!(
        seqs,
        (1..=9).collect::<Vec<_>>(),
        "gapless, in commit order"
    );
    let ids: Vec<Vec<KeyId>> = changes.iter().map(|c| c.key_ids.clone()).collect();
    assert_eq!(
        ids,
        vec![
            vec![a.id],
            vec![b.id],
            vec![c.id],
            vec![a.id],
            vec![b.id],
            vec![a.id],
            vec![b.id],
            vec![],
            vec![c.id],
        ]
    );
    let settings: Vec<bool> = changes.iter().map(|c| c.settings).collect();
    assert_eq!(
        settings,
        [false, false, false, false, false, false, false, true, false]
    );
    // Creations say so (a replica then drops only an unknown-id note),
    // and every other change does not (a replica drops its copies).
    let created: Vec<bool> = changes.iter().map(|c| c.created).collect();
    assert_eq!(
        created,
        [true, true, true, false, false, false, false, false, false]
    );
    let now = SystemTime::now();
    assert!(changes
        .iter()
        .all(|c| c.time >= before_any && c.time <= now));
    assert!(changes.windows(2).all(|w| w[0].time <= w[1].time));

    // From a watermark: only what is newer; at the head: nothing, and the
    // head back; far ahead (a replaced store): the real head, lower.
    let (w, tail) = store.changes_since(7).await.unwrap();
    assert_eq!(
        (w, tail.iter().map(|c| c.seq).collect::<Vec<_>>()),
        (9, vec![8, 9])
    );
    assert_eq!(store.changes_since(9).await.unwrap(), (9, vec![]));
    assert_eq!(store.changes_since(i64::MAX).await.unwrap(), (9, vec![]));
    assert_eq!(store.changes_since(500).await.unwrap(), (9, vec![]));
}

async fn settings_round_trip(store: Arc<dyn KeyStore>) {
    let store = &*store;
    let s = store.settings().await.unwrap();
    assert!(s.api_keys_enabled);
    assert_eq!(s.max_key_lifetime, store::DEFAULT_MAX_KEY_LIFETIME);
    assert_eq!(s.max_keys_per_owner, store::DEFAULT_MAX_KEYS_PER_OWNER);
    assert_eq!(s.resource_version, 1);
    let updated = store
        .update_settings(&actor(), false, Duration::from_secs(7 * 86_400), 3, Some(1))
        .await
        .unwrap();
    assert!(!updated.api_keys_enabled);
    assert_eq!(updated.max_key_lifetime, Duration::from_secs(7 * 86_400));
    assert_eq!(updated.max_keys_per_owner, 3);
    assert_eq!(updated.resource_version, 2);
    assert_eq!(store.settings().await.unwrap(), updated);
    assert!(store.ping().await.is_ok());
}

/// An import larger than one INSERT (1,000 rows): every key lands, with its
/// digest, owner and state; one already there, even in the last batch,
/// refuses the whole import; so does an owner's cap.
async fn imports_span_batches_all_or_nothing(store: Arc<dyn KeyStore>) {
    let a = user(&*store, "import-a@example.com").await;
    let b = user(&*store, "import-b@example.com").await;
    store
        .update_settings(
            &actor(),
            true,
            store::DEFAULT_MAX_KEY_LIFETIME,
            10_000,
            None,
        )
        .await
        .unwrap();
    let tokens = TokenFormat::new("kg");
    let batch = |n: usize, owner: &Principal| -> Vec<NewKey> {
        (0..n).map(|_| new_key(owner, &tokens).0).collect()
    };
    let mut keys = batch(1_300, &a);
    keys.extend(batch(1_200, &b));
    keys[7].disabled = true;
    keys[2_222].display_name = "named in the third batch".into();
    let (before, _) = store.changes_since(i64::MAX).await.unwrap();
    assert_eq!(store.import_keys(&actor(), &keys).await.unwrap(), 2_500);

    let ids: Vec<KeyId> = keys.iter().map(|k| k.id).collect();
    // Announced as creations, every id once, in changes of a batch each.
    let (_, changes) = store.changes_since(before).await.unwrap();
    assert_eq!(changes.len(), 3);
    assert!(changes.iter().all(|c| c.created && !c.settings));
    let announced: Vec<KeyId> = changes.iter().flat_map(|c| c.key_ids.clone()).collect();
    assert_eq!(announced, ids);
    assert_eq!(store.existing_keys(&ids).await.unwrap().len(), 2_500);
    for i in [0, 7, 999, 1_000, 1_299, 1_300, 1_999, 2_000, 2_222, 2_499] {
        let record = store
            .find_key(&keys[i].id)
            .await
            .unwrap()
            .expect("imported key");
        assert!(record.digest == keys[i].digest, "digest of key {i}");
        assert_eq!(record.owner_id, keys[i].owner_id, "owner of key {i}");
        assert_eq!(record.disabled, i == 7, "state of key {i}");
    }
    let named = store.get_key(&keys[2_222].id).await.unwrap().unwrap();
    assert_eq!(named.display_name, "named in the third batch");
    let audit = store.list_audit(&page(10, None)).await.unwrap().items;
    let imported: BTreeMap<String, serde_json::Value> = audit
        .iter()
        .filter(|e| e.action == "api-key.import")
        .map(|e| (e.target_id.clone(), e.detail["imported"].clone()))
        .collect();
    assert_eq!(imported.get(&a.id), Some(&serde_json::json!(1_300)));
    assert_eq!(imported.get(&b.id), Some(&serde_json::json!(1_200)));

    // A key imported before, last in an import whose first batch is fine.
    let mut again = batch(1_500, &b);
    again.push(keys[5].clone());
    let refused = store.import_keys(&actor(), &again).await.unwrap_err();
    assert!(
        matches!(
            refused,
            StoreError::AlreadyExists {
                kind: "API key",
                ..
            }
        ),
        "{refused:?}"
    );
    let fresh: Vec<KeyId> = again[..1_500].iter().map(|k| k.id).collect();
    assert!(store.existing_keys(&fresh).await.unwrap().is_empty());

    // Over the cap for one owner: nothing is imported for either.
    store
        .update_settings(&actor(), true, store::DEFAULT_MAX_KEY_LIFETIME, 1_400, None)
        .await
        .unwrap();
    let mut over = batch(50, &b);
    over.extend(batch(101, &a));
    let refused = store.import_keys(&actor(), &over).await.unwrap_err();
    assert!(
        matches!(&refused, StoreError::Policy(PolicyViolation::TooManyKeys { owner_id, max: 1_400 }) if *owner_id == a.id),
        "{refused:?}"
    );
    let over_ids: Vec<KeyId> = over.iter().map(|k| k.id).collect();
    assert!(store.existing_keys(&over_ids).await.unwrap().is_empty());
}

/// Bootstrap counts the users and writes the admin and its key in one
/// transaction: of bootstraps run at once, one makes an admin and the
/// others are refused. Before, each counted the users on its own and then
/// wrote, so all of them could make an admin.
async fn concurrent_bootstraps_make_one_admin(store: Arc<dyn KeyStore>) {
    use keygate::admin::bootstrap::{bootstrap, BootstrapError};
    let tokens = TokenFormat::new("kg");
    let runs = (0..8).map(|i| {
        let (store, tokens) = (store.clone(), tokens.clone());
        tokio::spawn(async move {
            let email = format!("admin{i}@example.com");
            bootstrap(&*store, &tokens, &email, Some(Duration::from_secs(3600))).await
        })
    });
    let mut made = Vec::new();
    for run in runs.collect::<Vec<_>>() {
        match run.await.unwrap() {
            Ok((admin, key, _)) => made.push((admin, key)),
            Err(BootstrapError::UsersExist(_)) => {}
            Err(e) => panic!("bootstrap failed otherwise: {e}"),
        }
    }
    assert_eq!(
        made.len(),
        1,
        "admins made: {:?}",
        made.iter().map(|(a, _)| &a.name).collect::<Vec<_>>()
    );
    assert_eq!(store.count_principals(OwnerType::User).await.unwrap(), 1);
    let (admin, key) = &made[0];
    assert_eq!(key.owner_id, admin.id);
    assert_eq!(admin.access.account_role, AccountRole::Admin);
}

/// A bootstrap whose key the store refuses writes no admin either (a
/// keyless admin would refuse every later bootstrap).
async fn a_refused_bootstrap_leaves_nothing(store: Arc<dyn KeyStore>) {
    use keygate::admin::bootstrap::{bootstrap, BootstrapError};
    let tokens = TokenFormat::new("kg");
    let too_long = Some(Duration::from_secs(1000 * 86_400));
    let refused = bootstrap(&*store, &tokens, "admin@example.com", too_long).await;
    assert!(
        matches!(
            refused,
            Err(BootstrapError::Store(StoreError::Policy(
                PolicyViolation::LifetimeTooLong { .. }
            )))
        ),
        "{:?}",
        refused.map(|(admin, ..)| admin.name)
    );
    assert_eq!(store.count_principals(OwnerType::User).await.unwrap(), 0);
    let audit = store
        .list_audit(&PageRequest {
            size: 100,
            after: None,
        })
        .await
        .unwrap();
    assert!(audit.items.is_empty(), "audited: {:?}", audit.items.len());
    // And the next bootstrap, within the policy, succeeds.
    bootstrap(
        &*store,
        &tokens,
        "admin@example.com",
        Some(Duration::from_secs(3600)),
    )
    .await
    .expect("bootstrap within the policy");
}

/// A disable made with admin authority over someone else's key holds: a
/// change without it may not enable the key (it may still edit it), one
/// with it may. An owner's own disable holds nothing.
async fn an_admins_disable_holds_against_the_owner(store: Arc<dyn KeyStore>) {
    let owner = user(&*store, "held@example.com").await;
    let (created, _) = key(&*store, &owner).await;
    let change = |disabled: Option<bool>, by_admin: bool| KeyUpdate {
        disabled,
        by_admin,
        description: Some(format!("{disabled:?} by admin {by_admin}")),
        ..KeyUpdate::default()
    };
    let held = store
        .update_key(&actor(), &created.id, change(Some(true), true), None)
        .await
        .unwrap();
    assert!(held.disabled && held.disabled_by_admin);
    // The owner edits, and disables again: still held.
    for update in [change(None, false), change(Some(true), false)] {
        let key = store
            .update_key(&actor(), &created.id, update, None)
            .await
            .unwrap();
        assert!(key.disabled && key.disabled_by_admin, "{key:?}");
    }
    let refused = store
        .update_key(&actor(), &created.id, change(Some(false), false), None)
        .await;
    assert!(
        matches!(refused, Err(StoreError::Policy(PolicyViolation::DisabledByAdmin(ref id))) if id == created.id.as_str()),
        "{refused:?}"
    );
    let unchanged = store.get_key(&created.id).await.unwrap().unwrap();
    assert!(unchanged.disabled && unchanged.disabled_by_admin);
    let enabled = store
        .update_key(&actor(), &created.id, change(Some(false), true), None)
        .await
        .unwrap();
    assert!(!enabled.disabled && !enabled.disabled_by_admin);
    // The owner's own disable and enable.
    for disabled in [true, false] {
        let key = store
            .update_key(&actor(), &created.id, change(Some(disabled), false), None)
            .await
            .unwrap();
        assert_eq!((key.disabled, key.disabled_by_admin), (disabled, false));
    }
}
