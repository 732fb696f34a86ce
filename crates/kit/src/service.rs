//! How a service plugs in. Each service crate exports one [`Service`]: its name, its
//! migrations, whether it needs the bus, the topics it consumes, how to build it from one
//! [`Deps`] value, and its seed loader. The `agora` binary iterates over the list of them for
//! `up`, `serve`, `migrate` and `seed`; a service's store and domain stay private to its crate.
//!
//! A built service is an [`App`]: a named router, the background tasks it runs beside it (the
//! outbox relay, consumers), and the resources to close on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::bus::Bus;
use crate::cache::Cache;
use crate::config::Settings;
use crate::db::{Db, Migrations};
use crate::http::{Dependency, ServeOptions};
use crate::metrics::Metrics;
use crate::relay::{Notifier, Relay};
use crate::shutdown::Shutdown;

/// Builds a service from its dependencies.
pub type Build = fn(Deps) -> BoxFuture<'static, anyhow::Result<App>>;
/// Loads a service's sample data; returns a short report.
pub type Seed = fn(Deps) -> BoxFuture<'static, anyhow::Result<String>>;

/// A service, as the binary sees it.
pub struct Service {
    /// Its config section (`services.<name>`), port and `/health` name.
    pub name: &'static str,
    /// Whose data it works on: the PostgreSQL schema, SQLite file and cache namespace of that
    /// service. Its own name, except for a service that does another's background work (the
    /// order worker runs on the orders service's data).
    pub store: &'static str,
    /// Its tables (kit's outbox and consumer tables come with them); `None`: no database.
    pub migrations: Option<&'static Migrations>,
    /// It publishes (through the outbox) or consumes events, so it gets a bus.
    pub uses_bus: bool,
    /// The topics its consumers subscribe to.
    pub consumes: &'static [&'static str],
    /// Builds it (routes, background tasks) from its dependencies.
    pub build: Build,
    /// Loads its sample data (`agora seed`), keeping rows that exist; returns a short report.
    pub seed: Option<Seed>,
}

/// Everything a service is built from; cheap to clone.
#[derive(Clone)]
pub struct Deps {
    pub name: &'static str,
    /// The whole system's settings; the service reads its own section with
    /// [`Settings::section`].
    pub settings: Settings,
    /// Connected and migrated, when the service has migrations.
    pub db: Option<Db>,
    pub cache: Cache,
    /// When the service uses the bus.
    pub bus: Option<Bus>,
    pub metrics: Metrics,
    /// The store it works on (see [`Service::store`]).
    store: &'static str,
    shared: Option<Shared>,
}

/// What the services of one process share (`agora up`): one bus, so every service's events
/// reach every consumer, and one cache per data owner, so the worker's invalidations reach the
/// orders service's in-process cache. Cheap to clone.
#[derive(Clone)]
pub struct Shared {
    bus: Bus,
    caches: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, Cache>>>,
    relays: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, Notifier>>>,
}

impl Shared {
    /// Connects the configured bus.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            bus: Bus::connect(settings).await?,
            caches: Default::default(),
            relays: Default::default(),
        })
    }

    /// Around a bus already made (an in-process one, say).
    pub fn with_bus(bus: Bus) -> Self {
        Self {
            bus,
            caches: Default::default(),
            relays: Default::default(),
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    fn relay_of(&self, store: &str) -> Option<Notifier> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.get(store).cloned()
    }

    fn set_relay(&self, store: &'static str, notifier: Notifier) {
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.insert(store, notifier);
    }

    fn cache(&self, settings: &Settings, store: &'static str) -> anyhow::Result<Cache> {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cache) = caches.get(store) {
            return Ok(cache.clone());
        }
        let cache = Cache::new(settings, store)?;
        caches.insert(store, cache.clone());
        Ok(cache)
    }
}

impl Deps {
    /// Connects what `service` needs: its database (migrated as configured), its cache, and the
    /// bus; with `shared`, the bus and the cache of its data owner are those of the process.
    pub async fn connect(
        service: &Service,
        settings: &Settings,
        shared: Option<&Shared>,
    ) -> anyhow::Result<Deps> {
        let name = service.name;
        let bus = shared.map(Shared::bus);
        let db = match service.migrations {
            Some(migrations) => Some(Db::connect(settings, service.store, migrations).await?),
            None => None,
        };
        let bus = match (service.uses_bus, bus) {
            (false, _) => None,
            (true, Some(bus)) => Some(bus.clone()),
            (true, None) => Some(Bus::connect(settings).await?),
        };
        Ok(Deps {
            name,
            settings: settings.clone(),
            db,
            cache: match shared {
                Some(shared) => shared.cache(settings, service.store)?,
                None => Cache::new(settings, service.store)?,
            },
            bus,
            metrics: Metrics::new(name),
            store: service.store,
            shared: shared.cloned(),
        })
    }

    /// The outbox relay of the service's store, with the notifier that wakes it after a commit.
    /// Several services of one process on one store (orders and its worker in `agora up`) share
    /// one relay: the first gets it to run (`Some`), the others only its notifier. (Relays of
    /// separate processes take turns on PostgreSQL; SQLite is one process.)
    pub fn relay(&self) -> anyhow::Result<(Notifier, Option<Relay>)> {
        let shared = self.shared.as_ref();
        if let Some(notifier) = shared.and_then(|s| s.relay_of(self.store)) {
            return Ok((notifier, None));
        }
        let relay = Relay::new(self.db()?, self.bus()?, &self.settings.bus);
        relay.register_metrics(&self.metrics);
        let notifier = relay.notifier();
        if let Some(shared) = shared {
            shared.set_relay(self.store, notifier.clone());
        }
        Ok((notifier, Some(relay)))
    }

    /// The database; an error for a service declared without migrations.
    pub fn db(&self) -> anyhow::Result<Db> {
        self.db
            .clone()
            .with_context(|| format!("{} has no database (no migrations declared)", self.name))
    }

    /// The bus; an error for a service declared without `uses_bus`.
    pub fn bus(&self) -> anyhow::Result<Bus> {
        self.bus
            .clone()
            .with_context(|| format!("{} does not use the bus (uses_bus is false)", self.name))
    }

    /// `router` as a service: `/health` and `/ready` (reporting each dependency it has),
    /// `/metrics` (with the cache's counters), the standard layers, and the identity guard
    /// ([`crate::auth::guard`]: identity headers believed only with the service credential,
    /// `/internal/...` refused without it).
    pub fn app(&self, router: Router) -> App {
        self.app_with_dependencies(router, Vec::new())
    }

    /// [`Deps::app`], with `/ready` also checking `extra` (a store of the service's own that is
    /// not kit's database, such as the chat service's DynamoDB).
    pub fn app_with_dependencies(&self, router: Router, extra: Vec<Dependency>) -> App {
        let mut dependencies = Vec::new();
        if let Some(db) = &self.db {
            dependencies.push(Dependency::database(db));
        }
        dependencies.push(Dependency::cache(&self.cache));
        if let Some(bus) = &self.bus {
            dependencies.push(Dependency::bus(bus));
        }
        dependencies.extend(extra);
        self.cache.register_metrics(&self.metrics);
        let router = router
            .merge(crate::http::health_routes(self.name, dependencies))
            // An explicit fallback, so the guard below covers unmatched paths too (an unknown
            // `/internal/...` path is 403 to an outsider, like a known one: no probing); the
            // problem layer turns the bare 404 into a problem body.
            .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
            .layer(axum::middleware::from_fn_with_state(
                self.settings.auth.service_token.clone(),
                crate::auth::guard,
            ));
        App::new(
            self.name,
            crate::http::with_standard_layers(router, &self.settings.http, &self.metrics),
            self.db.clone(),
        )
        .with_metrics(&self.metrics)
    }
}

/// A background task: started with the server, told to stop by the token, awaited before the
/// database closes.
pub type Task = Box<dyn FnOnce(CancellationToken) -> JoinHandle<()> + Send>;

/// A built service, not yet listening.
pub struct App {
    pub name: &'static str,
    /// The complete router, standard layers included.
    pub router: Router,
    /// Closed after the server and the tasks have stopped.
    pub db: Option<Db>,
    pub tasks: Vec<Task>,
    /// `/metrics`, served on the private metrics listener when one is given
    /// ([`App::spawn_with_metrics`]).
    pub metrics: Option<Router>,
}

/// A service listening on a socket.
pub struct Running {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Where `/metrics` is served (the private listener), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    pub handle: JoinHandle<std::io::Result<()>>,
    /// Cancelled once the server has closed its listener and connections.
    pub stopped: CancellationToken,
}

/// How long a stopping service waits for its background tasks (they stop at their next step).
const TASKS_GRACE: Duration = Duration::from_secs(5);
/// How long closing the database pool may take.
const DB_CLOSE_GRACE: Duration = Duration::from_secs(2);

impl App {
    pub fn new(name: &'static str, router: Router, db: Option<Db>) -> Self {
        Self {
            name,
            router,
            db,
            tasks: Vec::new(),
            metrics: None,
        }
    }

    /// Serves `metrics` at `/metrics` on the metrics listener.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.routes());
        self
    }

    /// Runs `task` beside the server.
    pub fn with_task(
        mut self,
        task: impl FnOnce(CancellationToken) -> JoinHandle<()> + Send + 'static,
    ) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    /// Serves on `listener` until `shutdown` begins (see [`crate::http::serve`]); then stops the
    /// background tasks and closes the database. `Running::stopped` fires once the listener and
    /// its connections are closed; the handle ends when everything has.
    pub fn spawn(
        self,
        listener: TcpListener,
        shutdown: &Shutdown,
        options: ServeOptions,
    ) -> std::io::Result<Running> {
        self.spawn_with_metrics(listener, None, shutdown, options)
    }

    /// [`App::spawn`], and `/metrics` on `metrics` (a private listener: loopback, another port)
    /// until the server has stopped.
    pub fn spawn_with_metrics(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: &Shutdown,
        options: ServeOptions,
    ) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let App {
            name,
            router,
            db,
            tasks,
            metrics: metrics_router,
        } = self;
        let metrics_addr = match &metrics {
            Some(listener) if metrics_router.is_some() => Some(listener.local_addr()?),
            _ => None,
        };
        // The metrics listener lives as long as the service: it stops when the server has.
        let metrics_stop = Shutdown::new();
        if let (Some(listener), Some(router)) = (metrics, metrics_router) {
            let stop = metrics_stop.clone();
            let forced = shutdown.clone();
            let options = ServeOptions {
                drain: Duration::ZERO,
                grace: Duration::from_secs(1),
                ..options.clone()
            };
            let router = router.fallback(|| async { axum::http::StatusCode::NOT_FOUND });
            tokio::spawn(
                async move {
                    tokio::select! {
                        result = crate::http::serve(listener, router, stop, options) => {
                            if let Err(err) = result {
                                tracing::warn!(error.message = %err, "the metrics listener failed");
                            }
                        }
                        () = forced.forced() => {}
                    }
                }
                .instrument(tracing::info_span!("metrics", service = name)),
            );
        }
        // Tasks (relay, consumers) run until the server has finished its requests, so what
        // those requests wrote to the outbox is still published.
        let tasks_stop = CancellationToken::new();
        let tasks: Vec<JoinHandle<()>> = tasks
            .into_iter()
            .map(|task| task(tasks_stop.clone()))
            .collect();
        let stopped = CancellationToken::new();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("server", service = name);
        let handle = tokio::spawn(
            {
            let stopped = stopped.clone();
            async move {
                let server_stopped = stopped.drop_guard();
                let result = crate::http::serve(listener, router, shutdown.clone(), options).await;
                metrics_stop.begin();
                drop(server_stopped);
                tasks_stop.cancel();
                let tasks = futures::future::join_all(tasks);
                tokio::select! {
                    _ = tasks => {}
                    () = tokio::time::sleep(TASKS_GRACE) => {
                        tracing::warn!(service = name, "background tasks still running; leaving them");
                    }
                    () = shutdown.forced() => {}
                }
                if let Some(db) = db
                    && tokio::time::timeout(DB_CLOSE_GRACE, db.close()).await.is_err()
                {
                    tracing::warn!(service = name, "database pool did not close in time");
                }
                result
            }
        }
            .instrument(span),
        );
        Ok(Running {
            name,
            addr,
            metrics_addr,
            handle,
            stopped,
        })
    }
}
