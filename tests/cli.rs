//! The `keygate` binary as a real process against a real keygate: the admin
//! API commands, table and JSON output, exit codes.

mod admin_common;
mod support;

use std::process::{Command, Output};

use admin_common::proxy_get;
use serde_json::Value;
use support::{dead_address, echo_upstream, Gate};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `keygate ARGS` with the server and key in the environment, off the
/// async runtime so keygate keeps serving.
async fn keygate(server: &str, api_key: Option<&str>, args: &[&str]) -> Run {
    let server = server.to_string();
    let api_key = api_key.map(str::to_string);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.args(&args)
            .env_remove("KEYGATE_API_KEY")
            .env_remove("KEYGATE_CONFIG")
            .env("KEYGATE_SERVER", server);
        if let Some(k) = api_key {
            cmd.env("KEYGATE_API_KEY", k);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.output().expect("run keygate");
        Run {
            code: status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn api_key_commands() {
    let gate = Gate::builder()
        .upstream(echo_upstream().await)
        .start()
        .await;
    let server = gate.admin_url("");
    let key = Some(gate.admin_token.as_str());

    // Create: the token alone on stdout, and it works on the proxy.
    let run = keygate(
        &server,
        key,
        &[
            "apikey",
            "create",
            "--name",
            "ci",
            "--description",
            "for CI",
            "--duration",
            "24h",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let token = run.stdout.trim().to_string();
    assert!(token.starts_with("kg_"), "{}", run.stdout);
    assert!(run.stderr.contains("only time"), "{}", run.stderr);
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);
    let id = token[3..19].to_string();

    // List as a table, and as JSON; neither shows the token.
    let run = keygate(&server, key, &["apikey", "list"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let header = run.stdout.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATE"),
        "{header}"
    );
    assert!(run.stdout.contains(&id) && run.stdout.contains("ci"));
    assert!(!run.stdout.contains(&token[20..]));
    let run = keygate(&server, key, &["apikey", "list", "--output", "json"]).await;
    assert_eq!(run.json()["apiKeys"].as_array().unwrap().len(), 2);

    // Get, update, disable (refused on the proxy at once), enable.
    let run = keygate(&server, key, &["apikey", "get", "--id", &id, "-o", "json"]).await;
    assert_eq!(run.json()["spec"]["description"], "for CI");
    let run = keygate(&server, key, &["apikey", "get", "--id", &id]).await;
    assert!(run.stdout.contains("displayName:"), "{}", run.stdout);
    let run = keygate(
        &server,
        key,
        &[
            "apikey",
            "update",
            "--id",
            &id,
            "--name",
            "ci-2",
            "--description",
            "renamed",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keygate(&server, key, &["apikey", "get", "--id", &id, "-o", "json"]).await;
    assert_eq!(run.json()["spec"]["displayName"], "ci-2");
    let run = keygate(&server, key, &["apikey", "disable", "--id", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(proxy_get(&gate, "/", &token).await.1, "api_key_disabled");
    let run = keygate(&server, key, &["apikey", "enable", "--id", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);

    // Rotate with no grace: the new token works, the old one not.
    let run = keygate(
        &server,
        key,
        &["apikey", "rotate", "--id", &id, "--grace", "0s"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rotated = run.stdout.trim().to_string();
    assert_ne!(rotated, token);
    assert_eq!(proxy_get(&gate, "/", &rotated).await.0, 200);
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 401);
    let run = keygate(
        &server,
        key,
        &["apikey", "usage", "--id", &id, "-o", "json"],
    )
    .await;
    assert_eq!(run.json()["keyId"], id.as_str());

    // Without --duration the key gets the account's longest lifetime.
    let run = keygate(
        &server,
        key,
        &["apikey", "create", "--name", "default", "-o", "json"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.json()["apiKey"]["spec"]["expiryTime"].is_string());

    // Delete.
    let run = keygate(&server, key, &["apikey", "delete", "--id", &id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(proxy_get(&gate, "/", &rotated).await.0, 401);
    let run = keygate(&server, key, &["apikey", "get", "--id", &id]).await;
    assert_eq!(run.code, 64);
    assert!(run.stderr.contains("404 not_found"), "{}", run.stderr);
    gate.stop().await;
}

#[tokio::test]
async fn user_service_account_namespace_account_and_audit_commands() {
    let gate = Gate::builder().start().await;
    let server = gate.admin_url("");
    let key = Some(gate.admin_token.as_str());

    let run = keygate(
        &server,
        key,
        &[
            "namespace",
            "create",
            "--name",
            "orders",
            "--description",
            "order service",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keygate(&server, key, &["namespace", "list"]).await;
    assert!(run.stdout.contains("orders") && run.stdout.contains("order service"));
    let run = keygate(
        &server,
        key,
        &[
            "namespace",
            "update",
            "--id",
            "orders",
            "--description",
            "orders v2",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keygate(
        &server,
        key,
        &["namespace", "get", "--id", "orders", "-o", "json"],
    )
    .await;
    assert_eq!(run.json()["spec"]["description"], "orders v2");

    let run = keygate(
        &server,
        key,
        &[
            "user",
            "create",
            "--email",
            "dev@example.com",
            "--role",
            "developer",
            "--namespace-access",
            "orders=write",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let user = run.json();
    let user_id = user["id"].as_str().unwrap().to_string();
    assert_eq!(
        user["spec"]["access"]["namespaceAccesses"]["orders"]["permission"],
        "write"
    );
    let run = keygate(&server, key, &["user", "list"]).await;
    assert!(run.stdout.contains("dev@example.com") && run.stdout.contains("orders=write"));
    let run = keygate(
        &server,
        key,
        &[
            "user", "update", "--id", &user_id, "--role", "read", "-o", "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let updated = run.json();
    assert_eq!(updated["spec"]["access"]["accountAccess"]["role"], "read");
    assert_eq!(
        updated["spec"]["access"]["namespaceAccesses"]["orders"]["permission"], "write",
        "namespace access kept when only --role is given"
    );

    let run = keygate(
        &server,
        key,
        &[
            "service-account",
            "create",
            "--name",
            "ci-bot",
            "--role",
            "developer",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let sa_id = run.json()["id"].as_str().unwrap().to_string();
    let run = keygate(
        &server,
        key,
        &[
            "apikey",
            "create",
            "--name",
            "bot",
            "--duration",
            "1h",
            "--owner-id",
            &sa_id,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keygate(&server, key, &["service-account", "list"]).await;
    assert!(run.stdout.contains("ci-bot"));
    let run = keygate(&server, key, &["service-account", "delete", "--id", &sa_id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("Deleted service account"),
        "{}",
        run.stdout
    );
    let run = keygate(&server, key, &["user", "delete", "--id", &user_id]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let run = keygate(
        &server,
        key,
        &[
            "account",
            "update",
            "--max-keys-per-owner",
            "5",
            "--max-key-lifetime",
            "30d",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keygate(&server, key, &["account", "get", "-o", "json"]).await;
    assert_eq!(run.json()["spec"]["maxKeysPerOwner"], 5);
    assert_eq!(run.json()["spec"]["maxKeyLifetime"], "30d");

    let run = keygate(&server, key, &["audit", "list"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("account.settings.update"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("service-account.delete"));
    gate.stop().await;
}

#[tokio::test]
async fn flags_errors_and_exit_codes() {
    let gate = Gate::builder().start().await;
    let server = gate.admin_url("");

    // --server and --api-key flags instead of the environment.
    let run = keygate(
        "http://127.0.0.1:1",
        None,
        &[
            "apikey",
            "list",
            "--server",
            &server,
            "--api-key",
            &gate.admin_token,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    // No key: usage error.
    let run = keygate(&server, None, &["apikey", "list"]).await;
    assert_eq!(run.code, 64);
    assert!(run.stderr.contains("KEYGATE_API_KEY"), "{}", run.stderr);
    // Nothing listening: unavailable.
    let dead = format!("http://{}", dead_address().await);
    let run = keygate(&dead, Some(&gate.admin_token), &["apikey", "list"]).await;
    assert_eq!(run.code, 69, "{}", run.stderr);
    assert!(run.stderr.contains("cannot reach"), "{}", run.stderr);
    // A wrong key: refused, and the key is not echoed.
    let (_, bogus, _) = gate.tokens.generate();
    let run = keygate(&server, Some(bogus.expose()), &["apikey", "list"]).await;
    assert_eq!(run.code, 64);
    assert!(run.stderr.contains("401 invalid_api_key"), "{}", run.stderr);
    assert!(!run.stderr.contains(bogus.expose()));
    // A policy refusal is a usage error with the policy's message.
    let run = keygate(
        &server,
        Some(&gate.admin_token),
        &["apikey", "create", "--name", "long", "--duration", "365d"],
    )
    .await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("maxKeyLifetime"), "{}", run.stderr);
    // A lifetime that is not one: clap's usage error, with an example.
    let run = keygate(
        &server,
        Some(&gate.admin_token),
        &["apikey", "create", "--name", "x", "--duration", "a week"],
    )
    .await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("e.g. 12h, 30d"), "{}", run.stderr);
    // Forbidden for a developer.
    let admin = admin_common::Api::new(&gate, &gate.admin_token);
    let dev = admin.create_user("dev@example.com", "developer", &[]).await;
    let (_, dev_token) = admin
        .create_key(serde_json::json!({ "ownerId": dev }))
        .await;
    let run = keygate(&server, Some(&dev_token), &["user", "list"]).await;
    assert_eq!(run.code, 64);
    assert!(run.stderr.contains("403 forbidden"), "{}", run.stderr);
    // --help does not show the key from the environment.
    let run = keygate(
        &server,
        Some(&gate.admin_token),
        &["apikey", "list", "--help"],
    )
    .await;
    assert_eq!(run.code, 0);
    assert!(!run.stdout.contains(&gate.admin_token));
    gate.stop().await;
}

/// An id from the command line names one resource of the command's kind
/// or nothing: `--id ../users/ID` once deleted the user (the `..` was
/// resolved by the URL parser), `--id ..` listed the collection. Ids that
/// cannot be ids are refused before any request, with exit 64.
#[tokio::test]
async fn ids_cannot_reach_other_resources() {
    let gate = Gate::builder().start().await;
    let server = gate.admin_url("");
    let key = Some(gate.admin_token.as_str());
    let admin = admin_common::Api::new(&gate, &gate.admin_token);
    let user = admin
        .create_user("victim@example.com", "developer", &[])
        .await;
    let sa = admin
        .create_service_account("victim-bot", "read", &[])
        .await;
    admin.create_namespace("orders").await;
    let (key_id, _) = admin
        .create_key(serde_json::json!({ "ownerId": user }))
        .await;

    let hostile = [
        format!("../users/{user}"),
        format!("../service-accounts/{sa}"),
        format!("../api-keys/{key_id}"),
        format!("{key_id}/../../users/{user}"),
        "../namespaces/orders".to_string(),
        "..".to_string(),
        ".".to_string(),
        String::new(),
        "%2e%2e".to_string(),
        format!("{user}?x=1"),
        format!("{user}#x"),
        format!("{user}\n"),
    ];
    let commands: &[&[&str]] = &[
        &["apikey", "get"],
        &["apikey", "delete"],
        &["apikey", "enable"],
        &["apikey", "disable"],
        &["apikey", "usage"],
        &["apikey", "rotate", "--grace", "0s"],
        &["apikey", "update", "--name", "x"],
        &["user", "get"],
        &["user", "delete"],
        &["user", "update", "--role", "read"],
        &["service-account", "get"],
        &["service-account", "delete"],
        &["service-account", "update", "--description", "x"],
        &["namespace", "get"],
        &["namespace", "delete"],
        &["namespace", "update", "--description", "x"],
    ];
    for id in &hostile {
        for command in commands {
            let mut args = command.to_vec();
            args.extend(["--id", id]);
            let run = keygate(&server, key, &args).await;
            assert_eq!(run.code, 64, "{args:?}: {}{}", run.stdout, run.stderr);
            assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
            assert!(
                run.stderr.contains("--id is not a"),
                "{args:?}: {}",
                run.stderr
            );
        }
        // Ids in a query string or a body are checked the same way.
        for args in [
            vec!["apikey", "list", "--owner-id", id],
            vec![
                "apikey",
                "create",
                "--name",
                "x",
                "--duration",
                "1h",
                "--owner-id",
                id,
            ],
        ] {
            let run = keygate(&server, key, &args).await;
            assert_eq!(run.code, 64, "{args:?}: {}{}", run.stdout, run.stderr);
            assert!(run.stderr.contains("--owner-id is not a"), "{}", run.stderr);
        }
    }

    // Everything is still there, unchanged, and the good ids still work.
    for path in [
        format!("/api/v1/users/{user}"),
        format!("/api/v1/service-accounts/{sa}"),
        format!("/api/v1/api-keys/{key_id}"),
        "/api/v1/namespaces/orders".to_string(),
    ] {
        let (status, body) = admin.get(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["resourceVersion"], "1", "{path}: {body}");
    }
    let run = keygate(&server, key, &["user", "get", "--id", &user, "-o", "json"]).await;
    assert_eq!(run.json()["spec"]["email"], "victim@example.com");
    let run = keygate(
        &server,
        key,
        &["apikey", "list", "--owner-id", &user, "-o", "json"],
    )
    .await;
    assert_eq!(run.json()["apiKeys"].as_array().unwrap().len(), 1);
    gate.stop().await;
}

/// The README's exit codes: 64 for bad usage or a refused request, 69
/// when the server is unreachable; `--help` and `--version` exit 0. clap's
/// usage errors had exited 2, the API's 401/403/404/409 1, and a key with a
/// control character 69 ("cannot reach ... builder error").
#[tokio::test]
async fn usage_errors_and_refused_requests_exit_64() {
    let gate = Gate::builder().start().await;
    let server = gate.admin_url("");
    let key = Some(gate.admin_token.as_str());

    // clap's usage errors keep clap's message.
    for (args, says) in [
        (&["apikey", "get"][..], "--id <ID>"),
        (&["apikey", "frobnicate"][..], "unrecognized subcommand"),
        (
            &["apikey", "create", "--name", "x", "--duration", "5x"][..],
            "e.g. 12h",
        ),
        (
            &["apikey", "list", "--page-size", "many"][..],
            "invalid value",
        ),
        (
            &["apikey", "list", "--no-such-flag"][..],
            "unexpected argument",
        ),
        (&["apikey"][..], "Usage:"),
        (&[][..], "Usage:"),
    ] {
        let run = keygate(&server, key, args).await;
        assert_eq!(run.code, 64, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    // Help and version are answers, not errors.
    for args in [
        &["--help"][..],
        &["--version"][..],
        &["apikey", "--help"][..],
        &["apikey", "get", "--help"][..],
        &["help", "user"][..],
    ] {
        let run = keygate(&server, key, args).await;
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        assert!(!run.stdout.is_empty(), "{args:?}");
    }

    // What the API refuses: 401, 403, 404, 409.
    let (_, bogus, _) = gate.tokens.generate();
    let run = keygate(&server, Some(bogus.expose()), &["apikey", "list"]).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("401 invalid_api_key"), "{}", run.stderr);
    let admin = admin_common::Api::new(&gate, &gate.admin_token);
    let dev = admin.create_user("dev@example.com", "developer", &[]).await;
    let (key_id, dev_token) = admin
        .create_key(serde_json::json!({ "ownerId": dev }))
        .await;
    let run = keygate(&server, Some(&dev_token), &["user", "list"]).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("403 forbidden"), "{}", run.stderr);
    let missing = "0000000000000000";
    let run = keygate(&server, key, &["apikey", "get", "--id", missing]).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("404 not_found"), "{}", run.stderr);
    let stale = [
        "apikey",
        "update",
        "--id",
        &key_id,
        "--name",
        "y",
        "--resource-version",
        "99",
    ];
    let run = keygate(&server, key, &stale).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("409"), "{}", run.stderr);

    // A key HTTP cannot carry is bad usage, named, and not printed.
    for bad in [
        format!("{}\u{1}", gate.admin_token),
        format!("kg_x\u{7f}{}", &gate.admin_token[5..]),
        format!("{} {}", gate.admin_token, gate.admin_token),
    ] {
        let run = keygate(&server, Some(&bad), &["apikey", "list"]).await;
        assert_eq!(run.code, 64, "{}", run.stderr);
        assert!(
            run.stderr.contains("is not a valid API key"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("cannot reach"), "{}", run.stderr);
        assert!(
            !run.stderr.contains(&gate.admin_token[5..]),
            "printed the key"
        );
    }
    gate.stop().await;
}

#[tokio::test]
async fn bootstrap_and_local_create_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("k.db").display());
    let run = keygate(
        "",
        None,
        &[
            "bootstrap",
            "--email",
            "first@example.com",
            "--store",
            &store,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.trim().starts_with("kg_"));
    let run = keygate(
        "",
        None,
        &[
            "apikey",
            "create",
            "--local",
            "--name",
            "x",
            "--duration",
            "1h",
            "--owner-email",
            "first@example.com",
            "--store",
            &store,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.trim().starts_with("kg_"));
}

/// `keygate check` says whether `serve` would start with a config file,
/// naming what is wrong, without opening the store or binding anything.
#[test]
fn check_validates_a_config_file_without_starting() {
    let check = |path: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["check", "--config"])
            .arg(path)
            .output()
            .expect("run keygate")
    };
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.toml");
    let ok = check(&shipped);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("configuration OK"));

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("never-created.db");
    let base = format!(
        "[proxy]\nupstream = \"http://127.0.0.1:9\"\n[store]\nurl = \"sqlite://{}\"\n",
        store.display()
    );
    // A certificate with the key of another one: every handshake would fail.
    let [first, second] = ["first", "second"].map(|name| support::make_cert(dir.path(), name));
    let mismatched = format!(
        "[proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        first.cert_path.display(),
        second.key_path.display()
    );
    for (extra, named) in [
        (
            "[[routes]]\npath_prefix = \"/a/../b\"\nupstream = \"http://127.0.0.1:9\"\n",
            "routes[0].path_prefix",
        ),
        (
            "[proxy.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
            "proxy.tls: cannot read",
        ),
        (mismatched.as_str(), "does not belong to the certificate"),
        // Only the logger had parsed it: check and reload took it, and the
        // next start exited 64.
        ("[log]\nlevel = \"loud=x\"\n", "log.level"),
        // Never matched, so its namespace check was skipped.
        (
            "[[routes]]\nhost = \"*.example.com\"\nupstream = \"http://127.0.0.1:9\"\nnamespace = \"n\"\n",
            "wildcards are not supported",
        ),
        // Never sent, and would be logged in every access line.
        (
            "[[routes]]\npath_prefix = \"/svc\"\nupstream = \"http://svc:hunter2secret@127.0.0.1:9\"\n",
            "routes[0].upstream",
        ),
    ] {
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let failed = check(&path);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert_eq!(failed.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(named), "{named}: {stderr}");
        assert!(!stderr.contains("hunter2secret"), "{stderr}");
    }
    assert!(!store.exists(), "check opened the store");

    // A SQLite store with no file: every pooled connection would get its
    // own temporary database.
    let path = dir.path().join("keygate.toml");
    std::fs::write(
        &path,
        "[proxy]\nupstream = \"http://127.0.0.1:9\"\n[store]\nurl = \"sqlite://\"\n",
    )
    .unwrap();
    let failed = check(&path);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("store.url"), "{stderr}");
}

/// `admin.max_body_bytes = 0` refused every admin request with a body, and
/// `drain_timeout = "0s"` cut every request in flight at SIGTERM; both
/// were taken, as was a drain of hours. `check` refuses them naming the
/// field, as `serve` does.
#[test]
fn check_refuses_a_zero_admin_body_limit_or_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[store]\nurl = \"sqlite://{}/k.db\"\n[proxy]\nupstream = \"http://127.0.0.1:9\"\n",
        dir.path().display()
    );
    for (extra, field) in [
        ("drain_timeout = \"0s\"\n", "proxy.drain_timeout"),
        ("drain_timeout = \"2h\"\n", "proxy.drain_timeout"),
        ("[admin]\nmax_body_bytes = 0\n", "admin.max_body_bytes"),
        (
            "[admin]\nmax_body_bytes = 1099511627776\n",
            "admin.max_body_bytes",
        ),
    ] {
        let path = dir.path().join("keygate.toml");
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        let run = keygate_local(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(run.code, 64, "{extra}: {}", run.stderr);
        assert!(run.stderr.contains(field), "{field}: {}", run.stderr);
    }
}

/// A route with no host and the prefix `/` takes every request, so
/// `proxy.upstream` is never used: `check` warns naming both (exit 0, as
/// `serve` starts with it); without the catch-all it says nothing.
#[test]
fn check_warns_when_a_catch_all_route_shadows_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "[store]\nurl = \"sqlite://{}/k.db\"\n[proxy]\nupstream = \"http://127.0.0.1:9\"\n\
         [[routes]]\npath_prefix = \"/api\"\nupstream = \"http://127.0.0.1:10\"\n",
        dir.path().display()
    );
    let path = dir.path().join("keygate.toml");
    let catch_all = "[[routes]]\nupstream = \"http://127.0.0.1:11\"\n";
    std::fs::write(&path, format!("{base}{catch_all}")).unwrap();
    let run = keygate_local(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("configuration OK"), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("warning: proxy.upstream is never used: routes[1]"),
        "{}",
        run.stderr
    );
    std::fs::write(&path, &base).unwrap();
    let run = keygate_local(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

/// A certificate out of its validity period, or due within 14 days, is a
/// warning of `check` naming the file and the time, not a failure: `serve`
/// starts with it too.
#[test]
fn check_warns_of_an_expired_or_expiring_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (long_ago, _) = support::days_from_now(-60);
    let (yesterday, _) = support::days_from_now(-1);
    let (soon, _) = support::days_from_now(5);
    let (tomorrow, _) = support::days_from_now(1);
    let (later, _) = support::days_from_now(90);
    let cases = [
        (
            long_ago,
            yesterday,
            format!(
                "expired at {}",
                humantime::format_rfc3339_seconds(yesterday)
            ),
        ),
        (
            tomorrow,
            later,
            format!(
                "is not valid before {}",
                humantime::format_rfc3339_seconds(tomorrow)
            ),
        ),
        (
            yesterday,
            soon,
            format!(
                "expires in 4 days, at {}",
                humantime::format_rfc3339_seconds(soon)
            ),
        ),
        (yesterday, later, String::new()),
    ];
    for (i, (not_before, not_after, warned)) in cases.into_iter().enumerate() {
        let cert = support::make_cert_valid(dir.path(), &format!("c{i}"), not_before, not_after);
        let path = dir.path().join("keygate.toml");
        std::fs::write(
            &path,
            format!(
                "[proxy]\nupstream = \"http://127.0.0.1:9\"\ntls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n\
                 [store]\nurl = \"sqlite://{}/k.db\"\n",
                cert.cert_path.display(),
                cert.key_path.display(),
                dir.path().display()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
        if warned.is_empty() {
            assert!(stderr.is_empty(), "{stderr}");
        } else {
            let expected = format!(
                "warning: proxy.tls: the certificate in {} {warned}",
                cert.cert_path.display()
            );
            assert!(stderr.contains(&expected), "{expected}: {stderr}");
        }
    }
}

/// Every command and subcommand has a description of its own in `--help`.
/// A subcommand without one had shown the doc comment of the argument
/// struct it flattens (`user create` as "Access flags of user and
/// service-account commands", `user get` as "The `--id` of the resource a
/// command acts on"), or nothing (`namespace create`).
#[test]
fn every_subcommand_has_its_own_description() {
    // The first paragraph of each `Args` struct's doc comment, read from
    // the source, so a struct added later is covered too.
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli/mod.rs"))
        .expect("read src/cli/mod.rs");
    let lines: Vec<&str> = source.lines().collect();
    let mut struct_docs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !(line.starts_with("#[derive(") && line.contains("Args")) {
            continue;
        }
        let mut doc = Vec::new();
        for above in lines[..i].iter().rev() {
            match above.trim().strip_prefix("///") {
                Some(text) => doc.push(text.trim()),
                None => break,
            }
        }
        doc.reverse();
        let paragraph = doc
            .split(|l| l.is_empty())
            .next()
            .unwrap_or_default()
            .join(" ");
        if !paragraph.is_empty() {
            struct_docs.push(paragraph.trim_end_matches('.').to_string());
        }
    }
    assert!(
        struct_docs.contains(&"Paging flags of the list commands".to_string()),
        "{struct_docs:?}"
    );

    let help = |path: &[String]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(path)
            .arg("--help")
            .env_remove("KEYGATE_API_KEY")
            .output()
            .expect("run keygate");
        assert_eq!(out.status.code(), Some(0), "{path:?} --help");
        String::from_utf8(out.stdout).unwrap()
    };
    let check = |path: &[String], description: &str| {
        let description = description.trim().trim_end_matches('.');
        assert!(!description.is_empty(), "{path:?} has no description");
        assert!(
            !description.starts_with("Usage:"),
            "{path:?} has no description"
        );
        for doc in &struct_docs {
            assert!(
                !doc.starts_with(description),
                "{path:?} is described by an argument struct's doc: {description:?}"
            );
        }
    };

    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let text = help(&path);
        // The command's own description heads its help.
        check(&path, text.lines().next().unwrap_or_default());
        // Its subcommands, as listed: "  name  description" (continuation
        // lines are indented further).
        let listed = text
            .lines()
            .skip_while(|l| *l != "Commands:")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "));
        for entry in listed {
            let (name, description) = entry
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((entry.trim(), ""));
            if name == "help" {
                continue;
            }
            let mut sub = path.clone();
            sub.push(name.to_string());
            check(&sub, description);
            pending.push(sub);
            seen += 1;
        }
    }
    // 10 commands, and 28 subcommands of the six groups.
    assert!(seen >= 38, "only {seen} subcommands walked");
}

/// A local command that cannot open a PostgreSQL store given by `--store`
/// names the store without its password, as the server's log does: the
/// error goes to a terminal or a CI log.
#[test]
fn local_commands_do_not_echo_a_store_password() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("keys.tsv");
    std::fs::write(&tsv, "kg_legacyZx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe\tone\n").unwrap();
    let tsv = tsv.to_str().unwrap();
    // Port 1 on loopback refuses at once; the pool gives up after its timeout.
    for url in [
        "postgres://user:hunter2secret@127.0.0.1:1/keygate",
        "postgres://user@127.0.0.1:1/keygate?password=hunter2secret",
    ] {
        for args in [
            vec!["bootstrap", "--email", "a@example.com", "--store", url],
            vec![
                "apikey",
                "import",
                "--tsv",
                tsv,
                "--owner-email",
                "a@example.com",
                "--store",
                url,
            ],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
                .args(&args)
                .output()
                .expect("run keygate");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(69), "{args:?}: {stderr}");
            assert!(stderr.contains("cannot open the key store"), "{stderr}");
            assert!(stderr.contains("***"), "{stderr}");
            assert!(!stderr.contains("hunter2secret"), "{args:?}: {stderr}");
        }
    }
}

/// Runs `keygate ARGS` with no server, key or config in the environment.
fn keygate_local(args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(args)
        .env_remove("KEYGATE_API_KEY")
        .env_remove("KEYGATE_CONFIG")
        .output()
        .expect("run keygate");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The files in `dir`, by name.
fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A local command that only adds to a store (`apikey import`, `apikey
/// create --local`) refuses a SQLite path with no file behind it, naming
/// the path, and creates nothing: opening had created a new, empty store
/// there (then written into it or failed, and left the file behind).
#[test]
fn local_commands_refuse_a_sqlite_store_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("keys.tsv");
    std::fs::write(&tsv, "kg_legacyZx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe\tone\n").unwrap();
    let tsv = tsv.to_str().unwrap();
    let misspelt = dir.path().join("keygat.db");
    let url = format!("sqlite://{}", misspelt.display());
    for args in [
        vec![
            "apikey",
            "import",
            "--tsv",
            tsv,
            "--owner-email",
            "a@example.com",
            "--store",
            &url,
        ],
        vec![
            "apikey",
            "create",
            "--local",
            "--name",
            "x",
            "--duration",
            "1h",
            "--owner-email",
            "a@example.com",
            "--store",
            &url,
        ],
    ] {
        let run = keygate_local(&args);
        assert_eq!(run.code, 64, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(&*misspelt.to_string_lossy()),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(
            files_in(dir.path()),
            ["keys.tsv"],
            "{args:?} created a file"
        );
    }
}

/// `bootstrap` sets a store up, so it creates a missing SQLite file (and
/// says so, which shows a misspelt path); but when it fails after creating
/// it, the new file goes with its `-wal` and `-shm`: a store holding no
/// admin, or an admin without a key, is not what was asked for.
#[test]
fn a_failed_bootstrap_leaves_no_store_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let url = format!("sqlite://{}", db.display());
    // Refused after the store was opened (and so created and migrated):
    // not an email; a lifetime over the account's 90-day maximum.
    for args in [
        vec!["bootstrap", "--email", "not-an-email", "--store", &url],
        vec![
            "bootstrap",
            "--email",
            "a@example.com",
            "--duration",
            "365d",
            "--store",
            &url,
        ],
    ] {
        let run = keygate_local(&args);
        assert_eq!(run.code, 64, "{args:?}: {}", run.stderr);
        assert!(
            files_in(dir.path()).is_empty(),
            "{args:?} left {:?}",
            files_in(dir.path())
        );
    }
    let run = keygate_local(&["bootstrap", "--email", "a@example.com", "--store", &url]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("Created a new key store at {}", db.display())),
        "{}",
        run.stderr
    );
    // A second bootstrap finds the store and refuses, and keeps it.
    let run = keygate_local(&["bootstrap", "--email", "b@example.com", "--store", &url]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("already exist"), "{}", run.stderr);
    assert!(
        !run.stderr.contains("Created a new key store"),
        "{}",
        run.stderr
    );
    assert!(db.is_file());
}

/// A PEM file that cannot be used is named and its fault said in words:
/// a half-written certificate had been reported as `missing section end
/// marker: [67, 69, ...]` (the label's bytes), and a key file with no
/// private key in it as `no items found`.
#[test]
fn bad_pem_files_are_named_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let good = support::make_cert(dir.path(), "good");
    let pem = std::fs::read_to_string(&good.cert_path).unwrap();
    let half_cert = dir.path().join("half.crt");
    std::fs::write(&half_cert, &pem[..pem.len() / 2]).unwrap();
    // The certificate where the key should be: a common slip.
    let no_key = dir.path().join("not-a-key.key");
    std::fs::write(&no_key, &pem).unwrap();
    let key_pem = std::fs::read_to_string(&good.key_path).unwrap();
    let half_key = dir.path().join("half.key");
    std::fs::write(&half_key, &key_pem[..key_pem.len() / 2]).unwrap();
    for (cert, key, named, said) in [
        (
            &half_cert,
            &good.key_path,
            &half_cert,
            "ends inside its CERTIFICATE section",
        ),
        (&good.cert_path, &no_key, &no_key, "holds no private key"),
        (
            &good.cert_path,
            &half_key,
            &half_key,
            "ends inside its PRIVATE KEY section",
        ),
    ] {
        let config = dir.path().join("keygate.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nupstream = \"http://127.0.0.1:9\"\n\
                 [proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let run = keygate_local(&["check", "--config", config.to_str().unwrap()]);
        assert_eq!(run.code, 64, "{}", run.stderr);
        assert!(
            run.stderr.contains(&*named.to_string_lossy()) && run.stderr.contains(said),
            "{said}: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("[") && !run.stderr.contains("no items found"),
            "{}",
            run.stderr
        );
        // Nothing of the key's base64 is repeated.
        let key_body: Vec<&str> = key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        for line in key_body {
            assert!(!run.stderr.contains(line), "{}", run.stderr);
        }
    }
    // The upstream CA bundle is read the same way.
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nupstream = \"https://127.0.0.1:9\"\nupstream_ca_file = \"{}\"\n",
            half_cert.display()
        ),
    )
    .unwrap();
    let run = keygate_local(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(
        run.stderr.contains(&*half_cert.to_string_lossy())
            && run.stderr.contains("ends inside its CERTIFICATE section"),
        "{}",
        run.stderr
    );
}

/// A bootstrap whose key the account's policy refuses (a lifetime over the
/// 90-day maximum) writes nothing, on a store that is there already (`serve`
/// made it, as the quickstart goes): it had created the admin and then
/// failed on the key, and every later bootstrap refused, a user existing.
#[tokio::test]
async fn a_bootstrap_refused_by_policy_can_be_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    keygate::store::open(&url).await.unwrap().close().await;
    let run = keygate(
        "",
        None,
        &[
            "bootstrap",
            "--email",
            "a@example.com",
            "--duration",
            "365d",
            "--store",
            &url,
        ],
    )
    .await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("maxKeyLifetime"), "{}", run.stderr);
    let run = keygate(
        "",
        None,
        &["bootstrap", "--email", "a@example.com", "--store", &url],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.trim().starts_with("kg_"));
}
