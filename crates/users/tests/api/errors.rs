//! Every error class is an RFC 9457 problem body with the request id; nothing internal leaks.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    database_failure_is_a_generic_500,
    readiness_reports_each_dependency
);

#[tokio::test]
async fn malformed_json_is_400() {
    let app = spawn_app(Backend::Sqlite).await;
    let response = app
        .post_raw("/api/v1/users", Some("application/json"), r#"{"name": "#)
        .await;
    assert_problem(response, 400, "malformed_json").await;
}

#[tokio::test]
async fn wrong_types_are_422_naming_the_field() {
    let app = spawn_app(Backend::Sqlite).await;
    let problem = assert_problem(
        app.post("/api/v1/users", json!({"name": ["a"]})).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "name");
    let response = app
        .request(
            reqwest::Method::PATCH,
            "/api/v1/users/1",
            Some(json!({"email": 1})),
        )
        .await;
    assert_problem(response, 422, "validation_failed").await;
}

#[tokio::test]
async fn body_without_json_content_type_is_415() {
    let app = spawn_app(Backend::Sqlite).await;
    let response = app
        .post_raw("/api/v1/users", None, r#"{"name": "a"}"#)
        .await;
    assert_problem(response, 415, "unsupported_media_type").await;
}

#[tokio::test]
async fn unknown_route_and_unknown_user_are_404() {
    let app = spawn_app(Backend::Sqlite).await;
    assert_problem(app.get("/api/v1/nothing-here").await, 404, "not_found").await;
    assert_problem(app.get("/api/v1/users/424242").await, 404, "user_not_found").await;
}

#[tokio::test]
async fn non_numeric_id_is_400() {
    let app = spawn_app(Backend::Sqlite).await;
    assert_problem(
        app.get("/api/v1/users/abc").await,
        400,
        "invalid_path_parameter",
    )
    .await;
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let app = spawn_app(Backend::Sqlite).await;
    let response = app
        .request(reqwest::Method::DELETE, "/api/v1/users", None)
        .await;
    let allow = response
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        allow.contains("GET") && allow.contains("POST"),
        "allow: {allow}"
    );
    assert_problem(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn oversize_body_is_413() {
    let app = spawn_app(Backend::Sqlite).await;
    let limit = app.env.settings.http.body_limit_bytes;
    let body = json!({"name": "x".repeat(limit + 1)});
    assert_problem(
        app.post("/api/v1/users", body).await,
        413,
        "payload_too_large",
    )
    .await;
    // Also without a Content-Length (streamed body).
    let chunks = futures::stream::iter(vec![Ok::<_, std::io::Error>(vec![b' '; limit + 10])]);
    let response = app
        .client
        .post(app.server.url("/api/v1/users"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 413, "payload_too_large").await;
}

#[tokio::test]
async fn incoming_request_id_is_kept() {
    let app = spawn_app(Backend::Sqlite).await;
    let response = app
        .client
        .get(app.server.url("/api/v1/users/424242"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .expect("sent");
    let problem = assert_problem(response, 404, "user_not_found").await;
    assert_eq!(problem["request_id"], "trace-me-42");

    // An unusable id (too long, odd characters) is replaced, not echoed.
    for bad in ["x".repeat(200), "has spaces in it".to_owned()] {
        let response = app
            .client
            .get(app.server.url("/api/v1/users/424242"))
            .header("x-request-id", &bad)
            .send()
            .await
            .expect("sent");
        let problem = assert_problem(response, 404, "user_not_found").await;
        assert_ne!(problem["request_id"], bad.as_str());
    }
}

/// Sabotage: the table is gone. The client gets a generic 500, never the database's words.
async fn database_failure_is_a_generic_500(backend: Backend) {
    let app = spawn_app(backend).await;
    kit::db::query("drop table users")
        .execute(&app.db)
        .await
        .expect("drop table");
    for response in [
        app.post("/api/v1/users", json!({"name": "Alice"})).await,
        app.get("/api/v1/users/1").await,
        app.get("/api/v1/users").await,
    ] {
        let problem = assert_problem(response, 500, "internal_error").await;
        let text = problem.to_string().to_lowercase();
        for leak in ["users", "table", "relation", "sql", "no such"] {
            assert!(!text.contains(leak), "`{leak}` leaked in {problem}");
        }
    }
}

async fn readiness_reports_each_dependency(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["database"]["status"], "up");
    assert_eq!(ready["checks"]["cache"]["status"], "up");
    let (status, health) = app.get_json("/health").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    app.db.close().await;
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"]["database"]["status"], "down");
}

/// `/metrics` (on the private metrics listener, not the public port) counts requests by matched
/// route (not raw path) and status, and the cache.
#[tokio::test]
async fn metrics_count_requests_by_route_and_the_cache() {
    let app = spawn_app(Backend::Sqlite).await;
    let user = app.create_user(json!({"name": "Metered"})).await;
    for _ in 0..2 {
        app.get(&format!("/api/v1/users/{}", user["id"])).await;
    }
    app.get("/api/v1/users/999999").await;
    let public = app.get("/metrics").await;
    assert_eq!(public.status(), 404, "not on the public port");
    let response = app
        .client
        .get(app.metrics_url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    let line = |needle: &[&str]| {
        text.lines()
            .find(|l| needle.iter().all(|n| l.contains(n)))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    let ok = line(&[
        "agora_http_requests_total{",
        "route=\"/api/v1/users/{id}\"",
        "status=\"200\"",
    ]);
    assert_eq!(ok.as_deref(), Some("2"), "{text}");
    let missing = line(&[
        "agora_http_requests_total{",
        "route=\"/api/v1/users/{id}\"",
        "status=\"404\"",
    ]);
    assert_eq!(missing.as_deref(), Some("1"), "{text}");
    assert!(
        !text.contains("/api/v1/users/999999"),
        "raw paths never become labels"
    );
    assert_eq!(
        line(&["agora_cache_hits_total{"]).as_deref(),
        Some("1"),
        "{text}"
    );
    assert!(
        text.contains("agora_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

/// The database goes away (its connections cut, nothing listening) and comes back: reads, cached
/// or not, and writes are 503 `dependency_unavailable` with `Retry-After` meanwhile, never a 500
/// (a read's error once came back through the cache loader as an internal error), and the
/// service answers again when the database is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_503_with_retry_after_and_then_used_again() {
    let url = url::Url::parse(&kit::testing::test_database_url()).expect("url");
    let target = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    );
    let proxy = kit::testing::CuttableProxy::start_to(target).await;
    let mut env = kit::testing::TestEnv::new(Backend::Postgres).await;
    let mut through_proxy = url.clone();
    through_proxy.set_port(Some(proxy.port)).expect("port");
    env.settings.database.url = Some(through_proxy.to_string());
    env.settings.database.connect_timeout_secs = 1;
    let app = crate::helpers::spawn_app_in(env).await;
    let user = app.create_user(json!({"name": "Kept"})).await;

    proxy.cut();
    let uncached = format!("/api/v1/users/{}", user["id"]);
    for response in [
        app.get(&uncached).await,
        app.get("/api/v1/users").await,
        app.get("/api/v1/users/username/nobody").await,
        app.post("/api/v1/users", json!({"name": "During"})).await,
    ] {
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("2"),
            "a 503 says when to try again"
        );
        assert_problem(response, 503, "dependency_unavailable").await;
    }

    proxy.restore();
    let (status, body) = app.get_json(&uncached).await;
    assert_eq!((status, body["name"].as_str()), (200, Some("Kept")));
    let created = app.create_user(json!({"name": "After"})).await;
    assert!(created["id"].is_i64(), "{created}");
}
