//! The chat service (seed 004's chat service; `crates/chat`, schema `chat`).
//!
//! Chats with a name and JSON metadata, their participants (client ids such as `user-1`), and
//! their messages, each with a per-chat sequence number; "chats of a participant" is one index
//! query. Live: a WebSocket per chat pushes every new message and participant change to its
//! subscribers, on every replica (module `live`). Stored in SQL (SQLite / PostgreSQL, the
//! default) or DynamoDB (module `store`); every change is announced through an outbox
//! (`chat.created`, `chat.deleted`, `chat.participant_added`, `chat.participant_removed`,
//! `chat.message_posted`).
//!
//! API (canonical paths; the gateway also maps seed 004's `/api/chats…` onto them):
//! - `POST /api/v1/chats`, `GET|DELETE /api/v1/chats/{id}`
//! - `POST /api/v1/chats/{id}/participants`, `DELETE /api/v1/chats/{id}/participants/{pid}`,
//!   `GET /api/v1/chats/participant/{pid}`
//! - `POST|GET /api/v1/chats/{id}/messages` (`?before=&limit=`), `GET /api/v1/chats/{id}/stream`
//! - `GET /api/v1/chats/stats`, `GET /api/v1/stats`; `/health`, `/ready`, `/metrics`

use std::sync::Arc;

use kit::service::{App, Deps, Service};
use tokio_util::sync::CancellationToken;

mod error;
mod examples;
mod live;
mod model;
mod routes;
mod settings;
mod store;

pub use routes::openapi;

/// The service's name: its config section, PostgreSQL schema and SQLite file.
pub const NAME: &str = "chat";

/// Migrations for both dialects, embedded in the binary.
pub static MIGRATIONS: kit::db::Migrations = kit::db::Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The chat service, as the `agora` binary sees it.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: Some(&MIGRATIONS),
    uses_bus: true,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: Some(|deps| Box::pin(seed(deps))),
};

/// What every handler shares.
#[derive(Clone)]
struct AppState(std::sync::Arc<SharedState>);

/// What [`AppState`] shares: handlers extract the state per request, which clones one pointer
/// rather than every field.
struct SharedState {
    store: Arc<dyn store::ChatStore>,
    settings: Arc<settings::ChatSettings>,
    hub: Arc<live::Hub>,
    /// Cancelled when the service stops: live streams close (1001).
    stop: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The store `deps` configure, with the relay it needs (run by the service; the seed loader
/// leaves it to the service).
async fn open_store(
    settings: &settings::ChatSettings,
    deps: &Deps,
) -> anyhow::Result<(Arc<dyn store::ChatStore>, Option<kit::service::Task>)> {
    Ok(match settings.store {
        settings::StoreKind::Sql => {
            let (notifier, relay) = deps.relay()?;
            let task = relay.map(|relay| -> kit::service::Task {
                Box::new(move |shutdown| relay.spawn(shutdown))
            });
            (
                Arc::new(store::sql::SqlStore::new(deps.db()?, notifier)),
                task,
            )
        }
        settings::StoreKind::Dynamodb => {
            let (store, relay) =
                store::dynamo::DynamoStore::connect(&settings.dynamodb, deps.bus()?).await?;
            (
                Arc::new(store),
                Some(Box::new(move |shutdown| relay.spawn(shutdown))),
            )
        }
    })
}

/// `agora seed`: the chats the API documentation's examples name (kept when they exist).
async fn seed(deps: Deps) -> anyhow::Result<String> {
    let settings = settings::ChatSettings::load(&deps.settings)?;
    let (store, _) = open_store(&settings, &deps).await?;
    examples::load(store.as_ref()).await
}

/// The service over its dependencies: the API, the outbox relay of its store, and the bus
/// listener that feeds the live streams.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let settings = Arc::new(settings::ChatSettings::load(&deps.settings)?);
    let bus = deps.bus()?;
    let hub = Arc::new(live::Hub::default());
    let listener = live::listener(hub.clone(), bus.clone()).await;
    let stop = CancellationToken::new();
    let (store, relay) = open_store(&settings, &deps).await?;
    let mut ready = Vec::new();
    if settings.store == settings::StoreKind::Dynamodb {
        let store = store.clone();
        ready.push(kit::http::Dependency {
            name: "dynamodb",
            required: true,
            check: Arc::new(move || {
                let store = store.clone();
                Box::pin(async move { store.ping().await })
            }),
        });
    }
    let state = AppState(std::sync::Arc::new(SharedState {
        store,
        settings,
        hub,
        stop: stop.clone(),
    }));
    let mut app = deps
        .app_with_dependencies(
            routes::router(state).merge(kit::openapi::routes(openapi())),
            ready,
        )
        .with_task(listener)
        .with_task(move |shutdown| {
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            })
        });
    app.tasks.extend(relay);
    Ok(app)
}
