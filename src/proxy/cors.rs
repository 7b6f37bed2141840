//! CORS preflights: telling one from any other request, for the routes
//! that let them pass without an API key (`cors_allow_preflight`).
//!
//! A browser sends a preflight (`OPTIONS` with `Origin` and
//! `Access-Control-Request-Method`, Fetch standard section 4.8) before a
//! cross-origin request that carries an `Authorization` header, and never
//! sends credentials on the preflight itself, so keygate would refuse it
//! with 401 and the browser would never send the real request. On a route
//! that allows it, a preflight that presents no key is forwarded without
//! identity (as oauth2-proxy's `skip_auth_preflight` and Pomerium's
//! `cors_allow_preflight` do) and the upstream answers it with its own CORS
//! policy. A preflight that does present a key is checked like any request.

use http::header::{ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
use http::{HeaderMap, Method};

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(names: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for name in names {
            map.insert(*name, "x".parse().unwrap());
        }
        map
    }

    #[test]
    fn a_preflight_is_an_options_with_origin_and_requested_method() {
        let both = headers(&["origin", "access-control-request-method"]);
        assert!(is_preflight(&Method::OPTIONS, &both));
        assert!(!is_preflight(&Method::GET, &both));
        assert!(!is_preflight(&Method::OPTIONS, &headers(&["origin"])));
        assert!(!is_preflight(
            &Method::OPTIONS,
            &headers(&["access-control-request-method"])
        ));
    }
}
