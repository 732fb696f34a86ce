//! Agora's shared infrastructure. Infrastructure only: no service's domain lives here, and no
//! module imports a service.

pub mod auth;
pub mod batch;
pub mod breaker;
pub mod bus;
pub mod cache;
pub mod client;
pub mod config;
pub mod consumer;
pub mod db;
pub mod error;
pub mod event;
pub mod http;
pub mod metrics;
pub mod money;
pub mod openapi;
pub mod outage;
pub mod outbox;
pub mod page;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trace;

pub use cache::{Cache, Ttl};
pub use config::Settings;
pub use db::Db;
pub use error::{ApiError, ApiResult, FieldError, Problem};
