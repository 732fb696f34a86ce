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

use crate::bus::Bus;
use crate::cache::Cache;
use crate::config::Settings;
use crate::db::{Db, Migrations};
use crate::http::Dependency;
use crate::metrics::Metrics;

/// Builds a service from its dependencies.
pub type Build = fn(Deps) -> BoxFuture<'static, anyhow::Result<App>>;
/// Loads a service's sample data; returns a short report.
pub type Seed = fn(Deps) -> BoxFuture<'static, anyhow::Result<String>>;

/// A service, as the binary sees it.
pub struct Service {
    /// Its config section (`services.<name>`), PostgreSQL schema, SQLite file, cache namespace.
    pub name: &'static str,
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
}

impl Deps {
    /// Connects what `service` needs: its database (migrated as configured), its cache, and the
    /// bus (`bus` when given, so the services of one process share it, else the configured one).
    pub async fn connect(
        service: &Service,
        settings: &Settings,
        bus: Option<&Bus>,
    ) -> anyhow::Result<Deps> {
        let name = service.name;
        let db = match service.migrations {
            Some(migrations) => Some(Db::connect(settings, name, migrations).await?),
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
            cache: Cache::new(settings, name)?,
            bus,
            metrics: Metrics::new(name),
        })
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
    /// `/metrics` (with the cache's counters), and the standard layers.
    pub fn app(&self, router: Router) -> App {
        let mut dependencies = Vec::new();
        if let Some(db) = &self.db {
            dependencies.push(Dependency::database(db));
        }
        dependencies.push(Dependency::cache(&self.cache));
        if let Some(bus) = &self.bus {
            dependencies.push(Dependency::bus(bus));
        }
        self.cache.register_metrics(&self.metrics);
        let router = router.merge(crate::http::health_routes(self.name, dependencies));
        App::new(
            self.name,
            crate::http::with_standard_layers(router, &self.settings.http, &self.metrics),
            self.db.clone(),
        )
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
}

/// A service listening on a socket.
pub struct Running {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl App {
    pub fn new(name: &'static str, router: Router, db: Option<Db>) -> Self {
        Self {
            name,
            router,
            db,
            tasks: Vec::new(),
        }
    }

    /// Runs `task` beside the server.
    pub fn with_task(
        mut self,
        task: impl FnOnce(CancellationToken) -> JoinHandle<()> + Send + 'static,
    ) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    /// Serves on `listener` until `shutdown` fires; the returned handle ends once the requests in
    /// flight and the background tasks have finished.
    pub fn spawn(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        settings: &Settings,
    ) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let grace = Duration::from_secs(settings.http.shutdown_grace_secs);
        let App {
            name,
            router,
            db,
            tasks,
        } = self;
        let tasks: Vec<JoinHandle<()>> = tasks
            .into_iter()
            .map(|task| task(shutdown.child_token()))
            .collect();
        let handle = tokio::spawn(async move {
            let result = crate::http::serve(listener, router, shutdown, grace).await;
            for task in tasks {
                // Tasks stop on the same signal; a panicked one has nothing left to wait for.
                let _ = tokio::time::timeout(grace, task).await;
            }
            if let Some(db) = db {
                db.close().await;
            }
            result
        });
        Ok(Running { name, addr, handle })
    }
}
