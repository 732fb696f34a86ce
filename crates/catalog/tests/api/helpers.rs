//! `spawn_app`: a catalog service on a free port with its own database (SQLite dir or PostgreSQL
//! schema), its own Redis prefix and its own bus stream, plus a typed client.

use kit::Db;
use kit::bus::Bus;
use kit::service::Deps;
use kit::testing::{Backend, TestEnv, TestServer};
use reqwest::Response;
use serde_json::{Value, json};

pub use kit::testing::assert_problem;

pub struct TestApp {
    pub server: TestServer,
    /// The service's own database handle, to inspect or sabotage it.
    pub db: Db,
    /// The bus its relay publishes to (subscribe to see the events).
    pub bus: Bus,
    /// What the service was built from (to run its seed).
    pub deps: Deps,
    /// Keeps the test's SQLite directory alive.
    _env: TestEnv,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    let env = TestEnv::new(backend).await;
    let deps = env.deps(&catalog::SERVICE).await;
    let db = deps.db().expect("the catalog has a database");
    let bus = deps.bus().expect("the catalog uses the bus");
    let app = catalog::app(deps.clone()).await.expect("app");
    let server = TestServer::start(app, &env.settings).await;
    TestApp {
        server,
        db,
        bus,
        deps,
        _env: env,
    }
}

/// `app.get(..)`, `app.post(..)`, ... are the server's request helpers.
impl std::ops::Deref for TestApp {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl TestApp {
    /// Creates a product and returns it, asserting 201.
    pub async fn create_product(&self, body: Value) -> Value {
        let response = self.post("/api/v1/products", body.clone()).await;
        assert_eq!(response.status(), 201, "creating {body}");
        response.json().await.expect("product json")
    }

    /// A product with `stock` units (and the default threshold unless given).
    pub async fn product_with_stock(&self, stock: i64) -> i64 {
        let product = self
            .create_product(json!({"name": "Widget", "price": 9.99, "stock": stock}))
            .await;
        product["id"].as_i64().expect("id")
    }

    /// `stock` and `reserved` as stored, read past the cache and the API.
    pub async fn stored_stock(&self, id: i64) -> (i64, i64) {
        kit::db::query("select stock, reserved from products where id = $1")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("product exists")
    }

    pub async fn reserve(&self, order_id: &str, items: Value) -> Response {
        self.post(
            "/internal/v1/reservations",
            json!({"order_id": order_id, "items": items}),
        )
        .await
    }

    pub async fn settle(&self, order_id: &str, action: &str) -> Response {
        self.post(
            &format!("/internal/v1/reservations/{order_id}/{action}"),
            json!({}),
        )
        .await
    }
}
