//! The TOML configuration: typed structs with a default for every field, and
//! the validation that runs once, at load, so that an invalid file never
//! reaches the running proxy. Every error names the field, the value and the
//! rule it broke.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::Uri;
use serde::{Deserialize, Deserializer};

use crate::store::Permission;

pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
pub const DEFAULT_STORE_URL: &str = "sqlite://keygate.db";
pub const DEFAULT_KEY_PREFIX: &str = "kg";
pub const DEFAULT_IDENTITY_PREFIX: &str = "x-keygate-";
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// The largest `proxy.max_headers`: room for this many is made on every
/// request head hyper parses.
pub const MAX_HEADERS_LIMIT: usize = 10_000;
/// The largest `proxy.worker_threads`.
pub const MAX_WORKER_THREADS: usize = 1024;
/// The largest `proxy.max_connections`.
pub const MAX_CONNECTIONS_LIMIT: usize = 10_000_000;
/// The longest `proxy.drain_timeout`: past it a stop is not a drain but a
/// hang, and what stops keygate (systemd, Kubernetes) gives up long before.
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The smallest `admin.max_body_bytes`: below it, creating a key with a
/// description of any length is refused with 413.
pub const MIN_ADMIN_BODY_BYTES: usize = 1024;
/// The largest `admin.max_body_bytes`: an admin body is a few hundred bytes
/// of JSON, and one is read whole before its caller is known to be allowed.
pub const MAX_ADMIN_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A configuration error, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config is not valid TOML for keygate: {0}")]
    Parse(String),
    #[error("config field `{field}` = {value:?} is invalid: {rule}")]
    Invalid {
        field: String,
        value: String,
        rule: Cow<'static, str>,
    },
}

fn invalid(
    field: impl Into<String>,
    value: impl ToString,
    rule: impl Into<Cow<'static, str>>,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The data plane: where it listens, where it forwards, its limits.
    pub proxy: ProxyConfig,
    /// Routes by host and path prefix; empty means every request goes to
    /// `proxy.upstream` (the sidecar case).
    pub routes: Vec<RouteConfig>,
    /// The control plane listener (admin API, metrics, health).
    pub admin: AdminConfig,
    /// Where keys live.
    pub store: StoreConfig,
    /// The verified-key cache in front of the store.
    pub cache: CacheConfig,
    /// Token format.
    pub keys: KeysConfig,
    /// Logging.
    pub log: LogConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Per-key usage records.
    pub usage: UsageConfig,
    /// Per-key request rate limit.
    pub rate_limit: RateLimitConfig,
    /// The built-in echo upstream, for trying keygate out.
    pub echo: EchoConfig,
    /// The forward-auth decision endpoint on the proxy listener.
    pub forward_auth: ForwardAuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// Serve decisions (200 + identity headers, or the rejection) at `path`
    /// on the proxy listener, for nginx auth_request, Traefik ForwardAuth
    /// and Envoy ext_authz.
    pub enabled: bool,
    /// Path of the decision endpoint; Envoy's appended original path is
    /// accepted below it.
    pub path: String,
}

impl Default for ForwardAuthConfig {
    fn default() -> Self {
        ForwardAuthConfig {
            enabled: false,
            path: "/verify".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Where to run an echo upstream that answers with what it received;
    /// absent (the default) runs none.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the proxy listener (HTTP/1.1 and h2c on one port).
    pub listen: SocketAddr,
    /// The upstream every request goes to when no `[[routes]]` are given.
    #[serde(deserialize_with = "deserialize_upstream_opt")]
    pub upstream: Option<Uri>,
    /// How to speak to `http://` upstreams: `auto` (h2c for gRPC requests,
    /// HTTP/1.1 otherwise), `http1` or `h2c`.
    pub upstream_protocol: UpstreamProtocol,
    /// Forward the credential to the upstream instead of removing it.
    pub keep_credential: bool,
    /// Header that may carry a token besides `Authorization`.
    pub api_key_header: String,
    /// Prefix of the identity headers; inbound headers with it are removed.
    pub identity_header_prefix: String,
    /// How long to wait for the upstream's response headers, counted from
    /// when the whole request (head and body) has been sent to it.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// How long to wait for a TCP connection to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a client may take to send its request headers (slow-loris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client connection may have no request in progress before
    /// it is closed (HTTP/2: GOAWAY).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Deadline for a request's exchange up to the response head: the
    /// client's upload and the upstream's answer (then 408). Nothing is cut
    /// once the response head is on its way.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Most request headers accepted on one request.
    pub max_headers: usize,
    /// Most client connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// How long in-flight requests may run after SIGTERM; more than zero
    /// and at most [`MAX_DRAIN_TIMEOUT`] (see `Config::validate`).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Runtime worker threads; 0 means one per CPU this process may use
    /// (its affinity mask). With one, keygate runs a single-threaded runtime,
    /// which spends less per request than a one-worker multi-threaded one.
    pub worker_threads: usize,
    /// Serve plain HTTP/1.1 requests to `http://` upstreams with the relay
    /// (`proxy::relay`) instead of hyper; everything else uses hyper anyway.
    pub http1_relay: bool,
    /// How request paths are read before routing (`proxy::path`): `strict`
    /// normalizes them, forwards the normalized path and refuses encoded
    /// slashes; `keep_encoded_slashes` forwards `%2F` and `%5C` as they are
    /// (for upstreams that do not decode them); `off` routes and forwards
    /// the bytes the client sent. Only when some route has a path prefix
    /// other than `/`; without one the path goes upstream as sent.
    pub path_normalization: PathNormalization,
    /// Serve TLS (ALPN h2 and http/1.1) on `listen` instead of plain TCP.
    pub tls: Option<TlsConfig>,
    /// Peers whose `x-forwarded-proto` and `x-forwarded-host` are kept
    /// (a TLS-terminating ingress in front of keygate): addresses or
    /// CIDR ranges. From anyone else those two are replaced by what keygate
    /// saw; `x-forwarded-for` is appended to either way.
    #[serde(deserialize_with = "deserialize_nets")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// CA bundle (PEM) trusted for `https://` upstreams instead of the
    /// system's roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// Forward CORS preflights that carry no API key (an `OPTIONS` with
    /// `Origin` and `Access-Control-Request-Method`) to the upstream
    /// without authenticating them, so that it answers them: browsers
    /// never send credentials on a preflight. The default for every route;
    /// a route's own `cors_allow_preflight` overrides it.
    pub cors_allow_preflight: bool,
}

/// The proxy listener's certificate, reloaded on SIGHUP or when the files change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: DEFAULT_PROXY_LISTEN.parse().expect("valid default"),
            upstream: None,
            upstream_protocol: UpstreamProtocol::Auto,
            keep_credential: false,
            api_key_header: DEFAULT_API_KEY_HEADER.into(),
            identity_header_prefix: DEFAULT_IDENTITY_PREFIX.into(),
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            worker_threads: 0,
            http1_relay: true,
            path_normalization: PathNormalization::Strict,
            tls: None,
            trusted_proxies: Vec::new(),
            upstream_ca_file: None,
            cors_allow_preflight: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Auto,
    Http1,
    H2c,
}

/// How request paths are read before routing; see `proxy::path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathNormalization {
    Strict,
    KeepEncodedSlashes,
    Off,
}

/// One route: requests whose host and path match go to its upstream, in its
/// namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Host to match (without port); absent matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, on segment boundaries; default `/`.
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Where matching requests go.
    #[serde(deserialize_with = "deserialize_upstream")]
    pub upstream: Uri,
    /// Namespace the route belongs to; keys must be scoped to it.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Permission required on the namespace, instead of read for
    /// GET/HEAD/OPTIONS and write otherwise.
    #[serde(default)]
    pub permission: Option<Permission>,
    /// Match `path_prefix` case-sensitively (the default, as RFC 3986
    /// paths are); `false` for an upstream that serves `/ADMIN` as
    /// `/admin` (IIS), so that every spelling is authorized here.
    #[serde(default = "case_sensitive_by_default")]
    pub case_sensitive: bool,
    /// Forward CORS preflights without an API key to this route's upstream
    /// (see `[proxy] cors_allow_preflight`, the default).
    #[serde(default)]
    pub cors_allow_preflight: Option<bool>,
}

fn case_sensitive_by_default() -> bool {
    true
}

fn default_path_prefix() -> String {
    "/".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; it serves /api/v1, /metrics, /healthz, /readyz.
    pub listen: SocketAddr,
    /// Largest admin request body, in bytes, from
    /// [`MIN_ADMIN_BODY_BYTES`] to [`MAX_ADMIN_BODY_BYTES`].
    pub max_body_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            max_body_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created on first start), or `postgres://...` for a
    /// store shared by several replicas (migrated on start).
    pub url: String,
    /// Listen for change announcements (PostgreSQL `LISTEN/NOTIFY`), so other
    /// replicas' changes reach this cache in milliseconds. Turn off where
    /// `LISTEN` cannot work (behind a transaction-pooling PgBouncer); then
    /// `cache.poll_interval` alone bounds how stale the cache can be.
    pub notify: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: DEFAULT_STORE_URL.into(),
            notify: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Most keys held in the cache.
    pub capacity: u64,
    /// How long a verified key is trusted before it is read again.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long an unknown id is remembered as unknown.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// How long past `ttl` a cached key keeps working while the store is down.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// How often the store's change feed is read, to drop keys that another
    /// replica (or process on the same SQLite file) changed. It bounds
    /// staleness when announcements are lost or unavailable.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 1_000_000,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(2),
            stale_if_error: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Token prefix, so that leaked keys are recognisable.
    pub prefix: String,
    /// Also accept tokens imported from another system (`keygate apikey
    /// import`): any `<prefix>_...` token of URL-safe characters, verified by
    /// the SHA-256 of the whole token.
    pub accept_imported: bool,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            prefix: DEFAULT_KEY_PREFIX.into(),
            accept_imported: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// Default filter when RUST_LOG is not set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Most distinct `key_id` label values; the rest count as `_other`.
    pub max_key_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_key_series: 10_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second each key may make on average, over all routes;
    /// 0 turns rate limiting off.
    pub per_key_per_second: u32,
    /// Requests a key may make at once after a quiet spell; 0 means the
    /// same as `per_key_per_second`.
    pub burst: u32,
}

impl RateLimitConfig {
    /// The effective burst: at least one request.
    pub fn burst(&self) -> u32 {
        if self.burst == 0 {
            self.per_key_per_second.max(1)
        } else {
            self.burst
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    /// How often per-key usage is written to the store, in one batch.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            flush_interval: Duration::from_secs(5),
        }
    }
}

// === impl Config ===

impl FromStr for Config {
    type Err = ConfigError;

    /// Parses and validates: there is no way to get an unvalidated `Config`
    /// from text.
    fn from_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        text.parse()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.proxy.upstream.is_none() && self.routes.is_empty() && !self.forward_auth.enabled {
            return Err(invalid(
                "proxy.upstream",
                "",
                "set an upstream, at least one [[routes]] entry, or enable [forward_auth]",
            ));
        }
        let fa_path = &self.forward_auth.path;
        if !fa_path.starts_with('/') || fa_path.len() < 2 || fa_path.ends_with('/') {
            return Err(invalid(
                "forward_auth.path",
                fa_path,
                "must start with '/', not end with '/', and not be '/' alone",
            ));
        }
        // Caught here rather than at bind, where it reads as a port another
        // process holds (exit 69, "may pass"), and `check` would not see it.
        let mut listeners = vec![
            ("proxy.listen", self.proxy.listen),
            ("admin.listen", self.admin.listen),
        ];
        listeners.extend(self.echo.listen.map(|addr| ("echo.listen", addr)));
        for (i, (field, addr)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| same_socket(*a, *addr)) {
                return Err(invalid(
                    *field,
                    addr,
                    format!(
                        "is the same address as {other}: two listeners cannot share a port; \
                         give each its own"
                    ),
                ));
            }
        }
        validate_header_name("proxy.api_key_header", &self.proxy.api_key_header)?;
        let prefix = &self.proxy.identity_header_prefix;
        validate_header_name("proxy.identity_header_prefix", prefix)?;
        if prefix.len() < 3 || !prefix.ends_with('-') {
            return Err(invalid(
                "proxy.identity_header_prefix",
                prefix,
                "must be at least 3 characters and end with '-'",
            ));
        }
        let key_header = self.proxy.api_key_header.to_ascii_lowercase();
        if key_header == "authorization" || key_header.starts_with(&prefix.to_ascii_lowercase()) {
            return Err(invalid(
                "proxy.api_key_header",
                &self.proxy.api_key_header,
                "must not be Authorization or start with the identity prefix",
            ));
        }
        for (field, value) in [
            ("proxy.upstream_timeout", self.proxy.upstream_timeout),
            ("proxy.connect_timeout", self.proxy.connect_timeout),
            ("proxy.header_read_timeout", self.proxy.header_read_timeout),
            ("proxy.idle_timeout", self.proxy.idle_timeout),
            ("proxy.request_timeout", self.proxy.request_timeout),
            ("cache.ttl", self.cache.ttl),
            ("cache.poll_interval", self.cache.poll_interval),
            ("usage.flush_interval", self.usage.flush_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "0s", "must be greater than zero"));
            }
        }
        // Zero reads as "do not wait" to some and "wait for ever" to others;
        // what it did was cut every request in flight at SIGTERM, with a
        // warning that the deadline was reached. Neither reading is a safe
        // guess, so it is refused like the other timeouts.
        let drain_timeout = self.proxy.drain_timeout;
        let max_drain = humantime::format_duration(MAX_DRAIN_TIMEOUT);
        if drain_timeout.is_zero() {
            return Err(invalid(
                "proxy.drain_timeout",
                "0s",
                format!(
                    "must be greater than zero and at most {max_drain}: at 0s every request in \
                     flight at SIGTERM would be cut; for a quick stop set a short one such as \"1s\""
                ),
            ));
        }
        // A stop that may wait for hours is a hang to whoever sent it (and
        // their own deadline kills keygate first, the drain undone).
        if drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(invalid(
                "proxy.drain_timeout",
                humantime::format_duration(drain_timeout),
                format!("must be greater than zero and at most {max_drain}"),
            ));
        }
        // Zero refused every admin request with a body (413), creating keys
        // included.
        if !(MIN_ADMIN_BODY_BYTES..=MAX_ADMIN_BODY_BYTES).contains(&self.admin.max_body_bytes) {
            return Err(invalid(
                "admin.max_body_bytes",
                self.admin.max_body_bytes,
                format!("must be from {MIN_ADMIN_BODY_BYTES} to {MAX_ADMIN_BODY_BYTES}"),
            ));
        }
        if self.proxy.max_header_bytes < 1024 {
            return Err(invalid(
                "proxy.max_header_bytes",
                self.proxy.max_header_bytes,
                "must be at least 1024",
            ));
        }
        // hyper makes room for `max_headers` headers on every request head
        // it parses (an overflow panics): bounded well above any client's.
        if !(1..=MAX_HEADERS_LIMIT).contains(&self.proxy.max_headers) {
            return Err(invalid(
                "proxy.max_headers",
                self.proxy.max_headers,
                format!("must be from 1 to {MAX_HEADERS_LIMIT}"),
            ));
        }
        // The runtime makes room for every worker up front (an overflow
        // panics); a thousand is far past any machine's use.
        if self.proxy.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "proxy.worker_threads",
                self.proxy.worker_threads,
                format!("must be from 0 (one per CPU) to {MAX_WORKER_THREADS}"),
            ));
        }
        // Bounded by the semaphore that holds them (more panics), and well
        // below that by any process's file descriptors.
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.proxy.max_connections) {
            return Err(invalid(
                "proxy.max_connections",
                self.proxy.max_connections,
                format!("must be from 1 to {MAX_CONNECTIONS_LIMIT}"),
            ));
        }
        if let Some(upstream) = &self.proxy.upstream {
            refuse_credentials("proxy.upstream".into(), upstream)?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            refuse_credentials(format!("routes[{i}].upstream"), &route.upstream)?;
            if !route.path_prefix.starts_with('/') {
                return Err(invalid(
                    format!("routes[{i}].path_prefix"),
                    &route.path_prefix,
                    "must start with '/'",
                ));
            }
            // Requests are normalized before routing: a prefix that is not
            // normal itself could never match.
            let normal =
                crate::proxy::path::normalize(self.proxy.path_normalization, &route.path_prefix);
            if !matches!(normal, Ok(p) if p == route.path_prefix) {
                return Err(invalid(
                    format!("routes[{i}].path_prefix"),
                    &route.path_prefix,
                    "must be a normalized path, as requests are normalized before routing: \
                     no '.' or '..' segments, no '//', no escapes of letters, digits or '-._~', \
                     escapes in upper case, no encoded slash, backslash or NUL",
                ));
            }
            if let Some(host) = &route.host {
                if host.is_empty() || host.contains([':', '/', ' ']) || host.ends_with('.') {
                    return Err(invalid(
                        format!("routes[{i}].host"),
                        host,
                        "must be a bare host name, without port or trailing dot",
                    ));
                }
                // Hosts are compared whole: a pattern would never match,
                // and the namespace check it was meant to bring would be
                // silently skipped for the hosts it was meant to cover.
                if host.contains('*') {
                    return Err(invalid(
                        format!("routes[{i}].host"),
                        host,
                        "wildcards are not supported: a host matches only itself; \
                         give each host a route of its own",
                    ));
                }
            }
            // Routes of equal host and prefix are tried in config order, so
            // a later one could never match (nor one whose prefix differs
            // only in case from an earlier case-insensitive one).
            if let Some(j) = self.routes[..i].iter().position(|earlier| {
                let same_host = match (&earlier.host, &route.host) {
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    (None, None) => true,
                    _ => false,
                };
                let same_prefix = earlier.path_prefix == route.path_prefix
                    || (!earlier.case_sensitive
                        && earlier.path_prefix.eq_ignore_ascii_case(&route.path_prefix));
                same_host && same_prefix
            }) {
                return Err(ConfigError::Invalid {
                    field: format!("routes[{i}]"),
                    value: format!(
                        "{}{}",
                        route.host.as_deref().unwrap_or(""),
                        route.path_prefix
                    ),
                    rule: format!(
                        "has the same host and path_prefix as routes[{j}], which is tried \
                         first: routes[{i}] could never match; remove one or change its \
                         host or path_prefix"
                    )
                    .into(),
                });
            }
        }
        if self.cache.capacity == 0 {
            return Err(invalid("cache.capacity", 0, "must be greater than zero"));
        }
        let p = &self.keys.prefix;
        if p.is_empty()
            || p.len() > 16
            || !p
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(invalid(
                "keys.prefix",
                p,
                "must be 1 to 16 lowercase letters or digits",
            ));
        }
        let url = &self.store.url;
        if !["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            // Only the scheme is shown: a postgres URL may hold a password.
            let scheme = url.split_once(':').map_or(url.as_str(), |(s, _)| s);
            return Err(invalid(
                "store.url",
                format!("{scheme}:..."),
                "must be a sqlite://PATH or postgres://USER@HOST/DB URL",
            ));
        }
        // What the store would refuse when it opens: refused here, so that
        // `check` finds it and `serve` never gets that far.
        if let Err(rule) = crate::store::check_url(url) {
            return Err(invalid("store.url", crate::store::display_url(url), rule));
        }
        // Parsed as telemetry::init_logging parses it (RUST_LOG aside): a
        // filter that passed here and at reload would otherwise stop the
        // next start.
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid(
                "log.level",
                &self.log.level,
                format!("must be a tracing filter such as \"info\" or \"info,keygate=debug\": {e}"),
            ));
        }
        if self.metrics.max_key_series == 0 {
            return Err(invalid(
                "metrics.max_key_series",
                0,
                "must be greater than zero",
            ));
        }
        Ok(())
    }

    /// What is valid but cannot be what was meant, one sentence each naming
    /// the fields: `keygate check` prints them, `serve` logs them at start
    /// and at each reload. Warnings, not refusals: a config that started
    /// before keeps starting.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // Routes from the file are tried before the default one (the same
        // host and prefix, earlier in the table), so a host-less `/` route
        // takes every request `proxy.upstream` was there for.
        let catch_all = self
            .routes
            .iter()
            .position(|r| r.host.is_none() && r.path_prefix == "/");
        if let (Some(_), Some(i)) = (&self.proxy.upstream, catch_all) {
            warnings.push(format!(
                "proxy.upstream is never used: routes[{i}] (no host, path_prefix \"/\") \
                 matches every request first; remove proxy.upstream, or give routes[{i}] a \
                 host or a longer path_prefix"
            ));
        }
        warnings
    }
}

/// Whether binding both would collide: the same port on the same address,
/// or on any address where one of them is a wildcard (`0.0.0.0`, `[::]`).
/// Port 0 (any free port) never collides.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn validate_header_name(field: &str, value: &str) -> Result<(), ConfigError> {
    http::HeaderName::from_bytes(value.as_bytes())
        .map(drop)
        .map_err(|_| invalid(field, value, "must be a valid HTTP header name"))
}

/// Parses an upstream URI: `http://` or `https://`, a host, no path beyond `/`.
pub fn parse_upstream(value: &str) -> Result<Uri, &'static str> {
    let uri: Uri = value
        .parse()
        .map_err(|_| "must be an absolute http:// or https:// URI")?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("scheme must be http or https"),
    }
    let Some(authority) = uri.authority() else {
        return Err("must name a host");
    };
    if authority.host().is_empty() {
        return Err("must name a host");
    }
    // The URI grammar takes any digits (or none) after the colon; a port
    // that is not 1-65535 would only show as a 502 on every request.
    let host_and_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, rest)| rest);
    let has_port = host_and_port.len() > authority.host().len();
    if has_port && !matches!(authority.port_u16(), Some(port) if port != 0) {
        return Err("must have a port from 1 to 65535, or none for the scheme's default");
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must not have a path or query");
    }
    Ok(uri)
}

fn deserialize_upstream<'de, D: Deserializer<'de>>(d: D) -> Result<Uri, D::Error> {
    let text = String::deserialize(d)?;
    // Credentials are refused by `validate`, whose error can leave the
    // password out: TOML's errors quote the whole line.
    if let Ok(uri) = text.parse::<Uri>() {
        if userinfo(&uri).is_some() {
            return Ok(uri);
        }
    }
    parse_upstream(&text).map_err(|rule| {
        if text.contains('@') {
            serde::de::Error::custom(rule)
        } else {
            serde::de::Error::custom(format!("{text:?} {rule}"))
        }
    })
}

/// The `user:password@` of an upstream URI, which keygate never sends.
fn userinfo(uri: &Uri) -> Option<&str> {
    uri.authority()?
        .as_str()
        .rsplit_once('@')
        .map(|(info, _)| info)
}

/// Refuses credentials in an upstream URI, showing it without them.
fn refuse_credentials(field: String, uri: &Uri) -> Result<(), ConfigError> {
    if userinfo(uri).is_none() {
        return Ok(());
    }
    let host = uri.authority().map_or("", |a| a.as_str());
    let host = host.rsplit_once('@').map_or(host, |(_, host)| host);
    Err(invalid(
        field,
        format!("{}://***@{host}", uri.scheme_str().unwrap_or("http")),
        "must not hold credentials (user:password@): keygate does not send them to the \
         upstream, which gets the caller's identity headers instead; remove them",
    ))
}

fn deserialize_upstream_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uri>, D::Error> {
    deserialize_upstream(d).map(Some)
}

/// Addresses (`10.0.0.7`, `::1`) or CIDR ranges (`10.0.0.0/8`).
fn deserialize_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{text:?} is not an IP address or a CIDR range (e.g. 10.0.0.0/8)"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c: Config = "[proxy]\nupstream = \"http://127.0.0.1:9000\"\n"
            .parse()
            .expect("valid");
        assert_eq!(c.proxy.listen.port(), 8080);
        assert_eq!(c.cache.stale_if_error, Duration::from_secs(300));
        assert_eq!(c.keys.prefix, "kg");
        assert_eq!(c.proxy.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.proxy.request_timeout, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("", "proxy.upstream"),
            ("[proxy]\nupstream = \"ftp://x\"", "upstream"),
            (
                "[proxy]\nupstream = \"http://a\"\n[keys]\nprefix = \"K_\"",
                "keys.prefix",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\nupstream_timeout = \"0s\"",
                "proxy.upstream_timeout",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\nidle_timeout = \"0s\"",
                "proxy.idle_timeout",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\nrequest_timeout = \"0s\"",
                "proxy.request_timeout",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\nrequest_timeout = \"soon\"",
                "request_timeout",
            ),
            ("[proxy]\nupstream = \"http://a\"\nbogus = 1", "bogus"),
            (
                "[proxy]\nupstream = \"http://a\"\npath_normalization = \"loose\"",
                "path_normalization",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\ntrusted_proxies = [\"10.0.0.0/33\"]",
                "is not an IP address or a CIDR range",
            ),
            (
                "[[routes]]\npath_prefix = \"/a//b\"\nupstream = \"http://a\"",
                "routes[0].path_prefix",
            ),
            (
                "[[routes]]\npath_prefix = \"/%61pi\"\nupstream = \"http://a\"",
                "must be a normalized path",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[store]\nurl = \"mysql://x\"",
                "store.url",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[log]\nlevel = \"loud=x\"",
                "log.level",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[log]\nlevel = \"keygate=verbose\"",
                "log.level",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\ndrain_timeout = \"0s\"",
                "proxy.drain_timeout",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\ndrain_timeout = \"1h 1s\"",
                "`proxy.drain_timeout` = \"1h 1s\" is invalid: must be greater than zero and at most 1h",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\ndrain_timeout = \"100years\"",
                "proxy.drain_timeout",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[admin]\nmax_body_bytes = 0",
                "admin.max_body_bytes",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[admin]\nmax_body_bytes = 1023",
                "admin.max_body_bytes",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[admin]\nmax_body_bytes = 16777217",
                "admin.max_body_bytes",
            ),
        ];
        for (text, field) in cases {
            let err = text.parse::<Config>().expect_err(text).to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }

    #[test]
    fn a_drain_timeout_at_the_bounds_is_accepted() {
        for (text, drain) in [("1ms", Duration::from_millis(1)), ("1h", MAX_DRAIN_TIMEOUT)] {
            let config: Config =
                format!("[proxy]\nupstream = \"http://a\"\ndrain_timeout = \"{text}\"")
                    .parse()
                    .expect(text);
            assert_eq!(config.proxy.drain_timeout, drain);
        }
    }

    #[test]
    fn admin_body_limits_at_the_bounds_are_accepted() {
        for bytes in [MIN_ADMIN_BODY_BYTES, MAX_ADMIN_BODY_BYTES] {
            let text =
                format!("[proxy]\nupstream = \"http://a\"\n[admin]\nmax_body_bytes = {bytes}");
            let config: Config = text.parse().expect(&text);
            assert_eq!(config.admin.max_body_bytes, bytes);
        }
    }

    /// A host-less `/` route takes every request from `proxy.upstream`:
    /// a warning naming both, and only then.
    #[test]
    fn a_catch_all_route_beside_an_upstream_is_warned_of() {
        let route = |extra: &str| format!("[[routes]]\n{extra}upstream = \"http://b\"\n");
        let with_upstream = |routes: &str| -> Config {
            format!("[proxy]\nupstream = \"http://a\"\n{routes}")
                .parse()
                .unwrap()
        };
        let warned = with_upstream(&format!(
            "{}{}",
            route("path_prefix = \"/api\"\n"),
            route("")
        ))
        .warnings();
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("proxy.upstream"), "{warned:?}");
        assert!(warned[0].contains("routes[1]"), "{warned:?}");
        for quiet in [
            route("path_prefix = \"/api\"\n"),
            route("host = \"a.example\"\npath_prefix = \"/\"\n"),
        ] {
            assert!(with_upstream(&quiet).warnings().is_empty(), "{quiet}");
        }
        // Without an upstream, a catch-all route is the ordinary setup.
        let routes_only: Config = route("").parse().unwrap();
        assert!(routes_only.warnings().is_empty());
    }

    /// What the store would refuse when it opens is refused at load, so
    /// that `keygate check` finds it, without showing the password.
    #[test]
    fn a_store_url_that_cannot_be_read_is_refused_at_load() {
        for url in [
            "postgres://u:hunter2secret@h:notaport/db",
            "postgres://u:hunter2secret@h/db?sslmode=sometimes",
            "sqlite://keygate.db?mode=sideways",
        ] {
            let text = format!("[proxy]\nupstream = \"http://a\"\n[store]\nurl = \"{url}\"\n");
            let err = text.parse::<Config>().expect_err(url).to_string();
            assert!(err.contains("store.url"), "{err}");
            assert!(!err.contains("hunter2secret"), "{err}");
        }
        for url in [
            "postgres://u:pw@db.internal:5432/keygate?sslmode=require",
            "postgresql://u@h/db",
            "sqlite://keygate.db",
            "sqlite:///var/lib/keygate/keygate.db?mode=rwc",
        ] {
            let text = format!("[proxy]\nupstream = \"http://a\"\n[store]\nurl = \"{url}\"\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    /// keygate never sends an upstream URI's userinfo, and it would be
    /// logged in every access line: refused, naming the field, never
    /// showing the password.
    #[test]
    fn credentials_in_an_upstream_are_refused_without_showing_them() {
        for (text, field) in [
            (
                "[proxy]\nupstream = \"http://svc:hunter2secret@127.0.0.1:19010\"",
                "proxy.upstream",
            ),
            (
                "[proxy]\nupstream = \"http://a\"\n[[routes]]\nupstream = \"http://b\"\n\
                 [[routes]]\npath_prefix = \"/x\"\nupstream = \"https://svc:hunter2secret@b:8443/\"",
                "routes[1].upstream",
            ),
            ("[proxy]\nupstream = \"http://svc@127.0.0.1:19010\"", "proxy.upstream"),
            // Broken in another way too: still not shown.
            ("[proxy]\nupstream = \"ftp://svc:hunter2secret@b\"", "upstream"),
        ] {
            let err = text.parse::<Config>().expect_err(text).to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
            assert!(!err.contains("hunter2secret"), "{err}");
            if !text.contains("ftp") {
                assert!(err.contains("does not send them"), "{err}");
            }
        }
    }

    /// A SQLite store without a file passed check, then every pooled
    /// connection got a temporary database of its own: /readyz said 200
    /// and every request got 503.
    #[test]
    fn a_sqlite_store_without_a_file_is_refused() {
        for url in [
            "sqlite://",
            "sqlite:",
            "sqlite://?mode=rwc",
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://keygate.db?mode=memory",
        ] {
            let text = format!("[proxy]\nupstream = \"http://a\"\n[store]\nurl = \"{url}\"\n");
            let err = text.parse::<Config>().expect_err(url).to_string();
            assert!(
                err.contains("store.url") && err.contains("database file"),
                "{err}"
            );
        }
    }

    /// `*.example.com` was taken and never matched, so the namespace
    /// check it carried was skipped for a.example.com; a route repeating an
    /// earlier one's host and prefix could never match either.
    #[test]
    fn routes_that_could_never_match_are_refused() {
        let route = |host: &str, prefix: &str, extra: &str| {
            let host = if host.is_empty() {
                String::new()
            } else {
                format!("host = \"{host}\"\n")
            };
            format!(
                "[[routes]]\n{host}path_prefix = \"{prefix}\"\nupstream = \"http://a\"\n{extra}"
            )
        };
        for (text, named) in [
            (route("*.example.com", "/", ""), "routes[0].host"),
            (route("a.*.com", "/", ""), "routes[0].host"),
            (
                route("", "/x", "")
                    + &route("a.example.com", "/", "")
                    + &route("A.Example.com", "/", ""),
                "routes[2]",
            ),
            (route("", "/api", "") + &route("", "/api", ""), "routes[1]"),
            (
                route("", "/api", "case_sensitive = false\n") + &route("", "/API", ""),
                "routes[1]",
            ),
        ] {
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(err.contains(named), "{err:?} should name {named}");
        }
        let err = (route("", "/x", "")
            + &route("a.example.com", "/", "")
            + &route("A.Example.com", "/", ""))
            .parse::<Config>()
            .expect_err("duplicate")
            .to_string();
        assert!(
            err.contains("routes[1]") && err.contains("never match"),
            "{err}"
        );
        let err = route("*.example.com", "/", "")
            .parse::<Config>()
            .expect_err("*")
            .to_string();
        assert!(err.contains("wildcards are not supported"), "{err}");
        // Not duplicates: another host, another prefix, a case-sensitive
        // prefix before one that differs in case.
        for text in [
            route("a.example.com", "/api", "") + &route("b.example.com", "/api", ""),
            route("a.example.com", "/api", "") + &route("", "/api", ""),
            route("", "/api", "") + &route("", "/api/", ""),
            route("", "/api", "") + &route("", "/API", "case_sensitive = false\n"),
        ] {
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    /// Two listeners on one address passed `check`, then `serve` stopped
    /// with "Address already in use" and exit 69, as if another process
    /// held the port and a restart could help.
    #[test]
    fn listeners_on_the_same_address_are_refused() {
        let base = "[proxy]\nupstream = \"http://a\"\n";
        for (listens, named) in [
            (
                "listen = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"",
                "admin.listen",
            ),
            (
                "listen = \"0.0.0.0:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"",
                "admin.listen",
            ),
            (
                "listen = \"127.0.0.1:9000\"\n[admin]\nlisten = \"[::]:9000\"",
                "admin.listen",
            ),
            ("[echo]\nlisten = \"127.0.0.1:8080\"", "echo.listen"),
            ("[echo]\nlisten = \"127.0.0.1:8081\"", "echo.listen"),
        ] {
            let text = format!("{base}{listens}\n");
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(
                err.contains(named) && err.contains("same address"),
                "{err:?} should name {named}"
            );
        }
        for listens in [
            "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.2:9000\"",
            "listen = \"127.0.0.1:9000\"\n[admin]\nlisten = \"[::1]:9000\"",
            "[echo]\nlisten = \"127.0.0.1:9000\"",
        ] {
            let text = format!("{base}{listens}\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    /// `http://127.0.0.1:99999` and `http://:80` passed `check` and
    /// `serve`, then every request got 502.
    #[test]
    fn upstreams_without_a_usable_host_and_port_are_refused() {
        for (upstream, rule) in [
            ("http://127.0.0.1:99999", "port"),
            ("http://127.0.0.1:80x", "port"),
            ("http://127.0.0.1:", "port"),
            ("http://:80", "host"),
            ("https://[::1]:70000", "port"),
        ] {
            let text = format!("[proxy]\nupstream = \"{upstream}\"\n");
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(
                err.contains("upstream") && err.contains(rule),
                "{err:?} should name the {rule}"
            );
            let text = format!("[[routes]]\nupstream = \"{upstream}\"\n");
            text.parse::<Config>().expect_err(&text);
        }
        for upstream in [
            "http://127.0.0.1:65535",
            "http://a",
            "https://[::1]:8443/",
            "http://svc.internal:8080",
            "http://[::1]",
        ] {
            let text = format!("[proxy]\nupstream = \"{upstream}\"\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{upstream}: {e}"));
        }
    }

    /// hyper makes room for `max_headers` headers on every request head
    /// it parses: 9223372036854775807 passed `check` and every request on
    /// hyper's path panicked ("capacity overflow"); a million cost tens of
    /// megabytes per request.
    #[test]
    fn max_headers_is_bounded() {
        for n in ["10001", "1000000", "9223372036854775807"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nmax_headers = {n}\n");
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(
                err.contains("proxy.max_headers") && err.contains("10000"),
                "{err}"
            );
        }
        for n in ["1", "100", "10000"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nmax_headers = {n}\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    /// worker_threads = 9223372036854775807 passed `check`, then `serve`
    /// panicked building the runtime ("capacity overflow", exit 101).
    #[test]
    fn worker_threads_is_bounded() {
        for n in ["1025", "9223372036854775807"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nworker_threads = {n}\n");
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(
                err.contains("proxy.worker_threads") && err.contains("1024"),
                "{err}"
            );
        }
        for n in ["0", "1", "1024"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nworker_threads = {n}\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    /// max_connections = 9223372036854775807 passed `check` and `serve`
    /// started, but the proxy's task panicked making its semaphore: the
    /// admin listener answered (and /readyz said ready) while the proxy
    /// port refused every connection.
    #[test]
    fn max_connections_is_bounded() {
        for n in ["10000001", "9223372036854775807"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nmax_connections = {n}\n");
            let err = text.parse::<Config>().expect_err(&text).to_string();
            assert!(
                err.contains("proxy.max_connections") && err.contains("10000000"),
                "{err}"
            );
        }
        for n in ["1", "10000", "10000000"] {
            let text = format!("[proxy]\nupstream = \"http://a\"\nmax_connections = {n}\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{n}: {e}"));
        }
    }

    #[test]
    fn log_filters_that_init_logging_takes_are_accepted() {
        for level in [
            "info",
            "warn,keygate::access=off",
            "keygate=debug,sqlx=warn",
            "trace",
        ] {
            let text = format!("[proxy]\nupstream = \"http://a\"\n[log]\nlevel = \"{level}\"\n");
            text.parse::<Config>()
                .unwrap_or_else(|e| panic!("{level}: {e}"));
        }
    }

    #[test]
    fn shipped_config_files_are_valid() {
        for file in ["config/keygate.toml", "config/quickstart.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        // The Kubernetes example's ConfigMap: the block under
        // `keygate.toml: |`, indented by four spaces.
        let example = "config/examples/kubernetes-sidecar.yaml";
        let yaml = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(example))
            .expect("example");
        let toml: String = yaml
            .lines()
            .skip_while(|line| line.trim() != "keygate.toml: |")
            .skip(1)
            .take_while(|line| line.starts_with("    ") || line.is_empty())
            .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
            .collect();
        assert!(toml.contains("[proxy]"), "{example}: no keygate.toml block");
        toml.parse::<Config>()
            .unwrap_or_else(|e| panic!("{example}: {e}"));
    }
}
