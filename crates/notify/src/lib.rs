//! The notification service (seed 003's notification service; `crates/notify`, schema `notify`).
//!
//! It consumes `user.registered`, `order.created`, `order.processed`, `order.failed`,
//! `order.cancelled` and `stock.low` through kit's consumer, renders each event's template
//! (module `templates`) and records one delivery per channel and recipient (module `consume`);
//! the dispatcher sends them by log, SMTP or signed webhook, with retries and back-off (module
//! `deliver`). Every delivery is kept: event, channel, recipient, status (`pending`, `sent`,
//! `failed`), attempts, last error, timestamps.
//!
//! API (canonical paths; the gateway also maps `/api/notifications…` onto them):
//! - `GET /api/v1/notifications?user_id=&status=&page=&per_page=` (newest first)
//! - `GET /api/v1/notifications/{id}`, `POST /api/v1/notifications/{id}/retry` (a failed one;
//!   otherwise 409 `not_failed`)
//! - `GET /api/v1/notifications/stats`, `GET /api/v1/stats`; `/health`, `/ready`, `/metrics`

use std::sync::Arc;
use std::time::Duration;

use kit::Db;
use kit::client::ServiceClient;
use kit::consumer::{Consumer, DeadLetters};
use kit::service::{App, Deps, Service};
use tokio::sync::Notify;

mod consume;
mod deliver;
mod error;
mod routes;
mod settings;
mod store;
mod templates;

pub use deliver::webhook_signature;
pub use routes::openapi;

/// The service's name: its config section, PostgreSQL schema and SQLite file.
pub const NAME: &str = "notify";
/// The durable consumer name every replica shares.
pub const CONSUMER: &str = "notify";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The notification service, as the `agora` binary sees it.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &settings::EVENT_TYPES,
    build: |deps| Box::pin(app(deps)),
    seed: None,
};

/// What every handler shares.
#[derive(Clone)]
struct AppState(std::sync::Arc<SharedState>);

/// What [`AppState`] shares: handlers extract the state per request, which clones one pointer
/// rather than every field.
struct SharedState {
    db: Db,
    /// Wakes the dispatcher (after a retry).
    wake: Arc<Notify>,
    dead_letters: DeadLetters,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The service over its dependencies: the API, the consumer and the dispatcher. Settings and
/// templates are checked here: a mistake in either stops the start with the key or file named.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let settings = Arc::new(settings::NotifySettings::load(&deps.settings)?);
    let templates = Arc::new(templates::Templates::load(
        settings.templates_dir.as_deref(),
    )?);
    let channels = Arc::new(deliver::Channels::new(&settings)?);
    let db = deps.db()?;
    let bus = deps.bus()?;
    let wake = Arc::new(Notify::new());
    let mut users = ServiceClient::new(
        "users",
        deps.settings.upstreams("users"),
        Duration::from_millis(settings.call_timeout_ms),
    )?;
    if let Some(token) = &deps.settings.auth.service_token {
        users = users.with_header(&kit::auth::SERVICE_TOKEN_HEADER, token.expose())?;
    }
    let recorder = consume::Recorder {
        templates,
        settings: settings.clone(),
        users: Arc::new(users),
        wake: wake.clone(),
    };
    let consumer = Consumer::new(
        CONSUMER,
        SERVICE.consumes,
        db.clone(),
        bus,
        &deps.settings.bus,
        recorder,
    )
    .with_concurrency(settings.concurrency);
    consumer.register_metrics(&deps.metrics);
    let dispatcher =
        deliver::Dispatcher::new(db.clone(), channels, settings, wake.clone(), &deps.metrics);
    let state = AppState(std::sync::Arc::new(SharedState {
        db,
        wake,
        dead_letters: consumer.dead_letters(),
    }));
    Ok(deps
        .app(routes::router(state).merge(kit::openapi::routes(openapi())))
        .with_task(move |shutdown| consumer.spawn(shutdown))
        .with_task(move |shutdown| tokio::spawn(dispatcher.run(shutdown))))
}
