//! The catalog and inventory service: products, categories, stock that never oversells, and the
//! reservations orders hold on it. Cache-aside reads; every change is announced through the
//! transactional outbox (`product.*`, `stock.changed`, `stock.low`), published by the relay.
//!
//! API (canonical paths; the gateway maps seed 003's `/api/inventory/products/{id}` onto them):
//! - `POST /api/v1/products`, `GET /api/v1/products?category=&page=&per_page=`
//! - `GET|PUT|PATCH|DELETE /api/v1/products/{id}`
//! - `PATCH /api/v1/products/{id}/stock` with `{"stock": N}` (set) or `{"delta": N}` (adjust)
//! - `GET /api/v1/categories`, `GET /api/v1/products/stats`, `GET /api/v1/stats`
//! - internal, for the orders service (not routed by the gateway):
//!   `POST /internal/v1/reservations` `{order_id, items: [{product_id, quantity}]}`,
//!   `GET /internal/v1/reservations/{order_id}`,
//!   `POST /internal/v1/reservations/{order_id}/commit`, `.../release`
//! - `/health`, `/ready`, `/metrics`

use kit::config::ConfigError;
use kit::relay::{Notifier, Relay};
use kit::service::{App, Deps, Service};
use kit::{Cache, Db, Settings};
use serde::Deserialize;

mod domain;
mod error;
mod events;
use kit::money;
mod reservations;
mod routes;
mod seed;
mod store;

pub use routes::openapi;

/// The service's name: its config section, PostgreSQL schema, SQLite file and cache namespace.
pub const NAME: &str = "catalog";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The catalog, as the `agora` binary sees it.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: Some(|deps| Box::pin(seed::seed(deps))),
};

/// The keys of `[services.catalog]` of its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CatalogSettings {
    /// The stock.low threshold of new products that do not give their own (and of seeded ones).
    low_stock_threshold: i64,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            low_stock_threshold: 10,
        }
    }
}

impl CatalogSettings {
    /// `[services.catalog]`, checked; the error names the offending key.
    fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let section: Self = settings.section(NAME)?;
        domain::parse_units(section.low_stock_threshold).map_err(|_| ConfigError::Invalid {
            key: format!("services.{NAME}.low_stock_threshold"),
            message: format!("must be a whole number from 0 to {}", domain::MAX_UNITS),
        })?;
        Ok(section)
    }
}

/// What every handler shares.
#[derive(Clone)]
struct AppState(std::sync::Arc<SharedState>);

/// What [`AppState`] shares: handlers extract the state per request, which clones one pointer
/// rather than every field.
struct SharedState {
    db: Db,
    cache: Cache,
    /// Wakes the outbox relay after a commit.
    outbox: Notifier,
    /// Threshold of products created without one.
    low_stock_threshold: i64,
    /// Where concurrent reserves are done together.
    reserves: routes::Reserves,
    /// Where concurrent commits of reservations are done together.
    commits: routes::Commits,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The service over its dependencies, with its outbox relay publishing to the bus.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let settings = CatalogSettings::load(&deps.settings)?;
    let db = deps.db()?;
    let relay = Relay::new(db.clone(), deps.bus()?, &deps.settings.bus);
    relay.register_metrics(&deps.metrics);
    let state = AppState(std::sync::Arc::new(SharedState {
        reserves: routes::reserves(db.clone(), deps.cache.clone(), relay.notifier()),
        commits: routes::commits(db.clone(), deps.cache.clone(), relay.notifier()),
        db,
        cache: deps.cache.clone(),
        outbox: relay.notifier(),
        low_stock_threshold: settings.low_stock_threshold,
    }));
    Ok(deps
        .app(routes::router(state).merge(kit::openapi::routes(openapi())))
        .with_task(move |shutdown| relay.spawn(shutdown)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(key: &str, value: figment::value::Value) -> Settings {
        let mut settings = Settings::defaults();
        if let Some(catalog) = settings.services.get_mut(NAME) {
            catalog.extra.insert(key.into(), value);
        }
        settings
    }

    fn threshold(settings: &Settings) -> Result<i64, ConfigError> {
        CatalogSettings::load(settings).map(|s| s.low_stock_threshold)
    }

    #[test]
    fn the_configured_low_stock_threshold_is_used_and_checked() {
        assert_eq!(threshold(&Settings::defaults()).ok(), Some(10));
        let mut unset = Settings::defaults();
        if let Some(catalog) = unset.services.get_mut(NAME) {
            catalog.extra.clear();
        }
        assert_eq!(threshold(&unset).ok(), Some(10), "the default");
        assert_eq!(
            threshold(&with("low_stock_threshold", 3.into())).ok(),
            Some(3)
        );
        for bad in [(-1).into(), 1_000_000_001_i64.into(), "many".into()] {
            let err = threshold(&with("low_stock_threshold", bad)).expect_err("refused");
            assert!(
                err.to_string()
                    .contains("`services.catalog.low_stock_threshold`"),
                "{err}"
            );
        }
        let err = threshold(&with("low_stok_threshold", 3.into())).expect_err("misspelt");
        assert!(err.to_string().contains("low_stok_threshold"), "{err}");
    }
}
