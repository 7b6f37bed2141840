//! Commands that open the store directly: `bootstrap` and
//! `apikey create --local`.

use super::{store_settings, ApikeyCommand, Command, Failure, EX_UNAVAILABLE};
use crate::admin::bootstrap::{bootstrap, issue_key, BootstrapError};
use crate::key::TokenFormat;
use crate::store::{self, Actor, KeyStore, OwnerType};

async fn open(url: &str) -> Result<std::sync::Arc<dyn KeyStore>, Failure> {
    store::open(url).await.map_err(|e| Failure {
        code: EX_UNAVAILABLE,
        message: format!("cannot open the key store at {url}: {e}"),
    })
}

pub async fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Bootstrap {
            email,
            store,
            duration,
        } => {
            let (url, prefix) = store_settings(&store)?;
            let store = open(&url).await?;
            let tokens = TokenFormat::new(&prefix);
            let (admin, key, token) = bootstrap(&*store, &tokens, &email, duration)
                .await
                .map_err(|e| match e {
                    BootstrapError::UsersExist(_) | BootstrapError::BadEmail(_) => {
                        Failure::usage(e.to_string())
                    }
                    BootstrapError::Store(e) => Failure::runtime(e.to_string()),
                })?;
            eprintln!(
                "Created account admin {} ({}) and API key {}.",
                admin.name, admin.id, key.id
            );
            eprintln!("This is the only time the key is shown; store it safely:");
            println!("{}", token.expose());
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
            let store = open(&url).await?;
            let owner = store
                .find_principal_by_name(OwnerType::User, &owner_email)
                .await
                .map_err(|e| Failure::runtime(e.to_string()))?
                .ok_or_else(|| Failure::usage(format!("no user with email {owner_email:?}")))?;
            let tokens = TokenFormat::new(&prefix);
            let actor = Actor::system("local-cli");
            let (key, token) = issue_key(
                &*store,
                &tokens,
                &actor,
                &owner,
                &name,
                &description,
                duration,
            )
            .await
            .map_err(|e| Failure::usage(e.to_string()))?;
            eprintln!(
                "Created API key {} for {}. This is the only time the key is shown:",
                key.id, owner.name
            );
            println!("{}", token.expose());
            Ok(())
        }
        // `cli::main` sends only the two commands above here.
        _ => Err(Failure::usage(
            "this command talks to the admin API, not the store",
        )),
    }
}
