//! `/api/v1/users`: people who own API keys, with their account role and
//! namespace permissions. `spec.email`, `spec.access`, `spec.disabled`.
//! An email is unique and looked up ignoring case (the store's index and
//! lookups), and kept as typed for display.

use axum::routing::{get, post, MethodRouter};
use serde::Deserialize;
use serde_json::{json, Value};

use super::bootstrap::looks_like_email;
use super::error::AdminError;
use super::principals::{self, Kind};
use super::resource::{refuse_key_shape, AccessJson, MAX_NAME_CHARS};
use super::AdminState;
use crate::store::{OwnerType, Principal, PrincipalSpec};

/// A user's `spec` in a request; on update, fields left out keep their value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserSpec {
    pub email: Option<String>,
    pub access: Option<AccessJson>,
    /// Our extension: a disabled user's keys fail with `owner_disabled`.
    pub disabled: Option<bool>,
}

impl Kind for UserSpec {
    const KIND: OwnerType = OwnerType::User;
    const LIST_FIELD: &'static str = "users";

    fn merge(self, current: Option<&Principal>) -> Result<PrincipalSpec, AdminError> {
        let email = match (self.email, current) {
            (Some(e), _) => {
                refuse_key_shape("spec.email", &e)?;
                if !looks_like_email(&e) || e.chars().count() > MAX_NAME_CHARS {
                    return Err(AdminError::invalid(format!(
                        "spec.email {e:?} is not a valid email address"
                    )));
                }
                e
            }
            // Kept as stored: an address an earlier, looser check let in
            // must not block every later update of its user.
            (None, Some(c)) => c.name.clone(),
            (None, None) => return Err(AdminError::invalid("spec.email is required")),
        };
        let access = match (self.access, current) {
            (Some(a), current) => a.into_access(current.map(|c| &c.access))?,
            (None, Some(c)) => c.access.clone(),
            (None, None) => AccessJson::default_access(),
        };
        Ok(PrincipalSpec {
            name: email,
            description: current.map(|c| c.description.clone()).unwrap_or_default(),
            access,
            disabled: self
                .disabled
                .unwrap_or_else(|| current.is_some_and(|c| c.disabled)),
        })
    }

    fn spec_json(p: &Principal) -> Value {
        json!({
            "email": p.name,
            "access": AccessJson::from(&p.access),
            "disabled": p.disabled,
        })
    }
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        (
            "/api/v1/users",
            get(principals::list::<UserSpec>).post(principals::create::<UserSpec>),
        ),
        (
            "/api/v1/users/{id}",
            get(principals::get::<UserSpec>)
                .put(principals::update::<UserSpec>)
                .delete(principals::delete::<UserSpec>),
        ),
        (
            "/api/v1/users/{id}/update",
            post(principals::update::<UserSpec>),
        ),
    ]
}
