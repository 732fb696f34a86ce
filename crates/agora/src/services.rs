//! The services this binary can run: one list, which `up`, `serve`, `migrate` and `seed` iterate
//! over. Adding a service means adding its crate's `SERVICE` here (and its routes and port to the
//! configuration).

use kit::service::Service;

/// Every service, in start order: the gateway last, since it forwards to the others.
pub static ALL: [&Service; 8] = [
    &users::SERVICE,
    &catalog::SERVICE,
    &orders::SERVICE,
    &orders::WORKER,
    &notify::SERVICE,
    &cachesvc::SERVICE,
    &chat::SERVICE,
    &gateway::SERVICE,
];

/// The service called `name`.
pub fn find(name: &str) -> anyhow::Result<&'static Service> {
    ALL.iter().copied().find(|s| s.name == name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown service `{name}`; choose one of: {}",
            names().join(", ")
        )
    })
}

/// The names of every service, in start order.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|s| s.name).collect()
}
