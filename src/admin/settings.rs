//! `/api/v1/account/settings`: the account-wide key policy —
//! `apiKeysEnabled`, `maxKeyLifetime` (`0s` = keys may never expire) and
//! `maxKeysPerOwner`. Everyone may read it (it says how long a key may
//! live); only account admins change it. The proxy's `apiKeysEnabled`
//! switch is flipped before the response is sent.

use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::Caller;
use super::error::AdminError;
use super::extract::JsonBody;
use super::resource::{self, parse_duration};
use super::AdminState;
use crate::store::AccountSettings;

/// The longest `maxKeyLifetime` (ten years); longer is "never expires",
/// which `0s` says.
pub const MAX_KEY_LIFETIME_LIMIT: Duration = Duration::from_secs(3650 * 86_400);
/// The largest `maxKeysPerOwner`.
pub const MAX_KEYS_PER_OWNER_LIMIT: u32 = 10_000;

/// Fields left out keep their value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsSpec {
    pub api_keys_enabled: Option<bool>,
    /// A duration such as `90d`; `0s` lets keys live forever.
    pub max_key_lifetime: Option<String>,
    pub max_keys_per_owner: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    pub resource_version: String,
    pub spec: SettingsSpec,
}

pub fn render(s: &AccountSettings) -> Value {
    json!({
        "id": "account",
        "resourceVersion": resource::version(s.resource_version),
        "spec": {
            "apiKeysEnabled": s.api_keys_enabled,
            "maxKeyLifetime": resource::duration(s.max_key_lifetime),
            "maxKeysPerOwner": s.max_keys_per_owner,
        },
        "state": "active",
        "lastModifiedTime": resource::time(s.modified),
    })
}

async fn get_settings(
    State(state): State<AdminState>,
    _caller: Caller,
) -> Result<Json<Value>, AdminError> {
    let s = state.store.settings().await?;
    Ok(Json(render(&s)))
}

async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<UpdateRequest>,
) -> Result<Json<Value>, AdminError> {
    caller.require_admin("change the account settings")?;
    let expected = resource::parse_version(&body.resource_version)?;
    let current = state.store.settings().await?;
    let spec = body.spec;
    let lifetime = match spec.max_key_lifetime.as_deref() {
        Some(text) => parse_duration("spec.maxKeyLifetime", text)?,
        None => current.max_key_lifetime,
    };
    if lifetime > MAX_KEY_LIFETIME_LIMIT {
        return Err(AdminError::invalid(format!(
            "spec.maxKeyLifetime must be at most {}; use 0s for keys that never expire",
            resource::duration(MAX_KEY_LIFETIME_LIMIT)
        )));
    }
    let per_owner = spec
        .max_keys_per_owner
        .unwrap_or(current.max_keys_per_owner);
    if !(1..=MAX_KEYS_PER_OWNER_LIMIT).contains(&per_owner) {
        return Err(AdminError::invalid(format!(
            "spec.maxKeysPerOwner must be between 1 and {MAX_KEYS_PER_OWNER_LIMIT}; got {per_owner}"
        )));
    }
    let updated = state
        .store
        .update_settings(
            &caller.actor(),
            spec.api_keys_enabled.unwrap_or(current.api_keys_enabled),
            lifetime,
            per_owner,
            Some(expected),
        )
        .await?;
    state
        .authenticator
        .set_api_keys_enabled(updated.api_keys_enabled);
    Ok(Json(render(&updated)))
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        ("/api/v1/account/settings", get(get_settings).put(update)),
        ("/api/v1/account/settings/update", post(update)),
    ]
}
