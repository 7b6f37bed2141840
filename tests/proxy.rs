//! The data plane end to end: real keygate, real upstreams, real clients.

mod support;

use support::{echo_upstream, Gate};

#[tokio::test]
async fn valid_key_passes_with_identity() {
    let gate = Gate::builder()
        .upstream(echo_upstream().await)
        .start()
        .await;
    let client = reqwest::Client::new();
    let r = client
        .get(gate.proxy_url("/hello"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let seen: serde_json::Value = r.json().await.expect("json");
    assert_eq!(
        seen["headers"]["x-keygate-owner-name"][0],
        "admin@example.com"
    );
    gate.stop().await;
}
