//! `ref-pg`: a bare axum handler doing one primary-key `SELECT` per request with tokio-postgres
//! (a prepared statement on each of a few connections, used round-robin; each connection
//! pipelines the queries sent to it), JSON-encoding the row. The reference for an uncached user
//! read on PostgreSQL.
//!
//! Its table is `reference.users` (schema created when missing), filled with `--rows` sample users
//! the first time; `GET /users/{id}` reads one (any other path reads id 1).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use clap::Parser as _;
use tokio_postgres::{Client, NoTls, Statement};

/// A bare axum handler: one prepared primary-key SELECT per request.
#[derive(Debug, clap::Parser)]
#[command(name = "ref-pg")]
struct Args {
    #[command(flatten)]
    listen: reference::Listen,
    /// The PostgreSQL database (its `reference` schema is created when missing).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/agora_bench"
    )]
    database_url: String,
    /// Connections, used round-robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Sample users in the table (ids 1..=rows).
    #[arg(long, default_value_t = 1000)]
    rows: i64,
}

struct Conn {
    client: Client,
    select: Statement,
}

#[derive(Clone)]
struct Pool {
    conns: Arc<Vec<Conn>>,
    next: Arc<AtomicUsize>,
}

const SELECT: &str = "select id, username, email, name, role, created_at, updated_at \
                      from reference.users where id = $1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (1..=64).contains(&args.connections),
        "--connections: 1 to 64"
    );
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (client, connection) = tokio_postgres::connect(&args.database_url, NoTls)
            .await
            .with_context(|| format!("connecting to {}", args.database_url))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                eprintln!("ref-pg: connection closed: {err}");
            }
        });
        if conns.is_empty() {
            prepare_table(&client, args.rows).await?;
        }
        let select = client.prepare(SELECT).await?;
        conns.push(Conn { client, select });
    }
    let pool = Pool {
        conns: Arc::new(conns),
        next: Arc::new(AtomicUsize::new(0)),
    };
    let app = axum::Router::new()
        .fallback(axum::routing::get(get_user))
        .with_state(pool);
    reference::serve("ref-pg", &args.listen, app).await
}

async fn prepare_table(client: &Client, rows: i64) -> anyhow::Result<()> {
    client
        .batch_execute(
            "create schema if not exists reference;
             create table if not exists reference.users (
                 id bigint primary key,
                 username text unique,
                 email text unique,
                 name text,
                 role text not null,
                 created_at timestamptz not null,
                 updated_at timestamptz not null
             );",
        )
        .await
        .context("creating reference.users")?;
    client
        .execute(
            "insert into reference.users
                 select n, 'bench' || n, 'bench' || n || '@bench.agora.local', 'Bench User ' || n,
                        'user', to_timestamp(1764547200 + n), to_timestamp(1764547200 + n)
                 from generate_series(1, $1::bigint) as n
             on conflict (id) do nothing",
            &[&rows],
        )
        .await
        .context("filling reference.users")?;
    Ok(())
}

async fn get_user(State(pool): State<Pool>, request: Request) -> Response {
    let id = reference::id_from_path(request.uri().path(), 1);
    let n = pool.next.fetch_add(1, Ordering::Relaxed) % pool.conns.len();
    let conn = &pool.conns[n];
    let row = match conn.client.query_opt(&conn.select, &[&id]).await {
        Ok(Some(row)) => row,
        Ok(None) => return StatusCode::NOT_FOUND.into_response(),
        Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    let user = reference::User {
        id: row.get(0),
        username: row.get(1),
        email: row.get(2),
        name: row.get(3),
        role: row.get(4),
        created_at: row.get(5),
        updated_at: row.get(6),
    };
    reference::json(user.to_json())
}
