//! The test harness every service's API suite uses: a [`TestEnv`] per test, with its own SQLite
//! directory or PostgreSQL schema and its own Redis key prefix, so tests run in parallel.
//!
//! PostgreSQL and Redis are real servers: `TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/agora_test`, created when missing) and `TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`). A test that cannot reach them fails; it never skips.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use sqlx::Connection as _;
use tempfile::TempDir;

use crate::config::Settings;
use crate::http::ServeOptions;
use crate::service::{App, Running};
use crate::shutdown::Shutdown;

pub mod fuzz;

/// Which backends a suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite files in a temp dir + the in-process cache (the embedded default).
    Sqlite,
    /// PostgreSQL (own schema per service per test) + Redis (own key prefix per test) + NATS
    /// JetStream (own stream per test).
    Postgres,
}

/// Settings isolated for one test; keep it alive as long as the test runs.
pub struct TestEnv {
    pub settings: Settings,
    pub backend: Backend,
    _dir: TempDir,
}

pub fn test_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/agora_test".into())
}

pub fn test_nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn test_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

impl TestEnv {
    /// A fresh environment on `backend`.
    pub async fn new(backend: Backend) -> Self {
        crate::telemetry::init_for_tests();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::defaults();
        settings.data_dir = dir.path().join("data");
        settings.database.max_connections = 5;
        settings.http.shutdown_grace_secs = 1;
        let unique = uuid::Uuid::new_v4().simple().to_string();
        // Keys of this test only. The mode is `open` (that of `agora up`), so suites about
        // routing, caching or faults send no tokens; auth tests set `required` themselves.
        settings.auth.jwt_secret = Some(crate::auth::Secret::new(format!("jwt-{unique}")));
        settings.auth.service_token = Some(crate::auth::Secret::new(format!("svc-{unique}")));
        settings.auth.mode = Some(crate::auth::AuthMode::Open);
        if backend == Backend::Postgres {
            let url = test_database_url();
            ensure_database(&url)
                .await
                .expect("PostgreSQL for tests is reachable (TEST_DATABASE_URL)");
            let stamp = unix_now();
            let names: Vec<String> = settings.services.keys().cloned().collect();
            for name in names {
                let schema = format!("t{stamp}_{}_{name}", &unique[..10]);
                if let Some(service) = settings.services.get_mut(&name) {
                    service.schema = Some(schema);
                }
            }
            settings.database.url = Some(url);
            settings.redis.url = Some(test_redis_url());
            settings.bus.url = Some(test_nats_url());
            delete_stale_test_streams_once().await;
        }
        settings.redis.prefix = format!("test:{unique}:");
        // Own stream and subjects per test (stale test streams are deleted once per process).
        settings.bus.prefix = format!("t{}_{}", unix_now(), &unique[..10]);
        settings.validate().expect("test settings are valid");
        Self {
            settings,
            backend,
            _dir: dir,
        }
    }

    /// The dependencies of `service` in this environment: its own database (migrated), cache
    /// namespace and bus stream.
    pub async fn deps(&self, service: &crate::service::Service) -> crate::service::Deps {
        crate::service::Deps::connect(service, &self.settings, None)
            .await
            .expect("the test database, Redis and NATS are reachable (TEST_*_URL)")
    }

    /// A database of its own for a test of kit's parts (the relay, the consumer): service
    /// `name`'s schema (named like the harness's, so stale ones are dropped by later runs) or
    /// SQLite file, with kit's tables migrated. Drop it with [`TestEnv::drop_kit_db`].
    pub async fn kit_db(&mut self, name: &str) -> crate::Db {
        let schema = format!("{}_{name}", self.settings.bus.prefix);
        self.settings.services.insert(
            name.to_owned(),
            crate::config::ServiceSettings {
                schema: Some(schema),
                ..Default::default()
            },
        );
        let db = crate::Db::connect_only(&self.settings, name)
            .await
            .expect("the test database is reachable (TEST_DATABASE_URL)");
        db.migrate(&crate::db::Migrations::NONE)
            .await
            .expect("kit's tables migrate");
        db
    }

    /// Drops what [`TestEnv::kit_db`] made (the PostgreSQL schema) and closes the pool.
    pub async fn drop_kit_db(&self, name: &str, db: crate::Db) {
        if let (crate::Db::Postgres(_), Some(schema)) = (&db, self.settings.service(name).schema) {
            crate::db::query(&format!("drop schema if exists {schema} cascade"))
                .execute(&db)
                .await
                .expect("drop the test schema");
        }
        db.close().await;
    }

    /// Points the cache at a port where nothing listens, to test degradation.
    pub fn with_unreachable_redis(mut self) -> Self {
        self.settings.redis.url = Some("redis://127.0.0.1:1".into());
        self
    }
}

/// A kit-level test's own database and bus: SQLite + the in-process bus, or a PostgreSQL
/// database + NATS, with this test's own stream. `teardown` removes both.
pub struct KitFixture {
    pub env: TestEnv,
    pub db: crate::Db,
    pub bus: crate::bus::Bus,
    name: &'static str,
}

impl KitFixture {
    /// The database `name` and the bus of `env` (whose settings are final by now).
    pub async fn new(mut env: TestEnv, name: &'static str) -> Self {
        let db = env.kit_db(name).await;
        let bus = crate::bus::Bus::connect(&env.settings)
            .await
            .expect("test bus");
        Self { env, db, bus, name }
    }

    pub async fn teardown(self) {
        self.bus.delete_stream().await.expect("delete stream");
        self.env.drop_kit_db(self.name, self.db).await;
    }
}

/// A service serving on `127.0.0.1:<random port>` for one test; stops when dropped.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    /// The private listener of `/metrics` (another free loopback port), when the app has one.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub shutdown: Shutdown,
    pub client: reqwest::Client,
    /// The service credential of the test's settings: the request helpers below send it on
    /// `/internal/...` paths, acting as the service that calls them (tests of the refusal use
    /// `client` directly).
    pub service_token: Option<String>,
    running: Option<Running>,
}

impl TestServer {
    /// Serves `app` on a free loopback port, and its `/metrics` on another.
    pub async fn start(app: App, settings: &Settings) -> Self {
        Self::start_on(app, settings, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Serves `app` on `addr` (a port of a server that was stopped, say), its `/metrics` on a
    /// free loopback port.
    pub async fn start_on(app: App, settings: &Settings, addr: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let shutdown = Shutdown::new();
        let running = app
            .spawn_with_metrics(
                listener,
                Some(metrics),
                &shutdown,
                ServeOptions::from(&settings.http),
            )
            .expect("serve");
        Self {
            addr: running.addr,
            metrics_addr: running.metrics_addr,
            shutdown,
            client: reqwest::Client::new(),
            service_token: settings
                .auth
                .service_token
                .as_ref()
                .map(|s| s.expose().to_owned()),
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `path` on the private metrics listener (`/metrics`).
    pub fn metrics_url(&self, path: &str) -> String {
        let addr = self.metrics_addr.expect("the app serves metrics");
        format!("http://{addr}{path}")
    }

    /// The text of `/metrics` (from the private listener).
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.metrics_url("/metrics"))
            .send()
            .await
            .expect("metrics answered")
            .text()
            .await
            .expect("metrics text")
    }

    /// `method path`, with the service credential when `path` is internal.
    pub fn builder(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, self.url(path));
        match &self.service_token {
            Some(token) if crate::auth::is_internal(path.split('?').next().unwrap_or(path)) => {
                request.header(&crate::auth::SERVICE_TOKEN_HEADER, token)
            }
            _ => request,
        }
    }

    /// `method path` as the gateway forwards it for `identity`: the identity headers and the
    /// service credential (what a service needs to believe them).
    pub fn as_identity(
        &self,
        method: reqwest::Method,
        path: &str,
        identity: crate::auth::Identity,
    ) -> reqwest::RequestBuilder {
        let mut headers = reqwest::header::HeaderMap::new();
        identity.write_headers(&mut headers);
        if let Some(token) = &self.service_token
            && let Ok(value) = token.parse()
        {
            headers.insert(crate::auth::SERVICE_TOKEN_HEADER.clone(), value);
        }
        self.client.request(method, self.url(path)).headers(headers)
    }

    /// Sends `method path` with `body` as JSON when given.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut request = self.builder(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request is sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }

    /// POSTs a raw body, with the given `Content-Type` if any (for malformed or non-JSON bodies).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &'static str,
    ) -> reqwest::Response {
        let mut request = self.builder(reqwest::Method::POST, path).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request is sent")
    }

    /// `GET path`: the status and the JSON body (`null` when the body is not JSON).
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    /// Stops the server at once, as a crash would: the listener and every open connection are
    /// dropped mid-request, nothing drains. Returns the address it served, free again.
    pub async fn kill(mut self) -> std::net::SocketAddr {
        if let Some(running) = self.running.take() {
            running.handle.abort();
            let _ = running.handle.await;
        }
        self.addr
    }

    /// Stops accepting, drains, and waits for the server to end.
    pub async fn stop(mut self) {
        self.shutdown.begin();
        if let Some(running) = self.running.take() {
            let _ = running.handle.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.force();
    }
}

/// Creates the test database if needed, and drops schemas that earlier runs left behind.
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).context("TEST_DATABASE_URL is not a URL")?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    anyhow::ensure!(
        crate::config::is_identifier(&name),
        "test database name `{name}` must be a plain identifier"
    );
    let mut admin_url = parsed.clone();
    admin_url.set_path("/postgres");
    let mut admin = sqlx::PgConnection::connect(admin_url.as_str())
        .await
        .with_context(|| format!("connecting to {admin_url}"))?;
    let exists: Option<i32> = sqlx::query_scalar("select 1 from pg_database where datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none()
        && let Err(err) = sqlx::query(&format!("create database {name}"))
            .execute(&mut admin)
            .await
    {
        // Another test process may have created it a moment ago.
        let duplicate = matches!(&err, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P04") || db.is_unique_violation());
        if !duplicate {
            return Err(err.into());
        }
    }
    admin.close().await.ok();
    drop_stale_schemas(url).await;
    Ok(())
}

/// Schemas of tests older than two hours (their names carry the creation time).
async fn drop_stale_schemas(url: &str) {
    let Ok(mut conn) = sqlx::PgConnection::connect(url).await else {
        return;
    };
    let schemas: Vec<String> =
        sqlx::query_scalar("select nspname::text from pg_namespace where nspname ~ '^t[0-9]{10}_'")
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    let cutoff = unix_now().saturating_sub(2 * 3600);
    for schema in schemas {
        let stamp: u64 = schema[1..11].parse().unwrap_or(u64::MAX);
        if stamp < cutoff && crate::config::is_identifier(&schema) {
            let _ = sqlx::query(&format!("drop schema if exists {schema} cascade"))
                .execute(&mut conn)
                .await;
        }
    }
    conn.close().await.ok();
}

/// NATS streams of killed test runs, deleted by the first PostgreSQL `TestEnv` of each process.
async fn delete_stale_test_streams_once() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        crate::bus::delete_stale_test_streams(&test_nats_url()).await;
    })
    .await;
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Runs each listed `async fn(Backend)` as two tests: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(kit::testing::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(kit::testing::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The response's `Content-Type` (empty when absent).
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Asserts an RFC 9457 problem body with this status and code, whose `request_id` is the one in
/// the response header; returns the body.
pub async fn assert_problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(content_type(&response), "application/problem+json");
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("x-request-id header");
    let body: serde_json::Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["request_id"], request_id.as_str(), "{body}");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "`{member}` missing in {body}");
    }
    body
}

/// Log lines captured on this thread (INFO and above, no colours) while the value lives, for
/// tests of what gets logged. Use a current-thread runtime (`#[tokio::test]`'s default), so tasks
/// the test spawns log to the same thread.
pub struct CapturedLogs {
    buffer: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    pub fn start() -> Self {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = CaptureWriter(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A `Write` (and, cloned, a log writer) keeping every byte written to it, for tests of what a
/// subscriber writes.
#[derive(Clone, Default)]
pub struct CaptureWriter(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CaptureWriter {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A TCP proxy in front of a real server (the test Redis, or any address) that a test can cut
/// and restore: a dependency that goes away and comes back on the same port. While cut, it keeps
/// its port (so nothing else can take it) but closes every connection at once, as a server that
/// is down does; the connections open when it was cut are dropped.
pub struct CuttableProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::AbortHandle,
}

impl CuttableProxy {
    /// Listens on a free port and forwards every connection to the test Redis.
    pub async fn start() -> Self {
        let redis = test_redis_url();
        let target = redis.trim_start_matches("redis://").trim_end_matches('/');
        Self::start_to(target.to_owned()).await
    }

    /// Listens on a free port and forwards every connection to `target` (host:port).
    pub async fn start_to(target: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (registry, is_cut) = (connections.clone(), cut.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if is_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                registry.lock().expect("lock").push(conn.abort_handle());
            }
        });
        Self {
            port,
            cut,
            connections,
            accept: accept.abort_handle(),
        }
    }

    /// Drops every connection through the proxy and refuses new ones (the server "goes away").
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.connections.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// Forwards again (the server "is back").
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
