//! Header rewriting between client and upstream: strip spoofed identity
//! headers (any case, `_` for `-`), the credential and hop-by-hop headers;
//! add `x-forwarded-*` and `x-request-id`; inject the verified identity.
//!
//! Identity values come prebuilt with the cached key; the rest are static or
//! built once per connection, so a rewrite only clones `HeaderValue`s.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{
    AUTHORIZATION, CONNECTION, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};

use crate::auth::{CredentialSource, VerifiedKey};

use super::routes::Route;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Headers some frameworks take over the request line (Symfony and Zend
/// read `X-Original-URL` and `X-Rewrite-URL`, as IIS's URL Rewrite sets
/// them): a client sending one would have a path served other than the one
/// its route authorized. keygate is the front of the upstream, so nobody
/// before it may set them; they are removed like the identity headers.
static PATH_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];
/// Headers by which a proxy before keygate describes the client, which
/// keygate does not set itself: kept from a trusted proxy, removed from
/// anyone else (apps read the client's address from them).
static CLIENT_DESCRIPTIONS: [&str; 2] = ["forwarded", "x-real-ip"];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// The settings of an `h2c` upgrade, connection-specific by definition
/// (RFC 7540 section 3.2.1), which keygate never performs.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The identity header names under the configured prefix, built once.
#[derive(Debug, Clone)]
pub struct HeaderRules {
    /// Lowercase prefix; inbound names matching it (with `_` for `-`) go.
    /// Shared so that a request body's trailer filter gets it without
    /// allocating.
    prefix: Arc<[u8]>,
    key_id: HeaderName,
    owner_id: HeaderName,
    owner_type: HeaderName,
    owner_name: HeaderName,
    namespace: HeaderName,
    role: HeaderName,
    api_key_header: HeaderName,
    keep_credential: bool,
}

/// What the rewrite needs to know about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's IP, as an `x-forwarded-for` element.
    pub peer_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: HeaderValue,
    /// The peer is one of `proxy.trusted_proxies`: its `x-forwarded-proto`,
    /// `x-forwarded-host`, `forwarded` and `x-real-ip` describe the client
    /// and are kept.
    pub trusted_proxy: bool,
}

/// An HTTP/1.1 request head as the relay parsed it, with the target it
/// forwards (normalized where the path was).
#[derive(Clone, Copy)]
pub struct RawHead<'h> {
    pub method: &'h [u8],
    pub target: &'h [u8],
    pub headers: &'h [httparse::Header<'h>],
}

/// Connection-level headers that never cross a proxy (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&HeaderName; 9] = [
    &CONNECTION,
    &HTTP2_SETTINGS,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &PROXY_AUTHENTICATE,
    &PROXY_AUTHORIZATION,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

impl HeaderRules {
    /// `prefix` and `api_key_header` were validated by the config.
    pub fn new(prefix: &str, api_key_header: &str, keep_credential: bool) -> HeaderRules {
        let prefix = prefix.to_ascii_lowercase();
        let name = |suffix: &str| {
            HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes())
                .expect("validated identity prefix")
        };
        HeaderRules {
            key_id: name("key-id"),
            owner_id: name("owner-id"),
            owner_type: name("owner-type"),
            owner_name: name("owner-name"),
            namespace: name("namespace"),
            role: name("role"),
            prefix: prefix.into_bytes().into(),
            api_key_header: HeaderName::from_bytes(api_key_header.as_bytes())
                .expect("validated key header"),
            keep_credential,
        }
    }

    /// Whether an inbound header name claims to be one of ours: the prefix,
    /// compared case-insensitively (hyper lowercases names already) and with
    /// `_` standing for `-`, because some servers treat them alike.
    pub fn is_identity_header(&self, name: &HeaderName) -> bool {
        is_identity_name(&self.prefix, name)
    }

    /// Wraps a request body so that its trailers get the same anti-spoofing
    /// as its headers (see [`StripTrailers`]).
    pub fn strip_trailers<B>(&self, body: B) -> StripTrailers<B> {
        StripTrailers {
            inner: body,
            prefix: self.prefix.clone(),
        }
    }

    /// Rewrites request headers in place for forwarding. `upgrade` keeps
    /// `Connection: upgrade` and `Upgrade` for a WebSocket handshake.
    pub fn rewrite_request(
        &self,
        headers: &mut HeaderMap,
        conn: &ConnectionInfo,
        identity: Option<(&VerifiedKey, CredentialSource)>,
        route: &Route,
        upgrade: bool,
    ) {
        self.strip_spoofed(headers);
        if !self.keep_credential {
            // The key header is keygate's whichever header the credential
            // came from: a second key sent beside the one that
            // authenticated must not reach the upstream either. Another
            // scheme's `Authorization` is the upstream's and stays.
            headers.remove(&self.api_key_header);
            self.strip_key_header_look_alikes(headers);
            if let Some((_, CredentialSource::Authorization)) = identity {
                headers.remove(AUTHORIZATION);
            }
        }
        let upgrade_to = if upgrade {
            headers.get(UPGRADE).cloned()
        } else {
            None
        };
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade_to {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, protocol);
        }

        let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
            Some(existing) => {
                let mut joined = Vec::with_capacity(existing.len() + 2 + conn.peer_ip.len());
                joined.extend_from_slice(existing.as_bytes());
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(conn.peer_ip.as_bytes());
                HeaderValue::from_bytes(&joined).unwrap_or_else(|_| conn.peer_ip.clone())
            }
            None => conn.peer_ip.clone(),
        };
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
        // A trusted proxy's values describe the client; anyone else's are
        // replaced (or removed, for a host without a Host header).
        if !conn.trusted_proxy {
            for name in CLIENT_DESCRIPTIONS {
                headers.remove(name);
            }
        }
        let keep_proto = conn.trusted_proxy && headers.contains_key(&X_FORWARDED_PROTO);
        let keep_host = conn.trusted_proxy && headers.contains_key(&X_FORWARDED_HOST);
        if !keep_proto {
            headers.insert(X_FORWARDED_PROTO.clone(), conn.proto.clone());
        }
        if !keep_host {
            match headers.get(HOST).cloned() {
                Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
                None => headers.remove(&X_FORWARDED_HOST),
            };
        }
        for name in PATH_OVERRIDES {
            headers.remove(name);
        }
        if !headers.contains_key(&X_REQUEST_ID) {
            headers.insert(X_REQUEST_ID.clone(), new_request_id());
        }

        if let Some((key, _)) = identity {
            for (name, value) in self.identity_pairs(key, Some(route)) {
                headers.insert(name.clone(), value);
            }
        }
    }

    /// The relay's version of [`Self::rewrite_request`], on the raw head of
    /// an HTTP/1.1 request: writes the request line and every header that
    /// survives the rewrite into `out`, then the forwarding headers, with
    /// `new_request_id` when the client sent no `x-request-id`. The
    /// identity follows once the key is verified ([`Self::write_identity`]).
    /// The relay only passes heads whose `Connection` names no header and
    /// that carry no `Upgrade` or `Transfer-Encoding`, so dropping the fixed
    /// hop-by-hop names is the whole of the hop-by-hop rule here.
    pub fn write_request_head(
        &self,
        out: &mut Vec<u8>,
        head: &RawHead<'_>,
        conn: &ConnectionInfo,
        source: CredentialSource,
        new_request_id: &[u8],
    ) {
        let RawHead {
            method,
            target,
            headers,
        } = *head;
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let key_header = self.api_key_header.as_str().as_bytes();
        let from_authorization = source == CredentialSource::Authorization;
        let (mut forwarded_for, mut host, mut request_id) = (None, None, false);
        // Whether a trusted proxy's x-forwarded-proto / -host were kept.
        let (mut kept_proto, mut kept_host) = (false, false);
        for header in headers {
            let name = header.name.as_bytes();
            let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
            if is_identity_bytes(&self.prefix, name)
                || (!self.keep_credential
                    && (is_key_header_bytes(key_header, name)
                        || (from_authorization && is(b"authorization"))))
                || is_hop_by_hop_bytes(name, header.value)
                || PATH_OVERRIDES.iter().any(|o| is(o.as_bytes()))
            {
                continue;
            }
            if is(b"x-forwarded-proto")
                || is(b"x-forwarded-host")
                || CLIENT_DESCRIPTIONS.iter().any(|d| is(d.as_bytes()))
            {
                if !conn.trusted_proxy {
                    continue;
                }
                kept_proto |= is(b"x-forwarded-proto");
                kept_host |= is(b"x-forwarded-host");
            }
            if is(b"x-forwarded-for") {
                // Like `HeaderMap::get`, the first value is the one extended.
                forwarded_for.get_or_insert(header.value);
                continue;
            }
            if is(b"host") {
                host = Some(header.value);
            } else if is(b"x-request-id") {
                request_id = true;
            }
            put_header(out, name, header.value);
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(existing) = forwarded_for {
            out.extend_from_slice(existing);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(conn.peer_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        if !kept_proto {
            put_header(out, b"x-forwarded-proto", conn.proto.as_bytes());
        }
        if let Some(host) = host.filter(|_| !kept_host) {
            put_header(out, b"x-forwarded-host", host);
        }
        if !request_id {
            put_header(out, b"x-request-id", new_request_id);
        }
    }

    /// Appends the verified identity to a head written by
    /// [`Self::write_request_head`], and the blank line that ends it.
    /// The values are borrowed ([`Self::identity`]), so nothing is
    /// allocated or reference-counted per request.
    pub fn write_identity(&self, out: &mut Vec<u8>, key: &VerifiedKey, route: &Route) {
        for (name, value) in self.identity(key, Some(route)) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }

    /// The identity headers of a verified key as `HeaderValue`s, for
    /// hyper's path and forward-auth answers.
    pub fn identity_pairs<'a>(
        &'a self,
        key: &'a VerifiedKey,
        route: Option<&'a Route>,
    ) -> impl Iterator<Item = (&'a HeaderName, HeaderValue)> {
        self.identity(key, route)
            .map(|(name, value)| (name, value.to_header_value()))
    }

    /// The one list of identity headers and where each value comes from.
    fn identity<'a>(
        &'a self,
        key: &'a VerifiedKey,
        route: Option<&'a Route>,
    ) -> impl Iterator<Item = (&'a HeaderName, Identity<'a>)> {
        let owner = &key.owner.headers;
        [
            (&self.key_id, Identity::KeyId(key)),
            (&self.owner_id, Identity::Built(&owner.owner_id)),
            (&self.owner_type, Identity::Built(&owner.owner_type)),
            (&self.owner_name, Identity::Built(&owner.owner_name)),
            (&self.role, Identity::Built(&owner.role)),
        ]
        .into_iter()
        .chain(
            route
                .and_then(|r| r.namespace_header.as_ref())
                .map(|ns| (&self.namespace, Identity::Built(ns))),
        )
    }

    /// Removes the key header spelled with `_` for `-` (`x_api_key`), which
    /// servers that read headers through CGI-style names (`HTTP_X_API_KEY`)
    /// take for the key header itself: a key sent so beside the credential
    /// would reach them as a credential, as the identity prefix's
    /// look-alikes would reach them as identity.
    fn strip_key_header_look_alikes(&self, headers: &mut HeaderMap) {
        let key_header = self.api_key_header.as_str().as_bytes();
        let is_look_alike = |name: &HeaderName| {
            name.as_str().contains('_') && is_key_header_bytes(key_header, name.as_str().as_bytes())
        };
        // As in `strip_spoofed`: the common request allocates nothing.
        if !key_header.contains(&b'-') || !headers.keys().any(is_look_alike) {
            return;
        }
        let look_alikes: Vec<HeaderName> = headers
            .keys()
            .filter(|n| is_look_alike(n))
            .cloned()
            .collect();
        for name in look_alikes {
            headers.remove(&name);
        }
    }

    fn strip_spoofed(&self, headers: &mut HeaderMap) {
        // Collecting is rare (only when a client sends such a header), so the
        // common path allocates nothing.
        if !headers.keys().any(|name| self.is_identity_header(name)) {
            return;
        }
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.is_identity_header(name))
            .cloned()
            .collect();
        for name in spoofed {
            headers.remove(&name);
        }
    }
}

/// An identity header's value, borrowed: the key's id (Crockford base32,
/// made a `HeaderValue` only where one is needed, see
/// [`VerifiedKey::key_id_header`]) or a value built once with the owner or
/// the route.
#[derive(Clone, Copy)]
enum Identity<'a> {
    KeyId(&'a VerifiedKey),
    Built(&'a HeaderValue),
}

impl Identity<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Identity::KeyId(key) => key.id.as_str().as_bytes(),
            Identity::Built(value) => value.as_bytes(),
        }
    }

    fn to_header_value(self) -> HeaderValue {
        match self {
            Identity::KeyId(key) => key.key_id_header(),
            Identity::Built(value) => value.clone(),
        }
    }
}

/// The relay's response head: the upstream's status line and headers,
/// minus hop-by-hop ones (and those `Connection` names), keeping
/// `Transfer-Encoding` when the body is passed through chunked, and with
/// `connection: close` when the client connection ends after it.
pub fn write_response_head(
    out: &mut Vec<u8>,
    code: u16,
    reason: &[u8],
    headers: &[httparse::Header<'_>],
    keep_transfer_encoding: bool,
    close: bool,
) {
    // httparse guarantees three digits.
    let digits = [
        (code / 100) as u8,
        (code / 10 % 10) as u8,
        (code % 10) as u8,
    ];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend(digits.map(|d| b'0' + d));
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
    // Upstreams mostly send none, or `keep-alive`/`close`, which name no
    // header: then the per-header search is skipped.
    let names_headers = connection_tokens(headers).any(|token| {
        !token.eq_ignore_ascii_case(b"keep-alive") && !token.eq_ignore_ascii_case(b"close")
    });
    for header in headers {
        let name = header.name.as_bytes();
        let named_by_connection =
            names_headers && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(name));
        let transfer_encoding = name.eq_ignore_ascii_case(b"transfer-encoding");
        if named_by_connection
            || (is_hop_by_hop_bytes(name, header.value)
                && !(transfer_encoding && keep_transfer_encoding))
        {
            continue;
        }
        put_header(out, name, header.value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated tokens of every `Connection` header, trimmed.
pub fn connection_tokens<'s, 'a: 's>(
    headers: &'s [httparse::Header<'a>],
) -> impl Iterator<Item = &'a [u8]> + 's {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&c| c == b','))
        .map(<[u8]>::trim_ascii)
}

/// One `name: value` line of an HTTP/1 head.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// [`HOP_BY_HOP`] and `TE` (unless it is `trailers`), on raw bytes.
fn is_hop_by_hop_bytes(name: &[u8], value: &[u8]) -> bool {
    if name.eq_ignore_ascii_case(b"te") {
        return !value.eq_ignore_ascii_case(b"trailers");
    }
    HOP_BY_HOP
        .iter()
        .any(|hop| name.eq_ignore_ascii_case(hop.as_str().as_bytes()))
}

/// Whether `name` begins with the (lowercase) `prefix`, in any case and
/// with `_` for `-`.
fn is_identity_bytes(prefix: &[u8], name: &[u8]) -> bool {
    name.len() >= prefix.len()
        && name
            .iter()
            .zip(prefix)
            .all(|(&n, &p)| n.to_ascii_lowercase() == p || (n == b'_' && p == b'-'))
}

/// Whether `name` is the (lowercase) key header `key`, in any case and with
/// `_` for `-`: the whole of it spelled as an identity prefix may be.
fn is_key_header_bytes(key: &[u8], name: &[u8]) -> bool {
    name.len() == key.len() && is_identity_bytes(key, name)
}

fn is_identity_name(prefix: &[u8], name: &HeaderName) -> bool {
    is_identity_bytes(prefix, name.as_str().as_bytes())
}

/// A request body whose trailer fields lose every identity-prefixed name.
/// HTTP/1.1 chunked and HTTP/2 requests may end with trailers, which travel
/// to an h2c (gRPC) upstream as trailers; an upstream that reads them as
/// metadata would otherwise see an identity the client chose.
#[derive(Debug)]
pub struct StripTrailers<B> {
    inner: B,
    prefix: Arc<[u8]>,
}

impl<B> Body for StripTrailers<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut polled {
            if let Some(trailers) = frame.trailers_mut() {
                let spoofed: Vec<HeaderName> = trailers
                    .keys()
                    .filter(|name| is_identity_name(&self.prefix, name))
                    .cloned()
                    .collect();
                for name in spoofed {
                    trailers.remove(&name);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `TE: trailers` survives: gRPC over HTTP/2 requires it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(&name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let te_is_trailers = headers
        .get(TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_is_trailers {
        headers.remove(TE);
    }
}

/// The request's `x-request-id`: the client's first, or a new one inserted
/// now, so that the access log names the id the upstream receives.
pub fn settle_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        return id.clone();
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// A unique request id: a per-process random prefix and a counter, so that
/// generating one costs no syscall.
fn new_request_id() -> HeaderValue {
    HeaderValue::from_bytes(&request_id_bytes()).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The 32 hex digits of [`new_request_id`], without allocating.
pub fn request_id_bytes() -> [u8; 32] {
    static PREFIX: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        u64::from_le_bytes(b)
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 32];
    let hex = b"0123456789abcdef";
    for (i, byte) in PREFIX
        .to_be_bytes()
        .iter()
        .chain(n.to_be_bytes().iter())
        .enumerate()
    {
        buf[2 * i] = hex[usize::from(byte >> 4)];
        buf[2 * i + 1] = hex[usize::from(byte & 0xf)];
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoofed_names_in_every_disguise() {
        let rules = HeaderRules::new("x-keygate-", "x-api-key", false);
        for name in [
            "x-keygate-key-id",
            "x_keygate_owner_id",
            "x-keygate_role",
            "x-keygate-anything",
        ] {
            assert!(
                rules.is_identity_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
        }
        for name in ["x-keygat", "x-other", "keygate-key-id"] {
            assert!(
                !rules.is_identity_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-secret-hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("gzip"));
        h.insert("x-stays", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut grpc = HeaderMap::new();
        grpc.insert(TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc);
        assert_eq!(grpc[TE], "trailers");
    }

    #[test]
    fn request_ids_are_unique() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
