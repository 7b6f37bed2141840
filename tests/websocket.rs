//! WebSocket through keygate: the HTTP/1.1 upgrade passes after
//! authentication and frames flow both ways; without a key there is no
//! upgrade.
#![allow(clippy::result_large_err)] // tungstenite's handshake callback type, not ours

mod support;

use futures_util::{SinkExt, StreamExt};
use support::Gate;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A real WebSocket echo server on 127.0.0.1:0 that also echoes, as its
/// first message, the identity header it received.
async fn websocket_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut key_id = String::new();
                let callback = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                                resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    key_id = req
                        .headers()
                        .get("x-keygate-key-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_string();
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let _ = ws.send(Message::text(format!("hello {key_id}"))).await;
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        let _ = ws.send(message).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrade_passes_after_authentication() {
    let gate = Gate::builder()
        .upstream(websocket_upstream().await)
        .start()
        .await;
    let url = format!("ws://{}/socket", gate.proxy);
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", gate.admin_token).parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgrade through keygate");
    assert_eq!(response.status(), 101);
    let greeting = ws.next().await.unwrap().unwrap();
    assert_eq!(
        greeting.into_text().unwrap().as_str(),
        format!("hello {}", &gate.admin_token[3..19])
    );
    for i in 0..10 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), format!("ping {i}"));
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().len(), 100_000);
    ws.close(None).await.unwrap();

    // Without a key: a plain 401, no upgrade.
    let err = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 401),
        other => panic!("expected an HTTP 401, got {other:?}"),
    }
    gate.stop().await;
}

/// An `Upgrade: h2c` is not tunnelled: past the upgrade, HTTP/2 requests
/// would reach the upstream without keygate seeing them (no key, route or
/// permission checked, identity headers as the client wrote them). The
/// request is served as a plain one and the upstream never hears of the
/// upgrade, on either HTTP/1.1 path.
#[tokio::test]
async fn an_h2c_upgrade_is_served_as_a_plain_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = support::RecordingUpstream::start().await;
    for relay in [true, false] {
        let gate = Gate::with_relay(upstream.addr, relay).await;
        for (upgrade, connection) in [
            ("h2c", "Upgrade, HTTP2-Settings"),
            ("H2C", "upgrade"),
            ("websocket, h2c", "Upgrade"),
        ] {
            let mut stream = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
            let request = format!(
                "GET /public HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Upgrade: {upgrade}\r\nConnection: {connection}\r\n\
                 HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                gate.admin_token
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                let mut chunk = [0u8; 4096];
                while !String::from_utf8_lossy(&got).ends_with("ok") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            let got = String::from_utf8_lossy(&got);
            assert!(
                got.starts_with("HTTP/1.1 200 ") && got.ends_with("ok"),
                "relay {relay}, {upgrade}: {got}"
            );
            let seen = upstream.last();
            for hop in ["upgrade", "connection", "http2-settings"] {
                assert!(
                    !seen.headers.contains_key(hop),
                    "relay {relay}, {upgrade}: the upstream got {hop}: {:?}",
                    seen.headers
                );
            }
        }
        gate.stop().await;
    }
}

/// A tunnel whose upstream closes its sending side first still carries
/// all the client sends after that, even while the upstream is slow to
/// read it: keygate's lingering close, which reads and drops what a client
/// sends after keygate closes its side, is kept off upgraded connections,
/// whose bytes are the tunnel's.
#[tokio::test]
async fn a_tunnel_the_upstream_half_closes_still_carries_the_client_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SENT: usize = 16 * 1024 * 1024;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (heard_tx, heard_rx) = tokio::sync::oneshot::channel::<usize>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&chunk[..n]);
        }
        tcp.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: raw\r\nconnection: upgrade\r\n\r\n",
        )
        .await
        .unwrap();
        // Done sending; slow to read what comes, then reading it all.
        tcp.shutdown().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut heard = 0;
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => heard += n,
            }
        }
        let _ = heard_tx.send(heard);
    });
    let gate = Gate::builder().upstream(upstream).start().await;
    let mut client = tokio::net::TcpStream::connect(gate.proxy).await.unwrap();
    let request = format!(
        "GET /raw HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nupgrade: raw\r\nconnection: upgrade\r\n\r\n",
        gate.admin_token
    );
    client.write_all(request.as_bytes()).await.unwrap();
    // The 101, then the end of the upstream's side.
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.read_to_end(&mut got),
    );
    read.await.expect("the upstream's side ends").unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    client.write_all(&vec![b'x'; SENT]).await.unwrap();
    client.shutdown().await.unwrap();
    let heard = tokio::time::timeout(std::time::Duration::from_secs(10), heard_rx)
        .await
        .expect("the upstream hears the end")
        .unwrap();
    assert_eq!(heard, SENT);
    gate.stop().await;
}
