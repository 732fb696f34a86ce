//! The users service: accounts and lookups, with cache-aside reads.
//!
//! API (canonical paths; the gateway maps every seed's paths onto them):
//! - `POST /api/v1/users`, `GET /api/v1/users?page=&per_page=`
//! - `GET|PUT|PATCH|DELETE /api/v1/users/{id}`, `GET /api/v1/users/id/{id}`
//! - `GET /api/v1/users/username/{username}`, `GET /api/v1/users/name/{name}`
//! - `GET /api/v1/users/stats`, `GET /api/v1/stats`, `/health`, `/ready`

use kit::http::Dependency;
use kit::service::App;
use kit::{Cache, Db, Settings};

pub mod domain;
mod error;
mod routes;
pub mod store;

pub use error::Error;

/// The service's name: its config section, PostgreSQL schema, SQLite file and cache namespace.
pub const NAME: &str = "users";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub cache: Cache,
}

/// Connects (and migrates) the database, sets up the cache, and builds the router.
pub async fn app(settings: &Settings) -> anyhow::Result<App> {
    let db = Db::connect(settings, NAME, &MIGRATIONS).await?;
    let cache = Cache::new(settings, NAME)?;
    Ok(app_with(settings, AppState { db, cache }))
}

/// The router over existing state (tests use it to sabotage a dependency).
pub fn app_with(settings: &Settings, state: AppState) -> App {
    let dependencies = vec![
        Dependency::database(&state.db),
        Dependency::cache(&state.cache),
    ];
    let metrics = kit::metrics::Metrics::new(NAME);
    state.cache.register_metrics(&metrics);
    let router = routes::router(state.clone()).merge(kit::http::health_routes(NAME, dependencies));
    App::new(
        NAME,
        kit::http::with_standard_layers(router, &settings.http, &metrics),
        Some(state.db),
    )
}
