//! The command line: `up`, `serve <service>`, `migrate`, `seed`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use kit::Settings;
use kit::auth::AuthMode;
use kit::bus::Bus;
use kit::http::ServeOptions;
use kit::service::{Deps, Shared};
use kit::shutdown::Shutdown;
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
        /// The service to run: users, catalog, orders, worker (the order worker; run as many as
        /// you like), notify, cache, chat or gateway.
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
    /// Load the sample data of seed 001 (4 users with ids 1-4, 10 products with ids 1-10, 8 orders
    /// with ids 1-8), the products other seeds' walkthroughs order (11 and 123), and
    /// an admin account (admin@agora.local, generated password kept in data_dir/admin-password,
    /// printed with how to log in); rows that exist are kept.
    Seed,
    /// Measure Agora's hot paths beside bare-library references (loopback only, bounded in
    /// time and connections). Without a subcommand: starts its own system on --base-port (or
    /// measures --url), runs the scenarios and prints a table; `orders` and `cache` measure a
    /// running system's orders and cache service.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        command: Option<Bench>,
        #[command(flatten)]
        hot: Box<crate::bench_hot::HotBench>,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Orders accepted per second, and accepted → processed latency at a fixed rate.
    Orders(crate::bench::OrdersBench),
    /// Seed 000's cache service: SET and GET per second through the gateway, beside a bare
    /// axum handler doing one Redis GET (`--redis-url`).
    Cache(crate::bench_cache::CacheBench),
    /// The chat service: messages posted per second, and post → WebSocket delivery latency to
    /// `--subscribers` subscribers of one chat.
    Chat(crate::bench_chat::ChatBench),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        if let Command::Bench { command, hot } = self.command {
            return match command {
                Some(Bench::Orders(args)) => crate::bench::orders(args).await,
                Some(Bench::Cache(args)) => crate::bench_cache::cache(args).await,
                Some(Bench::Chat(args)) => crate::bench_chat::chat(args).await,
                None => crate::bench_hot::hot(*hot).await,
            };
        }
        let settings = self.settings()?;
        kit::telemetry::init(&settings.log);
        match self.command {
            Command::Up => up(settings).await,
            Command::Serve { service, port } => serve(settings, &service, port).await,
            Command::Migrate => migrate(settings).await,
            Command::Seed => seed(settings).await,
            Command::Config => print_config(settings),
            Command::Bench { .. } => unreachable!("handled above, without settings"),
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
    let database = match &settings.database.url {
        None => format!("SQLite under {}", settings.data_dir.display()),
        Some(_) => "PostgreSQL (one schema per service)".to_owned(),
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

/// `agora up`'s keys: from the configuration when set, else generated on first start and kept
/// under `data_dir/secrets/` (0600), so tokens survive a restart. The mode defaults to `open`.
fn embedded_auth(settings: &mut Settings) -> anyhow::Result<()> {
    let dir = settings.data_dir.join("secrets");
    if !dir.exists() {
        // Only its owner may list or enter it.
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let auth = &mut settings.auth;
    auth.mode.get_or_insert(AuthMode::Open);
    if auth.jwt_secret.is_none() {
        auth.jwt_secret = Some(kit::auth::load_or_create_secret(&dir.join("jwt_secret"))?);
    }
    if auth.service_token.is_none() {
        auth.service_token = Some(kit::auth::load_or_create_secret(
            &dir.join("service_token"),
        )?);
    }
    Ok(())
}

fn describe_auth(settings: &Settings) -> String {
    match settings.auth.mode() {
        AuthMode::Open => "auth: open (tokens are verified when sent; requests without one are \
                           allowed; AGORA_AUTH__MODE=required to refuse them)"
            .to_owned(),
        AuthMode::Required => {
            "auth: required (requests without a token get 401 except health, register, login \
             and catalog reads)"
                .to_owned()
        }
    }
}

async fn up(mut settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    embedded_auth(&mut settings)?;
    let shutdown = Shutdown::on_signal();
    // The services behind the gateway stop after it, so that what it forwards still finds them.
    let behind_gateway = Shutdown::new();
    // Every listener first, so the gateway can be pointed at the addresses actually bound.
    let mut listeners = Vec::new();
    for service in services::ALL {
        let listener = kit::http::bind(settings.bind_addr(service.name)).await?;
        let metrics = kit::http::bind(settings.metrics_addr(service.name)).await?;
        let addr = listener.local_addr()?;
        let configured = settings
            .services
            .entry(service.name.to_owned())
            .or_default();
        if configured.upstreams.is_empty() {
            configured.upstreams = vec![url::Url::parse(&format!("http://{addr}"))?];
        }
        listeners.push((service, listener, metrics));
    }
    // One bus for the whole process: every service's events reach every consumer.
    let shared = Shared::connect(&settings).await?;
    let mut running = Vec::new();
    for (service, listener, metrics) in listeners {
        let name = service.name;
        let deps = Deps::connect(service, &settings, Some(&shared))
            .await
            .with_context(|| format!("starting {name}"))?;
        let app = (service.build)(deps)
            .await
            .with_context(|| format!("starting {name}"))?;
        let options = ServeOptions::from(&settings.http);
        running.push(if name == gateway::NAME {
            app.spawn_with_metrics(listener, Some(metrics), &shutdown, options)?
        } else {
            // Their drain already happened in front of them, at the gateway.
            let options = ServeOptions {
                drain: Duration::ZERO,
                ..options
            };
            app.spawn_with_metrics(listener, Some(metrics), &behind_gateway, options)?
        });
    }
    let gateway_stopped = running
        .iter()
        .find(|s| s.name == gateway::NAME)
        .map(|s| s.stopped.clone())
        .unwrap_or_default();
    tokio::spawn(stop_behind_gateway(
        shutdown.clone(),
        gateway_stopped,
        behind_gateway,
        ServeOptions::from(&settings.http),
    ));

    println!(
        "agora is up in {:.0?} on {}",
        started.elapsed(),
        describe_backends(&settings)
    );
    for service in &running {
        match service.metrics_addr {
            Some(metrics) => println!(
                "  {:<8} http://{}   (metrics http://{metrics}/metrics)",
                service.name, service.addr
            ),
            None => println!("  {:<8} http://{}", service.name, service.addr),
        }
    }
    println!("{}", describe_auth(&settings));
    let gateway = running
        .iter()
        .find(|s| s.name == gateway::NAME)
        .map(|s| s.addr.to_string())
        .unwrap_or_default();
    println!(
        "try: curl http://{gateway}/api/v1/users   curl http://{gateway}/api/v1/products   \
         (Ctrl-C to stop)"
    );
    wait_all(running, shutdown).await
}

async fn serve(mut settings: Settings, name: &str, port: Option<u16>) -> anyhow::Result<()> {
    let service = services::find(name)?;
    if let Some(port) = port {
        settings.services.entry(name.to_owned()).or_default().port = port;
    }
    // One process per service: the keys come from the configuration, shared by every process
    // (a generated one would differ per process). The service credential is needed by all; the
    // JWT key by users (signs) and the gateway (verifies), which refuse to start without it.
    settings.auth.mode.get_or_insert(AuthMode::Required);
    settings.auth.require_service_token()?;
    let shutdown = Shutdown::on_signal();
    let listener = kit::http::bind(settings.bind_addr(name)).await?;
    let metrics = kit::http::bind(settings.metrics_addr(name)).await?;
    let deps = Deps::connect(service, &settings, None)
        .await
        .with_context(|| format!("starting {name}"))?;
    let app = (service.build)(deps)
        .await
        .with_context(|| format!("starting {name}"))?;
    let service = app.spawn_with_metrics(
        listener,
        Some(metrics),
        &shutdown,
        ServeOptions::from(&settings.http),
    )?;
    let metrics = service
        .metrics_addr
        .map(|addr| format!("http://{addr}/metrics"))
        .unwrap_or_default();
    tracing::info!(service = service.name, addr = %service.addr, %metrics, backends = %describe_backends(&settings), "listening");
    println!("{} listening on http://{}", service.name, service.addr);
    println!("{} metrics on {metrics}", service.name);
    if name == gateway::NAME {
        println!("{}", describe_auth(&settings));
    }
    wait_all(vec![service], shutdown).await
}

/// Once `shutdown` begins and the gateway has closed (or its drain and grace are over), stops the
/// services behind it; forces them at the deadline of the whole process (drain + grace + 1 s
/// after the signal), so `agora up` stops as fast as one service.
async fn stop_behind_gateway(
    shutdown: Shutdown,
    gateway_stopped: CancellationToken,
    behind_gateway: Shutdown,
    options: ServeOptions,
) {
    shutdown.begun().await;
    let deadline =
        tokio::time::Instant::now() + options.drain + options.grace + Duration::from_secs(1);
    tokio::select! {
        () = gateway_stopped.cancelled() => {}
        () = tokio::time::sleep_until(deadline) => {}
    }
    behind_gateway.begin();
    tokio::time::sleep_until(deadline).await;
    behind_gateway.force();
}

/// Waits for every server; if one stops on its own (an error), stops the others too.
async fn wait_all(running: Vec<kit::service::Running>, shutdown: Shutdown) -> anyhow::Result<()> {
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
        shutdown.begin();
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

/// Secrets (`auth.*`) print as `***` by their type; URLs are rewritten here, and so are a
/// service's own `password` and `secret` keys (notify's SMTP password and webhook secrets).
fn print_config(mut settings: Settings) -> anyhow::Result<()> {
    hide_secret(&mut settings.database.url);
    hide_secret(&mut settings.redis.url);
    hide_secret(&mut settings.bus.url);
    for service in settings.services.values_mut() {
        for (key, value) in &mut service.extra {
            hide_secret_keys(key, value);
        }
        for upstream in &mut service.upstreams {
            let mut text = Some(upstream.to_string());
            hide_secret(&mut text);
            if let Some(parsed) = text.and_then(|t| url::Url::parse(&t).ok()) {
                *upstream = parsed;
            }
        }
    }
    print!(
        "{}",
        toml::to_string_pretty(&settings).context("rendering the configuration")?
    );
    Ok(())
}

/// `***` for every value under a key named `password` or `secret`, at any depth.
fn hide_secret_keys(key: &str, value: &mut figment::value::Value) {
    use figment::value::Value;
    if matches!(key, "password" | "secret") {
        *value = Value::from("***");
        return;
    }
    match value {
        Value::Dict(_, dict) => {
            for (key, value) in dict.iter_mut() {
                hide_secret_keys(key, value);
            }
        }
        Value::Array(_, list) => {
            for value in list {
                hide_secret_keys("", value);
            }
        }
        _ => {}
    }
}

/// Replaces the secret of a URL with `***`: its password, or a user name standing alone (NATS
/// takes a bare token there: `nats://TOKEN@host`).
fn hide_secret(url: &mut Option<String>) {
    let Some(value) = url else { return };
    let Ok(mut parsed) = url::Url::parse(value) else {
        return;
    };
    let hidden = if parsed.password().is_some() {
        parsed.set_password(Some("***")).is_ok()
    } else if !parsed.username().is_empty() {
        parsed.set_username("***").is_ok()
    } else {
        false
    };
    if hidden {
        *value = parsed.to_string();
    }
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    for service in services::ALL {
        let Some(migrations) = service.migrations else {
            continue;
        };
        if service.store != service.name {
            continue; // migrated with the service whose data it is
        }
        let db = kit::Db::connect_only(&settings, service.name).await?;
        db.migrate(migrations)
            .await
            .with_context(|| format!("migrating {}", service.name))?;
        println!("migrated {} ({})", service.name, db.backend());
        db.close().await;
    }
    Ok(())
}

/// Every service's sample data (seed 001's users and products).
async fn seed(settings: Settings) -> anyhow::Result<()> {
    // Seeding writes rows, never events: a throwaway in-process bus keeps NATS out of it.
    let shared = Shared::with_bus(Bus::memory());
    let mut reports = Vec::new();
    for service in services::ALL {
        let Some(seed) = service.seed else {
            continue;
        };
        let deps = Deps::connect(service, &settings, Some(&shared)).await?;
        let db = deps.db.clone();
        reports.push(
            seed(deps)
                .await
                .with_context(|| format!("seeding {}", service.name))?,
        );
        if let Some(db) = db {
            db.close().await;
        }
    }
    println!("seeded ({})", describe_backends(&settings));
    for line in reports.iter().flat_map(|r| r.lines()) {
        println!("  {line}");
    }
    Ok(())
}
