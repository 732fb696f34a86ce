//! `spawn_app`: a users service on a free port with its own database (SQLite dir or PostgreSQL
//! schema) and its own Redis prefix, plus a typed client.

use kit::Db;
use kit::service::Deps;
pub use kit::testing::assert_problem;
use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::Value;

pub struct TestApp {
    pub server: TestServer,
    /// The service's own database handle, to inspect or sabotage it.
    pub db: Db,
    /// What the service was built from (to seed it, say).
    pub deps: Deps,
    pub env: TestEnv,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_in(TestEnv::new(backend).await).await
}

pub async fn spawn_app_in(env: TestEnv) -> TestApp {
    let deps = env.deps(&users::SERVICE).await;
    let db = deps.db().expect("users has a database");
    let app = users::app(deps.clone()).await.expect("users app");
    let server = TestServer::start(app, &env.settings).await;
    TestApp {
        server,
        db,
        deps,
        env,
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
    /// Creates a user and returns it, asserting 201.
    pub async fn create_user(&self, body: Value) -> Value {
        let response = self.post("/api/v1/users", body.clone()).await;
        assert_eq!(response.status(), 201, "creating {body}");
        response.json().await.expect("user json")
    }

    /// The cache counters from `/api/v1/users/stats`.
    pub async fn cache_stats(&self) -> Value {
        let (status, stats) = self.get_json("/api/v1/users/stats").await;
        assert_eq!(status, 200);
        stats["cache"].clone()
    }
}
