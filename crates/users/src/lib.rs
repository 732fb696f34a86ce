//! The users service: accounts and lookups, with cache-aside reads.
//!
//! API (canonical paths; the gateway maps every seed's paths onto them):
//! - `POST /api/v1/users`, `GET /api/v1/users?page=&per_page=`
//! - `GET|PUT|PATCH|DELETE /api/v1/users/{id}`, `GET /api/v1/users/id/{id}`
//! - `GET /api/v1/users/username/{username}`, `GET /api/v1/users/name/{name}`
//! - `GET /api/v1/users/stats`, `GET /api/v1/stats`, `/health`, `/ready`, `/metrics`
//! - accounts: `POST /api/v1/auth/register` `{email, name, password}`, `POST /api/v1/auth/login`
//!   `{email, password}` → `{access_token, token_type, expires_in}`, `GET /api/v1/users/me`
//!
//! Events (through the outbox): `user.registered`. Who may call what is decided at the gateway
//! (see the gateway's `policy`); `/me` reads the identity it forwards.

use anyhow::Context as _;
use kit::auth::Tokens;
use kit::relay::{Notifier, Relay};
use kit::service::{App, Deps, Service};
use kit::{Cache, Db};

mod accounts;
mod domain;
mod error;
mod events;
mod password;
mod routes;
mod store;

pub use error::Error;
pub use routes::openapi;

/// The service's name: its config section, PostgreSQL schema, SQLite file and cache namespace.
pub const NAME: &str = "users";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The users service, for the `agora` binary's registry.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: Some(|deps| Box::pin(seed(deps))),
};

/// `[services.users]` keys of its own: none yet (a misspelt key is refused at start).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsersSettings {}

/// What every handler shares.
#[derive(Clone)]
struct AppState(std::sync::Arc<SharedState>);

/// What [`AppState`] shares: handlers extract the state per request, which clones one pointer
/// rather than every field.
struct SharedState {
    db: Db,
    cache: Cache,
    /// Signs access tokens (`auth.jwt_secret`).
    tokens: Tokens,
    hasher: password::Hasher,
    /// Wakes the outbox relay after a commit.
    outbox: Notifier,
    /// Inserts the new users of `POST /api/v1/users`, several per statement under load.
    creates: routes::Creates,
    /// Reads users by id on a cache miss, several per statement under load.
    finds: routes::Finds,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// Builds the service from its dependencies, with its outbox relay publishing to the bus.
/// Refuses to start without a signing key: `auth.jwt_secret`, or with an Ed25519 public key its
/// private key (the error names the key).
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let _: UsersSettings = deps.settings.section(NAME)?;
    let tokens = Tokens::new(&deps.settings.auth)?;
    if !tokens.can_sign() {
        return Err(kit::config::ConfigError::Invalid {
            key: "auth.ed25519_private_key".to_owned(),
            message: "is required by the users service, which signs the tokens (the gateway \
                      needs only auth.ed25519_public_key)"
                .to_owned(),
        }
        .into());
    }
    let db = deps.db()?;
    let relay = Relay::new(db.clone(), deps.bus()?, &deps.settings.bus);
    relay.register_metrics(&deps.metrics);
    let state = AppState(std::sync::Arc::new(SharedState {
        creates: routes::creates(db.clone(), deps.cache.clone()),
        finds: routes::finds(db.clone()),
        db,
        cache: deps.cache.clone(),
        tokens,
        hasher: password::Hasher::new(deps.settings.auth.hash_concurrency).await?,
        outbox: relay.notifier(),
    }));
    let router = routes::router(state.clone())
        .merge(accounts::router(state))
        .merge(kit::openapi::routes(openapi()));
    Ok(deps
        .app(router)
        .with_task(move |shutdown| relay.spawn(shutdown)))
}

/// The account `agora seed` creates with role admin.
pub const ADMIN_EMAIL: &str = "admin@agora.local";
/// Where `agora seed` keeps the admin's generated password (under `data_dir`, mode 0600).
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";

/// Seed 001's sample users (its `database/init.sql`), with their ids.
const SEED_001: &str = include_str!("../seed/seed-001-users.json");

#[derive(serde::Deserialize)]
struct SeedFile {
    users: Vec<SeedUser>,
}

#[derive(serde::Deserialize)]
struct SeedUser {
    id: i64,
    username: String,
    email: String,
}

/// Loads seed 001's users 1-4; rows that exist are kept.
pub async fn seed(deps: Deps) -> anyhow::Result<String> {
    let data: SeedFile =
        serde_json::from_str(SEED_001).context("parsing the built-in seed data")?;
    let db = deps.db()?;
    let mut tx = db.begin().await?;
    let mut added = 0;
    for user in &data.users {
        let fields = domain::UserFields {
            username: Some(user.username.clone()),
            email: Some(user.email.clone()),
            name: None,
        };
        if store::insert_with_id(&mut tx, user.id, &fields).await? {
            added += 1;
        }
    }
    kit::db::sync_identity(&mut tx, "users").await?;
    tx.commit().await?;
    let admin = seed_admin(&deps, &db).await?;
    Ok(format!(
        "users: {added} added, {} already present\n{admin}",
        data.users.len() - added
    ))
}

/// The admin account: created once with a generated password kept in
/// `<data_dir>/admin-password` (0600), so no known password ever guards it. An existing account
/// with that email that is not an admin is left alone (never promoted: whoever registered it
/// first must not become admin).
async fn seed_admin(deps: &Deps, db: &Db) -> anyhow::Result<String> {
    let path = deps.settings.data_dir.join(ADMIN_PASSWORD_FILE);
    let login = |password: &str| {
        format!(
            "admin: {ADMIN_EMAIL} / {password} (kept in {path}); log in with\n  \
             curl -s -X POST http://127.0.0.1:8080/api/v1/auth/login \
             -H 'Content-Type: application/json' \
             -d '{{\"email\":\"{ADMIN_EMAIL}\",\"password\":\"'\"$(cat {path})\"'\"}}'",
            path = path.display()
        )
    };
    match store::find_account(db, ADMIN_EMAIL).await? {
        Some(account) if account.role == kit::auth::Role::Admin.as_str() => {
            if path.exists() {
                let password = kit::auth::load_or_create_secret(&path)?;
                Ok(login(password.expose()))
            } else {
                Ok(format!(
                    "admin: {ADMIN_EMAIL} exists (its password is not in {}: it was seeded \
                     elsewhere)",
                    path.display()
                ))
            }
        }
        Some(_) => {
            tracing::warn!(
                email = ADMIN_EMAIL,
                "exists without the admin role; not changed"
            );
            Ok(format!(
                "admin: {ADMIN_EMAIL} exists and is not an admin; left unchanged"
            ))
        }
        None => {
            let password = kit::auth::load_or_create_secret(&path)?;
            let hasher = password::Hasher::new(1).await?;
            let hash = hasher
                .hash(password::Password::new(password.expose()))
                .await?;
            let fields = domain::UserFields {
                username: Some("admin".into()),
                email: Some(ADMIN_EMAIL.into()),
                name: Some("Administrator".into()),
            };
            let created = routes::on_unique(
                store::insert_account(db, &fields, &hash, kit::auth::Role::Admin).await,
                &fields,
            );
            if let Err(err) = created {
                // e.g. a user already called `admin`: say so instead of failing the seed.
                return Ok(format!("admin: not created ({})", kit::ApiError::from(err)));
            }
            Ok(login(password.expose()))
        }
    }
}
