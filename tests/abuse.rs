//! HTTP abuse against the proxy listener, over raw TCP so that every byte goes
//! out exactly as an attacker would write it: request smuggling (Content-Length
//! against Transfer-Encoding, odd codings and lengths), obs-fold, invalid
//! bytes, identity look-alikes over HTTP/2 and in trailers, request-target
//! tricks, oversized HTTP/2 header lists, slow-loris heads, slow bodies and
//! broken ones.
//!
//! The promise checked every time: the attacker gets a clear 4xx or a closed
//! connection, and the upstream sees nothing the proxy did not authorize.
//! (tests/proxy.rs and tests/transport.rs already cover two differing
//! Content-Lengths, a control byte, 431 on big heads and a stalled head.)
// Test servers record what they saw behind a plain Mutex; no hot path here.
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use support::{statuses, Gate, RecordingUpstream, SeenRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup() -> (Gate, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    (gate, upstream)
}

/// Writes `request`, then reads until the server closes or `wait` passes.
/// Returns what came back and whether the server closed the connection.
async fn exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    read_until_close(&mut stream, wait).await
}

async fn read_until_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(wait, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Everything the upstream saw was authorized by keygate: it carries the
/// identity keygate injected for `key_id`, and nothing spoofed.
fn all_authorized(seen: &[SeenRequest], key_id: &str) {
    for request in seen {
        assert_eq!(
            request
                .headers
                .get("x-keygate-key-id")
                .map(|v| v.as_bytes()),
            Some(key_id.as_bytes()),
            "unauthorized request reached the upstream: {request:?}"
        );
        assert_ne!(
            request.path, "/smuggled",
            "a smuggled request reached the upstream"
        );
        for (name, value) in &request.headers {
            assert_ne!(value, "spoofed", "spoofed {name} reached the upstream");
        }
        assert!(
            !(request.headers.contains_key("content-length")
                && request.headers.contains_key("transfer-encoding")),
            "both framings reached the upstream: {request:?}"
        );
    }
}

fn admin_key_id(gate: &Gate) -> String {
    gate.admin_token[3..19].to_string()
}

/// A request that, if a parser disagreed about where the first one ends,
/// would be read as a second request: no credential and a spoofed role.
const SMUGGLED: &str =
    "GET /smuggled HTTP/1.1\r\nHost: a\r\nx-keygate-role: spoofed\r\nContent-Length: 0\r\n\r\n";

#[tokio::test]
async fn content_length_with_transfer_encoding_smuggles_nothing() {
    let (gate, upstream) = setup().await;
    let token = &gate.admin_token;
    // CL.TE and TE.CL: the classic desync pair, in both header orders, and
    // with the TE line in odd case.
    let attacks = [
        format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: 6\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
        ),
        format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: {}\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
            4, SMUGGLED.len()
        ),
        format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\ntRaNsFeR-eNcOdInG: CHUNKED\r\n\
             Content-Length: 3\r\n\r\n0\r\n\r\n{SMUGGLED}"
        ),
    ];
    for attack in &attacks {
        let (response, closed) =
            exchange(gate.proxy, attack.as_bytes(), Duration::from_secs(5)).await;
        let codes = statuses(&response);
        // Either refused outright, or the one request framed by
        // Transfer-Encoding (which overrides Content-Length) is answered and
        // the connection closed, so nothing after it is ever read as a request.
        let refused = codes.first().is_some_and(|c| (400..500).contains(c));
        assert!(refused || closed, "{attack:?} -> {response}");
        assert!(
            !codes.contains(&200) || codes.len() == 1 || codes[1] == 401,
            "{attack:?} -> {response}"
        );
    }
    all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
    gate.stop().await;
}

#[tokio::test]
async fn odd_transfer_codings_and_lengths_are_refused() {
    let (gate, upstream) = setup().await;
    let token = &gate.admin_token;
    let head = |framing: &str| {
        format!(
            "POST /a HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n{framing}\r\n\r\n0\r\n\r\n{SMUGGLED}"
        )
    };
    let attacks = [
        // Chunked must be the final coding; anything else is unframeable.
        head("Transfer-Encoding: chunked, identity"),
        head("Transfer-Encoding: xchunked"),
        head("Transfer-Encoding: gzip"),
        head("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"),
        // Whitespace before the colon (RFC 9112 5.1: must be rejected).
        head("Transfer-Encoding : chunked"),
        // Lengths that only a lax parser reads as a number.
        head("Content-Length: 5, 6"),
        head("Content-Length: +5"),
        head("Content-Length: -1"),
        head("Content-Length: 0x5"),
        head("Content-Length: 5 5"),
        head("Content-Length: 99999999999999999999999"),
    ];
    for attack in &attacks {
        let (response, closed) =
            exchange(gate.proxy, attack.as_bytes(), Duration::from_secs(5)).await;
        let codes = statuses(&response);
        assert!(
            codes.first().is_some_and(|c| (400..500).contains(c)) || (codes.is_empty() && closed),
            "{attack:?} -> {response}"
        );
        assert!(closed, "connection left open after {attack:?}");
    }
    assert_eq!(upstream.count(), 0, "{:?}", upstream.seen.lock().unwrap());
    gate.stop().await;
}

#[tokio::test]
async fn obs_fold_and_invalid_header_bytes_are_refused() {
    let (gate, upstream) = setup().await;
    let token = &gate.admin_token;
    let attacks: Vec<Vec<u8>> = vec![
        // obs-fold: a continuation line, which could hide a second header.
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx-a: 1\r\n x-keygate-role: spoofed\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer\r\n\t{token}\r\n\r\n").into_bytes(),
        // NUL, a bare CR and DEL inside values; bytes no token allows in names.
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx-a: a\0b\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx-a: a\rx-keygate-role: spoofed\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx-a: a\x7fb\r\n\r\n").into_bytes(),
        [
            format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx-\u{e9}: 1\r\n\r\n").as_bytes(),
        ]
        .concat(),
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nx(a): 1\r\n\r\n").into_bytes(),
        format!("GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n: empty-name\r\n\r\n").into_bytes(),
        // A request line with junk in it.
        format!("GET /a b HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n").into_bytes(),
        format!("GET /\0 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n").into_bytes(),
        format!("GET / HTTP/9.9\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\r\n").into_bytes(),
    ];
    for attack in &attacks {
        let (response, closed) = exchange(gate.proxy, attack, Duration::from_secs(5)).await;
        let codes = statuses(&response);
        assert!(
            codes.first().is_some_and(|c| (400..500).contains(c)) || (codes.is_empty() && closed),
            "{:?} -> {response}",
            String::from_utf8_lossy(attack)
        );
    }
    assert_eq!(upstream.count(), 0, "{:?}", upstream.seen.lock().unwrap());
    gate.stop().await;
}

#[tokio::test]
async fn identity_look_alikes_over_http2_never_reach_the_upstream() {
    let (gate, upstream) = setup().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(gate.proxy_url("/h2"))
        .bearer_auth(&gate.admin_token)
        .header("x_keygate_role", "spoofed")
        .header("x-keygate_owner-id", "spoofed")
        .header("x-keygate-key-id", "spoofed")
        .header("x-keygate-extra", "spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    for (name, value) in &seen.headers {
        assert_ne!(value, "spoofed", "{name} reached the upstream");
    }
    all_authorized(&[seen], &admin_key_id(&gate));
    gate.stop().await;
}

/// An upstream (HTTP/1.1 and h2c) that records the request trailers it gets:
/// RecordingUpstream drops trailers, and they are where a spoofed identity
/// could ride past a header-only rewrite.
async fn trailer_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<http::HeaderMap>>> = Default::default();
    let recorder = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let recorder = recorder.clone();
                        async move {
                            let collected = req.into_body().collect().await.ok();
                            let trailers = collected
                                .and_then(|c| c.trailers().cloned())
                                .unwrap_or_default();
                            recorder.lock().unwrap().push(trailers);
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn identity_look_alikes_in_request_trailers_never_reach_the_upstream() {
    let (addr, trailers) = trailer_upstream().await;
    let gate = Gate::builder().upstream(addr).start().await;
    // Plain HTTP/1.1 upstream, and gRPC (h2c upstream, where trailers are
    // a first-class part of the message).
    for content_type in ["text/plain", "application/grpc"] {
        let request = format!(
            "POST /svc/Method HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Type: {content_type}\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-keygate-role, x_keygate_key_id\r\nTE: trailers\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\nx-keygate-role: spoofed\r\nx_keygate_key_id: spoofed\r\nx-ok: 1\r\n\r\n",
            gate.admin_token
        );
        let (response, _) = exchange(gate.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        let codes = statuses(&response);
        assert!(
            codes
                .first()
                .is_some_and(|&c| c == 200 || (400..500).contains(&c)),
            "{content_type}: {response}"
        );
    }
    for seen in trailers.lock().unwrap().iter() {
        for (name, value) in seen {
            assert_ne!(
                value, "spoofed",
                "spoofed trailer {name} reached the upstream"
            );
        }
    }
    gate.stop().await;
}

#[tokio::test]
async fn request_targets_cannot_pick_another_upstream() {
    let (gate, upstream) = setup().await;
    let token = &gate.admin_token;
    let elsewhere = support::echo_upstream().await;
    // Absolute-form naming another server: keygate forwards to its own
    // upstream only, never to the authority in the request line.
    let absolute = format!(
        "GET http://{elsewhere}/abs HTTP/1.1\r\nHost: {elsewhere}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let (response, _) = exchange(gate.proxy, absolute.as_bytes(), Duration::from_secs(5)).await;
    let codes = statuses(&response);
    assert!(
        codes == [200] || codes.first().is_some_and(|c| (400..500).contains(c)),
        "{response}"
    );
    assert!(
        !response.contains("\"bodyBytes\""),
        "the request went to the server named in the request line: {response}"
    );
    // CONNECT must not open a tunnel to an arbitrary address.
    let connect = format!(
        "CONNECT {elsewhere} HTTP/1.1\r\nHost: {elsewhere}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    stream.write_all(connect.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        // If anything answered 200, it was our upstream, not a raw tunnel:
        // bytes written now must not reach the echo server as a request.
        let _ = stream
            .write_all(b"GET /tunnelled HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let (rest, _) = read_until_close(&mut stream, Duration::from_secs(2)).await;
        assert!(
            !rest.contains("/tunnelled"),
            "CONNECT opened a tunnel: {rest}"
        );
    }
    all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
    gate.stop().await;
}

#[tokio::test]
async fn oversized_http2_header_lists_are_refused() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("max_header_bytes = 8192")
        .start()
        .await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let result = client
        .get(gate.proxy_url("/big"))
        .bearer_auth(&gate.admin_token)
        .header("x-big", "a".repeat(20_000))
        .send()
        .await;
    match result {
        Ok(r) => assert!(r.status().is_client_error(), "{}", r.status()),
        // A stream reset (or a GOAWAY) is the HTTP/2 way of refusing.
        Err(error) => assert!(!error.is_timeout(), "{error}"),
    }
    let result = client
        .get(gate.proxy_url("/many"))
        .bearer_auth(&gate.admin_token)
        .headers(
            (0..2000)
                .map(|i| {
                    (
                        http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                        http::HeaderValue::from_static("vvvvvvvv"),
                    )
                })
                .collect(),
        )
        .send()
        .await;
    match result {
        Ok(r) => assert!(r.status().is_client_error(), "{}", r.status()),
        Err(error) => assert!(!error.is_timeout(), "{error}"),
    }
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn slow_loris_heads_are_cut_off_and_do_not_starve_real_clients() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("header_read_timeout = \"500ms\"\nmax_connections = 64")
        .start()
        .await;
    // Many connections that each send part of a head, one of them dribbling
    // a byte at a time (a trickle must not extend the deadline).
    let mut lorises = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(gate.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: ")
            .await
            .unwrap();
        lorises.push(s);
    }
    let trickler = {
        let addr = gate.proxy;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for byte in head {
                if s.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Still open after ~6 s of dribbling: the deadline was extended.
            let (_, closed) = read_until_close(&mut s, Duration::from_millis(10)).await;
            closed
        })
    };
    // A real client is served meanwhile.
    let r = reqwest::Client::new()
        .get(gate.proxy_url("/real"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for mut s in lorises {
        let (text, closed) = read_until_close(&mut s, Duration::from_secs(10)).await;
        assert!(closed, "a slow-loris connection was never closed");
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert!(
        trickler.await.unwrap(),
        "a trickled head kept its connection"
    );
    assert_eq!(upstream.count(), 1);
    all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
    gate.stop().await;
}

#[tokio::test]
async fn slow_bodies_without_a_key_are_refused_before_the_body() {
    let (gate, upstream) = setup().await;
    // Declares a large body, sends a few bytes and stalls: keygate answers
    // 401 from the head alone, without waiting for the body.
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\nabc")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answered without the body")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // `Expect: 100-continue` without a key: refused, and no 100 invites the body.
    let (response, _) = exchange(
        gate.proxy,
        b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(!response.contains("100 Continue"), "{response}");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn a_stalled_body_with_a_key_ends_in_a_clear_status_and_a_closed_connection() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("request_timeout = \"2s\"")
        .start()
        .await;
    let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
    let head = format!(
        "POST /echo-body HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\nabc",
        gate.admin_token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The upstream waits for the body that never comes; keygate gives up at
    // the request timeout (the upload is the client's to finish, not the
    // upstream's) and closes: the stalled client holds nothing for longer.
    let started = std::time::Instant::now();
    let (response, closed) = read_until_close(&mut stream, Duration::from_secs(15)).await;
    let codes = statuses(&response);
    assert_eq!(codes.first(), Some(&408), "{response}");
    assert!(closed, "the stalled connection stayed open: {response}");
    assert!(started.elapsed() < Duration::from_secs(5));
    all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
    gate.stop().await;
}

/// A request body the client breaks (chunked framing that does not parse,
/// its side of the connection closed before the body's end, or a reset) is
/// the client's fault on both paths: 400 `malformed_request_body`, the
/// connection closed, counted by that reason and never as an upstream
/// error (it was a 502 `upstream_unavailable` on hyper's path).
#[tokio::test]
async fn a_broken_request_body_is_the_clients_400_not_an_upstream_error() {
    for relay in [true, false] {
        let upstream = RecordingUpstream::start().await;
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let token = &gate.admin_token;
        let head = |framing: &str| {
            format!("POST /echo-body HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n{framing}\r\n\r\n")
        };
        let chunked = head("Transfer-Encoding: chunked");
        // (request, whether the client then closes its sending side)
        let cases = [
            (format!("{chunked}zz\r\nhello\r\n0\r\n\r\n"), false),
            (format!("{chunked}5\r\nhello\r\nzz\r\n"), false),
            (format!("{chunked}5\r\nhel"), true),
            (format!("{}abc", head("Content-Length: 10")), true),
        ];
        for (request, half_close) in &cases {
            let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            if *half_close {
                stream.shutdown().await.unwrap();
            }
            let (response, closed) = read_until_close(&mut stream, Duration::from_secs(5)).await;
            let context = format!("relay {relay}: {request:?} -> {response}");
            assert_eq!(statuses(&response).first(), Some(&400), "{context}");
            assert!(response.contains("malformed_request_body"), "{context}");
            assert!(closed, "{context}");
        }
        // A client that resets its connection mid-body gets no answer (no
        // one is left to read it) but is counted alike. The pause lets
        // keygate read the head before the reset arrives.
        let mut stream = TcpStream::connect(gate.proxy).await.unwrap();
        let cut = format!("{}abc", head("Content-Length: 10"));
        stream.write_all(cut.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.set_zero_linger().unwrap();
        drop(stream);
        let counted = format!(
            "keygate_auth_failures_total{{reason=\"malformed_request_body\"}} {}",
            cases.len() + 1
        );
        let mut metrics = String::new();
        for _ in 0..50 {
            metrics = reqwest::get(gate.admin_url("/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if metrics.contains(&counted) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(metrics.contains(&counted), "relay {relay}: {metrics}");
        // Started at zero, and still there: no upstream was blamed.
        let upstream_errors: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("keygate_upstream_errors_total{"))
            .collect();
        assert!(!upstream_errors.is_empty(), "relay {relay}: {metrics}");
        assert!(
            upstream_errors.iter().all(|l| l.ends_with(" 0")),
            "relay {relay}: {metrics}"
        );
        all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
        gate.stop().await;
    }
}

#[tokio::test]
async fn pipelined_requests_are_each_authenticated() {
    let (gate, upstream) = setup().await;
    let request = format!(
        "GET /one HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\r\n{SMUGGLED}\
         GET /three HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer kg_0000000000000000_00000000000000000000000000000000000000\r\nConnection: close\r\n\r\n",
        gate.admin_token
    );
    let (response, _) = exchange(gate.proxy, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&response), [200, 401, 401], "{response}");
    assert_eq!(upstream.count(), 1);
    all_authorized(&upstream.seen.lock().unwrap(), &admin_key_id(&gate));
    gate.stop().await;
}

/// CONNECT with a valid key is refused (403 `connect_not_supported`, as
/// Envoy refuses a CONNECT it does not tunnel), over HTTP/1.1 on both paths
/// and HTTP/2, and reaches no upstream: forwarded, it became a CONNECT to
/// the upstream itself, and the client got an empty close (an HTTP/2 reset)
/// while the request was counted as a 200.
#[tokio::test]
async fn connect_with_a_key_is_refused_and_reaches_no_upstream() {
    use http_body_util::{BodyExt, Empty};
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        let token = &gate.admin_token;
        let connect = format!(
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let (response, _) =
            exchange(gate.proxy, connect.as_bytes(), Duration::from_millis(500)).await;
        assert!(
            response.starts_with("HTTP/1.1 403") && response.contains("connect_not_supported"),
            "relay {relay}: {response:?}"
        );

        let tcp = TcpStream::connect(gate.proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let request = http::Request::connect("127.0.0.1:22")
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("an answer");
        assert_eq!(response.status(), 403, "relay {relay}, HTTP/2");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("connect_not_supported"),
            "{body:?}"
        );
        gate.stop().await;
    }
    assert_eq!(upstream.count(), 0, "a CONNECT reached the upstream");
}
