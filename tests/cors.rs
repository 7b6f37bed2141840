//! CORS preflights (`cors_allow_preflight`): a browser's preflight carries
//! no key, so where a route allows it, it reaches the upstream without
//! identity; everything else still needs a key.

mod support;

use support::{Gate, RecordingUpstream};

/// A route `/open` that lets preflights pass, and the default route, which
/// does not, on hyper's path or the relay's.
async fn gate(upstream: &RecordingUpstream, relay: bool) -> Gate {
    let open = format!(
        "[forward_auth]\nenabled = true\n\
         [[routes]]\npath_prefix = \"/open\"\nupstream = \"http://{}\"\ncors_allow_preflight = true\n",
        upstream.addr
    );
    Gate::builder()
        .upstream(upstream.addr)
        .proxy(&format!("http1_relay = {relay}"))
        .extra(&open)
        .start()
        .await
}

fn preflight(client: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    client
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "DELETE")
        .header("access-control-request-headers", "authorization")
}

async fn code_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.expect("json refusal");
    (status, body["error"]["code"].as_str().unwrap_or("").into())
}

#[tokio::test]
async fn a_preflight_passes_without_a_key_only_where_its_route_allows_it() {
    for relay in [true, false] {
        let upstream = RecordingUpstream::start().await;
        let gate = gate(&upstream, relay).await;
        let client = reqwest::Client::new();

        // Allowed: forwarded, with no identity, spoofed identity stripped.
        let r = preflight(&client, gate.proxy_url("/open/orders"))
            .header("x-keygate-key-id", "spoofed")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "relay={relay}");
        assert_eq!(r.headers()["x-upstream"], "yes");
        let seen = upstream.last();
        assert_eq!(seen.method, http::Method::OPTIONS);
        assert_eq!(seen.path, "/open/orders");
        assert_eq!(seen.headers["origin"], "https://app.example.com");
        assert_eq!(seen.headers["access-control-request-method"], "DELETE");
        assert!(
            !seen
                .headers
                .keys()
                .any(|name| name.as_str().starts_with("x-keygate-")),
            "relay={relay}: {:?}",
            seen.headers
        );
        assert!(seen.headers.contains_key("x-request-id"));
        assert!(seen.headers.contains_key("x-forwarded-for"));
        let forwarded = upstream.count();

        // Not a preflight, or a route that does not allow it: refused.
        let refused = [
            client.get(gate.proxy_url("/open/orders")),
            client.request(reqwest::Method::OPTIONS, gate.proxy_url("/open/orders")),
            client
                .request(reqwest::Method::OPTIONS, gate.proxy_url("/open/orders"))
                .header("origin", "https://app.example.com"),
            preflight(&client, gate.proxy_url("/orders")),
            preflight(&client, gate.proxy_url("/open/orders")).header("authorization", "Digest x"),
        ];
        for request in refused {
            let r = request.send().await.unwrap();
            assert_eq!(
                code_of(r).await,
                (401, "missing_api_key".into()),
                "relay={relay}"
            );
        }
        // A preflight that does present a key is checked like any request.
        let r = preflight(&client, gate.proxy_url("/open/orders"))
            .bearer_auth("kg_0123456789abcdef_nope")
            .send()
            .await
            .unwrap();
        assert_eq!(code_of(r).await.0, 401, "relay={relay}");
        let r = preflight(&client, gate.proxy_url("/open/orders"))
            .bearer_auth(&gate.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(upstream.last().headers.contains_key("x-keygate-key-id"));
        assert_eq!(upstream.count(), forwarded + 1, "relay={relay}");
        gate.stop().await;
    }
}

#[tokio::test]
async fn preflights_need_a_key_unless_allowed() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    let client = reqwest::Client::new();
    let r = preflight(&client, gate.proxy_url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(r).await, (401, "missing_api_key".into()));
    assert_eq!(upstream.count(), 0);
    gate.stop().await;

    // `[proxy] cors_allow_preflight` is every route's default.
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("cors_allow_preflight = true")
        .start()
        .await;
    let r = preflight(&client, gate.proxy_url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn forward_auth_allows_a_described_preflight_where_its_route_does() {
    let upstream = RecordingUpstream::start().await;
    let gate = gate(&upstream, true).await;
    let client = reqwest::Client::new();
    let described = |uri: &str| {
        client
            .get(gate.proxy_url("/verify"))
            .header("x-forwarded-method", "OPTIONS")
            .header("x-forwarded-uri", uri)
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
    };
    let r = described("/open/orders").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r
        .headers()
        .keys()
        .any(|name| name.as_str().starts_with("x-keygate-")));
    let r = described("/orders").send().await.unwrap();
    assert_eq!(code_of(r).await, (401, "missing_api_key".into()));
    // The decision request's own write is not lessened to a preflight.
    let r = client
        .post(gate.proxy_url("/verify"))
        .header("x-forwarded-method", "OPTIONS")
        .header("x-forwarded-uri", "/open/orders")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(code_of(r).await, (401, "missing_api_key".into()));
    assert_eq!(upstream.count(), 0, "a decision forwards nothing");
    gate.stop().await;
}
