//! `ref-redis`: a bare axum handler doing one Redis `GET` per request on a multiplexed
//! `ConnectionManager`, answering the value (a user's JSON, stored at start). The reference for a
//! Redis-backed cached read.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use clap::Parser as _;
use redis::aio::ConnectionManager;

/// A bare axum handler: one Redis GET per request.
#[derive(Debug, clap::Parser)]
#[command(name = "ref-redis")]
struct Args {
    #[command(flatten)]
    listen: reference::Listen,
    /// The Redis to read.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The key read (a user's JSON is stored under it at start, for an hour).
    #[arg(long, default_value = "bench:reference:user")]
    key: String,
}

#[derive(Clone)]
struct Reader {
    conn: ConnectionManager,
    key: std::sync::Arc<str>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut conn = ConnectionManager::new(client).await?;
    let () = redis::cmd("SET")
        .arg(&args.key)
        .arg(reference::User::sample(1).to_json())
        .arg("EX")
        .arg(3600)
        .query_async(&mut conn)
        .await?;
    let reader = Reader {
        conn,
        key: args.key.into(),
    };
    let app = axum::Router::new()
        .fallback(axum::routing::get(get_value))
        .with_state(reader);
    reference::serve("ref-redis", &args.listen, app).await
}

async fn get_value(State(mut reader): State<Reader>) -> Response {
    let value: redis::RedisResult<Option<Vec<u8>>> = redis::cmd("GET")
        .arg(&*reader.key)
        .query_async(&mut reader.conn)
        .await;
    match value {
        Ok(Some(bytes)) => reference::json(bytes),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
