//! Logging setup, once per process: an `EnvFilter` (`RUST_LOG` wins over `log.level`), pretty
//! output on a terminal and JSON otherwise (or as `log.format` says).

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Call it from `main` only; tests use [`init_for_tests`].
pub fn init(log: &LogSettings) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| !spec.trim().is_empty())
        .unwrap_or_else(|| log.level.clone());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    if !spec.contains("sqlx") {
        // sqlx warns, once per request, of a pooled connection found broken when it is given
        // back (the database went away): kit's outage log says that once per outage. Shown
        // when a filter names sqlx.
        if let Ok(quiet) = "sqlx_core::pool::connection=error".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
}

/// Quiet unless `TEST_LOG` is set (then as `RUST_LOG`, default `debug`).
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}
