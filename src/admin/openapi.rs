//! The OpenAPI 3.1 document of the admin API, served at
//! `/api/v1/openapi.json`. Hand-written, and kept true by
//! `tests/admin_openapi.rs`, which checks its paths and methods against the
//! router and real responses against its schemas.

use serde_json::{json, Map, Value};

use super::resource::{MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS};

/// The whole document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "keygate admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Manage the users, service accounts, namespaces and API keys of a keygate \
                proxy, in the resource shape of the Temporal Cloud Ops API. Authenticate with an API \
                key, as on the proxy. Errors are {\"error\":{\"code\",\"message\"}}.",
        },
        "security": [{ "bearer": [] }, { "apiKeyHeader": [] }, { "basic": [] }],
        "paths": paths(),
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "bearerFormat": "keygate API key" },
                "basic": { "type": "http", "scheme": "basic", "description": "key id as user name, the rest of the token as password" },
                "apiKeyHeader": { "type": "apiKey", "in": "header", "name": "x-api-key" },
            },
            "schemas": schemas(),
        },
    })
}

fn paths() -> Value {
    let mut p = Map::new();
    principal_paths(&mut p, "users", "User", "Users");
    principal_paths(
        &mut p,
        "service-accounts",
        "ServiceAccount",
        "Service Accounts",
    );
    p.insert(
        "/api/v1/namespaces".into(),
        json!({
            "get": list_op("listNamespaces", "List the namespaces you have access to", "Namespaces", "NamespaceList", &[]),
            "post": body_op("createNamespace", "Create a namespace (admins)", "Namespaces", "CreateNamespaceRequest", "201", "Namespace", false),
        }),
    );
    p.insert(
        "/api/v1/namespaces/{id}".into(),
        json!({
            "parameters": [path_param("id", "the namespace's id or name")],
            "get": op("getNamespace", "Get a namespace", "Namespaces", "Namespace"),
            "put": body_op("updateNamespace", "Update a namespace's description", "Namespaces", "UpdateNamespaceRequest", "200", "Namespace", false),
            "delete": op("deleteNamespace", "Delete a namespace (admins)", "Namespaces", "Empty"),
        }),
    );
    p.insert(
        "/api/v1/namespaces/{id}/update".into(),
        json!({
            "parameters": [path_param("id", "the namespace's id or name")],
            "post": body_op("updateNamespacePost", "Update a namespace's description (same as PUT)", "Namespaces", "UpdateNamespaceRequest", "200", "Namespace", false),
        }),
    );
    p.insert(
        "/api/v1/api-keys".into(),
        json!({
            "get": list_op("listApiKeys", "List API keys (yours; admins: everyone's)", "API Keys", "ApiKeyList", &[
                query_param("ownerId", "only keys of this owner", json!({ "type": "string" })),
                query_param("ownerType", "only keys of this owner type", json!({ "type": "string", "enum": ["user", "service-account"] })),
            ]),
            "post": body_op("createApiKey", "Create an API key; the token is in this response only", "API Keys", "CreateApiKeyRequest", "201", "IssuedApiKey", false),
        }),
    );
    let key_id = path_param("id", "the key id");
    p.insert(
        "/api/v1/api-keys/{id}".into(),
        json!({
            "parameters": [key_id],
            "get": op("getApiKey", "Get an API key", "API Keys", "ApiKey"),
            "put": body_op("updateApiKey", "Edit an API key's display name, description or disabled flag", "API Keys", "UpdateApiKeyRequest", "200", "ApiKey", false),
            "delete": op("deleteApiKey", "Delete an API key", "API Keys", "Empty"),
        }),
    );
    p.insert(
        "/api/v1/api-keys/{id}/update".into(),
        json!({
            "parameters": [key_id],
            "post": body_op("updateApiKeyPost", "Edit an API key (same as PUT)", "API Keys", "UpdateApiKeyRequest", "200", "ApiKey", false),
        }),
    );
    for (action, summary) in [
        ("enable", "Enable an API key"),
        (
            "disable",
            "Disable an API key; it fails on the proxy at once",
        ),
    ] {
        p.insert(
            format!("/api/v1/api-keys/{{id}}/{action}"),
            json!({
                "parameters": [key_id],
                "post": body_op(&format!("{action}ApiKey"), summary, "API Keys", "ApiKeyStateRequest", "200", "ApiKey", true),
            }),
        );
    }
    p.insert(
        "/api/v1/api-keys/{id}/rotate".into(),
        json!({
            "parameters": [key_id],
            "post": body_op("rotateApiKey", "Issue a new secret; the old one works until the grace period ends", "API Keys", "RotateApiKeyRequest", "200", "IssuedApiKey", true),
        }),
    );
    p.insert(
        "/api/v1/api-keys/{id}/usage".into(),
        json!({
            "parameters": [key_id],
            "get": op("getApiKeyUsage", "Request count and last use of an API key", "API Keys", "ApiKeyUsage"),
        }),
    );
    let settings_update = body_op(
        "updateAccountSettings",
        "Change the account settings (admins)",
        "Account",
        "UpdateAccountSettingsRequest",
        "200",
        "AccountSettings",
        false,
    );
    p.insert(
        "/api/v1/account/settings".into(),
        json!({
            "get": op("getAccountSettings", "Get the account settings", "Account", "AccountSettings"),
            "put": settings_update,
        }),
    );
    p.insert(
        "/api/v1/account/settings/update".into(),
        json!({ "post": body_op("updateAccountSettingsPost", "Change the account settings (same as PUT)", "Account", "UpdateAccountSettingsRequest", "200", "AccountSettings", false) }),
    );
    p.insert(
        "/api/v1/audit-events".into(),
        json!({ "get": list_op("listAuditEvents", "The audit log, newest first (admins)", "Audit", "AuditEventList", &[]) }),
    );
    p.insert(
        "/api/v1/openapi.json".into(),
        json!({
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "tags": ["Meta"],
                "security": [],
                "responses": { "200": { "description": "the OpenAPI document", "content": { "application/json": { "schema": { "type": "object" } } } } },
            },
        }),
    );
    Value::Object(p)
}

fn principal_paths(p: &mut Map<String, Value>, segment: &str, schema: &str, tag: &str) {
    let id = path_param("id", "the id");
    let op_name = schema;
    p.insert(
        format!("/api/v1/{segment}"),
        json!({
            "get": list_op(&format!("list{op_name}s"), &format!("List {tag} (admins)"), tag, &format!("{schema}List"), &[]),
            "post": body_op(&format!("create{op_name}"), &format!("Create a {schema} (admins)"), tag, &format!("Create{schema}Request"), "201", schema, false),
        }),
    );
    p.insert(
        format!("/api/v1/{segment}/{{id}}"),
        json!({
            "parameters": [id],
            "get": op(&format!("get{op_name}"), &format!("Get a {schema} (admins, or yourself)"), tag, schema),
            "put": body_op(&format!("update{op_name}"), &format!("Update a {schema} (admins)"), tag, &format!("Update{schema}Request"), "200", schema, false),
            "delete": op(&format!("delete{op_name}"), &format!("Delete a {schema} and its API keys (admins)"), tag, "DeletePrincipalResponse"),
        }),
    );
    p.insert(
        format!("/api/v1/{segment}/{{id}}/update"),
        json!({
            "parameters": [id],
            "post": body_op(&format!("update{op_name}Post"), &format!("Update a {schema} (same as PUT)"), tag, &format!("Update{schema}Request"), "200", schema, false),
        }),
    );
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": { "type": "string" } })
}

fn query_param(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn errors() -> Value {
    let e = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": schema_ref("Error") } } });
    json!({
        "400": e("malformed request: not JSON, bad query string"),
        "401": e("no valid API key"),
        "403": e("the caller's access does not allow this"),
        "404": e("no such resource"),
        "409": e("already exists, or resourceVersion is stale"),
        "413": e("request body too large"),
        "415": e("request body is not JSON"),
        "422": e("invalid field, or a policy refused the change (key policies; the last enabled admin stays); the message starts with the field it is about, such as spec.expiryTime"),
        "503": e("the key store is unavailable"),
    })
}

fn responses(status: &str, schema: &str) -> Value {
    let mut r = errors();
    r[status] = json!({ "description": "success", "content": { "application/json": { "schema": schema_ref(schema) } } });
    r
}

fn op(id: &str, summary: &str, tag: &str, response: &str) -> Value {
    json!({ "operationId": id, "summary": summary, "tags": [tag], "responses": responses("200", response) })
}

fn list_op(id: &str, summary: &str, tag: &str, response: &str, extra: &[Value]) -> Value {
    let mut params = vec![
        query_param(
            "pageSize",
            "items per page, 1 to 1000 (default 100)",
            json!({ "type": "integer", "minimum": 1, "maximum": 1000 }),
        ),
        query_param(
            "pageToken",
            "nextPageToken of the previous page",
            json!({ "type": "string" }),
        ),
    ];
    params.extend_from_slice(extra);
    json!({ "operationId": id, "summary": summary, "tags": [tag], "parameters": params, "responses": responses("200", response) })
}

fn body_op(
    id: &str,
    summary: &str,
    tag: &str,
    request: &str,
    status: &str,
    response: &str,
    optional_body: bool,
) -> Value {
    json!({
        "operationId": id,
        "summary": summary,
        "tags": [tag],
        "requestBody": { "required": !optional_body, "content": { "application/json": { "schema": schema_ref(request) } } },
        "responses": responses(status, response),
    })
}

// === schemas ===

fn string() -> Value {
    json!({ "type": "string" })
}
fn time() -> Value {
    json!({ "type": "string", "format": "date-time" })
}
fn nullable_time() -> Value {
    json!({ "type": ["string", "null"], "format": "date-time" })
}
fn boolean() -> Value {
    json!({ "type": "boolean" })
}
fn integer() -> Value {
    json!({ "type": "integer" })
}
fn strings() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

/// A closed object: every property listed, nothing else allowed.
fn object(required: &[&str], properties: Value) -> Value {
    json!({ "type": "object", "additionalProperties": false, "required": required, "properties": properties })
}

/// The Cloud Ops envelope around a `spec`.
fn resource(spec: &str, state: &[&str], extra: &[(&str, Value)]) -> Value {
    let mut props = json!({
        "id": string(),
        "resourceVersion": { "type": "string", "description": "pass it back on update; a stale one gets 409" },
        "spec": schema_ref(spec),
        "state": { "type": "string", "enum": state },
        "createdTime": time(),
        "lastModifiedTime": time(),
    });
    for (k, v) in extra {
        props[*k] = v.clone();
    }
    let required: Vec<&str> = props
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    json!({ "type": "object", "additionalProperties": false, "required": required, "properties": props })
}

fn list(field: &str, item: &str) -> Value {
    object(
        &[field, "nextPageToken"],
        json!({
            field: { "type": "array", "items": schema_ref(item) },
            "nextPageToken": { "type": "string", "description": "empty on the last page" },
        }),
    )
}

/// A create request: the spec with the fields a create needs (an update
/// may leave them out, so the spec schema itself cannot require them).
fn create_request(spec: &str, required: &[&str]) -> Value {
    object(
        &["spec"],
        json!({ "spec": { "allOf": [schema_ref(spec), { "required": required }] } }),
    )
}

/// Control characters, which names never hold (`resource::validate_name`).
const CONTROL: &str = "\\x00-\\x1f\\x7f-\\x9f";

/// Invisible format characters, which names never hold either
/// (`resource::is_invisible_format`, the same ranges).
const INVISIBLE: &str = "\\u00ad\\u061c\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb";

/// A name as `resource::validate_name` accepts it: 1 to `MAX_NAME_CHARS`
/// characters, no control or invisible format characters, no surrounding
/// whitespace. (It also
/// refuses text shaped like an API key, which a schema cannot say.)
fn name(description: &str) -> Value {
    let edge = format!("[^\\s{CONTROL}{INVISIBLE}]");
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_NAME_CHARS,
        "pattern": format!("^{edge}([^{CONTROL}{INVISIBLE}]*{edge})?$"),
        "description": description,
    })
}

/// An email as `bootstrap::looks_like_email` accepts it: a dot-atom local
/// part of at most 64 characters, a domain of two or more hostname labels.
fn email() -> Value {
    let atom = "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+";
    let label = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
    json!({
        "type": "string",
        "format": "email",
        "maxLength": 254,
        // The lookahead: a local part of at most 64 characters.
        "pattern": format!("^(?=[^@]{{1,64}}@){atom}(\\.{atom})*@{label}(\\.{label})+$"),
        "description": "required on create; unique ignoring case, kept as typed",
    })
}

/// Free text as `resource::validate_description` accepts it: line breaks
/// and tabs, no other control characters.
fn description() -> Value {
    json!({
        "type": "string",
        "maxLength": MAX_DESCRIPTION_CHARS,
        "pattern": "^[^\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]*$",
    })
}

fn update_request(spec: &str) -> Value {
    object(
        &["resourceVersion", "spec"],
        json!({ "resourceVersion": string(), "spec": schema_ref(spec) }),
    )
}

fn schemas() -> Value {
    json!({
        "Error": object(&["error"], json!({
            "error": object(&["code", "message"], json!({ "code": string(), "message": string() })),
        })),
        "Empty": object(&[], json!({})),
        "Access": object(&[], json!({
            "accountAccess": {
                "type": "object", "additionalProperties": false, "required": ["role"],
                "description": "left out: the read role on create, the current role on update",
                "properties": { "role": { "type": "string", "enum": ["admin", "developer", "read"] } },
            },
            "namespaceAccesses": {
                "type": "object",
                "description": "left out: none on create, the current grants on update; {} clears them",
                "additionalProperties": object(&["permission"], json!({ "permission": { "type": "string", "enum": ["admin", "write", "read"] } })),
            },
        })),
        "UserSpec": object(&[], json!({
            "email": email(),
            "access": schema_ref("Access"),
            "disabled": { "type": "boolean", "description": "a disabled user's keys fail with owner_disabled" },
        })),
        "User": resource("UserSpec", &["active", "disabled"], &[]),
        "UserList": list("users", "User"),
        "CreateUserRequest": create_request("UserSpec", &["email"]),
        "UpdateUserRequest": update_request("UserSpec"),
        "ServiceAccountSpec": object(&[], json!({
            "name": name("required on create"),
            "description": description(),
            "access": schema_ref("Access"),
            "disabled": boolean(),
        })),
        "ServiceAccount": resource("ServiceAccountSpec", &["active", "disabled"], &[]),
        "ServiceAccountList": list("serviceAccounts", "ServiceAccount"),
        "CreateServiceAccountRequest": create_request("ServiceAccountSpec", &["name"]),
        "UpdateServiceAccountRequest": update_request("ServiceAccountSpec"),
        "DeletePrincipalResponse": object(&["deletedApiKeys"], json!({ "deletedApiKeys": strings() })),
        "NamespaceSpec": object(&[], json!({
            "name": { "type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$", "description": "required on create; cannot change" },
            "description": description(),
        })),
        "Namespace": resource("NamespaceSpec", &["active"], &[]),
        "NamespaceList": list("namespaces", "Namespace"),
        // A new name may not look like an id: a namespace is addressed by either.
        "CreateNamespaceRequest": object(&["spec"], json!({ "spec": { "allOf": [
            schema_ref("NamespaceSpec"),
            { "required": ["name"], "properties": { "name": {
                "not": { "pattern": "^[0-9a-hjkmnp-tv-z]{16}$" },
                "description": "not 16 lowercase Crockford base32 characters, the shape of an id",
            } } },
        ] } })),
        "UpdateNamespaceRequest": update_request("NamespaceSpec"),
        "ApiKeySpec": object(&[], json!({
            "displayName": name("required on create"),
            "description": description(),
            "ownerId": { "type": "string", "description": "default: the caller; cannot change" },
            "ownerType": { "type": "string", "enum": ["user", "service-account"] },
            "expiryTime": { "type": ["string", "null"], "format": "date-time", "description": "in the future and at most maxKeyLifetime away; required on create while the account sets maxKeyLifetime (it does by default: 90 days); cannot change" },
            "disabled": boolean(),
            "namespaces": { "type": "array", "items": { "type": "string" }, "description": "scope; empty means all of the owner's; cannot change" },
        })),
        "ApiKey": resource("ApiKeySpec", &["active", "disabled", "expired"], &[
            ("lastUsedTime", nullable_time()),
            ("previousSecretValidUntil", json!({ "type": ["string", "null"], "format": "date-time", "description": "until when the secret replaced by the last rotation works" })),
        ]),
        "ApiKeyList": list("apiKeys", "ApiKey"),
        "CreateApiKeyRequest": create_request("ApiKeySpec", &["displayName"]),
        "UpdateApiKeyRequest": update_request("ApiKeySpec"),
        "IssuedApiKey": object(&["apiKey", "token"], json!({
            "apiKey": schema_ref("ApiKey"),
            "token": { "type": "string", "description": "the full token; shown in this response only" },
        })),
        "ApiKeyStateRequest": object(&[], json!({ "resourceVersion": string() })),
        "RotateApiKeyRequest": object(&[], json!({
            "gracePeriod": { "type": "string", "description": "how long the old secret keeps working, e.g. 24h (default) or 0s; at most 30d" },
        })),
        "ApiKeyUsage": object(&["keyId", "requestCount", "lastUsedTime"], json!({
            "keyId": string(),
            "requestCount": integer(),
            "lastUsedTime": nullable_time(),
        })),
        "AccountSettingsSpec": object(&[], json!({
            "apiKeysEnabled": { "type": "boolean", "description": "off: every key fails on the proxy" },
            "maxKeyLifetime": { "type": "string", "description": "e.g. 90d; 0s means keys may never expire" },
            "maxKeysPerOwner": { "type": "integer", "minimum": 1, "maximum": 10000 },
        })),
        "AccountSettings": object(&["id", "resourceVersion", "spec", "state", "lastModifiedTime"], json!({
            "id": string(),
            "resourceVersion": string(),
            "spec": schema_ref("AccountSettingsSpec"),
            "state": { "type": "string", "enum": ["active"] },
            "lastModifiedTime": time(),
        })),
        "UpdateAccountSettingsRequest": update_request("AccountSettingsSpec"),
        "AuditEvent": object(&["id", "time", "actor", "action", "target", "detail"], json!({
            "id": string(),
            "time": time(),
            "actor": object(&["id", "type", "name"], json!({ "id": string(), "type": string(), "name": string() })),
            "action": { "type": "string", "description": "e.g. api-key.create, user.update" },
            "target": object(&["type", "id"], json!({ "type": string(), "id": string() })),
            "detail": { "description": "what changed; never a secret" },
        })),
        "AuditEventList": list("auditEvents", "AuditEvent"),
    })
}
