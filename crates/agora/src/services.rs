//! The services this binary can run, and how to build each one.

use kit::Settings;
use kit::bus::Bus;
use kit::service::App;

/// Every service behind the gateway, in start order.
pub const BACKENDS: &[&str] = &[users::NAME, catalog::NAME];

/// Backends and the gateway.
pub fn all() -> Vec<&'static str> {
    let mut all = BACKENDS.to_vec();
    all.push(gateway::NAME);
    all
}

/// Builds one service (connecting and migrating its database as configured). Services that
/// announce events publish them on `bus` when given (`agora up` shares one bus between all its
/// services), or connect to the configured bus themselves; services without events never touch
/// the bus.
pub async fn build(name: &str, settings: &Settings, bus: Option<&Bus>) -> anyhow::Result<App> {
    let bus = async || match bus {
        Some(bus) => anyhow::Ok(bus.clone()),
        None => Bus::connect(settings).await,
    };
    match name {
        users::NAME => users::app(settings).await,
        catalog::NAME => catalog::app(settings, bus().await?).await,
        gateway::NAME => gateway::app(settings).await,
        other => anyhow::bail!(
            "unknown service `{other}`; choose one of: {}",
            all().join(", ")
        ),
    }
}

/// The migrations of a service that has a database.
fn migrations(name: &str) -> Option<&'static kit::db::Migrations> {
    match name {
        users::NAME => Some(&users::MIGRATIONS),
        catalog::NAME => Some(&catalog::MIGRATIONS),
        _ => None,
    }
}

/// Runs the migrations of every service that has a database.
pub async fn migrate(settings: &Settings) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut done = Vec::new();
    for name in BACKENDS {
        let Some(migrations) = migrations(name) else {
            continue;
        };
        let db = kit::Db::connect_only(settings, name).await?;
        db.migrate(migrations).await?;
        done.push((*name, db.backend()));
        db.close().await;
    }
    Ok(done)
}
