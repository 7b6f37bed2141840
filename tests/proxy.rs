//! The data plane end to end: real keygate on 127.0.0.1:0, a real recording
//! upstream, real clients; assertions on what the upstream received and what
//! the client got.

mod support;

use std::time::{Duration, SystemTime};

use base64::Engine;
use keygate::key::KeyId;
use keygate::store::{AccountRole, Actor, KeyUpdate, OwnerType, Permission, PrincipalSpec};
use support::{dead_address, Gate, RecordingUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> (Gate, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    (gate, upstream)
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn valid_key_passes_with_identity_headers() {
    let (gate, upstream) = setup().await;
    let r = reqwest::Client::new()
        .post(gate.proxy_url("/orders/7?verbose=1"))
        .bearer_auth(&gate.admin_token)
        .header("x-request-id", "req-123")
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "yes");
    assert_eq!(r.text().await.unwrap(), "ok");
    let seen = upstream.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/orders/7?verbose=1");
    assert_eq!(seen.body_len, 5);
    let h = &seen.headers;
    let admin_key_id = &gate.admin_token[3..19];
    assert_eq!(h["x-keygate-key-id"], admin_key_id);
    assert_eq!(h["x-keygate-owner-id"], gate.admin_user.id.as_str());
    assert_eq!(h["x-keygate-owner-type"], "user");
    assert_eq!(h["x-keygate-owner-name"], "admin@example.com");
    assert_eq!(h["x-keygate-role"], "admin");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gate.proxy.to_string().as_str());
    assert_eq!(h["x-request-id"], "req-123");
    assert!(!h.contains_key("authorization"));
    gate.stop().await;
}

#[tokio::test]
async fn all_three_presentations_are_accepted_and_stripped() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::new();
    let token = &gate.admin_token;
    let (id_part, secret_part) = (&token[3..19], &token[20..]);
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{id_part}:{secret_part}"));
    let requests = [
        client
            .get(gate.proxy_url("/"))
            .header("authorization", format!("Bearer {token}")),
        client
            .get(gate.proxy_url("/"))
            .header("authorization", format!("Basic {basic}")),
        client
            .get(gate.proxy_url("/"))
            .header("x-api-key", token.as_str()),
    ];
    for request in requests {
        let r = request.send().await.expect("request");
        assert_eq!(r.status(), 200);
        let seen = upstream.last();
        assert!(!seen.headers.contains_key("authorization"));
        assert!(!seen.headers.contains_key("x-api-key"));
        assert!(
            seen.headers.contains_key("x-request-id"),
            "a request id is created"
        );
    }
    // Keys in the query string are not accepted.
    let r = client
        .get(gate.proxy_url(&format!("/?api_key={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "missing_api_key".into()));
    assert_eq!(upstream.count(), 3);
    gate.stop().await;
}

/// A second key beside the one that authenticates (the key header next to a
/// Bearer token) is a secret too: it never reaches the upstream, on either
/// path. An `Authorization` of another scheme belongs to the upstream and
/// is forwarded beside a key header.
#[tokio::test]
async fn a_second_key_beside_the_credential_is_stripped_too() {
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let client = reqwest::Client::new();
        let other_key = gate.tokens.generate().1.expose().to_string();
        let r = client
            .get(gate.proxy_url("/two-keys"))
            .bearer_auth(&gate.admin_token)
            .header("x-api-key", other_key.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "relay {relay}");
        let seen = upstream.last();
        assert!(!seen.headers.contains_key("authorization"), "relay {relay}");
        assert!(
            !seen.headers.contains_key("x-api-key"),
            "relay {relay}: the second key was forwarded"
        );
        let r = client
            .get(gate.proxy_url("/upstream-auth"))
            .header("authorization", "Negotiate YIIBhwYGKwYBBQUCoII=")
            .header("x-api-key", gate.admin_token.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "relay {relay}");
        let seen = upstream.last();
        assert_eq!(
            seen.headers["authorization"], "Negotiate YIIBhwYGKwYBBQUCoII=",
            "relay {relay}"
        );
        assert!(!seen.headers.contains_key("x-api-key"), "relay {relay}");
        gate.stop().await;
    }
}

/// The key header spelled with `_` for `-` goes too (CGI-style servers read
/// `x_api_key` as `HTTP_X_API_KEY`, the key header itself), on both
/// HTTP/1.1 paths and over HTTP/2; a look-alike of another header stays.
#[tokio::test]
async fn a_key_in_the_key_headers_underscore_spelling_is_stripped() {
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let other_key = gate.tokens.generate().1.expose().to_string();
        let http1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        for (client, version) in [(&http1, "HTTP/1.1"), (&h2, "HTTP/2")] {
            let r = client
                .get(gate.proxy_url("/underscored"))
                .bearer_auth(&gate.admin_token)
                .header("x_api_key", other_key.as_str())
                .header("X_Api-Key", other_key.as_str())
                .header("x_request_thing", "kept")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "relay {relay}, {version}");
            let seen = upstream.last();
            let leaked: Vec<_> = seen
                .headers
                .keys()
                .filter(|n| n.as_str().replace('_', "-") == "x-api-key")
                .collect();
            assert!(
                leaked.is_empty(),
                "relay {relay}, {version}: {leaked:?} forwarded"
            );
            assert_eq!(
                seen.headers["x_request_thing"], "kept",
                "relay {relay}, {version}"
            );
        }
        gate.stop().await;
    }
}

#[tokio::test]
async fn every_bad_key_is_refused_with_its_code_and_never_forwarded() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::new();
    let valid = gate.admin_token.clone();

    // Wrong secret for an existing id, with a correct checksum.
    let (wrong_secret_id, wrong_secret) = {
        let id = KeyId::parse(&valid[3..19]).unwrap();
        let (token, _) = gate.tokens.issue_secret(&id);
        (id, token.expose().to_string())
    };
    assert_eq!(&wrong_secret[3..19], wrong_secret_id.as_str());
    let unknown = gate.tokens.generate().1.expose().to_string();
    let mut bad_checksum = valid.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing_api_key"),
        (Some("Bearer".into()), "malformed_api_key"),
        (Some("Bearer kg_short".into()), "malformed_api_key"),
        (Some(format!("Bearer {bad_checksum}")), "malformed_api_key"),
        (
            Some(format!("Bearer xx{}", &valid[2..])),
            "malformed_api_key",
        ),
        (Some("Digest abc".into()), "missing_api_key"),
        (Some("Basic !!!notbase64".into()), "malformed_api_key"),
        (Some(format!("Bearer {unknown}")), "invalid_api_key"),
        (Some(format!("Bearer {wrong_secret}")), "invalid_api_key"),
    ];
    for (authorization, code) in cases {
        let mut request = client.get(gate.proxy_url("/"));
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        let r = request.send().await.expect("request");
        let challenge = if code == "missing_api_key" {
            r#"Bearer realm="keygate""#
        } else {
            r#"Bearer realm="keygate", error="invalid_token""#
        };
        assert_eq!(
            r.headers()["www-authenticate"],
            challenge,
            "{authorization:?}"
        );
        assert_eq!(
            error_code(r).await,
            (401, code.to_string()),
            "{authorization:?}"
        );
    }
    assert_eq!(
        upstream.count(),
        0,
        "nothing unauthenticated reaches the upstream"
    );
    gate.stop().await;
}

#[tokio::test]
async fn disabled_expired_and_owner_disabled_keys_are_refused() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::new();
    let alice = gate
        .user("alice@example.com", AccountRole::Developer, &[])
        .await;
    let (disabled_id, disabled) = gate.key_for(&alice).await;
    let (expired_id, expired) = gate.key_for(&alice).await;
    let bob = gate
        .user("bob@example.com", AccountRole::Developer, &[])
        .await;
    let (_, bobs) = gate.key_for(&bob).await;

    let id = KeyId::parse(&disabled_id).unwrap();
    let update = KeyUpdate {
        disabled: Some(true),
        ..KeyUpdate::default()
    };
    gate.store
        .update_key(&Actor::system("test"), &id, update, None)
        .await
        .unwrap();
    gate.sql(&format!(
        "UPDATE api_keys SET expiry_ms = 1000 WHERE id = '{expired_id}'"
    ))
    .await;
    let spec = PrincipalSpec {
        name: bob.name.clone(),
        description: String::new(),
        access: bob.access.clone(),
        disabled: true,
    };
    gate.store
        .update_principal(&Actor::system("test"), OwnerType::User, &bob.id, spec, None)
        .await
        .unwrap();

    for (token, code) in [
        (&disabled, "api_key_disabled"),
        (&expired, "api_key_expired"),
        (&bobs, "owner_disabled"),
    ] {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, (401, code.to_string()));
        // A wrong secret for the same id is never told the key's state.
        let id = KeyId::parse(&token[3..19]).unwrap();
        let wrong = gate.tokens.issue_secret(&id).0;
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(wrong.expose())
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, (401, "invalid_api_key".to_string()));
    }
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn expiry_is_checked_on_every_request_even_when_cached() {
    let (gate, _upstream) = setup().await;
    let client = reqwest::Client::new();
    let carol = gate
        .user("carol@example.com", AccountRole::Developer, &[])
        .await;
    let (id, token) = gate.key_for(&carol).await;
    // Expire two seconds from now, then use it while valid so it is cached.
    let soon = keygate::store::to_ms(SystemTime::now() + Duration::from_secs(2));
    gate.sql(&format!(
        "UPDATE api_keys SET expiry_ms = {soon} WHERE id = '{id}'"
    ))
    .await;
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Real time must pass: the proxy compares against the wall clock.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "api_key_expired".to_string()));
    gate.stop().await;
}

#[tokio::test]
async fn rotated_key_old_secret_works_until_grace_deadline() {
    let (gate, _upstream) = setup().await;
    let client = reqwest::Client::new();
    let dave = gate
        .user("dave@example.com", AccountRole::Developer, &[])
        .await;
    let (id, old) = gate.key_for(&dave).await;
    let key_id = KeyId::parse(&id).unwrap();
    let (new, digest) = gate.tokens.issue_secret(&key_id);
    let grace = SystemTime::now() + Duration::from_secs(3600);
    gate.store
        .rotate_key(&Actor::system("test"), &key_id, digest, grace)
        .await
        .unwrap();
    for token in [&old, &new.expose().to_string()] {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // A second rotation whose grace is already over: the first new secret fails.
    let (newest, digest) = gate.tokens.issue_secret(&key_id);
    let past = SystemTime::now() - Duration::from_secs(1);
    gate.store
        .rotate_key(&Actor::system("test"), &key_id, digest, past)
        .await
        .unwrap();
    // The proxy's cache still holds the previous state; a fresh gate on the
    // same store reads the new one (same-process invalidation is the admin
    // API's job and is tested there).
    let upstream = RecordingUpstream::start().await;
    let fresh = Gate::builder()
        .upstream(upstream.addr)
        .start_on(&gate)
        .await;
    let r = client
        .get(fresh.proxy_url("/"))
        .bearer_auth(new.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (401, "invalid_api_key".to_string()));
    let r = client
        .get(fresh.proxy_url("/"))
        .bearer_auth(newest.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    fresh.stop().await;
    gate.stop().await;
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let (gate, upstream) = setup().await;
    let bob = gate.user("bob@example.com", AccountRole::Read, &[]).await;
    let (_, token) = gate.key_for(&bob).await;
    // Raw HTTP/1.1 so that underscores and odd cases go out exactly as written.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\
         X-Keygate-Owner-Id: evil\r\nx_keygate_role: admin\r\nX-KEYGATE-KEY-ID: k\r\n\
         x-keygate-custom: 1\r\nx_Keygate-Owner_Name: root\r\nConnection: close\r\n\r\n"
    );
    let response = raw_http(gate.proxy, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last();
    let identity: Vec<_> = seen
        .headers
        .iter()
        .filter(|(n, _)| n.as_str().replace('_', "-").starts_with("x-keygate-"))
        .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap().to_string()))
        .collect();
    let expected: Vec<(String, String)> = vec![
        ("x-keygate-key-id".into(), token[3..19].to_string()),
        ("x-keygate-owner-id".into(), bob.id.clone()),
        ("x-keygate-owner-type".into(), "user".into()),
        ("x-keygate-owner-name".into(), "bob@example.com".into()),
        ("x-keygate-role".into(), "read".into()),
    ];
    let mut identity_sorted = identity.clone();
    identity_sorted.sort();
    let mut expected_sorted = expected;
    expected_sorted.sort();
    assert_eq!(identity_sorted, expected_sorted);
    gate.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (gate, upstream) = setup().await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {}\r\nConnection: keep-alive, x-private\r\n\
         x-private: secret-hop\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9v\r\nTE: gzip\r\n\
         x-forwarded-for: 10.0.0.1\r\n\r\n",
        gate.admin_token
    );
    let response = raw_http(gate.proxy, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("x-hop"),
        "response hop-by-hop removed: {response}"
    );
    let h = upstream.last().headers;
    for gone in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream");
    }
    assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
    gate.stop().await;
}

#[tokio::test]
async fn upstream_down_gives_502_and_slow_upstream_504() {
    let dead = dead_address().await;
    let gate = Gate::builder().upstream(dead).start().await;
    let client = reqwest::Client::new();
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(r).await,
        (502, "upstream_unavailable".to_string())
    );
    gate.stop().await;

    let (gate, upstream) = setup().await;
    let r = client
        .get(gate.proxy_url("/slow"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (504, "upstream_timeout".to_string()));
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::new();
    // 8 MiB request body, sent as a stream of chunks.
    let chunks = (0..128).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 64 * 1024]));
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = client
        .post(gate.proxy_url("/echo-body"))
        .bearer_auth(&gate.admin_token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 8 * 1024 * 1024);
    assert_eq!(upstream.last().body_len, 8 * 1024 * 1024);
    let r = client
        .get(gate.proxy_url("/stream/2048"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 2048 * 1024);
    gate.stop().await;
}

#[tokio::test]
async fn namespaced_routes_check_scope_and_permission() {
    let upstream = RecordingUpstream::start().await;
    let routes = format!(
        "[[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://{0}\"\nnamespace = \"orders\"\n\
         [[routes]]\npath_prefix = \"/orders/admin\"\nupstream = \"http://{0}\"\nnamespace = \"orders\"\npermission = \"admin\"\n",
        upstream.addr
    );
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra(&routes)
        .start()
        .await;
    let client = reqwest::Client::new();
    let reader = gate
        .user(
            "reader@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Read)],
        )
        .await;
    let (_, reader_token) = gate.key_for(&reader).await;
    let writer = gate
        .user(
            "writer@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Write)],
        )
        .await;
    let (_, writer_token) = gate.key_for(&writer).await;
    let outsider = gate
        .user("out@example.com", AccountRole::Developer, &[])
        .await;
    let (_, outsider_token) = gate.key_for(&outsider).await;

    let status = |method: reqwest::Method, path: &str, token: &str| {
        client
            .request(method, gate.proxy_url(path))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        status(reqwest::Method::GET, "/orders/1", &reader_token)
            .await
            .unwrap()
            .status(),
        200
    );
    let r = status(reqwest::Method::POST, "/orders/1", &reader_token)
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "forbidden".to_string()));
    assert_eq!(
        status(reqwest::Method::POST, "/orders/1", &writer_token)
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(upstream.last().headers["x-keygate-namespace"], "orders");
    let r = status(reqwest::Method::GET, "/orders/admin/x", &writer_token)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        status(reqwest::Method::GET, "/orders/admin/x", &gate.admin_token)
            .await
            .unwrap()
            .status(),
        200
    );
    let r = status(reqwest::Method::GET, "/orders/1", &outsider_token)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The default route has no namespace: any valid key passes.
    assert_eq!(
        status(reqwest::Method::GET, "/other", &outsider_token)
            .await
            .unwrap()
            .status(),
        200
    );
    gate.stop().await;
}

#[tokio::test]
async fn unparseable_requests_get_400_and_reach_nothing() {
    let (gate, upstream) = setup().await;
    let bad_requests: [&[u8]; 4] = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\r\nx: \x01\r\n\r\n",
    ];
    for request in bad_requests {
        let response = raw_http(gate.proxy, request).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{:?} -> {response}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn a_refused_request_leaves_the_connection_usable() {
    let (gate, upstream) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 401"), "{first}");
    let second = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\r\n",
        gate.admin_token
    );
    stream.write_all(second.as_bytes()).await.unwrap();
    let second = read_response(&mut stream).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(upstream.count(), 1);
    gate.stop().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_clients_are_served() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(gate.proxy_url("/h2"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    assert_eq!(
        seen.version,
        http::Version::HTTP_11,
        "non-gRPC goes upstream as HTTP/1.1"
    );
    assert!(seen.headers.contains_key("x-keygate-key-id"));
    // The :authority is the host: the upstream gets it as Host and
    // x-forwarded-host, as it gets an HTTP/1.1 client's Host, also over a
    // Host header that names another (which routes did not match).
    let authority = gate.proxy.to_string();
    assert_eq!(seen.headers["host"], authority.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], authority.as_str());
    let r = client
        .get(gate.proxy_url("/h2"))
        .bearer_auth(&gate.admin_token)
        .header("host", "other.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.headers["host"], authority.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], authority.as_str());
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    let r = client.get(gate.proxy_url("/h2")).send().await.unwrap();
    assert_eq!(error_code(r).await, (401, "missing_api_key".to_string()));
    gate.stop().await;
}

/// RFC 9112 section 3.2: an HTTP/1.1 request without a Host, with two, or
/// with one that is not a host is refused with 400 `invalid_host` and
/// reaches no upstream (with host routes, a route would be chosen by one
/// Host and the upstream could read another); HTTP/1.0 may omit it.
#[tokio::test]
async fn requests_without_one_sound_host_are_refused() {
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let token = &gate.admin_token;
        let before = upstream.count();
        for hosts in [
            "",
            "Host: a.example.com\r\nHost: b.example.com\r\n",
            "Host: a b\r\n",
            "Host: user@a.example.com\r\n",
            "Host: \r\n",
        ] {
            let request =
                format!("GET /h HTTP/1.1\r\n{hosts}Authorization: Bearer {token}\r\n\r\n");
            let answer = raw_http(gate.proxy, request.as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 400 "),
                "relay {relay}, {hosts:?}: {answer}"
            );
            assert!(answer.contains("\"invalid_host\""), "{answer}");
        }
        assert_eq!(
            upstream.count(),
            before,
            "relay {relay}: a request was forwarded"
        );
        let request = format!("GET /h HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n");
        let answer = raw_http(gate.proxy, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.0 200 "),
            "relay {relay}: {answer}"
        );
        assert_eq!(upstream.count(), before + 1);
        gate.stop().await;
    }
}

/// Sends raw bytes and reads until the server closes or a response is complete.
async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

/// Reads one response head plus a Content-Length body (or until close).
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await;
        let n = match read {
            Ok(Ok(n)) => n,
            _ => break,
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length = text[..head_end].lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if let Some(length) = length {
                if buf.len() >= head_end + 4 + length {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `[rate_limit]`: a key gets its burst, then 429 `rate_limited` with
/// Retry-After (nothing forwarded), another key is not affected, and the
/// key's rate comes back with time. Checked on the relay (HTTP/1.1) and on
/// hyper's path (HTTP/2).
#[tokio::test]
async fn keys_over_their_rate_get_429_and_nothing_is_forwarded() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra("[rate_limit]\nper_key_per_second = 1\nburst = 2")
        .start()
        .await;
    let owner = gate
        .user("limited@example.com", AccountRole::Developer, &[])
        .await;
    let (_, first) = gate.key_for(&owner).await;
    let (_, second) = gate.key_for(&owner).await;
    let http1 = reqwest::Client::new();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [&http1, &h2] {
        let get = |token: &str| {
            client
                .get(gate.proxy_url("/limited"))
                .bearer_auth(token)
                .send()
        };
        // A full bucket per round: wait for it to refill (2 at 1/s). The
        // third request is refused unless a whole second passed since the
        // first.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let before = upstream.count();
        for _ in 0..2 {
            assert_eq!(get(&first).await.unwrap().status(), 200);
        }
        let r = get(&first).await.unwrap();
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(error_code(r).await, (429, "rate_limited".to_string()));
        assert_eq!(
            upstream.count(),
            before + 2,
            "the refused request was forwarded"
        );
        let other = get(&second).await.unwrap();
        assert_eq!(other.status(), 200, "another key shares no bucket");
        // A second frees one request.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(get(&first).await.unwrap().status(), 200);
    }
}

/// One request on its own connection, raw (HTTP clients normalize paths
/// before sending them): the status, the error code if any.
async fn raw_status(gate: &Gate, path: &str, token: &str) -> (u16, String) {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    let response = raw_http(gate.proxy, request.as_bytes()).await;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status for {path}: {response:?}"));
    let code = response
        .split("\"code\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_string();
    (status, code)
}

/// A gate with the route `/admin` (namespace `ops`, and `route_line`)
/// beside the default route, both to `upstream`, with `proxy_line` in
/// [proxy]; and the token of a developer without access to `ops`.
async fn gate_with_an_admin_route(
    upstream: &RecordingUpstream,
    proxy_line: &str,
    route_line: &str,
) -> (Gate, String) {
    let routes = format!(
        "[[routes]]\npath_prefix = \"/admin\"\nupstream = \"http://{0}\"\nnamespace = \"ops\"\n{route_line}\n",
        upstream.addr
    );
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy(proxy_line)
        .extra(&routes)
        .start()
        .await;
    let outsider = gate
        .user("out@example.com", AccountRole::Developer, &[])
        .await;
    let (_, outsider) = gate.key_for(&outsider).await;
    (gate, outsider)
}

/// A route is an authorization boundary: every spelling of a path under it
/// that an upstream would serve as that path is authorized under it, and
/// the upstream receives the normalized path. On both paths (relay, hyper).
#[tokio::test]
async fn paths_that_mean_a_routed_prefix_are_authorized_under_it() {
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let (gate, outsider) =
            gate_with_an_admin_route(&upstream, &format!("http1_relay = {relay}"), "").await;
        let admin = gate.admin_token.clone();
        // The default route takes any valid key, and no header can have the
        // upstream serve another path than the one authorized.
        let overridden = format!(
            "GET /public/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {outsider}\r\n\
             X-Original-URL: /admin/x\r\nx-rewrite-url: /admin/x\r\nConnection: close\r\n\r\n"
        );
        let response = raw_http(gate.proxy, overridden.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let seen = upstream.last();
        assert_eq!(seen.path, "/public/x");
        assert!(
            !seen.headers.contains_key("x-original-url"),
            "relay={relay}"
        );
        assert!(!seen.headers.contains_key("x-rewrite-url"), "relay={relay}");
        for path in [
            "/admin/x",
            "/%61dmin/x",
            "/%41dmin/x/../../admin/x",
            "/public/../admin/x",
            "/public/%2e%2e/admin/x",
            "/./admin/x",
            "//admin/x",
            "/admin;jsessionid=1/x",
        ] {
            let refused = raw_status(&gate, path, &outsider).await;
            assert_eq!(refused, (403, "forbidden".into()), "relay={relay} {path}");
            assert_eq!(
                raw_status(&gate, path, &admin).await.0,
                200,
                "relay={relay} {path}"
            );
        }
        let before = upstream.count();
        for (path, code) in [
            ("/public/..%2fadmin/x", "ambiguous_path"),
            ("/public/..%5Cadmin/x", "ambiguous_path"),
            ("/admin%00", "ambiguous_path"),
            ("/public\\..\\admin/x", "ambiguous_path"),
            ("/a%zz", "malformed_path"),
        ] {
            let refused = raw_status(&gate, path, &admin).await;
            assert_eq!(refused, (400, code.into()), "relay={relay} {path}");
        }
        assert_eq!(
            upstream.count(),
            before,
            "a refused path reached the upstream"
        );

        // The upstream receives the path that was authorized; the query is
        // the client's.
        raw_status(&gate, "/%61dmin//./x/%7euser/%c3%a9?q=%2F..%2f", &admin).await;
        assert_eq!(upstream.last().path, "/admin/x/~user/%C3%A9?q=%2F..%2f");
        raw_status(&gate, "/docs/a.b/.well-known", &admin).await;
        assert_eq!(upstream.last().path, "/docs/a.b/.well-known");
        gate.stop().await;
    }

    // Opting out: encoded slashes kept as escapes, or no normalization.
    let (keep, _) = gate_with_an_admin_route(
        &upstream,
        "path_normalization = \"keep_encoded_slashes\"",
        "",
    )
    .await;
    let admin = keep.admin_token.clone();
    assert_eq!(raw_status(&keep, "/repos/a%2fb/./c", &admin).await.0, 200);
    assert_eq!(upstream.last().path, "/repos/a%2Fb/c");
    keep.stop().await;
    let (off, outsider) =
        gate_with_an_admin_route(&upstream, "path_normalization = \"off\"", "").await;
    assert_eq!(raw_status(&off, "/%61dmin/x", &outsider).await.0, 200);
    assert_eq!(upstream.last().path, "/%61dmin/x");
    off.stop().await;

    // An upstream that ignores case: the route says so, and every case of
    // its prefix is authorized under it.
    let (folded, outsider) =
        gate_with_an_admin_route(&upstream, "", "case_sensitive = false").await;
    for path in ["/ADMIN/x", "/Admin", "/%41dmin/x"] {
        let refused = raw_status(&folded, path, &outsider).await;
        assert_eq!(refused, (403, "forbidden".into()), "{path}");
    }
    folded.stop().await;

    // Without path routes (the sidecar) the path decides nothing: the
    // upstream gets it as the client sent it, encoded slashes included.
    let sidecar = Gate::builder().upstream(upstream.addr).start().await;
    let admin = sidecar.admin_token.clone();
    assert_eq!(
        raw_status(&sidecar, "/repos/a%2fb/./c", &admin).await.0,
        200
    );
    assert_eq!(upstream.last().path, "/repos/a%2fb/./c");
    sidecar.stop().await;
}

/// An HTTP/1.1 client's Host does not go to an HTTP/2 upstream beside an
/// `:authority` that names the upstream (RFC 9113 section 8.3.1 forbids a
/// Host that differs); it arrives as x-forwarded-host.
#[tokio::test]
async fn an_h2c_upstream_gets_its_own_authority_and_the_host_as_x_forwarded_host() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("upstream_protocol = \"h2c\"")
        .start()
        .await;
    let r = reqwest::Client::new()
        .get(gate.proxy_url("/over-h2"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert!(!seen.headers.contains_key("host"), "{:?}", seen.headers);
    assert_eq!(
        seen.headers["x-forwarded-host"],
        gate.proxy.to_string().as_str()
    );
    gate.stop().await;
}

/// `x-forwarded-proto` and `-host` describe the client: kept from a
/// trusted proxy (a TLS-terminating ingress), replaced from anyone else;
/// `x-forwarded-for` is appended to either way. On both paths.
#[tokio::test]
async fn forwarding_headers_are_kept_only_from_trusted_proxies() {
    let upstream = RecordingUpstream::start().await;
    for (trusted, relay) in [(true, true), (true, false), (false, true), (false, false)] {
        let trust = if trusted {
            "[\"10.0.0.0/8\", \"127.0.0.1\"]"
        } else {
            "[\"10.0.0.0/8\"]"
        };
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!("http1_relay = {relay}\ntrusted_proxies = {trust}"))
            .start()
            .await;
        let r = reqwest::Client::new()
            .get(gate.proxy_url("/fwd"))
            .bearer_auth(&gate.admin_token)
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "shop.example.com")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-real-ip", "203.0.113.9")
            .header("forwarded", "for=203.0.113.9;proto=https")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen = upstream.last();
        let case = format!("trusted={trusted} relay={relay}");
        let (proto, host) = if trusted {
            ("https".to_string(), "shop.example.com".to_string())
        } else {
            ("http".to_string(), gate.proxy.to_string())
        };
        assert_eq!(seen.headers["x-forwarded-proto"], proto.as_str(), "{case}");
        assert_eq!(seen.headers["x-forwarded-host"], host.as_str(), "{case}");
        assert_eq!(
            seen.headers.get_all("x-forwarded-proto").iter().count(),
            1,
            "{case}"
        );
        assert_eq!(
            seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1",
            "{case}"
        );
        // The client's address as a proxy before keygate states it: only a
        // trusted one may.
        for name in ["x-real-ip", "forwarded"] {
            assert_eq!(seen.headers.contains_key(name), trusted, "{case} {name}");
        }
        if !trusted {
            // Without a Host (HTTP/1.0), a client's x-forwarded-host is
            // removed, not passed on.
            let request = format!(
                "GET /fwd HTTP/1.0\r\nAuthorization: Bearer {}\r\nX-Forwarded-Host: evil.example\r\n\r\n",
                gate.admin_token
            );
            let response = raw_http(gate.proxy, request.as_bytes()).await;
            assert!(response.contains(" 200 "), "{case}: {response}");
            assert!(
                !upstream.last().headers.contains_key("x-forwarded-host"),
                "{case}"
            );
        }
        gate.stop().await;
    }
}
