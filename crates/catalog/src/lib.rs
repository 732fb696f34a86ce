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

use kit::bus::Bus;
use kit::http::Dependency;
use kit::relay::{Notifier, Relay};
use kit::service::App;
use kit::{Cache, Db, Settings};

pub mod domain;
mod error;
pub mod events;
pub mod money;
mod reservations;
mod routes;
pub mod store;

pub use error::Error;

/// The service's name: its config section, PostgreSQL schema, SQLite file and cache namespace.
pub const NAME: &str = "catalog";

/// The stock.low threshold of new products when neither the request nor
/// `services.catalog.low_stock_threshold` gives one.
pub const DEFAULT_LOW_STOCK_THRESHOLD: i64 = 10;

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
    /// Wakes the outbox relay after a commit.
    pub outbox: Notifier,
    /// Threshold of products created without one.
    pub low_stock_threshold: i64,
}

/// Connects (and migrates) the database, sets up the cache, and builds the service with its
/// outbox relay publishing to `bus`.
pub async fn app(settings: &Settings, bus: Bus) -> anyhow::Result<App> {
    let db = Db::connect(settings, NAME, &MIGRATIONS).await?;
    let cache = Cache::new(settings, NAME)?;
    app_with(settings, db, cache, bus)
}

/// The service over existing handles (tests keep the database handle to inspect or sabotage it).
pub fn app_with(settings: &Settings, db: Db, cache: Cache, bus: Bus) -> anyhow::Result<App> {
    let relay = Relay::new(db.clone(), bus.clone(), &settings.bus);
    let state = AppState {
        db: db.clone(),
        cache,
        outbox: relay.notifier(),
        low_stock_threshold: low_stock_threshold(settings)?,
    };
    let dependencies = vec![
        Dependency::database(&state.db),
        Dependency::cache(&state.cache),
        Dependency::bus(&bus),
    ];
    let metrics = kit::metrics::Metrics::new(NAME);
    state.cache.register_metrics(&metrics);
    relay.register_metrics(&metrics);
    let router = routes::router(state).merge(kit::http::health_routes(NAME, dependencies));
    Ok(App::new(
        NAME,
        kit::http::with_standard_layers(router, &settings.http, &metrics),
        Some(db),
    )
    .with_task(move |shutdown| relay.spawn(shutdown)))
}

/// `services.catalog.low_stock_threshold`, checked.
pub fn low_stock_threshold(settings: &Settings) -> anyhow::Result<i64> {
    let Some(value) = settings.service(NAME).extra.remove("low_stock_threshold") else {
        return Ok(DEFAULT_LOW_STOCK_THRESHOLD);
    };
    value
        .to_i128()
        .and_then(|v| i64::try_from(v).ok())
        .and_then(|v| domain::parse_units(v).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "configuration key `services.catalog.low_stock_threshold`: must be a whole \
                 number from 0 to {}",
                domain::MAX_UNITS
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_threshold(value: figment::value::Value) -> Settings {
        let mut settings = Settings::defaults();
        if let Some(catalog) = settings.services.get_mut(NAME) {
            catalog.extra.insert("low_stock_threshold".into(), value);
        }
        settings
    }

    #[test]
    fn the_configured_low_stock_threshold_is_used_and_checked() {
        assert_eq!(
            low_stock_threshold(&Settings::defaults()).ok(),
            Some(DEFAULT_LOW_STOCK_THRESHOLD)
        );
        assert_eq!(low_stock_threshold(&with_threshold(3.into())).ok(), Some(3));
        for bad in [(-1).into(), "many".into()] {
            let err = low_stock_threshold(&with_threshold(bad)).expect_err("refused");
            assert!(
                err.to_string()
                    .contains("services.catalog.low_stock_threshold")
            );
        }
    }
}
