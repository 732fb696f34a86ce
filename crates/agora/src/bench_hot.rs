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

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::bench_report::{self, LOAD_GENERATOR, Row, Watch};
use crate::bench_system::{self, Backends, Mode, Spec, System};
use crate::load::{self, Load, Plan, Req, Zipf};

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

/// Ids the cached GETs go round (all cached after the warm-up).
const HOT_IDS: usize = 100;
/// Unmeasured requests before each scenario: connections open, caches warm.
const WARM_UP: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct HotBench {
    /// embedded: `agora up` (SQLite, in-process cache and bus); distributed: one `agora serve`
    /// per service on DATABASE_URL, REDIS_URL and NATS_URL.
    #[arg(long, value_enum, default_value_t = Mode::Embedded)]
    mode: Mode,
    /// Measure the running system behind this gateway instead of starting one.
    #[arg(long)]
    url: Option<url::Url>,
    /// With --url: its users service (default: the gateway's port + 1).
    #[arg(long)]
    users_url: Option<url::Url>,
    /// Length of each scenario, 1 to 300 (default 10; 60 with --check-writes).
    #[arg(long)]
    seconds: Option<u64>,
    /// Virtual clients (one keep-alive connection each), 1 to 1024.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// First port of the systems the bench starts (gateway; users +1, ... cache +6, metrics
    /// +1000, references +10 to +13, variants +100 and +200).
    #[arg(long, default_value_t = 18080)]
    base_port: u16,
    /// Only these scenarios (comma-separated; see the module docs), and the references they
    /// compare to.
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<String>,
    /// Print the figures as JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Orders per second in `order-latency`, 1 to 5000.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Users seeded for the reads, 1 to 100000.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// The SQLite write target instead: user creates for 60 s, the slowest reported.
    #[arg(long)]
    check_writes: bool,
}

impl HotBench {
    fn seconds(&self) -> u64 {
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

fn socket_addr(url: &url::Url) -> anyhow::Result<SocketAddr> {
    url.socket_addrs(|| Some(80))?
        .into_iter()
        .next()
        .with_context(|| format!("no address for {url}"))
}

/// The reference servers, each a child of the bench (stopped by pid at the end).
struct References {
    children: Vec<(&'static str, Child)>,
    failed: Vec<(&'static str, String)>,
    base_port: u16,
}

impl References {
    fn port(&self, name: &str) -> u16 {
        let offset = match name {
            "ref-hello" => 10,
            "ref-proxy" => 11,
            "ref-redis" => 12,
            _ => 13,
        };
        self.base_port + offset
    }

    fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.id())
    }

    async fn start(names: &[&'static str], base_port: u16, backends: &Backends) -> Self {
        let mut refs = Self {
            children: Vec::new(),
            failed: Vec::new(),
            base_port,
        };
        let dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(std::path::Path::to_path_buf));
        for &name in names {
            let exe = dir.as_ref().map(|d| d.join(name));
            let Some(exe) = exe.filter(|e| e.exists()) else {
                refs.failed.push((
                    name,
                    format!("{name} not found next to agora (cargo build --workspace builds it)"),
                ));
                continue;
            };
            let mut command = Command::new(exe);
            command.args(["--port", &refs.port(name).to_string()]);
            match name {
                "ref-proxy" => {
                    command.args([
                        "--upstream",
                        &format!("http://127.0.0.1:{}", refs.port("ref-hello")),
                    ]);
                }
                "ref-redis" => {
                    command.args(["--redis-url", &backends.redis_url]);
                }
                "ref-pg" => {
                    command.args(["--database-url", &backends.database_url]);
                }
                _ => {}
            }
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            match command.spawn() {
                Ok(child) => refs.children.push((name, child)),
                Err(err) => refs.failed.push((name, format!("starting {name}: {err}"))),
            }
        }
        // Up when they answer; one that exits first failed (PostgreSQL or Redis unreachable).
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut i = 0;
        while i < refs.children.len() {
            let (name, child) = &mut refs.children[i];
            let name = *name;
            let url = format!("http://127.0.0.1:{}/users/1", base_port + offset_of(name));
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                i += 1;
                continue;
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || std::time::Instant::now() > deadline {
                let mut why = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut why);
                }
                let mut removed = refs.children.remove(i);
                bench_system::stop_children(std::slice::from_mut(&mut removed));
                refs.failed
                    .push((name, format!("{name} did not start: {}", why.trim())));
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refs
    }
}

fn offset_of(name: &str) -> u16 {
    match name {
        "ref-hello" => 10,
        "ref-proxy" => 11,
        "ref-redis" => 12,
        _ => 13,
    }
}

impl Drop for References {
    fn drop(&mut self) {
        bench_system::stop_children(&mut self.children);
    }
}

/// `agora bench`.
pub async fn hot(args: HotBench) -> anyhow::Result<()> {
    args.validate()?;
    let selected = args.selected();
    let backends = Backends {
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/agora_bench".to_owned()),
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
            "agora bench: {} mode, {} connections, {seconds} s per scenario, {} seeded users, on {}",
            match (&args.url, args.mode) {
                (Some(url), _) => format!("running system at {url}"),
                (None, Mode::Embedded) => "embedded".to_owned(),
                (None, Mode::Distributed) => "distributed".to_owned(),
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
                "write check: {} creates in {:.0} s, slowest {:.1} ms (target: none over 100 ms: {})",
                row.requests,
                row.seconds,
                row.max_ms,
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

/// What the scenarios share: the main system, its seeded users, the variants started on demand.
struct Context {
    mode: Mode,
    connections: usize,
    seconds: u64,
    rate: u64,
    base_port: u16,
    users: usize,
    interactive: bool,
    backends: Backends,
    main: Option<System>,
    gateway: SocketAddr,
    users_addr: SocketAddr,
    seeded: Vec<i64>,
    stamp: u128,
    ticks: u64,
    /// Order bodies (a user and products of `bench::setup`), made once.
    orders: Option<Arc<Vec<Bytes>>>,
}

impl Context {
    async fn new(args: &HotBench, backends: Backends) -> anyhow::Result<Self> {
        let (main, gateway, users_addr) = match &args.url {
            Some(url) => {
                let users = match &args.users_url {
                    Some(users) => users.clone(),
                    None => {
                        let mut users = url.clone();
                        let port = url.port_or_known_default().unwrap_or(80);
                        let _ = users.set_port(Some(port + 1));
                        users
                    }
                };
                (None, socket_addr(url)?, socket_addr(&users)?)
            }
            None => {
                let spec = Spec {
                    mode: args.mode,
                    base_port: args.base_port,
                    auth_required: false,
                    uncached: false,
                    services: bench_system::SERVICES.iter().map(|(n, _)| *n).collect(),
                    redis_prefix: "bench:".to_owned(),
                };
                let system = System::start(
                    &spec,
                    Some(&backends).filter(|_| args.mode == Mode::Distributed),
                )
                .await?;
                let (g, u) = (system.addr("gateway"), system.addr("users"));
                (Some(system), g, u)
            }
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let mut ctx = Self {
            mode: args.mode,
            connections: args.connections,
            seconds: args.seconds(),
            rate: args.rate,
            base_port: args.base_port,
            users: args.users,
            interactive: std::io::IsTerminal::is_terminal(&std::io::stdout()) && !args.json,
            backends,
            main,
            gateway,
            users_addr,
            seeded: Vec::new(),
            stamp,
            ticks: crate::procs::ticks_per_second(),
            orders: None,
        };
        if !args.check_writes {
            ctx.seeded = seed_users(users_addr, args.users, &format!("s{stamp}")).await?;
        }
        Ok(ctx)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    fn load(&self, addr: SocketAddr, label: &str, token: Option<String>) -> Load {
        Load {
            addr,
            connections: self.connections,
            duration: self.duration(),
            token,
            label: if self.interactive {
                label.to_owned()
            } else {
                String::new()
            },
        }
    }

    /// The processes a scenario on `system` involves: by the services it touches (one `agora
    /// up` process in embedded mode), plus the backends the distributed mode uses.
    fn agora_processes(
        &self,
        system: Option<&System>,
        services: &[&str],
        backends: &[&str],
    ) -> Vec<(String, Vec<u32>)> {
        let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
        match system {
            Some(system) => {
                for (name, pid) in system.pids() {
                    if name == "agora up" || services.contains(&name) {
                        groups.push((name.to_owned(), vec![pid]));
                    }
                }
            }
            None => {
                // A running system: whoever listens on the ports.
                let gateway = self.gateway.port();
                let ports: Vec<u16> = services
                    .iter()
                    .filter_map(|s| match *s {
                        "gateway" => Some(gateway),
                        "users" => Some(self.users_addr.port()),
                        _ => None,
                    })
                    .collect();
                let found = crate::procs::listeners(&ports);
                let mut seen = Vec::new();
                for (service, port) in services.iter().zip(&ports) {
                    if let Some(&pid) = found.get(port)
                        && !seen.contains(&pid)
                    {
                        seen.push(pid);
                        groups.push(((*service).to_owned(), vec![pid]));
                    }
                }
            }
        }
        if self.mode == Mode::Distributed || system.is_none() {
            groups.extend(backend_processes(backends));
        }
        groups
    }

    fn with_load_generator(mut groups: Vec<(String, Vec<u32>)>) -> Vec<(String, Vec<u32>)> {
        groups.push((LOAD_GENERATOR.to_owned(), vec![std::process::id()]));
        groups
    }

    /// Warms up, then measures `plan` on `load` with the CPU and memory of `groups`.
    async fn measure(
        &self,
        scenario: &str,
        load: Load,
        plan: Plan,
        groups: Vec<(String, Vec<u32>)>,
    ) -> Row {
        let warm = Load {
            duration: WARM_UP.min(load.duration),
            label: String::new(),
            ..load.clone()
        };
        // Its own request numbers, so what must be unique (emails) stays unique.
        let measured = plan.clone();
        let warm_plan: Plan = Arc::new(move |c, n| measured(c, n + (1 << 32)));
        let _ = load::run(&warm, warm_plan).await;
        let watch = Watch::start(Self::with_load_generator(groups), self.ticks);
        let outcome = load::run(&load, plan).await;
        let mut row = Row::from_outcome(scenario, load.connections, &outcome);
        row.processes = watch.finish(outcome.ok);
        row.compare_to = compare_to(scenario, self.mode);
        row
    }

    async fn run(&mut self, scenario: &str, refs: &References) -> anyhow::Result<Row> {
        if scenario.starts_with("ref-") {
            if let Some((_, why)) = refs.failed.iter().find(|(n, _)| *n == scenario) {
                anyhow::bail!("{why}");
            }
            let pid = refs.pid(scenario).context("not started")?;
            let mut groups = vec![(scenario.to_owned(), vec![pid])];
            match scenario {
                "ref-proxy" => groups.extend(
                    refs.pid("ref-hello")
                        .map(|p| ("ref-hello".to_owned(), vec![p])),
                ),
                "ref-redis" => groups.extend(backend_processes(&["redis"])),
                "ref-pg" => groups.extend(backend_processes(&["postgres"])),
                _ => {}
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], refs.port(scenario)));
            let rows = self.users as u64;
            let plan: Plan = Arc::new(move |c, n| {
                Req::get(format!(
                    "/users/{}",
                    1 + (load::key(c, n, 2) % rows.min(1000))
                ))
            });
            return Ok(self
                .measure(scenario, self.load(addr, scenario, None), plan, groups)
                .await);
        }
        match scenario {
            "cached-get-gateway" | "cached-get-direct" => {
                let (addr, services) = if scenario == "cached-get-gateway" {
                    (self.gateway, vec!["gateway", "users"])
                } else {
                    (self.users_addr, vec!["users"])
                };
                let hot: Arc<Vec<i64>> =
                    Arc::new(self.seeded.iter().copied().take(HOT_IDS).collect());
                anyhow::ensure!(!hot.is_empty(), "no seeded users");
                let plan: Plan = Arc::new(move |c, n| {
                    Req::get(format!(
                        "/api/v1/users/{}",
                        hot[(c * 7 + n as usize) % hot.len()]
                    ))
                });
                let groups = self.agora_processes(self.main.as_ref(), &services, &["redis"]);
                Ok(self
                    .measure(scenario, self.load(addr, scenario, None), plan, groups)
                    .await)
            }
            "cached-get-gateway-auth" => self.cached_get_auth().await,
            "uncached-get-direct" => self.uncached_get().await,
            "user-create" => {
                let plan = self.user_create_plan();
                let groups = self.agora_processes(
                    self.main.as_ref(),
                    &["gateway", "users"],
                    &["postgres", "nats"],
                );
                Ok(self
                    .measure(
                        scenario,
                        self.load(self.gateway, scenario, None),
                        plan,
                        groups,
                    )
                    .await)
            }
            "write-check" => {
                let plan = self.user_create_plan();
                let groups = self.agora_processes(
                    self.main.as_ref(),
                    &["gateway", "users"],
                    &["postgres", "nats"],
                );
                let mut row = self
                    .measure(
                        scenario,
                        self.load(self.gateway, scenario, None),
                        plan,
                        groups,
                    )
                    .await;
                row.note = Some(format!(
                    "slowest create {:.1} ms (target: none over 100 ms)",
                    row.max_ms
                ));
                Ok(row)
            }
            "product-list" => self.product_list().await,
            "order-create" => self.order_create().await,
            "order-latency" => self.order_latency().await,
            "mixed" => self.mixed().await,
            other => anyhow::bail!("unknown scenario {other}"),
        }
    }

    fn user_create_plan(&self) -> Plan {
        let stamp = self.stamp;
        Arc::new(move |c, n| {
            Req::post(
                "/api/v1/users",
                format!(
                    r#"{{"name":"Bench {c} {n}","email":"c{c}-{n}-{stamp}@bench.agora.local"}}"#
                ),
            )
        })
    }

    /// A system of its own in auth `required` mode (embedded: a second `agora up`; distributed:
    /// a users and a gateway process on the same data), a logged-in account reading itself.
    async fn cached_get_auth(&mut self) -> anyhow::Result<Row> {
        anyhow::ensure!(
            self.main.is_some(),
            "needs a system the bench starts (not --url)"
        );
        let spec = Spec {
            mode: self.mode,
            base_port: self.base_port + 100,
            auth_required: true,
            uncached: false,
            services: vec!["users", "gateway"],
            redis_prefix: "bench:".to_owned(),
        };
        let system = System::start(&spec, self.distributed_backends()).await?;
        let client = reqwest::Client::new();
        let email = format!("auth-{}@bench.agora.local", self.stamp);
        let password = "bench-password-0123";
        let registered: Value = client
            .post(format!("{}/api/v1/auth/register", system.url("gateway")))
            .json(&json!({"email": email, "name": "Bench Auth", "password": password}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = registered["id"].as_i64().context("the registered id")?;
        let login: Value = client
            .post(format!("{}/api/v1/auth/login", system.url("gateway")))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = login["access_token"]
            .as_str()
            .context("a token")?
            .to_owned();
        let plan: Plan = Arc::new(move |_, _| Req::get(format!("/api/v1/users/{id}")));
        let groups = self.agora_processes(Some(&system), &["gateway", "users"], &["redis"]);
        let load = self.load(
            system.addr("gateway"),
            "cached-get-gateway-auth",
            Some(token),
        );
        let row = self
            .measure("cached-get-gateway-auth", load, plan, groups)
            .await;
        drop(system);
        Ok(row)
    }

    fn distributed_backends(&self) -> Option<&Backends> {
        (self.mode == Mode::Distributed).then_some(&self.backends)
    }

    /// A users service with `cache.item_ttl_secs = 0` (embedded: a second `agora up`, seeded;
    /// distributed: one users process on the same data, its own Redis prefix).
    async fn uncached_get(&mut self) -> anyhow::Result<Row> {
        anyhow::ensure!(
            self.main.is_some(),
            "needs a system the bench starts (not --url)"
        );
        let spec = Spec {
            mode: self.mode,
            base_port: self.base_port + 200,
            auth_required: false,
            uncached: true,
            services: vec!["users"],
            redis_prefix: "bench:uncached:".to_owned(),
        };
        let system = System::start(&spec, self.distributed_backends()).await?;
        let ids = match self.mode {
            Mode::Embedded => {
                seed_users(
                    system.addr("users"),
                    self.users,
                    &format!("u{}", self.stamp),
                )
                .await?
            }
            Mode::Distributed => self.seeded.clone(),
        };
        let ids = Arc::new(ids);
        let plan: Plan = Arc::new(move |c, n| {
            let i = (load::unit(load::key(c, n, 3)) * ids.len() as f64) as usize;
            Req::get(format!("/api/v1/users/{}", ids[i.min(ids.len() - 1)]))
        });
        let groups = self.agora_processes(Some(&system), &["users"], &["redis", "postgres"]);
        let load = self.load(system.addr("users"), "uncached-get-direct", None);
        let mut row = self
            .measure("uncached-get-direct", load, plan, groups)
            .await;
        row.note = Some(match self.mode {
            Mode::Embedded => "SQLite; no reference (ref-pg is PostgreSQL)".to_owned(),
            Mode::Distributed => {
                "PostgreSQL; with TTL 0 each read still makes its Redis round trips (miss, store)"
                    .to_owned()
            }
        });
        drop(system);
        Ok(row)
    }

    async fn product_list(&mut self) -> anyhow::Result<Row> {
        let client = reqwest::Client::new();
        let category = format!("Bench{}", self.stamp);
        for n in 0..20 {
            client
                .post(format!("http://{}/api/v1/products", self.gateway))
                .json(
                    &json!({"name": format!("bench {} {n}", self.stamp), "price": "9.99",
                    "stock": 100, "category": category}),
                )
                .send()
                .await?
                .error_for_status()
                .context("creating a product (in auth `required` mode this needs an admin)")?;
        }
        let path = format!("/api/v1/products?category={category}");
        let plan: Plan = Arc::new(move |_, _| Req::get(path.clone()));
        let groups = self.agora_processes(self.main.as_ref(), &["gateway", "catalog"], &["redis"]);
        Ok(self
            .measure(
                "product-list",
                self.load(self.gateway, "product-list", None),
                plan,
                groups,
            )
            .await)
    }

    async fn order_bodies(&mut self) -> anyhow::Result<Arc<Vec<Bytes>>> {
        if let Some(bodies) = &self.orders {
            return Ok(bodies.clone());
        }
        let client = reqwest::Client::new();
        let base = format!("http://{}", self.gateway);
        let (user, products) = crate::bench::setup(&client, &base).await?;
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            products
                .iter()
                .map(|p| {
                    Bytes::from(
                        json!({"user_id": user, "product_id": p, "quantity": 1}).to_string(),
                    )
                })
                .collect(),
        );
        self.orders = Some(bodies.clone());
        Ok(bodies)
    }

    async fn order_create(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let plan: Plan = Arc::new(move |c, n| {
            Req::post(
                "/api/v1/orders",
                bodies[(c + n as usize) % bodies.len()].clone(),
            )
        });
        let groups = self.agora_processes(
            self.main.as_ref(),
            &["gateway", "orders", "users", "catalog", "worker"],
            &["postgres", "nats"],
        );
        let mut row = self
            .measure(
                "order-create",
                self.load(self.gateway, "order-create", None),
                plan,
                groups,
            )
            .await;
        let drained =
            crate::bench::drain(&reqwest::Client::new(), &format!("http://{}", self.gateway))
                .await?;
        row.note = Some(format!(
            "accepted/s; the worker drained the queue {:.1} s after",
            drained.as_secs_f64()
        ));
        Ok(row)
    }

    async fn order_latency(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let values: Arc<Vec<Value>> = Arc::new(
            bodies
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect(),
        );
        let groups = self.agora_processes(
            self.main.as_ref(),
            &["gateway", "orders", "users", "catalog", "worker"],
            &["postgres", "nats"],
        );
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(10))
            .build()?;
        let base = format!("http://{}", self.gateway);
        let watch = Watch::start(Self::with_load_generator(groups), self.ticks);
        let fixed =
            crate::bench::fixed_rate(&client, &base, values, self.rate, self.duration()).await?;
        let requests = (fixed.accepted_per_second * self.seconds as f64).round() as u64;
        let mut row = Row::skipped("order-latency", String::new());
        row.connections = 1;
        row.requests = requests;
        row.seconds = self.seconds as f64;
        row.per_second = fixed.accepted_per_second;
        row.p50_ms = fixed.p50_ms;
        row.p99_ms = fixed.p99_ms;
        row.p999_ms = fixed.p99_ms;
        row.errors = fixed.errors + fixed.refused;
        row.processes = watch.finish(requests);
        row.note = Some(format!(
            "{} orders/s sent (reqwest, one task per order; p99.9 not measured, shown as p99); accepted → processed: p50 {} ms, p99 {} ms (last {} processed); drained {:.1} s after",
            self.rate,
            fixed.processed_p50_ms,
            fixed.processed_p99_ms,
            fixed.processed_window,
            fixed.drained.as_secs_f64()
        ));
        Ok(row)
    }

    async fn mixed(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let ids = Arc::new(self.seeded.clone());
        anyhow::ensure!(!ids.is_empty(), "no seeded users");
        let zipf = Arc::new(Zipf::new(ids.len(), 1.0));
        let stamp = self.stamp;
        let plan: Plan = Arc::new(move |c, n| {
            let pick = load::unit(load::key(c, n, 4));
            if pick < 0.80 {
                Req::get(format!(
                    "/api/v1/users/{}",
                    ids[zipf.pick(load::key(c, n, 5)) - 1]
                ))
            } else if pick < 0.95 {
                Req::post(
                    "/api/v1/users",
                    format!(
                        r#"{{"name":"Mixed {c} {n}","email":"m{c}-{n}-{stamp}@bench.agora.local"}}"#
                    ),
                )
            } else {
                Req::post(
                    "/api/v1/orders",
                    bodies[(c + n as usize) % bodies.len()].clone(),
                )
            }
        });
        let groups = self.agora_processes(
            self.main.as_ref(),
            &["gateway", "users", "orders", "catalog", "worker"],
            &["redis", "postgres", "nats"],
        );
        let mut row = self
            .measure(
                "mixed",
                self.load(self.gateway, "mixed", None),
                plan,
                groups,
            )
            .await;
        let drained =
            crate::bench::drain(&reqwest::Client::new(), &format!("http://{}", self.gateway))
                .await?;
        row.note = Some(format!(
            "80% reads (Zipf s=1 over {} users), 15% user creates, 5% orders; orders drained {:.1} s after",
            self.seeded.len(),
            drained.as_secs_f64()
        ));
        Ok(row)
    }
}

/// The servers the distributed mode uses, by the port they listen on (PostgreSQL with its
/// backends: each connection is a child process).
fn backend_processes(names: &[&str]) -> Vec<(String, Vec<u32>)> {
    let ports: Vec<(&str, u16)> = names
        .iter()
        .filter_map(|n| match *n {
            "redis" => Some(("redis-server", 6379)),
            "postgres" => Some(("postgres", 5432)),
            "nats" => Some(("nats-server", 4222)),
            _ => None,
        })
        .collect();
    let found = crate::procs::listeners(&ports.iter().map(|(_, p)| *p).collect::<Vec<_>>());
    ports
        .iter()
        .filter_map(|(name, port)| {
            let pid = *found.get(port)?;
            let pids = if *name == "postgres" {
                crate::procs::with_children(pid)
            } else {
                vec![pid]
            };
            Some(((*name).to_owned(), pids))
        })
        .collect()
}

/// Creates `count` users on the users service at `addr` (8 at a time); their ids.
async fn seed_users(addr: SocketAddr, count: usize, tag: &str) -> anyhow::Result<Vec<i64>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{addr}/api/v1/users");
    let tag = tag.to_owned();
    let tasks: Vec<_> = (0..8)
        .map(|worker| {
            let (client, url, tag) = (client.clone(), url.clone(), tag.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in (worker..count).step_by(8) {
                    let response = client
                        .post(&url)
                        .json(&json!({"name": format!("Bench User {n}"),
                            "email": format!("seed-{tag}-{n}@bench.agora.local")}))
                        .send()
                        .await
                        .context("seeding users")?;
                    let status = response.status();
                    anyhow::ensure!(status == 201, "seeding a user answered {status}");
                    let user: Value = response.json().await?;
                    ids.push((n, user["id"].as_i64().context("a user id")?));
                }
                anyhow::Ok(ids)
            })
        })
        .collect();
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.extend(task.await??);
    }
    ids.sort_unstable();
    Ok(ids.into_iter().map(|(_, id)| id).collect())
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
