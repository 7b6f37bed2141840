//! The records the store keeps and returns: principals (users and service
//! accounts), namespaces, API keys, account settings and audit events.
//!
//! These are storage shapes, not the admin API's JSON: `admin` maps them to
//! the Cloud Ops resource shape.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::key::{Digest, KeyId};

/// Who owns a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnerType {
    User,
    ServiceAccount,
}

impl OwnerType {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerType::User => "user",
            OwnerType::ServiceAccount => "service-account",
        }
    }
}

impl fmt::Display for OwnerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OwnerType {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "user" => Ok(OwnerType::User),
            "service-account" | "service_account" | "serviceAccount" => {
                Ok(OwnerType::ServiceAccount)
            }
            _ => Err(()),
        }
    }
}

/// Account-wide role (`spec.access.accountAccess.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountRole {
    /// Manages everything and has every permission on every namespace.
    Admin,
    /// Manages their own keys.
    Developer,
    /// Manages their own keys; reads only.
    Read,
}

impl AccountRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountRole::Admin => "admin",
            AccountRole::Developer => "developer",
            AccountRole::Read => "read",
        }
    }
}

impl FromStr for AccountRole {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "admin" => Ok(AccountRole::Admin),
            "developer" => Ok(AccountRole::Developer),
            "read" => Ok(AccountRole::Read),
            _ => Err(()),
        }
    }
}

/// Permission on a namespace; ordered, so `Admin` covers `Write` covers `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Read,
    Write,
    Admin,
}

/// `spec.access`: the account role and the per-namespace permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub account_role: AccountRole,
    pub namespaces: BTreeMap<String, Permission>,
}

impl Access {
    /// The permission this access grants on a namespace, if any. An account
    /// admin has every permission everywhere.
    pub fn permission_on(&self, namespace: &str) -> Option<Permission> {
        if self.account_role == AccountRole::Admin {
            return Some(Permission::Admin);
        }
        self.namespaces.get(namespace).copied()
    }
}

/// A user or a service account: something that can own keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub kind: OwnerType,
    /// The email of a user, the name of a service account.
    pub name: String,
    pub description: String,
    pub access: Access,
    /// A disabled principal's keys fail authentication.
    pub disabled: bool,
    pub resource_version: i64,
    pub created: SystemTime,
    pub modified: SystemTime,
}

impl Principal {
    /// An account admin whose keys work: the account keeps at least one, or
    /// nobody could manage it any more.
    pub fn is_enabled_admin(&self) -> bool {
        self.access.account_role == AccountRole::Admin && !self.disabled
    }
}

/// The fields of a principal that a create or update sets.
#[derive(Debug, Clone)]
pub struct PrincipalSpec {
    pub name: String,
    pub description: String,
    pub access: Access,
    pub disabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub id: String,
    pub name: String,
    pub description: String,
    pub resource_version: i64,
    pub created: SystemTime,
    pub modified: SystemTime,
}

/// An API key as listed by the admin API: never its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: KeyId,
    pub display_name: String,
    pub description: String,
    pub owner_id: String,
    pub owner_type: OwnerType,
    /// Namespaces the key is limited to; empty means all of its owner's.
    pub namespaces: Vec<String>,
    pub expiry: Option<SystemTime>,
    pub disabled: bool,
    /// Disabled by an account admin other than its owner: only an admin
    /// may enable it again.
    pub disabled_by_admin: bool,
    /// Until when the secret replaced by the last rotation still works.
    pub previous_secret_valid_until: Option<SystemTime>,
    pub resource_version: i64,
    pub created: SystemTime,
    pub modified: SystemTime,
    pub last_used: Option<SystemTime>,
    pub request_count: u64,
}

/// What a create-key call stores.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub id: KeyId,
    pub digest: Digest,
    pub display_name: String,
    pub description: String,
    pub owner_id: String,
    pub owner_type: OwnerType,
    pub namespaces: Vec<String>,
    pub expiry: Option<SystemTime>,
    pub disabled: bool,
}

/// Editable fields of a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub disabled: Option<bool>,
    /// The change is made by an account admin on a key it does not own. Its
    /// disable holds the key disabled against the owner, and only such a
    /// change may enable a key so held.
    pub by_admin: bool,
}

/// Everything the proxy needs to verify and describe one key: the key, its
/// digests and its owner. What `find_key` returns and the cache keeps.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub id: KeyId,
    pub digest: Digest,
    /// The digest replaced by the last rotation, and until when it works.
    pub previous: Option<(Digest, SystemTime)>,
    pub disabled: bool,
    pub expiry: Option<SystemTime>,
    pub namespaces: Vec<String>,
    pub owner_id: String,
    pub owner_type: OwnerType,
    pub owner_name: String,
    pub owner_access: Access,
    pub owner_disabled: bool,
}

/// Account-wide key policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSettings {
    /// Account-wide switch: when off, every key fails authentication.
    pub api_keys_enabled: bool,
    /// Longest expiry a new key may have; zero means keys may never expire.
    pub max_key_lifetime: Duration,
    pub max_keys_per_owner: u32,
    pub resource_version: i64,
    pub modified: SystemTime,
}

pub const DEFAULT_MAX_KEY_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_MAX_KEYS_PER_OWNER: u32 = 10;

/// Who made a change: written to the audit log with it.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: String,
    /// `user`, `service-account` or `system` (bootstrap, local CLI).
    pub kind: String,
    pub name: String,
}

impl Actor {
    pub fn system(name: &str) -> Actor {
        Actor {
            id: "system".into(),
            kind: "system".into(),
            name: name.into(),
        }
    }
}

/// One audit log entry. `detail` never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: String,
    pub time: SystemTime,
    pub actor_id: String,
    pub actor_type: String,
    pub actor_name: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub detail: serde_json::Value,
}

/// One committed change from the change feed: what every replica must drop
/// from its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed: gapless and in commit order.
    pub seq: i64,
    /// When the change was written (the writer's clock), to measure how long
    /// it took to reach each replica.
    pub time: SystemTime,
    /// Keys whose cached copies are now stale, or, when `created`, keys
    /// that did not exist before this change.
    pub key_ids: Vec<KeyId>,
    /// The change created `key_ids` (a create, an import, a bootstrap): no
    /// replica can hold a copy older than the change, only a note that an
    /// id was unknown, so that note is all there is to drop. A copy read
    /// after the creation is current, and dropping it only made the key's
    /// first use read the store twice.
    pub created: bool,
    /// The account settings changed (the `apiKeysEnabled` switch).
    pub settings: bool,
}

/// One page request: at most `size` items after the `after` cursor.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub size: u32,
    pub after: Option<String>,
}

/// A page of results and the cursor of the next page, if there is one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Filter for listing keys.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub owner_id: Option<String>,
    pub owner_type: Option<OwnerType>,
}

/// Usage counted by the proxy for one key since the last flush.
#[derive(Debug, Clone, Copy)]
pub struct UsageDelta {
    pub id: KeyId,
    pub requests: u64,
    pub last_used: SystemTime,
}

/// Names one usage flush, so that the store applies it once however often
/// it is sent: `sequence` numbers the flushes of one `stream` (one keygate
/// process) from 1 up, and the store keeps the highest one it applied per
/// stream. A flush sent again because its first answer was lost finds its
/// sequence applied and writes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushId {
    /// Random per process (an 80-bit id), so that no two processes share
    /// one and a restarted process does not find its old numbers applied.
    pub stream: String,
    /// Increases with every new batch of the stream; a batch sent again
    /// keeps its number.
    pub sequence: u64,
}

impl FlushId {
    /// The first flush of a new, random stream.
    pub fn first_of_new_stream() -> FlushId {
        FlushId {
            stream: crate::key::random_id(),
            sequence: 1,
        }
    }

    /// The stream's flush after this one.
    pub fn next(&self) -> FlushId {
        FlushId {
            stream: self.stream.clone(),
            sequence: self.sequence + 1,
        }
    }
}

/// What [`KeyStore::record_usage`](super::KeyStore::record_usage) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The counts were added.
    Applied,
    /// This flush (or a later one of its stream) was applied before: its
    /// counts are in already, and nothing was written.
    AlreadyApplied,
}

pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
