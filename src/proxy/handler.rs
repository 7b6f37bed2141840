//! The request pipeline, readable top to bottom (SPEC section 2):
//! route → extract → verify → authorize → rewrite headers → forward → count.
//!
//! Each step is a call into the module that owns it; failures are typed
//! `ProxyError`s turned into responses by `reject` alone.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{CONTENT_TYPE, HOST, UPGRADE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use tokio::io::copy_bidirectional;

use crate::auth::{authorize, required_permission, Credential, CredentialError, VerifiedKey};
use crate::telemetry::access::{self, AccessEntry};
use crate::telemetry::counted::CountedBody;
use crate::telemetry::metrics;

use super::cors;
use super::forward_auth;
use super::headers::{settle_request_id, strip_hop_by_hop, ConnectionInfo};
use super::path;
use super::reject::{Blame, Dialect, ProxyError};
use super::routes::{hosts_are_sound, request_host, Route};
use super::timeouts::within_request_timeout;
use super::{ProxyBody, ProxyState};

/// What the pipeline learned about a request, for the access log and metrics,
/// whether it succeeded or not. The relay (`super::relay`) fills one too.
#[derive(Default)]
pub(super) struct Outcome<'a> {
    pub route: Option<&'a Route>,
    pub key: Option<Arc<VerifiedKey>>,
    pub upstream_started: Option<Instant>,
}

/// What the access log says of a request before the pipeline learns more:
/// who sent it, and what it asked for.
pub(super) struct LoggedRequest<'a> {
    /// The peer's IP address.
    pub client: &'a str,
    pub method: &'a str,
    /// As sent, without the query; `None` for a head that did not parse.
    pub path: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl LoggedRequest<'_> {
    /// A connection's client as the access log names it.
    pub fn client_of(conn: &ConnectionInfo) -> &str {
        conn.peer_ip.to_str().unwrap_or("-")
    }
}

/// Serves one request. Never fails: every error is a response.
///
/// `head_limit` is `max_header_bytes` when it is below what hyper's read
/// buffer enforces by itself (8 KiB): an HTTP/1.1 head over it is refused
/// here, as the relay and HTTP/2 refuse it.
pub async fn handle(
    state: Arc<ProxyState>,
    conn: Arc<ConnectionInfo>,
    mut req: Request<Incoming>,
    head_limit: Option<usize>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let client = Dialect::of_content_type(req.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()));
    let method = req.method().clone();
    // Cheap clones (shared bytes), kept for the access log.
    let uri = req.uri().clone();
    let request_id = settle_request_id(req.headers_mut());
    let request_id = String::from_utf8_lossy(request_id.as_bytes());
    let mut pending = Unanswered {
        state: &state,
        request: LoggedRequest {
            client: LoggedRequest::client_of(&conn),
            method: method.as_str(),
            path: Some(uri.path()),
            request_id: Some(&request_id),
        },
        outcome: Outcome::default(),
        started,
        answered: false,
    };
    let oversized =
        req.version() < Version::HTTP_2 && head_limit.is_some_and(|l| http1_head_len(&req) > l);
    // Up to the response head only: a response that has started is never cut.
    let exchange = async {
        if oversized {
            return Err(ProxyError::RequestHeadTooLarge);
        }
        pipeline(&state, &conn, req, client, &mut pending.outcome).await
    };
    let (response, refusal) = match within_request_timeout(state.request_timeout, exchange).await {
        Ok(response) => (response, None),
        Err(error) => {
            record_failure(&state, error, &pending.outcome);
            (error.respond(client), Some(error))
        }
    };
    let status = response.status().as_u16();
    pending.answered = true;
    record(
        &state,
        &pending.request,
        status,
        refusal,
        &pending.outcome,
        started,
    );
    Ok(response)
}

/// The status logged for a request whose client left before its response
/// head, as nginx logs it ("client closed request"); never sent.
pub(super) const CLIENT_CLOSED_REQUEST: u16 = 499;

/// A request [`handle`] has not answered yet. hyper drops the request's
/// future when its client goes away (a closed connection, an HTTP/2 stream
/// reset): dropped unanswered, it is recorded then, with status 499, so
/// that a request that may have reached the upstream still has its one
/// access line and is counted against its key.
struct Unanswered<'s, 'r> {
    state: &'s ProxyState,
    request: LoggedRequest<'r>,
    outcome: Outcome<'s>,
    started: Instant,
    answered: bool,
}

impl Drop for Unanswered<'_, '_> {
    fn drop(&mut self) {
        if !self.answered {
            record(
                self.state,
                &self.request,
                CLIENT_CLOSED_REQUEST,
                None,
                &self.outcome,
                self.started,
            );
        }
    }
}

async fn pipeline<'s>(
    state: &'s ProxyState,
    conn: &ConnectionInfo,
    mut req: Request<Incoming>,
    client: Dialect,
    outcome: &mut Outcome<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // A request whose Host is missing, repeated or not a host is refused
    // before anything reads it (RFC 9112 section 3.2): a route would be
    // chosen by one reading of it and the upstream could act on another.
    if !hosts_are_sound(&req) {
        return Err(ProxyError::InvalidHost);
    }
    // CONNECT asks for a tunnel to its authority. keygate forwards only to
    // its routes, where the request would become a CONNECT to the upstream
    // itself, and a 2xx to it turns the connection into a tunnel nobody
    // serves: the client got an empty close (an HTTP/2 stream reset) while
    // the request was counted as a 200. It is refused instead, with the
    // 403 Envoy gives a CONNECT it is not configured to tunnel.
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectNotSupported);
    }

    // Forward-auth: the same checks, answered as a decision.
    if let Some(forward_auth) = &state.forward_auth {
        if forward_auth.matches(req.uri().path()) {
            return forward_auth::decide(
                state,
                forward_auth,
                &req,
                &mut outcome.route,
                &mut outcome.key,
            )
            .await;
        }
    }

    // 1. Route: which upstream and namespace, by the normalized path,
    //    which is also the one forwarded.
    let normalized = match path::normalize(state.path_normalization, req.uri().path())? {
        Cow::Borrowed(_) => None,
        Cow::Owned(path) => Some(path),
    };
    let route = state
        .routes
        .select(
            request_host(&req),
            normalized.as_deref().unwrap_or(req.uri().path()),
        )
        .ok_or(ProxyError::NoRoute)?;
    outcome.route = Some(route);
    if let Some(path) = normalized {
        let target = path::with_query(&path, req.uri().query());
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(target.parse().map_err(|_| ProxyError::MalformedPath)?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::MalformedPath)?;
    }

    // 2. Extract the credential (no I/O). A CORS preflight has none, and
    //    goes on without identity where its route allows it (cors.rs).
    let now = SystemTime::now();
    let verified = match state.credentials.extract(req.headers()) {
        Ok(credential) => {
            // 3. Verify it: cache, then store; state and expiry checked
            //    every time.
            // 4. Authorize on the route's namespace.
            let key = authenticate(
                state,
                &credential,
                req.method(),
                Some(route),
                now,
                &mut outcome.key,
            )
            .await?;
            Some((key, credential.source))
        }
        Err(CredentialError::Missing)
            if route.cors_allow_preflight && cors::is_preflight(req.method(), req.headers()) =>
        {
            None
        }
        Err(error) => return Err(error.into()),
    };

    // 5. Rewrite headers: strip spoofed identity, credential, hop-by-hop;
    //    add forwarding headers and the identity. An HTTP/2 `:authority` or
    //    an absolute-form target is the host routes matched: it becomes the
    //    Host header, in place of any other (RFC 9112 section 3.2.2, RFC
    //    9113 section 8.3.1), which the rewrite copies to x-forwarded-host
    //    and an HTTP/1.1 upstream receives, as it receives an HTTP/1.1
    //    client's Host.
    if let Some(host) = authority_host(req.uri()) {
        req.headers_mut().insert(HOST, host);
    }
    let upgrade = wants_upgrade(&req);
    state.headers.rewrite_request(
        req.headers_mut(),
        conn,
        verified.as_ref().map(|(key, source)| (&**key, *source)),
        route,
        upgrade,
    );

    // 6. Forward, streaming both ways.
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    outcome.upstream_started = Some(Instant::now());
    let req = req.map(|body| {
        state
            .headers
            .strip_trailers(CountedBody::new(body, state.bytes_in.clone()))
    });
    let mut response = state
        .upstream
        // gRPC needs HTTP/2 for its trailers; gRPC-web carries them in the
        // body so that it works over HTTP/1.1, and goes to the upstream so.
        .forward(&route.upstream, req, client == Dialect::Grpc)
        .await?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Only a request that asked to upgrade may be answered so (RFC 9110
        // section 15.2.2); otherwise the upstream is broken, as the relay
        // also judges it.
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::UpstreamUnavailable);
        };
        tokio::spawn(tunnel(client_upgrade, hyper::upgrade::on(&mut response)));
    } else {
        strip_hop_by_hop(response.headers_mut());
    }
    // A response is sent in keygate's own version, not the upstream's (RFC
    // 9110 section 6.2): hyper's server writes the version the response
    // carries, so an HTTP/1.0 upstream's answer reached an HTTP/1.1 client
    // as `HTTP/1.0`, framed for 1.0. The default is what keygate's own
    // answers carry: hyper writes `HTTP/1.1` (and frames a body of unknown
    // length for the client it serves), and its HTTP/2 server ignores it.
    *response.version_mut() = Version::default();

    // 7. Count it against the key.
    if let Some((key, _)) = &verified {
        state.usage.record(key, now);
    }
    Ok(response.map(|body| Either::Left(CountedBody::new(body, state.bytes_out.clone()))))
}

/// Steps 3 and 4, shared with forward-auth and the relay: verifies the
/// credential at `now` (noting the key in `key_seen` for the access log and
/// the per-key metrics once its secret has verified, even when its state or
/// authorization then refuses it), checks the route's namespace and
/// permission (without a route, a valid key is enough), then counts the
/// request against the key's rate limit when one is configured.
pub(super) async fn authenticate(
    state: &ProxyState,
    credential: &Credential,
    method: &Method,
    route: Option<&Route>,
    now: SystemTime,
    key_seen: &mut Option<Arc<VerifiedKey>>,
) -> Result<Arc<VerifiedKey>, ProxyError> {
    // The key is noted once its secret has verified, so a refusal for its
    // state (disabled, expired, ...) is logged and counted under it too.
    let key = state
        .authenticator
        .verify_noting(&credential.token, now, key_seen)
        .await?;
    let required = required_permission(method, route.and_then(|r| r.permission));
    authorize(&key, route.and_then(|r| r.namespace.as_deref()), required)?;
    if let Some(limiter) = &state.rate_limiter {
        limiter
            .check(&key.id)
            .map_err(|_| ProxyError::RateLimited)?;
    }
    Ok(key)
}

/// Copies bytes both ways between an upgraded client and upstream (WebSocket).
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    if let Err(error) = copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

/// The size of `req`'s head as HTTP/1.1 bytes: request line, header lines
/// and the blank line (hyper does not say how many bytes it read).
fn http1_head_len<B>(req: &Request<B>) -> usize {
    let target = match req.uri().path_and_query() {
        Some(p) if req.uri().scheme().is_none() => p.as_str().len(),
        _ => req.uri().to_string().len(),
    };
    let request_line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let header_lines: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + ": ".len() + value.len() + "\r\n".len())
        .sum();
    request_line + header_lines + "\r\n".len()
}

/// The host and port of a URI's authority, without user info, as a Host
/// header value.
fn authority_host(uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?.as_str();
    let host = authority.rsplit('@').next().unwrap_or(authority);
    HeaderValue::from_str(host).ok()
}

/// `application/grpc`, `application/grpc+proto`, `application/grpc-web`…,
/// in any case (media types are case-insensitive, RFC 9110 section 8.3.1).
pub(super) fn is_grpc_content_type(value: &[u8]) -> bool {
    Dialect::of_content_type(Some(value)).is_grpc()
}

/// Whether the request asks for a protocol switch that keygate tunnels
/// (WebSocket and the like) once it has authorized the handshake.
///
/// An `h2c` upgrade is never one: the tunnel would carry HTTP/2 requests
/// that keygate never sees, each with its own path and headers, to an
/// upstream that serves them as requests (h2c smuggling): no route,
/// permission or key would be checked, and identity headers would arrive
/// as the client wrote them. Such a request is forwarded as a plain
/// request instead, its `Upgrade` dropped with the other hop-by-hop
/// headers, as Envoy does; RFC 9113 section 3.1 deprecates the upgrade.
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && !req.headers().get_all(UPGRADE).iter().any(names_h2c)
}

/// Whether an `Upgrade` value offers `h2c` among its protocols.
fn names_h2c(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .split(|&c| c == b',')
        .any(|protocol| protocol.trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// Metrics and the access-log event of a refusal answered with its own
/// HTTP status (hyper's path answers gRPC with 200 and records through
/// [`handle`] instead).
pub(super) fn record_refusal(
    state: &ProxyState,
    request: &LoggedRequest<'_>,
    error: ProxyError,
    outcome: &Outcome<'_>,
    started: Instant,
) {
    record_failure(state, error, outcome);
    let status = error.status().as_u16();
    record(state, request, status, Some(error), outcome, started);
}

fn record_failure(state: &ProxyState, error: ProxyError, outcome: &Outcome<'_>) {
    match error.blame() {
        Blame::Client => state.metrics.auth_failure(error.code()),
        Blame::Upstream => {
            let route = outcome.route.map_or("", |r| r.name.as_str());
            let kind = if error == ProxyError::UpstreamTimeout {
                metrics::UPSTREAM_TIMEOUT
            } else {
                metrics::UPSTREAM_UNAVAILABLE
            };
            state.metrics.upstream_error(route, kind);
        }
        Blame::Internal => state.metrics.auth_failure(error.code()),
    }
}

/// Metrics and the one access-log event of the request. Returns the clock
/// reading it took (the response head's time), for callers to reuse.
pub(super) fn record(
    state: &ProxyState,
    request: &LoggedRequest<'_>,
    status: u16,
    refusal: Option<ProxyError>,
    outcome: &Outcome<'_>,
    started: Instant,
) -> Instant {
    // One clock read for every duration below.
    let ended = Instant::now();
    let took = ended.saturating_duration_since(started);
    if let Some(route) = outcome.route {
        let metrics = &state.route_metrics[route.index];
        metrics.request_duration.observe(took.as_secs_f64());
        if let Some(at) = outcome.upstream_started {
            metrics
                .upstream_duration
                .observe(ended.saturating_duration_since(at).as_secs_f64());
        }
        if let Some(key) = &outcome.key {
            let resolve = || {
                state
                    .metrics
                    .key_counts(&key.id, &key.owner.id, &route.name, route.series_id)
            };
            let counts = key.counts.get_or_init(resolve);
            if counts.route_id == route.series_id {
                counts.count(status);
            } else {
                resolve().count(status);
            }
        }
    }
    let key = outcome.key.as_deref();
    access::log(&AccessEntry {
        key_id: key.map(|k| k.id.as_str()),
        owner_id: key.map(|k| k.owner.id.as_str()),
        client: request.client,
        method: request.method,
        path: request.path,
        route: outcome.route.map(|r| r.name.as_str()),
        upstream: outcome.route.map(|r| r.upstream.authority.as_str()),
        status,
        refusal: refusal.map(ProxyError::code),
        latency_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        request_id: request.request_id,
        tokens: state.credentials.format(),
    });
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_in_any_case() {
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web+proto",
            "Application/GRPC",
        ] {
            assert!(is_grpc_content_type(grpc.as_bytes()), "{grpc}");
        }
        for other in ["application/json", "application/grp", "text/grpc"] {
            assert!(!is_grpc_content_type(other.as_bytes()), "{other}");
        }
    }
}
