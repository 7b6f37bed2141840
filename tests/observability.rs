//! Metrics as Prometheus scrapes them from the admin listener, the per-key
//! series cap, and health endpoints.

mod support;

use std::collections::BTreeMap;

use keygate::store::AccountRole;
use support::{AccessLog, Gate, RecordingUpstream};

/// Parses `name{labels} value` lines of one metric family.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let labels = series
                .split_once('{')
                .map(|(_, rest)| rest.trim_end_matches('}'))
                .unwrap_or("")
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap();
                    (k.to_string(), v.trim_matches('"').to_string())
                })
                .collect();
            (labels, value.parse().unwrap())
        })
        .collect()
}

async fn scrape(gate: &Gate) -> String {
    let r = reqwest::get(gate.admin_url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().await.unwrap()
}

#[tokio::test]
async fn requests_failures_bytes_cache_and_latency_are_exported() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let r = client
            .post(gate.proxy_url("/echo-body"))
            .bearer_auth(&gate.admin_token)
            .body(vec![b'x'; 1000])
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 1000);
    }
    let unknown = gate.tokens.generate().1.expose().to_string();
    client
        .get(gate.proxy_url("/"))
        .bearer_auth(&unknown)
        .send()
        .await
        .unwrap();
    client.get(gate.proxy_url("/")).send().await.unwrap();

    let text = scrape(&gate).await;
    let key_id = &gate.admin_token[3..19];
    let requests = samples(&text, "keygate_requests_total");
    let ok: f64 = requests
        .iter()
        .filter(|(l, _)| {
            l["key_id"] == key_id && l["status_class"] == "2xx" && l["route"] == "default"
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ok, 3.0, "{text}");
    assert!(requests
        .iter()
        .all(|(l, _)| l["owner_id"] == gate.admin_user.id));
    let failures = samples(&text, "keygate_auth_failures_total");
    let reason = |r: &str| {
        failures
            .iter()
            .find(|(l, _)| l["reason"] == r)
            .map(|(_, v)| *v)
    };
    assert_eq!(reason("invalid_api_key"), Some(1.0));
    assert_eq!(reason("missing_api_key"), Some(1.0));
    let bytes = samples(&text, "keygate_bytes_total");
    let dir = |d: &str| {
        bytes
            .iter()
            .find(|(l, _)| l["direction"] == d)
            .map(|(_, v)| *v)
            .unwrap()
    };
    assert_eq!(dir("in"), 3000.0);
    assert!(dir("out") >= 3000.0);
    // Four lookups (three with the admin key, one unknown); the first of
    // each id misses. (The change feed's first contact may drop the cache
    // once more at start, hence no exact split.)
    let hits = samples(&text, "keygate_cache_hits_total")[0].1;
    let misses = samples(&text, "keygate_cache_misses_total")[0].1;
    assert_eq!(hits + misses, 4.0, "{text}");
    assert!(misses >= 2.0 && hits >= 1.0, "{text}");
    // At most the admin key and the unknown id: the change feed's first
    // contact (above) may drop the cache after the requests, too.
    let entries = samples(&text, "keygate_cache_entries")[0].1;
    assert!((0.0..=2.0).contains(&entries), "{text}");
    let latency = samples(&text, "keygate_request_duration_seconds_count");
    assert_eq!(latency.iter().map(|(_, v)| v).sum::<f64>(), 5.0);
    assert_eq!(
        samples(&text, "keygate_upstream_duration_seconds_count")[0].1,
        3.0
    );
    assert!(
        !text.contains(&gate.admin_token[20..]),
        "a secret in /metrics"
    );
    gate.stop().await;
}

/// A fresh gate exports every refusal reason and every upstream error kind
/// of every route at zero, before any request: a series that appeared only
/// at its first increment had no earlier sample for `rate()` to start
/// from. Nothing per key is created.
#[tokio::test]
async fn failure_series_start_at_zero_on_a_fresh_gate() {
    let gate = Gate::builder()
        .upstream(support::dead_address().await)
        .extra("[[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://127.0.0.1:9\"\n")
        .start()
        .await;
    let text = scrape(&gate).await;
    let failures = samples(&text, "keygate_auth_failures_total");
    for reason in [
        "missing_api_key",
        "malformed_api_key",
        "invalid_api_key",
        "api_key_disabled",
        "api_key_expired",
        "owner_disabled",
        "api_keys_disabled",
        "forbidden",
        "rate_limited",
        "no_route",
        "store_unavailable",
        "request_timeout",
        "malformed_request",
    ] {
        let found: Vec<_> = failures
            .iter()
            .filter(|(l, _)| l["reason"] == reason)
            .collect();
        assert_eq!(found.len(), 1, "{reason}: {text}");
        assert_eq!(found[0].1, 0.0, "{reason}: {text}");
    }
    // The upstream's failures have their own metric.
    assert!(
        failures
            .iter()
            .all(|(l, _)| !l["reason"].starts_with("upstream_") && l.len() == 1),
        "{text}"
    );
    let upstream_errors = samples(&text, "keygate_upstream_errors_total");
    for route in ["default", "/orders"] {
        for kind in ["unavailable", "timeout"] {
            let found: Vec<_> = upstream_errors
                .iter()
                .filter(|(l, _)| l["route"] == route && l["kind"] == kind)
                .collect();
            assert_eq!(found.len(), 1, "{route} {kind}: {text}");
            assert_eq!(found[0].1, 0.0, "{route} {kind}: {text}");
        }
    }
    assert_eq!(upstream_errors.len(), 4, "{text}");
    assert!(
        samples(&text, "keygate_requests_total").is_empty(),
        "{text}"
    );
    gate.stop().await;
}

/// A reload that removes a route drops every series labelled with it:
/// request counts, latency histograms, upstream errors. The route that
/// stays keeps its counts. Added back later, the route counts afresh, also
/// for a key still cached from before.
#[tokio::test]
async fn a_route_removed_by_a_reload_leaves_no_series() {
    let upstream = RecordingUpstream::start().await;
    let orders = format!(
        "[[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra(&orders)
        .start()
        .await;
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let request = client
            .get(gate.proxy_url(path))
            .bearer_auth(&gate.admin_token);
        async move { assert_eq!(request.send().await.unwrap().status(), 200) }
    };
    // The change feed's first contact empties the cache: past it, the key
    // stays cached through the reloads below.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while samples(&scrape(&gate).await, "keygate_change_feed_seq")[0].1 == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change feed made no contact"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The key is counted on /orders first: that is the route its cached
    // counts are for.
    get("/orders/1").await;
    get("/orders/2").await;
    for _ in 0..3 {
        get("/").await;
    }
    let on = |text: &str, name: &str, route: &str| -> Vec<f64> {
        samples(text, name)
            .into_iter()
            .filter(|(l, _)| l["route"] == route)
            .map(|(_, v)| v)
            .collect()
    };
    let requests_2xx = |text: &str, route: &str| -> f64 {
        samples(text, "keygate_requests_total")
            .iter()
            .filter(|(l, _)| l["route"] == route && l["status_class"] == "2xx")
            .map(|(_, v)| v)
            .sum()
    };
    let text = scrape(&gate).await;
    assert_eq!(requests_2xx(&text, "/orders"), 2.0, "{text}");
    assert_eq!(requests_2xx(&text, "default"), 3.0, "{text}");
    assert_eq!(
        on(&text, "keygate_upstream_errors_total", "/orders").len(),
        2
    );

    gate.rewrite_config(|text| text.replace(&orders, ""));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = scrape(&gate).await;
        if !text.contains("route=\"/orders\"") {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the removed route kept its series: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(!text.contains("/orders"), "{text}");
    assert_eq!(requests_2xx(&text, "default"), 3.0, "{text}");
    assert_eq!(
        on(&text, "keygate_request_duration_seconds_count", "default"),
        [3.0],
        "{text}"
    );
    assert_eq!(
        on(&text, "keygate_upstream_duration_seconds_count", "default"),
        [3.0],
        "{text}"
    );
    assert_eq!(
        on(&text, "keygate_upstream_errors_total", "default"),
        [0.0, 0.0],
        "{text}"
    );

    // Back again: its failure series start at zero, its counts from one.
    gate.rewrite_config(|text| format!("{text}{orders}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !scrape(&gate).await.contains("route=\"/orders\"") {
        assert!(
            std::time::Instant::now() < deadline,
            "the route was not added back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    get("/orders/3").await;
    let text = scrape(&gate).await;
    assert_eq!(
        samples(&text, "keygate_cache_misses_total")[0].1,
        1.0,
        "{text}"
    );
    assert_eq!(requests_2xx(&text, "/orders"), 1.0, "{text}");
    assert_eq!(requests_2xx(&text, "default"), 3.0, "{text}");
    gate.stop().await;
}

#[tokio::test]
async fn per_key_series_are_capped_with_the_rest_under_other() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra("[metrics]\nmax_key_series = 3")
        .start()
        .await;
    let client = reqwest::Client::new();
    let mut tokens = Vec::new();
    for i in 0..8 {
        let user = gate
            .user(&format!("u{i}@example.com"), AccountRole::Developer, &[])
            .await;
        tokens.push(gate.key_for(&user).await.1);
    }
    for token in &tokens {
        for _ in 0..2 {
            let r = client
                .get(gate.proxy_url("/"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let text = scrape(&gate).await;
    let requests = samples(&text, "keygate_requests_total");
    let ids: std::collections::BTreeSet<_> =
        requests.iter().map(|(l, _)| l["key_id"].clone()).collect();
    assert_eq!(ids.len(), 4, "three keys and _other: {ids:?}");
    assert!(ids.contains("_other"));
    let total: f64 = requests.iter().map(|(_, v)| v).sum();
    assert_eq!(total, 16.0, "every request counted once");
    let other: f64 = requests
        .iter()
        .filter(|(l, _)| l["key_id"] == "_other")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(other, 10.0);
    gate.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let gate = Gate::builder().start().await;
    let r = reqwest::get(gate.admin_url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(gate.admin_url("/readyz")).await.unwrap();
    assert_eq!(r.status(), 200);
    gate.stop().await;
}

/// Under key churn the per-key series cap does not fill up with deleted
/// keys: once they are gone from the store (and so from the cache), the
/// sweeper frees their series, and a new key gets a series of its own
/// instead of counting under `_other`.
#[tokio::test]
async fn deleted_keys_give_their_series_slots_to_new_keys() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra("[metrics]\nmax_key_series = 2\n[cache]\nnegative_ttl = \"1s\"")
        .start()
        .await;
    let client = reqwest::Client::new();
    let owner = gate
        .user("churn@example.com", AccountRole::Developer, &[])
        .await;
    let proxied = |token: String| {
        let request = client.get(gate.proxy_url("/")).bearer_auth(token);
        async move { assert_eq!(request.send().await.unwrap().status(), 200) }
    };
    let mut first = Vec::new();
    for _ in 0..2 {
        let (id, token) = gate.key_for(&owner).await;
        proxied(token).await;
        first.push(id);
    }
    for id in &first {
        let r = client
            .delete(gate.admin_url(&format!("/api/v1/api-keys/{id}")))
            .bearer_auth(&gate.admin_token)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "delete: {}", r.status());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = scrape(&gate).await;
        if !first.iter().any(|id| text.contains(id.as_str())) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "deleted keys kept their series: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (new_id, token) = gate.key_for(&owner).await;
    proxied(token).await;
    let text = scrape(&gate).await;
    let requests = samples(&text, "keygate_requests_total");
    assert!(
        requests
            .iter()
            .any(|(l, v)| l["key_id"] == new_id && *v == 1.0),
        "the new key has its own series: {text}"
    );
    assert!(!text.contains("_other"), "nothing counted under _other");
    gate.stop().await;
}

/// A request head hyper cannot parse is answered by hyper (400; 431 when it
/// is too large, 414 for a target of 64 KiB), on both paths; it is counted
/// among the refusals by reason like every other, where an operator looking
/// for the 400s their clients report can find it.
#[tokio::test]
async fn unparsable_heads_are_counted_by_reason() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    for relay in [true, false] {
        let upstream = RecordingUpstream::start().await;
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!("http1_relay = {relay}\nmax_header_bytes = 131072"))
            .start()
            .await;
        let big = "a".repeat(140_000);
        let long_target = "a".repeat(70_000);
        let heads = [
            (
                "GET / HTTP/1.1\r\nHost: a\r\nBad Header: y\r\n\r\n".to_string(),
                400,
            ),
            ("GARBAGE\r\n\r\n".to_string(), 400),
            (
                format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
                431,
            ),
            (
                format!("GET /{long_target} HTTP/1.1\r\nHost: a\r\n\r\n"),
                414,
            ),
        ];
        for (head, status) in &heads {
            let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "relay {relay}: {:?} -> {answer}",
                &head[..20]
            );
        }
        let text = scrape(&gate).await;
        let refusals: BTreeMap<String, f64> = samples(&text, "keygate_auth_failures_total")
            .into_iter()
            .map(|(labels, value)| (labels["reason"].clone(), value))
            .collect();
        assert_eq!(
            refusals.get("malformed_request"),
            Some(&2.0),
            "relay {relay}: {text}"
        );
        assert_eq!(
            refusals.get("request_head_too_large"),
            Some(&1.0),
            "relay {relay}: {text}"
        );
        assert_eq!(
            refusals.get("uri_too_long"),
            Some(&1.0),
            "relay {relay}: {text}"
        );
        assert_eq!(upstream.count(), 0);
        gate.stop().await;
    }
}

/// A connection that `header_read_timeout` closes with part of a head
/// leaves one access line, 408 `header_read_timeout` (as nginx logs it),
/// and a count, on both paths, naming the method and path (without the
/// query) only when the request line had arrived whole, and nothing of the
/// headers (they may hold a secret); an idle keep-alive connection and one
/// that never sent a byte are closed without a trace. Both left none before.
#[tokio::test]
async fn a_head_cut_by_header_read_timeout_is_logged_and_counted() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let log = AccessLog::capture();
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!(
                "http1_relay = {relay}\nheader_read_timeout = \"300ms\"\nidle_timeout = \"1s\""
            ))
            .start()
            .await;
        let before = log.lines_with("header_read_timeout").len();
        let token = gate.admin_token.clone();
        let whole = format!("GET /whole HTTP/1.1\r\nHost: a\r\nx-api-key: {token}\r\n\r\n");
        // A whole request line and part of the headers, then nothing.
        let mut stalled = TcpStream::connect(gate.proxy).await.unwrap();
        let partial =
            format!("GET /stalled?sekrit=1 HTTP/1.1\r\nHost: a\r\nx-api-key: {token}\r\n");
        stalled.write_all(partial.as_bytes()).await.unwrap();
        // Part of a request line.
        let mut cut = TcpStream::connect(gate.proxy).await.unwrap();
        cut.write_all(b"GET /cut-short?sekrit=1 HTT").await.unwrap();
        // A whole request, then an idle keep-alive connection.
        let mut idle = TcpStream::connect(gate.proxy).await.unwrap();
        idle.write_all(whole.as_bytes()).await.unwrap();
        // A whole request answered, then part of a second head.
        let mut second = TcpStream::connect(gate.proxy).await.unwrap();
        second.write_all(whole.as_bytes()).await.unwrap();
        let mut answer = [0u8; 4096];
        let n = second.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "relay {relay}");
        let next = format!("POST /second?sekrit=1 HTTP/1.1\r\nx-api-key: {token}\r\n");
        second.write_all(next.as_bytes()).await.unwrap();
        // Nothing at all (hyper's path closes it at idle_timeout: hyper
        // has not chosen HTTP/1 or HTTP/2 for it yet).
        let mut silent = TcpStream::connect(gate.proxy).await.unwrap();
        for (name, conn) in [
            ("stalled", &mut stalled),
            ("cut", &mut cut),
            ("idle", &mut idle),
            ("second", &mut second),
            ("silent", &mut silent),
        ] {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("relay {relay}: {name} still open"))
                .ok();
            let got = String::from_utf8_lossy(&got);
            if name == "idle" {
                assert!(got.starts_with("HTTP/1.1 200"), "relay {relay}: {got}");
            } else {
                assert!(got.is_empty(), "relay {relay}: {name}: {got}");
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while log.lines_with("header_read_timeout").len() < before + 3
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines = log.lines_with("header_read_timeout");
        assert_eq!(lines.len(), before + 3, "relay {relay}: {lines:?}");
        let lines = &lines[before..];
        for line in lines {
            assert!(line.contains(" status=408 "), "relay {relay}: {line}");
            for secret in ["sekrit", "cut-short", &token[..12], "key_id"] {
                assert!(!line.contains(secret), "relay {relay}: {secret} in {line}");
            }
        }
        let named = |method: &str, path: &str| {
            let (method, path) = (
                format!(" method=\"{method}\" "),
                format!(" path=\"{path}\" "),
            );
            lines
                .iter()
                .any(|l| l.contains(&method) && l.contains(&path))
        };
        assert!(named("GET", "/stalled"), "relay {relay}: {lines:?}");
        assert!(named("POST", "/second"), "relay {relay}: {lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(" method=\"-\" ") && !l.contains(" path=")),
            "relay {relay}: {lines:?}"
        );
        let text = scrape(&gate).await;
        let timeouts = samples(&text, "keygate_auth_failures_total")
            .into_iter()
            .find(|(labels, _)| labels["reason"] == "header_read_timeout")
            .map(|(_, value)| value);
        assert_eq!(timeouts, Some(3.0), "relay {relay}: {text}");
        gate.stop().await;
    }
}
