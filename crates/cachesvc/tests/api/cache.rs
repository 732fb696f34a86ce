//! Seed 000's cache API: values in and out, the memory guard flushing only its own keyspace,
//! `/cache/memory` never shadowed by a key, TTLs, and clear problems for client mistakes.

use std::time::{Duration, Instant};

use kit::testing::{Backend, assert_problem};
use serde_json::{Value, json};

use crate::helpers::{set, spawn};

kit::on_both_backends!(
    filling_past_the_threshold_flushes_once_and_stores_the_new_value,
    a_missing_key_is_a_404_problem,
    the_memory_report_is_not_shadowed_by_a_key_named_memory,
    values_expire_after_their_ttl,
    both_body_shapes_are_accepted,
    bad_keys_are_422_and_oversized_values_413,
    through_the_gateway_only_signed_in_users_write_in_required_mode,
);

async fn filling_past_the_threshold_flushes_once_and_stores_the_new_value(backend: Backend) {
    // Arrange: a 256 KiB threshold; 40 KB values; on Redis, other data under the same prefix
    // (another service's cache entry) and outside it (someone else's key).
    let app = spawn(backend, false, |s| {
        set(s, "limit_mb", 1.0);
        set(s, "threshold_mb", 0.25);
        set(s, "max_value_bytes", 100_000);
    })
    .await;
    let foreign = [
        format!("{}users:item:1", app.prefix()),
        format!("foreign:{}", app.prefix()),
    ];
    if backend == Backend::Postgres {
        let mut redis = app.redis().await;
        for key in &foreign {
            let () = redis::cmd("SET")
                .arg(key)
                .arg("keep me")
                .arg("EX")
                .arg(600)
                .query_async(&mut redis)
                .await
                .expect("set a foreign key");
        }
    }
    let threshold = app.memory().await["threshold_bytes"]
        .as_u64()
        .expect("threshold");
    assert_eq!(threshold, 256 * 1024);
    let big = "x".repeat(40_000);

    // Act: fill until a SET reports it flushed (bounded).
    let mut before = json!(null);
    let mut flushed_at = None;
    for i in 0..40 {
        before = app.memory().await;
        let response = app
            .post(&format!("/cache/fill:{i}"), json!({"value": big}))
            .await;
        assert_eq!(response.status(), 200, "fill:{i}");
        let body: Value = response.json().await.expect("json");
        if body["flushed"] == true {
            flushed_at = Some(i);
            break;
        }
    }
    let i = flushed_at.expect("a SET flushed within 40 values of 40 KB");

    // Assert: it flushed at the threshold, once; the new value is there, the old ones are not;
    // the figure dropped to the one new entry; other data survived.
    assert!(
        before["used_bytes"].as_u64().expect("used") >= threshold,
        "flushed only at or over the threshold: {before}"
    );
    let after = app.memory().await;
    assert_eq!(after["flushes"], 1, "{after}");
    assert_eq!(after["keys"], 1, "{after}");
    assert!(
        after["used_bytes"].as_u64().expect("used") < 50_000,
        "the figure dropped: {before} -> {after}"
    );
    let (status, value) = app.get_json(&format!("/cache/fill:{i}")).await;
    assert_eq!(
        (status, value["value"].as_str().map(str::len)),
        (200, Some(40_000))
    );
    let (status, _) = app.get_json("/cache/fill:0").await;
    assert_eq!(status, 404, "flushed");
    let response = app.post("/cache/after", json!({"value": 1})).await;
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["flushed"], false, "below the threshold again: {body}");
    assert_eq!(app.memory().await["flushes"], 1, "exactly one flush");
    if backend == Backend::Postgres {
        let mut redis = app.redis().await;
        for key in &foreign {
            let kept: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut redis)
                .await
                .expect("get");
            assert_eq!(kept.as_deref(), Some("keep me"), "{key} survived the flush");
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut redis)
                .await
                .expect("clean up");
        }
    }
}

async fn a_missing_key_is_a_404_problem(backend: Backend) {
    let app = spawn(backend, false, |_| {}).await;
    assert_problem(app.get("/cache/nothing-here").await, 404, "key_not_found").await;
    let response = app
        .request(reqwest::Method::DELETE, "/cache/nothing-here", None)
        .await;
    assert_problem(response, 404, "key_not_found").await;

    app.post("/cache/k", json!({"value": "v"})).await;
    let response = app.request(reqwest::Method::DELETE, "/cache/k", None).await;
    assert_eq!(response.status(), 204);
    assert_problem(app.get("/cache/k").await, 404, "key_not_found").await;
}

async fn the_memory_report_is_not_shadowed_by_a_key_named_memory(backend: Backend) {
    let app = spawn(backend, false, |_| {}).await;
    let response = app.post("/cache/memory", json!({"value": "mine"})).await;
    assert_eq!(response.status(), 200);

    for path in ["/cache/memory", "/api/v1/cache/memory"] {
        let report = {
            let (status, report) = app.get_json(path).await;
            assert_eq!(status, 200);
            report
        };
        for field in [
            "used_bytes",
            "peak_bytes",
            "limit_bytes",
            "threshold_bytes",
            "keys",
            "flushes",
        ] {
            assert!(report[field].is_u64(), "{path}: `{field}` in {report}");
        }
        assert_eq!(report["keys"], 1, "{report}");
        assert!(report.get("value").is_none(), "{report}");
    }
    let (status, value) = app.get_json("/cache/keys/memory").await;
    assert_eq!((status, &value["value"]), (200, &json!("mine")));
}

async fn values_expire_after_their_ttl(backend: Backend) {
    let app = spawn(backend, false, |_| {}).await;
    let response = app
        .post("/cache/short", json!({"value": {"a": 1}, "ttl_secs": 1}))
        .await;
    assert_eq!(response.status(), 200);
    let (status, value) = app.get_json("/cache/short").await;
    assert_eq!((status, &value["value"]), (200, &json!({"a": 1})));
    assert!(
        value["ttl_secs"].as_u64().is_some_and(|t| t <= 1),
        "{value}"
    );
    app.post("/cache/long", json!({"value": 2})).await;

    // Poll (bounded) until it is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = app.get_json("/cache/short").await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "still there after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, value) = app.get_json("/cache/long").await;
    assert_eq!((status, &value["ttl_secs"]), (200, &json!(null)), "no TTL");
    assert_eq!(
        app.memory().await["keys"],
        1,
        "the expired one is not counted"
    );
}

async fn both_body_shapes_are_accepted(backend: Backend) {
    let app = spawn(backend, false, |_| {}).await;
    let cases = [
        (
            "/cache/a",
            Some(json!({"value": "x", "ttl_secs": 60})),
            json!("x"),
        ),
        (
            "/cache/b",
            Some(json!({"value": {"id": 1}, "ttl": 60})),
            json!({"id": 1}),
        ),
        ("/cache/c?value=plain&ttl=60", None, json!("plain")),
    ];
    for (path, body, stored) in cases {
        let response = match body {
            Some(body) => app.post(path, body).await,
            None => app.post_raw(path, None, "").await,
        };
        assert_eq!(response.status(), 200, "{path}");
        let key = path
            .trim_start_matches("/cache/")
            .split('?')
            .next()
            .unwrap_or("");
        let (status, value) = app.get_json(&format!("/cache/{key}")).await;
        assert_eq!((status, &value["value"]), (200, &stored), "{path}");
        assert!(
            value["ttl_secs"].as_u64().is_some_and(|t| t <= 60),
            "{value}"
        );
    }
    let response = app
        .post_raw("/cache/d", Some("application/json"), "{\"valu\": 1}")
        .await;
    assert_problem(response, 422, "validation_failed").await;
}

async fn bad_keys_are_422_and_oversized_values_413(backend: Backend) {
    let app = spawn(backend, false, |s| set(s, "max_value_bytes", 1000)).await;
    let long = format!("/cache/{}", "k".repeat(201));
    for path in ["/cache/a%20b", "/cache/%C3%A9", long.as_str()] {
        assert_problem(app.get(path).await, 422, "invalid_key").await;
        let response = app.post(path, json!({"value": 1})).await;
        assert_problem(response, 422, "invalid_key").await;
    }
    let response = app
        .post("/cache/big", json!({"value": "x".repeat(2000)}))
        .await;
    assert_problem(response, 413, "value_too_large").await;
    assert_problem(app.get("/cache/big").await, 404, "key_not_found").await;
}

async fn through_the_gateway_only_signed_in_users_write_in_required_mode(backend: Backend) {
    let app = spawn(backend, true, |s| {
        s.auth.mode = Some(kit::auth::AuthMode::Required);
    })
    .await;
    let gateway = app.gateway.as_ref().expect("gateway");
    let token = kit::auth::Tokens::new(&app.env.settings.auth)
        .expect("tokens")
        .issue(7, kit::auth::Role::User)
        .expect("token");
    let token = token.access_token.clone();

    let response = gateway.post("/cache/k", json!({"value": 1})).await;
    assert_problem(response, 401, "unauthenticated").await;
    let response = gateway
        .client
        .post(gateway.url("/cache/k"))
        .bearer_auth(&token)
        .json(&json!({"value": 1}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    // Reads (values and the report) are public.
    let (status, value) = gateway.get_json("/cache/k").await;
    assert_eq!((status, &value["value"]), (200, &json!(1)));
    let (status, report) = gateway.get_json("/cache/memory").await;
    assert_eq!((status, &report["keys"]), (200, &json!(1)));
    let response = gateway
        .request(reqwest::Method::DELETE, "/cache/k", None)
        .await;
    assert_problem(response, 401, "unauthenticated").await;
}

/// Redis is this service's store, not a cache in front of one: when it is unreachable the answer
/// is a 503 `dependency_unavailable` problem, never a 500 or a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_a_503_not_a_500() {
    let env = kit::testing::TestEnv::new(Backend::Sqlite)
        .await
        .with_unreachable_redis();
    let app = cachesvc::app(env.deps(&cachesvc::SERVICE).await)
        .await
        .expect("starts with Redis down");
    let server = kit::testing::TestServer::start(app, &env.settings).await;
    let response = server.post("/cache/k", json!({"value": 1})).await;
    assert_problem(response, 503, "dependency_unavailable").await;
    assert_problem(server.get("/cache/k").await, 503, "dependency_unavailable").await;
    assert_problem(
        server.get("/cache/memory").await,
        503,
        "dependency_unavailable",
    )
    .await;
}
