//! The admin API client of the CLI: one `reqwest` client, the server URL and
//! the caller's API key, and the mapping of HTTP failures to exit codes.
//!
//! The API key is only ever put in the `Authorization` header; it is never
//! printed, not even in an error (one that HTTP cannot carry is refused as
//! bad usage, without it).
//!
//! Exit codes of a call (README, "Control plane"): a request the API
//! refused (any 4xx) is 64, as bad usage; 502, 503 and 504 (the server or
//! a proxy before it unavailable) and no answer at all are 69; any other
//! failure (a 500) is 1.
//!
//! Requests name their path as segments under `/api/v1`, each
//! percent-encoded as one segment (`Client::url`), never as text pasted
//! into a URL: an id such as `../users/x` must not reach another resource.

use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::{Failure, RemoteArgs, EX_UNAVAILABLE, EX_USAGE};

pub struct Client {
    http: reqwest::Client,
    /// The server URL as given, without a trailing slash, for messages.
    server: String,
    /// The admin API's root: the server URL with `/api/v1` appended.
    api: Url,
    /// `Bearer <key>`, marked sensitive.
    authorization: HeaderValue,
}

impl Client {
    pub fn new(args: &RemoteArgs) -> Result<Client, Failure> {
        let api_key = args
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Failure::usage("an API key is needed: pass --api-key or set KEYGATE_API_KEY")
            })?;
        let authorization = authorization(api_key)?;
        let server = args.server.trim_end_matches('/').to_string();
        let api = api_root(&server).ok_or_else(|| {
            Failure::usage(format!(
                "--server must be an http:// or https:// URL of the admin listener, \
                 without a query or fragment; got {server:?}"
            ))
        })?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::runtime(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            server,
            api,
            authorization,
        })
    }

    /// `path` is the segments under `/api/v1`, e.g. `["api-keys", id,
    /// "rotate"]`; the query's values are form-encoded by reqwest.
    pub async fn get(&self, path: &[&str], query: &[(&str, String)]) -> Result<Value, Failure> {
        self.call(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &[&str], body: Value) -> Result<Value, Failure> {
        self.call(Method::POST, path, &[], Some(body)).await
    }

    pub async fn put(&self, path: &[&str], body: Value) -> Result<Value, Failure> {
        self.call(Method::PUT, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &[&str]) -> Result<Value, Failure> {
        self.call(Method::DELETE, path, &[], None).await
    }

    /// The URL of `segments` under the API root, each percent-encoded as
    /// one segment (`/`, `\\`, `%`, `?`, `#` and the rest escaped).
    ///
    /// `url` itself drops a pushed `.` or `..` (and strips tabs and line
    /// breaks), and `%2e%2e` is `..` to every URL parser, so no encoding
    /// can carry those: they, the empty segment and control characters are
    /// refused here. Commands check ids with a message of their own first;
    /// this is the last line, so that no path can leave its resource.
    fn url(&self, segments: &[&str]) -> Result<Url, Failure> {
        let mut url = self.api.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| Failure::usage("--server cannot hold a path"))?;
            for segment in segments {
                if matches!(*segment, "" | "." | "..") || segment.chars().any(char::is_control) {
                    return Err(Failure::usage(
                        "an id that is empty, `.` or `..`, or holds a control character, \
                         cannot be part of an admin API path",
                    ));
                }
                path.push(segment);
            }
        }
        Ok(url)
    }

    async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = self.url(path)?;
        let mut request = self
            .http
            .request(method, url)
            .header(AUTHORIZATION, self.authorization.clone())
            .query(query);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| Failure {
            code: EX_UNAVAILABLE,
            message: format!(
                "cannot reach the admin API at {}: {}",
                self.server,
                without_url(&e)
            ),
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|e| Failure {
            code: EX_UNAVAILABLE,
            message: format!("the admin API's answer was cut off: {}", without_url(&e)),
        })?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(json);
        }
        let code = json["error"]["code"].as_str().unwrap_or("error");
        let message = json["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| status.to_string());
        Err(Failure {
            code: exit_code(status),
            message: format!("{} {code}: {message}", status.as_u16()),
        })
    }
}

/// The exit code of a failed call: the README's "64 for bad usage or a
/// refused request, 69 when the server is unreachable".
fn exit_code(status: StatusCode) -> u8 {
    match status {
        // Invalid, unauthenticated, forbidden, not found, a stale
        // resourceVersion, a policy: the request, not the server, must change.
        s if s.is_client_error() => EX_USAGE,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            EX_UNAVAILABLE
        }
        _ => 1,
    }
}

/// The `Authorization` header of `api_key`. An API key is ASCII letters,
/// digits and punctuation; anything else (a control character, a space, a
/// non-ASCII letter, often a paste gone wrong) is refused here as bad usage,
/// rather than by the HTTP client as an unreachable server, and the key is
/// not printed.
fn authorization(api_key: &str) -> Result<HeaderValue, Failure> {
    let invalid = |what: &str| {
        Failure::usage(format!(
            "the API key (--api-key or KEYGATE_API_KEY) is not a valid API key: it holds {what} \
             (the key is not shown, as it holds a secret)"
        ))
    };
    if let Some(c) = api_key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(invalid(if c.is_control() {
            "a control character"
        } else if c.is_whitespace() {
            "a space"
        } else {
            "a non-ASCII character"
        }));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {api_key}"))
        .map_err(|_| invalid("a character HTTP cannot carry"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// `server` (an `http(s)://` URL, its own path kept) with `api/v1`
/// appended; `None` for anything else.
fn api_root(server: &str) -> Option<Url> {
    let mut url = Url::parse(server).ok()?;
    let fits = matches!(url.scheme(), "http" | "https")
        && url.has_host()
        && url.query().is_none()
        && url.fragment().is_none();
    if !fits {
        return None;
    }
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(["api", "v1"]);
    Some(url)
}

/// reqwest errors print the URL; ours never holds a secret, but the error
/// is clearer without it, as the server is already named.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = crate::telemetry::error_chain(e);
    if let Some(url) = e.url() {
        text = text.replace(&format!(" ({url})"), "");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::output::Output;

    fn client(server: &str) -> Result<Client, Failure> {
        Client::new(&RemoteArgs {
            server: server.into(),
            api_key: Some("kg_test".into()),
            output: Output::Table,
        })
    }

    fn path(server: &str, segments: &[&str]) -> Result<String, String> {
        let client = client(server).map_err(|f| f.message)?;
        client
            .url(segments)
            .map(|u| u.path().to_string())
            .map_err(|f| f.message)
    }

    #[test]
    fn every_segment_stays_one_segment() {
        let at = |s: &str| path("http://127.0.0.1:8081", &["api-keys", s]);
        assert_eq!(at("../users/x").unwrap(), "/api/v1/api-keys/..%2Fusers%2Fx");
        assert_eq!(at("a\\b").unwrap(), "/api/v1/api-keys/a%5Cb");
        assert_eq!(at("%2e%2e").unwrap(), "/api/v1/api-keys/%252e%252e");
        assert_eq!(at("a?b#c d").unwrap(), "/api/v1/api-keys/a%3Fb%23c%20d");
        assert_eq!(at("é").unwrap(), "/api/v1/api-keys/%C3%A9");
        // What no encoding carries is refused, not dropped.
        for s in ["", ".", "..", "a\nb", "a\tb", "a\u{0}b"] {
            let refused = at(s).unwrap_err();
            assert!(refused.contains("cannot be part"), "{s:?}: {refused}");
        }
        let Ok(client) = client("http://127.0.0.1:8081") else {
            panic!("a client of a good server URL");
        };
        assert_eq!(client.url(&[".."]).unwrap_err().code, EX_USAGE);
    }

    #[test]
    fn refusals_are_usage_errors_and_gateways_unavailability() {
        for status in [400, 401, 403, 404, 409, 413, 422, 429] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(exit_code(status), EX_USAGE, "{status}");
        }
        for status in [502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(exit_code(status), EX_UNAVAILABLE, "{status}");
        }
        assert_eq!(exit_code(StatusCode::INTERNAL_SERVER_ERROR), 1);
    }

    #[test]
    fn an_api_key_http_cannot_carry_is_bad_usage_and_not_printed() {
        for (key, what) in [
            ("kg_abc\u{1}def", "a control character"),
            ("kg_abc\ndef", "a control character"),
            ("kg_abc def", "a space"),
            ("kg_abcédef", "a non-ASCII character"),
        ] {
            let refused = authorization(key).expect_err(key);
            assert_eq!(refused.code, EX_USAGE);
            assert!(refused.message.contains(what), "{}", refused.message);
            assert!(!refused.message.contains("abc"), "{}", refused.message);
        }
        let value = authorization("kg_abc_def").unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer kg_abc_def");
        assert!(value.is_sensitive());
    }

    #[test]
    fn the_server_url_keeps_its_own_path() {
        for server in ["http://h:1", "http://h:1/", "https://h"] {
            assert_eq!(path(server, &["users"]).unwrap(), "/api/v1/users");
        }
        assert_eq!(
            path("http://h:1/keygate/", &["users"]).unwrap(),
            "/keygate/api/v1/users"
        );
        for server in ["h:1", "ftp://h", "http://", "http://h/?a=1", "http://h/#x"] {
            let refused = client(server).err().expect(server);
            assert_eq!(refused.code, EX_USAGE, "{server}");
            assert!(refused.message.contains("--server"), "{}", refused.message);
        }
    }
}
