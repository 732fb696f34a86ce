//! Private servers and processes: a Redis, a PostgreSQL cluster, a NATS server and Agora itself
//! (one `agora up`, or `agora serve` processes that can be killed and started again), each started
//! for one test on loopback, on free ports and in temp directories, and each stopped by its own
//! pid when the guard is dropped (also when the test panics), so a fault injected into one never
//! reaches another test or the shared servers of the rest of the suite.

use std::fs::File;
use std::io::BufRead as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// A port nobody listens on right now. The server that takes it binds it a moment later; on
/// loopback, with the kernel handing out ephemeral ports in turn, a collision is improbable.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// Sends `signal` (e.g. "KILL", "STOP") to `pid`; false when the process is already gone.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs a blocking step (a server command) off the async workers, so the load keeps flowing
/// while e.g. `pg_ctl restart` waits.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking step")
}

/// A binary the suite needs, or a failure that says how to get it (never a silent skip).
fn require(path: &Path, package: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: the fault suite starts its own servers; install `{package}` \
         (bash scripts/faults installs it with apt)",
        path.display()
    );
    path.to_owned()
}

fn which(name: &str, fallbacks: &[&str]) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    on_path
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` of one test: no persistence (a restart starts empty, like a crashed cache).
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Mutex<Option<Child>>,
}

impl Redis {
    pub async fn start() -> Self {
        let redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: Mutex::new(None),
        };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// Starts the server (again) on the same port and waits until it answers PING.
    pub async fn spawn(&self) {
        let bin = require(
            &which("redis-server", &["/usr/bin/redis-server"]),
            "redis-server",
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("redis log");
        let child = Command::new(bin)
            .current_dir(self.dir.path())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // Redis 7 refuses DEBUG unless told; the hang scenario needs DEBUG SLEEP.
            .args(["--enable-debug-command", "local"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("redis-server starts");
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 10 s: {}",
                self.port,
                std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<::redis::aio::MultiplexedConnection> {
        let client = ::redis::Client::open(self.url())?;
        // No response timeout of the client's own: DEBUG SLEEP answers only after the sleep,
        // and every caller bounds its call itself.
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(None);
        let connection = tokio::time::timeout(
            timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await??;
        Ok(connection)
    }

    async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.connect(Duration::from_millis(500)).await?;
        tokio::time::timeout(
            Duration::from_millis(500),
            ::redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await??;
        Ok(())
    }

    /// SIGKILL: the process dies with its data, connections are reset.
    pub async fn kill(&self) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            blocking(move || {
                let _ = child.kill();
                let _ = child.wait();
            })
            .await;
        }
    }

    /// SIGSTOP: connections stay open and every call hangs until [`Redis::resume`].
    pub fn pause(&self) {
        let pid = self.pid().expect("redis is running");
        assert!(signal(pid, "STOP"), "SIGSTOP to redis-server {pid}");
    }

    pub fn resume(&self) {
        let pid = self.pid().expect("redis is running");
        assert!(signal(pid, "CONT"), "SIGCONT to redis-server {pid}");
    }

    /// `DEBUG SLEEP secs`: Redis blocks (answers nothing) that long; returns once it answers again.
    pub async fn hang(&self, secs: u64) {
        let mut conn = self
            .connect(Duration::from_secs(2))
            .await
            .expect("a connection for DEBUG SLEEP");
        tokio::time::timeout(
            Duration::from_secs(secs + 5),
            ::redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(secs)
                .query_async::<()>(&mut conn),
        )
        .await
        .expect("DEBUG SLEEP returns")
        .expect("DEBUG SLEEP is accepted");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // SIGKILL works on a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// A PostgreSQL cluster of one test: `initdb` into a temp directory, trust auth, loopback only,
/// its socket in the same directory. Run as the `postgres` user when the suite runs as root,
/// since initdb and postgres refuse root.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    bin: PathBuf,
}

impl Postgres {
    pub async fn start() -> Self {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(status.success(), "chown the temp dir to postgres");
        }
        let pg = Self { port, dir, bin };
        let data = pg.data();
        let (initdb, socket_dir) = (pg.bin.join("initdb"), pg.dir.path().to_owned());
        let mut command = as_postgres(&initdb);
        command.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(command, "initdb").await;
        // Settings in the cluster's own file, so every later start and restart uses them.
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             # The faults are server restarts, never a machine crash, so fsync buys nothing here\n\
             # and costs the 2-core CI machine a lot.\nfsync = off\n",
            socket_dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .expect("append to postgresql.conf");
        pg.start_again().await;
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn pg_ctl(&self, args: &[&str]) {
        let mut command = as_postgres(&self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "30"])
            .args(args);
        run(command, &format!("pg_ctl {}", args.join(" "))).await;
    }

    pub async fn start_again(&self) {
        self.pg_ctl(&["start"]).await;
    }

    /// `pg_ctl stop -m fast`: sessions are ended, the server is gone until started again.
    pub async fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast"]).await;
    }

    /// `pg_ctl restart -m fast`: returns once the server accepts connections again.
    pub async fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast"]).await;
    }

    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT is PostgreSQL's immediate shutdown (the backends exit with the postmaster);
        // SIGKILL if it is still there after 5 s.
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if !signal(pid, "QUIT") {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            signal(pid, "KILL");
        }
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the effective user of this process.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn postgres_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    let bin = versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| root.join("<version>/bin"));
    require(&bin.join("initdb"), "postgresql");
    bin
}

fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

async fn run(mut command: Command, what: &str) {
    let what = what.to_owned();
    blocking(move || {
        let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            output.status.success(),
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// NATS

/// A `nats-server` of one test with JetStream on, its store in a temp directory that outlives
/// restarts: a restarted server (same port, same store) comes back with its streams and
/// consumers, as a real one does.
pub struct Nats {
    pub port: u16,
    dir: TempDir,
    child: Mutex<Option<Child>>,
}

impl Nats {
    pub async fn start() -> Self {
        let nats = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: Mutex::new(None),
        };
        nats.spawn().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Starts the server (again) on the same port and store, and waits until it greets a client.
    pub async fn spawn(&self) {
        let bin = require(
            &which(
                "nats-server",
                &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
            ),
            "nats-server",
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("nats log");
        let child = Command::new(bin)
            .current_dir(self.dir.path())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.greets().await {
            assert!(
                Instant::now() < deadline,
                "nats-server did not answer on port {} within 10 s: {}",
                self.port,
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the server sends its `INFO` greeting (it listens for clients only once JetStream
    /// has recovered its store).
    async fn greets(&self) -> bool {
        use tokio::io::AsyncReadExt as _;
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(&buf == b"INFO")
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), attempt).await,
            Ok(Ok(true))
        )
    }

    /// SIGKILL: the server dies without flushing or saying goodbye; connections are reset.
    pub async fn kill(&self) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut child) = child {
            blocking(move || {
                let _ = child.kill();
                let _ = child.wait();
            })
            .await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agora

/// How Agora runs: every service in one `agora up`, or one `agora serve` process per service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Up,
    Serve,
}

impl Topology {
    pub fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Serve => "serve",
        }
    }
}

/// One Agora process; SIGKILLed by pid on drop (a clean stop is not what these tests check).
struct Process {
    name: String,
    child: Child,
    /// How to start it again on the same port ([`Agora::restart`]); `None` for `up` and the
    /// processes of [`Agora::start`].
    again: Option<Again>,
    /// SIGKILLed by the test ([`Agora::kill`]): its exit is the fault, not a failure.
    killed: bool,
}

/// What [`Agora::serve`] started a process with.
#[derive(Clone)]
struct Again {
    service: String,
    port: u16,
    env: Vec<(String, String)>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Agora on PostgreSQL and Redis: the gateway the load goes through, and the users service
/// whose `/metrics` (on its private metrics listener, `users_metrics`) tells whether the cache
/// is in service.
pub struct Agora {
    pub gateway: String,
    pub users: String,
    /// The users service's metrics listener (`/metrics` is not on its public port).
    pub users_metrics: String,
    processes: Vec<Process>,
    dir: TempDir,
}

/// The service credential every process of the suite shares.
pub const SERVICE_TOKEN: &str = "fault-suite-service-token-0123456789ab";

/// The faults are about resilience, not identity: the load sends no tokens, so auth is `open`
/// (as under `agora up`), and every `serve` process shares these keys.
fn auth_env() -> Vec<(String, String)> {
    vec![
        ("AGORA_AUTH__MODE".to_owned(), "open".to_owned()),
        (
            "AGORA_AUTH__JWT_SECRET".to_owned(),
            "fault-suite-jwt-secret-0123456789abcdef".to_owned(),
        ),
        (
            "AGORA_AUTH__SERVICE_TOKEN".to_owned(),
            SERVICE_TOKEN.to_owned(),
        ),
    ]
}

impl Agora {
    pub async fn start(topology: Topology, pg: &Postgres, redis: &Redis) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let env = vec![
            ("DATABASE_URL".to_owned(), pg.url()),
            ("REDIS_URL".to_owned(), redis.url()),
            // Short, so that the recovery bounds below are short too.
            (
                "AGORA_REDIS__RETRY_AFTER_MS".to_owned(),
                crate::REDIS_RETRY_AFTER.as_millis().to_string(),
            ),
            // info: the state changes (down, back, flushed) are logged; the suite counts lines.
            ("RUST_LOG".to_owned(), "info".to_owned()),
            ("AGORA_LOG__FORMAT".to_owned(), "json".to_owned()),
        ]
        .into_iter()
        .chain(auth_env())
        .collect::<Vec<_>>();
        let mut agora = Self {
            gateway: String::new(),
            users: String::new(),
            users_metrics: String::new(),
            processes: Vec::new(),
            dir,
        };
        match topology {
            Topology::Up => {
                let mut command = agora.command("up", &env);
                // Port 0 everywhere: `up` prints the ports it bound, so tests never collide.
                for service in [
                    "GATEWAY", "USERS", "CATALOG", "ORDERS", "WORKER", "NOTIFY", "CACHE", "CHAT",
                ] {
                    command.env(format!("AGORA_SERVICES__{service}__PORT"), "0");
                }
                let lines = agora.spawn("up", command, 8).await;
                // `  users    http://127.0.0.1:P   (metrics http://127.0.0.1:M/metrics)`
                for line in lines {
                    if let Some((name, rest)) = line.trim().split_once(" http://") {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let metrics = rest
                            .split_once("(metrics http://")
                            .map(|(_, m)| m.trim_end_matches(')').trim_end_matches("/metrics"));
                        match name.trim() {
                            "gateway" => agora.gateway = format!("http://{addr}"),
                            "users" => {
                                agora.users = format!("http://{addr}");
                                if let Some(metrics) = metrics {
                                    agora.users_metrics = format!("http://{metrics}");
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            Topology::Serve => {
                let mut command = agora.command("serve", &env);
                command.args(["users", "--port", "0"]);
                // "users listening on http://…", then "users metrics on http://…/metrics".
                let lines = agora.spawn("users", command, 2).await;
                agora.users = listening_url(&lines[0]);
                agora.users_metrics = listening_url(&lines[1])
                    .trim_end_matches("/metrics")
                    .to_owned();
                let mut command = agora.command("serve", &env);
                command
                    .args(["gateway", "--port", "0"])
                    .env(
                        "AGORA_SERVICES__USERS__UPSTREAMS",
                        format!("[\"{}\"]", agora.users),
                    )
                    // No catalog, orders or worker runs here; point their routes at ports nothing
                    // listens on rather than at the defaults, where another test's may be.
                    .env(
                        "AGORA_SERVICES__CATALOG__UPSTREAMS",
                        format!("[\"http://127.0.0.1:{}\"]", free_port()),
                    )
                    .env(
                        "AGORA_SERVICES__ORDERS__UPSTREAMS",
                        format!("[\"http://127.0.0.1:{}\"]", free_port()),
                    )
                    .env(
                        "AGORA_SERVICES__WORKER__UPSTREAMS",
                        format!("[\"http://127.0.0.1:{}\"]", free_port()),
                    );
                let line = agora.spawn("gateway", command, 1).await;
                agora.gateway = listening_url(&line[0]);
            }
        }
        assert!(
            !agora.gateway.is_empty() && !agora.users.is_empty() && !agora.users_metrics.is_empty(),
            "agora printed the gateway's and the users service's addresses"
        );
        agora
    }

    /// No process yet: the caller starts each one with [`Agora::serve`] (the orders scenarios,
    /// which choose their own topology). `gateway` and `users` stay empty until it sets them.
    pub fn empty() -> Self {
        Self {
            gateway: String::new(),
            users: String::new(),
            users_metrics: String::new(),
            processes: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Starts `agora serve <service> --port <port>` (0: any free port) as process `name`, with
    /// `env` over a clean environment; returns its URL once it prints it.
    pub async fn serve(
        &mut self,
        name: &str,
        service: &str,
        port: u16,
        env: &[(String, String)],
    ) -> String {
        let mut command = self.command("serve", &[auth_env(), env.to_vec()].concat());
        command.args([service, "--port", &port.to_string()]);
        let line = self.spawn(name, command, 1).await;
        let url = listening_url(&line[0]);
        let bound = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the address");
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .expect("just started");
        process.again = Some(Again {
            service: service.to_owned(),
            port: bound,
            env: env.to_vec(),
        });
        url
    }

    /// SIGKILL to process `name`, by its pid: it dies at once, mid-request, without cleaning up.
    pub async fn kill(&mut self, name: &str) {
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        process.killed = true;
        assert!(
            signal(process.child.id(), "KILL"),
            "SIGKILL to agora {name}"
        );
        // Reaped here, so the port is free for `restart` and no zombie is left.
        let _ = process.child.wait();
    }

    /// SIGSTOP to process `name`: it freezes mid-whatever (a long GC pause, a frozen VM), its
    /// connections open, until [`Agora::resume`].
    pub fn pause(&self, name: &str) {
        let process = self.process(name);
        assert!(
            signal(process.child.id(), "STOP"),
            "SIGSTOP to agora {name}"
        );
    }

    pub fn resume(&self, name: &str) {
        let process = self.process(name);
        assert!(
            signal(process.child.id(), "CONT"),
            "SIGCONT to agora {name}"
        );
    }

    fn process(&self, name: &str) -> &Process {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Starts process `name` (started by [`Agora::serve`], then killed) again, on the port it
    /// had, so its neighbours' upstreams still point at it; returns its URL.
    pub async fn restart(&mut self, name: &str) -> String {
        let again = self
            .processes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.again.clone())
            .unwrap_or_else(|| panic!("{name} was not started by `serve`"));
        self.serve(name, &again.service, again.port, &again.env)
            .await
    }

    fn command(&self, subcommand: &str, env: &[(String, String)]) -> Command {
        let mut command = Command::new(AGORA);
        command.current_dir(self.dir.path()).arg(subcommand);
        for (key, _) in std::env::vars() {
            if key.starts_with("AGORA_")
                || matches!(key.as_str(), "DATABASE_URL" | "REDIS_URL" | "NATS_URL")
            {
                command.env_remove(key);
            }
        }
        // Metrics listeners on free ports: a service's port plus the offset (the default) could
        // be another test's, or out of range.
        for service in [
            "GATEWAY", "USERS", "CATALOG", "ORDERS", "WORKER", "NOTIFY", "CACHE",
        ] {
            command.env(format!("AGORA_SERVICES__{service}__METRICS_PORT"), "0");
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Spawns `command` with its logs in a file (a full pipe must never block it) and returns
    /// its first `lines` lines that name an address, read within 30 s.
    async fn spawn(&mut self, name: &str, mut command: Command, lines: usize) -> Vec<String> {
        // Appended to: a process started again (`restart`) keeps its earlier lines.
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("log file");
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("agora {name} starts: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        match self.processes.iter_mut().find(|p| p.name == name) {
            Some(process) => {
                process.child = child;
                process.killed = false;
            }
            None => self.processes.push(Process {
                name: name.to_owned(),
                child,
                again: None,
                killed: false,
            }),
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stdout).lines();
            let found: Vec<String> = reader
                .by_ref()
                .map_while(Result::ok)
                .filter(|line| line.contains("http://"))
                .take(lines)
                .collect();
            let _ = tx.send(found);
            // Keep draining, so the process never blocks on a full pipe.
            for _ in reader {}
        });
        let found = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        assert!(
            found.len() == lines,
            "agora {name} did not print its address within 30 s; its log:\n{}",
            self.log_tail(name, 40)
        );
        found
    }

    /// The last `n` lines of a process's log, for failure messages.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Every process's log lines, how many of them are WARN or ERROR, and the most frequent
    /// WARN/ERROR messages with their counts (what an operator would have to read).
    pub fn log_counts(&self) -> (u64, u64, Vec<String>) {
        let mut total = 0;
        let mut warn = 0;
        let mut messages: std::collections::BTreeMap<String, u64> = Default::default();
        for process in &self.processes {
            let text = std::fs::read_to_string(self.log_path(&process.name)).unwrap_or_default();
            for line in text.lines() {
                total += 1;
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let level = entry["level"].as_str().unwrap_or_default();
                if matches!(level, "WARN" | "ERROR") {
                    warn += 1;
                    // Grouped by message, status and cause, which say what went wrong.
                    let fields = &entry["fields"];
                    let mut key = format!(
                        "{} {level} {}",
                        process.name,
                        fields["message"].as_str().unwrap_or_default()
                    );
                    if let Some(status) = fields["status"].as_u64() {
                        key.push_str(&format!(" [{status}]"));
                    }
                    if let Some(cause) = fields["error.message"].as_str() {
                        key.push_str(&format!(
                            ": {}",
                            cause.chars().take(160).collect::<String>()
                        ));
                    }
                    *messages.entry(key).or_default() += 1;
                }
            }
        }
        let mut messages: Vec<(String, u64)> = messages.into_iter().collect();
        messages.sort_by_key(|m| std::cmp::Reverse(m.1));
        let top = messages
            .into_iter()
            .take(8)
            .map(|(message, count)| format!("{count}x {message}"))
            .collect();
        (total, warn, top)
    }

    /// Every process still running (none exited on its own during the fault).
    pub fn exited(&mut self) -> Vec<String> {
        self.processes
            .iter_mut()
            .filter(|p| !p.killed)
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(status)) => Some(format!("{} exited ({status})", p.name)),
                _ => None,
            })
            .collect()
    }
}

fn listening_url(line: &str) -> String {
    let addr = line.rsplit("http://").next().expect("an address").trim();
    format!("http://{addr}")
}
