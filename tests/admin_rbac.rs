//! Who may do what on the admin API, allowed and refused, over real HTTP:
//! the same API keys as the proxy, account admins manage everything, others
//! only their own keys within their own access, service-account keys carry
//! the service account's access.

mod admin_common;
mod support;

use admin_common::{in_hours, proxy_call, proxy_get, Api};
use keygate::store::{AccountRole, Permission};
use reqwest::Method;
use serde_json::json;
use support::{echo_upstream, Gate};

fn code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn credentials_are_required_and_checked() {
    let gate = Gate::builder().start().await;
    let anon = Api::anonymous(&gate);
    let r = reqwest::Client::new()
        .get(gate.admin_url("/api/v1/users"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer realm=\"keygate\""));
    let (status, body) = anon.get("/api/v1/api-keys").await;
    assert_eq!((status, code(&body)), (401, "missing_api_key"));
    let (status, body) = anon.as_key("kg_nope").get("/api/v1/api-keys").await;
    assert_eq!((status, code(&body)), (401, "malformed_api_key"));
    // A well-formed token with a wrong secret.
    let (_, other, _) = gate.tokens.generate();
    let (status, body) = anon.as_key(other.expose()).get("/api/v1/api-keys").await;
    assert_eq!((status, code(&body)), (401, "invalid_api_key"));
    // x-api-key and Basic work as on the proxy.
    let r = reqwest::Client::new()
        .get(gate.admin_url("/api/v1/account/settings"))
        .header("x-api-key", &gate.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = &gate.admin_token;
    let (id, rest) = (&t[3..19], &t[20..]);
    let r = reqwest::Client::new()
        .get(gate.admin_url("/api/v1/account/settings"))
        .basic_auth(id, Some(rest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A disabled key is refused here too.
    let admin = Api::new(&gate, &gate.admin_token);
    let (key_id, token) = admin.create_key(json!({})).await;
    admin
        .post(&format!("/api/v1/api-keys/{key_id}/disable"), json!({}))
        .await;
    let (status, body) = admin.as_key(&token).get("/api/v1/api-keys").await;
    assert_eq!((status, code(&body)), (401, "api_key_disabled"));
    // The OpenAPI document needs no key.
    assert_eq!(anon.get("/api/v1/openapi.json").await.0, 200);
    gate.stop().await;
}

#[tokio::test]
async fn a_developer_manages_only_their_own_keys() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    let dev = gate
        .user(
            "dev@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Write)],
        )
        .await;
    let other = gate
        .user("other@example.com", AccountRole::Developer, &[])
        .await;
    admin.create_namespace("billing").await;
    let (_, dev_token) = gate.key_for(&dev).await;
    let (other_key, _) = gate.key_for(&other).await;
    let sa = admin.create_service_account("bot", "read", &[]).await;
    let api = admin.as_key(&dev_token);

    // Allowed: own user, own keys, settings, namespaces they can see.
    assert_eq!(api.get(&format!("/api/v1/users/{}", dev.id)).await.0, 200);
    assert_eq!(api.get("/api/v1/account/settings").await.0, 200);
    let (id, token) = api.create_key(json!({ "namespaces": ["orders"] })).await;
    let (status, mine) = api
        .post(
            "/api/v1/api-keys",
            json!({ "spec": { "displayName": "explicit", "ownerId": dev.id, "expiryTime": in_hours(1) } }),
        )
        .await;
    assert_eq!(status, 201, "{mine}");
    assert_eq!(api.get(&format!("/api/v1/api-keys/{id}")).await.0, 200);
    assert_eq!(
        api.post(&format!("/api/v1/api-keys/{id}/disable"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        api.post(&format!("/api/v1/api-keys/{id}/enable"), json!({}))
            .await
            .0,
        200
    );
    let (status, rotated) = api
        .post(&format!("/api/v1/api-keys/{id}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(
        api.get(&format!("/api/v1/api-keys/{id}/usage")).await.0,
        200
    );
    let (status, list) = api.get("/api/v1/api-keys").await;
    assert_eq!(status, 200);
    let owners: Vec<&str> = list["apiKeys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["spec"]["ownerId"].as_str().unwrap())
        .collect();
    assert_eq!(owners.len(), 3, "the fixture key and the two created");
    assert!(owners.iter().all(|o| *o == dev.id), "only own keys listed");
    let (status, list) = api
        .get(&format!("/api/v1/api-keys?ownerId={}", dev.id))
        .await;
    assert_eq!(
        (status, list["apiKeys"].as_array().unwrap().len()),
        (200, 3)
    );
    let (status, ns) = api.get("/api/v1/namespaces").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = ns["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders"], "only namespaces they have access to");
    assert_eq!(api.get("/api/v1/namespaces/orders").await.0, 200);
    assert_eq!(api.delete(&format!("/api/v1/api-keys/{id}")).await.0, 200);
    let _ = token;

    // Refused: everything else.
    let refusals = [
        api.get("/api/v1/users").await,
        api.get(&format!("/api/v1/users/{}", other.id)).await,
        api.post("/api/v1/users", json!({ "spec": { "email": "x@example.com" } }))
            .await,
        api.put(
            &format!("/api/v1/users/{}", dev.id),
            json!({ "resourceVersion": "1", "spec": { "access": { "accountAccess": { "role": "admin" } } } }),
        )
        .await,
        api.delete(&format!("/api/v1/users/{}", other.id)).await,
        api.get("/api/v1/service-accounts").await,
        api.post("/api/v1/service-accounts", json!({ "spec": { "name": "mine" } }))
            .await,
        api.get(&format!("/api/v1/service-accounts/{sa}")).await,
        api.post("/api/v1/namespaces", json!({ "spec": { "name": "new" } }))
            .await,
        api.delete("/api/v1/namespaces/orders").await,
        api.get("/api/v1/namespaces/billing").await,
        api.put(
            "/api/v1/namespaces/orders",
            json!({ "resourceVersion": "1", "spec": { "description": "x" } }),
        )
        .await,
        api.put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": "1", "spec": { "maxKeysPerOwner": 100 } }),
        )
        .await,
        api.get("/api/v1/audit-events").await,
        api.get(&format!("/api/v1/api-keys?ownerId={}", other.id)).await,
        api.get(&format!("/api/v1/api-keys/{other_key}")).await,
        api.post(&format!("/api/v1/api-keys/{other_key}/disable"), json!({}))
            .await,
        api.post(&format!("/api/v1/api-keys/{other_key}/rotate"), json!({}))
            .await,
        api.put(
            &format!("/api/v1/api-keys/{other_key}"),
            json!({ "resourceVersion": "1", "spec": { "description": "x" } }),
        )
        .await,
        api.get(&format!("/api/v1/api-keys/{other_key}/usage")).await,
        api.delete(&format!("/api/v1/api-keys/{other_key}")).await,
        api.try_create_key(&mut json!({ "ownerId": other.id })).await,
        api.try_create_key(&mut json!({ "ownerId": sa })).await,
        api.try_create_key(&mut json!({ "ownerId": sa, "ownerType": "service-account" }))
            .await,
        // An owner that does not exist gets the same answer, so that the
        // refusal does not tell which ids exist.
        api.try_create_key(&mut json!({ "ownerId": "nosuchprincipal0" }))
            .await,
        // Outside their own access.
        api.try_create_key(&mut json!({ "namespaces": ["billing"] })).await,
    ];
    for (i, (status, body)) in refusals.iter().enumerate() {
        assert_eq!(*status, 403, "refusal #{i}: {body}");
        assert_eq!(code(body), "forbidden", "refusal #{i}");
    }
    // Nothing happened to the other user's key.
    assert_eq!(
        admin.get(&format!("/api/v1/api-keys/{other_key}")).await.1["state"],
        "active"
    );
    gate.stop().await;
}

#[tokio::test]
async fn scoped_keys_cannot_mint_broader_keys() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    let dev = admin.create_user("dev@example.com", "developer", &[]).await;
    admin.create_namespace("orders").await;
    admin.create_namespace("billing").await;
    let (_, user) = admin.get(&format!("/api/v1/users/{dev}")).await;
    let (status, _) = admin
        .put(
            &format!("/api/v1/users/{dev}"),
            json!({ "resourceVersion": user["resourceVersion"], "spec": { "access": {
                "accountAccess": { "role": "developer" },
                "namespaceAccesses": { "orders": { "permission": "write" }, "billing": { "permission": "read" } } } } }),
        )
        .await;
    assert_eq!(status, 200);
    let (_, scoped) = admin
        .create_key(json!({ "ownerId": dev, "namespaces": ["orders"] }))
        .await;
    let api = admin.as_key(&scoped);
    api.create_key(json!({ "namespaces": ["orders"] })).await;
    let (status, body) = api.try_create_key(&mut json!({})).await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    let (status, body) = api
        .try_create_key(&mut json!({ "namespaces": ["billing"] }))
        .await;
    assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    // An admin creating a key for someone must keep it in their access.
    let (status, body) = admin
        .try_create_key(&mut json!({ "ownerId": dev, "namespaces": ["nope"] }))
        .await;
    assert_eq!(status, 422, "{body}");
    gate.stop().await;
}

/// A key scoped to namespaces acts only within them, even an account
/// admin's (as Temporal Cloud's and Confluent Cloud's scoped keys): it is
/// no account admin, mints no broader key, and sees no other namespace.
#[tokio::test]
async fn an_admins_namespace_scoped_key_acts_only_within_its_namespaces() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    admin.create_namespace("orders").await;
    admin.create_namespace("billing").await;
    let dev = admin
        .create_user("dev@example.com", "developer", &[("orders", "write")])
        .await;
    let sa = admin.create_service_account("bot", "read", &[]).await;
    let (dev_key, _) = admin.create_key(json!({ "ownerId": dev })).await;
    let (_, scoped) = admin.create_key(json!({ "namespaces": ["orders"] })).await;
    let api = admin.as_key(&scoped);
    let (_, me) = api.get("/api/v1/api-keys").await;
    let admin_id = me["apiKeys"][0]["spec"]["ownerId"]
        .as_str()
        .unwrap()
        .to_string();

    // Allowed: within the scope, and what every caller may do.
    let (own_key, _) = api.create_key(json!({ "namespaces": ["orders"] })).await;
    assert_eq!(api.get(&format!("/api/v1/api-keys/{own_key}")).await.0, 200);
    assert_eq!(api.get(&format!("/api/v1/users/{admin_id}")).await.0, 200);
    assert_eq!(api.get("/api/v1/account/settings").await.0, 200);
    assert_eq!(api.get("/api/v1/namespaces/orders").await.0, 200);
    let (status, body) = api
        .put(
            "/api/v1/namespaces/orders",
            json!({ "resourceVersion": "1", "spec": { "description": "ours" } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, list) = api.get("/api/v1/namespaces").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders"], "{list}");
    let (status, keys) = api.get("/api/v1/api-keys").await;
    assert_eq!(status, 200);
    assert!(
        keys["apiKeys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["spec"]["ownerId"] == admin_id.as_str()),
        "only its owner's keys: {keys}"
    );

    // Refused: account-wide resources, other namespaces, broader keys.
    let refusals = [
        api.try_create_key(&mut json!({})).await,
        api.try_create_key(&mut json!({ "namespaces": ["billing"] }))
            .await,
        api.try_create_key(&mut json!({ "namespaces": ["orders", "billing"] }))
            .await,
        api.try_create_key(&mut json!({ "ownerId": dev, "namespaces": ["orders"] }))
            .await,
        api.try_create_key(&mut json!({ "ownerId": sa, "namespaces": ["orders"] }))
            .await,
        api.post(
            "/api/v1/users",
            json!({ "spec": { "email": "x@example.com", "access": {
                "accountAccess": { "role": "admin" } } } }),
        )
        .await,
        api.get("/api/v1/users").await,
        api.get(&format!("/api/v1/users/{dev}")).await,
        api.put(
            &format!("/api/v1/users/{dev}"),
            json!({ "resourceVersion": "1", "spec": { "access": {
                "accountAccess": { "role": "admin" } } } }),
        )
        .await,
        api.delete(&format!("/api/v1/users/{dev}")).await,
        api.get("/api/v1/service-accounts").await,
        api.post(
            "/api/v1/service-accounts",
            json!({ "spec": { "name": "mine" } }),
        )
        .await,
        api.delete(&format!("/api/v1/service-accounts/{sa}")).await,
        api.put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": "1", "spec": { "maxKeysPerOwner": 100 } }),
        )
        .await,
        api.get("/api/v1/audit-events").await,
        api.get("/api/v1/namespaces/billing").await,
        api.put(
            "/api/v1/namespaces/billing",
            json!({ "resourceVersion": "1", "spec": { "description": "x" } }),
        )
        .await,
        api.delete("/api/v1/namespaces/billing").await,
        api.post("/api/v1/namespaces", json!({ "spec": { "name": "new" } }))
            .await,
        api.get(&format!("/api/v1/api-keys?ownerId={dev}")).await,
        api.get(&format!("/api/v1/api-keys/{dev_key}")).await,
        api.post(&format!("/api/v1/api-keys/{dev_key}/disable"), json!({}))
            .await,
        api.delete(&format!("/api/v1/api-keys/{dev_key}")).await,
    ];
    for (i, (status, body)) in refusals.iter().enumerate() {
        assert_eq!(*status, 403, "refusal #{i}: {body}");
        assert_eq!(code(body), "forbidden", "refusal #{i}");
    }
    let (_, users) = admin.get("/api/v1/users").await;
    assert_eq!(users["users"].as_array().unwrap().len(), 2, "{users}");
    assert_eq!(admin.get("/api/v1/namespaces/billing").await.0, 200);
    assert_eq!(
        admin.get(&format!("/api/v1/api-keys/{dev_key}")).await.1["state"],
        "active"
    );
    // With API keys switched off, only an admin's unscoped key still works
    // here (to switch them back on); a scoped one could not.
    let (_, settings) = admin.get("/api/v1/account/settings").await;
    let (status, _) = admin
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "apiKeysEnabled": false } }),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = api.get("/api/v1/namespaces/orders").await;
    assert_eq!((status, code(&body)), (401, "api_keys_disabled"), "{body}");
    let (_, settings) = admin.get("/api/v1/account/settings").await;
    let (status, _) = admin
        .put(
            "/api/v1/account/settings",
            json!({ "resourceVersion": settings["resourceVersion"], "spec": { "apiKeysEnabled": true } }),
        )
        .await;
    assert_eq!(status, 200);
    // A namespace of its scope is its owner's to delete.
    assert_eq!(api.delete("/api/v1/namespaces/orders").await.0, 200);
    gate.stop().await;
}

/// A non-admin's namespace listing is filtered before it is paged: every
/// page but the last is full, and no page token is the id of a namespace
/// the caller cannot see.
#[tokio::test]
async fn a_developers_namespace_pages_are_full_and_reveal_nothing() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    for name in ["n1", "n2", "n3", "n4", "n5", "n6"] {
        admin.create_namespace(name).await;
    }
    let dev = admin
        .create_user(
            "dev@example.com",
            "developer",
            &[("n2", "read"), ("n5", "write")],
        )
        .await;
    let (_, token) = admin.create_key(json!({ "ownerId": dev })).await;
    let api = admin.as_key(&token);
    let mut seen = Vec::new();
    let mut page_token = String::new();
    for _ in 0..10 {
        let (status, page) = api
            .get(&format!(
                "/api/v1/namespaces?pageSize=1&pageToken={page_token}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let items = page["namespaces"].as_array().unwrap();
        assert_eq!(items.len(), 1, "a full page: {page}");
        seen.push(items[0]["spec"]["name"].as_str().unwrap().to_string());
        page_token = page["nextPageToken"].as_str().unwrap().to_string();
        if page_token.is_empty() {
            break;
        }
        assert_eq!(page_token, items[0]["id"].as_str().unwrap(), "{page}");
    }
    seen.sort();
    assert_eq!(seen, ["n2", "n5"]);
    // Scoped to one of the two: that one alone.
    let (_, scoped) = admin
        .create_key(json!({ "ownerId": dev, "namespaces": ["n5"] }))
        .await;
    let (_, page) = api.as_key(&scoped).get("/api/v1/namespaces").await;
    let names: Vec<&str> = page["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!((names, &page["nextPageToken"]), (vec!["n5"], &json!("")));
    gate.stop().await;
}

#[tokio::test]
async fn a_read_user_still_manages_their_own_keys() {
    let gate = Gate::builder().start().await;
    let reader = gate.user("r@example.com", AccountRole::Read, &[]).await;
    let (_, token) = gate.key_for(&reader).await;
    let api = Api::new(&gate, &token);
    let (id, _) = api.create_key(json!({})).await;
    assert_eq!(api.delete(&format!("/api/v1/api-keys/{id}")).await.0, 200);
    assert_eq!(
        api.post("/api/v1/namespaces", json!({ "spec": { "name": "x" } }))
            .await
            .0,
        403
    );
    gate.stop().await;
}

#[tokio::test]
async fn service_account_keys_carry_the_service_accounts_access() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);

    // The admin creates a read-only service account and a key for it: the
    // key acts as the service account, not as the admin who created it.
    let bot = admin.create_service_account("bot", "read", &[]).await;
    let (bot_key, bot_token) = admin.create_key(json!({ "ownerId": bot })).await;
    let (_, key) = admin.get(&format!("/api/v1/api-keys/{bot_key}")).await;
    assert_eq!(key["spec"]["ownerType"], "service-account");
    let as_bot = admin.as_key(&bot_token);
    let (status, body) = as_bot
        .post(
            "/api/v1/users",
            json!({ "spec": { "email": "x@example.com" } }),
        )
        .await;
    assert_eq!((status, code(&body)), (403, "forbidden"));
    let (status, body) = as_bot.try_create_key(&mut json!({})).await;
    assert_eq!(
        (status, code(&body)),
        (403, "forbidden"),
        "only admins create service-account keys: {body}"
    );
    // It may read and manage its own keys.
    assert_eq!(
        as_bot
            .get(&format!("/api/v1/service-accounts/{bot}"))
            .await
            .0,
        200
    );
    let (status, list) = as_bot.get("/api/v1/api-keys").await;
    assert_eq!(
        (status, list["apiKeys"].as_array().unwrap().len()),
        (200, 1)
    );
    let (status, _) = as_bot
        .post(&format!("/api/v1/api-keys/{bot_key}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200);

    // A service account with the admin role is an account admin.
    let ops = admin.create_service_account("ops", "admin", &[]).await;
    let (_, ops_token) = admin.create_key(json!({ "ownerId": ops })).await;
    let as_ops = admin.as_key(&ops_token);
    as_ops
        .create_user("made-by-ops@example.com", "read", &[])
        .await;
    let (_, log) = admin.get("/api/v1/audit-events?pageSize=1").await;
    assert_eq!(log["auditEvents"][0]["actor"]["type"], "service-account");
    assert_eq!(log["auditEvents"][0]["actor"]["name"], "ops");

    // Demoting the service account takes effect on its next call.
    let (_, ops_sa) = admin.get(&format!("/api/v1/service-accounts/{ops}")).await;
    let (status, _) = admin
        .put(
            &format!("/api/v1/service-accounts/{ops}"),
            json!({ "resourceVersion": ops_sa["resourceVersion"], "spec": { "access": {
                "accountAccess": { "role": "developer" } } } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(as_ops.get("/api/v1/users").await.0, 403);
    gate.stop().await;
}

#[tokio::test]
async fn namespace_admins_edit_their_namespace() {
    let gate = Gate::builder().start().await;
    let ns_admin = gate
        .user(
            "nsa@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Admin)],
        )
        .await;
    let writer = gate
        .user(
            "w@example.com",
            AccountRole::Developer,
            &[("orders", Permission::Write)],
        )
        .await;
    let (_, a) = gate.key_for(&ns_admin).await;
    let (_, w) = gate.key_for(&writer).await;
    let body = json!({ "resourceVersion": "1", "spec": { "description": "mine" } });
    let (status, answer) = Api::new(&gate, &a)
        .put("/api/v1/namespaces/orders", body.clone())
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, _) = Api::new(&gate, &w)
        .put("/api/v1/namespaces/orders", body)
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        Api::new(&gate, &w)
            .delete("/api/v1/namespaces/orders")
            .await
            .0,
        403
    );
    gate.stop().await;
}

/// A gate whose `/orders` route is in namespace `orders` (created), and the
/// admin's API client.
async fn orders_route() -> (Gate, Api) {
    let upstream = echo_upstream().await;
    let gate = Gate::builder()
        .upstream(upstream)
        .extra(&format!(
            "[[routes]]\npath_prefix = \"/orders\"\nupstream = \"http://{upstream}\"\nnamespace = \"orders\"\n"
        ))
        .start()
        .await;
    let admin = Api::new(&gate, &gate.admin_token);
    admin.create_namespace("orders").await;
    (gate, admin)
}

/// SPEC section 2 step 3 with the same access model: a route naming a
/// namespace needs the key's scope and its owner's permission.
#[tokio::test]
async fn namespaced_proxy_routes_use_the_same_access() {
    let (gate, admin) = orders_route().await;
    admin.create_namespace("billing").await;
    let reader = admin
        .create_service_account("reader", "read", &[("orders", "read")])
        .await;
    let (_, r) = admin.create_key(json!({ "ownerId": reader })).await;
    assert_eq!(proxy_get(&gate, "/orders/1", &r).await.0, 200);
    assert_eq!(
        proxy_call(&gate, Method::POST, "/orders/1", &r).await,
        (403, "forbidden".into())
    );
    // Granting write through the API takes effect at once.
    let (_, sa) = admin
        .get(&format!("/api/v1/service-accounts/{reader}"))
        .await;
    let (status, _) = admin
        .put(
            &format!("/api/v1/service-accounts/{reader}"),
            json!({ "resourceVersion": sa["resourceVersion"], "spec": { "access": {
                "accountAccess": { "role": "read" },
                "namespaceAccesses": { "orders": { "permission": "write" } } } } }),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        proxy_call(&gate, Method::POST, "/orders/1", &r).await.0,
        200
    );
    // A key scoped to another namespace is refused on this route.
    let (_, scoped) = admin.create_key(json!({ "namespaces": ["billing"] })).await;
    assert_eq!(
        proxy_get(&gate, "/orders/1", &scoped).await,
        (403, "forbidden".into())
    );
    gate.stop().await;
}

#[tokio::test]
async fn deleting_a_namespace_revokes_its_grants_on_the_proxy_at_once() {
    let (gate, admin) = orders_route().await;
    let writer = admin
        .create_service_account("writer", "read", &[("orders", "write")])
        .await;
    let (_, token) = admin.create_key(json!({ "ownerId": writer })).await;
    assert_eq!(
        proxy_call(&gate, Method::POST, "/orders/1", &token).await.0,
        200
    );
    let (status, body) = admin.delete("/api/v1/namespaces/orders").await;
    assert_eq!(status, 200, "{body}");
    // The key was cached with its owner's grant: refused at once all the same.
    assert_eq!(
        proxy_get(&gate, "/orders/1", &token).await,
        (403, "forbidden".into())
    );
    // A namespace of the same name made later does not bring the grant back.
    admin.create_namespace("orders").await;
    assert_eq!(
        proxy_get(&gate, "/orders/1", &token).await,
        (403, "forbidden".into())
    );
    let (_, sa) = admin
        .get(&format!("/api/v1/service-accounts/{writer}"))
        .await;
    assert_eq!(sa["spec"]["access"]["namespaceAccesses"], json!({}), "{sa}");
    gate.stop().await;
}

/// A scoped key changes only keys within its own scope: rotating its
/// owner's unscoped key would hand it that key's new secret (a broader key
/// than it may mint), and enabling, disabling or deleting one reaches past
/// its scope as well. Reading them stays allowed.
#[tokio::test]
async fn a_scoped_key_cannot_rotate_or_change_its_owners_broader_keys() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    admin.create_namespace("orders").await;
    admin.create_namespace("billing").await;
    let dev = admin
        .create_user(
            "dev@example.com",
            "developer",
            &[("orders", "write"), ("billing", "read")],
        )
        .await;
    let (unscoped, _) = admin.create_key(json!({ "ownerId": dev })).await;
    let (wider, _) = admin
        .create_key(json!({ "ownerId": dev, "namespaces": ["orders", "billing"] }))
        .await;
    let (_, scoped) = admin
        .create_key(json!({ "ownerId": dev, "namespaces": ["orders"] }))
        .await;
    let api = admin.as_key(&scoped);
    for target in [&unscoped, &wider] {
        let refusals = [
            api.post(&format!("/api/v1/api-keys/{target}/rotate"), json!({}))
                .await,
            api.post(&format!("/api/v1/api-keys/{target}/disable"), json!({}))
                .await,
            api.post(&format!("/api/v1/api-keys/{target}/enable"), json!({}))
                .await,
            api.put(
                &format!("/api/v1/api-keys/{target}"),
                json!({ "resourceVersion": "1", "spec": { "description": "x" } }),
            )
            .await,
            api.delete(&format!("/api/v1/api-keys/{target}")).await,
        ];
        for (i, (status, body)) in refusals.iter().enumerate() {
            assert_eq!(*status, 403, "refusal #{i} on {target}: {body}");
            assert_eq!(code(body), "forbidden", "refusal #{i}");
            assert!(body.get("token").is_none(), "{body}");
        }
        assert_eq!(api.get(&format!("/api/v1/api-keys/{target}")).await.0, 200);
        let (_, key) = admin.get(&format!("/api/v1/api-keys/{target}")).await;
        assert_eq!(key["resourceVersion"], "1", "unchanged: {key}");
    }
    // Its own scope's keys, itself included, it still manages.
    let (own, _) = api.create_key(json!({ "namespaces": ["orders"] })).await;
    let (status, body) = api
        .post(&format!("/api/v1/api-keys/{own}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(api.delete(&format!("/api/v1/api-keys/{own}")).await.0, 200);
    // An unscoped key of the same owner changes them all.
    let (_, full) = admin.create_key(json!({ "ownerId": dev })).await;
    let (status, body) = admin
        .as_key(&full)
        .post(&format!("/api/v1/api-keys/{unscoped}/rotate"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    gate.stop().await;
}

/// The secret a rotation replaced keeps working through the grace period
/// so that clients can switch over, but on the admin API it only reads:
/// with it, a leaked secret's holder could rotate the key again (cutting
/// the new secret off at once), mint another key of the owner and so
/// outlive the grace meant to retire it, disable or delete the key, or
/// act as the admin its owner is.
#[tokio::test]
async fn a_rotated_out_secret_may_only_read() {
    let gate = Gate::builder()
        .upstream(echo_upstream().await)
        .start()
        .await;
    let admin = Api::new(&gate, &gate.admin_token);
    let sa = gate
        .principal(
            keygate::store::OwnerType::ServiceAccount,
            "bot",
            AccountRole::Developer,
            &[],
        )
        .await;
    let dev = gate
        .user("dev@example.com", AccountRole::Developer, &[])
        .await;
    let boss = gate.user("boss@example.com", AccountRole::Admin, &[]).await;
    for owner in [&sa, &dev, &boss] {
        let (id, old) = gate.key_for(owner).await;
        let (other, _) = gate.key_for(owner).await;
        let (status, rotated) = admin
            .post(
                &format!("/api/v1/api-keys/{id}/rotate"),
                json!({ "gracePeriod": "1h" }),
            )
            .await;
        assert_eq!(status, 200, "{rotated}");
        let new = rotated["token"].as_str().unwrap().to_string();
        let version = rotated["apiKey"]["resourceVersion"].clone();
        let api = admin.as_key(&old);
        // Still good for reads within the grace period, and on the proxy.
        assert_eq!(api.get(&format!("/api/v1/api-keys/{id}")).await.0, 200);
        assert_eq!(proxy_get(&gate, "/", &old).await.0, 200);
        let refusals = [
            api.post(
                &format!("/api/v1/api-keys/{id}/rotate"),
                json!({ "gracePeriod": "0s" }),
            )
            .await,
            api.post(&format!("/api/v1/api-keys/{other}/rotate"), json!({}))
                .await,
            api.try_create_key(&mut json!({})).await,
            // Cutting off the new secret, or taking the key away.
            api.post(&format!("/api/v1/api-keys/{id}/disable"), json!({}))
                .await,
            api.put(
                &format!("/api/v1/api-keys/{id}"),
                json!({ "resourceVersion": version, "spec": { "displayName": "mine now" } }),
            )
            .await,
            api.delete(&format!("/api/v1/api-keys/{id}")).await,
            api.delete(&format!("/api/v1/api-keys/{other}")).await,
            // An admin's old secret administers nothing.
            api.post(
                "/api/v1/users",
                json!({ "spec": { "email": "new@example.com", "access": { "accountAccess": { "role": "admin" } } } }),
            )
            .await,
        ];
        forbidden_saying(&refusals, "rotated out");
        // Nothing changed: the key is enabled, named as before, and both
        // secrets still work until the grace ends.
        let (status, key) = admin.get(&format!("/api/v1/api-keys/{id}")).await;
        assert_eq!(status, 200, "{key}");
        assert_eq!(key["resourceVersion"], version, "{key}");
        assert_eq!(proxy_get(&gate, "/", &new).await.0, 200);
        assert_eq!(admin.get(&format!("/api/v1/api-keys/{other}")).await.0, 200);
        // The new secret is untouched and may rotate.
        let (status, body) = admin
            .as_key(&new)
            .post(&format!("/api/v1/api-keys/{id}/rotate"), json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, users) = admin.get("/api/v1/users").await;
    assert_eq!(status, 200);
    assert!(!users.to_string().contains("new@example.com"), "{users}");
    gate.stop().await;
}

/// An account admin's disable of someone else's key holds against its
/// owner: the owner may still read, edit and delete the key, but not
/// enable it (403), whether by `:enable` or by `PUT` with `disabled:
/// false`; an admin may. The owner's own disable holds nothing. Before,
/// the owner could undo the admin's decision at once.
#[tokio::test]
async fn an_admins_disable_is_not_undone_by_the_owner() {
    let gate = Gate::builder().start().await;
    let admin = Api::new(&gate, &gate.admin_token);
    let dev = gate
        .user("dev@example.com", AccountRole::Developer, &[])
        .await;
    let (held, _) = gate.key_for(&dev).await;
    let (_, dev_token) = gate.key_for(&dev).await;
    let api = admin.as_key(&dev_token);
    let (status, body) = admin
        .post(&format!("/api/v1/api-keys/{held}/disable"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let version = |key: &serde_json::Value| key["resourceVersion"].clone();
    let (_, current) = api.get(&format!("/api/v1/api-keys/{held}")).await;
    let refusals = [
        api.post(&format!("/api/v1/api-keys/{held}/enable"), json!({}))
            .await,
        api.put(
            &format!("/api/v1/api-keys/{held}"),
            json!({ "resourceVersion": version(&current), "spec": { "disabled": false } }),
        )
        .await,
    ];
    forbidden_saying(&refusals, "disabled by an account admin");
    // Editing is still the owner's, and leaves the key disabled.
    let (status, edited) = api
        .put(
            &format!("/api/v1/api-keys/{held}"),
            json!({ "resourceVersion": version(&current), "spec": { "description": "why?" } }),
        )
        .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["state"], "disabled", "{edited}");
    // An admin lifts it; the owner's own disable and enable then work.
    let (status, body) = admin
        .post(&format!("/api/v1/api-keys/{held}/enable"), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    for action in ["disable", "enable"] {
        let (status, body) = api
            .post(&format!("/api/v1/api-keys/{held}/{action}"), json!({}))
            .await;
        assert_eq!(status, 200, "{action}: {body}");
    }
    assert_eq!(
        admin.get(&format!("/api/v1/api-keys/{held}")).await.1["state"],
        "active"
    );
    gate.stop().await;
}

/// Each answer is `403 forbidden` with a message holding `why`.
fn forbidden_saying(refusals: &[(u16, serde_json::Value)], why: &str) {
    for (i, (status, body)) in refusals.iter().enumerate() {
        assert_eq!(*status, 403, "refusal #{i}: {body}");
        assert_eq!(code(body), "forbidden", "refusal #{i}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "refusal #{i}: {body}");
    }
}
