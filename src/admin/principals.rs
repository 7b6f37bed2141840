//! What users and service accounts share: their resource JSON, and the list,
//! get, create, update and delete handlers, parameterised by kind. The
//! `users` and `service_accounts` modules supply each kind's `spec`.
//!
//! Changing or deleting a principal changes what its keys may do (access,
//! `disabled`), so both invalidate those keys in the proxy's cache before
//! answering.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::access::{kind_name, Caller};
use super::error::AdminError;
use super::extract::{JsonBody, PathId, QueryParams};
use super::resource::{self, ListParams};
use super::AdminState;
use crate::store::{OwnerType, Principal, PrincipalSpec};

/// Where a principal's namespaces are named in a request.
const GRANTS: &str = "spec.access.namespaceAccesses";

/// One kind's `spec`: how a request's spec becomes a `PrincipalSpec`, and
/// how a principal's spec is shown.
pub trait Kind: DeserializeOwned + Send + 'static {
    const KIND: OwnerType;
    /// The list response's array field (`users`, `serviceAccounts`).
    const LIST_FIELD: &'static str;
    /// Builds the stored spec: from nothing on create, over `current` on
    /// update (fields left out keep their value).
    fn merge(self, current: Option<&Principal>) -> Result<PrincipalSpec, AdminError>;
    fn spec_json(p: &Principal) -> Value;
}

/// `POST /{kind}` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest<S> {
    pub spec: S,
}

/// `PUT /{kind}/{id}` (or `POST .../update`) body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest<S> {
    pub resource_version: String,
    pub spec: S,
}

/// The resource as the API shows it.
pub fn render<K: Kind>(p: &Principal) -> Value {
    json!({
        "id": p.id,
        "resourceVersion": resource::version(p.resource_version),
        "spec": K::spec_json(p),
        "state": if p.disabled { "disabled" } else { "active" },
        "createdTime": resource::time(p.created),
        "lastModifiedTime": resource::time(p.modified),
    })
}

pub async fn list<K: Kind>(
    State(state): State<AdminState>,
    caller: Caller,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, AdminError> {
    caller.require_admin(&format!("list {}s", kind_name(K::KIND)))?;
    let page = state
        .store
        .list_principals(K::KIND, &params.page()?)
        .await?;
    let items: Vec<Value> = page.items.iter().map(render::<K>).collect();
    Ok(Json(json!({
        K::LIST_FIELD: items,
        "nextPageToken": resource::next_token(page.next),
    })))
}

pub async fn get<K: Kind>(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    caller.may_read_principal(K::KIND, &id)?;
    let p = find::<K>(&state, &id).await?;
    Ok(Json(render::<K>(&p)))
}

pub async fn create<K: Kind>(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateRequest<K>>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    caller.require_admin(&format!("create {}s", kind_name(K::KIND)))?;
    let spec = body.spec.merge(None)?;
    let p = state
        .store
        .create_principal(&caller.actor(), K::KIND, spec)
        .await
        .map_err(|e| AdminError::from(e).namespaces_in(GRANTS))?;
    Ok((StatusCode::CREATED, Json(render::<K>(&p))))
}

pub async fn update<K: Kind>(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
    JsonBody(body): JsonBody<UpdateRequest<K>>,
) -> Result<Json<Value>, AdminError> {
    caller.require_admin(&format!("change {}s", kind_name(K::KIND)))?;
    let expected = resource::parse_version(&body.resource_version)?;
    let current = find::<K>(&state, &id).await?;
    let spec = body.spec.merge(Some(&current))?;
    let (p, keys) = state
        .store
        .update_principal(&caller.actor(), K::KIND, &id, spec, Some(expected))
        .await
        .map_err(|e| AdminError::from(e).namespaces_in(GRANTS))?;
    // Access and `disabled` are cached with each key: drop them first.
    state.authenticator.invalidate(&keys);
    Ok(Json(render::<K>(&p)))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// The keys deleted with the principal.
    pub deleted_api_keys: Vec<String>,
}

pub async fn delete<K: Kind>(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<DeleteResponse>, AdminError> {
    caller.require_admin(&format!("delete {}s", kind_name(K::KIND)))?;
    let keys = state
        .store
        .delete_principal(&caller.actor(), K::KIND, &id)
        .await?;
    state.authenticator.invalidate(&keys);
    Ok(Json(DeleteResponse {
        deleted_api_keys: keys.iter().map(ToString::to_string).collect(),
    }))
}

async fn find<K: Kind>(state: &AdminState, id: &str) -> Result<Principal, AdminError> {
    state
        .store
        .get_principal(K::KIND, id)
        .await?
        .ok_or_else(|| AdminError::not_found(kind_name(K::KIND), id))
}
