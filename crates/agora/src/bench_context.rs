//! What the scenarios of `agora bench` share ([`Context`]): the main system and its seeded
//! users, how a scenario is measured (warm-up, load, the processes watched), and the dispatch to
//! each scenario (the longer ones are in `bench_scenarios.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::bench_hot::{HotBench, compare_to};
use crate::bench_refs::References;
use crate::bench_report::{LOAD_GENERATOR, Row, Watch};
use crate::bench_system::{self, Backends, Mode, Spec, System};
use crate::load::{self, Load, Plan, Req};

/// Unmeasured requests before each scenario: connections open, caches warm.
const WARM_UP: Duration = Duration::from_secs(1);

/// Ids the cached GETs go round (all cached after the warm-up).
const HOT_IDS: usize = 100;

/// What the scenarios share: the main system, its seeded users, the variants started on demand.
pub(crate) struct Context {
    pub(crate) mode: Mode,
    pub(crate) connections: usize,
    pub(crate) seconds: u64,
    pub(crate) rate: u64,
    pub(crate) base_port: u16,
    pub(crate) users: usize,
    pub(crate) interactive: bool,
    pub(crate) backends: Backends,
    pub(crate) main: Option<System>,
    pub(crate) gateway: SocketAddr,
    pub(crate) users_addr: SocketAddr,
    pub(crate) seeded: Vec<i64>,
    pub(crate) stamp: u128,
    pub(crate) ticks: u64,
    /// Order bodies (a user and products of `bench::setup`), made once.
    pub(crate) orders: Option<Arc<Vec<Bytes>>>,
}

impl Context {
    pub(crate) async fn new(args: &HotBench, backends: Backends) -> anyhow::Result<Self> {
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

    pub(crate) fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }

    pub(crate) fn load(&self, addr: SocketAddr, label: &str, token: Option<String>) -> Load {
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
    pub(crate) fn agora_processes(
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
                // A running system: whoever listens on the ports (the default layout: each
                // service at the gateway's port + its offset, users where --users-url says).
                let gateway = self.gateway.port();
                let pairs: Vec<(&str, u16)> = services
                    .iter()
                    .filter_map(|s| {
                        let (_, offset) = bench_system::SERVICES.iter().find(|(n, _)| n == s)?;
                        let port = if *s == "users" {
                            self.users_addr.port()
                        } else {
                            gateway.checked_add(*offset)?
                        };
                        Some((*s, port))
                    })
                    .collect();
                let found =
                    crate::procs::listeners(&pairs.iter().map(|(_, p)| *p).collect::<Vec<_>>());
                // One process serving several of them (`agora up`) is one group, named by all.
                let mut by_pid: Vec<(u32, Vec<&str>)> = Vec::new();
                for (service, port) in &pairs {
                    let Some(&pid) = found.get(port) else {
                        continue;
                    };
                    match by_pid.iter_mut().find(|(p, _)| *p == pid) {
                        Some((_, names)) => names.push(service),
                        None => by_pid.push((pid, vec![service])),
                    }
                }
                for (pid, names) in by_pid {
                    groups.push((names.join("+"), vec![pid]));
                }
            }
        }
        if self.mode == Mode::Distributed {
            groups.extend(backend_processes(backends));
        }
        groups
    }

    pub(crate) fn with_load_generator(
        mut groups: Vec<(String, Vec<u32>)>,
    ) -> Vec<(String, Vec<u32>)> {
        groups.push((LOAD_GENERATOR.to_owned(), vec![std::process::id()]));
        groups
    }

    /// Warms up, then measures `plan` on `load` with the CPU and memory of `groups`.
    pub(crate) async fn measure(
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

    pub(crate) async fn run(&mut self, scenario: &str, refs: &References) -> anyhow::Result<Row> {
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
                    "slowest create {:.1} ms, {} of {} over 100 ms (target: none over 100 ms)",
                    row.max_ms, row.over_100ms, row.requests
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

    pub(crate) fn distributed_backends(&self) -> Option<&Backends> {
        (self.mode == Mode::Distributed).then_some(&self.backends)
    }
}

fn socket_addr(url: &url::Url) -> anyhow::Result<SocketAddr> {
    url.socket_addrs(|| Some(80))?
        .into_iter()
        .next()
        .with_context(|| format!("no address for {url}"))
}

/// The servers the distributed mode uses, by the port they listen on (PostgreSQL with its
/// backends: each connection is a child process).
pub(crate) fn backend_processes(names: &[&str]) -> Vec<(String, Vec<u32>)> {
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
pub(crate) async fn seed_users(
    addr: SocketAddr,
    count: usize,
    tag: &str,
) -> anyhow::Result<Vec<i64>> {
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
