//! Request extractors of the admin API: JSON bodies, query strings and
//! path ids whose rejections are `AdminError`s, so a bad request gets the same error shape
//! as every other failure.
//!
//! Bodies: not JSON → 415; larger than `max_body_bytes` → 413 (the limit is
//! a `DefaultBodyLimit` layer on the router); syntax error → 400; unknown
//! field, missing field or wrong type → 422. Nothing is read past the limit.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::AdminError;
use super::AdminState;

/// A JSON request body, required.
pub struct JsonBody<T>(pub T);

/// A JSON request body that may be absent: an empty body is `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

/// A query string, parsed into `T` (which should deny unknown fields).
pub struct QueryParams<T>(pub T);

impl<T> FromRequest<AdminState> for JsonBody<T>
where
    T: DeserializeOwned,
{
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &AdminState) -> Result<Self, AdminError> {
        let bytes = read_body(req, state).await?;
        if bytes.is_empty() {
            return Err(AdminError::BadRequest {
                code: "invalid_json",
                message: "a JSON request body is required".into(),
            });
        }
        parse(&bytes).map(JsonBody)
    }
}

impl<T> FromRequest<AdminState> for OptionalJsonBody<T>
where
    T: DeserializeOwned + Default,
{
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &AdminState) -> Result<Self, AdminError> {
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse(&bytes).map(OptionalJsonBody)
    }
}

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, AdminError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(t)| QueryParams(t))
            .map_err(|e| AdminError::BadRequest {
                code: "invalid_query",
                message: e.body_text(),
            })
    }
}

/// The `{id}` of a resource path. An id that is not UTF-8 once decoded
/// (`%FF`) names nothing: 400 `invalid_path`.
pub struct PathId(pub String);

impl<S> FromRequestParts<S> for PathId
where
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| PathId(id))
            .map_err(|e| AdminError::BadRequest {
                code: "invalid_path",
                message: e.body_text(),
            })
    }
}

/// Reads the body within the router's limit, after checking that a
/// non-empty body says it is JSON.
async fn read_body(req: Request, state: &AdminState) -> Result<Bytes, AdminError> {
    let declared_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(is_json_content_type);
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AdminError::PayloadTooLarge(state.max_body_bytes)
        } else {
            AdminError::BadRequest {
                code: "invalid_body",
                message: e.body_text(),
            }
        }
    })?;
    if !bytes.is_empty() && declared_json == Some(false) {
        return Err(AdminError::UnsupportedMediaType);
    }
    Ok(bytes)
}

/// `application/json`, optionally with parameters, or any `+json` type.
fn is_json_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .rsplit_once('+')
            .is_some_and(|(_, suffix)| suffix.eq_ignore_ascii_case("json"))
}

/// Parses a JSON body. A refusal names the field it is about
/// (`spec.ownerType: ...`, by `serde_path_to_error`), and is a syntax error
/// (400) only when the bytes are not JSON at all: serde_json reports some
/// wrong shapes (an object where an enum's string belongs) as syntax
/// errors, which would tell the client its valid JSON is not JSON.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let error = match parsed {
        Ok(value) => match deserializer.end() {
            Ok(()) => return Ok(value),
            Err(e) => return Err(not_json(e)),
        },
        Err(error) => error,
    };
    let path = error.path().to_string();
    let inner = error.into_inner();
    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
    if !is_json {
        return Err(not_json(inner));
    }
    Err(AdminError::invalid(if path == "." {
        format!("invalid request body: {inner}")
    } else {
        format!("invalid request body: {path}: {inner}")
    }))
}

fn not_json(error: serde_json::Error) -> AdminError {
    AdminError::BadRequest {
        code: "invalid_json",
        message: format!("request body is not valid JSON: {error}"),
    }
}
