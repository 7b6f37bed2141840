//! The admin API commands: each builds its request from the flags, calls
//! the API through `remote::Client`, and prints the answer with `output`.
//!
//! Updates read the resource first and send its `resourceVersion` back
//! (unless `--resource-version` is given), so a change made in between is
//! refused with 409 rather than overwritten.
//!
//! Every id from the command line is checked for the shape of the id it
//! names before any request (`key_id`, `principal_id`, `namespace_ref`),
//! and goes into the path as one encoded segment (`remote::Client`), so
//! `--id ../users/x` is refused here rather than read as another resource.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::output::{self, Column, Output};
use super::remote::Client;
use super::{
    AccessArgs, AccountCommand, ApikeyCommand, AuditCommand, Command, Failure, NamespaceCommand,
    PageArgs, RemoteArgs, ServiceAccountCommand, UserCommand,
};
use crate::admin::resource::{validate_namespace_name, MAX_NAMESPACE_CHARS};
use crate::key::KeyId;

pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Apikey { remote, command } => apikey(&remote, command).await,
        Command::User { remote, command } => user(&remote, command).await,
        Command::ServiceAccount { remote, command } => service_account(&remote, command).await,
        Command::Namespace { remote, command } => namespace(&remote, command).await,
        Command::Account { remote, command } => account(&remote, command).await,
        Command::Audit { remote, command } => audit(&remote, command).await,
        Command::Serve { .. }
        | Command::Check { .. }
        | Command::Bootstrap { .. }
        | Command::Backup { .. } => Err(Failure::usage(
            "this command does not talk to the admin API",
        )),
    }
}

// === api keys ===

const KEYS: &str = "api-keys";

fn key_columns() -> Vec<Column> {
    vec![
        Column::new("ID", |v| output::text(&v["id"])),
        Column::new("NAME", |v| output::text(&v["spec"]["displayName"])),
        Column::new("OWNER", |v| {
            format!(
                "{} {}",
                output::text(&v["spec"]["ownerType"]),
                output::text(&v["spec"]["ownerId"])
            )
        }),
        Column::new("STATE", |v| output::text(&v["state"])),
        Column::new("NAMESPACES", |v| output::text(&v["spec"]["namespaces"])),
        Column::new("EXPIRES", |v| output::text(&v["spec"]["expiryTime"])),
        Column::new("LAST USED", |v| output::text(&v["lastUsedTime"])),
    ]
}

async fn apikey(remote: &RemoteArgs, command: ApikeyCommand) -> Result<(), Failure> {
    let client = Client::new(remote)?;
    let out = remote.output;
    match command {
        ApikeyCommand::Create {
            name,
            description,
            duration,
            owner_id,
            owner_type,
            namespaces,
            ..
        } => {
            let lifetime = match duration {
                Some(d) => Some(d),
                // The account's longest, or none when keys may live forever.
                None => {
                    let settings = client.get(&SETTINGS, &[]).await?;
                    let max = settings["spec"]["maxKeyLifetime"].as_str().unwrap_or("0s");
                    let max = humantime::parse_duration(max).map_err(|_| {
                        Failure::runtime(format!("the server sent maxKeyLifetime {max:?}"))
                    })?;
                    (!max.is_zero()).then_some(max)
                }
            };
            let mut spec = json!({
                "displayName": name,
                "description": description,
                "namespaces": namespaces,
            });
            if let Some(l) = lifetime {
                let at = SystemTime::now() + l;
                spec["expiryTime"] = json!(humantime::format_rfc3339_seconds(at).to_string());
            }
            if let Some(id) = owner_id {
                spec["ownerId"] = json!(principal_id("--owner-id", &id)?);
            }
            if let Some(t) = owner_type {
                spec["ownerType"] = json!(t);
            }
            let created = client.post(&[KEYS], json!({ "spec": spec })).await?;
            issued(out, &created, "Created");
            Ok(())
        }
        ApikeyCommand::List {
            owner_id,
            owner_type,
            page,
        } => {
            let mut query = page_query(&page);
            if let Some(id) = owner_id {
                principal_id("--owner-id", &id)?;
                query.push(("ownerId", id));
            }
            if let Some(t) = owner_type {
                query.push(("ownerType", t));
            }
            let list = client.get(&[KEYS], &query).await?;
            show_list(out, &list, "apiKeys", &key_columns());
            Ok(())
        }
        ApikeyCommand::Get(id) => {
            let id = key_id(&id.id)?;
            show(out, &client.get(&[KEYS, id], &[]).await?);
            Ok(())
        }
        ApikeyCommand::Delete(id) => {
            let id = key_id(&id.id)?;
            client.delete(&[KEYS, id]).await?;
            done(out, &format!("Deleted API key {id}."));
            Ok(())
        }
        ApikeyCommand::Enable(id) => {
            let id = key_id(&id.id)?;
            show(out, &client.post(&[KEYS, id, "enable"], json!({})).await?);
            Ok(())
        }
        ApikeyCommand::Disable(id) => {
            let id = key_id(&id.id)?;
            show(out, &client.post(&[KEYS, id, "disable"], json!({})).await?);
            Ok(())
        }
        ApikeyCommand::Rotate { id, grace } => {
            let body = match grace {
                Some(g) => json!({ "gracePeriod": g }),
                None => json!({}),
            };
            let rotated = client.post(&[KEYS, key_id(&id)?, "rotate"], body).await?;
            issued(out, &rotated, "Rotated");
            Ok(())
        }
        ApikeyCommand::Update {
            id,
            name,
            description,
            resource_version,
        } => {
            let path = [KEYS, key_id(&id)?];
            let version = version_of(&client, &path, resource_version).await?;
            let mut spec = Map::new();
            if let Some(n) = name {
                spec.insert("displayName".into(), json!(n));
            }
            if let Some(d) = description {
                spec.insert("description".into(), json!(d));
            }
            let key = client
                .put(&path, json!({ "resourceVersion": version, "spec": spec }))
                .await?;
            show(out, &key);
            Ok(())
        }
        ApikeyCommand::Usage(id) => {
            let id = key_id(&id.id)?;
            show(out, &client.get(&[KEYS, id, "usage"], &[]).await?);
            Ok(())
        }
        // `cli::main` runs imports against the store (cli::local).
        ApikeyCommand::Import { .. } => Err(Failure::usage(
            "apikey import writes to the store directly; give it --config or --store",
        )),
    }
}

/// Prints a create or rotate answer. In a table the token goes alone to
/// stdout (so `$(keygate apikey create ...)` captures just it) and the rest
/// to stderr.
fn issued(out: Output, answer: &Value, verb: &str) {
    match out {
        Output::Json => output::json(answer),
        Output::Table => {
            let key = &answer["apiKey"];
            eprintln!(
                "{verb} API key {} ({}), expires {}.",
                output::text(&key["id"]),
                output::text(&key["spec"]["displayName"]),
                output::text(&key["spec"]["expiryTime"]),
            );
            if let Some(until) = key["previousSecretValidUntil"].as_str() {
                eprintln!("The previous secret keeps working until {until}.");
            }
            eprintln!("This is the only time the token is shown; store it safely:");
            println!("{}", output::text(&answer["token"]));
        }
    }
}

// === users and service accounts ===

fn user_columns() -> Vec<Column> {
    vec![
        Column::new("ID", |v| output::text(&v["id"])),
        Column::new("EMAIL", |v| output::text(&v["spec"]["email"])),
        Column::new("ROLE", |v| {
            output::text(&v["spec"]["access"]["accountAccess"]["role"])
        }),
        Column::new("NAMESPACES", |v| {
            output::namespace_accesses(&v["spec"]["access"])
        }),
        Column::new("STATE", |v| output::text(&v["state"])),
    ]
}

fn service_account_columns() -> Vec<Column> {
    vec![
        Column::new("ID", |v| output::text(&v["id"])),
        Column::new("NAME", |v| output::text(&v["spec"]["name"])),
        Column::new("ROLE", |v| {
            output::text(&v["spec"]["access"]["accountAccess"]["role"])
        }),
        Column::new("NAMESPACES", |v| {
            output::namespace_accesses(&v["spec"]["access"])
        }),
        Column::new("STATE", |v| output::text(&v["state"])),
        Column::new("DESCRIPTION", |v| output::text(&v["spec"]["description"])),
    ]
}

/// `spec.access` from the flags, over `current` (on update). `None` when
/// no access flag was given.
fn access(args: &AccessArgs, current: Option<&Value>) -> Result<Option<Value>, Failure> {
    if args.role.is_none() && args.namespace_access.is_empty() {
        return Ok(None);
    }
    let role = match (&args.role, current) {
        (Some(r), _) => json!(r),
        (None, Some(c)) => c["accountAccess"]["role"].clone(),
        (None, None) => json!("read"),
    };
    let namespaces = if args.namespace_access.is_empty() {
        current
            .map(|c| c["namespaceAccesses"].clone())
            .unwrap_or_else(|| json!({}))
    } else {
        let mut map = Map::new();
        for pair in &args.namespace_access {
            let (ns, permission) = pair.split_once('=').ok_or_else(|| {
                Failure::usage(format!(
                    "--namespace-access takes NAMESPACE=admin|write|read; got {pair:?}"
                ))
            })?;
            map.insert(ns.into(), json!({ "permission": permission }));
        }
        Value::Object(map)
    };
    Ok(Some(json!({
        "accountAccess": { "role": role },
        "namespaceAccesses": namespaces,
    })))
}

async fn user(remote: &RemoteArgs, command: UserCommand) -> Result<(), Failure> {
    const USERS: &str = "users";
    let client = Client::new(remote)?;
    let out = remote.output;
    match command {
        UserCommand::Create { email, access: a } => {
            let mut spec = json!({ "email": email });
            if let Some(a) = access(&a, None)? {
                spec["access"] = a;
            }
            show(out, &client.post(&[USERS], json!({ "spec": spec })).await?);
        }
        UserCommand::List(page) => {
            let list = client.get(&[USERS], &page_query(&page)).await?;
            show_list(out, &list, "users", &user_columns());
        }
        UserCommand::Get(id) => {
            let id = principal_id("--id", &id.id)?;
            show(out, &client.get(&[USERS, id], &[]).await?);
        }
        UserCommand::Delete(id) => {
            let id = principal_id("--id", &id.id)?;
            let answer = client.delete(&[USERS, id]).await?;
            deleted_principal(out, "user", id, &answer);
        }
        UserCommand::Update {
            id,
            email,
            access: a,
            disabled,
            resource_version,
        } => {
            let mut spec = Map::new();
            if let Some(e) = email {
                spec.insert("email".into(), json!(e));
            }
            let change = PrincipalChange {
                spec,
                access: &a,
                disabled,
                resource_version,
            };
            let path = [USERS, principal_id("--id", &id)?];
            update_principal(&client, out, &path, change).await?;
        }
    }
    Ok(())
}

async fn service_account(
    remote: &RemoteArgs,
    command: ServiceAccountCommand,
) -> Result<(), Failure> {
    const SAS: &str = "service-accounts";
    let client = Client::new(remote)?;
    let out = remote.output;
    match command {
        ServiceAccountCommand::Create {
            name,
            description,
            access: a,
        } => {
            let mut spec = json!({ "name": name, "description": description });
            if let Some(a) = access(&a, None)? {
                spec["access"] = a;
            }
            show(out, &client.post(&[SAS], json!({ "spec": spec })).await?);
        }
        ServiceAccountCommand::List(page) => {
            let list = client.get(&[SAS], &page_query(&page)).await?;
            show_list(out, &list, "serviceAccounts", &service_account_columns());
        }
        ServiceAccountCommand::Get(id) => {
            let id = principal_id("--id", &id.id)?;
            show(out, &client.get(&[SAS, id], &[]).await?);
        }
        ServiceAccountCommand::Delete(id) => {
            let id = principal_id("--id", &id.id)?;
            let answer = client.delete(&[SAS, id]).await?;
            deleted_principal(out, "service account", id, &answer);
        }
        ServiceAccountCommand::Update {
            id,
            name,
            description,
            access: a,
            disabled,
            resource_version,
        } => {
            let mut spec = Map::new();
            if let Some(n) = name {
                spec.insert("name".into(), json!(n));
            }
            if let Some(d) = description {
                spec.insert("description".into(), json!(d));
            }
            let change = PrincipalChange {
                spec,
                access: &a,
                disabled,
                resource_version,
            };
            let path = [SAS, principal_id("--id", &id)?];
            update_principal(&client, out, &path, change).await?;
        }
    }
    Ok(())
}

/// What `user update` and `service-account update` were asked to change.
struct PrincipalChange<'a> {
    /// The fields of their own kind (email; name, description).
    spec: Map<String, Value>,
    access: &'a AccessArgs,
    disabled: Option<bool>,
    resource_version: Option<String>,
}

/// Reads the principal, merges the access flags into its current access,
/// and writes the change conditional on the version read (or the one
/// given), so a concurrent change is refused rather than overwritten.
async fn update_principal(
    client: &Client,
    out: Output,
    path: &[&str],
    change: PrincipalChange<'_>,
) -> Result<(), Failure> {
    let current = client.get(path, &[]).await?;
    let mut spec = change.spec;
    if let Some(a) = access(change.access, Some(&current["spec"]["access"]))? {
        spec.insert("access".into(), a);
    }
    if let Some(d) = change.disabled {
        spec.insert("disabled".into(), json!(d));
    }
    let version = change
        .resource_version
        .unwrap_or_else(|| output::text(&current["resourceVersion"]));
    let updated = client
        .put(path, json!({ "resourceVersion": version, "spec": spec }))
        .await?;
    show(out, &updated);
    Ok(())
}

fn deleted_principal(out: Output, kind: &str, id: &str, answer: &Value) {
    match out {
        Output::Json => output::json(answer),
        Output::Table => println!(
            "Deleted {kind} {id} and its API keys: {}.",
            output::text(&answer["deletedApiKeys"])
        ),
    }
}

// === namespaces, account, audit ===

async fn namespace(remote: &RemoteArgs, command: NamespaceCommand) -> Result<(), Failure> {
    const NAMESPACES: &str = "namespaces";
    let client = Client::new(remote)?;
    let out = remote.output;
    let columns = [
        Column::new("ID", |v| output::text(&v["id"])),
        Column::new("NAME", |v| output::text(&v["spec"]["name"])),
        Column::new("DESCRIPTION", |v| output::text(&v["spec"]["description"])),
    ];
    match command {
        NamespaceCommand::Create { name, description } => {
            let spec = json!({ "name": name, "description": description });
            show(
                out,
                &client.post(&[NAMESPACES], json!({ "spec": spec })).await?,
            );
        }
        NamespaceCommand::List(page) => {
            let list = client.get(&[NAMESPACES], &page_query(&page)).await?;
            show_list(out, &list, "namespaces", &columns);
        }
        NamespaceCommand::Get(id) => {
            let id = namespace_ref(&id.id)?;
            show(out, &client.get(&[NAMESPACES, id], &[]).await?);
        }
        NamespaceCommand::Delete(id) => {
            let id = namespace_ref(&id.id)?;
            client.delete(&[NAMESPACES, id]).await?;
            done(out, &format!("Deleted namespace {id}."));
        }
        NamespaceCommand::Update {
            id,
            description,
            resource_version,
        } => {
            let path = [NAMESPACES, namespace_ref(&id)?];
            let version = version_of(&client, &path, resource_version).await?;
            let body =
                json!({ "resourceVersion": version, "spec": { "description": description } });
            show(out, &client.put(&path, body).await?);
        }
    }
    Ok(())
}

const SETTINGS: [&str; 2] = ["account", "settings"];

async fn account(remote: &RemoteArgs, command: AccountCommand) -> Result<(), Failure> {
    let client = Client::new(remote)?;
    let out = remote.output;
    match command {
        AccountCommand::Get => show(out, &client.get(&SETTINGS, &[]).await?),
        AccountCommand::Update {
            api_keys_enabled,
            max_key_lifetime,
            max_keys_per_owner,
            resource_version,
        } => {
            let version = version_of(&client, &SETTINGS, resource_version).await?;
            let mut spec = Map::new();
            if let Some(e) = api_keys_enabled {
                spec.insert("apiKeysEnabled".into(), json!(e));
            }
            if let Some(l) = max_key_lifetime {
                spec.insert("maxKeyLifetime".into(), json!(l));
            }
            if let Some(n) = max_keys_per_owner {
                spec.insert("maxKeysPerOwner".into(), json!(n));
            }
            let body = json!({ "resourceVersion": version, "spec": spec });
            show(out, &client.put(&SETTINGS, body).await?);
        }
    }
    Ok(())
}

async fn audit(remote: &RemoteArgs, command: AuditCommand) -> Result<(), Failure> {
    let client = Client::new(remote)?;
    let AuditCommand::List(page) = command;
    let list = client.get(&["audit-events"], &page_query(&page)).await?;
    let columns = [
        Column::new("TIME", |v| output::text(&v["time"])),
        Column::new("ACTOR", |v| output::text(&v["actor"]["name"])),
        Column::new("ACTION", |v| output::text(&v["action"])),
        Column::new("TARGET", |v| {
            format!(
                "{} {}",
                output::text(&v["target"]["type"]),
                output::text(&v["target"]["id"])
            )
        }),
    ];
    show_list(remote.output, &list, "auditEvents", &columns);
    Ok(())
}

// === helpers ===

/// An API key's id: 16 lowercase Crockford base32 characters, as the
/// server names keys. The value is not echoed: a token pasted by mistake
/// holds a secret.
fn key_id(id: &str) -> Result<&str, Failure> {
    KeyId::parse(id).map(|_| id).map_err(|_| {
        Failure::usage(
            "--id is not an API key id: 16 lowercase Crockford base32 characters \
             (0-9, a-z without i, l, o, u), as `keygate apikey list` shows",
        )
    })
}

/// A user's or service account's id: the same shape as a key's (every
/// resource id is made the same way).
fn principal_id<'a>(flag: &str, id: &'a str) -> Result<&'a str, Failure> {
    KeyId::parse(id).map(|_| id).map_err(|_| {
        Failure::usage(format!(
            "{flag} is not a user or service-account id: 16 lowercase Crockford base32 \
             characters (0-9, a-z without i, l, o, u), as `keygate user list` and \
             `keygate service-account list` show"
        ))
    })
}

/// A namespace's id or name: both have a name's shape (lowercase letters,
/// digits, `-`).
fn namespace_ref(id: &str) -> Result<&str, Failure> {
    validate_namespace_name("--id", id)
        .map(|()| id)
        .map_err(|_| {
            Failure::usage(format!(
                "--id is not a namespace id or name: 1 to {MAX_NAMESPACE_CHARS} lowercase \
                 letters, digits or '-', not starting or ending with '-'"
            ))
        })
}

fn page_query(page: &PageArgs) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(n) = page.page_size {
        q.push(("pageSize", n.to_string()));
    }
    if let Some(t) = &page.page_token {
        q.push(("pageToken", t.clone()));
    }
    q
}

async fn version_of(
    client: &Client,
    path: &[&str],
    given: Option<String>,
) -> Result<String, Failure> {
    match given {
        Some(v) => Ok(v),
        None => Ok(output::text(
            &client.get(path, &[]).await?["resourceVersion"],
        )),
    }
}

fn show(out: Output, value: &Value) {
    match out {
        Output::Json => output::json(value),
        Output::Table => output::fields(value),
    }
}

fn show_list(out: Output, list: &Value, field: &str, columns: &[Column]) {
    match out {
        Output::Json => output::json(list),
        Output::Table => {
            let items = list[field].as_array().map(Vec::as_slice).unwrap_or(&[]);
            output::table(items, columns);
            if let Some(next) = list["nextPageToken"].as_str().filter(|t| !t.is_empty()) {
                eprintln!("More: --page-token {next}");
            }
        }
    }
}

fn done(out: Output, message: &str) {
    match out {
        Output::Json => output::json(&json!({})),
        Output::Table => println!("{message}"),
    }
}
