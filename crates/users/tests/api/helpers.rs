//! `spawn_app`: a users service on a free port with its own database (SQLite dir or PostgreSQL
//! schema) and its own Redis prefix, plus a typed client.

use kit::testing::{Backend, TestEnv, TestServer};
use kit::{Cache, Db};
use reqwest::{Method, Response};
use serde_json::Value;
use users::AppState;

/// Runs each listed `async fn(Backend)` as two tests: `sqlite::name` and `postgres::name`.
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

/// Asserts an RFC 9457 problem body with this status and code, whose `request_id` is the one in
/// the response header; returns the body.
pub async fn assert_problem(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("x-request-id header");
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["request_id"], request_id.as_str(), "{body}");
    for member in ["type", "title", "detail"] {
        assert!(body[member].is_string(), "`{member}` missing in {body}");
    }
    body
}
