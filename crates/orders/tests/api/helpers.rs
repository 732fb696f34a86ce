//! `spawn_system`: users, catalog, orders, the worker and the gateway of one test, each on a free
//! port with its own database (SQLite dir or PostgreSQL schemas), Redis prefix and bus stream
//! (shared by the five, as in `agora up`), and a client that goes through the gateway.

use std::time::{Duration, Instant};

use kit::Db;
use kit::bus::Bus;
use kit::service::Deps;
use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::{Value, json};

pub use kit::testing::assert_problem;

pub struct System {
    pub gateway: TestServer,
    /// Catalog itself (its internal routes are not behind the gateway).
    pub catalog: TestServer,
    /// The orders database, to inspect.
    pub db: Db,
    pub catalog_db: Db,
    pub bus: Bus,
    _servers: Vec<TestServer>,
    _env: TestEnv,
}

/// With default settings.
pub async fn spawn_system(backend: Backend) -> System {
    spawn_system_with(backend, |_| {}).await
}

/// With settings changed by `configure` (`env.settings.services[...]`) first.
pub async fn spawn_system_with(
    backend: Backend,
    configure: impl FnOnce(&mut kit::Settings),
) -> System {
    let mut env = TestEnv::new(backend).await;
    env.settings
        .services
        .entry("worker".into())
        .or_default()
        .extra
        .insert("sweep_secs".into(), 1.into());
    configure(&mut env.settings);
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
    let (users, _) = start(&users::SERVICE, env.settings.clone()).await;
    let (catalog, catalog_db) = start(&catalog::SERVICE, env.settings.clone()).await;
    let url = |server: &TestServer| url::Url::parse(&server.url("")).expect("url");
    // Where a test pointed a neighbour elsewhere (a dead address), it stays there.
    for (name, server) in [("users", &users), ("catalog", &catalog)] {
        let section = env.settings.services.entry(name.into()).or_default();
        if section.upstreams.is_empty() {
            section.upstreams = vec![url(server)];
        }
    }
    let (orders, db) = start(&orders::SERVICE, env.settings.clone()).await;
    let (worker, _) = start(&orders::WORKER, env.settings.clone()).await;
    env.settings
        .services
        .entry("orders".into())
        .or_default()
        .upstreams = vec![url(&orders)];
    env.settings
        .services
        .entry("worker".into())
        .or_default()
        .upstreams = vec![url(&worker)];
    let (gateway, _) = start(&gateway::SERVICE, env.settings.clone()).await;
    System {
        gateway,
        catalog,
        db: db.expect("orders has a database"),
        catalog_db: catalog_db.expect("catalog has a database"),
        bus,
        _servers: vec![users, orders, worker],
        _env: env,
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
    pub async fn user(&self) -> i64 {
        let response = self.post("/api/v1/users", json!({"name": "Buyer"})).await;
        assert_eq!(response.status(), 201);
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

    /// `(stock, reserved)` as catalog stores them.
    pub async fn stock(&self, product: i64) -> (i64, i64) {
        kit::db::query("select stock, reserved from products where id = $1")
            .bind(product)
            .fetch_one(&self.catalog_db)
            .await
            .expect("product exists")
    }

    /// Places an order; returns the response.
    pub async fn order(&self, body: Value) -> reqwest::Response {
        self.post("/api/v1/orders", body).await
    }

    /// Places an order that must be accepted; returns it.
    pub async fn accepted(&self, body: Value) -> Value {
        let response = self.order(body.clone()).await;
        assert_eq!(response.status(), 201, "ordering {body}");
        response.json().await.expect("order")
    }

    /// Polls the order (every 20 ms, at most 15 s) until it is in `status` with its stock
    /// settled; returns it.
    pub async fn until_status(&self, id: i64, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, order) = self.get_json(&format!("/api/v1/orders/{id}")).await;
            assert_eq!(code, 200, "{order}");
            if order["status"] == status && self.settled(id).await {
                return order;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} did not become {status} (with its stock settled) in 15 s: {order}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST` straight to catalog (its internal reservations).
    pub async fn catalog_request(&self, path: &str, body: Value) -> reqwest::Response {
        self.catalog.post(path, body).await
    }

    pub async fn settled(&self, id: i64) -> bool {
        kit::db::query("select stock_settled from orders where id = $1")
            .bind(id)
            .fetch_scalar(&self.db)
            .await
            .expect("order exists")
    }
}
