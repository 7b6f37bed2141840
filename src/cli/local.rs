//! Commands that open the store directly: `bootstrap`, `backup`,
//! `apikey create --local` and `apikey import`.
//!
//! Only `bootstrap` may create a SQLite store, and keeps it only when it
//! succeeded; the others refuse a path with no file, which opening would
//! have made into a new, empty store.

use std::path::{Path, PathBuf};

use super::{store_settings, ApikeyCommand, Command, Failure, EX_UNAVAILABLE};
use crate::admin::bootstrap::{bootstrap, issue_key, lifetime_or_account_max, BootstrapError};
use crate::key::{imported_character, KeyId, TokenError, TokenFormat};
use crate::store::{self, Actor, KeyStore, NewKey, OwnerType, Principal, SqliteStore, StoreError};

/// The URL is shown as the server logs it: a `--store` URL may carry a
/// PostgreSQL password, which must not reach a terminal or a CI log.
fn cannot_open(url: &str, error: store::StoreError) -> Failure {
    Failure {
        code: EX_UNAVAILABLE,
        message: format!(
            "cannot open the key store at {}: {error}",
            store::display_url(url)
        ),
    }
}

/// Opens the store, runs `work` on it and closes it whatever `work`
/// returned, so the command leaves the store as a stopped server does (for
/// SQLite, one file with its log checkpointed into it).
async fn with_store<T>(
    url: &str,
    work: impl AsyncFnOnce(&dyn KeyStore) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let store = store::open(url).await.map_err(|e| cannot_open(url, e))?;
    let outcome = work(&*store).await;
    store.close().await;
    outcome
}

/// The database file of a `sqlite:` URL; `None` for PostgreSQL.
fn sqlite_file(url: &str) -> Result<Option<PathBuf>, Failure> {
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    SqliteStore::file_of(url)
        .map(Some)
        .ok_or_else(|| Failure::usage(format!("bad store URL {}", store::display_url(url))))
}

/// For the commands that read or add to a store: a SQLite URL must name a
/// file that is there. Opening would create a new, empty store at a
/// misspelt path, and the command would then write into it, or fail and
/// leave it behind. Returns the file (`None` for PostgreSQL).
fn existing_store(url: &str) -> Result<Option<PathBuf>, Failure> {
    let file = sqlite_file(url)?;
    if let Some(file) = &file {
        if !file.is_file() {
            return Err(Failure::usage(format!(
                "no SQLite store at {}: this command works on an existing store \
                 (`keygate serve` or `keygate bootstrap` creates one); check --store \
                 or [store] url",
                file.display()
            )));
        }
    }
    Ok(file)
}

/// Removes the SQLite store a failed bootstrap created, its `-wal`, `-shm`
/// and `-journal` files with it: a store without its first admin (or with
/// an admin but no key, which no second bootstrap could mend) is not a set
/// up store, and a misspelt path would leave a stray file. Returns
/// `failure`, with the file named if it could not be removed.
fn remove_new_store(file: &Path, mut failure: Failure) -> Failure {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                failure.message.push_str(&format!(
                    "; could not remove {}, which this bootstrap created: {e}",
                    Path::new(&path).display()
                ));
            }
            _ => {}
        }
    }
    failure
}

pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Bootstrap {
            email,
            store,
            duration,
        } => {
            let (url, prefix) = store_settings(&store)?;
            let tokens = TokenFormat::new(&prefix);
            // Bootstrap is how a store is set up, so it may create one; but
            // only a store it made whole is kept (see `remove_new_store`).
            let new_file = sqlite_file(&url)?.filter(|file| !file.exists());
            let made = with_store(&url, async |store| {
                bootstrap(store, &tokens, &email, duration)
                    .await
                    .map_err(|e| match e {
                        BootstrapError::UsersExist(_)
                        | BootstrapError::BadEmail(_)
                        | BootstrapError::Store(StoreError::Policy(_)) => {
                            Failure::usage(e.to_string())
                        }
                        BootstrapError::Store(e) => Failure::runtime(e.to_string()),
                    })
            })
            .await;
            let (admin, key, token) = match (made, &new_file) {
                (Err(failure), Some(file)) => return Err(remove_new_store(file, failure)),
                (made, _) => made?,
            };
            if let Some(file) = &new_file {
                // Said, so that a misspelt path is seen at once.
                eprintln!("Created a new key store at {}.", file.display());
            }
            eprintln!(
                "Created account admin {} ({}) and API key {}.",
                admin.name, admin.id, key.id
            );
            eprintln!("This is the only time the key is shown; store it safely:");
            println!("{}", token.expose());
            Ok(())
        }
        Command::Backup { to, store } => {
            let (url, _) = store_settings(&store)?;
            if !url.starts_with("sqlite:") {
                return Err(Failure::usage(
                    "backup copies a SQLite store; back up PostgreSQL with pg_dump",
                ));
            }
            // A `sqlite:` URL, so always a file.
            let from = existing_store(&url)?.unwrap_or_default();
            // Refused here with the path named; SQLite would also refuse to
            // write into a file that is not empty.
            if to.exists() {
                return Err(Failure::usage(format!(
                    "{} already exists; backup writes a new file",
                    to.display()
                )));
            }
            SqliteStore::back_up(&url, &to).await.map_err(|e| {
                Failure::runtime(format!(
                    "could not copy {} into {}: {e}",
                    from.display(),
                    to.display()
                ))
            })?;
            eprintln!("Wrote a copy of the key store to {}.", to.display());
            Ok(())
        }
        Command::Apikey {
            command:
                ApikeyCommand::Create {
                    name,
                    description,
                    duration,
                    local: true,
                    owner_email,
                    store,
                    ..
                },
            ..
        } => {
            let (url, prefix) = store_settings(&store)?;
            let owner_email =
                owner_email.ok_or_else(|| Failure::usage("--local needs --owner-email"))?;
            existing_store(&url)?;
            let tokens = TokenFormat::new(&prefix);
            let actor = Actor::system("local-cli");
            let (owner, key, token) = with_store(&url, async |store| {
                let owner = find_user(store, &owner_email).await?;
                let (key, token) = issue_key(
                    store,
                    &tokens,
                    &actor,
                    &owner,
                    &name,
                    &description,
                    duration,
                )
                .await
                .map_err(|e| Failure::usage(e.to_string()))?;
                Ok((owner, key, token))
            })
            .await?;
            eprintln!(
                "Created API key {} for {}. This is the only time the key is shown:",
                key.id, owner.name
            );
            println!("{}", token.expose());
            Ok(())
        }
        Command::Apikey {
            command:
                ApikeyCommand::Import {
                    tsv,
                    owner_email,
                    duration,
                    store,
                },
            ..
        } => {
            let (url, prefix) = store_settings(&store)?;
            existing_store(&url)?;
            let text = if tsv.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&tsv)
            }
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", tsv.display())))?;
            let tokens = TokenFormat::new(&prefix).accepting_imported(true);
            let lines = parse_import(&text, &tokens, &owner_email)?;
            let (imported, owners) =
                with_store(&url, async |store| import(store, lines, duration).await).await?;
            if let [owner] = &owners[..] {
                eprintln!("Imported {imported} API keys for {owner}.");
            } else {
                eprintln!("Imported {imported} API keys for {} owners.", owners.len());
            }
            Ok(())
        }
        // `cli::main` sends only the commands above here.
        _ => Err(Failure::usage(
            "this command talks to the admin API, not the store",
        )),
    }
}

/// Writes the parsed lines into the store as one import, each under its
/// owner (looked up once each): how many keys, and the owners' names.
async fn import(
    store: &dyn KeyStore,
    lines: Vec<ImportLine<'_>>,
    duration: Option<std::time::Duration>,
) -> Result<(u64, Vec<String>), Failure> {
    let lifetime = lifetime_or_account_max(store, duration)
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let expiry = lifetime.map(|l| std::time::SystemTime::now() + l);
    let mut owners: std::collections::BTreeMap<&str, Principal> = Default::default();
    for line in &lines {
        if !owners.contains_key(line.owner_email) {
            owners.insert(line.owner_email, find_user(store, line.owner_email).await?);
        }
    }
    refuse_tokens_in_store(store, &lines).await?;
    let keys: Vec<NewKey> = lines
        .into_iter()
        .map(|line| {
            let owner = &owners[line.owner_email];
            NewKey {
                id: line.token.id,
                digest: line.token.digest,
                display_name: line.name,
                description: "imported".into(),
                owner_id: owner.id.clone(),
                owner_type: owner.kind,
                namespaces: Vec::new(),
                expiry,
                disabled: false,
            }
        })
        .collect();
    let imported = store
        .import_keys(&Actor::system("local-cli"), &keys)
        .await
        .map_err(|e| Failure::usage(e.to_string()))?;
    Ok((imported, owners.into_values().map(|o| o.name).collect()))
}

/// Refuses the import when the store already holds some of its tokens (a
/// file imported twice, or partly before), naming their lines and key ids:
/// the store's own refusal, at the insert, cannot say which line. Nothing
/// is written either way; a token added between this check and the import
/// is still refused by the store, as the whole import.
async fn refuse_tokens_in_store(
    store: &dyn KeyStore,
    lines: &[ImportLine<'_>],
) -> Result<(), Failure> {
    /// Lines named in full; a file imported twice would list them all.
    const NAMED: usize = 5;
    let ids: Vec<KeyId> = lines.iter().map(|line| line.token.id).collect();
    let existing: std::collections::BTreeSet<KeyId> = store
        .existing_keys(&ids)
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?
        .into_iter()
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    let found: Vec<&ImportLine<'_>> = lines
        .iter()
        .filter(|line| existing.contains(&line.token.id))
        .collect();
    let mut named: Vec<String> = found
        .iter()
        .take(NAMED)
        .map(|line| format!("line {} (key {})", line.number, line.token.id))
        .collect();
    if found.len() > NAMED {
        named.push(format!("and {} more lines", found.len() - NAMED));
    }
    let tokens = if found.len() == 1 { "token" } else { "tokens" };
    Err(Failure::usage(format!(
        "the store already holds the {tokens} of {} (imported before?); nothing was imported",
        named.join(", ")
    )))
}

async fn find_user(store: &dyn KeyStore, email: &str) -> Result<Principal, Failure> {
    store
        .find_principal_by_name(OwnerType::User, email)
        .await
        .map_err(|e| Failure::runtime(e.to_string()))?
        .ok_or_else(|| Failure::usage(format!("no user with email {email:?}")))
}

/// One line of an import file.
struct ImportLine<'a> {
    /// Its number in the file, counted from 1, to name it by.
    number: usize,
    token: crate::key::ParsedToken,
    name: String,
    owner_email: &'a str,
}

/// Reads `token<TAB>name[<TAB>owner-email]` lines. A line that does not hold
/// a token, or holds one an earlier line holds, is refused by its number,
/// never by its content (the store would only say "imported twice?").
fn parse_import<'a>(
    text: &'a str,
    tokens: &TokenFormat,
    default_owner: &'a str,
) -> Result<Vec<ImportLine<'a>>, Failure> {
    let mut lines = Vec::new();
    let mut first_seen = std::collections::BTreeMap::new();
    for (number, line) in (1..).zip(text.lines()) {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split('\t');
        let token = fields.next().unwrap_or_default();
        let token = token.trim();
        let token = tokens.parse(token.as_bytes()).map_err(|e| {
            Failure::usage(format!(
                "line {number}: not an importable token: {}",
                not_importable(token, tokens, e)
            ))
        })?;
        if let Some(first) = first_seen.insert(token.id, number) {
            return Err(Failure::usage(format!(
                "line {number}: the same token as line {first}"
            )));
        }
        let name = fields.next().map(str::trim).unwrap_or_default();
        let owner_email = fields.next().map(str::trim).filter(|o| !o.is_empty());
        lines.push(ImportLine {
            number,
            name: if name.is_empty() {
                format!("imported {}", token.id)
            } else {
                name.to_string()
            },
            token,
            owner_email: owner_email.unwrap_or(default_owner),
        });
    }
    Ok(lines)
}

/// Why `token` is not importable, found by the rules of the imported shape
/// (a line that is not a native token is read as an imported one, and
/// `parse` reports the native format's reason: "wrong length" for a token
/// that holds a bad character). Says where and what, never the token: a
/// bad character is no character of a secret, but its neighbours are.
fn not_importable(token: &str, tokens: &TokenFormat, native: TokenError) -> String {
    let mut chars = token.chars().enumerate();
    if let Some((at, c)) = chars.find(|&(_, c)| !u8::try_from(c).is_ok_and(imported_character)) {
        return format!(
            "character {} ({c:?}) is not allowed: a token is made of letters, digits, \
             '_', '-' and '.'",
            at + 1
        );
    }
    let prefix = tokens.prefix();
    if !token.starts_with(prefix) || token.as_bytes().get(prefix.len()) != Some(&b'_') {
        return format!("it does not start with {prefix}_ (the configured [keys] prefix)");
    }
    let lengths = tokens.imported_lengths();
    if !lengths.contains(&token.len()) {
        return format!(
            "it is {} characters long; an imported token has {} to {}",
            token.len(),
            lengths.start(),
            lengths.end()
        );
    }
    native.to_string()
}
