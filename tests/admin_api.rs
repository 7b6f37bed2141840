//! The admin API over real HTTP: every endpoint, every key policy, the audit
//! log, input errors, and changes reaching the proxy of the same process at
//! once.

mod admin_common;
mod support;

use admin_common::{eventually, in_hours, proxy_get, Api};
use reqwest::Method;
use serde_json::{json, Value};
use support::{echo_upstream, Gate};

async fn gate() -> (Gate, Api) {
    let gate = Gate::builder()
        .upstream(echo_upstream().await)
        .start()
        .await;
    let api = Api::new(&gate, &gate.admin_token);
    (gate, api)
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| humantime::parse_rfc3339(s).is_ok())
}

#[tokio::test]
async fn users_create_get_list_update_delete() {
    let (gate, api) = gate().await;
    let (status, created) = api
        .post(
            "/api/v1/users",
            json!({ "spec": { "email": "dev@example.com", "access": {
                "accountAccess": { "role": "developer" } } } }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["resourceVersion"], "1");
    assert_eq!(created["state"], "active");
    assert_eq!(created["spec"]["email"], "dev@example.com");
    assert_eq!(
        created["spec"]["access"]["accountAccess"]["role"],
        "developer"
    );
    assert!(is_rfc3339(&created["createdTime"]));
    assert!(is_rfc3339(&created["lastModifiedTime"]));

    let (status, got) = api.get(&format!("/api/v1/users/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got, created);

    // Duplicate email.
    let (status, body) = api
        .post(
            "/api/v1/users",
            json!({ "spec": { "email": "dev@example.com" } }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );

    // Paging: three users (with the bootstrap admin), one per page.
    api.create_user("third@example.com", "read", &[]).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (status, page) = api
            .get(&format!("/api/v1/users?pageSize=1&pageToken={token}"))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["users"].as_array().unwrap().len(), 1);
        seen.push(
            page["users"][0]["spec"]["email"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        token = page["nextPageToken"].as_str().unwrap().to_string();
        if token.is_empty() {
            break;
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        ["admin@example.com", "dev@example.com", "third@example.com"]
    );

    // Update with the current version; then the old version is stale.
    let (status, updated) = api
        .put(
            &format!("/api/v1/users/{id}"),
            json!({ "resourceVersion": "1", "spec": { "access": {
                "accountAccess": { "role": "read" } } } }),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["resourceVersion"], "2");
    assert_eq!(
        updated["spec"]["email"], "dev@example.com",
        "left-out fields kept"
    );
    assert_eq!(updated["spec"]["access"]["accountAccess"]["role"], "read");
    let (status, body) = api
        .post(
            &format!("/api/v1/users/{id}/update"),
            json!({ "resourceVersion": "1", "spec": { "disabled": true } }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "stale_resource_version");

    // Delete takes the user's keys with it, on the proxy too.
    let (key_id, token) = api.create_key(json!({ "ownerId": id })).await;
    assert_eq!(proxy_get(&gate, "/x", &token).await.0, 200);
    let (status, body) = api.delete(&format!("/api/v1/users/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deletedApiKeys"], json!([key_id]));
    assert_eq!(api.get(&format!("/api/v1/users/{id}")).await.0, 404);
    assert_eq!(api.get(&format!("/api/v1/api-keys/{key_id}")).await.0, 404);
    assert_eq!(
        proxy_get(&gate, "/x", &token).await,
        (401, "invalid_api_key".into())
    );
    gate.stop().await;
}

#[tokio::test]
async fn the_last_admin_cannot_lock_the_account_out() {
    let (gate, api) = gate().await;
    let (_, page) = api.get("/api/v1/users").await;
    let admin = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["spec"]["email"] == "admin@example.com")
        .expect("the bootstrap admin")
        .clone();
    let id = admin["id"].as_str().unwrap();
    let (status, body) = api.delete(&format!("/api/v1/users/{id}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("policy_violation")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"admin@example.com\" is the last enabled account admin"),
        "{message}"
    );
    for spec in [
        json!({ "disabled": true }),
        json!({ "access": { "accountAccess": { "role": "developer" } } }),
    ] {
        let (status, body) = api
            .put(
                &format!("/api/v1/users/{id}"),
                json!({ "resourceVersion": admin["resourceVersion"], "spec": spec }),
            )
            .await;
        assert_eq!(status, 422, "{body}");
    }
    // Nothing changed: the admin is as it was, and its key still manages.
    assert_eq!(
        api.get(&format!("/api/v1/users/{id}")).await,
        (200, admin.clone())
    );
    // With a second admin, the first may step down.
    api.create_user("second@example.com", "admin", &[]).await;
    let (status, body) = api
        .put(
            &format!("/api/v1/users/{id}"),
            json!({ "resourceVersion": admin["resourceVersion"], "spec": {
                "access": { "accountAccess": { "role": "developer" } } } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    gate.stop().await;
}

#[tokio::test]
async fn service_accounts_and_namespaces() {
    let (gate, api) = gate().await;
    let ns_id = api.create_namespace("orders").await;
    let (status, ns) = api.get("/api/v1/namespaces/orders").await;
    assert_eq!(status, 200);
    assert_eq!(ns["id"], ns_id.as_str());
    assert_eq!(ns["spec"]["name"], "orders");
    assert_eq!(api.get(&format!("/api/v1/namespaces/{ns_id}")).await.1, ns);
    let (status, body) = api
        .post(
            "/api/v1/namespaces",
            json!({ "spec": { "name": "orders" } }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    for bad in ["Orders", "", "-x", "a b", &"a".repeat(65)] {
        let (status, body) = api
            .post("/api/v1/namespaces", json!({ "spec": { "name": bad } }))
            .await;
        assert_eq!(status, 422, "{bad:?}: {body}");
    }
    let (status, ns2) = api
        .put(
            "/api/v1/namespaces/orders",
            json!({ "resourceVersion": "1", "spec": { "description": "order service" } }),
        )
        .await;
    assert_eq!(status, 200, "{ns2}");
    assert_eq!(ns2["spec"]["description"], "order service");
    let (status, body) = api
        .put(
            "/api/v1/namespaces/orders",
            json!({ "resourceVersion": "2", "spec": { "name": "renamed" } }),
        )
        .await;
    assert_eq!(status, 422, "names are immutable: {body}");
    let (status, list) = api.get("/api/v1/namespaces").await;
    assert_eq!(status, 200);
    assert_eq!(list["namespaces"].as_array().unwrap().len(), 1);

    let sa = api
        .create_service_account("ci-bot", "developer", &[("orders", "write")])
        .await;
    let (status, got) = api.get(&format!("/api/v1/service-accounts/{sa}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["spec"]["name"], "ci-bot");
    assert_eq!(
        got["spec"]["access"]["namespaceAccesses"]["orders"]["permission"],
        "write"
    );
    // Access to a namespace that does not exist.
    let (status, body) = api
        .post(
            "/api/v1/service-accounts",
            json!({ "spec": { "name": "x", "access": { "namespaceAccesses": {
                "nope": { "permission": "read" } } } } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, updated) = api
        .put(
            &format!("/api/v1/service-accounts/{sa}"),
            json!({ "resourceVersion": "1", "spec": { "description": "builds" } }),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["spec"]["description"], "builds");
    assert_eq!(updated["spec"]["name"], "ci-bot");
    let (status, list) = api.get("/api/v1/service-accounts").await;
    assert_eq!(status, 200);
    assert_eq!(list["serviceAccounts"].as_array().unwrap().len(), 1);
    assert_eq!(
        api.delete(&format!("/api/v1/service-accounts/{sa}"))
            .await
            .0,
        200
    );
    assert_eq!(
        api.get(&format!("/api/v1/service-accounts/{sa}")).await.0,
        404
    );
    assert_eq!(api.delete("/api/v1/namespaces/orders").await.0, 200);
    assert_eq!(api.get("/api/v1/namespaces/orders").await.0, 404);
    gate.stop().await;
}

#[tokio::test]
async fn api_key_life_cycle_reaches_the_proxy_at_once() {
    let (gate, api) = gate().await;
    let (status, created) = api
        .post(
            "/api/v1/api-keys",
            json!({ "spec": { "displayName": "deploy", "description": "for CI",
                "expiryTime": in_hours(24) } }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    let key = &created["apiKey"];
    let id = key["id"].as_str().unwrap().to_string();
    assert!(token.contains(&id));
    assert_eq!(
        key["spec"]["ownerId"],
        gate.admin_user.id.as_str(),
        "for myself"
    );
    assert_eq!(key["spec"]["ownerType"], "user");
    assert_eq!(key["state"], "active");
    assert!(is_rfc3339(&key["spec"]["expiryTime"]));
    assert_eq!(key["lastUsedTime"], Value::Null);

    // The token is never shown again.
    let (_, got) = api.get(&format!("/api/v1/api-keys/{id}")).await;
    let (_, list) = api.get("/api/v1/api-keys").await;
    let secret = &token[token.len() - 38..];
    assert!(!got.to_string().contains(secret));
    assert!(!list.to_string().contains(secret));
    assert_eq!(list["apiKeys"].as_array().unwrap().len(), 2);

    // Fill the proxy's cache, then disable: the next request is refused.
    assert_eq!(proxy_get(&gate, "/a", &token).await.0, 200);
    let (status, disabled) = api
        .post(&format!("/api/v1/api-keys/{id}/disable"), json!({}))
        .await;
    assert_eq!(status, 200, "{disabled}");
    assert_eq!(disabled["state"], "disabled");
    assert_eq!(
        proxy_get(&gate, "/a", &token).await,
        (401, "api_key_disabled".into())
    );
    // Enable with an empty body.
    let (status, enabled) = api
        .send(Method::POST, &format!("/api/v1/api-keys/{id}/enable"), None)
        .await;
    assert_eq!(status, 200, "{enabled}");
    assert_eq!(enabled["state"], "active");
    assert_eq!(proxy_get(&gate, "/a", &token).await.0, 200);

    // Edit the description; stale version refused.
    let version = enabled["resourceVersion"].as_str().unwrap().to_string();
    let (status, edited) = api
        .put(
            &format!("/api/v1/api-keys/{id}"),
            json!({ "resourceVersion": version, "spec": { "displayName": "deploy-2",
                "description": "renamed" } }),
        )
        .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["spec"]["displayName"], "deploy-2");
    assert_eq!(edited["spec"]["description"], "renamed");
    let (status, _) = api
        .put(
            &format!("/api/v1/api-keys/{id}"),
            json!({ "resourceVersion": version, "spec": { "description": "again" } }),
        )
        .await;
    assert_eq!(status, 409);
    // The spec read back may be sent back; changing an immutable field may not.
    let mut spec = edited["spec"].clone();
    spec["description"] = json!("round trip");
    let (status, body) = api
        .put(
            &format!("/api/v1/api-keys/{id}"),
            json!({ "resourceVersion": edited["resourceVersion"], "spec": spec }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .put(
            &format!("/api/v1/api-keys/{id}"),
            json!({ "resourceVersion": body["resourceVersion"], "spec": { "expiryTime": in_hours(2) } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");

    // Rotate with the default grace: both secrets work.
    let (status, rotated) = api
        .post(&format!("/api/v1/api-keys/{id}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new_token = rotated["token"].as_str().unwrap().to_string();
    assert_ne!(new_token, token);
    assert_eq!(rotated["apiKey"]["id"], id.as_str());
    assert!(is_rfc3339(&rotated["apiKey"]["previousSecretValidUntil"]));
    assert_eq!(proxy_get(&gate, "/a", &new_token).await.0, 200);
    assert_eq!(proxy_get(&gate, "/a", &token).await.0, 200);
    // Rotate with no grace: the replaced secret fails at once.
    let (status, rotated) = api
        .post(
            &format!("/api/v1/api-keys/{id}/rotate"),
            json!({ "gracePeriod": "0s" }),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let newest = rotated["token"].as_str().unwrap().to_string();
    assert_eq!(proxy_get(&gate, "/a", &newest).await.0, 200);
    assert_eq!(
        proxy_get(&gate, "/a", &new_token).await,
        (401, "invalid_api_key".into())
    );
    let (status, body) = api
        .post(
            &format!("/api/v1/api-keys/{id}/rotate"),
            json!({ "gracePeriod": "365d" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");

    // Usage is counted and flushed in batches.
    let usage_path = format!("/api/v1/api-keys/{id}/usage");
    eventually("usage flushed", || async {
        let (status, usage) = api.get(&usage_path).await;
        status == 200 && usage["requestCount"].as_u64().unwrap_or(0) >= 5
    })
    .await;
    let (_, usage) = api.get(&usage_path).await;
    assert_eq!(usage["keyId"], id.as_str());
    assert!(is_rfc3339(&usage["lastUsedTime"]));

    // Delete: gone from the API and the proxy.
    assert_eq!(api.delete(&format!("/api/v1/api-keys/{id}")).await.0, 200);
    assert_eq!(api.get(&format!("/api/v1/api-keys/{id}")).await.0, 404);
    assert_eq!(
        proxy_get(&gate, "/a", &newest).await,
        (401, "invalid_api_key".into())
    );
    assert_eq!(api.get("/api/v1/api-keys/not-a-key-id").await.0, 404);
    gate.stop().await;
}

#[tokio::test]
async fn lifetime_policy() {
    let (gate, api) = gate().await;
    let user = api.create_user("u@example.com", "developer", &[]).await;
    let too_long = in_hours(91 * 24);
    for (spec, why) in [
        (
            json!({ "ownerId": user, "expiryTime": too_long }),
            "over 90 days",
        ),
        (json!({ "ownerId": user, "expiryTime": null }), "no expiry"),
        (
            json!({ "ownerId": user, "expiryTime": "2001-01-01T00:00:00Z" }),
            "past",
        ),
    ] {
        let mut spec = spec;
        let (status, body) = api.try_create_key(&mut spec).await;
        assert_eq!(status, 422, "{why}: {body}");
        assert_eq!(body["error"]["code"], "policy_violation", "{why}");
    }
    let (status, body) = api
        .try_create_key(&mut json!({ "expiryTime": "next tuesday" }))
        .await;
    assert_eq!(status, 422, "{body}");
    api.create_key(json!({ "ownerId": user, "expiryTime": in_hours(89 * 24) }))
        .await;

    // maxKeyLifetime 0: keys may never expire.
    let (status, settings) = api.get("/api/v1/account/settings").await;
    assert_eq!(status, 200);
    assert_eq!(settings["spec"]["maxKeyLifetime"], "90d");
    assert_eq!(settings["spec"]["maxKeysPerOwner"], 10);
    assert_eq!(settings["spec"]["apiKeysEnabled"], true);
    let (status, settings) = api
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "maxKeyLifetime": "0s" } }),
        )
        .await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["spec"]["maxKeyLifetime"], "0s");
    let (id, token) = api
        .create_key(json!({ "ownerId": user, "expiryTime": null }))
        .await;
    let (_, key) = api.get(&format!("/api/v1/api-keys/{id}")).await;
    assert_eq!(key["spec"]["expiryTime"], Value::Null);
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_owner_cap_holds_under_50_concurrent_creates() {
    let (gate, api) = gate().await;
    let user = api.create_user("busy@example.com", "developer", &[]).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let api = api.clone();
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            api.try_create_key(&mut json!({ "ownerId": user, "displayName": format!("k{i}") }))
                .await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            201 => created += 1,
            422 => assert_eq!(body["error"]["code"], "policy_violation", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 10);
    let (_, list) = api
        .get(&format!("/api/v1/api-keys?ownerId={user}&pageSize=1000"))
        .await;
    assert_eq!(list["apiKeys"].as_array().unwrap().len(), 10);

    // A lower cap refuses the next one with the policy's message.
    let (_, settings) = api.get("/api/v1/account/settings").await;
    let (status, _) = api
        .post(
            "/api/v1/account/settings/update",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "maxKeysPerOwner": 3 } }),
        )
        .await;
    assert_eq!(status, 200);
    let other = api.create_user("other@example.com", "developer", &[]).await;
    for _ in 0..3 {
        api.create_key(json!({ "ownerId": other })).await;
    }
    let (status, body) = api.try_create_key(&mut json!({ "ownerId": other })).await;
    assert_eq!(status, 422);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maxKeysPerOwner"),
        "{body}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn disabled_owners_and_the_account_switch_fail_on_the_proxy() {
    let (gate, api) = gate().await;
    let user = api.create_user("u@example.com", "developer", &[]).await;
    let (_, token) = api.create_key(json!({ "ownerId": user })).await;
    let sa = api.create_service_account("bot", "read", &[]).await;
    let (_, sa_token) = api.create_key(json!({ "ownerId": sa })).await;
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);
    assert_eq!(proxy_get(&gate, "/", &sa_token).await.0, 200);

    let (status, _) = api
        .put(
            &format!("/api/v1/users/{user}"),
            json!({ "resourceVersion": "1", "spec": { "disabled": true } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        proxy_get(&gate, "/", &token).await,
        (401, "owner_disabled".into())
    );
    let (status, _) = api
        .put(
            &format!("/api/v1/service-accounts/{sa}"),
            json!({ "resourceVersion": "1", "spec": { "disabled": true } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        proxy_get(&gate, "/", &sa_token).await,
        (401, "owner_disabled".into())
    );
    let (status, _) = api
        .put(
            &format!("/api/v1/users/{user}"),
            json!({ "resourceVersion": "2", "spec": { "disabled": false } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);

    // The account-wide switch.
    let (_, settings) = api.get("/api/v1/account/settings").await;
    let (status, off) = api
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "apiKeysEnabled": false } }),
        )
        .await;
    assert_eq!(status, 200, "{off}");
    assert_eq!(
        proxy_get(&gate, "/", &token).await,
        (401, "api_keys_disabled".into())
    );
    assert_eq!(
        proxy_get(&gate, "/", &gate.admin_token).await,
        (401, "api_keys_disabled".into())
    );
    // Only an admin's key still works on the admin API, to switch back.
    let (status, body) = api.as_key(&token).get("/api/v1/account/settings").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("api_keys_disabled"))
    );
    let (status, on) = api
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": off["resourceVersion"], "spec": { "apiKeysEnabled": true } }),
        )
        .await;
    assert_eq!(status, 200, "{on}");
    assert_eq!(proxy_get(&gate, "/", &token).await.0, 200);

    // Settings validation.
    for spec in [
        json!({ "maxKeysPerOwner": 0 }),
        json!({ "maxKeyLifetime": "forever" }),
        json!({ "maxKeyLifetime": "100000d" }),
    ] {
        let (status, body) = api
            .put(
                "/api/v1/account/settings",
                json!({ "resourceVersion": on["resourceVersion"], "spec": spec }),
            )
            .await;
        assert_eq!(status, 422, "{spec}: {body}");
    }
    let (status, _) = api
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": "1", "spec": {} }),
        )
        .await;
    assert_eq!(status, 409, "stale settings version");
    gate.stop().await;
}

#[tokio::test]
async fn audit_log_records_every_change_without_secrets() {
    let (gate, api) = gate().await;
    let user = api.create_user("u@example.com", "developer", &[]).await;
    let (id, token) = api.create_key(json!({ "ownerId": user })).await;
    api.post(&format!("/api/v1/api-keys/{id}/disable"), json!({}))
        .await;
    let (_, rotated) = api
        .post(&format!("/api/v1/api-keys/{id}/rotate"), json!({}))
        .await;
    let rotated_token = rotated["token"].as_str().unwrap().to_string();
    api.delete(&format!("/api/v1/api-keys/{id}")).await;

    let (status, log) = api.get("/api/v1/audit-events?pageSize=1000").await;
    assert_eq!(status, 200);
    let events = log["auditEvents"].as_array().unwrap();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Newest first.
    assert_eq!(
        &actions[..5],
        [
            "api-key.delete",
            "api-key.rotate",
            "api-key.disable",
            "api-key.create",
            "user.create"
        ]
    );
    let latest = &events[0];
    assert_eq!(latest["actor"]["name"], "admin@example.com");
    assert_eq!(latest["actor"]["id"], gate.admin_user.id.as_str());
    assert_eq!(latest["target"]["type"], "api-key");
    assert_eq!(latest["target"]["id"], id.as_str());
    assert!(is_rfc3339(&latest["time"]));
    let text = log.to_string();
    for t in [&token, &rotated_token, &gate.admin_token] {
        assert!(
            !text.contains(&t[t.len() - 38..]),
            "a secret in the audit log"
        );
    }
    // Paging newest-first.
    let (_, first) = api.get("/api/v1/audit-events?pageSize=2").await;
    let next = first["nextPageToken"].as_str().unwrap();
    assert!(!next.is_empty());
    let (_, second) = api
        .get(&format!("/api/v1/audit-events?pageSize=2&pageToken={next}"))
        .await;
    assert_eq!(second["auditEvents"][0]["action"], actions[2]);
    gate.stop().await;
}

/// Every malformed request is refused with a clear status and message, and
/// changes nothing.
#[tokio::test]
async fn malformed_requests_change_nothing() {
    let (gate, api) = gate().await;
    let (_, before_users) = api.get("/api/v1/users").await;
    let (_, before_audit) = api.get("/api/v1/audit-events").await;

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/api/v1/users",
            "application/json",
            b"{\"spec\":".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/api/v1/users",
            "application/json",
            b"not json".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/api/v1/users",
            "application/json",
            Vec::new(),
            400,
            "invalid_json",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{"spec":{"email":"a@b.co"},"extra":1}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{"spec":{"email":"a@b.co","admin":true}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{"spec":{"email":42}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{"spec":{"email":"a@b.co","access":{"accountAccess":{"role":"root"}}}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{"spec":{"email":"not-an-email"}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "application/json",
            br#"{}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/users",
            "text/plain",
            br#"{"spec":{"email":"a@b.co"}}"#.to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "/api/v1/service-accounts",
            "application/json",
            br#"{"spec":{"name":"bad\nname"}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/api-keys",
            "application/json",
            br#"{"spec":{"displayName":"x","expiryTime":"2030-01-01T00:00:00Z","disabled":"yes"}}"#
                .to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/api-keys",
            "application/json",
            br#"{"spec":{"displayName":"x\u0000y","expiryTime":"2030-01-01T00:00:00Z"}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
        (
            "/api/v1/api-keys",
            "application/json",
            br#"{"spec":{"displayName":"x","ownerType":"robot"}}"#.to_vec(),
            422,
            "invalid_argument",
        ),
    ];
    for (path, content_type, body, status, code) in cases {
        let shown = String::from_utf8_lossy(&body).to_string();
        let (got, answer) = api.raw(Method::POST, path, content_type, body).await;
        assert_eq!(got, status, "{path} {shown}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path} {shown}: {answer}");
        assert!(
            !answer["error"]["message"].as_str().unwrap().is_empty(),
            "a message for {shown}"
        );
    }

    // A wrong value is named by its field, and valid JSON of the wrong
    // shape is never called "not valid JSON" (serde_json reports an object
    // where an enum's string belongs as a syntax error).
    for (path, body, field) in [
        (
            "/api/v1/api-keys",
            r#"{"spec":{"displayName":"x","ownerType":{}}}"#,
            "spec.ownerType",
        ),
        ("/api/v1/users", r#"{"spec":{"email":42}}"#, "spec.email"),
        (
            "/api/v1/users",
            r#"{"spec":{"email":"a@b.co","access":{"accountAccess":{"role":"root"}}}}"#,
            "spec.access.accountAccess.role",
        ),
    ] {
        let (got, answer) = api
            .raw(Method::POST, path, "application/json", body.into())
            .await;
        assert_eq!(got, 422, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_argument", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }

    // Oversized body (default limit 64 KiB).
    let huge = format!(
        r#"{{"spec":{{"email":"a@b.co","description":"{}"}}}}"#,
        "x".repeat(100 * 1024)
    );
    let (status, answer) = api
        .raw(
            Method::POST,
            "/api/v1/users",
            "application/json",
            huge.into_bytes(),
        )
        .await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "payload_too_large");

    // Query strings.
    for (path, status) in [
        ("/api/v1/users?pageSize=5000", 400),
        ("/api/v1/users?pageSize=ten", 400),
        ("/api/v1/users?color=blue", 400),
        ("/api/v1/api-keys?ownerType=robot", 400),
        ("/api/v1/users?pageToken=%00%01", 400),
    ] {
        let (got, answer) = api.get(path).await;
        assert_eq!(got, status, "{path}: {answer}");
        assert!(answer["error"]["message"].is_string());
    }
    // Bad resourceVersion.
    let (status, answer) = api
        .put(
            &format!("/api/v1/users/{}", gate.admin_user.id),
            json!({ "resourceVersion": "latest", "spec": {} }),
        )
        .await;
    assert_eq!(status, 422, "{answer}");
    let (status, _) = api
        .put(
            &format!("/api/v1/users/{}", gate.admin_user.id),
            json!({ "resourceVersion": 1, "spec": {} }),
        )
        .await;
    assert_eq!(status, 422);
    // Unknown endpoint and method.
    let (status, answer) = api.get("/api/v1/nothing").await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(api.send(Method::PATCH, "/api/v1/users", None).await.0, 405);

    let (_, after_users) = api.get("/api/v1/users").await;
    let (_, after_audit) = api.get("/api/v1/audit-events").await;
    assert_eq!(before_users, after_users, "no user changed");
    assert_eq!(before_audit, after_audit, "no audit event written");
    gate.stop().await;
}

#[tokio::test]
async fn health_and_metrics_still_served() {
    let (gate, _) = gate().await;
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client.get(gate.admin_url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    gate.stop().await;
}

/// Emails must have RFC 5322's common shape; an address stored before that
/// rule (here written straight into the store) does not block updates that
/// leave the email alone.
#[tokio::test]
async fn user_emails_are_checked_when_given_not_when_kept() {
    let (gate, api) = gate().await;
    for bad in [
        "a<b@c.co",
        "\"a b\"@c.co",
        "a@[127.0.0.1]",
        "a..b@c.co",
        "a@b",
    ] {
        let (status, body) = api
            .post("/api/v1/users", json!({ "spec": { "email": bad } }))
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not a valid email"),
            "{bad}: {body}"
        );
    }
    let odd = gate
        .user(
            "odd<mail>@example.com",
            keygate::store::AccountRole::Read,
            &[],
        )
        .await;
    let (status, body) = api
        .put(
            &format!("/api/v1/users/{}", odd.id),
            json!({ "resourceVersion": odd.resource_version.to_string(), "spec": { "disabled": true } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spec"]["email"], "odd<mail>@example.com");
    assert_eq!(body["spec"]["disabled"], true);
    let (status, _) = api
        .put(
            &format!("/api/v1/users/{}", odd.id),
            json!({ "resourceVersion": body["resourceVersion"], "spec": { "email": "odd<mail>@example.com" } }),
        )
        .await;
    assert_eq!(status, 422, "a given email is checked, even the stored one");
}

/// On update, the part of `spec.access` a request leaves out keeps its
/// value: changing a principal's namespaces does not demote it (the role
/// defaulted to `read`), nor changing its role revoke its grants. On
/// create, what is left out is least privilege.
#[tokio::test]
async fn updating_access_keeps_the_parts_left_out() {
    let (gate, api) = gate().await;
    api.create_namespace("orders").await;
    api.create_namespace("billing").await;
    for (path, spec) in [
        (
            "/api/v1/users",
            json!({ "email": "second-admin@example.com" }),
        ),
        ("/api/v1/service-accounts", json!({ "name": "ops" })),
    ] {
        let mut created_spec = spec.clone();
        created_spec["access"] = json!({ "accountAccess": { "role": "admin" },
            "namespaceAccesses": { "billing": { "permission": "write" } } });
        let (status, created) = api.post(path, json!({ "spec": created_spec })).await;
        assert_eq!(status, 201, "{created}");
        let id = created["id"].as_str().unwrap();
        let access = |body: &Value| body["spec"]["access"].clone();

        let (status, updated) = api
            .put(
                &format!("{path}/{id}"),
                json!({ "resourceVersion": "1", "spec": { "access": {
                    "namespaceAccesses": { "orders": { "permission": "read" } } } } }),
            )
            .await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(
            access(&updated),
            json!({ "accountAccess": { "role": "admin" },
                "namespaceAccesses": { "orders": { "permission": "read" } } }),
            "{path}: the role is kept"
        );
        let (status, updated) = api
            .put(
                &format!("{path}/{id}"),
                json!({ "resourceVersion": "2", "spec": { "access": {
                    "accountAccess": { "role": "developer" } } } }),
            )
            .await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(
            access(&updated),
            json!({ "accountAccess": { "role": "developer" },
                "namespaceAccesses": { "orders": { "permission": "read" } } }),
            "{path}: the grants are kept"
        );
        let (status, updated) = api
            .put(
                &format!("{path}/{id}"),
                json!({ "resourceVersion": "3", "spec": { "access": { "namespaceAccesses": {} } } }),
            )
            .await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(
            access(&updated),
            json!({ "accountAccess": { "role": "developer" }, "namespaceAccesses": {} }),
            "{path}: an empty map clears the grants"
        );
        // On create, a role left out is the least privilege.
        let mut bare = spec.clone();
        for v in bare.as_object_mut().unwrap().values_mut() {
            *v = json!(format!("new-{}", v.as_str().unwrap()));
        }
        bare["access"] = json!({ "namespaceAccesses": { "orders": { "permission": "read" } } });
        let (status, created) = api.post(path, json!({ "spec": bare })).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["spec"]["access"]["accountAccess"]["role"], "read");
    }
    gate.stop().await;
}

/// A namespace is addressed by id or name, so one string must name one
/// namespace: a name shaped like an id is refused, and a name of that shape
/// an older version let in does not shadow the namespace whose id it is.
#[tokio::test]
async fn a_namespace_name_cannot_pass_for_another_namespaces_id() {
    let (gate, api) = gate().await;
    let first = api.create_namespace("first").await;
    let (status, body) = api
        .post("/api/v1/namespaces", json!({ "spec": { "name": first } }))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_argument");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.name "),
        "{body}"
    );
    let (status, body) = api
        .post(
            "/api/v1/namespaces",
            json!({ "spec": { "name": "abcdefghjkmnpqrs" } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // A name with a '-' or of another length is no id.
    api.create_namespace("orders-2024-q1ab").await;
    api.create_namespace("abcdefghjkmnpqrst").await;

    // As an older version let in: a namespace named after first's id.
    gate.sql(&format!(
        "INSERT INTO namespaces (id, name, description, created_ms, modified_ms) \
         VALUES ('shadow0000000000', '{first}', '', 1, 1)"
    ))
    .await;
    let (status, got) = api.get(&format!("/api/v1/namespaces/{first}")).await;
    assert_eq!(
        (status, got["spec"]["name"].as_str()),
        (200, Some("first")),
        "{got}"
    );
    let (status, _) = api.delete(&format!("/api/v1/namespaces/{first}")).await;
    assert_eq!(status, 200);
    let (status, got) = api.get("/api/v1/namespaces/shadow0000000000").await;
    assert_eq!(
        (status, got["spec"]["name"].as_str()),
        (200, Some(first.as_str())),
        "{got}"
    );
    assert_eq!(api.get("/api/v1/namespaces/first").await.0, 404);
    gate.stop().await;
}

/// A key's secret pasted where it does not belong never comes back: not in
/// the Basic form `<id>:<secret>` in a path, not alone in any field an
/// error quotes, and it is refused as a name or description. Ids stay
/// readable.
#[tokio::test]
async fn no_form_of_a_key_comes_back_in_an_error() {
    let (gate, api) = gate().await;
    let (id, token) = api.create_key(json!({})).await;
    let rest = &token[4 + id.len()..];
    let secret = &rest[..32];
    let answers = [
        api.get(&format!("/api/v1/api-keys/{id}:{rest}")).await,
        api.get(&format!("/api/v1/api-keys/{rest}")).await,
        api.try_create_key(&mut json!({ "ownerId": secret })).await,
        api.try_create_key(&mut json!({ "expiryTime": secret }))
            .await,
        api.try_create_key(&mut json!({ "namespaces": [secret] }))
            .await,
        api.try_create_key(&mut json!({ "ownerType": secret }))
            .await,
        api.try_create_key(&mut json!({ secret: 1 })).await,
        api.post("/api/v1/users", json!({ "spec": { "email": secret } }))
            .await,
        api.post(
            "/api/v1/users",
            json!({ "spec": { "email": format!("{secret}@example.com") } }),
        )
        .await,
        api.get(&format!("/api/v1/api-keys?ownerType={secret}"))
            .await,
        api.get(&format!("/api/v1/api-keys?{secret}=1")).await,
        api.try_create_key(&mut json!({ "displayName": secret }))
            .await,
        api.try_create_key(&mut json!({ "displayName": format!("ci {id}:{rest}") }))
            .await,
        api.try_create_key(&mut json!({ "description": format!("the secret is {secret}.") }))
            .await,
        api.post(
            "/api/v1/service-accounts",
            json!({ "spec": { "name": "bot", "description": secret } }),
        )
        .await,
    ];
    for (i, (status, body)) in answers.iter().enumerate() {
        assert!((400..500).contains(status), "#{i}: {status} {body}");
        let text = body.to_string();
        assert!(!text.contains(secret), "#{i} echoes the secret: {text}");
    }
    assert!(
        answers[0].1["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&id),
        "the id stays readable: {}",
        answers[0].1
    );
    for (i, (status, body)) in answers[11..].iter().enumerate() {
        assert_eq!(*status, 422, "#{i}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("looks like it contains an API key"),
            "{body}"
        );
        assert!(message.starts_with("spec."), "names its field: {body}");
    }
    // Single-case identifiers as long as a secret, such as a commit hash,
    // are no secret.
    let sha = "9fceb02d0ae598e95dc970b74767f19372d61af8";
    api.create_key(json!({ "displayName": format!("deploy {sha}"), "description": sha }))
        .await;
    gate.stop().await;
}

/// A key policy's refusal names the request field it is about, as the
/// other 422s do.
#[tokio::test]
async fn policy_errors_name_their_field() {
    let (gate, api) = gate().await;
    let message = |body: &Value| body["error"]["message"].as_str().unwrap_or("").to_string();
    for (mut spec, field) in [
        (
            json!({ "expiryTime": "2001-01-01T00:00:00Z" }),
            "spec.expiryTime: ",
        ),
        (
            json!({ "expiryTime": in_hours(91 * 24) }),
            "spec.expiryTime: ",
        ),
        (json!({ "expiryTime": null }), "spec.expiryTime: "),
        (json!({ "namespaces": ["nope"] }), "spec.namespaces: "),
    ] {
        let (status, body) = api.try_create_key(&mut spec).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("policy_violation")),
            "{body}"
        );
        assert!(message(&body).starts_with(field), "{field}: {body}");
    }
    let grants = json!({ "namespaceAccesses": { "nope": { "permission": "read" } } });
    let (status, body) = api
        .post(
            "/api/v1/service-accounts",
            json!({ "spec": { "name": "x", "access": grants } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).starts_with("spec.access.namespaceAccesses: "),
        "{body}"
    );
    let user = api.create_user("u@example.com", "developer", &[]).await;
    let (status, body) = api
        .put(
            &format!("/api/v1/users/{user}"),
            json!({ "resourceVersion": "1", "spec": { "access": grants } }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        message(&body).starts_with("spec.access.namespaceAccesses: "),
        "{body}"
    );
    let (_, settings) = api.get("/api/v1/account/settings").await;
    let (status, _) = api
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "maxKeysPerOwner": 1 } }),
        )
        .await;
    assert_eq!(status, 200);
    api.create_key(json!({ "ownerId": user })).await;
    let (status, body) = api.try_create_key(&mut json!({ "ownerId": user })).await;
    assert_eq!(status, 422, "{body}");
    assert!(message(&body).starts_with("spec.ownerId: "), "{body}");
    gate.stop().await;
}

/// An email is one address whatever its case: a second user cannot take it
/// in another case, a lookup by email (the local CLI's `--owner-email`)
/// finds it in any case, and it is shown as typed.
#[tokio::test]
async fn user_emails_are_unique_and_found_ignoring_case() {
    let (gate, api) = gate().await;
    let dev = api.create_user("dev@example.com", "developer", &[]).await;
    let (status, body) = api
        .post(
            "/api/v1/users",
            json!({ "spec": { "email": "DEV@example.com" } }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("already_exists")),
        "{body}"
    );
    let other = api.create_user("other@example.com", "read", &[]).await;
    let (status, body) = api
        .put(
            &format!("/api/v1/users/{other}"),
            json!({ "resourceVersion": "1", "spec": { "email": "Dev@Example.com" } }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = api
        .put(
            &format!("/api/v1/users/{dev}"),
            json!({ "resourceVersion": "1", "spec": { "email": "Dev@Example.com" } }),
        )
        .await;
    assert_eq!(
        (status, body["spec"]["email"].as_str()),
        (200, Some("Dev@Example.com")),
        "{body}"
    );

    let store = format!("sqlite://{}", gate.db_path.display());
    let token = tokio::task::spawn_blocking(move || {
        support::run_cli([
            "apikey",
            "create",
            "--local",
            "--name",
            "ops",
            "--duration",
            "1h",
            "--owner-email",
            "ADMIN@Example.COM",
            "--store",
            &store,
        ])
    })
    .await
    .unwrap();
    assert!(token.starts_with("kg_"), "{token}");
    let (status, _) = api.as_key(&token).get("/api/v1/users").await;
    assert_eq!(status, 200, "the key is the admin's");
    gate.stop().await;
}

/// A method a path does not accept gets 405 with the error body every
/// other refusal has, naming the method, and the `Allow` header.
#[tokio::test]
async fn a_method_not_allowed_is_named_in_a_json_error() {
    let gate = Gate::builder().start().await;
    let client = reqwest::Client::new();
    for (method, path, allowed) in [
        (Method::PATCH, "/api/v1/api-keys", "GET,HEAD,POST"),
        (Method::GET, "/api/v1/api-keys/abc/rotate", "POST"),
        (Method::POST, "/api/v1/account/settings", "GET,HEAD,PUT"),
        (Method::DELETE, "/api/v1/audit-events", "GET,HEAD"),
    ] {
        let r = client
            .request(method.clone(), gate.admin_url(path))
            .bearer_auth(&gate.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allowed, "{method} {path}");
        let body: Value = r.json().await.expect("a JSON error body");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(method.as_str()), "{message}");
    }
    gate.stop().await;
}

/// A path id that is not UTF-8 once decoded is refused with the JSON error
/// every other bad request gets, not the router's plain text.
#[tokio::test]
async fn a_path_id_that_is_not_utf8_gets_a_json_error() {
    let gate = Gate::builder().start().await;
    let api = Api::new(&gate, &gate.admin_token);
    for (method, path) in [
        (Method::GET, "/api/v1/users/%FF"),
        (Method::DELETE, "/api/v1/service-accounts/%C0%AF"),
        (Method::GET, "/api/v1/namespaces/%FF"),
        (Method::GET, "/api/v1/api-keys/%FF"),
        (Method::POST, "/api/v1/api-keys/%FF/rotate"),
        (Method::GET, "/api/v1/api-keys/%FF/usage"),
    ] {
        let (status, body) = api.send(method.clone(), path, None).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_eq!(
            body["error"]["code"], "invalid_path",
            "{method} {path}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("UTF-8"), "{message}");
    }
    gate.stop().await;
}

/// A name with an invisible character looks like another name (`bot` and
/// `bot` + U+200B were two service accounts), or displays reordered
/// (U+202E): refused, naming the character, and nothing is created.
#[tokio::test]
async fn names_with_invisible_characters_are_refused() {
    let (gate, api) = gate().await;
    for name in ["bot\u{200B}", "\u{202E}tob", "b\u{FEFF}ot", "bo\u{2066}t"] {
        let (status, body) = api
            .post(
                "/api/v1/service-accounts",
                json!({ "spec": { "name": name } }),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("invalid_argument")),
            "{name:?}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("spec.name") && message.contains("U+"),
            "{message}"
        );
        let (status, body) = api
            .post(
                "/api/v1/api-keys",
                json!({ "spec": { "displayName": name, "expiryTime": in_hours(24) } }),
            )
            .await;
        assert_eq!(status, 422, "{name:?}: {body}");
    }
    let (_, list) = api.get("/api/v1/service-accounts").await;
    assert_eq!(list["serviceAccounts"], json!([]), "{list}");
    // A visible name in any script is still a name.
    let (status, body) = api
        .post(
            "/api/v1/service-accounts",
            json!({ "spec": { "name": "ботик-ü" } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    gate.stop().await;
}
