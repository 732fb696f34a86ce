//! Cache-aside as users rely on it: hits are counted, writes are never shadowed by stale
//! entries, a miss loads once, and a dead Redis only makes things slower.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_in};
use kit::testing::{Backend, CuttableProxy, TestEnv};

kit::on_both_backends!(
    second_get_is_served_from_cache,
    a_read_after_a_write_sees_the_write,
    concurrent_misses_query_the_database_once,
);

async fn second_get_is_served_from_cache(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({"name": "Alice"})).await;
    let path = format!("/api/v1/users/{}", user["id"]);
    let before = app.cache_stats().await;
    let (_, first) = app.get_json(&path).await;
    let (_, second) = app.get_json(&path).await;
    assert_eq!(first, second);
    let after = app.cache_stats().await;
    assert_eq!(
        after["misses"].as_u64(),
        before["misses"].as_u64().map(|m| m + 1),
        "first GET misses: {after}"
    );
    assert_eq!(
        after["hits"].as_u64(),
        before["hits"].as_u64().map(|h| h + 1),
        "second GET hits: {after}"
    );
    let expected_backend = if backend == Backend::Postgres {
        "redis"
    } else {
        "memory"
    };
    assert_eq!(after["backend"], expected_backend);
}

async fn a_read_after_a_write_sees_the_write(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app
        .create_user(json!({"username": "alice", "name": "Alice"}))
        .await;
    let path = format!("/api/v1/users/{}", user["id"]);
    // Warm every cached view of the user.
    for view in [
        path.as_str(),
        "/api/v1/users",
        "/api/v1/users/name/Alice",
        "/api/v1/users/username/alice",
    ] {
        assert_eq!(app.get(view).await.status(), 200, "{view}");
    }

    let response = app
        .request(
            reqwest::Method::PUT,
            &path,
            Some(json!({"name": "Alicia", "username": "alicia"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let (_, item) = app.get_json(&path).await;
    assert_eq!(item["name"], "Alicia", "item view");
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(list["items"][0]["name"], "Alicia", "list view");
    assert_eq!(
        app.get("/api/v1/users/name/Alice").await.status(),
        404,
        "old name lookup"
    );
    assert_eq!(
        app.get("/api/v1/users/username/alice").await.status(),
        404,
        "old username lookup"
    );
    let (_, by_name) = app.get_json("/api/v1/users/name/Alicia").await;
    assert_eq!(by_name["id"], user["id"]);

    // A create shows up in the cached list at once.
    app.create_user(json!({"name": "Bob"})).await;
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(list["total"], 2, "list after create");

    // A delete hides the user from every view at once.
    assert_eq!(
        app.request(reqwest::Method::DELETE, &path, None)
            .await
            .status(),
        204
    );
    assert_eq!(app.get(&path).await.status(), 404, "item after delete");
    assert_eq!(
        app.get("/api/v1/users/name/Alicia").await.status(),
        404,
        "lookup after delete"
    );
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(list["total"], 1, "list after delete");
}

async fn concurrent_misses_query_the_database_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({"name": "Hot"})).await;
    let path = format!("/api/v1/users/{}", user["id"]);
    let before = app.cache_stats().await;
    let reads = (0..20).map(|_| app.get_json(&path));
    let results = futures::future::join_all(reads).await;
    assert!(
        results
            .iter()
            .all(|(status, body)| *status == 200 && body["id"] == user["id"])
    );
    let after = app.cache_stats().await;
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert_eq!(
        delta("misses"),
        1,
        "one database load for 20 concurrent reads: {after}"
    );
    assert_eq!(
        delta("hits") + delta("coalesced") + delta("misses"),
        20,
        "{after}"
    );
}

/// Redis is down (nothing listens on its port): every call still answers correctly and fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_degrades_to_the_database() {
    let env = TestEnv::new(Backend::Postgres)
        .await
        .with_unreachable_redis();
    let app = spawn_app_in(env).await;
    let started = Instant::now();
    let user = app.create_user(json!({"name": "Alice"})).await;
    let path = format!("/api/v1/users/{}", user["id"]);
    for _ in 0..3 {
        let (status, body) = app.get_json(&path).await;
        assert_eq!((status, body["name"].as_str()), (200, Some("Alice")));
    }
    let response = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"name": "Alicia"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let (status, body) = app.get_json(&path).await;
    assert_eq!(
        (status, body["name"].as_str()),
        (200, Some("Alicia")),
        "no stale read"
    );
    let (status, list) = app.get_json("/api/v1/users").await;
    assert_eq!((status, list["total"].as_i64()), (200, Some(1)));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "degraded, not stalled: {:?}",
        started.elapsed()
    );

    let stats = app.cache_stats().await;
    let faults = stats["errors"].as_u64().unwrap_or(0) + stats["bypassed"].as_u64().unwrap_or(0);
    assert!(
        faults >= 4,
        "every read that could not use the cache is counted (failed or bypassed): {stats}"
    );
    assert_eq!(stats["hits"], 0);
    let (status, ready) = app.get_json("/ready").await;
    assert_eq!(status, 200, "the cache is optional: {ready}");
    assert_eq!(ready["status"], "degraded");
    assert_eq!(ready["checks"]["cache"]["status"], "down");
    assert_eq!(ready["checks"]["database"]["status"], "up");
}

/// Redis goes away while a user is cached, the user changes (the invalidation is lost), Redis
/// comes back with the old entry still in it: the service must not serve that stale entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_redis_outage_is_not_shadowed_when_redis_returns() {
    let proxy = CuttableProxy::start().await;
    let port = proxy.port;
    let mut env = TestEnv::new(Backend::Postgres).await;
    env.settings.redis.url = Some(format!("redis://127.0.0.1:{port}"));
    env.settings.redis.retry_after_ms = 200;
    let app = spawn_app_in(env).await;

    let user = app.create_user(json!({"name": "Before"})).await;
    let path = format!("/api/v1/users/{}", user["id"]);
    app.get_json(&path).await;
    let (_, cached) = app.get_json(&path).await;
    assert_eq!(cached["name"], "Before");
    assert_eq!(app.cache_stats().await["hits"], 1, "the user is in Redis");

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let response = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"name": "After"})),
        )
        .await;
    assert_eq!(response.status(), 200, "writes go on without Redis");
    let (status, during) = app.get_json(&path).await;
    assert_eq!(
        (status, during["name"].as_str()),
        (200, Some("After")),
        "served from the database during the outage"
    );

    proxy.restore();
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        let (status, after) = app.get_json(&path).await;
        assert_eq!(
            (status, after["name"].as_str()),
            (200, Some("After")),
            "no stale entry after Redis returns"
        );
    }
    let stats = app.cache_stats().await;
    assert!(
        stats["hits"].as_u64() >= Some(2),
        "Redis is used again once it is back: {stats}"
    );
}
