//! The admin API client of the CLI: one `reqwest` client, the server URL and
//! the caller's API key, and the mapping of HTTP failures to exit codes.
//!
//! The API key is only ever put in the `Authorization` header; it is never
//! printed, not even in an error.
//!
//! Requests name their path as segments under `/api/v1`, each
//! percent-encoded as one segment (`Client::url`), never as text pasted
//! into a URL: an id such as `../users/x` must not reach another resource.

use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use super::{Failure, RemoteArgs, EX_UNAVAILABLE, EX_USAGE};

pub struct Client {
    http: reqwest::Client,
    /// The server URL as given, without a trailing slash, for messages.
    server: String,
    /// The admin API's root: the server URL with `/api/v1` appended.
    api: Url,
    api_key: String,
}

impl Client {
    pub fn new(args: &RemoteArgs) -> Result<Client, Failure> {
        let api_key = args
            .api_key
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| {
                Failure::usage("an API key is needed: pass --api-key or set KEYGATE_API_KEY")
            })?;
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
            api_key: api_key.trim().to_string(),
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
            .bearer_auth(&self.api_key)
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
            code: match status {
                StatusCode::SERVICE_UNAVAILABLE => EX_UNAVAILABLE,
                StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => EX_USAGE,
                _ => 1,
            },
            message: format!("{} {code}: {message}", status.as_u16()),
        })
    }
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
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" ({url})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
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
