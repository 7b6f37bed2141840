//! `/api/v1/service-accounts`: non-human principals that own keys. Only
//! account admins manage them and their keys; their keys act with the
//! service account's own access. `spec.name`, `spec.description`,
//! `spec.access`, `spec.disabled`.

use axum::routing::{get, post, MethodRouter};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::AdminError;
use super::principals::{self, Kind};
use super::resource::{validate_description, validate_name, AccessJson};
use super::AdminState;
use crate::store::{OwnerType, Principal, PrincipalSpec};

/// A service account's `spec` in a request; on update, fields left out keep
/// their value.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountSpec {
    pub name: Option<String>,
    pub description: Option<String>,
    pub access: Option<AccessJson>,
    /// Our extension: a disabled service account's keys fail with
    /// `owner_disabled`.
    pub disabled: Option<bool>,
}

impl Kind for ServiceAccountSpec {
    const KIND: OwnerType = OwnerType::ServiceAccount;
    const LIST_FIELD: &'static str = "serviceAccounts";

    fn merge(self, current: Option<&Principal>) -> Result<PrincipalSpec, AdminError> {
        let name = match (self.name, current) {
            (Some(n), _) => n,
            (None, Some(c)) => c.name.clone(),
            (None, None) => return Err(AdminError::invalid("spec.name is required")),
        };
        validate_name("spec.name", &name)?;
        let description = match (self.description, current) {
            (Some(d), _) => d,
            (None, Some(c)) => c.description.clone(),
            (None, None) => String::new(),
        };
        validate_description("spec.description", &description)?;
        let access = match (self.access, current) {
            (Some(a), current) => a.into_access(current.map(|c| &c.access))?,
            (None, Some(c)) => c.access.clone(),
            (None, None) => AccessJson::default_access(),
        };
        Ok(PrincipalSpec {
            name,
            description,
            access,
            disabled: self
                .disabled
                .unwrap_or_else(|| current.is_some_and(|c| c.disabled)),
        })
    }

    fn spec_json(p: &Principal) -> Value {
        json!({
            "name": p.name,
            "description": p.description,
            "access": AccessJson::from(&p.access),
            "disabled": p.disabled,
        })
    }
}

pub fn routes() -> Vec<(&'static str, MethodRouter<AdminState>)> {
    vec![
        (
            "/api/v1/service-accounts",
            get(principals::list::<ServiceAccountSpec>)
                .post(principals::create::<ServiceAccountSpec>),
        ),
        (
            "/api/v1/service-accounts/{id}",
            get(principals::get::<ServiceAccountSpec>)
                .put(principals::update::<ServiceAccountSpec>)
                .delete(principals::delete::<ServiceAccountSpec>),
        ),
        (
            "/api/v1/service-accounts/{id}/update",
            post(principals::update::<ServiceAccountSpec>),
        ),
    ]
}
