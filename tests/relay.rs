//! The HTTP/1.1 relay (src/proxy/relay): framing of upstream responses
//! (chunked with trailers, close-delimited, informational heads), upstream
//! connection reuse, pipelined client requests, request bodies, the header
//! rewrite on raw heads, and the same answers with the relay turned off.
//! The upstream here is a raw TCP server so each response's bytes are
//! exactly what the test wrote.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{AccessLog, Gate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A scripted upstream; counts the connections it accepted.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn raw_upstream() -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_raw(stream));
        }
    });
    RawUpstream { addr, connections }
}

/// Reads requests (head, then a Content-Length body) and answers by path.
async fn serve_raw(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
        buf.drain(..head_end + length);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let response = match path.as_str() {
            "/chunked" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-hop: 1\r\nconnection: x-hop\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_string(),
            "/unasked-switch" => "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n".to_string(),
            "/broken-chunk" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_string(),
            "/old-chunked" => "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_string(),
            "/hints" => "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
            "/close" => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end").await;
                return;
            }
            "/http10" => {
                // An HTTP/1.0 answer without a length: its body ends at
                // the close.
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nfrom an old server").await;
                return;
            }
            "/slow" => {
                // Answers late, and keeps the connection.
                tokio::time::sleep(SLOW).await;
                "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow".to_string()
            }
            "/bye" => {
                // Answers, then closes shortly after: a pooled connection
                // the upstream gave up on.
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye").await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            _ => {
                let echoed = format!("{head}{body}");
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nkeep-alive: timeout=5\r\n\r\n{echoed}", echoed.len())
            }
        };
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_millis(1500);

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads from `client` into `got` until `done(got)` holds; the test fails
/// if the connection closes first or nothing comes for 5 s.
async fn read_until(
    client: &mut TcpStream,
    got: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
    what: &str,
) {
    let mut chunk = [0u8; 4096];
    while !done(got) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: nothing within 5 s after {:?}",
                    String::from_utf8_lossy(got)
                )
            })
            .unwrap_or(0);
        assert!(
            n > 0,
            "{what}: closed after {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
}

/// Sends raw bytes to the proxy and reads until `responses` complete
/// responses (by Content-Length or chunked end, or until close) arrived.
async fn exchange(proxy: SocketAddr, request: &str, until: &str) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
            if String::from_utf8_lossy(&got).contains(until) {
                break;
            }
        }
    };
    let in_time = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_ok();
    assert!(
        in_time,
        "no {until:?} within 5 s; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).to_string()
}

fn get(path: &str, token: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: svc.local\r\nauthorization: Bearer {token}\r\n{extra}\r\n"
    )
}

async fn gate_for(upstream: &RawUpstream, relay: bool) -> Gate {
    Gate::with_relay(upstream.addr, relay).await
}

#[tokio::test]
async fn the_rewrite_applies_to_relayed_heads_and_bodies_pass_through() {
    for relay in [true, false] {
        let upstream = raw_upstream().await;
        let gate = gate_for(&upstream, relay).await;
        let token = gate.admin_token.clone();
        let post = format!(
            "POST /echo?q=1 HTTP/1.1\r\nHost: svc.local\r\nAuthorization: Bearer {token}\r\n\
             X-Keygate-Key-Id: forged\r\nx_keygate_role: admin\r\nX-Forwarded-For: 10.0.0.1\r\n\
             Content-Length: 11\r\n\r\nhello world"
        );
        let answer = exchange(gate.proxy, &post, "hello world").await;
        let lower = answer.to_ascii_lowercase();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "relay={relay}: {answer}"
        );
        assert!(lower.contains("post /echo?q=1 http/1.1"), "{answer}");
        assert!(
            lower.contains(&format!("x-keygate-key-id: {}", &token[3..19])),
            "{answer}"
        );
        assert!(
            !lower.contains("forged") && !lower.contains("x_keygate_role"),
            "{answer}"
        );
        assert!(
            !lower.contains("authorization"),
            "credential removed: {answer}"
        );
        assert!(
            lower.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1"),
            "{answer}"
        );
        assert!(lower.contains("x-forwarded-host: svc.local"), "{answer}");
        assert!(lower.contains("x-request-id: "), "{answer}");
        assert!(
            !lower.contains("keep-alive: timeout"),
            "hop-by-hop removed: {answer}"
        );
        assert!(answer.ends_with("hello world"), "{answer}");
        gate.stop().await;
    }
}

#[tokio::test]
async fn chunked_close_delimited_and_informational_responses_are_framed() {
    let upstream = raw_upstream().await;
    let gate = gate_for(&upstream, true).await;
    let token = gate.admin_token.clone();

    let chunked = exchange(
        gate.proxy,
        &get("/chunked", &token, ""),
        "x-trailer: t\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200 OK\r\n"), "{chunked}");
    assert!(
        chunked
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{chunked}"
    );
    assert!(
        !chunked.contains("x-hop"),
        "a header named by Connection is hop-by-hop: {chunked}"
    );
    assert!(
        chunked.ends_with("5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"),
        "{chunked}"
    );

    // No length: the body runs to the upstream's close, and the client is
    // told the connection closes after it.
    let closing = exchange(gate.proxy, &get("/close", &token, ""), "\u{0}").await;
    assert!(
        closing.to_ascii_lowercase().contains("connection: close"),
        "{closing}"
    );
    assert!(closing.ends_with("\r\n\r\nuntil the end"), "{closing}");

    // A 103 is dropped, like hyper's client does; the final answer follows.
    let hinted = exchange(gate.proxy, &get("/hints", &token, ""), "\r\n\r\nok").await;
    assert!(hinted.starts_with("HTTP/1.1 200 OK"), "{hinted}");
    assert!(!hinted.contains("103"), "{hinted}");
    gate.stop().await;
}

/// A proxy answers in its own HTTP version (RFC 9110 section 6.2), not the
/// upstream's: an HTTP/1.1 client whose upstream answers `HTTP/1.0` gets
/// `HTTP/1.1` on both paths, the close-delimited body framed for it
/// (chunked by hyper, close-delimited by the relay), and hyper's path keeps
/// the connection for the next request. hyper's path answered `HTTP/1.0`.
#[tokio::test]
async fn an_http10_upstreams_answer_is_sent_as_http11() {
    for relay in [true, false] {
        let upstream = raw_upstream().await;
        let gate = gate_for(&upstream, relay).await;
        let token = gate.admin_token.clone();
        let request = format!(
            "{}{}",
            get("/http10", &token, ""),
            get("/again", &token, "")
        );
        let until = if relay {
            "from an old server"
        } else {
            "GET /again"
        };
        let answer = exchange(gate.proxy, &request, until).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "relay {relay}: {answer}"
        );
        assert!(!answer.contains("HTTP/1.0"), "relay {relay}: {answer}");
        if relay {
            assert!(answer.contains("connection: close"), "{answer}");
            assert!(answer.ends_with("\r\n\r\nfrom an old server"), "{answer}");
        } else {
            let lower = answer.to_ascii_lowercase();
            assert!(lower.contains("transfer-encoding: chunked"), "{answer}");
            assert!(
                answer.contains("\r\n\r\n12\r\nfrom an old server\r\n0\r\n\r\n"),
                "{answer}"
            );
            // The next request on the same connection is answered.
            assert!(answer.contains("\r\n\r\nHTTP/1.1 200 OK\r\n"), "{answer}");
        }
        gate.stop().await;
    }
}

#[tokio::test]
async fn pipelined_requests_reuse_one_upstream_connection_in_order() {
    let upstream = raw_upstream().await;
    let gate = gate_for(&upstream, true).await;
    let token = gate.admin_token.clone();
    let pipelined = format!(
        "{}{}{}",
        get("/first", &token, ""),
        get("/second", &token, ""),
        get("/third", &token, "connection: close\r\n")
    );
    let answers = exchange(gate.proxy, &pipelined, "GET /third").await;
    let first = answers.find("GET /first").expect("first");
    let second = answers.find("GET /second").expect("second");
    let third = answers.find("GET /third").expect("third");
    assert!(first < second && second < third, "{answers}");
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 3, "{answers}");
    assert!(
        answers.to_ascii_lowercase().contains("connection: close"),
        "{answers}"
    );
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        1,
        "one pooled upstream connection"
    );
    gate.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_reused() {
    let upstream = raw_upstream().await;
    let gate = gate_for(&upstream, true).await;
    let token = gate.admin_token.clone();
    let bye = exchange(gate.proxy, &get("/bye", &token, ""), "bye").await;
    assert!(bye.starts_with("HTTP/1.1 200"), "{bye}");
    // The upstream closes its side 50 ms later; the next request must not
    // be lost on that connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let next = exchange(gate.proxy, &get("/again", &token, ""), "GET /again").await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    gate.stop().await;
}

#[tokio::test]
async fn refusals_and_unserved_shapes_get_the_same_answers_as_hyper() {
    let upstream = raw_upstream().await;
    let gate = gate_for(&upstream, true).await;
    let token = gate.admin_token.clone();
    // A refused key: 401 with the JSON body, the connection kept.
    let refused = exchange(
        gate.proxy,
        &format!("{}{}", get("/", "kg_nope", ""), get("/after", &token, "")),
        "GET /after",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.contains("www-authenticate"), "{refused}");
    assert!(
        refused.contains("\"code\":\"malformed_api_key\""),
        "{refused}"
    );
    assert!(
        refused.contains("HTTP/1.1 200"),
        "keep-alive after a refusal: {refused}"
    );
    // A chunked upload is hyper's: forwarded chunked (this upstream echoes
    // only the head of a chunked request).
    let chunked_upload = format!(
        "POST /up HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {token}\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    );
    let uploaded = exchange(gate.proxy, &chunked_upload, "transfer-encoding: chunked").await;
    assert!(uploaded.starts_with("HTTP/1.1 200"), "{uploaded}");
    assert!(uploaded.contains("POST /up HTTP/1.1"), "{uploaded}");
    // Two different Content-Lengths: refused before anything is forwarded.
    let before = upstream.connections.load(Ordering::SeqCst);
    let smuggled = format!(
        "POST /x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {token}\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"
    );
    let answer = exchange(gate.proxy, &smuggled, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), before);
    gate.stop().await;
}

/// Requests without a usable credential are refused by the relay itself,
/// with hyper's answer: the same status, code, `WWW-Authenticate` and body,
/// nothing forwarded, and the connection kept for the next request.
#[tokio::test]
async fn credential_refusals_are_the_same_on_both_paths() {
    let refused = [
        (
            "GET / HTTP/1.1\r\nhost: svc.local\r\n\r\n".to_string(),
            "missing_api_key",
        ),
        (get("/", "kg_nope", ""), "malformed_api_key"),
        (
            "GET / HTTP/1.1\r\nhost: svc.local\r\nauthorization: Digest abc\r\n\r\n".to_string(),
            "missing_api_key",
        ),
        (
            "GET / HTTP/1.1\r\nhost: svc.local\r\nauthorization: Basic !!!\r\n\r\n".to_string(),
            "malformed_api_key",
        ),
    ];
    let mut answers: Vec<Vec<String>> = Vec::new();
    for relay in [true, false] {
        let upstream = raw_upstream().await;
        let gate = gate_for(&upstream, relay).await;
        let token = gate.admin_token.clone();
        let mut these = Vec::new();
        for (request, code) in &refused {
            let then = get("/after", &token, "");
            let answer = exchange(gate.proxy, &format!("{request}{then}"), "GET /after").await;
            assert!(
                answer.starts_with("HTTP/1.1 401"),
                "relay {relay}: {answer}"
            );
            assert!(
                answer.contains(&format!("\"code\":\"{code}\"")),
                "relay {relay}: {answer}"
            );
            // The refusal as the client saw it, without the parts that
            // differ per response (the date's value, request id) or per
            // path's casing.
            let first = answer.split("HTTP/1.1 200").next().unwrap_or_default();
            let mut lines: Vec<String> = first
                .lines()
                .map(str::to_ascii_lowercase)
                .filter(|l| !l.starts_with("x-request-id:"))
                .map(|l| {
                    if l.starts_with("date:") {
                        "date: *".into()
                    } else {
                        l
                    }
                })
                .collect();
            lines.sort();
            these.push(lines);
        }
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            1,
            "relay {relay}: only the valid requests were forwarded, on one connection"
        );
        answers.push(these.into_iter().flatten().collect());
        gate.stop().await;
    }
    assert_eq!(answers[0], answers[1], "relay and hyper answer alike");
}

/// What tests/relay_differential.rs found, pinned on both paths: an
/// upstream that switches protocols unasked, or frames its body as chunked
/// in an HTTP/1.0 response, gets 502; the relay answers 502 too for a
/// chunked body broken before anything was sent (it closed without an
/// answer before); a refused request's body that came with its head does
/// not end the connection; a head broken before its end gets 400 at once.
#[tokio::test]
async fn broken_upstream_framing_and_pipelined_refusals_answer_alike_on_both_paths() {
    let upstream = raw_upstream().await;
    for relay in [true, false] {
        let gate = gate_for(&upstream, relay).await;
        let token = gate.admin_token.clone();
        for path in ["/unasked-switch", "/old-chunked"] {
            let answer = exchange(gate.proxy, &get(path, &token, ""), "upstream_unavailable").await;
            assert!(
                answer.starts_with("HTTP/1.1 502"),
                "relay {relay}, {path}: {answer}"
            );
        }
        if relay {
            let answer = exchange(gate.proxy, &get("/broken-chunk", &token, ""), "}}").await;
            assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        }
        // A refused POST whose small body arrived with it, then a good GET.
        let refused_then_good = format!(
            "POST /x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer kg_nope\r\ncontent-length: 3\r\n\r\nabc{}",
            get("/after", &token, "")
        );
        let answer = exchange(gate.proxy, &refused_then_good, "GET /after").await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "relay {relay}: {answer}"
        );
        assert!(answer.contains("HTTP/1.1 200"), "relay {relay}: {answer}");
        // A head already broken, its end not yet sent: 400 now, not after
        // header_read_timeout.
        let started = std::time::Instant::now();
        let answer = exchange(gate.proxy, "GET / HTTP/1.1\r\nho st: a\r\n", "\r\n\r\n").await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "relay {relay}: {answer}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "relay {relay}");
        gate.stop().await;
    }
}

/// A client that leaves while the upstream's body is stalled (a long poll,
/// a stream with nothing to say) frees the upstream connection at once, on
/// both paths: waiting for the upstream's next bytes would hold both
/// connections for as long as the upstream stays quiet.
#[tokio::test]
async fn a_client_gone_mid_body_frees_the_stalled_upstream_connection() {
    // Answers the head and 3 bytes of 100, then waits; reports when keygate
    // closes the connection.
    let partial = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc";
    let (addr, mut closed_rx) = upstream_reporting_close(partial, None).await;
    for relay in [true, false] {
        let gate = Gate::builder()
            .upstream(addr)
            .proxy(&format!("http1_relay = {relay}"))
            .start()
            .await;
        let mut client = TcpStream::connect(gate.proxy).await.unwrap();
        let request = format!(
            "GET /poll HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            gate.admin_token
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let what = format!("relay {relay}: the partial response");
        read_until(&mut client, &mut got, |got| got.ends_with(b"abc"), &what).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(3), closed_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("relay {relay}: the upstream connection is still open"));
        gate.stop().await;
    }
}

/// An upstream that answers each connection's first request with
/// `response`, closes its write side `close_after` that (if given; else it
/// stays quiet), and reports on the returned channel once keygate has
/// closed its own side.
async fn upstream_reporting_close(
    response: &'static [u8],
    close_after: Option<Duration>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&head, b"\r\n\r\n").is_none() {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                stream.write_all(response).await.unwrap();
                if let Some(after) = close_after {
                    tokio::time::sleep(after).await;
                    stream.shutdown().await.unwrap();
                }
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    (addr, closed_rx)
}

/// Sends one GET for `path` through a gate on `upstream`, relay on and off,
/// and waits up to `within` for the upstream to see keygate close the
/// connection: `until` ends the response.
async fn keygate_lets_go(
    upstream: SocketAddr,
    closed: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
    path: &str,
    until: &str,
    within: Duration,
) {
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream, relay).await;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            gate.admin_token
        );
        let got = exchange(gate.proxy, &request, until).await;
        assert!(got.starts_with("HTTP/1.1 200"), "relay {relay}: {got}");
        tokio::time::timeout(within, closed.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("relay {relay}: keygate kept the connection the upstream closed")
            });
        gate.stop().await;
    }
}

/// A close-delimited response ends its connection: keygate closes its side
/// once the body has ended, and does not keep it in the pool (where it
/// would sit in CLOSE-WAIT until the next request found it closed).
#[tokio::test]
async fn a_close_delimited_response_is_not_pooled() {
    let response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end";
    let (upstream, mut closed) = upstream_reporting_close(response, Some(Duration::ZERO)).await;
    keygate_lets_go(
        upstream,
        &mut closed,
        "/close",
        "until the end",
        Duration::from_secs(3),
    )
    .await;
}

/// An idle pooled connection the upstream closes (its keep-alive timeout)
/// is let go by the pool's sweeper, without waiting for traffic to find it
/// closed: no CLOSE-WAIT socket is left behind.
#[tokio::test]
async fn idle_connections_the_upstream_closed_are_let_go_without_traffic() {
    let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let (upstream, mut closed) =
        upstream_reporting_close(response, Some(Duration::from_millis(200))).await;
    keygate_lets_go(upstream, &mut closed, "/idle", "ok", Duration::from_secs(8)).await;
}

/// A client that leaves while the upstream has yet to answer is logged at
/// once with status 499 (nginx's "client closed request"), on both paths,
/// and the upstream connection, whose answer is unread, is not reused. The
/// relay did not watch the client then: it logged the answer it wrote to
/// nobody when the upstream answered, and pooled the connection.
#[tokio::test]
async fn a_client_gone_while_the_upstream_answers_is_logged_as_499() {
    let log = AccessLog::capture();
    for relay in [true, false] {
        let upstream = raw_upstream().await;
        let gate = gate_for(&upstream, relay).await;
        let token = gate.admin_token.clone();
        let id = format!("gone-{relay}");
        let mut client = TcpStream::connect(gate.proxy).await.unwrap();
        let request = get("/slow", &token, &format!("x-request-id: {id}\r\n"));
        client.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(client);
        let line = log
            .line_with(&format!("request_id=\"{id}\""), SLOW / 2)
            .await
            .unwrap_or_else(|| panic!("relay {relay}: no access line within {:?}", SLOW / 2));
        assert!(line.contains("status=499"), "relay {relay}: {line}");
        assert!(line.contains("path=\"/slow\""), "relay {relay}: {line}");
        assert!(line.contains(&token[3..19]), "relay {relay}: {line}");
        // Once the upstream has answered the request nobody reads, the
        // next one goes to a new connection.
        tokio::time::sleep(SLOW).await;
        let next = exchange(gate.proxy, &get("/next", &token, ""), "GET /next").await;
        assert!(next.starts_with("HTTP/1.1 200"), "relay {relay}: {next}");
        assert_eq!(
            upstream.connections.load(Ordering::SeqCst),
            2,
            "relay {relay}: the unread answer's connection was reused"
        );
        assert_eq!(log.lines_with(&id).len(), 1, "relay {relay}");
        gate.stop().await;
    }
}

/// What a client sends while its request waits for the upstream is its
/// next request, not a departure: both are answered, in order.
#[tokio::test]
async fn a_request_pipelined_while_the_upstream_answers_is_served_after() {
    let log = AccessLog::capture();
    let upstream = raw_upstream().await;
    let gate = gate_for(&upstream, true).await;
    let token = gate.admin_token.clone();
    let mut client = TcpStream::connect(gate.proxy).await.unwrap();
    let first = get("/slow", &token, "x-request-id: pipelined-first\r\n");
    client.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = get("/then", &token, "connection: close\r\n");
    client.write_all(second.as_bytes()).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(SLOW * 3, client.read_to_string(&mut got))
        .await
        .expect("both answers")
        .unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("\r\n\r\nslowHTTP/1.1 200"), "{got}");
    assert!(got.contains("GET /then"), "{got}");
    let line = log.lines_with("pipelined-first").pop().unwrap();
    assert!(line.contains("status=200"), "{line}");
    gate.stop().await;
}

/// An upstream that answers before the request body has all arrived (a 413
/// for a body it will not take) has its answer passed on at once, on both
/// paths, while the client's upload stalls. The relay kept waiting for the
/// body and answered 408 at `request_timeout` instead. The relay then
/// closes the connection, the rest of the body unread; hyper's path goes on
/// reading it (a bidirectional stream keeps uploading, see timeouts.rs).
#[tokio::test]
async fn an_early_answer_to_a_stalled_upload_is_passed_on() {
    let log = AccessLog::capture();
    let early = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";
    let (addr, mut closed) = upstream_reporting_close(early, None).await;
    for relay in [true, false] {
        let gate = Gate::builder()
            .upstream(addr)
            .proxy(&format!("http1_relay = {relay}\nrequest_timeout = \"30s\""))
            .start()
            .await;
        let id = format!("early-{relay}");
        let mut client = TcpStream::connect(gate.proxy).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             x-request-id: {id}\r\ncontent-length: 100000\r\n\r\nfirst part",
            gate.admin_token
        );
        client.write_all(head.as_bytes()).await.unwrap();
        // The upload stalls here; the answer comes anyway.
        let mut got = Vec::new();
        let what = format!("relay {relay}: the early answer");
        read_until(
            &mut client,
            &mut got,
            |got| got.ends_with(b"too big!"),
            &what,
        )
        .await;
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 413"), "relay {relay}: {got}");
        let line = log
            .line_with(&format!("request_id=\"{id}\""), Duration::from_secs(1))
            .await
            .unwrap_or_else(|| panic!("relay {relay}: no access line"));
        assert!(line.contains("status=413"), "relay {relay}: {line}");
        if relay {
            // Said and done: the connection closes after the answer, and
            // the upstream connection, with a body left unsent, is not kept.
            assert!(got.contains("connection: close\r\n"), "{got}");
            let mut chunk = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(3), client.read(&mut chunk))
                .await
                .expect("closed after the answer")
                .unwrap_or(0);
            assert_eq!(n, 0);
            tokio::time::timeout(Duration::from_secs(3), closed.recv())
                .await
                .expect("the upstream connection is let go");
        }
        drop(client);
        gate.stop().await;
    }
}

/// An upstream that starts its answer as soon as it has the request head,
/// and ends it once it has read the whole body (an echo that streams),
/// still gets the body on both paths: an early answer does not stop the
/// upload while the client goes on sending.
#[tokio::test]
async fn an_upload_goes_on_after_an_early_response_head() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&got, b"\r\n\r\n").is_none() {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                stream.write_all(head).await.unwrap();
                let body_at = find(&got, b"\r\n\r\n").unwrap() + 4;
                while got.len() < body_at + 10 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
                let echoed = format!(
                    "a\r\n{}\r\n0\r\n\r\n",
                    String::from_utf8_lossy(&got[body_at..])
                );
                stream.write_all(echoed.as_bytes()).await.unwrap();
            });
        }
    });
    for relay in [true, false] {
        let gate = Gate::with_relay(addr, relay).await;
        let mut client = TcpStream::connect(gate.proxy).await.unwrap();
        let head = format!(
            "POST /stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\ncontent-length: 10\r\n\r\n",
            gate.admin_token
        );
        client.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let head_read = |got: &[u8]| find(got, b"\r\n\r\n").is_some();
        read_until(
            &mut client,
            &mut got,
            head_read,
            &format!("relay {relay}: the early head"),
        )
        .await;
        client.write_all(b"0123456789").await.unwrap();
        let ended = |got: &[u8]| got.ends_with(b"0\r\n\r\n");
        read_until(
            &mut client,
            &mut got,
            ended,
            &format!("relay {relay}: the end"),
        )
        .await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "relay {relay}: {got}");
        assert!(got.contains("\r\n0123456789\r\n"), "relay {relay}: {got}");
        drop(client);
        gate.stop().await;
    }
}

/// Sends a `size`-byte upload behind `head` while reading what comes back;
/// returns the whole answer and how the upload and the read ended.
async fn upload_reading_the_answer(
    proxy: SocketAddr,
    head: &str,
    size: usize,
) -> (String, std::io::Result<()>, std::io::Result<()>) {
    let client = TcpStream::connect(proxy).await.unwrap();
    let (mut reader, mut writer) = client.into_split();
    let head = head.to_owned();
    let upload = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < size {
            let n = chunk.len().min(size - sent);
            writer.write_all(&chunk[..n]).await?;
            sent += n;
        }
        Ok(())
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk).await? {
                0 => return Ok(()),
                n => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the connection ends within 10 s");
    let uploaded = tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect("the upload ends within 10 s")
        .unwrap();
    (String::from_utf8_lossy(&got).into_owned(), uploaded, read)
}

#[tokio::test]
async fn a_refused_upload_is_read_on_so_its_answer_is_not_reset() {
    // A client that sends its whole body before it reads (curl, most
    // libraries) must get the refusal, not a reset: closing with unread
    // bytes sends one, and the client's next write fails on it.
    let upstream = raw_upstream().await;
    for relay in [true, false] {
        let gate = gate_for(&upstream, relay).await;
        let head = "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kg_not_a_key\r\n\
                    content-length: 16777216\r\n\r\n";
        let (answer, uploaded, read) =
            upload_reading_the_answer(gate.proxy, head, 16 * 1024 * 1024).await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "relay {relay}: {answer:?}"
        );
        assert!(
            answer.contains("malformed_api_key"),
            "relay {relay}: {answer}"
        );
        uploaded.unwrap_or_else(|e| panic!("relay {relay}: the upload failed: {e}"));
        read.unwrap_or_else(|e| panic!("relay {relay}: the read failed: {e}"));
        gate.stop().await;
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_upload_that_stalls_after_an_early_answer_does_not_hold_hyper_s_path() {
    // hyper goes on reading a body after its answer (the relay closes
    // instead): a client that keeps sending keeps the connection, one that
    // stops loses it an idle timeout after the close began, and the
    // upstream connection goes with it.
    let early = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!";
    let (addr, mut closed) = upstream_reporting_close(early, None).await;
    let gate = Gate::builder()
        .upstream(addr)
        .proxy("http1_relay = false\nidle_timeout = \"1s\"\nheader_read_timeout = \"1s\"")
        .start()
        .await;
    let mut client = TcpStream::connect(gate.proxy).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         content-length: 100000\r\n\r\nfirst part",
        gate.admin_token
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let answered = |got: &[u8]| got.ends_with(b"too big!");
    read_until(&mut client, &mut got, answered, "the early answer").await;
    let mut chunk = [0u8; 4096];
    // Three seconds of a slow upload: three idle timeouts, the connection
    // kept.
    for _ in 0..15 {
        client.write_all(b"more bytes").await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(200), client.read(&mut chunk)).await;
        assert!(
            read.is_err(),
            "the connection ended during the upload: {read:?}"
        );
    }
    // Stalled: let go.
    let stalled_at = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut chunk))
        .await
        .expect("a stalled upload is let go")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(stalled_at.elapsed() >= Duration::from_millis(900));
    tokio::time::timeout(Duration::from_secs(3), closed.recv())
        .await
        .expect("the upstream connection is let go");
    gate.stop().await;
}
