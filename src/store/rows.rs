//! The rows both SQL stores read, and their conversion into the model:
//! one struct per table (or join) as sqlx decodes it, and the checks that
//! refuse a stored value the model cannot hold (`StoreError::Corrupt`).
//! Also the JSON columns' encodings, written and read here only.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::FromRow;

use super::*;
use crate::key::{Digest, KeyId};

#[derive(FromRow)]
pub(super) struct PrincipalRow {
    id: String,
    kind: String,
    name: String,
    description: String,
    account_role: String,
    namespace_access: String,
    disabled: bool,
    resource_version: i64,
    created_ms: i64,
    modified_ms: i64,
}

pub(super) fn owner_type(text: &str) -> Result<OwnerType, StoreError> {
    text.parse()
        .map_err(|()| StoreError::Corrupt(format!("owner type {text:?}")))
}

pub(super) fn access(role: &str, namespaces: &str) -> Result<Access, StoreError> {
    let account_role = role
        .parse()
        .map_err(|()| StoreError::Corrupt(format!("account role {role:?}")))?;
    let namespaces: BTreeMap<String, Permission> = serde_json::from_str(namespaces)
        .map_err(|e| StoreError::Corrupt(format!("namespace access: {e}")))?;
    Ok(Access {
        account_role,
        namespaces,
    })
}

/// Of `holders` (principal id, `namespace_access` JSON), those with a grant
/// on `namespace`, each with its access JSON without that grant.
pub(super) fn without_grants_on(
    holders: Vec<(String, String)>,
    namespace: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut changed = Vec::new();
    for (principal, access) in holders {
        let mut grants: BTreeMap<String, Permission> = serde_json::from_str(&access)
            .map_err(|e| StoreError::Corrupt(format!("namespace access: {e}")))?;
        if grants.remove(namespace).is_some() {
            let stripped = serde_json::to_string(&grants).unwrap_or_else(|_| "{}".into());
            changed.push((principal, stripped));
        }
    }
    Ok(changed)
}

pub(super) fn namespace_access_json(access: &Access) -> String {
    serde_json::to_string(&access.namespaces).unwrap_or_else(|_| "{}".into())
}

impl TryFrom<PrincipalRow> for Principal {
    type Error = StoreError;
    fn try_from(r: PrincipalRow) -> Result<Principal, StoreError> {
        Ok(Principal {
            kind: owner_type(&r.kind)?,
            access: access(&r.account_role, &r.namespace_access)?,
            id: r.id,
            name: r.name,
            description: r.description,
            disabled: r.disabled,
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
        })
    }
}

#[derive(FromRow)]
pub(super) struct NamespaceRow {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) description: String,
    pub(super) resource_version: i64,
    pub(super) created_ms: i64,
    pub(super) modified_ms: i64,
}

impl From<NamespaceRow> for Namespace {
    fn from(r: NamespaceRow) -> Namespace {
        Namespace {
            id: r.id,
            name: r.name,
            description: r.description,
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
        }
    }
}

/// A key with its usage (`key_usage`, which has no row for a key never
/// used).
pub(super) const KEY_COLUMNS: &str =
    "k.id, k.display_name, k.description, k.owner_id, k.owner_type, \
     k.namespaces, k.expiry_ms, k.disabled, k.disabled_by_admin, k.previous_valid_until_ms, k.resource_version, \
     k.created_ms, k.modified_ms, u.last_used_ms, COALESCE(u.request_count, 0) AS request_count \
     FROM api_keys k LEFT JOIN key_usage u ON u.key_id = k.id";

#[derive(FromRow)]
pub(super) struct KeyRow {
    id: String,
    display_name: String,
    description: String,
    owner_id: String,
    owner_type: String,
    namespaces: String,
    expiry_ms: Option<i64>,
    disabled: bool,
    disabled_by_admin: bool,
    previous_valid_until_ms: Option<i64>,
    resource_version: i64,
    created_ms: i64,
    modified_ms: i64,
    last_used_ms: Option<i64>,
    request_count: i64,
}

pub(super) fn key_id(text: &str) -> Result<KeyId, StoreError> {
    KeyId::parse(text).map_err(|_| StoreError::Corrupt(format!("key id {text:?}")))
}

pub(super) fn namespace_list(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("key namespaces: {e}")))
}

impl TryFrom<KeyRow> for ApiKey {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: key_id(&r.id)?,
            owner_type: owner_type(&r.owner_type)?,
            namespaces: namespace_list(&r.namespaces)?,
            display_name: r.display_name,
            description: r.description,
            owner_id: r.owner_id,
            expiry: r.expiry_ms.map(from_ms),
            disabled: r.disabled,
            disabled_by_admin: r.disabled_by_admin,
            previous_secret_valid_until: r.previous_valid_until_ms.map(from_ms),
            resource_version: r.resource_version,
            created: from_ms(r.created_ms),
            modified: from_ms(r.modified_ms),
            last_used: r.last_used_ms.map(from_ms),
            request_count: u64::try_from(r.request_count).unwrap_or(0),
        })
    }
}

#[derive(FromRow)]
pub(super) struct KeyRecordRow {
    id: String,
    secret_digest: Vec<u8>,
    previous_digest: Option<Vec<u8>>,
    previous_valid_until_ms: Option<i64>,
    disabled: bool,
    expiry_ms: Option<i64>,
    namespaces: String,
    owner_id: String,
    owner_type: String,
    owner_name: String,
    account_role: String,
    namespace_access: String,
    owner_disabled: bool,
}

pub(super) fn digest(bytes: &[u8]) -> Result<Digest, StoreError> {
    Digest::from_slice(bytes).ok_or_else(|| StoreError::Corrupt("digest is not 32 bytes".into()))
}

impl TryFrom<KeyRecordRow> for KeyRecord {
    type Error = StoreError;
    fn try_from(r: KeyRecordRow) -> Result<KeyRecord, StoreError> {
        let previous = match (r.previous_digest, r.previous_valid_until_ms) {
            (Some(d), Some(until)) => Some((digest(&d)?, from_ms(until))),
            _ => None,
        };
        Ok(KeyRecord {
            id: key_id(&r.id)?,
            digest: digest(&r.secret_digest)?,
            previous,
            disabled: r.disabled,
            expiry: r.expiry_ms.map(from_ms),
            namespaces: namespace_list(&r.namespaces)?,
            owner_id: r.owner_id,
            owner_type: owner_type(&r.owner_type)?,
            owner_name: r.owner_name,
            owner_access: access(&r.account_role, &r.namespace_access)?,
            owner_disabled: r.owner_disabled,
        })
    }
}

#[derive(FromRow)]
pub(super) struct SettingsRow {
    api_keys_enabled: bool,
    max_key_lifetime_secs: i64,
    max_keys_per_owner: i64,
    resource_version: i64,
    modified_ms: i64,
}

impl From<SettingsRow> for AccountSettings {
    fn from(r: SettingsRow) -> AccountSettings {
        AccountSettings {
            api_keys_enabled: r.api_keys_enabled,
            max_key_lifetime: Duration::from_secs(
                u64::try_from(r.max_key_lifetime_secs).unwrap_or(0),
            ),
            max_keys_per_owner: u32::try_from(r.max_keys_per_owner).unwrap_or(0),
            resource_version: r.resource_version,
            modified: from_ms(r.modified_ms),
        }
    }
}

#[derive(FromRow)]
pub(super) struct AuditRow {
    pub(super) seq: i64,
    pub(super) id: String,
    pub(super) time_ms: i64,
    pub(super) actor_id: String,
    pub(super) actor_type: String,
    pub(super) actor_name: String,
    pub(super) action: String,
    pub(super) target_type: String,
    pub(super) target_id: String,
    pub(super) detail: String,
}

#[derive(FromRow)]
pub(super) struct ChangeRow {
    seq: i64,
    time_ms: i64,
    key_ids: String,
    settings: bool,
    created: bool,
}

impl TryFrom<ChangeRow> for Change {
    type Error = StoreError;
    fn try_from(r: ChangeRow) -> Result<Change, StoreError> {
        let ids: Vec<String> = serde_json::from_str(&r.key_ids)
            .map_err(|e| StoreError::Corrupt(format!("change key ids: {e}")))?;
        Ok(Change {
            seq: r.seq,
            time: from_ms(r.time_ms),
            key_ids: ids.iter().map(|id| key_id(id)).collect::<Result<_, _>>()?,
            created: r.created,
            settings: r.settings,
        })
    }
}

pub(super) fn key_ids_json(keys: &[KeyId]) -> String {
    serde_json::to_string(&keys.iter().map(KeyId::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}
