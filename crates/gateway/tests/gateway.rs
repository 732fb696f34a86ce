//! The gateway in front of real users services: every seed's path, request ids across the hop,
//! round-robin over replicas, aggregated health, and clear errors when an upstream is gone.

use std::collections::BTreeMap;

use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::{Value, json};
use url::Url;

struct Stack {
    gateway: TestServer,
    users: Vec<TestServer>,
    client: reqwest::Client,
    _env: TestEnv,
}

fn url_of(server: &TestServer) -> Url {
    Url::parse(&server.url("")).expect("url")
}

/// `replicas` users services (sharing one database) behind a gateway, plus `dead` upstream
/// URLs where nothing listens.
async fn spawn_stack(replicas: usize, dead: &[&str]) -> Stack {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut users = Vec::new();
    for _ in 0..replicas {
        let app = users::app(env.deps(&users::SERVICE).await)
            .await
            .expect("users app");
        users.push(TestServer::start(app, &env.settings).await);
    }
    let mut urls: Vec<Url> = users.iter().map(url_of).collect();
    urls.extend(dead.iter().map(|u| Url::parse(u).expect("url")));
    let upstreams = BTreeMap::from([("users".to_owned(), urls)]);
    let gateway = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
    let gateway = TestServer::start(gateway, &env.settings).await;
    Stack {
        gateway,
        users,
        client: reqwest::Client::new(),
        _env: env,
    }
}

impl Stack {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, self.gateway.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (
            status,
            headers,
            response.json().await.unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn every_seed_path_reaches_the_users_service() {
    let stack = spawn_stack(1, &[]).await;
    use reqwest::Method;
    // seed 000: POST /users, GET /users/id/{id}, GET /users/name/{name}
    let (status, _, alice) = stack
        .send(Method::POST, "/users", Some(json!({"name": "Alice"})))
        .await;
    assert_eq!(status, 201);
    let id = alice["id"].as_i64().expect("id");
    let (status, _, body) = stack
        .send(Method::GET, &format!("/users/id/{id}"), None)
        .await;
    assert_eq!((status, &body), (200, &alice));
    let (status, _, body) = stack.send(Method::GET, "/users/name/Alice", None).await;
    assert_eq!((status, &body), (200, &alice));
    // seed 001: /api/v1/users
    let (status, _, bob) = stack
        .send(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "bob", "email": "bob@example.com"})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _, list) = stack
        .send(Method::GET, "/api/v1/users?per_page=10", None)
        .await;
    assert_eq!(
        (status, list["total"].as_i64()),
        (200, Some(2)),
        "query string is forwarded"
    );
    // seed 002: /users with full_name, /users/{id}
    let (status, _, carol) = stack
        .send(
            Method::POST,
            "/users",
            Some(json!({"email": "carol@example.com", "full_name": "Carol"})),
        )
        .await;
    assert_eq!((status, carol["name"].as_str()), (201, Some("Carol")));
    let (status, _, body) = stack
        .send(Method::GET, &format!("/users/{}", bob["id"]), None)
        .await;
    assert_eq!((status, &body), (200, &bob));
    // seed 004: /api/users CRUD and /api/users/health
    let (status, _, dave) = stack
        .send(
            Method::POST,
            "/api/users",
            Some(json!({"name": "Dave", "email": "dave@example.com"})),
        )
        .await;
    assert_eq!(status, 201);
    let path = format!("/api/users/{}", dave["id"]);
    let (status, _, updated) = stack
        .send(Method::PUT, &path, Some(json!({"name": "Dave Updated"})))
        .await;
    assert_eq!(
        (status, updated["name"].as_str()),
        (200, Some("Dave Updated"))
    );
    let (status, _, _) = stack.send(Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    let (status, _, body) = stack.send(Method::GET, "/api/users/health", None).await;
    assert_eq!((status, body["service"].as_str()), (200, Some("users")));
}

#[tokio::test]
async fn request_ids_are_generated_or_forwarded_across_the_hop() {
    let stack = spawn_stack(1, &[]).await;
    // Forwarded: the upstream's problem body carries the id the client sent.
    let response = stack
        .client
        .get(stack.gateway.url("/api/v1/users/4242"))
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "client-chosen-id");
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        (body["code"].as_str(), body["request_id"].as_str()),
        (Some("user_not_found"), Some("client-chosen-id"))
    );

    // Generated: the gateway makes one, and the upstream sees the same.
    let response = stack
        .client
        .get(stack.gateway.url("/api/v1/users/4242"))
        .send()
        .await
        .expect("sent");
    let generated = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["request_id"], generated.as_str());
}

#[tokio::test]
async fn replicas_share_the_traffic_round_robin() {
    let stack = spawn_stack(2, &[]).await;
    let (_, _, user) = stack
        .send(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(json!({"name": "Eve"})),
        )
        .await;
    for _ in 0..4 {
        let (status, _, _) = stack
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/users/{}", user["id"]),
                None,
            )
            .await;
        assert_eq!(status, 200);
    }
    // Each replica has its own in-process cache: both saw reads.
    for replica in &stack.users {
        let stats: Value = stack
            .client
            .get(replica.url("/api/v1/users/stats"))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("json");
        let reads = stats["cache"]["hits"].as_u64().unwrap_or(0)
            + stats["cache"]["misses"].as_u64().unwrap_or(0);
        assert!(reads >= 1, "every replica served reads: {stats}");
    }
}

#[tokio::test]
async fn health_aggregates_every_replica() {
    let stack = spawn_stack(1, &[]).await;
    for path in ["/health", "/api/health", "/healthz"] {
        let (status, _, body) = stack.send(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["services"]["users"]["status"], "up");
    }

    let degraded = spawn_stack(1, &["http://127.0.0.1:1"]).await;
    let (status, _, body) = degraded.send(reqwest::Method::GET, "/health", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["services"]["users"]["status"], "down");
    let replicas = body["services"]["users"]["replicas"]
        .as_array()
        .expect("replicas");
    assert_eq!(
        replicas.iter().filter(|r| r["status"] == "up").count(),
        1,
        "{body}"
    );
    assert!(
        replicas.iter().all(|r| r.get("url").is_none()) && !body.to_string().contains("127.0.0.1"),
        "the public health page names no upstream address: {body}"
    );
}

#[tokio::test]
async fn a_dead_replica_is_skipped_for_reads_and_reported_for_writes() {
    let stack = spawn_stack(1, &["http://127.0.0.1:1"]).await;
    // Reads retry on the next replica: every GET succeeds.
    for _ in 0..4 {
        let (status, _, _) = stack
            .send(reqwest::Method::GET, "/api/v1/users", None)
            .await;
        assert_eq!(status, 200);
    }
    // Writes are never retried (not idempotent): some reach the dead replica and get 502.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (status, _, body) = stack
            .send(
                reqwest::Method::POST,
                "/api/v1/users",
                Some(json!({"name": format!("U{i}")})),
            )
            .await;
        if status == 502 {
            assert_eq!(body["code"], "upstream_unavailable", "{body}");
            assert!(
                !body.to_string().contains("127.0.0.1"),
                "no internal address leaks: {body}"
            );
        }
        statuses.push(status);
    }
    assert!(
        statuses.contains(&201) && statuses.contains(&502),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn unknown_paths_get_a_problem_from_the_gateway() {
    let stack = spawn_stack(1, &[]).await;
    let response = stack
        .client
        .get(stack.gateway.url("/no/such/thing"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], "not_found");
    assert!(body["request_id"].is_string());
}

#[tokio::test]
async fn oversize_bodies_are_refused_at_the_gateway() {
    let stack = spawn_stack(1, &[]).await;
    let body = json!({"name": "x".repeat(2 * 1024 * 1024)});
    let (status, _, problem) = stack
        .send(reqwest::Method::POST, "/api/v1/users", Some(body))
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (413, Some("payload_too_large"))
    );
}

#[tokio::test]
async fn a_slow_upstream_is_a_504() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.http.request_timeout_secs = 2;
    // An upstream that answers after the gateway has stopped waiting.
    let slow = axum::Router::new().fallback(|| async {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        "late"
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, slow).await });
    let upstreams = BTreeMap::from([(
        "users".to_owned(),
        vec![Url::parse(&format!("http://{addr}")).expect("url")],
    )]);
    let gateway = TestServer::start(
        gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway"),
        &env.settings,
    )
    .await;
    let response = reqwest::get(gateway.url("/api/v1/users"))
        .await
        .expect("sent");
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["code"], "upstream_timeout");
}

/// Sends `GET {path}` exactly as written (a client library would normalise `..` and `%2e`), and
/// returns the status code and the body.
async fn raw_get(server: &TestServer, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_encoded_separators_are_refused_before_routing() {
    let stack = spawn_stack(1, &[]).await;
    for path in [
        "/api/v1/products/..%2F..%2Finternal/v1/reservations",
        "/api/v1/users/..%2f..%2finternal/v1/reservations",
        "/api/v1/users/%2e%2e/%2e%2e/internal/v1/reservations",
        "/api/v1/users/../../internal/v1/reservations",
        "/users/1%5C..%5C..",
        "/api/v1/users/./1",
    ] {
        let (status, body) = raw_get(&stack.gateway, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("\"code\":\"invalid_path\""), "{path}: {body}");
    }
    let (status, _) = raw_get(&stack.gateway, "/api/v1/users").await;
    assert_eq!(status, 200, "ordinary paths still pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_metrics_label_requests_by_route_table_entry() {
    let stack = spawn_stack(1, &[]).await;
    for i in 0..50 {
        let (status, _, _) = stack
            .send(reqwest::Method::GET, &format!("/users/id/{i}"), None)
            .await;
        assert!(status == 200 || status == 404, "{status}");
    }
    let (_, _, _) = stack
        .send(reqwest::Method::GET, "/nowhere/at/all", None)
        .await;
    let text = stack.gateway.metrics_text().await;
    assert!(
        text.contains("route=\"/users\""),
        "labelled by the matched prefix: {text}"
    );
    assert!(!text.contains("/users/id/"), "never the raw path: {text}");
    assert!(text.contains("route=\"unmatched\""), "{text}");
}

/// An upstream that answers with the headers it received.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_the_real_peer_unless_a_trusted_proxy_sent_it() {
    for (trusted, expected) in [(false, "127.0.0.1"), (true, "203.0.113.9, 127.0.0.1")] {
        let mut env = TestEnv::new(Backend::Sqlite).await;
        if trusted {
            let gateway = env.settings.services.get_mut("gateway").expect("gateway");
            gateway.extra.insert(
                "trusted_proxies".into(),
                figment::value::Value::serialize(["127.0.0.1"]).expect("value"),
            );
        }
        let upstream = echo_upstream(&env).await;
        let upstreams = BTreeMap::from([("users".to_owned(), vec![url_of(&upstream)])]);
        let gateway = TestServer::start(
            gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway"),
            &env.settings,
        )
        .await;
        let seen: Value = reqwest::Client::new()
            .get(gateway.url("/api/v1/users"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("proxy-connection", "keep-alive")
            // A header the client names in `Connection` is for this hop only.
            .header("connection", "x-hop-only")
            .header("x-hop-only", "1")
            .header("x-end-to-end", "1")
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("echo");
        assert_eq!(
            seen["x-forwarded-for"], expected,
            "trusted={trusted}: {seen}"
        );
        assert!(seen.get("proxy-connection").is_none(), "stripped: {seen}");
        assert!(seen.get("x-hop-only").is_none(), "stripped: {seen}");
        assert!(seen.get("connection").is_none(), "stripped: {seen}");
        assert_eq!(seen["x-end-to-end"], "1", "forwarded: {seen}");
    }
}

/// A replica that is gone fails a few writes (writes are not retried) until its circuit opens,
/// then none; it is logged when it goes away (and when its circuit opens), not once per request.
#[tokio::test]
async fn a_dead_replica_is_logged_once_not_per_request() {
    let stack = spawn_stack(1, &["http://127.0.0.1:1"]).await;
    let logs = kit::testing::CapturedLogs::start();
    let mut failed = 0;
    for i in 0..200 {
        let (status, _, _) = stack
            .send(
                reqwest::Method::POST,
                "/api/v1/users",
                Some(json!({"name": format!("Logged{i}")})),
            )
            .await;
        assert!(status == 201 || status == 502, "{status}");
        failed += usize::from(status == 502);
    }
    assert!(
        (1..=5).contains(&failed),
        "writes reach the dead replica until its circuit opens (5 failures): {failed}"
    );
    let lines = logs.lines();
    let warnings: Vec<&String> = lines.iter().filter(|l| l.contains("WARN")).collect();
    let errors = lines.iter().filter(|l| l.contains("ERROR")).count();
    // Down once, its circuit opened once, and (if a health check ran meanwhile) out of the
    // rotation once: each about the dead replica.
    assert!(
        (1..=3).contains(&warnings.len())
            && warnings.iter().all(|w| w.contains("127.0.0.1:1"))
            && errors == 0,
        "{failed} failed requests:\n{}",
        lines.join("\n")
    );
}
