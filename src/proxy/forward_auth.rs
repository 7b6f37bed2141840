//! Forward-auth mode: the same checks as the proxy, answered as a decision
//! instead of forwarding, for nginx `auth_request`, Traefik ForwardAuth and
//! Envoy `ext_authz` (HTTP service).
//!
//! The original request is described by the caller: Traefik sends
//! `X-Forwarded-Method`, `-Host` and `-Uri`; nginx configurations
//! conventionally send `X-Original-Method` and `X-Original-URI`; Envoy sends
//! the original method and headers with the original path appended to the
//! decision path. 200 carries the identity headers; a refusal is the same
//! response the proxy would give, a request no route covers included. The
//! caller must pass the original host (`X-Forwarded-Host`, or the Host of
//! the decision request) for host routes to apply. A description never
//! makes the decision easier than the request it describes: a method
//! header cannot turn the decision request's own write into a read, one
//! that cannot be read counts as a write, and in Envoy's shape headers
//! that route elsewhere than the request itself are refused.

use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{Either, Full};

use crate::auth::{required_permission, CredentialError, VerifiedKey};
use crate::store::Permission;

use super::cors;
use super::handler::authenticate;
use super::path;
use super::reject::ProxyError;
use super::routes::{request_host, strip_port, Route};
use super::{ProxyBody, ProxyState};

static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");

/// The decision endpoint's path prefix, from `[forward_auth] path`.
#[derive(Debug, Clone)]
pub struct ForwardAuth {
    pub path: String,
    /// `[proxy] cors_allow_preflight`, for a request no route covers
    /// (forward-auth alone).
    pub cors_allow_preflight: bool,
}

impl ForwardAuth {
    /// Whether a request is for the decision endpoint (the path itself, or
    /// below it as Envoy sends it).
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.path.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
            None => false,
        }
    }
}

/// Decides one forward-auth request. `route` and `key` are filled in for
/// the access log and metrics.
pub async fn decide<'s, B>(
    state: &'s ProxyState,
    forward_auth: &ForwardAuth,
    req: &Request<B>,
    route_seen: &mut Option<&'s Route>,
    key_seen: &mut Option<Arc<VerifiedKey>>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let headers = req.headers();
    let method = decision_method(req.method(), headers);
    let own_host = request_host(req);
    let host = header_str(headers, &X_FORWARDED_HOST)
        .map(strip_port)
        .or(own_host);
    let own_path = req.uri().path();
    let envoy_path = &own_path[forward_auth.path.len().min(own_path.len())..];
    let path = header_str(headers, &X_FORWARDED_URI)
        .or_else(|| header_str(headers, &X_ORIGINAL_URI))
        .unwrap_or(if envoy_path.is_empty() {
            "/"
        } else {
            envoy_path
        });
    let route = route_of(state, host, path)?;
    // Envoy's shape: the decision request is the original request, its
    // path after the endpoint's, its Host the original one. Headers that
    // describe another request can then only have come from the client
    // (an ext_authz `allowed_headers` that lets them through): they must
    // not move the decision to a route the key may use. When they point
    // elsewhere than the request itself, it is refused.
    if !envoy_path.is_empty() {
        let own_route = route_of(state, own_host, envoy_path)?;
        if own_route.map(|r| r.index) != route.map(|r| r.index) {
            return Err(ProxyError::Forbidden);
        }
    }
    *route_seen = route;

    let preflight_may_pass = route.map_or(forward_auth.cors_allow_preflight, |r| {
        r.cors_allow_preflight
    });
    let credential = match state.credentials.extract(headers) {
        Ok(credential) => credential,
        // Allowed without identity, as the proxy forwards it (cors.rs).
        Err(CredentialError::Missing)
            if preflight_may_pass && cors::is_preflight(&method, headers) =>
        {
            return Ok(Response::new(Either::Right(Full::default())));
        }
        Err(error) => return Err(error.into()),
    };
    let now = SystemTime::now();
    let key = authenticate(state, &credential, &method, route, now, key_seen).await?;

    let mut response = Response::new(Either::Right(Full::default()));
    for (name, value) in state.headers.identity_pairs(&key, route) {
        response.headers_mut().insert(name.clone(), value);
    }
    state.usage.record(&key, now);
    Ok(response)
}

/// The route of the original request (`path` may carry a query). With
/// routes configured, the decision is the proxy's: a request no route
/// covers is refused as the proxy refuses it (404), never let through on
/// the key alone, which would skip every route's namespace. Only a keygate
/// that routes nothing (forward-auth alone) decides on the key alone.
fn route_of<'s>(
    state: &'s ProxyState,
    host: Option<&str>,
    path: &str,
) -> Result<Option<&'s Route>, ProxyError> {
    let path = path.split('?').next().unwrap_or("/");
    let path = path::normalize(state.path_normalization, path)?;
    let route = state.routes.select(host, &path);
    if route.is_none() && !state.routes.is_empty() {
        return Err(ProxyError::NoRoute);
    }
    Ok(route)
}

/// The method the decision is made for: the original's, as
/// `X-Forwarded-Method` (Traefik) or `X-Original-Method` (nginx) names it,
/// unless the decision request's own method needs more: Envoy sends the
/// original method itself, and a header the client slipped through must
/// not turn its write into a read. A method header that is repeated or
/// not a method cannot say what was asked, and is taken as a write.
fn decision_method(own: &Method, headers: &HeaderMap) -> Method {
    if required_permission(own, None) == Permission::Write {
        return own.clone();
    }
    let named = if headers.contains_key(&X_FORWARDED_METHOD) {
        headers.get_all(&X_FORWARDED_METHOD)
    } else {
        headers.get_all(&X_ORIGINAL_METHOD)
    };
    let mut values = named.iter();
    match (values.next(), values.next()) {
        (None, _) => own.clone(),
        (Some(value), None) => Method::from_bytes(value.as_bytes()).unwrap_or(Method::POST),
        (Some(_), Some(_)) => Method::POST,
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
}
