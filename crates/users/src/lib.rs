//! The users service: accounts and lookups, with cache-aside reads.
//!
//! API (canonical paths; the gateway maps every seed's paths onto them):
//! - `POST /api/v1/users`, `GET /api/v1/users?page=&per_page=`
//! - `GET|PUT|PATCH|DELETE /api/v1/users/{id}`, `GET /api/v1/users/id/{id}`
//! - `GET /api/v1/users/username/{username}`, `GET /api/v1/users/name/{name}`
//! - `GET /api/v1/users/stats`, `GET /api/v1/stats`, `/health`, `/ready`, `/metrics`

use anyhow::Context as _;
use kit::service::{App, Deps, Service};
use kit::{Cache, Db};

mod domain;
mod error;
mod routes;
mod store;

pub use error::Error;

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
    uses_bus: false,
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
struct AppState {
    db: Db,
    cache: Cache,
}

/// Builds the service from its dependencies.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let _: UsersSettings = deps.settings.section(NAME)?;
    let state = AppState {
        db: deps.db()?,
        cache: deps.cache.clone(),
    };
    Ok(deps.app(routes::router(state)))
}

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
    Ok(format!(
        "users: {added} added, {} already present",
        data.users.len() - added
    ))
}
