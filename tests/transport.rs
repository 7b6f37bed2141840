//! Transport: the TLS listener (ALPN, certificate reload without dropping
//! connections), https upstreams with a configured CA, config reload, the
//! connection limits (header size and count, slow headers, max connections,
//! idle connections) and the request deadline (trickled bodies).

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{make_cert, make_cert_valid, Gate, RecordingUpstream, TestCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client_config(trusted: &[&TestCert], alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.der.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Connects with TLS and returns the negotiated ALPN and the server's leaf.
async fn handshake(
    port: u16,
    config: rustls::ClientConfig,
) -> (Option<Vec<u8>>, CertificateDer<'static>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let leaf = session.peer_certificates().unwrap()[0].clone().into_owned();
    (alpn, leaf)
}

fn tls_lines(cert: &TestCert) -> String {
    format!(
        "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
        cert.cert_path.display(),
        cert.key_path.display()
    )
}

#[tokio::test]
async fn tls_listener_speaks_h2_and_http1_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_cert(dir.path(), "first");
    let second = make_cert(dir.path(), "second");
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy(&tls_lines(&first))
        .start()
        .await;
    let port = gate.proxy.port();

    let (alpn, leaf) = handshake(port, client_config(&[&first], &[b"h2", b"http/1.1"])).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(leaf, first.der);
    let (alpn, _) = handshake(port, client_config(&[&first], &[b"http/1.1"])).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));

    // A real HTTPS request over HTTP/2, identity injected, proto https.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(&[&first, &second], &[]))
        .https_only()
        .enable_http2()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let request = http::Request::get(format!("https://localhost:{port}/secure"))
        .header("authorization", format!("Bearer {}", gate.admin_token))
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.expect("https request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(upstream.last().headers["x-forwarded-proto"], "https");

    // Replace the certificate files and reload: new handshakes get the new
    // certificate, and the open HTTP/2 connection keeps working.
    std::fs::copy(&second.cert_path, &first.cert_path).unwrap();
    std::fs::copy(&second.key_path, &first.key_path).unwrap();
    gate.reload_tx.send(()).unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        let (_, leaf) = handshake(port, client_config(&[&first, &second], &[b"h2"])).await;
        if leaf == second.der {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the new certificate was not served");
    let request = http::Request::get(format!("https://localhost:{port}/again"))
        .header("authorization", format!("Bearer {}", gate.admin_token))
        .body(Empty::new())
        .unwrap();
    assert_eq!(
        client.request(request).await.expect("same client").status(),
        200
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_on_reload_is_refused_and_the_old_one_serves() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "good");
    let gate = Gate::builder().proxy(&tls_lines(&cert)).start().await;
    std::fs::write(&cert.cert_path, "not a certificate").unwrap();
    gate.reload_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, leaf) = handshake(gate.proxy.port(), client_config(&[&cert], &[b"h2"])).await;
    assert_eq!(leaf, cert.der);
    gate.stop().await;
}

/// A key that is not the certificate's (a half-done renewal: the new key
/// beside the old certificate) is refused on reload as a bad file is, and the
/// old pair keeps serving: taking it would fail every handshake.
#[tokio::test]
async fn a_key_not_matching_the_certificate_on_reload_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "good");
    let other = make_cert(dir.path(), "other");
    let gate = Gate::builder().proxy(&tls_lines(&cert)).start().await;
    std::fs::copy(&other.key_path, &cert.key_path).unwrap();
    gate.reload_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, leaf) = handshake(gate.proxy.port(), client_config(&[&cert], &[b"h2"])).await;
    assert_eq!(leaf, cert.der);
    gate.stop().await;
}

/// The value of `keygate_tls_certificate_expiry_timestamp_seconds` for
/// `cert_file`, and how many series the family has.
async fn expiry_gauge(gate: &Gate, cert_file: &std::path::Path) -> (Option<i64>, usize) {
    let text = reqwest::get(gate.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keygate_tls_certificate_expiry_timestamp_seconds{"))
        .collect();
    let labels = format!(
        "keygate_tls_certificate_expiry_timestamp_seconds{{cert_file=\"{}\"}} ",
        cert_file.display()
    );
    let value = series
        .iter()
        .find_map(|l| l.strip_prefix(&labels))
        .map(|v| v.parse::<f64>().unwrap() as i64);
    (value, series.len())
}

/// Waits until the listener presents `expected`; false if it never does.
async fn presents(gate: &Gate, expected: &TestCert) -> bool {
    for _ in 0..50 {
        if support::presented_leaf(gate.proxy).await == expected.der {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A reload does not swap in a certificate out of its validity period
/// (expired, or not valid yet): the served one keeps serving, and the
/// expiry gauge keeps its notAfter. A good one later is taken, and the
/// gauge follows it.
#[tokio::test]
async fn a_reload_refuses_an_expired_or_not_yet_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (yesterday, _) = support::days_from_now(-1);
    let (in_30_days, served_until) = support::days_from_now(30);
    let (in_90_days, renewed_until) = support::days_from_now(90);
    let served = make_cert_valid(dir.path(), "served", yesterday, in_30_days);
    let expired = make_cert_valid(
        dir.path(),
        "expired",
        support::days_from_now(-60).0,
        yesterday,
    );
    let early = make_cert_valid(dir.path(), "early", support::days_from_now(1).0, in_90_days);
    let renewed = make_cert_valid(dir.path(), "renewed", yesterday, in_90_days);
    let gate = Gate::builder().proxy(&tls_lines(&served)).start().await;
    assert_eq!(support::presented_leaf(gate.proxy).await, served.der);
    assert_eq!(
        expiry_gauge(&gate, &served.cert_path).await,
        (Some(served_until), 1)
    );

    for refused in [&expired, &early] {
        std::fs::copy(&refused.cert_path, &served.cert_path).unwrap();
        std::fs::copy(&refused.key_path, &served.key_path).unwrap();
        gate.reload_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            support::presented_leaf(gate.proxy).await,
            served.der,
            "a certificate out of its period was swapped in"
        );
        assert_eq!(
            expiry_gauge(&gate, &served.cert_path).await,
            (Some(served_until), 1)
        );
    }

    std::fs::copy(&renewed.cert_path, &served.cert_path).unwrap();
    std::fs::copy(&renewed.key_path, &served.key_path).unwrap();
    gate.reload_tx.send(()).unwrap();
    assert!(presents(&gate, &renewed).await, "the renewal was not taken");
    assert_eq!(
        expiry_gauge(&gate, &served.cert_path).await,
        (Some(renewed_until), 1)
    );
    gate.stop().await;
}

/// A certificate served since the start and expired (or expired while
/// running) is not a new one: a reload of the config is not refused for
/// it, and a valid replacement is taken.
#[tokio::test]
async fn an_expired_certificate_already_served_does_not_block_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (long_ago, _) = support::days_from_now(-60);
    let (yesterday, expired_at) = support::days_from_now(-1);
    let cert = make_cert_valid(dir.path(), "expired", long_ago, yesterday);
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy(&tls_lines(&cert))
        .start()
        .await;
    // Started, and serving it: clients that do not verify still get through.
    assert_eq!(support::presented_leaf(gate.proxy).await, cert.der);
    assert_eq!(
        expiry_gauge(&gate, &cert.cert_path).await,
        (Some(expired_at), 1)
    );
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(support::any_certificate_client())
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let send = || {
        let request = http::Request::get(format!("https://localhost:{}/", gate.proxy.port()))
            .header("authorization", format!("Bearer {}", gate.admin_token))
            .body(Empty::new())
            .unwrap();
        client.request(request)
    };
    assert_eq!(send().await.unwrap().status(), 200);
    assert!(!upstream.last().headers.contains_key("authorization"));

    gate.rewrite_config(|text| text.replacen("[proxy]\n", "[proxy]\nkeep_credential = true\n", 1));
    let mut applied = false;
    for _ in 0..50 {
        assert_eq!(send().await.unwrap().status(), 200);
        if upstream.last().headers.contains_key("authorization") {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        applied,
        "the config reload was refused for the served certificate"
    );
    gate.stop().await;
}

/// An HTTPS upstream with its own certificate.
async fn https_upstream(cert: &TestCert) -> u16 {
    let certified =
        keygate::proxy::tls::load_certified_key(&cert.cert_path, &cert.key_path).unwrap();
    let resolver = keygate::proxy::tls::CertResolver::new(certified);
    let config = keygate::proxy::tls::server_config(resolver).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let who = req.headers().get("x-keygate-key-id").cloned();
                        let mut response = http::Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"secure upstream"),
                        ));
                        if let Some(who) = who {
                            response.headers_mut().insert("x-saw-key", who);
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "upstream");
    let port = https_upstream(&cert).await;
    let url = format!("https://localhost:{port}");
    let client = reqwest::Client::new();

    let gate = Gate::builder()
        .upstream_url(&url)
        .proxy(&format!(
            "upstream_ca_file = \"{}\"",
            cert.cert_path.display()
        ))
        .start()
        .await;
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-saw-key"], &gate.admin_token[3..19]);
    assert_eq!(r.text().await.unwrap(), "secure upstream");
    gate.stop().await;

    // System roots do not trust a self-signed upstream: 502, never plaintext.
    let gate = Gate::builder().upstream_url(&url).start().await;
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    gate.stop().await;
}

#[tokio::test]
async fn config_reload_applies_and_a_bad_config_is_refused() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder().upstream(upstream.addr).start().await;
    let client = reqwest::Client::new();
    let send = || {
        client
            .get(gate.proxy_url("/"))
            .bearer_auth(&gate.admin_token)
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    assert!(!upstream.last().headers.contains_key("authorization"));

    // Valid change: keep the credential from now on.
    gate.rewrite_config(|text| text.replacen("[proxy]\n", "[proxy]\nkeep_credential = true\n", 1));
    let mut applied = false;
    for _ in 0..50 {
        send().await.unwrap();
        if upstream.last().headers.contains_key("authorization") {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(applied, "the reloaded config was not applied");

    // Invalid change: refused; the previous config keeps serving.
    gate.rewrite_config(|text| {
        text.replace("keep_credential = true", "keep_credential = \"maybe\"")
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(send().await.unwrap().status(), 200);
    assert!(upstream.last().headers.contains_key("authorization"));
    gate.stop().await;
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_and_too_many_headers_are_refused() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("max_header_bytes = 8192\nmax_headers = 20")
        .start()
        .await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let response = raw_exchange(gate.proxy, big.as_bytes(), Duration::from_secs(3)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let response = raw_exchange(gate.proxy, many.as_bytes(), Duration::from_secs(3)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

/// A `max_header_bytes` below 8 KiB, the least hyper's read buffer takes,
/// holds on hyper's path too: a 4 KiB head is refused with 431 (and
/// `request_head_too_large`) through the relay and through hyper, and a head
/// within the limit passes.
#[tokio::test]
async fn a_small_max_header_bytes_holds_on_both_paths() {
    for relay in [true, false] {
        let upstream = RecordingUpstream::start().await;
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!("max_header_bytes = 2048\nhttp1_relay = {relay}"))
            .start()
            .await;
        let head = |filler: usize| {
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Bearer {}\r\nx-fill: {}\r\n\r\n",
                gate.admin_token,
                "a".repeat(filler)
            )
        };
        let response =
            raw_exchange(gate.proxy, head(4096).as_bytes(), Duration::from_secs(3)).await;
        assert!(
            response.starts_with("HTTP/1.1 431"),
            "relay {relay}: {response}"
        );
        assert!(
            response.contains("request_head_too_large"),
            "relay {relay}: {response}"
        );
        assert_eq!(upstream.count(), 0, "relay {relay}");
        let response =
            raw_exchange(gate.proxy, head(1024).as_bytes(), Duration::from_secs(3)).await;
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "relay {relay}: {response}"
        );
        assert_eq!(upstream.count(), 1, "relay {relay}");
        gate.stop().await;
    }
}

#[tokio::test]
async fn slow_header_senders_are_cut_off() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(upstream.count(), 0);
    gate.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("max_connections = 1")
        .start()
        .await;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\r\n",
        gate.admin_token
    );
    let mut first = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    first.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The first connection is still open (keep-alive): the second waits.
    let mut second = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    second.write_all(request.as_bytes()).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(waited.is_err(), "served beyond max_connections");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(3), second.read(&mut buf))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    gate.stop().await;
}

#[tokio::test]
async fn response_bodies_are_collected_by_clients_of_the_tls_listener() {
    // Keep the body path honest over TLS too: a streamed upstream body.
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "stream");
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy(&tls_lines(&cert))
        .start()
        .await;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(&[&cert], &[]))
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = http::Request::get(format!(
        "https://localhost:{}/stream/512",
        gate.proxy.port()
    ))
    .header("authorization", format!("Bearer {}", gate.admin_token))
    .body(Empty::new())
    .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 512 * 1024);
    gate.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_header_read_timeout() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("header_read_timeout = \"500ms\"")
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nAuthorization: Bearer {}\r\n\r\n",
        gate.admin_token
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the wait for the next request head is bounded too.
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
    gate.stop().await;
}

/// Sends a request head, then trickles its body one byte per `every`, in
/// the background, until the body is complete or the proxy stops reading.
async fn trickle_request(
    gate: &Gate,
    path: &str,
    body_len: usize,
    every: Duration,
) -> tokio::net::tcp::OwnedReadHalf {
    let stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let (read, mut write) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Length: {body_len}\r\n\r\n",
        gate.admin_token
    );
    write.write_all(head.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        for _ in 0..body_len {
            tokio::time::sleep(every).await;
            if write.write_all(b"x").await.is_err() {
                return;
            }
        }
        // Keep the write half open: closing it could end the exchange early.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    read
}

/// Polls `upstream` until it has recorded a request (after its body ended).
async fn recorded(upstream: &RecordingUpstream) -> support::SeenRequest {
    for _ in 0..100 {
        if upstream.count() > 0 {
            return upstream.last();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream recorded no request");
}

#[tokio::test]
async fn a_trickled_request_body_gets_408_and_the_upstream_sees_it_aborted() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("request_timeout = \"1s\"")
        .start()
        .await;
    let started = std::time::Instant::now();
    // 100 bytes at one per 300 ms would take 30 s.
    let mut read = trickle_request(&gate, "/echo-body", 100, Duration::from_millis(300)).await;
    let mut out = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(ended.is_ok(), "the exchange was not ended");
    assert!(
        elapsed >= Duration::from_millis(900),
        "cut too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "cut too late: {elapsed:?}"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""code":"request_timeout""#), "{text}");
    assert!(text.contains("content-type: application/json"), "{text}");

    // The upstream got the head and part of the body, then the abort.
    let seen = recorded(&upstream).await;
    assert_eq!(seen.path, "/echo-body");
    assert!(!seen.body_complete, "the upstream saw a complete body");
    assert!(!seen.headers.contains_key("authorization"));
    gate.stop().await;
}

#[tokio::test]
async fn a_slow_upload_that_completes_is_not_blamed_on_the_upstream() {
    // The support config gives the upstream 2 s: the upload takes longer,
    // but its clock starts only once the upload has been sent.
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("request_timeout = \"10s\"")
        .start()
        .await;
    let started = std::time::Instant::now();
    let mut read = trickle_request(&gate, "/echo-body", 4, Duration::from_millis(700)).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(8), read.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(2700));
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\nxxxx"), "{text}");
    let seen = recorded(&upstream).await;
    assert!(seen.body_complete);
    assert_eq!(seen.body_len, 4);
    gate.stop().await;
}

/// An HTTP/2 client connection (prior knowledge) over `io`; the returned
/// receiver yields when the connection has ended.
async fn h2_connect<T>(
    io: T,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    tokio::sync::oneshot::Receiver<()>,
)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2 handshake");
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = ended_tx.send(());
    });
    (sender, ended)
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    authority: &str,
    path: &str,
    token: &str,
) -> (http::StatusCode, Bytes) {
    sender.ready().await.expect("connection usable");
    let request = http::Request::get(format!("http://{authority}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Asserts that the connection ends between 0.8 and 3 times `idle` from now.
async fn assert_closed_after(ended: tokio::sync::oneshot::Receiver<()>, idle: Duration) {
    let since = std::time::Instant::now();
    tokio::time::timeout(idle * 3, ended)
        .await
        .expect("an idle connection stayed open")
        .unwrap();
    assert!(
        since.elapsed() >= idle.mul_f32(0.8),
        "closed after {:?}, before the idle timeout",
        since.elapsed()
    );
}

#[tokio::test]
async fn idle_h2c_connections_close_but_not_while_a_request_is_in_progress() {
    let idle = Duration::from_millis(500);
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy("idle_timeout = \"500ms\"")
        .start()
        .await;
    let tcp = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let (mut sender, mut ended) = h2_connect(tcp).await;
    let authority = gate.proxy.to_string();
    let token = gate.admin_token.clone();

    // Waiting for the response head (the upstream times out at 2 s), then a
    // response body dripping for 1.5 s: both longer than the idle timeout.
    let (status, _) = h2_get(&mut sender, &authority, "/slow", &token).await;
    assert_eq!(status, 504);
    let (status, body) = h2_get(&mut sender, &authority, "/drip/15", &token).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 15);
    // No GOAWAY was sent meanwhile: the same connection takes a new stream.
    assert!(ended.try_recv().is_err(), "the connection ended while busy");
    let (status, body) = h2_get(&mut sender, &authority, "/", &token).await;
    assert_eq!((status, &body[..]), (http::StatusCode::OK, &b"ok"[..]));

    assert_closed_after(ended, idle).await;
    assert!(
        sender.ready().await.is_err(),
        "the closed connection took a request"
    );
    gate.stop().await;
}

#[tokio::test]
async fn idle_tls_h2_connections_are_closed_too() {
    let idle = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "idle");
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .proxy(&format!("idle_timeout = \"500ms\"\n{}", tls_lines(&cert)))
        .start()
        .await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&[&cert], &[b"h2"])));
    let tcp = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, ended) = h2_connect(tls).await;
    let (status, _) = h2_get(&mut sender, "localhost", "/", &gate.admin_token).await;
    assert_eq!(status, 200);
    assert_closed_after(ended, idle).await;
    gate.stop().await;
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed_after_the_idle_timeout() {
    // hyper waits for the first bytes (HTTP/1 or the HTTP/2 preface)
    // without a timeout of its own; header_read_timeout is far away here.
    let gate = Gate::builder()
        .proxy("idle_timeout = \"500ms\"\nheader_read_timeout = \"30s\"")
        .start()
        .await;
    let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out))
        .await
        .expect("a silent connection stayed open")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(out.is_empty());
    gate.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    // On both paths: as nginx's `client_header_timeout`, the header read
    // timeout, not the idle timeout, bounds the wait for a first byte.
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!(
                "http1_relay = {relay}\nheader_read_timeout = \"500ms\"\nidle_timeout = \"30s\""
            ))
            .start()
            .await;
        let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "relay {relay}: still open after 5 s");
        assert!(
            out.is_empty(),
            "relay {relay}: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "relay {relay}: closed too early"
        );
        gate.stop().await;
    }
}

#[tokio::test]
async fn a_refused_upload_over_tls_gets_its_answer_not_a_reset() {
    // The lingering close over TLS: keygate sends close_notify, then reads
    // and drops the rest of the body; the client, which writes all of it
    // before it reads, gets the 401.
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path(), "linger");
    let upstream = RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::builder()
            .upstream(upstream.addr)
            .proxy(&format!("http1_relay = {relay}\n{}", tls_lines(&cert)))
            .start()
            .await;
        let config = client_config(&[&cert], &[b"http/1.1"]);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let (mut reader, mut writer) = tokio::io::split(tls);
        let size = 8 * 1024 * 1024;
        let upload = tokio::spawn(async move {
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kg_not_a_key\r\n\
                 content-length: {size}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await?;
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..size / chunk.len() {
                writer.write_all(&chunk).await?;
            }
            writer.flush().await
        });
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut got))
            .await
            .expect("the connection ends within 10 s");
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 401"),
            "relay {relay}: {got:?} ({read:?})"
        );
        let uploaded = tokio::time::timeout(Duration::from_secs(10), upload)
            .await
            .expect("the upload ends within 10 s")
            .unwrap();
        uploaded.unwrap_or_else(|e| panic!("relay {relay}: the upload failed: {e}"));
        gate.stop().await;
    }
}
