//! The route table: which upstream, namespace and permission a request gets,
//! by host and path prefix. Built once from the config; matching allocates
//! nothing.

// The route-name interner is a plain Mutex: taken when a table is built (at
// start and on reload), never per request.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use crate::config::{Config, UpstreamProtocol};
use crate::store::Permission;

/// Where a route forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    pub protocol: UpstreamProtocol,
}

impl Upstream {
    fn from_uri(uri: &Uri, protocol: UpstreamProtocol) -> Upstream {
        Upstream {
            scheme: uri.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: uri
                .authority()
                .cloned()
                .unwrap_or_else(|| Authority::from_static("localhost")),
            protocol,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// Position in the table; used to cache per-route metric handles.
    pub index: usize,
    /// Label for metrics and logs: `host/prefix` or `prefix`.
    pub name: String,
    /// The same number for every route of this name in any table, so what
    /// is cached per key and route (its metric counts) outlives a reload
    /// and is told apart from another route's by one comparison.
    pub series_id: u64,
    host: Option<String>,
    path_prefix: String,
    pub upstream: Upstream,
    pub namespace: Option<String>,
    /// `x-keygate-namespace` value, built once.
    pub namespace_header: Option<HeaderValue>,
    pub permission: Option<Permission>,
    /// Whether `path_prefix` is compared case-sensitively.
    case_sensitive: bool,
    /// Whether a CORS preflight without a key is forwarded unauthenticated.
    pub cors_allow_preflight: bool,
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            // `example.com.` (fully qualified) is the same host as
            // `example.com`, and name-based upstreams serve it as such.
            match host.map(|h| h.strip_suffix('.').unwrap_or(h)) {
                Some(h) if h.eq_ignore_ascii_case(want) => {}
                _ => return false,
            }
        }
        prefix_matches(&self.path_prefix, path, self.case_sensitive)
    }
}

/// Route names and their numbers, and the next number to give.
#[derive(Default)]
struct SeriesIds {
    ids: HashMap<String, u64>,
    next: u64,
}

fn series_ids() -> std::sync::MutexGuard<'static, SeriesIds> {
    static IDS: OnceLock<Mutex<SeriesIds>> = OnceLock::new();
    IDS.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The process-wide number of a route name (see [`Route::series_id`]).
fn series_id(name: &str) -> u64 {
    let mut series = series_ids();
    let SeriesIds { ids, next } = &mut *series;
    *ids.entry(name.to_owned()).or_insert_with(|| {
        *next += 1;
        *next - 1
    })
}

/// Forgets the numbers of routes a reload removed (whose metric series are
/// dropped), so that a route of the same name added back later gets a new
/// one: a key still cached with its counts for the removed route then
/// resolves new ones, instead of counting where no scrape looks.
pub fn retire_series_ids<'n>(names: impl IntoIterator<Item = &'n str>) {
    let mut series = series_ids();
    for name in names {
        series.ids.remove(name);
    }
}

/// `/api` matches `/api`, `/api/x` and `/api;v=1/x`, but not `/apix`.
/// A `;` ends the segment too: servlet containers (Tomcat, Jetty) drop a
/// segment's `;parameters` before routing, so they serve `/api;x/y` as
/// `/api/y`, and it must be authorized under `/api`.
///
/// Without `case_sensitive`, `/Admin` and `/ADMIN/x` match `/admin` too.
fn prefix_matches(prefix: &str, path: &str, case_sensitive: bool) -> bool {
    if prefix == "/" {
        return true;
    }
    let rest = if case_sensitive {
        path.strip_prefix(prefix)
    } else {
        path.get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .map(|_| &path[prefix.len()..])
    };
    let Some(rest) = rest else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', ';'])
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Most specific first: host routes before host-less ones, then longer
    /// prefixes first; config order breaks ties.
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn from_config(config: &Config) -> RouteTable {
        let protocol = config.proxy.upstream_protocol;
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| {
                let name = match &r.host {
                    Some(h) => format!("{h}{}", r.path_prefix),
                    None => r.path_prefix.clone(),
                };
                Route {
                    index: 0,
                    series_id: series_id(&name),
                    name,
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    upstream: Upstream::from_uri(&r.upstream, protocol),
                    namespace_header: r
                        .namespace
                        .as_deref()
                        .and_then(|n| HeaderValue::from_str(n).ok()),
                    namespace: r.namespace.clone(),
                    permission: r.permission,
                    case_sensitive: r.case_sensitive,
                    cors_allow_preflight: r
                        .cors_allow_preflight
                        .unwrap_or(config.proxy.cors_allow_preflight),
                }
            })
            .collect();
        if let Some(upstream) = &config.proxy.upstream {
            // The sidecar default: everything not routed goes here.
            routes.push(Route {
                index: 0,
                series_id: series_id("default"),
                name: "default".into(),
                host: None,
                path_prefix: "/".into(),
                upstream: Upstream::from_uri(upstream, protocol),
                namespace: None,
                namespace_header: None,
                permission: None,
                case_sensitive: true,
                cors_allow_preflight: config.proxy.cors_allow_preflight,
            });
        }
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        for (i, r) in routes.iter_mut().enumerate() {
            r.index = i;
        }
        RouteTable { routes }
    }

    /// The route for a request; `host` without its port.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// Whether the path decides anything: some route has a prefix other
    /// than `/`. Paths are normalized only then, for the route a request
    /// gets to be the one its upstream serves; without path routes (the
    /// sidecar) the path authorizes nothing, and the upstream gets it as
    /// the client sent it.
    pub fn routes_by_path(&self) -> bool {
        self.routes.iter().any(|r| r.path_prefix != "/")
    }

    /// The metrics label of the route at `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.routes[index].name
    }

    /// The metrics labels of every route.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The host a request is for, without the port: from the URI (HTTP/2
/// `:authority`, absolute-form) or the `Host` header.
pub fn request_host<B>(req: &http::Request<B>) -> Option<&str> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => req.headers().get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

/// Whether a `Host` value is `host[:port]` as RFC 9110 section 7.2 allows
/// it: an authority without userinfo, not empty. Anything else is refused
/// (RFC 9112 section 3.2), as routes and upstreams could read it apart.
pub fn valid_host(value: &[u8]) -> bool {
    // `Authority` refuses an empty value and one with anything after the
    // authority; it allows userinfo, which a Host may not carry. (It copies
    // a valid value into a buffer of its own: one small allocation per
    // request, the price of http's parser over a hand-written one.)
    !value.contains(&b'@') && http::uri::Authority::try_from(value).is_ok()
}

/// Whether a request's `Host` headers let it be routed: an HTTP/1.1
/// request has exactly one, any other at most one, and a present one is
/// [`valid_host`]. A request whose URI names the host (HTTP/2
/// `:authority`, absolute-form) is routed by that, but its Host must still
/// be sound in HTTP/1.1.
pub fn hosts_are_sound<B>(req: &http::Request<B>) -> bool {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => false,
        (Some(host), None) => valid_host(host.as_bytes()),
        (None, _) => req.version() != http::Version::HTTP_11,
    }
}

/// `host:port` → `host`, keeping IPv6 brackets intact.
pub fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_route_name_gets_a_new_series_id() {
        let (kept, gone) = (series_id("/retire-kept"), series_id("/retire-gone"));
        assert_ne!(kept, gone);
        retire_series_ids(["/retire-gone"]);
        assert_eq!(series_id("/retire-kept"), kept);
        let back = series_id("/retire-gone");
        assert!(back != gone && back != kept);
        assert_eq!(series_id("/retire-gone"), back);
    }

    #[test]
    fn hosts_are_host_and_port_only() {
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:1",
            "[::1]:80",
            "a-b.c_d",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in ["", "a b", "user@example.com", "example.com/x", "exa\"mple"] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything", true));
        assert!(prefix_matches("/api", "/api", true));
        assert!(prefix_matches("/api", "/api/v1", true));
        assert!(!prefix_matches("/api", "/apix", true));
        assert!(prefix_matches("/api", "/api;jsessionid=1/x", true));
        assert!(prefix_matches("/api/", "/api/x", true));
        assert!(!prefix_matches("/api", "/", true));
        assert!(!prefix_matches("/admin", "/ADMIN/x", true));
        assert!(prefix_matches("/admin", "/ADMIN/x", false));
        assert!(prefix_matches("/admin", "/Admin;x", false));
        assert!(!prefix_matches("/admin", "/ADMINx", false));
        assert!(!prefix_matches("/admin", "/ad", false));
    }

    #[test]
    fn most_specific_route_wins() {
        let config: Config = r#"
            [proxy]
            upstream = "http://127.0.0.1:1"
            [[routes]]
            path_prefix = "/orders"
            upstream = "http://127.0.0.1:2"
            namespace = "orders"
            [[routes]]
            host = "admin.example.com"
            upstream = "http://127.0.0.1:3"
            [[routes]]
            path_prefix = "/orders/admin"
            upstream = "http://127.0.0.1:4"
            permission = "admin"
        "#
        .parse()
        .expect("valid");
        let t = RouteTable::from_config(&config);
        let port = |h, p| {
            t.select(h, p)
                .map(|r| r.upstream.authority.port_u16().unwrap_or(0))
        };
        assert_eq!(port(None, "/orders/1"), Some(2));
        assert_eq!(port(None, "/orders/admin/x"), Some(4));
        assert_eq!(port(Some("ADMIN.example.com"), "/orders"), Some(3));
        assert_eq!(port(Some("admin.example.com."), "/orders"), Some(3));
        assert_eq!(port(None, "/other"), Some(1));
    }
}
