//! `/api/v1/api-keys`: create, list, get, edit, enable, disable, rotate and
//! delete keys, and read their usage.
//!
//! The token is in the create and rotate responses and nowhere else: not in
//! any other response, log line or audit event. Every change drops the key
//! from the proxy's cache before the response is sent, so the next proxied
//! request sees it.

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::access::Caller;
use super::error::AdminError;
use super::extract::{JsonBody, OptionalJsonBody, PathId, QueryParams};
use super::resource::{
    self, page_request, parse_duration, parse_time, validate_description, validate_name,
    validate_namespace_name,
};
use super::AdminState;
use crate::key::{IssuedToken, KeyId};
use crate::store::{ApiKey, KeyFilter, KeyUpdate, NewKey, OwnerType, Page, Principal};

/// How long a rotated-out secret keeps working when the request does not say.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest grace a rotation may give the old secret.
pub const MAX_ROTATION_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A key's `spec` in a request. On create, `displayName` is required and
/// `ownerId` defaults to the caller. On update only `displayName`,
/// `description` and `disabled` may change; the other fields may be sent
/// back as read, but not changed.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySpec {
    pub display_name: Option<String>,
    pub description: Option<String>,
    pub owner_id: Option<String>,
    pub owner_type: Option<OwnerType>,
    /// RFC 3339; absent or null means no expiry (if the account allows it).
    pub expiry_time: Option<String>,
    pub disabled: Option<bool>,
    /// Namespaces the key is limited to; empty means all of its owner's.
    pub namespaces: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    pub spec: KeySpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    pub resource_version: String,
    pub spec: KeySpec,
}

/// Body of enable and disable: optional, for an optimistic check.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateRequest {
    pub resource_version: Option<String>,
}

/// Body of rotate: optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old secret keeps working, e.g. `24h` (the default) or
    /// `0s` to cut it off at once.
    pub grace_period: Option<String>,
}

/// `GET /api/v1/api-keys` query.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyListParams {
    pub page_size: Option<u32>,
    pub page_token: Option<String>,
    pub owner_id: Option<String>,
    pub owner_type: Option<String>,
}

/// The create and rotate answer: the key and, this once, its token.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedResponse {
    pub api_key: Value,
    pub token: String,
}

impl IssuedResponse {
    /// The key as any read shows it, and the token just made for it.
    fn new(key: &ApiKey, token: &IssuedToken) -> IssuedResponse {
        IssuedResponse {
            api_key: render(key, SystemTime::now()),
            token: token.expose().to_owned(),
        }
    }
}

pub fn render(k: &ApiKey, now: SystemTime) -> Value {
    let state = if k.disabled {
        "disabled"
    } else if k.expiry.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    };
    json!({
        "id": k.id.as_str(),
        "resourceVersion": resource::version(k.resource_version),
        "spec": {
            "displayName": k.display_name,
            "description": k.description,
            "ownerId": k.owner_id,
            "ownerType": k.owner_type.as_str(),
            "expiryTime": k.expiry.map(resource::time),
            "disabled": k.disabled,
            "namespaces": k.namespaces,
        },
        "state": state,
        "createdTime": resource::time(k.created),
        "lastModifiedTime": resource::time(k.modified),
        "lastUsedTime": k.last_used.map(resource::time),
        "previousSecretValidUntil": k.previous_secret_valid_until
            .filter(|until| *until > now)
            .map(resource::time),
    })
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    QueryParams(params): QueryParams<KeyListParams>,
) -> Result<Json<Value>, AdminError> {
    let page = page_request(params.page_size, params.page_token.as_deref())?;
    let owner_type = match params.owner_type.as_deref() {
        None | Some("") => None,
        Some(t) => Some(
            t.parse::<OwnerType>()
                .map_err(|()| AdminError::BadRequest {
                    code: "invalid_query",
                    message: format!("ownerType must be user or service-account; got {t:?}"),
                })?,
        ),
    };
    let owner_id = params.owner_id.filter(|id| !id.is_empty());
    caller.may_list_keys_of(owner_id.as_deref())?;
    let page = if caller.is_admin() {
        let filter = KeyFilter {
            owner_id,
            owner_type,
        };
        state.store.list_keys(&filter, &page).await?
    } else if owner_type.is_some_and(|t| t != caller.principal_type()) {
        // Others own keys of their own type only.
        Page {
            items: Vec::new(),
            next: None,
        }
    } else {
        // Others see only their own keys.
        let filter = KeyFilter {
            owner_id: Some(caller.principal_id().to_owned()),
            owner_type: Some(caller.principal_type()),
        };
        state.store.list_keys(&filter, &page).await?
    };
    let now = SystemTime::now();
    let items: Vec<Value> = page.items.iter().map(|k| render(k, now)).collect();
    Ok(Json(json!({
        "apiKeys": items,
        "nextPageToken": resource::next_token(page.next),
    })))
}

async fn get_one(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    let key = find(&state, &id).await?;
    caller.may_manage_key(&key)?;
    Ok(Json(render(&key, SystemTime::now())))
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateRequest>,
) -> Result<(StatusCode, Json<IssuedResponse>), AdminError> {
    let spec = body.spec;
    let display_name = spec
        .display_name
        .ok_or_else(|| AdminError::invalid("spec.displayName is required"))?;
    validate_name("spec.displayName", &display_name)?;
    let description = spec.description.unwrap_or_default();
    validate_description("spec.description", &description)?;
    let namespaces = namespace_scope(spec.namespaces.unwrap_or_default())?;
    let expiry = spec
        .expiry_time
        .as_deref()
        .map(|t| parse_time("spec.expiryTime", t))
        .transpose()?;

    let (owner_type, owner_id) = match (spec.owner_type, spec.owner_id) {
        (t, None) => {
            let own = caller.principal_type();
            if t.is_some_and(|t| t != own) {
                return Err(AdminError::invalid(
                    "spec.ownerType given without spec.ownerId must be your own type",
                ));
            }
            (own, caller.principal_id().to_owned())
        }
        (Some(t), Some(id)) => (t, id),
        (None, Some(id)) if id == caller.principal_id() => (caller.principal_type(), id),
        (None, Some(id)) => {
            // Who may ask first: a caller who may not create keys for
            // others must not learn from the answer which ids exist.
            caller.require_admin("create API keys for other principals")?;
            (owner_type_of(&state, &id).await?, id)
        }
    };
    caller.may_create_key(owner_type, &owner_id, &namespaces)?;
    let owner = state.store.get_principal(owner_type, &owner_id).await?;
    if let Some(owner) = &owner {
        within_owner_access(owner, &namespaces)?;
    }
    // A missing owner is the store's to refuse (`UnknownOwner`), inside the
    // same transaction as the insert.

    let (id, token, digest) = state.tokens.generate();
    let key = state
        .store
        .create_key(
            &caller.actor(),
            NewKey {
                id,
                digest,
                display_name,
                description,
                owner_id,
                owner_type,
                namespaces,
                expiry,
                disabled: spec.disabled.unwrap_or(false),
            },
        )
        .await
        .map_err(|e| AdminError::from(e).namespaces_in("spec.namespaces"))?;
    // The id may sit in the negative cache from a probe before it existed.
    state.authenticator.invalidate_unknown(&[key.id]);
    Ok((StatusCode::CREATED, Json(IssuedResponse::new(&key, &token))))
}

async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
    JsonBody(body): JsonBody<UpdateRequest>,
) -> Result<Json<Value>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_change_key(&current)?;
    let expected = resource::parse_version(&body.resource_version)?;
    let spec = body.spec;
    unchanged(&current, &spec)?;
    if let Some(name) = &spec.display_name {
        validate_name("spec.displayName", name)?;
    }
    if let Some(description) = &spec.description {
        validate_description("spec.description", description)?;
    }
    let update = KeyUpdate {
        display_name: spec.display_name,
        description: spec.description,
        disabled: spec.disabled,
        by_admin: caller.overrules_owner_of(&current),
    };
    let key = state
        .store
        .update_key(&caller.actor(), &current.id, update, Some(expected))
        .await?;
    state.authenticator.invalidate(&[key.id]);
    Ok(Json(render(&key, SystemTime::now())))
}

async fn enable(
    state: State<AdminState>,
    caller: Caller,
    id: PathId,
    body: OptionalJsonBody<StateRequest>,
) -> Result<Json<Value>, AdminError> {
    set_disabled(state, caller, id, body, false).await
}

async fn disable(
    state: State<AdminState>,
    caller: Caller,
    id: PathId,
    body: OptionalJsonBody<StateRequest>,
) -> Result<Json<Value>, AdminError> {
    set_disabled(state, caller, id, body, true).await
}

async fn set_disabled(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
    OptionalJsonBody(body): OptionalJsonBody<StateRequest>,
    disabled: bool,
) -> Result<Json<Value>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_change_key(&current)?;
    let expected = body
        .resource_version
        .as_deref()
        .map(resource::parse_version)
        .transpose()?;
    let update = KeyUpdate {
        disabled: Some(disabled),
        by_admin: caller.overrules_owner_of(&current),
        ..KeyUpdate::default()
    };
    let key = state
        .store
        .update_key(&caller.actor(), &current.id, update, expected)
        .await?;
    state.authenticator.invalidate(&[key.id]);
    Ok(Json(render(&key, SystemTime::now())))
}

async fn rotate(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
    OptionalJsonBody(body): OptionalJsonBody<RotateRequest>,
) -> Result<Json<IssuedResponse>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_change_key(&current)?;
    let grace = match body.grace_period.as_deref() {
        Some(text) => parse_duration("gracePeriod", text)?,
        None => DEFAULT_ROTATION_GRACE,
    };
    if grace > MAX_ROTATION_GRACE {
        return Err(AdminError::invalid(format!(
            "gracePeriod must be at most {}",
            resource::duration(MAX_ROTATION_GRACE)
        )));
    }
    let (token, digest) = state.tokens.issue_secret(&current.id);
    let key = state
        .store
        .rotate_key(
            &caller.actor(),
            &current.id,
            digest,
            SystemTime::now() + grace,
        )
        .await?;
    state.authenticator.invalidate(&[key.id]);
    Ok(Json(IssuedResponse::new(&key, &token)))
}

async fn usage(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    let key = find(&state, &id).await?;
    caller.may_manage_key(&key)?;
    Ok(Json(json!({
        "keyId": key.id.as_str(),
        "requestCount": key.request_count,
        "lastUsedTime": key.last_used.map(resource::time),
    })))
}

async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_change_key(&current)?;
    state.store.delete_key(&caller.actor(), &current.id).await?;
    state.authenticator.invalidate(&[current.id]);
    Ok(Json(json!({})))
}

// === helpers ===

async fn find(state: &AdminState, id: &str) -> Result<ApiKey, AdminError> {
    // A malformed id cannot name a key.
    let parsed = KeyId::parse(id).map_err(|_| AdminError::not_found("API key", id))?;
    state
        .store
        .get_key(&parsed)
        .await?
        .ok_or_else(|| AdminError::not_found("API key", id))
}

/// Which kind of principal `id` is, when the request did not say.
async fn owner_type_of(state: &AdminState, id: &str) -> Result<OwnerType, AdminError> {
    for kind in [OwnerType::User, OwnerType::ServiceAccount] {
        if state.store.get_principal(kind, id).await?.is_some() {
            return Ok(kind);
        }
    }
    Err(AdminError::invalid(format!(
        "spec.ownerId {id:?} is neither a user nor a service account"
    )))
}

/// Checks and de-duplicates a key's namespace scope.
fn namespace_scope(mut namespaces: Vec<String>) -> Result<Vec<String>, AdminError> {
    for ns in &namespaces {
        validate_namespace_name("spec.namespaces", ns)?;
    }
    namespaces.sort();
    namespaces.dedup();
    Ok(namespaces)
}

/// A key is scoped within its owner's access: a namespace the owner has no
/// permission on would make the key useless there anyway, and is most
/// likely a mistake.
fn within_owner_access(owner: &Principal, namespaces: &[String]) -> Result<(), AdminError> {
    for ns in namespaces {
        if owner.access.permission_on(ns).is_none() {
            return Err(AdminError::invalid(format!(
                "spec.namespaces: the owner {} has no access to namespace {ns:?}",
                owner.name
            )));
        }
    }
    Ok(())
}

/// An update may echo the fields it cannot change, but not change them.
fn unchanged(current: &ApiKey, spec: &KeySpec) -> Result<(), AdminError> {
    let immutable = |field: &str| {
        Err(AdminError::invalid(format!(
            "{field} cannot be changed on an existing API key; create a new key instead"
        )))
    };
    if spec
        .owner_id
        .as_ref()
        .is_some_and(|o| *o != current.owner_id)
    {
        return immutable("spec.ownerId");
    }
    if spec.owner_type.is_some_and(|t| t != current.owner_type) {
        return immutable("spec.ownerType");
    }
    if let Some(text) = &spec.expiry_time {
        let given = parse_time("spec.expiryTime", text)?;
        let same = current
            .expiry
            .is_some_and(|at| crate::store::to_ms(at) == crate::store::to_ms(given));
        if !same {
            return immutable("spec.expiryTime");
        }
    }
    if let Some(namespaces) = &spec.namespaces {
        if namespace_scope(namespaces.clone())? != current.namespaces {
            return immutable("spec.namespaces");
        }
    }
    Ok(())
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        ("/api/v1/api-keys", get(list).post(create)),
        (
            "/api/v1/api-keys/{id}",
            get(get_one).put(update).delete(delete),
        ),
        ("/api/v1/api-keys/{id}/update", post(update)),
        ("/api/v1/api-keys/{id}/enable", post(enable)),
        ("/api/v1/api-keys/{id}/disable", post(disable)),
        ("/api/v1/api-keys/{id}/rotate", post(rotate)),
        ("/api/v1/api-keys/{id}/usage", get(usage)),
    ]
}
