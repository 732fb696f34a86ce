//! `agora bench orders`: how many orders a running Agora accepts per second, and how long the
//! worker takes from accepting to processing them, against the gateway on loopback.
//!
//! Bounded in time and connections, loopback only. Two phases on a fresh user and
//! [`PRODUCTS`] products with plenty of stock (orders go round them: one product would measure
//! one row lock, not the system):
//! 1. throughput: `--connections` clients post orders back to back for `--seconds`;
//!    reported: accepted per second, request latency p50/p99, refusals and errors;
//! 2. latency at a fixed rate: `--rate` orders per second for `--seconds`; once the worker has
//!    processed them all, the accepted → processed latency p50/p99 of those orders (from the
//!    orders service's stats: processed_at − created_at over its last 1,000).
//!
//! Between and after the phases it waits (at most 120 s) for the worker to drain the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

/// Products the orders go round.
const PRODUCTS: usize = 50;
/// Most requests in flight in the fixed-rate phase (more are counted as not sent).
const MAX_IN_FLIGHT: usize = 1024;
/// Longest wait for the worker to drain.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, clap::Args)]
pub struct OrdersBench {
    /// The gateway of the running system.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: url::Url,
    /// Clients posting back to back in the throughput phase.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Length of each phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Orders per second in the latency phase.
    #[arg(long, default_value_t = 500)]
    rate: u64,
}

pub async fn orders(args: OrdersBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(
            args.url.host_str(),
            Some("127.0.0.1" | "localhost" | "::1" | "[::1]")
        ),
        "agora bench runs against loopback only (got {})",
        args.url
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.connections),
        "--connections: 1 to 1024"
    );
    anyhow::ensure!((1..=300).contains(&args.seconds), "--seconds: 1 to 300");
    anyhow::ensure!((1..=20_000).contains(&args.rate), "--rate: 1 to 20000");
    let base = args.url.as_str().trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections.max(64))
        .timeout(Duration::from_secs(10))
        .build()?;
    let (user, products) = setup(&client, &base).await?;
    let bodies: Arc<Vec<Value>> = Arc::new(
        products
            .iter()
            .map(|product| json!({"user_id": user, "product_id": product, "quantity": 1}))
            .collect(),
    );
    println!(
        "agora bench orders: {base}, user {user}, {PRODUCTS} products; {} s per phase",
        args.seconds
    );

    // Phase 1: back to back.
    let phase = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|c| {
            let (client, url, bodies) = (
                client.clone(),
                format!("{base}/api/v1/orders"),
                bodies.clone(),
            );
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = c;
                while started.elapsed() < phase {
                    let body = &bodies[i % bodies.len()];
                    i += 1;
                    let sent = Instant::now();
                    let status = client
                        .post(&url)
                        .json(body)
                        .send()
                        .await
                        .map(|r| r.status());
                    tally.record(status.ok().map(|s| s.as_u16()), sent.elapsed());
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await?);
    }
    let elapsed = started.elapsed();
    let drained = drain(&client, &base).await?;
    println!();
    println!(
        "| phase | connections | accepted/s | p50 ms | p99 ms | refused | errors | drained in |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| back to back | {} | {:.0} | {:.1} | {:.1} | {} | {} | {:.1} s |",
        args.connections,
        total.accepted as f64 / elapsed.as_secs_f64(),
        total.quantile(0.50),
        total.quantile(0.99),
        total.refused,
        total.errors,
        drained.as_secs_f64()
    );

    // Phase 2: a fixed rate.
    let fixed = fixed_rate(&client, &base, bodies, args.rate, phase).await?;
    println!(
        "| {} orders/s | - | {:.0} | {:.1} | {:.1} | {} | {} | {:.1} s |",
        args.rate,
        fixed.accepted_per_second,
        fixed.p50_ms,
        fixed.p99_ms,
        fixed.refused,
        fixed.errors,
        fixed.drained.as_secs_f64()
    );
    println!();
    println!(
        "accepted → processed at {} orders/s (last {} processed): p50 {} ms, p99 {} ms",
        args.rate, fixed.processed_window, fixed.processed_p50_ms, fixed.processed_p99_ms
    );
    Ok(())
}

/// What the fixed-rate phase measured.
pub(crate) struct FixedRate {
    pub accepted_per_second: f64,
    /// Request latency (accepting), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub refused: u64,
    /// Failures, and ticks skipped because [`MAX_IN_FLIGHT`] requests were waiting.
    pub errors: u64,
    pub drained: Duration,
    /// Accepted → processed, from the orders service's stats (its last `processed_window`).
    pub processed_p50_ms: Value,
    pub processed_p99_ms: Value,
    pub processed_window: Value,
}

/// `rate` orders per second (bodies round-robin) for `phase`, then waits for the worker to process
/// them and reads the accepted → processed latency from the orders stats.
pub(crate) async fn fixed_rate(
    client: &reqwest::Client,
    base: &str,
    bodies: Arc<Vec<Value>>,
    rate: u64,
    phase: Duration,
) -> anyhow::Result<FixedRate> {
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let skipped = Arc::new(AtomicU64::new(0));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0;
    while started.elapsed() < phase {
        ticker.tick().await;
        i += 1;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (client, url, bodies) = (
            client.clone(),
            format!("{base}/api/v1/orders"),
            bodies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = &bodies[i % bodies.len()];
            let sent = Instant::now();
            let status = client
                .post(&url)
                .json(body)
                .send()
                .await
                .map(|r| r.status());
            drop(permit);
            (status.ok().map(|s| s.as_u16()), sent.elapsed())
        }));
    }
    let mut fixed = Tally::default();
    for task in tasks {
        let (status, took) = task.await?;
        fixed.record(status, took);
    }
    let elapsed = started.elapsed();
    let drained = drain(client, base).await?;
    let stats: Value = client
        .get(format!("{base}/api/v1/orders/stats"))
        .send()
        .await?
        .json()
        .await?;
    let latency = &stats["processing_latency_ms"];
    Ok(FixedRate {
        accepted_per_second: fixed.accepted as f64 / elapsed.as_secs_f64(),
        p50_ms: fixed.quantile(0.50),
        p99_ms: fixed.quantile(0.99),
        p999_ms: fixed.quantile(0.999),
        refused: fixed.refused,
        errors: fixed.errors + skipped.load(Ordering::Relaxed),
        drained,
        processed_p50_ms: latency["p50"].clone(),
        processed_p99_ms: latency["p99"].clone(),
        processed_window: latency["window"].clone(),
    })
}

/// A fresh user and [`PRODUCTS`] products with plenty of stock: their ids.
pub(crate) async fn setup(client: &reqwest::Client, base: &str) -> anyhow::Result<(i64, Vec<i64>)> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let user: Value = created(
        client
            .post(format!("{base}/api/v1/users"))
            .json(&json!({"name": format!("bench {stamp}")}))
            .send()
            .await
            .context("is `agora up` running? (the gateway did not answer)")?,
        "a user",
    )
    .await?;
    let mut products = Vec::with_capacity(PRODUCTS);
    for n in 0..PRODUCTS {
        let product: Value = created(
            client
                .post(format!("{base}/api/v1/products"))
                .json(
                    &json!({"name": format!("bench {stamp} {n}"), "price": "1.00",
                    "stock": 1_000_000_000}),
                )
                .send()
                .await?,
            "a product (in auth `required` mode this needs an admin: run against `agora up`)",
        )
        .await?;
        products.push(product["id"].as_i64().context("product id")?);
    }
    Ok((user["id"].as_i64().context("user id")?, products))
}

async fn created(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = response.status();
    anyhow::ensure!(status == 201, "creating {what} answered {status}");
    Ok(response.json().await?)
}

/// Waits until no order is pending or processing; returns how long that took.
pub(crate) async fn drain(client: &reqwest::Client, base: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let stats: Value = client
            .get(format!("{base}/api/v1/orders/stats"))
            .send()
            .await?
            .json()
            .await?;
        let waiting = stats["by_status"]["pending"].as_i64().unwrap_or(0)
            + stats["by_status"]["processing"].as_i64().unwrap_or(0)
            + stats["worker"]["stock_to_settle"].as_i64().unwrap_or(0);
        if waiting == 0 {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < DRAIN_LIMIT,
            "{waiting} orders still waiting after {DRAIN_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Outcomes and latencies of one client (or all).
#[derive(Default)]
struct Tally {
    accepted: u64,
    refused: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, status: Option<u16>, took: Duration) {
        match status {
            Some(201) => self.accepted += 1,
            Some(400..=499) => self.refused += 1,
            _ => self.errors += 1,
        }
        self.latencies_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }

    fn merge(&mut self, other: Tally) {
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
    }

    /// The `q` quantile of the request latency, in ms.
    fn quantile(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let rank = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[rank]) / 1000.0
    }
}
