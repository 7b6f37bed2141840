//! A full session with every log at TRACE level: create a key through the
//! admin API, proxy traffic in every presentation, rotate, disable, bad keys,
//! errors. No secret may appear in any log line, metric or response body
//! other than the one create/rotate response that issues it.
// Test servers record what they saw behind a plain Mutex; no hot path here.
#![allow(clippy::disallowed_types)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use support::{Gate, RecordingUpstream};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_secret_in_logs_metrics_or_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    let client = reqwest::Client::new();
    let mut bodies: Vec<String> = Vec::new();
    let admin = gate.admin_token.clone();

    // Create a key through the admin API.
    let expiry = humantime::format_rfc3339(
        std::time::SystemTime::now() + std::time::Duration::from_secs(86_400),
    );
    let r = client
        .post(gate.admin_url("/api/v1/api-keys"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "spec": { "displayName": "session", "expiryTime": expiry.to_string() } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "create");
    let created: serde_json::Value = r.json().await.unwrap();
    let first = created["token"].as_str().unwrap().to_string();
    let id = first[3..19].to_string();

    // Traffic in every presentation, good and bad.
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", id, &first[20..]));
    let wrong = gate
        .tokens
        .issue_secret(&keygate::key::KeyId::parse(&id).unwrap())
        .0
        .expose()
        .to_string();
    let mut mangled = first.clone();
    mangled.pop();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (c, header, value) in [
        (&client, "authorization", format!("Bearer {first}")),
        (&client, "authorization", format!("Basic {basic}")),
        (&client, "x-api-key", first.clone()),
        (&h2, "authorization", format!("Bearer {first}")),
        (&client, "authorization", format!("Bearer {wrong}")),
        (&client, "authorization", format!("Bearer {mangled}")),
        (&client, "authorization", format!("Bearer {first}{first}")),
        (&h2, "authorization", format!("Bearer {wrong}")),
    ] {
        let r = c
            .get(gate.proxy_url("/session"))
            .header(header, value)
            .send()
            .await
            .unwrap();
        bodies.push(r.text().await.unwrap());
    }

    // Rotate, use both secrets, disable, use again.
    let r = client
        .post(gate.admin_url(&format!("/api/v1/api-keys/{id}/rotate")))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "gracePeriod": "1h" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "rotate");
    let rotated: serde_json::Value = r.json().await.unwrap();
    let second = rotated["token"].as_str().unwrap().to_string();
    for token in [&first, &second] {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client
        .post(gate.admin_url(&format!("/api/v1/api-keys/{id}/disable")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    bodies.push(r.text().await.unwrap());
    for token in [&first, &second] {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        bodies.push(r.text().await.unwrap());
    }
    // Admin API errors, including ones that carry a token where it does not belong.
    for (path, body) in [
        (
            "/api/v1/api-keys",
            serde_json::json!({ "spec": { "displayName": second } }),
        ),
        (
            "/api/v1/api-keys",
            serde_json::json!({ "spec": { "displayName": "x", "token": second } }),
        ),
        (
            "/api/v1/api-keys",
            serde_json::json!({ "spec": { "displayName": "x", "expiryTime": second } }),
        ),
    ] {
        let r = client
            .post(gate.admin_url(path))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            422,
            "a key in a name or a wrong field is refused"
        );
        bodies.push(r.text().await.unwrap());
    }
    for token in [&second, &wrong] {
        let r = client
            .get(gate.admin_url("/api/v1/api-keys"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        bodies.push(r.text().await.unwrap());
    }
    for path in ["/api/v1/api-keys", "/api/v1/audit-events?pageSize=1000"] {
        let r = client
            .get(gate.admin_url(path))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        bodies.push(r.text().await.unwrap());
    }
    let metrics = reqwest::get(gate.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Let the usage flusher run once more with these keys.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    gate.stop().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("keygate::access"),
        "the access log was captured"
    );
    assert!(logs.lines().count() > 50, "TRACE logs were captured");
    let secrets = [
        &first[20..52],
        &second[20..52],
        &admin[20..52],
        &wrong[20..52],
    ];
    for secret in secrets {
        for (what, text) in [("logs", &logs), ("metrics", &metrics)] {
            assert!(!text.contains(secret), "a secret leaked into {what}");
        }
        for body in &bodies {
            assert!(
                !body.contains(secret),
                "a secret leaked into a response body: {body}"
            );
        }
    }
}
