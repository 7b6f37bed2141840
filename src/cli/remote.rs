//! The admin API client of the CLI: one `reqwest` client, the server URL and
//! the caller's API key, and the mapping of HTTP failures to exit codes.
//!
//! The API key is only ever put in the `Authorization` header; it is never
//! printed, not even in an error.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{Failure, RemoteArgs, EX_UNAVAILABLE, EX_USAGE};

pub struct Client {
    http: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    server: String,
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
        if !server.starts_with("http://") && !server.starts_with("https://") {
            return Err(Failure::usage(format!(
                "--server must be an http:// URL of the admin listener; got {server:?}"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Failure::runtime(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            http,
            server,
            api_key: api_key.trim().to_string(),
        })
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, Failure> {
        self.call(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(Method::POST, path, &[], Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.call(Method::PUT, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::DELETE, path, &[], None).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{}", self.server, path);
        let mut request = self
            .http
            .request(method, &url)
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
