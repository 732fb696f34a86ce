//! The services this binary can run, and how to build each one.

use kit::Settings;
use kit::service::App;

/// Every service behind the gateway, in start order.
pub const BACKENDS: &[&str] = &[users::NAME];

/// Backends and the gateway.
pub fn all() -> Vec<&'static str> {
    let mut all = BACKENDS.to_vec();
    all.push(gateway::NAME);
    all
}

/// Builds one service (connecting and migrating its database as configured).
pub async fn build(name: &str, settings: &Settings) -> anyhow::Result<App> {
    match name {
        users::NAME => users::app(settings).await,
        gateway::NAME => gateway::app(settings).await,
        other => anyhow::bail!(
            "unknown service `{other}`; choose one of: {}",
            all().join(", ")
        ),
    }
}

/// Runs the migrations of every service that has a database.
pub async fn migrate(settings: &Settings) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut done = Vec::new();
    for name in BACKENDS {
        let migrations = match *name {
            users::NAME => &users::MIGRATIONS,
            _ => continue,
        };
        let db = kit::Db::connect_only(settings, name).await?;
        db.migrate(migrations).await?;
        done.push((*name, db.backend()));
        db.close().await;
    }
    Ok(done)
}
