//! The gateway's defences: rate limits (local, shared through Redis, local again while Redis is
//! down), replicas that die and come back (health checks, circuit breakers), CORS, W3C trace
//! context, and `/metrics` only on the private listener.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kit::testing::{Backend, CuttableProxy, TestEnv, TestServer, assert_problem};
use serde_json::{Value, json};
use url::Url;

fn url_of(server: &TestServer) -> Url {
    Url::parse(&server.url("")).expect("url")
}

/// Sets `services.gateway.<key>` in the test's settings.
fn set_gateway(env: &mut TestEnv, key: &str, value: Value) {
    let gateway = env.settings.services.get_mut("gateway").expect("gateway");
    gateway.extra.insert(
        key.into(),
        figment::value::Value::serialize(value).expect("value"),
    );
}

/// Read budget of `per_ip` requests a minute per address (and per user).
fn read_budget(env: &mut TestEnv, per_ip: u32) {
    set_gateway(
        env,
        "rate_limit",
        json!({"read": {"per_ip": per_ip, "per_user": per_ip, "window_secs": 60}}),
    );
}

/// An upstream that answers `/api/v1/users` with the headers it received.
async fn echo_upstream(env: &TestEnv) -> TestServer {
    use axum::routing::get;
    let router = axum::Router::new().route(
        "/api/v1/users",
        get(|headers: axum::http::HeaderMap| async move {
            let seen: serde_json::Map<String, Value> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                .collect();
            axum::Json(Value::Object(seen))
        }),
    );
    TestServer::start(kit::service::App::new("users", router, None), &env.settings).await
}

async fn gateway_to(env: &TestEnv, upstreams: Vec<Url>) -> TestServer {
    let upstreams = BTreeMap::from([("users".to_owned(), upstreams)]);
    TestServer::start(
        gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway"),
        &env.settings,
    )
    .await
}

/// The value of the first `name{...}` series whose line contains every `needle`.
fn series(text: &str, name: &str, needles: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_past_the_budget_is_429_with_retry_after_and_ratelimit_headers() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    read_budget(&mut env, 5);
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    for i in 0..5 {
        let response = gateway.get("/api/v1/users").await;
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"read-ip\";q=5;w=60"
        );
        let state = response.headers()["ratelimit"].to_str().expect("text");
        assert!(
            state.starts_with(&format!("\"read-ip\";r={};t=", 4 - i)),
            "{state}"
        );
    }
    let refused = gateway.get("/api/v1/users").await;
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(refused.headers().contains_key("ratelimit"));
    assert_problem(refused, 429, "rate_limited").await;
    // Another class has its own budget, and the gateway's own endpoints are never limited.
    let write = gateway
        .client
        .delete(gateway.url("/api/v1/users"))
        .send()
        .await
        .expect("sent");
    assert_ne!(write.status(), 429, "writes draw on their own budget");
    // (503: the echo upstream has no /health of its own.)
    assert_ne!(gateway.get("/health").await.status(), 429);
    let text = gateway.metrics_text().await;
    assert_eq!(
        series(
            &text,
            "agora_gateway_rate_limited_total",
            &["class=\"read\"", "scope=\"ip\""]
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_user_has_a_budget_of_their_own() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    set_gateway(
        &mut env,
        "rate_limit",
        json!({"read": {"per_ip": 1000, "per_user": 2, "window_secs": 60}}),
    );
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |sub: i64| {
        let secret = env.settings.auth.jwt_secret.as_ref().expect("key");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": sub.to_string(), "role": "admin", "iss": "agora",
                    "aud": "agora-api", "iat": now, "exp": now + 600}),
            &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
        )
        .expect("encode")
    };
    let get_as = |sub: i64| {
        gateway
            .client
            .get(gateway.url("/api/v1/users"))
            .bearer_auth(token(sub))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(get_as(7).await.expect("sent").status(), 200);
    }
    let refused = get_as(7).await.expect("sent");
    assert_eq!(
        refused.headers()["ratelimit-policy"],
        "\"read-user\";q=2;w=60"
    );
    assert_problem(refused, 429, "rate_limited").await;
    assert_eq!(
        get_as(8).await.expect("sent").status(),
        200,
        "another user from the same address is not limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_budget_through_redis() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.redis.url = Some(kit::testing::test_redis_url());
    read_budget(&mut env, 6);
    let upstream = echo_upstream(&env).await;
    let first = gateway_to(&env, vec![url_of(&upstream)]).await;
    let second = gateway_to(&env, vec![url_of(&upstream)]).await;
    for i in 0..6 {
        let gateway = if i % 2 == 0 { &first } else { &second };
        assert_eq!(gateway.get("/api/v1/users").await.status(), 200, "{i}");
    }
    // Each has seen 3 requests, far under 6: only the shared count refuses.
    for gateway in [&first, &second] {
        let refused = gateway.get("/api/v1/users").await;
        assert!(refused.headers().contains_key("retry-after"));
        assert_problem(refused, 429, "rate_limited").await;
    }
    let text = first.metrics_text().await;
    assert!(
        series(
            &text,
            "agora_gateway_rate_limit_decisions_total",
            &["backend=\"redis\""]
        )
        .is_some_and(|n| n >= 4.0),
        "{text}"
    );
}

/// A large shared budget is drawn from Redis in leases (a hundredth of the limit), so most
/// requests are decided without a round trip, and two replicas together still admit no more
/// than the limit, and at most one lease fewer (what the other replica holds unused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_budgets_are_drawn_in_leases_and_never_exceeded() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.redis.url = Some(kit::testing::test_redis_url());
    read_budget(&mut env, 1000);
    let upstream = echo_upstream(&env).await;
    let first = gateway_to(&env, vec![url_of(&upstream)]).await;
    let second = gateway_to(&env, vec![url_of(&upstream)]).await;
    let mut allowed = 0;
    for i in 0..1100 {
        let gateway = if i % 2 == 0 { &first } else { &second };
        let status = gateway.get("/api/v1/users").await.status();
        assert!(status == 200 || status == 429, "{i}: {status}");
        allowed += usize::from(status == 200);
    }
    assert!(
        (990..=1000).contains(&allowed),
        "1000 per window shared by two replicas with leases of 10: {allowed} admitted"
    );
    for gateway in [&first, &second] {
        let text = gateway.metrics_text().await;
        let leased = series(
            &text,
            "agora_gateway_rate_limit_decisions_total",
            &["backend=\"lease\""],
        )
        .unwrap_or_default();
        let asked = series(
            &text,
            "agora_gateway_rate_limit_decisions_total",
            &["backend=\"redis\""],
        )
        .unwrap_or_default();
        assert!(
            leased >= 400.0 && asked <= 100.0,
            "most of 550 requests were decided by a lease: {leased} by a lease, {asked} by Redis"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_to_local_limits_and_never_to_a_5xx() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    let proxy = CuttableProxy::start().await;
    env.settings.redis.url = Some(format!("redis://127.0.0.1:{}", proxy.port));
    env.settings.redis.retry_after_ms = 200;
    read_budget(&mut env, 5);
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    for _ in 0..3 {
        assert_eq!(gateway.get("/api/v1/users").await.status(), 200);
    }
    proxy.cut();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(gateway.get("/api/v1/users").await.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "no 5xx while Redis is down: {statuses:?}"
    );
    let allowed = statuses.iter().take_while(|s| **s == 200).count();
    assert!(
        (5..=6).contains(&allowed) && statuses[allowed..].iter().all(|s| *s == 429),
        "the local budget (5) decides while Redis is down: {statuses:?}"
    );
    let text = gateway.metrics_text().await;
    assert!(
        series(
            &text,
            "agora_gateway_rate_limit_decisions_total",
            &["backend=\"local\""]
        )
        .is_some_and(|n| n >= 5.0),
        "{text}"
    );
    // Back: the shared budget decides again (it had 3 of 5 used, so it refuses soon).
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = gateway.get("/api/v1/users").await;
        let text = gateway.metrics_text().await;
        let redis = series(
            &text,
            "agora_gateway_rate_limit_decisions_total",
            &["backend=\"redis\""],
        );
        if redis.is_some_and(|n| n > 3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "Redis is used again: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A users service of `env` on `addr`.
async fn start_users(env: &TestEnv, addr: std::net::SocketAddr) -> TestServer {
    let app = users::app(env.deps(&users::SERVICE).await)
        .await
        .expect("users app");
    TestServer::start_on(app, &env.settings, addr).await
}

/// Two users services on one database behind a gateway; one dies (its server and every
/// connection dropped at once) while four clients send 500 GETs: not one fails. Its circuit
/// opens; once it is back (same port), health checks and a probe close it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_500_gets_fails_none_and_its_circuit_opens_then_closes() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    set_gateway(
        &mut env,
        "health_check",
        json!({"interval_ms": 1000, "healthy_threshold": 2, "unhealthy_threshold": 2}),
    );
    set_gateway(
        &mut env,
        "circuit_breaker",
        json!({"failures": 3, "open_ms": 500}),
    );
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let survivor = start_users(&env, any).await;
    let victim = start_users(&env, any).await;
    let victim_label = format!("upstream=\"http://{}\"", victim.addr);
    let gateway = gateway_to(&env, vec![url_of(&survivor), url_of(&victim)]).await;
    let created = gateway.post("/api/v1/users", json!({"name": "Kept"})).await;
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.expect("user")["id"].clone();
    let path = format!("/api/v1/users/{id}");

    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (url, sent) = (gateway.url(&path), sent.clone());
        clients.spawn(async move {
            let client = reqwest::Client::new();
            let mut failures = Vec::new();
            for _ in 0..125 {
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(r.status().to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        });
    }
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 100 {
        tokio::task::yield_now().await;
    }
    let victim_addr = victim.kill().await;
    let mut failures = Vec::new();
    while let Some(result) = clients.join_next().await {
        failures.extend(result.expect("client"));
    }
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let text = gateway.metrics_text().await;
    assert!(
        series(
            &text,
            "agora_gateway_circuit_opened_total",
            &[victim_label.as_str()]
        )
        .is_some_and(|n| n >= 1.0),
        "the dead replica's circuit opened:\n{text}"
    );

    let _back = start_users(&env, victim_addr).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(gateway.get(&path).await.status(), 200);
        let text = gateway.metrics_text().await;
        let closed = series(
            &text,
            "agora_gateway_circuit_state",
            &[victim_label.as_str()],
        ) == Some(0.0);
        let healthy = series(
            &text,
            "agora_gateway_upstream_healthy",
            &[victim_label.as_str()],
        ) == Some(1.0);
        let served = series(
            &text,
            "agora_gateway_upstream_requests_total",
            &[victim_label.as_str(), "status=\"200\""],
        );
        if closed && healthy && served.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica is back in service:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    set_gateway(
        &mut env,
        "cors",
        json!({"allowed_origins": ["https://shop.example"]}),
    );
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    let preflight = |origin: &'static str| {
        gateway
            .client
            .request(reqwest::Method::OPTIONS, gateway.url("/api/v1/users"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let allowed = preflight("https://shop.example").await.expect("sent");
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("text");
    assert!(methods.contains("POST"), "{methods}");
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .expect("text")
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    let get = gateway
        .client
        .get(gateway.url("/api/v1/users"))
        .header("origin", "https://shop.example")
        .send()
        .await
        .expect("sent");
    assert_eq!(
        get.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let exposed = get.headers()["access-control-expose-headers"]
        .to_str()
        .expect("text")
        .to_ascii_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );

    let refused = preflight("https://evil.example").await.expect("sent");
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin"),
        "{:?}",
        refused.headers()
    );
    let get = gateway
        .client
        .get(gateway.url("/api/v1/users"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("sent");
    assert!(!get.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_forwarded_with_a_new_parent_or_started_when_absent() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let seen: Value = gateway
        .client
        .get(gateway.url("/api/v1/users"))
        .header("traceparent", sent)
        .header("tracestate", "vendor=1")
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("echo");
    let forwarded = seen["traceparent"].as_str().expect("a traceparent");
    let parsed = kit::trace::TraceContext::parse(forwarded).expect("valid");
    let client = kit::trace::TraceContext::parse(sent).expect("valid");
    assert_eq!(parsed.trace_id, client.trace_id, "same trace: {forwarded}");
    assert_ne!(parsed.parent_id, client.parent_id, "the gateway's own span");
    assert_eq!(parsed.flags, client.flags);
    assert_eq!(seen["tracestate"], "vendor=1");

    for incoming in [None, Some("garbage")] {
        let mut request = gateway.client.get(gateway.url("/api/v1/users"));
        if let Some(value) = incoming {
            request = request.header("traceparent", value);
        }
        let seen: Value = request
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("echo");
        let value = seen["traceparent"].as_str().expect("a traceparent");
        assert!(
            kit::trace::TraceContext::parse(value).is_some(),
            "{incoming:?}: a new valid trace, {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_private_listener_not_the_public_port() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let upstream = echo_upstream(&env).await;
    let gateway = gateway_to(&env, vec![url_of(&upstream)]).await;
    assert_eq!(gateway.get("/api/v1/users").await.status(), 200);
    let public = gateway.get("/metrics").await;
    assert_problem(public, 404, "not_found").await;
    let private = gateway
        .client
        .get(gateway.metrics_url("/metrics"))
        .send()
        .await
        .expect("sent");
    assert_eq!(private.status(), 200);
    let text = private.text().await.expect("text");
    for name in [
        "agora_http_requests_total{",
        "agora_gateway_upstream_requests_total{",
        "agora_gateway_circuit_state{",
        "agora_gateway_upstream_healthy{",
    ] {
        assert!(text.contains(name), "{name}:\n{text}");
    }
    assert!(
        text.contains("route=\"/api/v1/users\"") && text.contains("status=\"200\""),
        "{text}"
    );
}
