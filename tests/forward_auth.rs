//! Forward-auth mode: keygate as the decision point of a real nginx
//! (`auth_request`), and the Traefik and Envoy request shapes over HTTP.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keygate::store::{AccountRole, Permission};
use support::{Gate, RecordingUpstream};

const ROUTES: &str = "[forward_auth]\nenabled = true\n";

async fn gate_with_routes(upstream: &RecordingUpstream) -> Gate {
    let routes = format!(
        "{ROUTES}[[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://{}\"\nnamespace = \"orders\"\n",
        upstream.addr
    );
    Gate::builder()
        .upstream(upstream.addr)
        .extra(&routes)
        .start()
        .await
}

#[tokio::test]
async fn traefik_and_envoy_shapes_get_decisions() {
    let upstream = RecordingUpstream::start().await;
    let gate = gate_with_routes(&upstream).await;
    let client = reqwest::Client::new();
    let reader = gate
        .user(
            "reader@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Read)],
        )
        .await;
    let (reader_id, reader_token) = gate.key_for(&reader).await;

    // Traefik ForwardAuth: the original request in X-Forwarded-*.
    let r = client
        .get(gate.proxy_url("/verify"))
        .header("x-forwarded-method", "GET")
        .header("x-forwarded-uri", "/orders/42?x=1")
        .header("x-forwarded-host", "shop.example.com")
        .bearer_auth(&reader_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-keygate-key-id"], reader_id.as_str());
    assert_eq!(r.headers()["x-keygate-owner-name"], "reader@example.com");
    assert_eq!(r.headers()["x-keygate-namespace"], "orders");

    // A write on the read-only namespace is refused with 403.
    let r = client
        .get(gate.proxy_url("/verify"))
        .header("x-forwarded-method", "DELETE")
        .header("x-forwarded-uri", "/orders/42")
        .bearer_auth(&reader_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The original path is read as the proxy reads its own: normalized
    // before routing, so a spelling of /orders is decided under /orders.
    for (uri, status) in [
        ("/%6Frders/42", 403),
        ("/x/../orders/42", 403),
        ("/x%2f..", 400),
    ] {
        let r = client
            .get(gate.proxy_url("/verify"))
            .header("x-forwarded-method", "DELETE")
            .header("x-forwarded-uri", uri)
            .bearer_auth(&reader_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{uri}");
    }

    // Envoy ext_authz (HTTP): original method, original path after the prefix.
    let r = client
        .post(gate.proxy_url("/verify/orders/42"))
        .bearer_auth(&reader_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "POST needs write on orders");
    let r = client
        .get(gate.proxy_url("/verify/orders/42"))
        .header("x-api-key", reader_token.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // No key: the proxy's own rejection.
    let r = client.get(gate.proxy_url("/verify")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");

    assert_eq!(upstream.count(), 0, "decisions never forward");
    gate.stop().await;
}

/// The original request's description cannot be turned into a lesser one:
/// in Envoy's shape (the decision request is the original), method and
/// URI headers a client slipped through (an ext_authz `allowed_headers`
/// that lets them pass) neither make a write a read nor move the decision
/// to another route; and a method header that is repeated or not a method
/// is taken as a write, not as the decision request's own GET.
#[tokio::test]
async fn described_requests_cannot_be_lesser_than_the_real_one() {
    let upstream = RecordingUpstream::start().await;
    let gate = gate_with_routes(&upstream).await;
    let client = reqwest::Client::new();
    let reader = gate
        .user(
            "reader@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Read)],
        )
        .await;
    let (_, reader_token) = gate.key_for(&reader).await;
    let decide = |method: reqwest::Method, path: &str, headers: &[(&str, &str)]| {
        let mut request = client
            .request(method, gate.proxy_url(path))
            .bearer_auth(&reader_token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    // Envoy: a POST to /orders, described as a GET.
    for spoof in ["x-forwarded-method", "x-original-method"] {
        let r = decide(reqwest::Method::POST, "/verify/orders/1", &[(spoof, "GET")])
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{spoof}");
    }
    // Envoy: a request for the default route, described as one for
    // /orders: the description is not what was asked, whichever route the
    // key may use.
    let r = decide(
        reqwest::Method::GET,
        "/verify/elsewhere",
        &[("x-forwarded-uri", "/orders/1")],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = decide(
        reqwest::Method::POST,
        "/verify/elsewhere",
        &[
            ("x-forwarded-uri", "/orders/1"),
            ("x-forwarded-method", "GET"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    // Envoy, described consistently: decided as before.
    let r = decide(
        reqwest::Method::GET,
        "/verify/orders/1",
        &[
            ("x-forwarded-uri", "/orders/1?x=1"),
            ("x-forwarded-method", "GET"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    // Traefik: a method header that cannot be read, or two of them.
    for methods in [&["G@T"][..], &["GET", "POST"], &["GET, POST"]] {
        let mut headers = vec![("x-forwarded-uri", "/orders/1")];
        headers.extend(methods.iter().map(|m| ("x-forwarded-method", *m)));
        let r = decide(reqwest::Method::GET, "/verify", &headers)
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{methods:?}");
    }
    let r = decide(
        reqwest::Method::GET,
        "/verify",
        &[
            ("x-forwarded-uri", "/orders/1"),
            ("x-forwarded-method", "HEAD"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.count(), 0, "decisions never forward");
    gate.stop().await;
}

/// With routes and no default upstream, a request no route covers is
/// refused (404, as the proxy refuses it), not let through on the key
/// alone, which skipped every route's namespace; a host route applies by
/// the original host, and without any route (forward-auth alone) a valid
/// key is the decision.
#[tokio::test]
async fn requests_no_route_covers_are_refused() {
    let upstream = RecordingUpstream::start().await;
    let routes = format!(
        "{ROUTES}[[routes]]\nhost = \"orders.example.com\"\nupstream = \"http://{up}\"\nnamespace = \"orders\"\n\
         [[routes]]\npath_prefix = \"/billing\"\nupstream = \"http://{up}\"\nnamespace = \"billing\"\n",
        up = upstream.addr
    );
    let gate = Gate::builder()
        .without_default_route()
        .extra(&routes)
        .start()
        .await;
    let client = reqwest::Client::new();
    let outsider = gate
        .user("dev@example.com", AccountRole::Developer, &[])
        .await;
    let (_, token) = gate.key_for(&outsider).await;
    let decide = |host: Option<&'static str>, uri: &'static str| {
        let mut request = client
            .get(gate.proxy_url("/verify"))
            .header("x-original-method", "GET")
            .header("x-original-uri", uri)
            .bearer_auth(&token);
        if let Some(host) = host {
            request = request.header("x-forwarded-host", host);
        }
        request.send()
    };
    let r = decide(None, "/other").await.unwrap();
    assert_eq!(r.status(), 404, "no route covers /other");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_route");
    assert_eq!(decide(None, "/billing/1").await.unwrap().status(), 403);
    let r = decide(Some("orders.example.com"), "/x").await.unwrap();
    assert_eq!(r.status(), 403, "the host route's namespace applies");
    gate.stop().await;

    // Forward-auth alone: nothing routes, a valid key decides.
    let gate = Gate::builder()
        .without_default_route()
        .extra(ROUTES)
        .start()
        .await;
    let r = client
        .get(gate.proxy_url("/verify"))
        .header("x-original-uri", "/anything")
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gate.stop().await;
}

/// nginx from Debian's packages, as .ci/run installs it.
fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn nginx_auth_request_uses_keygate_as_its_decision_point() {
    let Some(nginx) = nginx_binary() else {
        if std::env::var_os("KEYGATE_SKIP_NGINX").is_some() {
            eprintln!("SKIPPED: nginx is not installed and KEYGATE_SKIP_NGINX is set");
            return;
        }
        panic!("nginx is not installed: run `apt-get install nginx-light` (.ci/run does) or set KEYGATE_SKIP_NGINX=1");
    };
    let upstream = RecordingUpstream::start().await;
    let gate = gate_with_routes(&upstream).await;
    let reader = gate
        .user(
            "reader@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Read)],
        )
        .await;
    let (reader_id, reader_token) = gate.key_for(&reader).await;

    let dir = tempfile::tempdir().unwrap();
    let port = support::dead_address().await.port();
    let conf = format!(
        r#"
daemon off;
master_process off;
worker_processes 1;
user root;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      auth_request /_keygate;
      auth_request_set $keygate_key_id $upstream_http_x_keygate_key_id;
      auth_request_set $keygate_owner $upstream_http_x_keygate_owner_name;
      proxy_set_header X-Keygate-Key-Id $keygate_key_id;
      proxy_set_header X-Keygate-Owner-Name $keygate_owner;
      proxy_set_header Authorization "";
      proxy_set_header X-Api-Key "";
      proxy_pass http://{upstream};
    }}
    location = /_keygate {{
      internal;
      proxy_pass http://{keygate}/verify;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-Host $host;
    }}
  }}
}}
"#,
        dir = dir.path().display(),
        upstream = upstream.addr,
        keygate = gate.proxy,
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nginx");
    let _nginx = Nginx(child);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    // Wait for nginx to listen.
    let mut ready = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "nginx did not start: {:?}",
        std::fs::read_to_string(dir.path().join("error.log"))
    );

    let r = client
        .get(format!("{url}/orders/1"))
        .bearer_auth(&reader_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-keygate-key-id"], reader_id.as_str());
    assert_eq!(seen.headers["x-keygate-owner-name"], "reader@example.com");
    assert!(!seen.headers.contains_key("authorization"));

    let before = upstream.count();
    let r = client.get(format!("{url}/orders/1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(format!("{url}/orders/1"))
        .bearer_auth(&reader_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let wrong = gate.tokens.generate().1.expose().to_string();
    let r = client
        .get(format!("{url}/orders/1"))
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        upstream.count(),
        before,
        "refused requests never reach the upstream"
    );
    gate.stop().await;
}
