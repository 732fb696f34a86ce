//! Reference servers for `agora bench`: each does what one Agora request does at its core, with
//! the bare library and nothing around it (no middleware, no problem layer, no metrics, no auth),
//! so Agora's figures can be read as ratios to what the libraries themselves cost on the same
//! machine, measured by the same load generator in the same run.
//!
//! | bin | does per request | Agora row it stands beside |
//! |---|---|---|
//! | `ref-hello` | answers a fixed JSON body the size of a cached user | a cached user GET on the users port |
//! | `ref-proxy` | forwards to `ref-hello` through a pooled keep-alive hyper-util client | a cached user GET through the gateway |
//! | `ref-redis` | one Redis `GET` (multiplexed `ConnectionManager`), answers the value | a Redis-backed cached read |
//! | `ref-pg` | one primary-key `SELECT` (prepared, a few clients round-robin), JSON-encoded | an uncached user read on PostgreSQL |
//!
//! Each binds `--host` (loopback by default) and `--port` (0 = a free port) and prints
//! `<name> listening on http://<addr>` once it accepts; it runs on tokio's multi-thread runtime
//! (one worker per core), as `agora` does, and stops on Ctrl-C or SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use serde::Serialize;

/// What every reference server takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Listen {
    /// Interface to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub host: IpAddr,
    /// Port to listen on (0 = a free port; the bound address is printed).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

/// A user as Agora's users service returns it (the same fields, the same JSON shape), so the
/// reference bodies are the size of the real ones.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: i64,
    pub username: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
    pub role: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl User {
    /// The `n`th sample user (deterministic: the same body on every run).
    pub fn sample(n: i64) -> Self {
        let at = chrono::DateTime::from_timestamp(1_764_547_200 + n, 0).unwrap_or_default();
        Self {
            id: n,
            username: Some(format!("bench{n}")),
            email: Some(format!("bench{n}@bench.agora.local")),
            name: Some(format!("Bench User {n}")),
            role: "user".to_owned(),
            created_at: at,
            updated_at: at,
        }
    }

    /// Its JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Binds `listen` and serves `app` until Ctrl-C or SIGTERM, printing the bound address first.
pub async fn serve(name: &str, listen: &Listen, app: axum::Router) -> anyhow::Result<()> {
    let addr = SocketAddr::new(listen.host, listen.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    println!("{name} listening on http://{bound}");
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .context("serving")
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// A JSON response from bytes already encoded (what a cache hit sends).
pub fn json(body: impl Into<bytes::Bytes>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.into(),
    )
        .into_response()
}

/// The last path segment as an id (`/users/17` → 17), else `fallback`.
pub fn id_from_path(path: &str, fallback: i64) -> i64 {
    path.rsplit('/')
        .next()
        .and_then(|last| last.parse().ok())
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_user_is_the_size_of_a_real_one() {
        let body = User::sample(1).to_json();
        let text = String::from_utf8(body).unwrap_or_default();
        assert!(text.starts_with(r#"{"id":1,"username":"bench1""#), "{text}");
        assert!(
            (150..300).contains(&text.len()),
            "{} bytes: {text}",
            text.len()
        );
    }

    #[test]
    fn ids_come_from_the_last_segment() {
        assert_eq!(id_from_path("/users/17", 1), 17);
        assert_eq!(id_from_path("/api/v1/users/id/3", 1), 3);
        assert_eq!(id_from_path("/", 1), 1);
        assert_eq!(id_from_path("/users/x", 5), 5);
    }
}
