//! Keeps `/api/v1/openapi.json` true: its paths are the router's paths, each
//! documented method is routed and each undocumented one is not, and real
//! responses match the documented schemas (every field documented, every
//! required field present, types right).

mod admin_common;
mod support;

use std::collections::BTreeSet;

use admin_common::Api;
use reqwest::Method;
use serde_json::{json, Value};
use support::{echo_upstream, Gate};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

#[tokio::test]
async fn document_matches_the_router() {
    let gate = Gate::builder().start().await;
    let (status, doc) = Api::anonymous(&gate).get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let documented: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let routed: BTreeSet<&str> = keygate::admin::api_paths().into_iter().collect();
    assert_eq!(documented, routed, "documented paths vs router paths");

    // Every method: documented ones are routed (an anonymous call gets 401,
    // or 200 for the document), undocumented ones get 405.
    let anon = reqwest::Client::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let url = gate.admin_url(&path.replace("{id}", "someid"));
        for m in METHODS {
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let status = anon.request(method, &url).send().await.unwrap().status();
            match item.get(m) {
                Some(op) => {
                    let public = op["security"] == json!([]);
                    let expected = if public { 200 } else { 401 };
                    assert_eq!(status, expected, "{m} {path} is documented");
                    assert!(op["operationId"].is_string(), "{m} {path}");
                    for (_, response) in op["responses"].as_object().unwrap() {
                        if let Some(r) =
                            response["content"]["application/json"]["schema"]["$ref"].as_str()
                        {
                            assert!(resolve(&doc, r).is_some(), "{m} {path}: {r} is defined");
                        }
                    }
                    if let Some(r) =
                        op["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
                    {
                        assert!(resolve(&doc, r).is_some(), "{m} {path}: {r} is defined");
                    }
                }
                None => assert_eq!(status, 405, "{m} {path} is not documented"),
            }
        }
    }
    gate.stop().await;
}

#[tokio::test]
async fn responses_match_the_schemas() {
    let gate = Gate::builder()
        .upstream(echo_upstream().await)
        .start()
        .await;
    let api = Api::new(&gate, &gate.admin_token);
    let (_, doc) = api.get("/api/v1/openapi.json").await;
    let check = |schema: &str, value: &Value| {
        let mut errors = Vec::new();
        validate(
            &doc,
            &json!({ "$ref": format!("#/components/schemas/{schema}") }),
            value,
            schema,
            &mut errors,
        );
        assert!(errors.is_empty(), "{schema}: {errors:?}\n{value:#}");
    };

    api.create_namespace("orders").await;
    let (_, ns) = api.get("/api/v1/namespaces/orders").await;
    check("Namespace", &ns);
    check("NamespaceList", &api.get("/api/v1/namespaces").await.1);
    let user = api
        .create_user("u@example.com", "developer", &[("orders", "write")])
        .await;
    check("User", &api.get(&format!("/api/v1/users/{user}")).await.1);
    check("UserList", &api.get("/api/v1/users?pageSize=1").await.1);
    let sa = api.create_service_account("bot", "read", &[]).await;
    check(
        "ServiceAccount",
        &api.get(&format!("/api/v1/service-accounts/{sa}")).await.1,
    );
    check(
        "ServiceAccountList",
        &api.get("/api/v1/service-accounts").await.1,
    );
    let (status, created) = api
        .post(
            "/api/v1/api-keys",
            json!({ "spec": { "displayName": "k", "ownerId": user, "namespaces": ["orders"],
                "expiryTime": admin_common::in_hours(1) } }),
        )
        .await;
    assert_eq!(status, 201);
    check("IssuedApiKey", &created);
    let id = created["apiKey"]["id"].as_str().unwrap();
    let (_, rotated) = api
        .post(&format!("/api/v1/api-keys/{id}/rotate"), json!({}))
        .await;
    check("IssuedApiKey", &rotated);
    check(
        "ApiKey",
        &api.get(&format!("/api/v1/api-keys/{id}")).await.1,
    );
    check(
        "ApiKey",
        &api.post(&format!("/api/v1/api-keys/{id}/disable"), json!({}))
            .await
            .1,
    );
    check("ApiKeyList", &api.get("/api/v1/api-keys").await.1);
    check(
        "ApiKeyUsage",
        &api.get(&format!("/api/v1/api-keys/{id}/usage")).await.1,
    );
    check(
        "AccountSettings",
        &api.get("/api/v1/account/settings").await.1,
    );
    check("AuditEventList", &api.get("/api/v1/audit-events").await.1);
    check("Error", &api.get("/api/v1/users/nope").await.1);
    check(
        "Empty",
        &api.delete(&format!("/api/v1/api-keys/{id}")).await.1,
    );
    check(
        "DeletePrincipalResponse",
        &api.delete(&format!("/api/v1/service-accounts/{sa}"))
            .await
            .1,
    );
    gate.stop().await;
}

fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// A small JSON Schema check, enough for the document's own vocabulary:
/// `$ref`, `type` (one or a list), `enum`, `properties`, `required`,
/// `additionalProperties` (false or a schema), `items`.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        match resolve(doc, r) {
            Some(s) => validate(doc, s, value, at, errors),
            None => errors.push(format!("{at}: unresolved {r}")),
        }
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    // An integer is also a JSON Schema number.
    let fits = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
    if !types.is_empty() && !fits {
        errors.push(format!("{at}: {actual}, documented {types:?}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} not in {allowed:?}"));
        }
    }
    if let Value::Object(map) = value {
        let props = schema["properties"].as_object();
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !map.contains_key(name) {
                errors.push(format!("{at}: required {name} missing"));
            }
        }
        for (k, v) in map {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, v, &format!("{at}.{k}"), errors),
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => errors.push(format!("{at}: {k} is not documented")),
                    s @ Value::Object(_) => validate(doc, s, v, &format!("{at}.{k}"), errors),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(doc, item_schema, v, &format!("{at}[{i}]"), errors);
        }
    }
}
