//! The Cloud Ops resource shape shared by every admin resource: times as
//! RFC 3339, `resourceVersion` as a string, pages (`pageSize`, `pageToken`,
//! `nextPageToken`), `spec.access`, durations, and the validation of names
//! and descriptions.
//!
//! Names end up in identity headers on the proxy (`x-keygate-owner-name`),
//! so they are refused here if they hold control characters.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::error::AdminError;
use crate::store::{
    Access, AccountRole, PageRequest, Permission, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
};

/// Longest display name, email or service-account name.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest description.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
/// Longest namespace name.
pub const MAX_NAMESPACE_CHARS: usize = 64;

/// A time as the API shows it: RFC 3339, UTC, milliseconds (the store's
/// precision, so a time read back compares equal).
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub fn parse_time(field: &str, text: &str) -> Result<SystemTime, AdminError> {
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        AdminError::invalid(format!(
            "{field} must be an RFC 3339 time in UTC, like 2030-01-31T12:00:00Z; got {text:?}"
        ))
    })
}

pub fn version(v: i64) -> String {
    v.to_string()
}

pub fn parse_version(text: &str) -> Result<i64, AdminError> {
    text.trim().parse().map_err(|_| {
        AdminError::invalid(format!(
            "resourceVersion must be the string of an integer, as returned by a get; got {text:?}"
        ))
    })
}

/// A duration as the API shows it: the largest whole unit (`90d`, `24h`,
/// `30m`, `45s`), which `parse_duration` reads back.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Reads `90d`, `24h`, `1h 30m`, `3600s` or a bare number of seconds.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, AdminError> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|_| {
        AdminError::invalid(format!(
            "{field} must be a duration like 90d, 24h or 3600s; got {text:?}"
        ))
    })
}

// === pages ===

/// `pageSize` and `pageToken` of a list call.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    pub page_size: Option<u32>,
    pub page_token: Option<String>,
}

impl ListParams {
    pub fn page(&self) -> Result<PageRequest, AdminError> {
        page_request(self.page_size, self.page_token.as_deref())
    }
}

pub fn page_request(size: Option<u32>, token: Option<&str>) -> Result<PageRequest, AdminError> {
    let size = match size {
        None | Some(0) => DEFAULT_PAGE_SIZE,
        Some(n) if n <= MAX_PAGE_SIZE => n,
        Some(n) => {
            return Err(AdminError::BadRequest {
                code: "invalid_query",
                message: format!("pageSize must be between 1 and {MAX_PAGE_SIZE}; got {n}"),
            })
        }
    };
    let after = token.filter(|t| !t.is_empty()).map(str::to_owned);
    if let Some(t) = &after {
        if t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(AdminError::BadRequest {
                code: "invalid_query",
                message: "pageToken is not one this API returned".into(),
            });
        }
    }
    Ok(PageRequest { size, after })
}

/// `nextPageToken`: empty on the last page, as in the Cloud Ops API.
pub fn next_token(next: Option<String>) -> String {
    next.unwrap_or_default()
}

// === access ===

/// `spec.access` as the API shows it. In a request either part may be left
/// out: on create it is then least privilege (the read role, no
/// namespaces); on update it keeps its current value, so that changing a
/// principal's namespaces cannot silently demote it, nor changing its role
/// silently revoke its grants. `"namespaceAccesses": {}` clears the grants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_access: Option<AccountAccessJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_accesses: Option<BTreeMap<String, NamespaceAccessJson>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountAccessJson {
    pub role: AccountRole,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceAccessJson {
    pub permission: Permission,
}

impl From<&Access> for AccessJson {
    fn from(a: &Access) -> AccessJson {
        AccessJson {
            account_access: Some(AccountAccessJson {
                role: a.account_role,
            }),
            namespace_accesses: Some(
                a.namespaces
                    .iter()
                    .map(|(ns, p)| (ns.clone(), NamespaceAccessJson { permission: *p }))
                    .collect(),
            ),
        }
    }
}

impl AccessJson {
    /// What a new principal gets when its request leaves `access` (or a
    /// part of it) out: the read role and no namespaces.
    pub fn default_access() -> Access {
        Access {
            account_role: AccountRole::Read,
            namespaces: BTreeMap::new(),
        }
    }

    /// The access this request sets over `current` (the principal's, on
    /// update; `None` on create): parts left out keep `current`'s value, or
    /// get [`AccessJson::default_access`]'s on create. Checks the namespace
    /// names' shape; the store checks they exist.
    pub fn into_access(self, current: Option<&Access>) -> Result<Access, AdminError> {
        let base = current.cloned().unwrap_or_else(AccessJson::default_access);
        let namespaces = match self.namespace_accesses {
            Some(given) => {
                for ns in given.keys() {
                    validate_namespace_name("spec.access.namespaceAccesses", ns)?;
                }
                given
                    .into_iter()
                    .map(|(ns, a)| (ns, a.permission))
                    .collect()
            }
            None => base.namespaces,
        };
        Ok(Access {
            account_role: self.account_access.map_or(base.account_role, |a| a.role),
            namespaces,
        })
    }
}

// === validation ===

/// Whether free text holds something shaped like a native API key
/// (`<prefix>_<16 id>_<38 secret+check>`) or its secret on its own (as in
/// the `Basic` form `<id>:<secret>`): an alphanumeric run at least as long
/// as a secret that mixes upper- and lowercase letters, as 32 random base62
/// characters all but always do (hex digests and other identifiers, which
/// are single-case, pass). Refused in names and descriptions, which are
/// listed, logged and sent as headers.
fn contains_key_shape(value: &str) -> bool {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let full_token = value.split(|c: char| !is_token_char(c)).any(|run| {
        let parts: Vec<&str> = run.split('_').collect();
        parts.len() >= 3
            && parts[parts.len() - 2].len() == crate::key::ID_LEN
            && parts[parts.len() - 1].len() == crate::key::SECRET_LEN + crate::key::CHECK_LEN
    });
    let secret = value
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|run| {
            run.len() >= crate::key::SECRET_LEN
                && run.chars().any(|c| c.is_ascii_uppercase())
                && run.chars().any(|c| c.is_ascii_lowercase())
        });
    full_token || secret
}

pub fn refuse_key_shape(field: &str, value: &str) -> Result<(), AdminError> {
    if contains_key_shape(value) {
        return Err(AdminError::invalid(format!(
            "{field} looks like it contains an API key or its secret; never put a key in a \
             name, email or description"
        )));
    }
    Ok(())
}

/// Non-empty, at most `MAX_NAME_CHARS`, no control characters, no
/// surrounding whitespace, nothing shaped like a key.
pub fn validate_name(field: &str, value: &str) -> Result<(), AdminError> {
    refuse_key_shape(field, value)?;
    if value.trim().is_empty() {
        return Err(AdminError::invalid(format!("{field} must not be empty")));
    }
    if value.trim() != value {
        return Err(AdminError::invalid(format!(
            "{field} must not start or end with whitespace"
        )));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(AdminError::invalid(format!(
            "{field} must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(AdminError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    if let Some(c) = value.chars().find(|&c| is_invisible_format(c)) {
        return Err(AdminError::invalid(format!(
            "{field} must not contain invisible formatting characters (U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

/// Unicode's invisible format characters: zero-width spaces and joiners,
/// bidirectional overrides and isolates, the byte order mark, the soft
/// hyphen. A name holding one looks like another name (`bot` and
/// `bot\u{200B}` are two service accounts) or displays reordered (U+202E).
/// Listed by hand because std has no Unicode general category and these
/// few ranges are the whole of what names must refuse; the same ranges are
/// in the OpenAPI document's name pattern (`openapi::INVISIBLE`).
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// At most `MAX_DESCRIPTION_CHARS`; line breaks and tabs allowed, other
/// control characters not.
pub fn validate_description(field: &str, value: &str) -> Result<(), AdminError> {
    refuse_key_shape(field, value)?;
    if value.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(AdminError::invalid(format!(
            "{field} must be at most {MAX_DESCRIPTION_CHARS} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(AdminError::invalid(format!(
            "{field} must not contain control characters other than line breaks and tabs"
        )));
    }
    Ok(())
}

/// Lowercase letters, digits and `-`, 1 to 64 characters, starting and
/// ending with a letter or digit (it appears in routes and headers).
pub fn validate_namespace_name(field: &str, value: &str) -> Result<(), AdminError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok = !value.is_empty()
        && value.len() <= MAX_NAMESPACE_CHARS
        && value.chars().all(ok_char)
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AdminError::invalid(format!(
            "{field}: namespace name {value:?} must be 1 to {MAX_NAMESPACE_CHARS} lowercase \
             letters, digits or '-', not starting or ending with '-'"
        )))
    }
}
