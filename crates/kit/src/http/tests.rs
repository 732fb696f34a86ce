//! Serving under hostile clients and during shutdown, on real sockets.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Query;
use axum::routing::get;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::http::ServeOptions;
use crate::metrics::Metrics;
use crate::service::{App, Running};
use crate::shutdown::Shutdown;

#[derive(serde::Deserialize)]
struct Slow {
    ms: u64,
}

/// A service with `/` (hello), `/slow?ms=` and `/ready`, behind the standard layers.
fn app() -> App {
    let router = Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|Query(slow): Query<Slow>| async move {
                tokio::time::sleep(Duration::from_millis(slow.ms)).await;
                "slow hello"
            }),
        )
        .merge(crate::http::health_routes("test", Vec::new()));
    let settings = crate::config::Settings::defaults();
    let router = crate::http::with_standard_layers(router, &settings.http, &Metrics::new("test"));
    App::new("test", router, None)
}

fn options(header_read_timeout: Duration) -> ServeOptions {
    ServeOptions {
        header_read_timeout,
        max_connections: 1000,
        drain: Duration::ZERO,
        grace: Duration::from_secs(5),
    }
}

async fn start(options: ServeOptions) -> (Running, Shutdown) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shutdown = Shutdown::new();
    let running = app().spawn(listener, &shutdown, options).expect("serve");
    (running, shutdown)
}

/// Sends a request head one byte at a time (a byte every 200 ms, never finishing it); returns
/// how long the server kept the connection, or `None` if it was still open after `limit`.
async fn slowloris(addr: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: agora\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 512];
    while started.elapsed() < limit {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                // A 408 before closing is fine too; keep reading to the end.
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if stream.write_all(b"x").await.is_err() {
                    return Some(started.elapsed());
                }
            }
        }
    }
    None
}

/// One complete keep-alive request on a raw connection; returns the connection after reading the
/// whole response.
async fn one_request(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: agora\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.ends_with(b"hello") {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "the server answered before closing");
        response.extend_from_slice(&buf[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200"));
    stream
}

/// Waits until the peer closes `stream`; returns how long that took (`None`: not within `limit`).
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_while_normal_requests_are_served() {
    let timeout = Duration::from_secs(3);
    let (running, _shutdown) = start(options(timeout)).await;
    let addr = running.addr;

    let attackers: Vec<_> = (0..300)
        .map(|_| tokio::spawn(slowloris(addr, Duration::from_secs(12))))
        .collect();
    // Meanwhile, ordinary clients on new connections are served. What matters is that they are
    // served while every slow connection is still held, not how fast (the machine may be busy):
    // count the requests answered before the server cut the first slow connection.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut served_during_attack = 0;
    while served_during_attack < 10 && !attackers.iter().any(|a| a.is_finished()) {
        let response = client
            .get(format!("http://{addr}/"))
            .send()
            .await
            .expect("served during the attack");
        assert_eq!(response.status(), 200);
        if !attackers.iter().any(|a| a.is_finished()) {
            served_during_attack += 1;
        }
    }
    assert!(
        served_during_attack >= 3,
        "only {served_during_attack} normal requests were answered while 300 slow connections \
         were open"
    );
    let mut longest = Duration::ZERO;
    for attacker in attackers {
        let held = attacker
            .await
            .expect("attacker task")
            .expect("the server closed the slow connection");
        longest = longest.max(held);
    }
    assert!(
        longest >= timeout && longest < timeout + Duration::from_secs(5),
        "slow connections were held for up to {longest:?} with a {timeout:?} header timeout"
    );
    // And once they are gone, service goes on as before.
    let response = client.get(format!("http://{addr}/")).send().await;
    assert_eq!(response.expect("served after the attack").status(), 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let (running, _shutdown) = start(options(timeout)).await;
    let mut stream = one_request(running.addr).await;
    let idle = closed_within(&mut stream, Duration::from_secs(5))
        .await
        .expect("the idle connection was closed");
    assert!(
        idle >= Duration::from_millis(800) && idle < timeout + Duration::from_secs(2),
        "closed after {idle:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let (running, _shutdown) = start(ServeOptions {
        max_connections: 3,
        ..options(Duration::from_secs(30))
    })
    .await;
    let addr = running.addr;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(one_request(addr).await);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .expect("client");
    let refused = client.get(format!("http://{addr}/")).send().await;
    assert!(
        refused.is_err(),
        "a fourth connection is not served while three are open"
    );
    drop(held.pop());
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .expect("served once a connection closed");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_at_once_on_shutdown_and_requests_in_flight_finish() {
    let drain = Duration::from_secs(1);
    let (running, shutdown) = start(ServeOptions {
        drain,
        ..options(Duration::from_secs(10))
    })
    .await;
    let addr = running.addr;
    let client = reqwest::Client::new();
    let ready = client
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(ready.status(), 200);

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get(format!("http://{addr}/slow?ms=1500"))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    shutdown.begin();

    let ready = reqwest::Client::new()
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .expect("still answering during the drain");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["status"], "stopping");
    let hello = reqwest::Client::new()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .expect("requests are still served during the drain");
    assert_eq!(hello.status(), 200);

    let slow = in_flight
        .await
        .expect("task")
        .expect("the request in flight finished");
    assert_eq!(slow.status(), 200);
    assert_eq!(slow.text().await.expect("body"), "slow hello");

    // After the drain the listener is closed.
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            began.elapsed() < drain + Duration::from_secs(2),
            "still accepting {:?} after the signal",
            began.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(began.elapsed() >= drain, "accepted for the whole drain");
    running.handle.await.expect("join").expect("served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_open_connections_are_closed_and_the_server_ends() {
    let grace = Duration::from_secs(1);
    let (running, shutdown) = start(ServeOptions {
        grace,
        ..options(Duration::from_secs(30))
    })
    .await;
    let addr = running.addr;
    let mut idle = one_request(addr).await;
    let stuck = tokio::spawn(async move {
        reqwest::Client::new()
            .get(format!("http://{addr}/slow?ms=20000"))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    shutdown.begin();

    // An idle keep-alive connection is closed at once, not after the grace.
    let closed = closed_within(&mut idle, grace)
        .await
        .expect("the idle connection was closed at once");
    assert!(
        closed < Duration::from_millis(800),
        "idle closed after {closed:?}"
    );

    running.handle.await.expect("join").expect("served");
    let ended = began.elapsed();
    assert!(
        ended >= grace && ended < grace + Duration::from_secs(2),
        "the server ended {ended:?} after the signal with a {grace:?} grace"
    );
    let stuck = stuck.await.expect("task");
    assert!(
        stuck.is_err(),
        "the request still running after the grace lost its connection"
    );
}

#[tokio::test]
async fn an_encoded_nul_in_the_path_or_query_is_400() {
    let (running, _shutdown) = start(options(Duration::from_secs(10))).await;
    let client = reqwest::Client::new();
    for path in ["/slow?ms=%00", "/%00", "/a%00b"] {
        let response = client
            .get(format!("http://{}{path}", running.addr))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), 400, "{path}");
        let problem: serde_json::Value = response.json().await.expect("problem");
        assert_eq!(problem["code"], "invalid_uri", "{path}");
        assert!(problem["request_id"].is_string(), "{problem}");
    }
}

/// A service calling another with [`crate::client::ServiceClient`] sends the trace of the
/// request it serves on: same trace id, its own span as the parent.
#[tokio::test]
async fn a_service_to_service_call_carries_the_trace_on() {
    // The neighbour answers with the traceparent it received.
    let neighbour = Router::new().route(
        "/seen",
        get(|headers: axum::http::HeaderMap| async move {
            let value = headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            axum::Json(serde_json::json!({ "traceparent": value }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let shutdown = Shutdown::new();
    let neighbour = App::new("neighbour", neighbour, None)
        .spawn(listener, &shutdown, options(Duration::from_secs(5)))
        .expect("serve");
    let url = url::Url::parse(&format!("http://{}", neighbour.addr)).expect("url");
    let client = std::sync::Arc::new(
        crate::client::ServiceClient::new("neighbour", vec![url], Duration::from_secs(2))
            .expect("client"),
    );
    let caller = Router::new().route(
        "/call",
        get(move || {
            let client = client.clone();
            async move {
                let seen: Option<serde_json::Value> =
                    client.get_json("/seen").await.expect("answered");
                axum::Json(seen.unwrap_or_default())
            }
        }),
    );
    let settings = crate::config::Settings::defaults();
    let caller = crate::http::with_standard_layers(caller, &settings.http, &Metrics::new("c"));
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = tower::ServiceExt::oneshot(
        caller,
        axum::http::Request::get("/call")
            .header("traceparent", sent)
            .body(axum::body::Body::empty())
            .expect("request"),
    )
    .await
    .expect("response");
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let forwarded = crate::trace::TraceContext::parse(seen["traceparent"].as_str().expect("text"))
        .expect("a valid traceparent reached the neighbour");
    let original = crate::trace::TraceContext::parse(sent).expect("valid");
    assert_eq!(forwarded.trace_id, original.trace_id);
    assert_ne!(forwarded.parent_id, original.parent_id);
    shutdown.force();
}

/// One request through the standard layers (no socket), its answer and its parsed body.
async fn through(
    router: &Router,
    request: axum::http::Request<axum::body::Body>,
) -> (axum::http::response::Parts, serde_json::Value) {
    let response = tower::ServiceExt::oneshot(router.clone(), request)
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .expect("body")
        .to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (parts, value)
}

/// What every service relies on the standard layers for: the request id kept (or made) and
/// echoed; a panic, a timeout, an oversized body and an unknown route answered as problem
/// bodies carrying that id; each request counted under its route template and status.
#[tokio::test(start_paused = true)]
async fn the_standard_layers_answer_every_failure_as_a_problem_with_the_request_id() {
    let router = Router::new()
        .route(
            "/items/{id}",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route(
            "/panics",
            get(|| async {
                if std::hint::black_box(true) {
                    panic!("a handler bug");
                }
                "unreachable"
            }),
        )
        .route(
            "/hangs",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "late"
            }),
        )
        .route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
    let mut settings = crate::config::Settings::defaults();
    settings.http.request_timeout_secs = 2;
    settings.http.body_limit_bytes = 1024;
    let metrics = Metrics::new("std");
    let router = crate::http::with_standard_layers(router, &settings.http, &metrics);
    let get_req = |path: &str, id: Option<&str>| {
        let mut request = axum::http::Request::get(path);
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        request.body(axum::body::Body::empty()).expect("request")
    };

    // A usable id is kept and echoed; an unusable one is replaced.
    let (parts, body) = through(&router, get_req("/items/7", Some("client-id-1"))).await;
    assert_eq!(parts.status, 200);
    assert_eq!(body["ok"], true);
    assert_eq!(parts.headers["x-request-id"], "client-id-1");
    let (parts, _) = through(&router, get_req("/items/7", Some("not a token!"))).await;
    let made = parts.headers["x-request-id"].to_str().expect("text");
    assert_eq!(made.len(), 36, "a new uuid: {made}");

    for (request, status, code) in [
        (get_req("/panics", Some("id-panic")), 500, "internal_error"),
        (get_req("/hangs", Some("id-hang")), 408, "request_timeout"),
        (get_req("/nowhere", Some("id-404")), 404, "not_found"),
        (
            axum::http::Request::post("/echo")
                .header("x-request-id", "id-413")
                .body(axum::body::Body::from(vec![b'x'; 4096]))
                .expect("request"),
            413,
            "payload_too_large",
        ),
    ] {
        let id = request.headers()["x-request-id"].clone();
        let (parts, problem) = through(&router, request).await;
        assert_eq!(parts.status, status, "{problem}");
        assert_eq!(parts.headers["content-type"], crate::error::PROBLEM_JSON);
        assert_eq!(problem["code"], code, "{problem}");
        assert_eq!(problem["status"], status);
        assert_eq!(
            problem["request_id"],
            id.to_str().expect("text"),
            "{problem}"
        );
        assert_eq!(parts.headers["x-request-id"], id);
    }

    let text = metrics.encode();
    for series in [
        r#"method="GET",route="/items/{id}",status="200""#,
        r#"method="GET",route="/panics",status="500""#,
        r#"method="GET",route="/hangs",status="408""#,
        r#"method="POST",route="/echo",status="413""#,
    ] {
        assert!(
            text.lines().any(
                |l| l.starts_with("agora_http_requests_total{service=\"std\"")
                    && l.contains(series)
            ),
            "{series} counted:\n{text}"
        );
    }
}
