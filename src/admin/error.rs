//! The one place an admin API failure becomes a response: every handler
//! returns `Result<_, AdminError>`, and only this module picks the status,
//! the stable `code` and the message of `{"error":{"code","message"}}`.
//!
//! Client errors (4xx) say what was wrong with the request; internal ones
//! (store down, corrupt record) are logged here and answered with a generic
//! message, so no response leaks store internals. Nothing here may print a
//! secret: messages are built from ids, names and serde's error text, and
//! since those may quote what the client sent (a key pasted into the wrong
//! field or path), every message is passed through [`redact_token_like`],
//! which removes a whole token and a secret on its own alike.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::{AuthError, CredentialError};
use crate::key::REDACTED;
use crate::store::{PolicyViolation, StoreError};

/// Everything an admin handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No usable API key, or one that failed verification.
    #[error("{message}")]
    Unauthenticated {
        code: &'static str,
        message: &'static str,
    },
    /// The caller is authenticated but its access does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is not well-formed (not JSON, bad query string).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Well-formed, but a field is wrong: unknown, missing, mistyped or out
    /// of range.
    #[error("{0}")]
    Invalid(String),
    /// The path exists, the method does not (the `Allow` header, set by
    /// the router, lists those that do).
    #[error(
        "method {0} is not allowed on this path; the Allow header lists the methods it accepts"
    )]
    MethodNotAllowed(axum::http::Method),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("request body must be JSON (content-type: application/json)")]
    UnsupportedMediaType,
    /// A key policy refused the change (422 `policy_violation`); `field`
    /// is the request field it is about, named in the message as the
    /// body's other 422s name theirs.
    #[error("{violation}")]
    Policy {
        field: Option<&'static str>,
        violation: PolicyViolation,
    },
    #[error(transparent)]
    Store(StoreError),
    /// The store is down and the authenticator had nothing cached.
    #[error("the key store is unavailable")]
    Unavailable,
}

impl AdminError {
    pub fn forbidden(message: impl Into<String>) -> AdminError {
        AdminError::Forbidden(message.into())
    }

    pub fn invalid(message: impl Into<String>) -> AdminError {
        AdminError::Invalid(message.into())
    }

    pub fn not_found(kind: &str, id: &str) -> AdminError {
        AdminError::NotFound(format!("{kind} {id} not found"))
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            // Who may enable the key, not what a key may be: a 403.
            StoreError::Policy(violation @ PolicyViolation::DisabledByAdmin(_)) => {
                AdminError::Forbidden(violation.to_string())
            }
            StoreError::Policy(violation) => AdminError::Policy {
                field: policy_field(&violation),
                violation,
            },
            e => AdminError::Store(e),
        }
    }
}

/// The request field a key policy is about, where only one can be: an
/// unknown namespace is in `spec.namespaces` of a key but in
/// `spec.access.namespaceAccesses` of a principal, so its handler says
/// which ([`AdminError::namespaces_in`]); the last admin is about a role,
/// a state or a deletion.
fn policy_field(violation: &PolicyViolation) -> Option<&'static str> {
    match violation {
        PolicyViolation::ExpiryRequired { .. }
        | PolicyViolation::LifetimeTooLong { .. }
        | PolicyViolation::ExpiryInPast => Some("spec.expiryTime"),
        PolicyViolation::TooManyKeys { .. } | PolicyViolation::UnknownOwner { .. } => {
            Some("spec.ownerId")
        }
        PolicyViolation::UnknownNamespace(_)
        | PolicyViolation::LastAdmin { .. }
        | PolicyViolation::UsersExist(_)
        | PolicyViolation::DisabledByAdmin(_) => None,
    }
}

impl AdminError {
    /// Names `field` as the place of an unknown namespace, if this is one.
    pub fn namespaces_in(self, field: &'static str) -> AdminError {
        match self {
            AdminError::Policy {
                field: None,
                violation: violation @ PolicyViolation::UnknownNamespace(_),
            } => AdminError::Policy {
                field: Some(field),
                violation,
            },
            other => other,
        }
    }
}

impl From<CredentialError> for AdminError {
    fn from(e: CredentialError) -> Self {
        match e {
            CredentialError::Missing | CredentialError::UnsupportedScheme => {
                AdminError::Unauthenticated {
                    code: "missing_api_key",
                    message: "no API key was presented",
                }
            }
            _ => AdminError::Unauthenticated {
                code: "malformed_api_key",
                message: "the API key is malformed",
            },
        }
    }
}

impl From<AuthError> for AdminError {
    fn from(e: AuthError) -> Self {
        let (code, message) = match e {
            AuthError::Invalid => ("invalid_api_key", "the API key is not valid"),
            AuthError::Disabled => ("api_key_disabled", "the API key is disabled"),
            AuthError::Expired => ("api_key_expired", "the API key has expired"),
            AuthError::OwnerDisabled => ("owner_disabled", "the API key's owner is disabled"),
            AuthError::ApiKeysDisabled => (
                "api_keys_disabled",
                "API keys are disabled for this account",
            ),
            AuthError::StoreUnavailable => return AdminError::Unavailable,
        };
        AdminError::Unauthenticated { code, message }
    }
}

impl AdminError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            AdminError::Unauthenticated { code, message } => {
                (StatusCode::UNAUTHORIZED, code, (*message).to_string())
            }
            AdminError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m.clone()),
            AdminError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.clone()),
            AdminError::Unavailable => unavailable(),
            AdminError::BadRequest { code, message } => {
                (StatusCode::BAD_REQUEST, code, message.clone())
            }
            AdminError::Invalid(m) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_argument",
                m.clone(),
            ),
            AdminError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                self.to_string(),
            ),
            AdminError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                self.to_string(),
            ),
            AdminError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                self.to_string(),
            ),
            AdminError::Policy { field, violation } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "policy_violation",
                match field {
                    Some(field) => format!("{field}: {violation}"),
                    None => violation.to_string(),
                },
            ),
            AdminError::Store(e) => match e {
                StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", e.to_string()),
                StoreError::AlreadyExists { .. } => {
                    (StatusCode::CONFLICT, "already_exists", e.to_string())
                }
                StoreError::StaleVersion { .. } => (
                    StatusCode::CONFLICT,
                    "stale_resource_version",
                    e.to_string(),
                ),
                StoreError::Policy(p) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "policy_violation",
                    p.to_string(),
                ),
                StoreError::Unavailable(_) | StoreError::NoAnswer(_) => {
                    tracing::warn!(error = %e, "admin API: key store unavailable");
                    unavailable()
                }
                StoreError::Corrupt(detail) => {
                    tracing::warn!(%detail, "admin API: store holds an invalid record");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error; see the server log".into(),
                    )
                }
            },
        }
    }
}

fn unavailable() -> (StatusCode, &'static str, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the key store is unavailable; try again".into(),
    )
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        // Messages may quote what the client sent (serde's "unknown variant
        // `...`", a bad time); a key pasted into the wrong field must not
        // come back in a response that proxies and clients log.
        let message = redact_token_like(&message);
        let body = Json(json!({ "error": { "code": code, "message": message } }));
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3.1: no error code when no credential was presented.
            let challenge = if code == "missing_api_key" {
                r#"Bearer realm="keygate""#
            } else {
                r#"Bearer realm="keygate", error="invalid_token""#
            };
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

/// Replaces every run of token characters (`[A-Za-z0-9_.-]`) that may hold
/// a key, or the secret part of one, by [`REDACTED`] (`<redacted>`): a run
/// of 24 or more with an underscore (a whole token), or one holding an alphanumeric run
/// as long as a secret (the secret alone, as pasted from the `Basic` form
/// `<id>:<secret>` or cut out of a token). Ids (16 characters) and every
/// legitimate part of a message are shorter, and stay readable.
pub fn redact_token_like(message: &str) -> String {
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let mut out = String::with_capacity(message.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if (run.len() >= 24 && run.contains('_')) || holds_secret_length_run(run) {
            out.push_str(REDACTED);
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in message.chars() {
        if is_token_char(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Whether `text` has an ASCII alphanumeric run at least as long as a
/// key's secret.
fn holds_secret_length_run(text: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|run| run.len() >= crate::key::SECRET_LEN)
}

#[cfg(test)]
mod redaction_tests {
    use super::redact_token_like;

    #[test]
    fn token_like_runs_are_redacted_and_the_rest_kept() {
        let token = "kg_6qapv6sg93srp1pv_5GJwpJP7n1l9h7ZEGkVfDlC3YBM4wSkp39OQZh";
        let message = format!("spec.expiryTime must be an RFC 3339 time; got \"{token}\"");
        let redacted = redact_token_like(&message);
        assert!(!redacted.contains(&token[20..]), "{redacted}");
        assert!(redacted.contains("spec.expiryTime must be an RFC 3339 time; got \"<redacted>\""));
        let plain = "unknown variant `owner`, expected one of `user`, `service-account`";
        assert_eq!(redact_token_like(plain), plain);
    }

    #[test]
    fn the_secret_alone_is_redacted_and_ids_kept() {
        let (id, rest) = ("6qapv6sg93srp1pv", "5GJwpJP7n1l9h7ZEGkVfDlC3YBM4wSkp39OQZh");
        let secret = &rest[..32];
        for (message, kept) in [
            (
                format!("API key {id}:{rest} not found"),
                format!("API key {id}:<redacted> not found"),
            ),
            (
                format!("spec.ownerId {secret:?} is neither"),
                "spec.ownerId \"<redacted>\" is neither".into(),
            ),
            (
                format!("unknown field `{secret}`"),
                "unknown field `<redacted>`".into(),
            ),
            (format!("got \"x-{secret}.y\""), "got \"<redacted>\"".into()),
        ] {
            assert_eq!(redact_token_like(&message), kept);
        }
        let id_only = format!("API key {id} not found");
        assert_eq!(redact_token_like(&id_only), id_only);
    }
}
