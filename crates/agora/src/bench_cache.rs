//! `agora bench cache`: seed 000's cache service through the gateway of a running Agora, SET then
//! GET, `--connections` clients back to back for `--seconds` each; and, with `--redis-url`, beside
//! it in the same run a bare axum handler doing one Redis `GET` per request (what a request costs
//! without the gateway hop, the guard, the accounting and the problem layers).
//!
//! Loopback only, bounded in time and connections. Keys `bench:<n>` (1,000 of them, 100-byte
//! values) are left in the cache service's keyspace; the baseline's key is deleted afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

/// Distinct keys the clients go round.
const KEYS: usize = 1000;

#[derive(Debug, Clone, clap::Args)]
pub struct CacheBench {
    /// The gateway of the running system.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: url::Url,
    /// Clients sending back to back.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Length of each phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Also measure a bare axum handler doing one GET on this Redis (loopback).
    #[arg(long)]
    redis_url: Option<String>,
}

fn loopback(host: Option<&str>) -> bool {
    matches!(host, Some("127.0.0.1" | "localhost" | "::1" | "[::1]"))
}

pub async fn cache(args: CacheBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        loopback(args.url.host_str()),
        "agora bench runs against loopback only (got {})",
        args.url
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.connections),
        "--connections: 1 to 1024"
    );
    anyhow::ensure!((1..=300).contains(&args.seconds), "--seconds: 1 to 300");
    let base = args.url.as_str().trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections.max(64))
        .timeout(Duration::from_secs(10))
        .build()?;
    let phase = Duration::from_secs(args.seconds);
    let value = json!({ "value": "x".repeat(100) });
    println!(
        "agora bench cache: {base}, {} connections, {} s per phase",
        args.connections, args.seconds
    );
    let set = {
        let value = value.clone();
        run(&client, args.connections, phase, move |client, n| {
            client
                .post(format!("{base}/cache/bench:{}", n % KEYS))
                .json(&value)
        })
        .await
    };
    report("SET through the gateway", &set, phase);
    let base = args.url.as_str().trim_end_matches('/').to_owned();
    let get = run(&client, args.connections, phase, move |client, n| {
        client.get(format!("{base}/cache/bench:{}", n % KEYS))
    })
    .await;
    report("GET through the gateway", &get, phase);
    if let Some(redis_url) = &args.redis_url {
        let parsed = url::Url::parse(redis_url).context("--redis-url")?;
        anyhow::ensure!(
            loopback(parsed.host_str()),
            "--redis-url: loopback only (got {redis_url})"
        );
        let (addr, key, server) = bare_redis_get(redis_url).await?;
        let bare = run(&client, args.connections, phase, move |client, _| {
            client.get(format!("http://{addr}/get"))
        })
        .await;
        server.abort();
        report("bare axum + one Redis GET", &bare, phase);
        let mut conn = redis::Client::open(redis_url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    }
    Ok(())
}

/// Per-request latencies and failures of one phase.
struct Outcome {
    latencies: Vec<Duration>,
    failed: u64,
}

async fn run(
    client: &reqwest::Client,
    connections: usize,
    phase: Duration,
    request: impl Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Outcome {
    let request = Arc::new(request);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (client, request) = (client.clone(), request.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failed = 0;
                let mut n = c;
                while started.elapsed() < phase {
                    let sent = Instant::now();
                    match request(&client, n).send().await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            latencies.push(sent.elapsed());
                        }
                        _ => failed += 1,
                    }
                    n += connections;
                }
                (latencies, failed)
            })
        })
        .collect();
    let mut outcome = Outcome {
        latencies: Vec::new(),
        failed: 0,
    };
    for (latencies, failed) in futures::future::join_all(tasks).await.into_iter().flatten() {
        outcome.latencies.extend(latencies);
        outcome.failed += failed;
    }
    outcome.latencies.sort_unstable();
    outcome
}

fn report(what: &str, outcome: &Outcome, phase: Duration) {
    let quantile = |q: f64| {
        let l = &outcome.latencies;
        if l.is_empty() {
            return 0.0;
        }
        l[((l.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "  {what:<28} {:>8.0} /s   p50 {:>6.2} ms   p99 {:>6.2} ms   failed {}",
        outcome.latencies.len() as f64 / phase.as_secs_f64(),
        quantile(0.5),
        quantile(0.99),
        outcome.failed
    );
}

/// A bare axum server on a free loopback port: `GET /get` is one Redis `GET` of a 100-byte value.
async fn bare_redis_get(
    redis_url: &str,
) -> anyhow::Result<(std::net::SocketAddr, String, tokio::task::JoinHandle<()>)> {
    let conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to --redis-url")?;
    let key = format!("agora-bench:bare:{}", std::process::id());
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("x".repeat(100))
        .arg("EX")
        .arg(600)
        .query_async(&mut conn.clone())
        .await?;
    let handler_key = key.clone();
    let app = axum::Router::new().route(
        "/get",
        axum::routing::get(move || {
            let (mut conn, key) = (conn.clone(), handler_key.clone());
            async move {
                let value: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or(None);
                value.unwrap_or_default()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, key, server))
}
