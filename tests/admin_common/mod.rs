//! Helpers for the admin API tests: a small JSON client over real HTTP and
//! fixtures made through the API itself.
#![allow(dead_code)]

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::Gate;

/// A reqwest client bound to one keygate admin listener and one API key.
#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Status and JSON body of an answer (`Null` when the body is empty).
pub type Answer = (u16, Value);

impl Api {
    pub fn new(gate: &Gate, token: &str) -> Api {
        Api {
            client: reqwest::Client::new(),
            base: gate.admin_url(""),
            token: Some(token.to_string()),
        }
    }

    /// No credential at all.
    pub fn anonymous(gate: &Gate) -> Api {
        Api {
            client: reqwest::Client::new(),
            base: gate.admin_url(""),
            token: None,
        }
    }

    pub fn as_key(&self, token: &str) -> Api {
        Api {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.send(Method::PUT, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None).await
    }

    pub async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut r = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        answer(r.send().await.expect("request")).await
    }

    /// A request with a raw body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Answer {
        let mut r = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        answer(r.send().await.expect("request")).await
    }

    /// Creates a user through the API; returns its id.
    pub async fn create_user(
        &self,
        email: &str,
        role: &str,
        namespaces: &[(&str, &str)],
    ) -> String {
        let ns: serde_json::Map<String, Value> = namespaces
            .iter()
            .map(|(n, p)| (n.to_string(), json!({ "permission": p })))
            .collect();
        let (status, body) = self
            .post(
                "/api/v1/users",
                json!({ "spec": { "email": email, "access": {
                    "accountAccess": { "role": role }, "namespaceAccesses": ns } } }),
            )
            .await;
        assert_eq!(status, 201, "create user: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    pub async fn create_service_account(
        &self,
        name: &str,
        role: &str,
        namespaces: &[(&str, &str)],
    ) -> String {
        let ns: serde_json::Map<String, Value> = namespaces
            .iter()
            .map(|(n, p)| (n.to_string(), json!({ "permission": p })))
            .collect();
        let (status, body) = self
            .post(
                "/api/v1/service-accounts",
                json!({ "spec": { "name": name, "access": {
                    "accountAccess": { "role": role }, "namespaceAccesses": ns } } }),
            )
            .await;
        assert_eq!(status, 201, "create service account: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    pub async fn create_namespace(&self, name: &str) -> String {
        let (status, body) = self
            .post("/api/v1/namespaces", json!({ "spec": { "name": name } }))
            .await;
        assert_eq!(status, 201, "create namespace: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Creates a key with `spec` (displayName and a one-hour expiry added
    /// when missing); returns (id, token).
    pub async fn create_key(&self, mut spec: Value) -> (String, String) {
        let (status, body) = self.try_create_key(&mut spec).await;
        assert_eq!(status, 201, "create key: {body}");
        (
            body["apiKey"]["id"].as_str().expect("id").to_string(),
            body["token"].as_str().expect("token").to_string(),
        )
    }

    pub async fn try_create_key(&self, spec: &mut Value) -> Answer {
        if spec.get("displayName").is_none() {
            spec["displayName"] = json!("test key");
        }
        if spec.get("expiryTime").is_none() {
            spec["expiryTime"] = json!(in_hours(1));
        }
        self.post("/api/v1/api-keys", json!({ "spec": spec })).await
    }
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// RFC 3339 time `hours` from now.
pub fn in_hours(hours: u64) -> String {
    let at = std::time::SystemTime::now() + std::time::Duration::from_secs(hours * 3600);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The proxy's answer to a GET with this token: (status, error code).
pub async fn proxy_get(gate: &Gate, path: &str, token: &str) -> (u16, String) {
    proxy_call(gate, reqwest::Method::GET, path, token).await
}

pub async fn proxy_call(gate: &Gate, method: Method, path: &str, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .request(method, gate.proxy_url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("proxy request");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

/// Polls `check` every 50 ms for up to 5 s (for the usage batcher, which
/// flushes on its own clock in another task).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("not eventually: {what}");
}
