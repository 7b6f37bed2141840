//! The one place where a data-path failure becomes a response: its HTTP
//! status, JSON body and `WWW-Authenticate`, or for gRPC a trailers-only
//! response with `grpc-status` and `grpc-message`.
//!
//! Bodies are static strings: a rejection allocates nothing and never echoes
//! what the client sent.

use std::cell::Cell;
use std::io::Write;
use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::auth::{AuthError, CredentialError, Forbidden};

use super::headers::put_header;
use super::ProxyBody;

/// Every way the proxy refuses or fails a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no API key was presented")]
    MissingKey,
    #[error("the API key is malformed")]
    MalformedKey,
    #[error("the API key is not valid")]
    InvalidKey,
    #[error("the API key is disabled")]
    KeyDisabled,
    #[error("the API key has expired")]
    KeyExpired,
    #[error("the API key's owner is disabled")]
    OwnerDisabled,
    #[error("API keys are disabled for this account")]
    ApiKeysDisabled,
    #[error("the API key may not do this")]
    Forbidden,
    #[error("the API key made too many requests")]
    RateLimited,
    #[error("no route matches this request")]
    NoRoute,
    #[error("the key store is unavailable")]
    StoreUnavailable,
    #[error("the upstream is unavailable")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the request was not completed within request_timeout")]
    RequestTimeout,
    #[error("the request body ended early or its framing is invalid")]
    MalformedBody,
    #[error("the request path holds an encoded slash or backslash, a backslash or an encoded NUL")]
    AmbiguousPath,
    #[error("the request path holds a percent sign that does not start an escape")]
    MalformedPath,
    #[error("the request's Host header is missing, repeated or not a host")]
    InvalidHost,
    #[error("CONNECT asks for a tunnel, which a reverse proxy does not open")]
    ConnectNotSupported,
    // The next three are hyper's answers to a head it cannot parse, which
    // it writes itself, without a body; they are here for their code in
    // the metrics and the access log ([`ProxyError::from_unparsed_head`]).
    #[error("the request head could not be parsed")]
    MalformedRequest,
    #[error("the request head is larger than max_header_bytes")]
    RequestHeadTooLarge,
    #[error("the request target is too long")]
    UriTooLong,
    // hyper closes, without an answer, a connection whose head did not
    // arrive within header_read_timeout (as nginx does); here for its code.
    #[error("the request head did not arrive within header_read_timeout")]
    HeaderReadTimeout,
}

/// What a client speaks, by its request's `content-type`, which decides
/// the shape of a refusal: JSON with the HTTP status, or a trailers-only
/// gRPC answer in the client's own variant of gRPC. A gRPC-web client (a
/// browser's, through Envoy's or tonic-web's translation) reads a response
/// only as `application/grpc-web…`, the text variant (base64) only as
/// `application/grpc-web-text…`; `application/grpc` would be refused by it
/// as a content type it does not speak, losing the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Http,
    /// `application/grpc`, `application/grpc+proto`…
    Grpc,
    /// `application/grpc-web`, `application/grpc-web+proto`…
    GrpcWeb,
    /// `application/grpc-web-text`, `application/grpc-web-text+proto`…
    GrpcWebText,
}

impl Dialect {
    /// The dialect of a request with this `content-type` (media types are
    /// case-insensitive, RFC 9110 section 8.3.1).
    pub fn of_content_type(value: Option<&[u8]>) -> Dialect {
        let starts = |value: &[u8], prefix: &[u8]| {
            value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        match value {
            Some(v) if starts(v, b"application/grpc-web-text") => Dialect::GrpcWebText,
            Some(v) if starts(v, b"application/grpc-web") => Dialect::GrpcWeb,
            Some(v) if starts(v, b"application/grpc") => Dialect::Grpc,
            _ => Dialect::Http,
        }
    }

    /// Any variant of gRPC.
    pub fn is_grpc(self) -> bool {
        self != Dialect::Http
    }

    /// The content type of a trailers-only answer, as Envoy's gRPC-web
    /// filter writes it for gRPC-web clients; `None` for plain HTTP.
    fn grpc_content_type(self) -> Option<&'static str> {
        match self {
            Dialect::Http => None,
            Dialect::Grpc => Some("application/grpc"),
            Dialect::GrpcWeb => Some("application/grpc-web+proto"),
            Dialect::GrpcWebText => Some("application/grpc-web-text+proto"),
        }
    }
}

/// Every variant, in declaration order (the index of `json_body`).
const ALL: [ProxyError; 23] = [
    ProxyError::MissingKey,
    ProxyError::MalformedKey,
    ProxyError::InvalidKey,
    ProxyError::KeyDisabled,
    ProxyError::KeyExpired,
    ProxyError::OwnerDisabled,
    ProxyError::ApiKeysDisabled,
    ProxyError::Forbidden,
    ProxyError::RateLimited,
    ProxyError::NoRoute,
    ProxyError::StoreUnavailable,
    ProxyError::UpstreamUnavailable,
    ProxyError::UpstreamTimeout,
    ProxyError::RequestTimeout,
    ProxyError::MalformedBody,
    ProxyError::AmbiguousPath,
    ProxyError::MalformedPath,
    ProxyError::InvalidHost,
    ProxyError::ConnectNotSupported,
    ProxyError::MalformedRequest,
    ProxyError::RequestHeadTooLarge,
    ProxyError::UriTooLong,
    ProxyError::HeaderReadTimeout,
];

/// Who is to blame, for logs: client errors are routine, the rest are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Internal,
}

impl ProxyError {
    /// The `reason` of every refusal counted in `keygate_auth_failures_total`:
    /// all but the upstream's failures, which have a metric of their own.
    pub fn counted_reasons() -> impl Iterator<Item = &'static str> {
        ALL.into_iter()
            .filter(|e| e.blame() != Blame::Upstream)
            .map(ProxyError::code)
    }

    /// The stable machine-readable code, also the metric's `reason` label.
    pub fn code(self) -> &'static str {
        match self {
            ProxyError::MissingKey => "missing_api_key",
            ProxyError::MalformedKey => "malformed_api_key",
            ProxyError::InvalidKey => "invalid_api_key",
            ProxyError::KeyDisabled => "api_key_disabled",
            ProxyError::KeyExpired => "api_key_expired",
            ProxyError::OwnerDisabled => "owner_disabled",
            ProxyError::ApiKeysDisabled => "api_keys_disabled",
            ProxyError::Forbidden => "forbidden",
            ProxyError::RateLimited => "rate_limited",
            ProxyError::NoRoute => "no_route",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::UpstreamUnavailable => "upstream_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::MalformedBody => "malformed_request_body",
            ProxyError::AmbiguousPath => "ambiguous_path",
            ProxyError::MalformedPath => "malformed_path",
            ProxyError::InvalidHost => "invalid_host",
            ProxyError::ConnectNotSupported => "connect_not_supported",
            ProxyError::MalformedRequest => "malformed_request",
            ProxyError::RequestHeadTooLarge => "request_head_too_large",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::HeaderReadTimeout => "header_read_timeout",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::MissingKey
            | ProxyError::MalformedKey
            | ProxyError::InvalidKey
            | ProxyError::KeyDisabled
            | ProxyError::KeyExpired
            | ProxyError::OwnerDisabled
            | ProxyError::ApiKeysDisabled => StatusCode::UNAUTHORIZED,
            // Envoy's answer to a CONNECT it is not configured to tunnel.
            ProxyError::Forbidden | ProxyError::ConnectNotSupported => StatusCode::FORBIDDEN,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestTimeout | ProxyError::HeaderReadTimeout => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::MalformedBody
            | ProxyError::AmbiguousPath
            | ProxyError::MalformedPath
            | ProxyError::InvalidHost
            | ProxyError::MalformedRequest => StatusCode::BAD_REQUEST,
            ProxyError::RequestHeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    pub fn blame(self) -> Blame {
        match self.status() {
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => Blame::Upstream,
            StatusCode::SERVICE_UNAVAILABLE => Blame::Internal,
            _ => Blame::Client,
        }
    }

    /// gRPC status code: 16 UNAUTHENTICATED, 7 PERMISSION_DENIED,
    /// 8 RESOURCE_EXHAUSTED (rate limited), 12 UNIMPLEMENTED (no route),
    /// 14 UNAVAILABLE for 502, 503 and 504 (SPEC, and gRPC's own mapping of
    /// those statuses), 4 DEADLINE_EXCEEDED when the request's own
    /// `request_timeout` ran out (408), 13 INTERNAL for a 400 (a broken
    /// request body, a refused path or Host: gRPC's mapping of HTTP 400).
    fn grpc_status(self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "16",
            StatusCode::FORBIDDEN => "7",
            StatusCode::NOT_FOUND => "12",
            StatusCode::TOO_MANY_REQUESTS => "8",
            StatusCode::REQUEST_TIMEOUT => "4",
            StatusCode::BAD_REQUEST => "13",
            _ => "14",
        }
    }

    /// Human-readable explanation; percent-encoding safe (no `%`, ASCII only).
    fn message(self) -> &'static str {
        match self {
            ProxyError::MissingKey => "An API key is required: send Authorization: Bearer <key>.",
            ProxyError::MalformedKey => "The API key is malformed or its checksum does not match.",
            ProxyError::InvalidKey => "The API key is not valid.",
            ProxyError::KeyDisabled => "The API key is disabled.",
            ProxyError::KeyExpired => "The API key has expired.",
            ProxyError::OwnerDisabled => "The owner of the API key is disabled.",
            ProxyError::ApiKeysDisabled => "API keys are disabled for this account.",
            ProxyError::Forbidden => "The API key is not allowed to perform this request.",
            ProxyError::RateLimited => {
                "The API key made too many requests; retry after the seconds in Retry-After."
            }
            ProxyError::NoRoute => "No route matches this request.",
            ProxyError::StoreUnavailable => "The key store is unavailable; try again shortly.",
            ProxyError::UpstreamUnavailable => "The upstream service is unavailable.",
            ProxyError::UpstreamTimeout => "The upstream service did not answer in time.",
            ProxyError::RequestTimeout => {
                "The request was not completed in time: its upload and the upstream's answer must fit within request_timeout."
            }
            ProxyError::MalformedBody => {
                "The request body ended before its declared length, or its chunked encoding is invalid."
            }
            ProxyError::AmbiguousPath => {
                "The request path holds an encoded slash or backslash, a backslash or an encoded NUL, which upstreams read differently; keygate refuses it (proxy.path_normalization)."
            }
            ProxyError::MalformedPath => {
                "The request path holds a percent sign that is not followed by two hex digits."
            }
            ProxyError::InvalidHost => {
                "The request's Host header is missing (HTTP/1.1 requires one), repeated, or not a host with an optional port."
            }
            ProxyError::ConnectNotSupported => {
                "keygate is a reverse proxy: it does not open CONNECT tunnels."
            }
            ProxyError::MalformedRequest => "The request head could not be parsed as HTTP/1.1.",
            ProxyError::RequestHeadTooLarge => {
                "The request head is larger than max_header_bytes or has more than max_headers headers."
            }
            ProxyError::UriTooLong => "The request target is too long.",
            ProxyError::HeaderReadTimeout => {
                "The request head did not arrive within header_read_timeout."
            }
        }
    }

    /// `{"error":{"code":…,"message":…}}`, rendered once per variant at
    /// first use and shared afterwards.
    fn json_body(self) -> Bytes {
        static BODIES: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
            ALL.iter()
                .map(|e| {
                    let body = serde_json::json!({ "error": { "code": e.code(), "message": e.message() } });
                    Bytes::from(body.to_string())
                })
                .collect()
        });
        BODIES[self as usize].clone()
    }

    /// Builds the response for an HTTP, gRPC or gRPC-web client.
    pub fn respond(self, client: Dialect) -> Response<ProxyBody> {
        let grpc = client.is_grpc();
        let mut response = if let Some(content_type) = client.grpc_content_type() {
            let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
            headers.insert("grpc-message", HeaderValue::from_static(self.message()));
            response
        } else {
            let mut response = Response::new(Either::Right(Full::new(self.json_body())));
            *response.status_mut() = self.status();
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        };
        let headers = response.headers_mut();
        if !grpc && self.status() == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3.1: a request that presented no credential gets
            // the challenge without an error code.
            let challenge = if self == ProxyError::MissingKey {
                r#"Bearer realm="keygate""#
            } else {
                r#"Bearer realm="keygate", error="invalid_token""#
            };
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        // Both clear within a second: the store is retried at once, and
        // a rate of at least one request per second frees a slot within
        // one (ratelimit.rs).
        if matches!(self, ProxyError::StoreUnavailable | ProxyError::RateLimited) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl ProxyError {
    /// The refusal hyper's server answered for a request head it could not
    /// parse (400, 431 or 414, written by hyper), or `None` when the
    /// connection's error was not one of those.
    pub fn from_unparsed_head(error: &hyper::Error) -> Option<ProxyError> {
        if error.is_parse_too_large() {
            // hyper tells a too-long target from a too-large head only in
            // its message; both are parse-too-large.
            let uri = error.to_string().starts_with("URI");
            Some(if uri {
                ProxyError::UriTooLong
            } else {
                ProxyError::RequestHeadTooLarge
            })
        } else if error.is_parse() {
            Some(ProxyError::MalformedRequest)
        } else {
            None
        }
    }

    /// The same HTTP response as [`Self::respond`], serialized as HTTP/1.1
    /// for the relay, which answers upstream failures itself.
    pub fn render_http1(self, out: &mut Vec<u8>, close: bool) {
        let response = self.respond(Dialect::Http);
        let body = self.json_body();
        let status = response.status();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in response.headers() {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        put_header(out, b"date", &http_date());
        put_header(out, b"content-length", body.len().to_string().as_bytes());
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
    }
}

/// The `Date` value for the relay's own answers, as hyper puts one on its
/// (RFC 9110 6.6.1: an origin with a clock sends it on every 4xx and 5xx).
/// Formatted at most once a second on each thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, mut text) = cached.get();
        if at != second {
            // IMF-fixdate is always 29 bytes: "Sun, 06 Nov 1994 08:49:37 GMT".
            let _ = write!(&mut text[..], "{}", httpdate::HttpDate::from(now));
            cached.set((second, text));
        }
        text
    })
}

impl From<CredentialError> for ProxyError {
    fn from(e: CredentialError) -> Self {
        match e {
            // Another scheme (Digest, Negotiate) may be the upstream's own
            // credential: it is not an API key, so none was presented.
            CredentialError::Missing | CredentialError::UnsupportedScheme => ProxyError::MissingKey,
            _ => ProxyError::MalformedKey,
        }
    }
}

impl From<AuthError> for ProxyError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Invalid => ProxyError::InvalidKey,
            AuthError::Disabled => ProxyError::KeyDisabled,
            AuthError::Expired => ProxyError::KeyExpired,
            AuthError::OwnerDisabled => ProxyError::OwnerDisabled,
            AuthError::ApiKeysDisabled => ProxyError::ApiKeysDisabled,
            AuthError::StoreUnavailable => ProxyError::StoreUnavailable,
        }
    }
}

impl From<Forbidden> for ProxyError {
    fn from(_: Forbidden) -> Self {
        ProxyError::Forbidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_code_and_message() {
        for e in ALL {
            let v: serde_json::Value = serde_json::from_slice(&e.json_body()).expect("valid JSON");
            assert_eq!(v["error"]["code"], e.code());
            assert_eq!(v["error"]["message"], e.message());
        }
    }

    #[test]
    fn grpc_rejections_are_trailers_only() {
        let r = ProxyError::KeyExpired.respond(Dialect::Grpc);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(
            ProxyError::Forbidden.respond(Dialect::Grpc).headers()["grpc-status"],
            "7"
        );
        assert_eq!(
            ProxyError::UpstreamUnavailable
                .respond(Dialect::Grpc)
                .headers()["grpc-status"],
            "14"
        );
        assert_eq!(
            ProxyError::UpstreamTimeout.respond(Dialect::Grpc).headers()["grpc-status"],
            "14"
        );
        assert_eq!(
            ProxyError::RequestTimeout.respond(Dialect::Grpc).headers()["grpc-status"],
            "4"
        );
        // The message points at Retry-After: a gRPC client gets it too.
        let limited = ProxyError::RateLimited.respond(Dialect::Grpc);
        assert_eq!(limited.headers()["grpc-status"], "8");
        assert_eq!(limited.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn grpc_web_clients_get_their_own_content_type() {
        for (sent, answered) in [
            ("application/grpc", "application/grpc"),
            ("application/grpc+proto", "application/grpc"),
            ("application/grpc-web", "application/grpc-web+proto"),
            ("Application/gRPC-Web+proto", "application/grpc-web+proto"),
            (
                "application/grpc-web-text",
                "application/grpc-web-text+proto",
            ),
            (
                "application/grpc-web-text+proto",
                "application/grpc-web-text+proto",
            ),
        ] {
            let client = Dialect::of_content_type(Some(sent.as_bytes()));
            let r = ProxyError::MissingKey.respond(client);
            assert_eq!(r.headers()[CONTENT_TYPE], answered, "{sent}");
            assert_eq!(r.headers()["grpc-status"], "16", "{sent}");
        }
        for other in [None, Some("application/json"), Some("application/grp")] {
            assert_eq!(
                Dialect::of_content_type(other.map(str::as_bytes)),
                Dialect::Http
            );
        }
    }

    #[test]
    fn a_request_timeout_is_a_408_blamed_on_the_client() {
        let r = ProxyError::RequestTimeout.respond(Dialect::Http);
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(ProxyError::RequestTimeout.blame(), Blame::Client);
        assert!(!r.headers().contains_key(WWW_AUTHENTICATE));
    }

    #[test]
    fn a_malformed_body_is_a_400_blamed_on_the_client() {
        let r = ProxyError::MalformedBody.respond(Dialect::Http);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(ProxyError::MalformedBody.blame(), Blame::Client);
        assert!(!r.headers().contains_key(WWW_AUTHENTICATE));
        let grpc = ProxyError::MalformedBody.respond(Dialect::Grpc);
        assert_eq!(grpc.headers()["grpc-status"], "13");
    }

    #[test]
    fn the_relays_answers_carry_a_date() {
        let mut out = Vec::new();
        ProxyError::InvalidKey.render_http1(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        let date = text
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .expect("a date header");
        let parsed = httpdate::parse_http_date(date).expect("an IMF-fixdate");
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off.as_secs() < 5, "{date}");
    }

    #[test]
    fn rate_limited_is_a_429_with_retry_after() {
        let r = ProxyError::RateLimited.respond(Dialect::Http);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        assert_eq!(ProxyError::RateLimited.blame(), Blame::Client);
        let grpc = ProxyError::RateLimited.respond(Dialect::Grpc);
        assert_eq!(grpc.headers()["grpc-status"], "8");
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let r = ProxyError::InvalidKey.respond(Dialect::Http);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(WWW_AUTHENTICATE));
        assert!(!ProxyError::Forbidden
            .respond(Dialect::Http)
            .headers()
            .contains_key(WWW_AUTHENTICATE));
    }
}
