//! `spawn_app`: a users service on a free port with its own database (SQLite dir or PostgreSQL
//! schema) and its own Redis prefix, plus a typed client.

pub use kit::testing::assert_problem;
use kit::testing::{Backend, TestEnv, TestServer};
use kit::{Cache, Db};
use reqwest::{Method, Response};
use serde_json::Value;
use users::AppState;

pub struct TestApp {
    pub server: TestServer,
    pub client: reqwest::Client,
    /// The service's own database handle, to inspect or sabotage it.
    pub db: Db,
    pub env: TestEnv,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_in(TestEnv::new(backend).await).await
}

pub async fn spawn_app_in(env: TestEnv) -> TestApp {
    let settings = &env.settings;
    let db = Db::connect(settings, users::NAME, &users::MIGRATIONS)
        .await
        .expect("test database is reachable and migrates");
    let cache = Cache::new(settings, users::NAME).expect("cache");
    let app = users::app_with(
        settings,
        AppState {
            db: db.clone(),
            cache,
        },
    );
    let server = TestServer::start(app, settings).await;
    TestApp {
        server,
        client: reqwest::Client::new(),
        db,
        env,
    }
}

impl TestApp {
    pub async fn request(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("request is sent")
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Response {
        self.request(Method::POST, path, Some(body)).await
    }

    /// POSTs a raw body, with the given `Content-Type` if any (for malformed or non-JSON bodies).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: &'static str,
    ) -> Response {
        let mut request = self.client.post(self.server.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request is sent")
    }

    /// Creates a user and returns it, asserting 201.
    pub async fn create_user(&self, body: Value) -> Value {
        let response = self.post("/api/v1/users", body.clone()).await;
        assert_eq!(response.status(), 201, "creating {body}");
        response.json().await.expect("user json")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The cache counters from `/api/v1/users/stats`.
    pub async fn cache_stats(&self) -> Value {
        let (status, stats) = self.get_json("/api/v1/users/stats").await;
        assert_eq!(status, 200);
        stats["cache"].clone()
    }
}
