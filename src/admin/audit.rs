//! `/api/v1/audit-events`: the audit log, newest first. Every change made
//! through the store writes one event in its own transaction: who (the
//! key's owner), what (action and target), when, and non-secret detail.
//! Only account admins may read it.

use axum::extract::State;
use axum::routing::{get, MethodRouter};
use axum::Json;
use serde_json::{json, Value};

use super::access::Caller;
use super::error::AdminError;
use super::extract::QueryParams;
use super::resource::{self, ListParams};
use super::AdminState;
use crate::store::AuditEvent;

pub fn render(e: &AuditEvent) -> Value {
    json!({
        "id": e.id,
        "time": resource::time(e.time),
        "actor": { "id": e.actor_id, "type": e.actor_type, "name": e.actor_name },
        "action": e.action,
        "target": { "type": e.target_type, "id": e.target_id },
        "detail": e.detail,
    })
}

async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Value>, AdminError> {
    caller.require_admin("read the audit log")?;
    let page = state.store.list_audit(&params.page()?).await?;
    let items: Vec<Value> = page.items.iter().map(render).collect();
    Ok(Json(json!({
        "auditEvents": items,
        "nextPageToken": resource::next_token(page.next),
    })))
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![("/api/v1/audit-events", get(list))]
}
