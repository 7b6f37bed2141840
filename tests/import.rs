//! Importing keys issued by another system: `keygate apikey import` (the real
//! binary) writes them into the store in one transaction, under the same
//! policies as created keys, and the proxy accepts them only with
//! `[keys] accept_imported`.

mod support;

use std::process::Command;

use support::{Gate, RecordingUpstream};

const KEYGATE: &str = env!("CARGO_BIN_EXE_keygate");

fn legacy_tokens(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "kg_{:012x}_{}",
                0xa1b2c3d4e5u64 + i as u64,
                "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"
            )
        })
        .collect()
}

fn import(gate: &Gate, tsv: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.tsv");
    std::fs::write(&path, tsv).unwrap();
    Command::new(KEYGATE)
        .args([
            "apikey",
            "import",
            "--owner-email",
            "admin@example.com",
            "--duration",
            "7d",
            "--tsv",
        ])
        .arg(&path)
        .arg("--store")
        .arg(format!("sqlite://{}", gate.db_path.display()))
        .output()
        .unwrap()
}

#[tokio::test]
async fn imported_keys_work_on_the_proxy_when_accepted() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    let tokens = legacy_tokens(5);
    let tsv: String = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{t}\tlegacy-{i}\n"))
        .collect();
    let out = import(&gate, &tsv);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Imported 5 API keys"));

    let client = reqwest::Client::new();
    for token in &tokens {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let id = upstream.last().headers["x-keygate-key-id"]
        .to_str()
        .unwrap()
        .to_string();
    let listed = gate
        .store
        .get_key(&keygate::key::KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listed.display_name, "legacy-4");
    // One character more or less: refused without a match.
    for wrong in [
        format!("{}x", tokens[0]),
        tokens[0][..tokens[0].len() - 1].to_string(),
    ] {
        let r = client
            .get(gate.proxy_url("/"))
            .bearer_auth(&wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // Native keys keep working beside them.
    let r = client
        .get(gate.proxy_url("/"))
        .bearer_auth(&gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Importing the same token twice is refused as a whole.
    let out = import(&gate, &format!("{}\tagain\n", tokens[0]));
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gate.stop().await;
}

#[tokio::test]
async fn imports_respect_the_owner_cap_all_or_nothing() {
    let gate = Gate::builder()
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    // The bootstrap admin has one key; the default cap is 10.
    let tsv: String = legacy_tokens(10)
        .iter()
        .map(|t| format!("{t}\tk\n"))
        .collect();
    let out = import(&gate, &tsv);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("maxKeysPerOwner"), "{stderr}");
    let keys = gate
        .store
        .list_keys(
            &Default::default(),
            &keygate::store::PageRequest {
                size: 100,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(keys.items.len(), 1, "nothing was imported");
    // A bad line is named by number, never echoed.
    let out = import(
        &gate,
        "kg_fine_enough_token_here\tok\nnot a token at all\tx\n",
    );
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("not a token at all"));
    gate.stop().await;
}

#[tokio::test]
async fn imported_tokens_are_refused_without_accept_imported() {
    let gate = Gate::builder()
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    let token = legacy_tokens(1).remove(0);
    assert!(import(&gate, &format!("{token}\tx\n")).status.success());
    gate.stop().await;
    let strict = Gate::builder().start().await;
    let r = reqwest::Client::new()
        .get(strict.proxy_url("/"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_api_key");
    strict.stop().await;
}

/// An imported token's id is known before the import: a client may present
/// it first and be refused (the id cached as unknown). The import is
/// announced like a create, so a running keygate accepts the token within
/// its change feed's poll, not after `negative_ttl` (here a minute; 2 s by
/// default). Before, the import wrote no change at all.
#[tokio::test]
async fn an_import_reaches_a_keygate_that_saw_the_token_as_unknown() {
    let upstream = RecordingUpstream::start().await;
    let gate = Gate::builder()
        .upstream(upstream.addr)
        .extra(
            "[keys]\naccept_imported = true\n\
             [cache]\nnegative_ttl = \"60s\"\npoll_interval = \"200ms\"",
        )
        .start()
        .await;
    let client = reqwest::Client::new();
    let token = &legacy_tokens(1)[0];
    let status = |token: String| {
        let client = client.clone();
        let url = gate.proxy_url("/");
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Refused, and remembered as unknown, once the feed has started (its
    // first read drops the whole cache, the negative entry with it).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status(token.clone()).await, 401, "not imported yet");
    let out = import(&gate, &format!("{token}\tmigrated\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported = std::time::Instant::now();
    while status(token.clone()).await != 200 {
        assert!(
            imported.elapsed() < std::time::Duration::from_secs(5),
            "the imported token was still refused 5 s after the import"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    gate.stop().await;
}

/// A token listed twice in one file (a merged export) is refused by the
/// numbers of both lines, never echoed, and nothing is imported; the store
/// alone could only say "imported twice?" without saying where.
#[tokio::test]
async fn a_token_listed_twice_is_named_by_both_lines() {
    let gate = Gate::builder()
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    let tokens = legacy_tokens(3);
    let tsv = format!(
        "{}\ta\n{}\tb\n{}\tc\n{}\tagain\n",
        tokens[0], tokens[1], tokens[2], tokens[1]
    );
    let out = import(&gate, &tsv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("line 4") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(!stderr.contains(&tokens[1]), "{stderr}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(
            &sqlx::SqlitePool::connect(&format!("sqlite://{}", gate.db_path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(count, 1, "only the bootstrap key");
    gate.stop().await;
}

/// A token with a character no token has is refused by its line and the
/// character's place, not with the native format's "wrong length" (the
/// line is not a native token at all); the token is never echoed.
#[tokio::test]
async fn a_bad_character_is_named_by_line_and_place() {
    let gate = Gate::builder()
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    let tokens = legacy_tokens(2);
    for bad in ['!', ' ', 'é'] {
        // The 21st character: `kg_` and 12 hex digits, `_`, then the secret's fifth.
        let mut broken: Vec<char> = tokens[1].chars().collect();
        broken[20] = bad;
        let broken: String = broken.into_iter().collect();
        let out = import(&gate, &format!("{}\tfine\n{broken}\tbroken\n", tokens[0]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("line 2") && stderr.contains(&format!("character 21 ({bad:?})")),
            "{bad:?}: {stderr}"
        );
        assert!(!stderr.contains("length"), "{stderr}");
        // Nothing of the token before or after the bad character.
        let before: String = broken.chars().skip(3).take(17).collect();
        let after: String = broken.chars().skip(21).collect();
        assert!(!stderr.contains(&before), "{stderr}");
        assert!(!stderr.contains(&after), "{stderr}");
    }
    // Too short for either shape, and another system's prefix: said so.
    let out = import(&gate, "kg_short\tx\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("8 characters"),
        "{stderr}"
    );
    let out = import(&gate, "sk_live_Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe\tx\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("does not start with kg_"),
        "{stderr}"
    );
    assert!(!stderr.contains("Zx9Yw8"), "{stderr}");
    gate.stop().await;
}

/// A token the store already holds (a file imported twice, or partly
/// before) is refused by its line and key id, never the token, and
/// nothing of the file is imported; the store alone could only say
/// "imported twice?" without saying where.
#[tokio::test]
async fn a_token_already_in_the_store_is_named_by_its_line() {
    let gate = Gate::builder()
        .extra("[keys]\naccept_imported = true")
        .start()
        .await;
    let tokens = legacy_tokens(6);
    let first: String = tokens[..2]
        .iter()
        .map(|t| format!("{t}\tbefore\n"))
        .collect();
    let out = import(&gate, &first);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tsv = format!(
        "{}\tnew\n\n{}\tagain\n{}\tnew\n{}\tagain\n",
        tokens[2], tokens[1], tokens[3], tokens[0]
    );
    let out = import(&gate, &tsv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    let id = |token: &str| {
        keygate::key::TokenFormat::new("kg")
            .accepting_imported(true)
            .parse(token.as_bytes())
            .unwrap()
            .id
            .to_string()
    };
    assert!(
        stderr.contains(&format!("line 3 (key {})", id(&tokens[1])))
            && stderr.contains(&format!("line 5 (key {})", id(&tokens[0]))),
        "{stderr}"
    );
    for token in &tokens {
        assert!(!stderr.contains(&token[16..]), "{stderr}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(
            &sqlx::SqlitePool::connect(&format!("sqlite://{}", gate.db_path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(count, 3, "the bootstrap key and the first two imported");
    gate.stop().await;
}
