//! `spawn_system`: users, catalog, orders, the worker, notify and the gateway of one test, each
//! on a free port with its own database (SQLite dir or PostgreSQL schemas), Redis prefix and bus
//! stream (shared by all, as in `agora up`), and a client that goes through the gateway.

use std::time::{Duration, Instant};

use kit::Db;
use kit::bus::Bus;
use kit::service::Deps;
use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::{Value, json};

pub struct System {
    pub gateway: TestServer,
    /// Notify itself (no identity: sees everything).
    pub notify: TestServer,
    /// The notify database, to inspect.
    pub db: Db,
    pub bus: Bus,
    _env: TestEnv,
    _servers: Vec<TestServer>,
}

/// The system with `[services.notify]` set to `notify` (a JSON object of its keys) and auth
/// `mode` (the harness's `open` when `None`).
pub async fn spawn_system(
    backend: Backend,
    notify: Value,
    mode: Option<kit::auth::AuthMode>,
) -> System {
    let mut env = TestEnv::new(backend).await;
    if let Some(mode) = mode {
        env.settings.auth.mode = Some(mode);
    }
    // Small waits: the tests wait for outcomes by polling, never by sleeping.
    env.settings.bus.consumer_backoff_ms = 20;
    env.settings.bus.consumer_backoff_max_ms = 200;
    let section = env.settings.services.entry("notify".into()).or_default();
    // Long: deliveries and their retries must be sent when due, not when a poll comes round.
    section.extra.insert("poll_ms".into(), 60_000.into());
    if let Value::Object(keys) = notify {
        for (key, value) in keys {
            section.extra.insert(
                key,
                figment::value::Value::serialize(value).expect("a config value"),
            );
        }
    }
    env.settings
        .services
        .entry("worker".into())
        .or_default()
        .extra
        .insert("sweep_secs".into(), 1.into());
    let shared = kit::service::Shared::connect(&env.settings)
        .await
        .expect("bus");
    let bus = shared.bus().clone();
    let start = |service: &'static kit::service::Service, settings: kit::Settings| {
        let shared = shared.clone();
        async move {
            let deps = Deps::connect(service, &settings, Some(&shared))
                .await
                .expect("the test database, Redis and NATS are reachable");
            let db = deps.db.clone();
            let app = (service.build)(deps).await.expect("app");
            (TestServer::start(app, &settings).await, db)
        }
    };
    let url = |server: &TestServer| url::Url::parse(&server.url("")).expect("url");
    let (users, _) = start(&users::SERVICE, env.settings.clone()).await;
    let (catalog, _) = start(&catalog::SERVICE, env.settings.clone()).await;
    for (name, server) in [("users", &users), ("catalog", &catalog)] {
        env.settings
            .services
            .entry(name.into())
            .or_default()
            .upstreams = vec![url(server)];
    }
    let (orders, _) = start(&orders::SERVICE, env.settings.clone()).await;
    let (worker, _) = start(&orders::WORKER, env.settings.clone()).await;
    let (notify, db) = start(&notify::SERVICE, env.settings.clone()).await;
    for (name, server) in [
        ("orders", &orders),
        ("worker", &worker),
        ("notify", &notify),
    ] {
        env.settings
            .services
            .entry(name.into())
            .or_default()
            .upstreams = vec![url(server)];
    }
    let (gateway, _) = start(&gateway::SERVICE, env.settings.clone()).await;
    System {
        gateway,
        notify,
        db: db.expect("notify has a database"),
        bus,
        _env: env,
        _servers: vec![users, catalog, orders, worker],
    }
}

/// `system.post(..)`, `system.get_json(..)`, ... go through the gateway.
impl std::ops::Deref for System {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.gateway
    }
}

impl System {
    /// A user with an email (created directly: no `user.registered`).
    pub async fn user(&self, name: &str, email: &str) -> i64 {
        let response = self
            .post("/api/v1/users", json!({"name": name, "email": email}))
            .await;
        assert_eq!(response.status(), 201, "creating {name}");
        let user: Value = response.json().await.expect("user");
        user["id"].as_i64().expect("id")
    }

    /// A product at `price` with `stock` units.
    pub async fn product(&self, name: &str, price: &str, stock: i64) -> i64 {
        let response = self
            .post(
                "/api/v1/products",
                json!({"name": name, "price": price, "stock": stock}),
            )
            .await;
        assert_eq!(response.status(), 201, "creating {name}");
        let product: Value = response.json().await.expect("product");
        product["id"].as_i64().expect("id")
    }

    /// Notify's deliveries matching `query` (straight to the service), polled every 20 ms for at
    /// most 20 s until `done` holds; returns the last page.
    pub async fn notifications_until(
        &self,
        query: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, page) = self
                .notify
                .get_json(&format!("/api/v1/notifications?per_page=100&{query}"))
                .await;
            assert_eq!(status, 200, "{page}");
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if done(&items) {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "notifications ({query}) did not get there in 20 s: {items:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether notify's consumer has handled message `id`.
    pub async fn handled(&self, id: &str) -> bool {
        kit::db::query(
            "select count(*) from consumed_messages where consumer = $1 and message_id = $2",
        )
        .bind(notify::CONSUMER)
        .bind(id)
        .fetch_scalar::<i64>(&self.db)
        .await
        .expect("query")
            == 1
    }
}
