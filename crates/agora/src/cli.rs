//! The command line: `up`, `serve <service>`, `migrate`, `seed`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use kit::Settings;
use kit::bus::Bus;
use kit::config::DatabaseBackend;
use tokio_util::sync::CancellationToken;

use crate::services;

/// Agora: users, catalog, orders and more behind one API gateway.
///
/// With no DATABASE_URL or REDIS_URL it runs on the embedded default (SQLite files under
/// ./data, an in-process cache): nothing to install. Set them to run on PostgreSQL and Redis.
#[derive(Debug, Parser)]
#[command(name = "agora", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file, layered over the built-in defaults and under AGORA_* variables.
    /// Used when present; an explicitly given file must exist.
    #[arg(long, short, global = true, env = "AGORA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service in this process; the gateway listens on 127.0.0.1:8080.
    ///
    /// Each service gets its own loopback port (see `services.<name>.port`). Stop with Ctrl-C
    /// or SIGTERM: requests in flight finish first.
    Up,
    /// Run one service in this process (the distributed mode: one process per service, as
    /// many replicas as you like behind the gateway).
    Serve {
        /// users, catalog or gateway
        service: String,
        /// Listen on this port instead of `services.<name>.port` (0 = any free port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Apply every service's database migrations and exit.
    Migrate,
    /// Print the effective configuration (defaults, file and environment merged) as TOML,
    /// with passwords in URLs hidden, and exit.
    Config,
    /// Load the sample data of seed 001 (4 users with ids 1-4, 10 products with ids 1-10); rows
    /// that exist are kept.
    Seed,
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        let settings = self.settings()?;
        kit::telemetry::init(&settings.log);
        match self.command {
            Command::Up => up(settings).await,
            Command::Serve { service, port } => serve(settings, &service, port).await,
            Command::Migrate => migrate(settings).await,
            Command::Seed => seed(settings).await,
            Command::Config => print_config(settings),
        }
    }

    fn settings(&self) -> anyhow::Result<Settings> {
        let path = match &self.config {
            Some(path) => {
                anyhow::ensure!(
                    path.exists(),
                    "configuration file {} does not exist",
                    path.display()
                );
                Some(path.clone())
            }
            None => Some(PathBuf::from("agora.toml")).filter(|p| p.exists()),
        };
        Ok(Settings::load(path.as_deref())?)
    }
}

fn describe_backends(settings: &Settings) -> String {
    let database = match settings.database_backend(users::NAME) {
        DatabaseBackend::Sqlite { .. } => format!("SQLite under {}", settings.data_dir.display()),
        DatabaseBackend::Postgres { .. } => "PostgreSQL (one schema per service)".to_owned(),
    };
    let cache = match &settings.redis.url {
        Some(_) => "Redis",
        None => "in-process cache",
    };
    let bus = match &settings.bus.url {
        Some(_) => "NATS JetStream",
        None => "in-process bus",
    };
    format!("{database}, {cache}, {bus}")
}

async fn up(settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let shutdown = kit::shutdown::on_signal();
    let mut running = Vec::new();
    let mut upstreams = BTreeMap::new();
    // One bus for the whole process: every service's events reach every consumer.
    let bus = Bus::connect(&settings).await?;
    for name in services::BACKENDS {
        let listener = kit::http::bind(settings.bind_addr(name)).await?;
        let app = services::build(name, &settings, Some(&bus))
            .await
            .with_context(|| format!("starting {name}"))?;
        let service = app.spawn(listener, shutdown.clone(), &settings)?;
        let configured = &settings.service(name).upstreams;
        let urls = if configured.is_empty() {
            vec![url::Url::parse(&format!("http://{}", service.addr))?]
        } else {
            configured.clone()
        };
        upstreams.insert((*name).to_owned(), urls);
        running.push(service);
    }
    let listener = kit::http::bind(settings.bind_addr(gateway::NAME)).await?;
    let gateway = gateway::app_with_upstreams(&settings, upstreams).spawn(
        listener,
        shutdown.clone(),
        &settings,
    )?;
    running.push(gateway);

    println!(
        "agora is up in {:.0?} on {}",
        started.elapsed(),
        describe_backends(&settings)
    );
    for service in &running {
        println!("  {:<8} http://{}", service.name, service.addr);
    }
    let gateway = running
        .last()
        .map(|s| s.addr.to_string())
        .unwrap_or_default();
    println!(
        "try: curl http://{gateway}/api/v1/users   curl http://{gateway}/api/v1/products   \
         (Ctrl-C to stop)"
    );
    wait_all(running, shutdown).await
}

async fn serve(mut settings: Settings, name: &str, port: Option<u16>) -> anyhow::Result<()> {
    if let Some(port) = port {
        settings.services.entry(name.to_owned()).or_default().port = port;
    }
    let shutdown = kit::shutdown::on_signal();
    let listener = kit::http::bind(settings.bind_addr(name)).await?;
    let app = services::build(name, &settings, None)
        .await
        .with_context(|| format!("starting {name}"))?;
    let service = app.spawn(listener, shutdown.clone(), &settings)?;
    tracing::info!(service = service.name, addr = %service.addr, backends = %describe_backends(&settings), "listening");
    println!("{} listening on http://{}", service.name, service.addr);
    wait_all(vec![service], shutdown).await
}

/// Waits for every server; if one stops on its own (an error), stops the others too.
async fn wait_all(
    running: Vec<kit::service::Running>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pending: FuturesUnordered<_> = running
        .into_iter()
        .map(|r| async move { (r.name, r.handle.await) })
        .collect();
    let mut failure = None;
    while let Some((name, result)) = pending.next().await {
        let err = match result {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => anyhow::Error::from(err),
            Err(join) => anyhow::Error::from(join),
        };
        shutdown.cancel();
        failure.get_or_insert(err.context(format!("{name} stopped")));
    }
    match failure {
        Some(err) => Err(err),
        None => {
            println!("agora stopped");
            Ok(())
        }
    }
}

fn print_config(mut settings: Settings) -> anyhow::Result<()> {
    let hide = |url: &mut Option<String>| {
        if let Some(value) = url
            && let Ok(mut parsed) = url::Url::parse(value)
            && parsed.password().is_some()
            && parsed.set_password(Some("***")).is_ok()
        {
            *value = parsed.to_string();
        }
    };
    hide(&mut settings.database.url);
    hide(&mut settings.redis.url);
    print!(
        "{}",
        toml::to_string_pretty(&settings).context("rendering the configuration")?
    );
    Ok(())
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    for (service, backend) in services::migrate(&settings).await? {
        println!("migrated {service} ({backend})");
    }
    Ok(())
}

/// Seed 001's sample data (its `database/init.sql`, as JSON).
const SEED_001: &str = include_str!("../seed/seed-001-sample.json");

#[derive(serde::Deserialize)]
struct SeedFile {
    users: Vec<SeedUser>,
    products: Vec<SeedProduct>,
}

#[derive(serde::Deserialize)]
struct SeedUser {
    id: i64,
    username: String,
    email: String,
}

#[derive(serde::Deserialize)]
struct SeedProduct {
    id: i64,
    name: String,
    description: String,
    price: catalog::money::Money,
    stock: i64,
    category: String,
}

async fn seed(settings: Settings) -> anyhow::Result<()> {
    let data: SeedFile =
        serde_json::from_str(SEED_001).context("parsing the built-in seed data")?;

    let db = kit::Db::connect(&settings, users::NAME, &users::MIGRATIONS).await?;
    let mut added_users = 0;
    for user in &data.users {
        let fields = users::domain::UserFields {
            username: Some(user.username.clone()),
            email: Some(user.email.clone()),
            name: None,
        };
        if users::store::insert_with_id(&db, user.id, &fields).await? {
            added_users += 1;
        }
    }
    db.close().await;

    let db = kit::Db::connect(&settings, catalog::NAME, &catalog::MIGRATIONS).await?;
    let threshold = catalog::low_stock_threshold(&settings)?;
    let mut added_products = 0;
    for product in &data.products {
        let new = catalog::domain::NewProduct {
            name: product.name.clone(),
            description: product.description.clone(),
            sku: None,
            category: Some(product.category.clone()),
            price: product.price,
            stock: product.stock,
            low_stock_threshold: threshold,
        };
        let sku = format!("SEED-{:04}", product.id);
        if catalog::store::insert_with_id(&db, product.id, &new, &sku).await? {
            added_products += 1;
        }
    }
    db.close().await;

    println!(
        "seeded users: {added_users} added, {} already present; products: {added_products} added, \
         {} already present ({})",
        data.users.len() - added_users,
        data.products.len() - added_products,
        describe_backends(&settings)
    );
    Ok(())
}
