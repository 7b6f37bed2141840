//! `/api/v1/namespaces`: the names routes and access are scoped to.
//! `spec.name` (immutable) and `spec.description`. A namespace is addressed
//! by its id or its name; so that one path never names two namespaces, a
//! new name may not have the shape of an id (16 lowercase Crockford base32
//! characters), and a lookup prefers the namespace whose id matches (a name
//! of that shape made before the rule cannot shadow another's id).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::Caller;
use super::error::AdminError;
use super::extract::{JsonBody, PathId, QueryParams};
use super::resource::{self, validate_description, validate_namespace_name, ListParams};
use super::AdminState;
use crate::key::KeyId;
use crate::store::Namespace;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    pub spec: NamespaceSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateRequest {
    pub resource_version: String,
    pub spec: NamespaceSpec,
}

pub fn render(n: &Namespace) -> Value {
    json!({
        "id": n.id,
        "resourceVersion": resource::version(n.resource_version),
        "spec": { "name": n.name, "description": n.description },
        "state": "active",
        "createdTime": resource::time(n.created),
        "lastModifiedTime": resource::time(n.modified),
    })
}

/// Admins see every namespace; others those they have a permission on,
/// within their key's scope.
async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, AdminError> {
    // Filtered in the store, before the page is cut: filtering a page
    // afterwards left pages empty and handed out page tokens that were the
    // ids of namespaces the caller may not see.
    let visible = caller.visible_namespaces();
    let page = state
        .store
        .list_namespaces(visible.as_deref(), &params.page()?)
        .await?;
    let items: Vec<Value> = page.items.iter().map(render).collect();
    Ok(Json(json!({
        "namespaces": items,
        "nextPageToken": resource::next_token(page.next),
    })))
}

async fn get_one(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    let n = find(&state, &id).await?;
    caller.may_read_namespace(&n.name)?;
    Ok(Json(render(&n)))
}

async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    let Some(name) = body.spec.name else {
        caller.require_admin("create namespaces")?;
        return Err(AdminError::invalid("spec.name is required"));
    };
    caller.may_create_or_delete_namespace("create namespaces", &name)?;
    validate_namespace_name("spec.name", &name)?;
    if KeyId::parse(&name).is_ok() {
        return Err(AdminError::invalid(format!(
            "spec.name {name:?} has the shape of a namespace id (16 lowercase letters and \
             digits); namespaces are addressed by id or name, so a name may not look like an id"
        )));
    }
    let description = body.spec.description.unwrap_or_default();
    validate_description("spec.description", &description)?;
    let n = state
        .store
        .create_namespace(&caller.actor(), &name, &description)
        .await?;
    Ok((StatusCode::CREATED, Json(render(&n))))
}

async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
    JsonBody(body): JsonBody<UpdateRequest>,
) -> Result<Json<Value>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_edit_namespace(&current.name)?;
    let expected = resource::parse_version(&body.resource_version)?;
    if body.spec.name.as_ref().is_some_and(|n| *n != current.name) {
        return Err(AdminError::invalid(
            "spec.name cannot be changed: routes and access refer to it",
        ));
    }
    let description = body.spec.description.unwrap_or(current.description);
    validate_description("spec.description", &description)?;
    let n = state
        .store
        .update_namespace(&caller.actor(), &current.id, &description, Some(expected))
        .await?;
    Ok(Json(render(&n)))
}

async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    PathId(id): PathId,
) -> Result<Json<Value>, AdminError> {
    let current = find(&state, &id).await?;
    caller.may_create_or_delete_namespace("delete namespaces", &current.name)?;
    let keys = state
        .store
        .delete_namespace(&caller.actor(), &current.id)
        .await?;
    // The grants on it are gone; the access cached with these keys is not.
    state.authenticator.invalidate(&keys);
    Ok(Json(json!({})))
}

async fn find(state: &AdminState, id_or_name: &str) -> Result<Namespace, AdminError> {
    state
        .store
        .get_namespace(id_or_name)
        .await?
        .ok_or_else(|| AdminError::not_found("namespace", id_or_name))
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        ("/api/v1/namespaces", get(list).post(create)),
        (
            "/api/v1/namespaces/{id}",
            get(get_one).put(update).delete(delete),
        ),
        ("/api/v1/namespaces/{id}/update", post(update)),
    ]
}
