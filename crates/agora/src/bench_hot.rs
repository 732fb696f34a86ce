//! `agora bench`: the hot paths of Agora beside bare-library references, in one run, by one load
//! generator ([`crate::load`]), with the CPU per request and memory of every process involved.
//!
//! By default it starts what it measures: `agora up` (embedded) or one `agora serve` per service
//! (distributed), on ports from `--base-port` (18080: gateway 18080, users 18081, ...), in a temp
//! data dir, and the reference servers of `crates/reference` (ports base + 10 to 13) from next to
//! its own binary; it stops all of them by pid at the end. With `--url` it measures a running
//! system instead (the scenarios that need a system of their own are skipped). Loopback only;
//! every run bounded by `--seconds` (at most 300) and `--connections` (at most 1024).
//!
//! Scenarios (`--scenario a,b` to choose; the references they compare to run too):
//!
//! | scenario | what | compared to |
//! |---|---|---|
//! | `ref-hello`, `ref-proxy`, `ref-redis`, `ref-pg` | the reference servers | |
//! | `cached-get-gateway` | `GET /api/v1/users/{id}` through the gateway, auth `open`, 100 hot ids | `ref-proxy` |
//! | `cached-get-gateway-auth` | the same with a token (logged in), auth `required`, the caller's own id | `ref-proxy` |
//! | `cached-get-direct` | the same GET on the users port | `ref-hello`; distributed: `ref-redis` too |
//! | `uncached-get-direct` | the same on a users service with `cache.item_ttl_secs = 0`, every seeded id | distributed: `ref-pg` |
//! | `user-create` | `POST /api/v1/users` through the gateway, a unique email each | |
//! | `product-list` | `GET /api/v1/products?category=` (20 products) through the gateway | |
//! | `order-create` | `POST /api/v1/orders` back to back (accepted/s), then the queue drained | |
//! | `order-latency` | orders at `--rate` per second; accepted → processed latency in the note | |
//! | `mixed` | 80% user reads (Zipf over the seeded users), 15% user creates, 5% orders | |
//!
//! `--check-writes`: the SQLite write target instead: user creates for 60 s (or `--seconds`),
//! the slowest one reported against the target of no request over 100 ms.

use anyhow::Context as _;
use serde_json::json;

use crate::bench_context::Context;
use crate::bench_refs::References;
use crate::bench_report::{self, Row};
use crate::bench_system::{self, Backends, Mode};

/// Every scenario, in the order they run (references first, while the machine is quiet).
pub const SCENARIOS: [&str; 13] = [
    "ref-hello",
    "ref-proxy",
    "ref-redis",
    "ref-pg",
    "cached-get-gateway",
    "cached-get-gateway-auth",
    "cached-get-direct",
    "uncached-get-direct",
    "user-create",
    "product-list",
    "order-create",
    "order-latency",
    "mixed",
];

#[derive(Debug, Clone, clap::Args)]
pub struct HotBench {
    /// embedded: `agora up` (SQLite, in-process cache and bus); distributed: one `agora serve`
    /// per service on DATABASE_URL, REDIS_URL and NATS_URL.
    #[arg(long, value_enum, default_value_t = Mode::Embedded)]
    pub(crate) mode: Mode,
    /// Measure the running system behind this gateway instead of starting one (its services on
    /// the gateway's port + their offset; with --mode distributed the CPU of Redis, PostgreSQL
    /// and NATS on their default ports is shown too).
    #[arg(long)]
    pub(crate) url: Option<url::Url>,
    /// With --url: its users service (default: the gateway's port + 1).
    #[arg(long)]
    pub(crate) users_url: Option<url::Url>,
    /// Length of each scenario, 1 to 300 (default 10; 60 with --check-writes).
    #[arg(long)]
    pub(crate) seconds: Option<u64>,
    /// Virtual clients (one keep-alive connection each), 1 to 1024.
    #[arg(long, default_value_t = 64)]
    pub(crate) connections: usize,
    /// First port of the systems the bench starts (gateway; users +1, ... cache +6, metrics
    /// +1000, references +10 to +13, variants +100 and +200).
    #[arg(long, default_value_t = 18080)]
    pub(crate) base_port: u16,
    /// Only these scenarios (comma-separated; see the module docs), and the references they
    /// compare to.
    #[arg(long, value_delimiter = ',')]
    pub(crate) scenario: Vec<String>,
    /// Print the figures as JSON instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Orders per second in `order-latency`, 1 to 5000.
    #[arg(long, default_value_t = 200)]
    pub(crate) rate: u64,
    /// Users seeded for the reads, 1 to 100000.
    #[arg(long, default_value_t = 1000)]
    pub(crate) users: usize,
    /// The SQLite write target instead: user creates for 60 s, the slowest reported.
    #[arg(long)]
    pub(crate) check_writes: bool,
}

impl HotBench {
    pub(crate) fn seconds(&self) -> u64 {
        self.seconds
            .unwrap_or(if self.check_writes { 60 } else { 10 })
    }

    /// Bounds and loopback, checked before anything starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!((1..=300).contains(&self.seconds()), "--seconds: 1 to 300");
        anyhow::ensure!(
            (1..=1024).contains(&self.connections),
            "--connections: 1 to 1024"
        );
        anyhow::ensure!(
            (1024..=64_000).contains(&self.base_port),
            "--base-port: 1024 to 64000 (the bench uses up to base + 1206)"
        );
        anyhow::ensure!((1..=5000).contains(&self.rate), "--rate: 1 to 5000");
        anyhow::ensure!((1..=100_000).contains(&self.users), "--users: 1 to 100000");
        for url in [&self.url, &self.users_url].into_iter().flatten() {
            ensure_loopback(url.as_str())?;
        }
        for name in &self.scenario {
            anyhow::ensure!(
                SCENARIOS.contains(&name.as_str()),
                "--scenario: unknown {name:?} (known: {})",
                SCENARIOS.join(", ")
            );
        }
        Ok(())
    }

    /// The scenarios to run: the chosen ones and the references they compare to, in run order.
    fn selected(&self) -> Vec<&'static str> {
        if self.check_writes {
            return vec!["write-check"];
        }
        if self.scenario.is_empty() {
            return SCENARIOS.to_vec();
        }
        let mut wanted: Vec<&str> = self.scenario.iter().map(String::as_str).collect();
        for name in self.scenario.iter() {
            wanted.extend(compare_to(name, self.mode));
        }
        // The proxy's upstream.
        if wanted.contains(&"ref-proxy") {
            wanted.push("ref-hello");
        }
        SCENARIOS
            .iter()
            .copied()
            .filter(|s| wanted.contains(s))
            .collect()
    }
}

/// The reference rows an Agora row is compared to.
pub fn compare_to(scenario: &str, mode: Mode) -> Vec<&'static str> {
    match (scenario, mode) {
        ("cached-get-gateway" | "cached-get-gateway-auth", _) => vec!["ref-proxy"],
        ("cached-get-direct", Mode::Embedded) => vec!["ref-hello"],
        ("cached-get-direct", Mode::Distributed) => vec!["ref-hello", "ref-redis"],
        ("uncached-get-direct", Mode::Distributed) => vec!["ref-pg"],
        _ => Vec::new(),
    }
}

/// Refuses a URL whose host is not a loopback address.
pub fn ensure_loopback(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).with_context(|| format!("not a URL: {url}"))?;
    let loopback = match parsed.host() {
        // Schemes url does not know (postgres, redis, nats) keep their host as a name.
        Some(url::Host::Domain(name)) => {
            name == "localhost"
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    anyhow::ensure!(
        loopback,
        "agora bench runs against loopback only (got {url})"
    );
    Ok(())
}

/// `agora bench`.
pub async fn hot(args: HotBench) -> anyhow::Result<()> {
    args.validate()?;
    let selected = args.selected();
    let backends = Backends {
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| bench_system::BENCH_DATABASE.to_owned()),
        redis_url: std::env::var("REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        nats_url: std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned()),
    };
    let needs_pg = args.mode == Mode::Distributed || selected.contains(&"ref-pg");
    if args.url.is_none() {
        for url in [
            &backends.database_url,
            &backends.redis_url,
            &backends.nats_url,
        ] {
            if args.mode == Mode::Distributed || url == &backends.database_url && needs_pg {
                ensure_loopback(url)?;
            }
        }
    }
    let mut pg_problem = None;
    if args.url.is_none()
        && args.mode == Mode::Distributed
        && std::env::var_os("DATABASE_URL").is_none()
    {
        bench_system::fresh_start(&backends.redis_url)
            .await
            .context("starting from an empty bench database")?;
    }
    if needs_pg && let Err(err) = bench_system::ensure_database(&backends.database_url).await {
        anyhow::ensure!(
            args.mode == Mode::Embedded,
            "distributed mode needs PostgreSQL: {err:#}"
        );
        pg_problem = Some(format!("{err:#}"));
    }
    let seconds = args.seconds();
    let mut ctx = Context::new(&args, backends.clone()).await?;
    if !args.json {
        println!(
            "agora bench: {}, {} connections, {seconds} s per scenario, {} seeded users, on {}",
            match (&args.url, args.mode) {
                (Some(url), _) => format!("the running system at {url}"),
                (None, Mode::Embedded) => "embedded mode".to_owned(),
                (None, Mode::Distributed) => "distributed mode".to_owned(),
            },
            args.connections,
            ctx.seeded.len(),
            machine()
        );
    }
    let wanted_refs: Vec<&'static str> = selected
        .iter()
        .copied()
        .filter(|s| s.starts_with("ref-"))
        .filter(|s| *s != "ref-pg" || pg_problem.is_none())
        .collect();
    let refs = References::start(&wanted_refs, args.base_port, &backends).await;
    let mut rows = Vec::new();
    for scenario in selected {
        if scenario == "ref-pg"
            && let Some(why) = &pg_problem
        {
            rows.push(Row::skipped(scenario, why.clone()));
            continue;
        }
        let row = match ctx.run(scenario, &refs).await {
            Ok(row) => row,
            Err(err) => Row::skipped(scenario, format!("{err:#}")),
        };
        if !args.json && !ctx.interactive {
            // Without a terminal, one line per scenario as it ends.
            println!(
                "  {scenario}: {:.0} req/s, {} errors",
                row.per_second, row.errors
            );
        }
        rows.push(row);
    }
    drop(refs);
    drop(ctx);
    bench_report::fill_ratios(&mut rows);
    if args.json {
        let report = json!({
            "mode": args.mode,
            "connections": args.connections,
            "seconds": seconds,
            "machine": machine(),
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!();
        print!("{}", bench_report::render_table(&rows));
        if let Some(row) = rows.iter().find(|r| r.scenario == "write-check") {
            println!();
            println!(
                "write check: {} creates in {:.0} s, slowest {:.1} ms, {} over 100 ms (target: none over 100 ms: {})",
                row.requests,
                row.seconds,
                row.max_ms,
                row.over_100ms,
                if row.max_ms <= 100.0 && row.errors == 0 {
                    "met"
                } else {
                    "missed"
                }
            );
        }
    }
    Ok(())
}

/// CPU model and cores, from /proc/cpuinfo.
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: HotBench,
    }

    fn parse(args: &[&str]) -> HotBench {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).bench
    }

    #[test]
    fn non_loopback_urls_are_refused() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:80",
            "redis://127.0.0.2:6379",
        ] {
            assert!(ensure_loopback(url).is_ok(), "{url}");
        }
        for url in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "postgres://db:5432/x",
            "not a url",
        ] {
            assert!(ensure_loopback(url).is_err(), "{url}");
        }
        let args = parse(&["--url", "http://192.168.1.2:8080"]);
        assert!(args.validate().is_err(), "--url is checked");
    }

    #[test]
    fn arguments_are_bounded() {
        assert!(parse(&[]).validate().is_ok());
        assert_eq!(parse(&[]).seconds(), 10);
        assert_eq!(parse(&["--check-writes"]).seconds(), 60);
        for bad in [
            &["--seconds", "0"][..],
            &["--seconds", "301"],
            &["--connections", "0"],
            &["--connections", "1025"],
            &["--base-port", "80"],
            &["--rate", "0"],
            &["--users", "0"],
            &["--scenario", "cached-get-nowhere"],
        ] {
            assert!(parse(bad).validate().is_err(), "{bad:?}");
        }
        assert!(
            parse(&["--seconds", "300", "--connections", "1024"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn a_chosen_scenario_brings_its_references_in_run_order() {
        let args = parse(&["--scenario", "cached-get-direct"]);
        assert_eq!(args.selected(), vec!["ref-hello", "cached-get-direct"]);
        let args = parse(&["--scenario", "cached-get-gateway"]);
        assert_eq!(
            args.selected(),
            vec!["ref-hello", "ref-proxy", "cached-get-gateway"],
            "the proxy needs hello behind it"
        );
        let args = parse(&[
            "--mode",
            "distributed",
            "--scenario",
            "uncached-get-direct,cached-get-direct",
        ]);
        assert_eq!(
            args.selected(),
            vec![
                "ref-hello",
                "ref-redis",
                "ref-pg",
                "cached-get-direct",
                "uncached-get-direct"
            ]
        );
        assert_eq!(parse(&[]).selected().len(), SCENARIOS.len());
        assert_eq!(parse(&["--check-writes"]).selected(), vec!["write-check"]);
    }
}
