//! The orders service and the order worker.
//!
//! Orders (`crates/orders`, schema `orders`): validated creation (the user and the products
//! checked with their owners, the stock held at catalog, the total computed from catalog's
//! prices), stored `pending` with its lines and `order.created` in one transaction and answered
//! at once; `Idempotency-Key`; lists, a cached read, a status state machine and cancellation.
//!
//! API (canonical paths; the gateway maps seed 002's `/orders…` and seed 003's `/api/orders…`
//! onto them):
//! - `POST /api/v1/orders` (`{items: [{product_id, quantity}]}`, `{user_id, product_id, quantity,
//!   total_price}` or `{user_id, item, quantity}`), `GET /api/v1/orders?user_id=&status=&page=`
//! - `GET /api/v1/orders/{id}`, `PATCH /api/v1/orders/{id}/status`, `POST
//!   /api/v1/orders/{id}/cancel`
//! - `GET /api/v1/orders/stats`, `GET /api/v1/stats`; `/health`, `/ready`, `/metrics`
//!
//! The worker ([`WORKER`], module `worker`) processes orders in the background.

use std::time::Duration;

use kit::config::ConfigError;
use kit::relay::Notifier;
use kit::service::{App, Deps, Service};
use kit::{Cache, Db, Settings};
use serde::Deserialize;

mod batches;
mod clients;
mod create;
mod domain;
mod error;
mod events;
mod routes;
mod seed;
mod store;

pub use routes::openapi;
mod worker;

/// The service's name: its config section, PostgreSQL schema, SQLite file and cache namespace.
pub const NAME: &str = "orders";
/// The worker's name (`agora serve worker`); it works on the orders service's data.
pub const WORKER_NAME: &str = "worker";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The orders service, as the `agora` binary sees it.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: Some(|deps| Box::pin(seed::seed(deps))),
};

/// The order worker: consumes the orders service's events, on its data.
pub static WORKER: Service = Service {
    name: WORKER_NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &["order.*"],
    build: |deps| Box::pin(worker::app(deps)),
    seed: None,
};

/// `[services.orders]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct OrdersSettings {
    /// A client `total_price` that differs from the catalog total is a 422 (else a warning).
    strict_client_total: bool,
    /// A reservation for an order not stored after this long is released.
    reservation_timeout_secs: u64,
    /// How long an `Idempotency-Key` is remembered.
    idempotency_ttl_hours: u64,
    /// Time limit of each call to users and catalog.
    call_timeout_ms: u64,
}

impl Default for OrdersSettings {
    fn default() -> Self {
        Self {
            strict_client_total: false,
            reservation_timeout_secs: 60,
            idempotency_ttl_hours: 24,
            call_timeout_ms: 2000,
        }
    }
}

/// `[services.worker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WorkerSettings {
    /// Orders handled at once by one worker.
    concurrency: usize,
    /// How long the simulated payment takes.
    payment_latency_ms: u64,
    /// The share of payments declined (0 to 1), decided per order.
    payment_failure_rate: f64,
    /// How often the sweep looks for orders left waiting (and how long "waiting" is).
    sweep_secs: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 128,
            payment_latency_ms: 5,
            payment_failure_rate: 0.0,
            sweep_secs: 5,
        }
    }
}

/// Both sections, checked; an error names the offending key.
fn load_settings(settings: &Settings) -> Result<(OrdersSettings, WorkerSettings), ConfigError> {
    let orders: OrdersSettings = settings.section(NAME)?;
    let worker: WorkerSettings = settings.section(WORKER_NAME)?;
    let invalid = |section: &str, key: &str, message: &str| ConfigError::Invalid {
        key: format!("services.{section}.{key}"),
        message: message.to_owned(),
    };
    if orders.reservation_timeout_secs < 5 {
        return Err(invalid(
            NAME,
            "reservation_timeout_secs",
            "must be 5 or more",
        ));
    }
    if orders.idempotency_ttl_hours == 0 {
        return Err(invalid(NAME, "idempotency_ttl_hours", "must be 1 or more"));
    }
    if !(50..=60_000).contains(&orders.call_timeout_ms) {
        return Err(invalid(NAME, "call_timeout_ms", "must be 50 to 60000"));
    }
    if !(1..=256).contains(&worker.concurrency) {
        return Err(invalid(WORKER_NAME, "concurrency", "must be 1 to 256"));
    }
    if !(0.0..=1.0).contains(&worker.payment_failure_rate) {
        return Err(invalid(
            WORKER_NAME,
            "payment_failure_rate",
            "must be 0 to 1",
        ));
    }
    if worker.payment_latency_ms > 60_000 {
        return Err(invalid(
            WORKER_NAME,
            "payment_latency_ms",
            "must be at most 60000",
        ));
    }
    if worker.sweep_secs == 0 {
        return Err(invalid(WORKER_NAME, "sweep_secs", "must be 1 or more"));
    }
    Ok((orders, worker))
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
    neighbours: std::sync::Arc<clients::Neighbours>,
    /// Where concurrent creates write together.
    batches: batches::Batches,
    settings: OrdersSettings,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The service over its dependencies, with its outbox relay and the sweep of reservations made
/// for orders that were never stored.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let (settings, _) = load_settings(&deps.settings)?;
    let db = deps.db()?;
    let (outbox, relay) = deps.relay()?;
    let state = AppState(std::sync::Arc::new(SharedState {
        batches: batches::Batches::new(&db),
        db,
        cache: deps.cache.clone(),
        outbox,
        neighbours: std::sync::Arc::new(clients::Neighbours::new(
            &deps.settings,
            Duration::from_millis(settings.call_timeout_ms),
        )?),
        settings,
    }));
    let sweeper = state.clone();
    let mut app = deps
        .app(routes::router(state).merge(kit::openapi::routes(openapi())))
        .with_task(move |shutdown| tokio::spawn(sweep_intents(sweeper, shutdown)));
    if let Some(relay) = relay {
        app = app.with_task(move |shutdown| relay.spawn(shutdown));
    }
    Ok(app)
}

/// Every few seconds: release the reservations of orders never stored, forget expired keys.
async fn sweep_intents(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    let every = Duration::from_secs((state.settings.reservation_timeout_secs / 4).clamp(1, 15));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if let Err(err) = create::sweep_intents(&state).await {
            tracing::debug!(error.message = %kit::ApiError::from(err), "the reservation sweep failed; trying again next period");
        }
        let expired = kit::db::query("delete from idempotency_keys where expires_at < $1")
            .bind(store::now())
            .execute(&state.db)
            .await;
        if let Err(err) = expired {
            tracing::debug!(error.message = %err, "forgetting expired idempotency keys failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_have_defaults_and_bad_values_name_their_key() {
        let (orders, worker) = load_settings(&Settings::defaults()).expect("defaults");
        assert_eq!(orders, OrdersSettings::default());
        assert_eq!(worker, WorkerSettings::default());
        let mut bad = Settings::defaults();
        if let Some(section) = bad.services.get_mut(WORKER_NAME) {
            section
                .extra
                .insert("payment_failure_rate".into(), 2.0.into());
        }
        let err = load_settings(&bad).expect_err("refused");
        assert!(
            err.to_string()
                .contains("services.worker.payment_failure_rate"),
            "{err}"
        );
    }
}
