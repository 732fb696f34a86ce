//! The systems `agora bench` starts for itself, as child processes of its own binary: `agora up`
//! (embedded: every service in one process, SQLite under a temp data dir, in-process cache and
//! bus) or one `agora serve <name>` process per service (distributed: PostgreSQL, Redis, NATS).
//! Every port is `base_port + offset` (gateway +0, users +1, ... cache +6; metrics +1000), so a
//! bench never collides with a system on the default ports. Each child is stopped by its pid
//! (SIGTERM, then SIGKILL after 5 s) when the [`System`] is dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Services and their port offsets from the base port.
pub const SERVICES: [(&str, u16); 8] = [
    ("gateway", 0),
    ("users", 1),
    ("catalog", 2),
    ("orders", 3),
    ("worker", 4),
    ("notify", 5),
    ("cache", 6),
    ("chat", 7),
];

/// The gateway's rate-limit budgets a benchmarked system gets (see where it is started).
const GENEROUS_RATE_LIMITS: [&str; 4] = [
    "AGORA_SERVICES__GATEWAY__RATE_LIMIT__READ__PER_IP",
    "AGORA_SERVICES__GATEWAY__RATE_LIMIT__READ__PER_USER",
    "AGORA_SERVICES__GATEWAY__RATE_LIMIT__WRITE__PER_IP",
    "AGORA_SERVICES__GATEWAY__RATE_LIMIT__WRITE__PER_USER",
];

/// The keys every process of one bench shares (its own; nothing outside the bench uses them).
const JWT_SECRET: &str = "agora-bench-jwt-secret-0123456789abcdef";
const SERVICE_TOKEN: &str = "agora-bench-service-token-0123456789ab";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SQLite, in-process cache and bus: `agora up`, one process.
    Embedded,
    /// PostgreSQL, Redis and NATS: one `agora serve <name>` process per service.
    Distributed,
}

/// Where the distributed mode's backends are.
#[derive(Debug, Clone)]
pub struct Backends {
    pub database_url: String,
    pub redis_url: String,
    pub nats_url: String,
}

/// One system to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub mode: Mode,
    pub base_port: u16,
    /// `auth.mode = required` (else `open`).
    pub auth_required: bool,
    /// `cache.item_ttl_secs = 0`: every user read goes to the database.
    pub uncached: bool,
    /// Distributed only: the services to start (embedded starts them all).
    pub services: Vec<&'static str>,
    /// Distributed only: the Redis key prefix (a variant with its own cache needs its own).
    pub redis_prefix: String,
}

/// A running system; stopped (by pid) when dropped.
pub struct System {
    pub base_port: u16,
    children: Vec<(&'static str, Child)>,
    dir: tempfile::TempDir,
}

/// A command running the agora binary `exe`, behind the profiler `BENCH_WRAP` names when
/// set (a command and its arguments, split at spaces: `scripts/link-order` runs every process
/// of a distributed system under callgrind this way). Not an `AGORA_` variable: those are
/// configuration, which refuses names it does not know.
fn agora_command(exe: &std::path::Path) -> Command {
    wrapped(exe, &std::env::var("BENCH_WRAP").unwrap_or_default())
}

/// The log filter of the systems the bench starts: `BENCH_LOG` (`info` measures the default
/// level, where every request opens its spans), `warn` when unset (the level of every figure
/// in BENCHMARKS.md before 2026-12-04).
fn log_level() -> String {
    std::env::var("BENCH_LOG")
        .ok()
        .filter(|level| !level.trim().is_empty())
        .unwrap_or_else(|| "warn".to_owned())
}

/// `exe` run behind `wrap` (a command and its arguments, split at spaces; none when empty).
fn wrapped(exe: &std::path::Path, wrap: &str) -> Command {
    let mut words = wrap.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(exe);
            command
        }
        None => Command::new(exe),
    }
}

impl System {
    pub fn port(&self, service: &str) -> u16 {
        let offset = SERVICES
            .iter()
            .find(|(name, _)| *name == service)
            .map_or(0, |(_, offset)| *offset);
        self.base_port + offset
    }

    pub fn addr(&self, service: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port(service)))
    }

    pub fn url(&self, service: &str) -> String {
        format!("http://{}", self.addr(service))
    }

    /// Starts `spec` and waits (at most 60 s) until every started service answers `/health`.
    pub async fn start(spec: &Spec, backends: Option<&Backends>) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the agora binary")?;
        let dir = tempfile::tempdir().context("a temp dir for the bench's system")?;
        let mut system = System {
            base_port: spec.base_port,
            children: Vec::new(),
            dir,
        };
        let root = system.dir.path().to_path_buf();
        let configure = |command: &mut Command, log: &str| -> anyhow::Result<()> {
            let log = std::fs::File::create(root.join(log))?;
            command
                .current_dir(&root)
                .env("AGORA_DATA_DIR", root.join("data"))
                .env("AGORA_LOG__FORMAT", "json")
                .env("RUST_LOG", log_level())
                .env("AGORA_AUTH__JWT_SECRET", JWT_SECRET)
                .env("AGORA_AUTH__SERVICE_TOKEN", SERVICE_TOKEN)
                .env(
                    "AGORA_AUTH__MODE",
                    if spec.auth_required {
                        "required"
                    } else {
                        "open"
                    },
                )
                .env_remove("AGORA_CONFIG")
                // The rate limits stay on (checked on every request, as in production), with
                // budgets above what one loopback client can send: the default 20,000 reads per
                // second per address would answer part of a run 429.
                .envs(GENEROUS_RATE_LIMITS.map(|name| (name, "100000000")))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if spec.uncached {
                command.env("AGORA_CACHE__ITEM_TTL_SECS", "0");
            }
            for (name, offset) in SERVICES {
                command.env(
                    format!("AGORA_SERVICES__{}__PORT", name.to_uppercase()),
                    (spec.base_port + offset).to_string(),
                );
            }
            match backends {
                Some(b) => {
                    command
                        .env("DATABASE_URL", &b.database_url)
                        .env("REDIS_URL", &b.redis_url)
                        .env("NATS_URL", &b.nats_url)
                        .env("AGORA_REDIS__PREFIX", &spec.redis_prefix)
                        .env("AGORA_BUS__PREFIX", "bench");
                }
                None => {
                    command
                        .env_remove("DATABASE_URL")
                        .env_remove("REDIS_URL")
                        .env_remove("NATS_URL");
                }
            }
            Ok(())
        };
        let started: Vec<&'static str> = match spec.mode {
            Mode::Embedded => {
                let mut command = agora_command(&exe);
                command.arg("up");
                configure(&mut command, "up.log")?;
                let child = command.spawn().context("starting agora up")?;
                system.children.push(("agora up", child));
                SERVICES.iter().map(|(name, _)| *name).collect()
            }
            Mode::Distributed => {
                // The gateway last, so it finds its upstreams up.
                let mut order: Vec<&'static str> = spec
                    .services
                    .iter()
                    .copied()
                    .filter(|s| *s != "gateway")
                    .collect();
                if spec.services.contains(&"gateway") {
                    order.push("gateway");
                }
                for name in &order {
                    let mut command = agora_command(&exe);
                    command.args(["serve", name]);
                    configure(&mut command, &format!("{name}.log"))?;
                    let child = command
                        .spawn()
                        .with_context(|| format!("starting agora serve {name}"))?;
                    system.children.push((name, child));
                    system.wait_healthy(&[name]).await?;
                }
                order
            }
        };
        system.wait_healthy(&started).await?;
        Ok(system)
    }

    async fn wait_healthy(&mut self, services: &[&str]) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for service in services {
            let url = format!("{}/health", self.url(service));
            loop {
                // The gateway's /health aggregates its upstreams: any answer means it is up (a
                // variant runs it in front of only some services).
                if let Ok(r) = client.get(&url).send().await
                    && (r.status().is_success() || *service == "gateway")
                {
                    break;
                }
                let exited = self
                    .children
                    .iter_mut()
                    .find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
                if let Some((name, status)) = exited {
                    anyhow::bail!(
                        "{name} exited ({status}) while starting: {}",
                        self.log_tail()
                    );
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{service} did not answer {url} within 60 s: {}",
                    self.log_tail()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The last lines of every child's log (for an error).
    fn log_tail(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.dir.path()) {
            for entry in dir.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
                    out.push_str(&format!("\n--- {}:\n{tail}", path.display()));
                }
            }
        }
        out
    }

    /// Pid of each child, by the service (or `agora up`) it runs.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children
            .iter()
            .map(|(name, child)| (*name, child.id()))
            .collect()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        stop_children(&mut self.children);
    }
}

/// SIGTERM to each child by its pid, then SIGKILL to those still running after 5 s.
pub fn stop_children(children: &mut [(&'static str, Child)]) {
    for (_, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, child) in children.iter_mut() {
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// The database `agora bench` uses when `DATABASE_URL` is not set: its own, emptied at the start
/// of every run that starts its own system ([`fresh_start`]).
pub const BENCH_DATABASE: &str = "postgres://postgres@127.0.0.1:5432/agora_bench";

/// Empties what the bench's own system keeps between runs, so every run starts from the same
/// place (tables that grow run after run slow each next run down): the bench's own database is
/// dropped (and made again by [`ensure_database`]), and the Redis keys under `bench:` deleted.
/// Only for the bench's own database (`DATABASE_URL` unset): a database named by the user is
/// never dropped.
pub async fn fresh_start(redis_url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(BENCH_DATABASE).context("the bench database")?;
    let (client, task) = admin(&parsed).await?;
    client
        .batch_execute("drop database if exists agora_bench with (force)")
        .await
        .context("emptying the bench database")?;
    drop(client);
    let _ = task.await;
    let mut redis = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await
        .context("connecting to Redis")?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("bench:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut redis)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A connection to the `postgres` database of the server of `url`, and the task driving it (it
/// ends once the client is dropped).
async fn admin(
    url: &url::Url,
) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let mut admin = url.clone();
    admin.set_path("/postgres");
    let (client, connection) = tokio_postgres::connect(admin.as_str(), tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}",
                url.host_str().unwrap_or("?")
            )
        })?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}

/// Creates the database of `url` when it does not exist (connecting to `postgres` on the same
/// server to do it).
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).context("DATABASE_URL")?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "DATABASE_URL: a database name of letters, digits and _ (got {name:?})"
    );
    let (client, task) = admin(&parsed).await?;
    let exists = client
        .query_opt("select 1 from pg_database where datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("create database {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every service the binary runs gets a port of its own in a benchmarked system, at its
    /// default port's offset from the gateway's (a service left out would collide on its default
    /// port between the bench's systems).
    #[test]
    fn every_service_has_its_default_offset() {
        let settings = kit::Settings::defaults();
        let gateway = settings.service("gateway").port;
        for service in crate::services::ALL {
            let (_, offset) = SERVICES
                .iter()
                .find(|(name, _)| *name == service.name)
                .unwrap_or_else(|| panic!("{} has no port in the bench", service.name));
            let port = settings.service(service.name).port;
            assert_eq!(port - gateway, *offset, "{}", service.name);
        }
    }

    /// `BENCH_WRAP` puts its command and arguments before the binary; empty, the binary runs
    /// itself.
    #[test]
    fn a_wrapper_runs_the_binary_as_its_last_argument() {
        let exe = std::path::Path::new("/bin/agora");
        let command = wrapped(
            exe,
            "valgrind  --tool=callgrind --callgrind-out-file=/tmp/x.%p",
        );
        assert_eq!(command.get_program(), "valgrind");
        let args: Vec<_> = command.get_args().collect();
        assert_eq!(
            args,
            [
                "--tool=callgrind",
                "--callgrind-out-file=/tmp/x.%p",
                "/bin/agora"
            ]
        );
        let bare = wrapped(exe, " ");
        assert_eq!(bare.get_program(), "/bin/agora");
        assert_eq!(bare.get_args().count(), 0);
    }
}
