//! The binary as a new user runs it: `agora seed`, then `agora up` as a real process, used
//! through 127.0.0.1:8080, then stopped with SIGTERM.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

/// `agora` with a clean environment (embedded default) in `dir`.
fn agora(dir: &std::path::Path) -> Command {
    let mut command = Command::new(AGORA);
    command
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("NATS_URL")
        .env("RUST_LOG", "warn");
    for (key, _) in std::env::vars() {
        if key.starts_with("AGORA_") {
            command.env_remove(key);
        }
    }
    command
}

async fn get_json(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    let response = client.get(url).send().await.expect("request is sent");
    response.json().await.expect("a JSON body")
}

/// Sends SIGTERM and waits (at most 15 s) for the exit status.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGTERM was delivered");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the process did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_seeded_system_on_8080_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seeded = agora(dir.path()).arg("seed").output().expect("seed runs");
    assert!(
        seeded.status.success(),
        "seed: {}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    let said = String::from_utf8_lossy(&seeded.stdout);
    assert!(
        said.contains("users: 4 added")
            && said.contains("2 example chats")
            && said.contains("products: 12 added")
            && said.contains("orders: 8 added")
            && said.contains("admin: admin@agora.local")
            && said.contains("/api/v1/auth/login"),
        "{said}"
    );

    let started = Instant::now();
    let mut child = agora(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("up starts");
    let client = reqwest::Client::new();
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(response) = client.get("http://127.0.0.1:8080/health").send().await
            && response.status() == 200
        {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child.stderr.take().map(|mut s| s.read_to_string(&mut err));
            panic!("agora up exited early ({status}): {err}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the gateway answered on 127.0.0.1:8080");

    // Seed 001's walkthrough works on ids 1, 2, ...
    let alice: Value = get_json(&client, "http://127.0.0.1:8080/api/v1/users/1").await;
    assert_eq!(alice["username"], "alice");

    let response = client
        .post("http://127.0.0.1:8080/api/v1/users")
        .json(&json!({"username": "erin", "email": "erin@example.com"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let erin: Value = response.json().await.expect("json");
    assert_eq!(
        erin["id"], 6,
        "new ids continue after the seeded ones (users 1-4, the admin 5)"
    );
    let fetched: Value = get_json(
        &client,
        format!("http://127.0.0.1:8080/users/id/{}", erin["id"]),
    )
    .await;
    assert_eq!(fetched, erin);

    // Seed 001's products, through the canonical path and seed 003's inventory path.
    let text = client
        .get("http://127.0.0.1:8080/api/v1/products/2")
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(
        text.contains(r#""name":"Mouse""#) && text.contains(r#""price":29.99"#),
        "{text}"
    );
    let mouse: Value = serde_json::from_str(&text).expect("json");
    let inventory: Value =
        get_json(&client, "http://127.0.0.1:8080/api/inventory/products/2").await;
    assert_eq!(inventory, mouse);
    let furniture: Value = get_json(
        &client,
        "http://127.0.0.1:8080/api/v1/products?category=Furniture",
    )
    .await;
    assert_eq!(furniture["total"], 2, "{furniture}");
    let response = client
        .patch("http://127.0.0.1:8080/api/v1/products/2/stock")
        .json(&json!({"stock": 150}))
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status(), 200);
    let response = client
        .post("http://127.0.0.1:8080/api/v1/products")
        .json(
            &json!({"name": "Webcam", "description": "1080p", "price": 59.99,
                      "stock": 30, "category": "Electronics"}),
        )
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let webcam: Value = response.json().await.expect("json");
    assert_eq!(
        webcam["id"], 124,
        "new product ids continue after the seeded ones (seed 003's product is 123)"
    );

    // Seed 001's 8 orders, and each seed's documented order request.
    let orders = get_json(&client, "http://127.0.0.1:8080/api/v1/orders").await;
    assert_eq!(orders["total"], 8, "{orders}");
    assert_eq!(orders["items"][2]["status"], "shipped");
    let seed_001 = client
        .post("http://127.0.0.1:8080/api/v1/orders")
        .json(&json!({"user_id": 1, "product_id": 2, "quantity": 2, "total_price": 1998.00}))
        .send()
        .await
        .expect("post");
    assert_eq!(seed_001.status(), 201);
    let seed_001: Value = seed_001.json().await.expect("json");
    assert_eq!(seed_001["total_price"], 59.98, "{seed_001}");
    assert_eq!(seed_001["id"], 9, "after the seeded orders");
    let seed_002 = client
        .post("http://127.0.0.1:8080/orders")
        .json(&json!({"user_id": 1, "item": "Pro Keyboard", "quantity": 2}))
        .send()
        .await
        .expect("post");
    assert_eq!(seed_002.status(), 201);
    let seed_002: Value = seed_002.json().await.expect("json");
    assert_eq!(seed_002["status"], "pending", "answered at once");
    let seed_003 = client
        .post("http://127.0.0.1:8080/api/orders")
        .json(&json!({"user_id": 1, "items": [{"product_id": "123", "quantity": 2}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(seed_003.status(), 201);
    // The worker processes them in the background (seed 002's Celery flow).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let order = get_json(
            &client,
            format!("http://127.0.0.1:8080/orders/{}", seed_002["id"]),
        )
        .await;
        if order["status"] == "processed" {
            break;
        }
        assert!(Instant::now() < deadline, "not processed in 15 s: {order}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Notify heard about it (the log channel, by default).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = get_json(
            &client,
            "http://127.0.0.1:8080/api/v1/notifications?status=sent&per_page=100",
        )
        .await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if items
            .iter()
            .any(|n| n["event_type"] == "order.processed" && n["channel"] == "log")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no order.processed notification: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Seed 000's cache service.
    let stored = client
        .post("http://127.0.0.1:8080/cache/greeting")
        .json(&json!({"value": "hello"}))
        .send()
        .await
        .expect("post");
    assert_eq!(stored.status(), 200);
    let greeting = get_json(&client, "http://127.0.0.1:8080/cache/greeting").await;
    assert_eq!(greeting["value"], "hello", "{greeting}");
    let memory = get_json(&client, "http://127.0.0.1:8080/cache/memory").await;
    assert_eq!(memory["keys"], 1, "{memory}");
    // Seed 004's chat service: a chat, its participants, a message, the chats of a participant
    // (users 7 and 8: the seeded example chats have users 1 to 3).
    let response = client
        .post("http://127.0.0.1:8080/api/chats")
        .json(&json!({"name": "Project Alpha", "metadata": {"type": "project"}}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let chat: Value = response.json().await.expect("json");
    let chat_id = chat["id"].as_str().expect("chat id").to_owned();
    let response = client
        .post(format!(
            "http://127.0.0.1:8080/api/chats/{chat_id}/participants"
        ))
        .json(&json!({"participant_ids": ["user-7", "user-8"]}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let response = client
        .post(format!(
            "http://127.0.0.1:8080/api/chats/{chat_id}/messages"
        ))
        .json(&json!({"sender_id": "user-7", "text": "hello"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let chats = get_json(
        &client,
        "http://127.0.0.1:8080/api/chats/participant/user-8",
    )
    .await;
    assert_eq!(chats["chats"][0]["id"], chat_id.as_str(), "{chats}");
    let health = get_json(&client, "http://127.0.0.1:8080/health").await;
    assert_eq!(health["services"]["chat"]["status"], "up", "{health}");

    let status = terminate(&mut child);
    let mut out = String::new();
    child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    assert!(
        out.contains("gateway") && out.contains("127.0.0.1:8080"),
        "up prints where services listen: {out}"
    );
    for service in ["users", "catalog", "orders", "chat"] {
        assert!(
            dir.path().join(format!("data/{service}.db")).exists(),
            "{service}: SQLite file under ./data"
        );
    }
}

#[test]
fn a_bad_setting_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = agora(dir.path())
        .arg("migrate")
        .env("AGORA_CACHE__ITEM_TTL_SECS", "soon")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr).to_lowercase();
    assert!(err.contains("item_ttl_secs"), "{err}");

    let output = agora(dir.path())
        .arg("migrate")
        .env("DATABASE_URL", "mysql://x/y")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL"));

    let output = agora(dir.path())
        .arg("seed")
        .env("AGORA_SERVICES__CATALOG__LOW_STOCK_THRESHOLD", "-1")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("services.catalog.low_stock_threshold"),
        "{err}"
    );
}

#[test]
fn serve_refuses_to_start_without_its_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = agora(dir.path())
        .args(["serve", "catalog", "--port", "0"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("auth.service_token") && err.contains("AGORA_AUTH__SERVICE_TOKEN"),
        "{err}"
    );
    let output = agora(dir.path())
        .args(["serve", "gateway", "--port", "0"])
        .env(
            "AGORA_AUTH__SERVICE_TOKEN",
            "system-test-service-token-0123456789ab",
        )
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("auth.jwt_secret") && err.contains("AGORA_AUTH__JWT_SECRET"),
        "{err}"
    );
}

/// Spawns `agora up` on free ports in `dir`; returns the child and the gateway's address, and
/// the start-up lines read.
fn up_on_free_ports(dir: &std::path::Path) -> (Child, String, Vec<String>) {
    use std::io::BufRead as _;
    let mut child = agora(dir)
        .arg("up")
        .env("AGORA_SERVICES__GATEWAY__PORT", "0")
        .env("AGORA_SERVICES__USERS__PORT", "0")
        .env("AGORA_SERVICES__CATALOG__PORT", "0")
        .env("AGORA_SERVICES__ORDERS__PORT", "0")
        .env("AGORA_SERVICES__WORKER__PORT", "0")
        .env("AGORA_SERVICES__NOTIFY__PORT", "0")
        .env("AGORA_SERVICES__CACHE__PORT", "0")
        .env("AGORA_SERVICES__CHAT__PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let mut gateway = None;
    for line in lines.by_ref() {
        let line = line.expect("utf-8");
        // "  gateway  http://127.0.0.1:P   (metrics http://127.0.0.1:M/metrics)"
        if let Some(rest) = line.trim().strip_prefix("gateway") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            gateway = Some(addr.trim_start_matches("http://").to_owned());
        }
        let done = line.starts_with("auth:");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, gateway.expect("up printed the gateway"), seen)
}

/// `agora up` keeps its JWT key under data_dir (owner-only), so a token issued before a restart
/// is still accepted after it; and it announces the open mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_survives_an_up_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, gateway, said) = up_on_free_ports(dir.path());
    assert!(
        said.iter().any(|l| l.starts_with("auth: open")),
        "up announces the mode: {said:?}"
    );
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{gateway}/api/v1/auth/register"))
        .json(&json!({"email": "erin@example.com", "name": "Erin", "password": "erin-password"}))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201);
    let login: Value = client
        .post(format!("http://{gateway}/api/v1/auth/login"))
        .json(&json!({"email": "erin@example.com", "password": "erin-password"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["access_token"].as_str().expect("token").to_owned();
    assert!(terminate(&mut child).success());

    for secret in ["jwt_secret", "service_token"] {
        let path = dir.path().join("data/secrets").join(secret);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("kept").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }
    let (mut child, gateway, _) = up_on_free_ports(dir.path());
    let response = client
        .get(format!("http://{gateway}/api/v1/users/me"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(response.status(), 200, "the token outlived the restart");
    let me: Value = response.json().await.expect("json");
    assert_eq!(me["email"], "erin@example.com");
    assert!(terminate(&mut child).success());
}

#[test]
fn help_describes_every_command() {
    let output = Command::new(AGORA).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["up", "serve", "migrate", "seed"] {
        assert!(help.contains(command), "--help lists `{command}`: {help}");
    }
    let output = Command::new(AGORA)
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&output.stdout).contains("--port"));
}

#[test]
fn serve_refuses_an_unknown_service() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = agora(dir.path())
        .args(["serve", "nope", "--port", "0"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("unknown service `nope`") && err.contains("users"),
        "{err}"
    );
}

/// Reads the child's stdout until the "listening on http://..." line and returns the address.
fn listening_addr(child: &mut Child) -> String {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().expect("a first line").expect("utf-8");
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    line.rsplit("http://")
        .next()
        .expect("an address")
        .trim()
        .to_owned()
}

/// The distributed mode: `agora serve users`, `agora serve catalog` and `agora serve gateway` as
/// separate processes on PostgreSQL + Redis + NATS JetStream, the gateway finding the services
/// through `services.<name>.upstreams`, the catalog's events reaching NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_service_per_process_on_postgres_redis_and_nats() {
    let env = kit::testing::TestEnv::new(kit::testing::Backend::Postgres).await;
    let settings = &env.settings;
    let schema = |service: &str| settings.service(service).schema.expect("a test schema");
    let configure = |command: &mut Command| {
        command
            .env(
                "DATABASE_URL",
                settings.database.url.as_deref().expect("pg url"),
            )
            .env(
                "REDIS_URL",
                settings.redis.url.as_deref().expect("redis url"),
            )
            .env("NATS_URL", settings.bus.url.as_deref().expect("nats url"))
            .env("AGORA_REDIS__PREFIX", &settings.redis.prefix)
            .env("AGORA_BUS__PREFIX", &settings.bus.prefix)
            .env("AGORA_SERVICES__USERS__SCHEMA", schema("users"))
            .env("AGORA_SERVICES__CATALOG__SCHEMA", schema("catalog"))
            // The processes share the keys (no mode: `serve` defaults to required).
            .env(
                "AGORA_AUTH__JWT_SECRET",
                "system-test-jwt-secret-0123456789abcdef",
            )
            .env(
                "AGORA_AUTH__SERVICE_TOKEN",
                "system-test-service-token-0123456789ab",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut users = agora(dir.path());
    configure(users.args(["serve", "users", "--port", "0"]));
    let mut users = users.spawn().expect("users starts");
    let users_addr = listening_addr(&mut users);
    let mut catalog = agora(dir.path());
    configure(catalog.args(["serve", "catalog", "--port", "0"]));
    let mut catalog = catalog.spawn().expect("catalog starts");
    let catalog_addr = listening_addr(&mut catalog);

    let mut gateway = agora(dir.path());
    configure(gateway.args(["serve", "gateway", "--port", "0"]));
    gateway
        .env(
            "AGORA_SERVICES__USERS__UPSTREAMS",
            format!("[\"http://{users_addr}\"]"),
        )
        .env(
            "AGORA_SERVICES__CATALOG__UPSTREAMS",
            format!("[\"http://{catalog_addr}\"]"),
        );
    let mut gateway = gateway.spawn().expect("gateway starts");
    let gateway_addr = listening_addr(&mut gateway);

    let client = reqwest::Client::new();
    // Required mode: no token, no write; the admin `agora seed` made can.
    let response = client
        .post(format!("http://{gateway_addr}/api/v1/users"))
        .json(&json!({"name": "Distributed"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 401, "serve defaults to auth required");
    let mut seed = agora(dir.path());
    configure(seed.arg("seed"));
    let seeded = seed.stdout(Stdio::piped()).output().expect("seed runs");
    assert!(seeded.status.success(), "seed");
    let password = std::fs::read_to_string(dir.path().join("data/admin-password"))
        .expect("the admin's password file");
    let login: Value = client
        .post(format!("http://{gateway_addr}/api/v1/auth/login"))
        .json(&json!({"email": "admin@agora.local", "password": password}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let admin = login["access_token"].as_str().expect("a token").to_owned();
    let client = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {admin}").parse().expect("header"),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .expect("client");
    let me: Value = get_json(&client, format!("http://{gateway_addr}/api/v1/users/me")).await;
    assert_eq!(me["role"], "admin", "{me}");
    let response = client
        .post(format!("http://{gateway_addr}/api/v1/users"))
        .json(&json!({"name": "Distributed"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let user: Value = response.json().await.expect("json");
    let fetched: Value = get_json(
        &client,
        format!("http://{gateway_addr}/api/v1/users/{}", user["id"]),
    )
    .await;
    assert_eq!(fetched, user);
    let stats: Value = get_json(&client, format!("http://{users_addr}/api/v1/users/stats")).await;
    assert_eq!(
        (
            stats["database"].as_str(),
            stats["cache"]["backend"].as_str()
        ),
        (Some("postgres"), Some("redis"))
    );

    // The catalog process publishes its events to NATS through its outbox relay.
    let bus = kit::bus::Bus::connect(settings).await.expect("NATS");
    let mut events = bus
        .subscribe("system-test", &["product.*"])
        .await
        .expect("subscribe");
    let response = client
        .post(format!("http://{gateway_addr}/api/v1/products"))
        .json(&json!({"name": "Distributed", "price": "5.00", "stock": 3}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let product: Value = response.json().await.expect("json");
    let fetched: Value = get_json(
        &client,
        format!(
            "http://{gateway_addr}/api/inventory/products/{}",
            product["id"]
        ),
    )
    .await;
    assert_eq!(fetched, product);
    let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("product.created arrives on NATS")
        .expect("subscription open")
        .expect("delivery");
    let event = delivery.message.event().expect("an event");
    assert_eq!(
        (event.topic.as_str(), &event.data["id"]),
        ("product.created", &product["id"])
    );
    delivery.ack().await.expect("ack");

    let health: Value = get_json(&client, format!("http://{gateway_addr}/health")).await;
    for service in ["users", "catalog"] {
        assert_eq!(health["services"][service]["status"], "up", "{health}");
    }
    let ready: Value = get_json(&client, format!("http://{catalog_addr}/ready")).await;
    assert_eq!(ready["checks"]["bus"]["status"], "up", "{ready}");

    for child in [&mut gateway, &mut catalog, &mut users] {
        let status = terminate(child);
        assert!(status.success(), "clean exit: {status}");
    }
    bus.delete_stream().await.expect("delete test stream");
}

/// SIGTERM to `agora up`: the gateway's `/ready` answers 503 at once while the services behind it
/// stay ready, the gateway keeps forwarding for the drain, stops accepting before the services
/// do, and the process exits within drain + grace + a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_gateway_before_the_services_behind_it() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let drain = Duration::from_secs(2);
    let mut child = agora(dir.path())
        .arg("up")
        .env("RUST_LOG", "info")
        .env("AGORA_LOG__FORMAT", "json")
        .env(
            "AGORA_HTTP__SHUTDOWN_DRAIN_SECS",
            drain.as_secs().to_string(),
        )
        .env("AGORA_HTTP__SHUTDOWN_GRACE_SECS", "5")
        .env("AGORA_SERVICES__GATEWAY__PORT", "0")
        .env("AGORA_SERVICES__USERS__PORT", "0")
        .env("AGORA_SERVICES__CATALOG__PORT", "0")
        .env("AGORA_SERVICES__ORDERS__PORT", "0")
        .env("AGORA_SERVICES__WORKER__PORT", "0")
        .env("AGORA_SERVICES__NOTIFY__PORT", "0")
        .env("AGORA_SERVICES__CACHE__PORT", "0")
        .env("AGORA_SERVICES__CHAT__PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("up starts");
    // "  users    http://127.0.0.1:PORT   (metrics http://127.0.0.1:M/metrics)" for each service.
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut addrs = std::collections::HashMap::new();
    for line in lines.by_ref() {
        let line = line.expect("utf-8");
        if let Some((name, rest)) = line.trim().split_once(" http://") {
            let addr = rest.split_whitespace().next().unwrap_or_default();
            addrs.insert(name.trim().to_owned(), addr.to_owned());
        }
        if addrs.len() == 8 {
            break;
        }
    }
    // Keep draining, so the child never writes to a closed pipe.
    std::thread::spawn(move || for _ in lines {});
    assert_eq!(addrs.len(), 8, "up printed every service: {addrs:?}");
    let stderr = child.stderr.take().expect("piped stderr");
    let logs = std::thread::spawn(move || {
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let gateway = &addrs["gateway"];
    let users = &addrs["users"];
    let client = reqwest::Client::new();
    let status = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    assert_eq!(status(format!("http://{gateway}/ready")).await, Some(200));

    let signalled = Instant::now();
    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(format!("http://{gateway}/ready")).await,
        Some(503),
        "the gateway reports stopping at once"
    );
    assert_eq!(
        status(format!("http://{users}/ready")).await,
        Some(200),
        "the services behind the gateway are still ready"
    );
    assert_eq!(
        status(format!("http://{gateway}/api/v1/users")).await,
        Some(200),
        "the gateway still forwards during the drain"
    );

    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            signalled.elapsed() < drain + Duration::from_secs(8),
            "agora up was still running {:?} after SIGTERM",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit: {exit}");
    assert!(
        signalled.elapsed() >= drain,
        "the gateway kept accepting for the drain"
    );

    // Who stopped accepting when, from the JSON logs.
    let logs = logs.join().expect("log reader");
    // (The private metrics listeners, span "metrics", stop with their service.)
    let stopped: Vec<String> = logs
        .iter()
        .filter(|line| line.contains("stopped accepting connections"))
        .map(|line| serde_json::from_str::<Value>(line).expect("a JSON log line"))
        .filter(|entry| entry["span"]["name"] == "server")
        .map(|entry| {
            entry["span"]["service"]
                .as_str()
                .expect("the server span names its service")
                .to_owned()
        })
        .collect();
    assert_eq!(
        stopped.len(),
        8,
        "every service stopped accepting: {logs:#?}"
    );
    assert_eq!(
        stopped[0], "gateway",
        "the gateway stops first: {stopped:?}"
    );
}

/// `agora config` prints the effective settings with every secret in a URL hidden: database,
/// Redis and NATS passwords, and a NATS token given as the user name.
#[test]
fn config_hides_every_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    for nats in [
        "nats://natsuser:n4tsp4ss@127.0.0.1:4222",
        "nats://n4tsp4ss@127.0.0.1:4222",
    ] {
        let output = agora(dir.path())
            .arg("config")
            .env(
                "DATABASE_URL",
                "postgres://agora:dbp4ss@db.internal:5432/agora",
            )
            .env("REDIS_URL", "redis://:r3disp4ss@cache.internal:6379")
            .env("NATS_URL", nats)
            .env(
                "AGORA_SERVICES__USERS__UPSTREAMS",
                r#"["http://admin:upp4ss@users.internal:8081"]"#,
            )
            .env(
                "AGORA_AUTH__JWT_SECRET",
                "jwtsecr3t-jwtsecr3t-jwtsecr3t-jwtsecr3t",
            )
            .env(
                "AGORA_AUTH__PREVIOUS_JWT_SECRET",
                "prevsecr3t-prevsecr3t-prevsecr3t-prev",
            )
            .env(
                "AGORA_AUTH__SERVICE_TOKEN",
                "svcsecr3t-svcsecr3t-svcsecr3t-svcsecr3t",
            )
            .output()
            .expect("config runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8_lossy(&output.stdout);
        for secret in [
            "dbp4ss",
            "r3disp4ss",
            "n4tsp4ss",
            "upp4ss",
            "jwtsecr3t",
            "prevsecr3t",
            "svcsecr3t",
        ] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(
            printed.contains("db.internal") && printed.contains("***"),
            "{printed}"
        );
    }
}

/// Reads the child's stdout until its "listening on" and "metrics on" lines; returns both
/// addresses (host:port).
fn listening_and_metrics(child: &mut Child) -> (String, String) {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut next_addr = || {
        let line = lines.next().expect("a line").expect("utf-8");
        line.rsplit("http://")
            .next()
            .expect("an address")
            .trim()
            .trim_end_matches("/metrics")
            .to_owned()
    };
    let (addr, metrics) = (next_addr(), next_addr());
    std::thread::spawn(move || for _ in lines {});
    (addr, metrics)
}

/// The value of the first series of `name` whose labels contain every one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Issue 11's replica rule with real processes: two `agora serve users` behind one `agora serve
/// gateway`, on PostgreSQL. SIGKILL one while 500 GETs run: none fails (a GET is retried on the
/// other replica), the dead replica's circuit opens; started again on its port, it is probed
/// back into service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_process_killed_by_sigkill_during_500_gets_fails_none_and_comes_back() {
    let env = kit::testing::TestEnv::new(kit::testing::Backend::Postgres).await;
    let settings = &env.settings;
    let users_schema = settings.service("users").schema.expect("a test schema");
    let dir = tempfile::tempdir().expect("temp dir");
    let command = |args: &[&str]| {
        let mut command = agora(dir.path());
        command
            .args(args)
            .env(
                "DATABASE_URL",
                settings.database.url.as_deref().expect("pg url"),
            )
            .env("AGORA_SERVICES__USERS__SCHEMA", &users_schema)
            .env("AGORA_SERVICES__USERS__METRICS_PORT", "0")
            .env("AGORA_SERVICES__GATEWAY__METRICS_PORT", "0")
            .env("AGORA_AUTH__MODE", "open")
            .env(
                "AGORA_AUTH__JWT_SECRET",
                "replica-test-jwt-secret-0123456789abcdef",
            )
            .env(
                "AGORA_AUTH__SERVICE_TOKEN",
                "replica-test-service-token-0123456789ab",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        command
    };
    let start_users = |port: &str| {
        let mut child = command(&["serve", "users", "--port", port])
            .spawn()
            .expect("users starts");
        let (addr, _) = listening_and_metrics(&mut child);
        (child, addr)
    };
    let (mut survivor, survivor_addr) = start_users("0");
    let (mut victim, victim_addr) = start_users("0");
    let mut gateway = command(&["serve", "gateway", "--port", "0"])
        .env(
            "AGORA_SERVICES__USERS__UPSTREAMS",
            format!("[\"http://{survivor_addr}\", \"http://{victim_addr}\"]"),
        )
        .env("AGORA_SERVICES__GATEWAY__HEALTH_CHECK__INTERVAL_MS", "1000")
        .env("AGORA_SERVICES__GATEWAY__CIRCUIT_BREAKER__FAILURES", "3")
        .env("AGORA_SERVICES__GATEWAY__CIRCUIT_BREAKER__OPEN_MS", "500")
        .spawn()
        .expect("gateway starts");
    let (gateway_addr, gateway_metrics) = listening_and_metrics(&mut gateway);
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{gateway_addr}/api/v1/users"))
        .json(&json!({"name": "Replicated"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 201);
    let user: Value = response.json().await.expect("json");
    let url = format!("http://{gateway_addr}/api/v1/users/{}", user["id"]);

    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (url, sent) = (url.clone(), sent.clone());
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
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = Command::new("kill")
        .args(["-KILL", &victim.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGKILL was delivered");
    victim.wait().expect("the victim is reaped");
    let mut failures = Vec::new();
    while let Some(result) = clients.join_next().await {
        failures.extend(result.expect("client"));
    }
    assert!(
        sent.load(std::sync::atomic::Ordering::SeqCst) == 500,
        "500 GETs sent"
    );
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let metrics_url = format!("http://{gateway_metrics}/metrics");
    let label = format!("upstream=\"http://{victim_addr}\"");
    let metrics = || async {
        client
            .get(&metrics_url)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    // The dead replica is taken out: its circuit opened (forwards failed), or the health check
    // marked it down first.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics().await;
        let opened = series(&text, "agora_gateway_circuit_opened_total", &[&label])
            .is_some_and(|n| n >= 1.0);
        if opened {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead replica's circuit opened:\n{text}"
        );
        assert_eq!(client.get(&url).send().await.expect("get").status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back on its port: healthy again, circuit closed, serving.
    let served_before = series(
        &metrics().await,
        "agora_gateway_upstream_requests_total",
        &[&label, "status=\"200\""],
    )
    .unwrap_or(0.0);
    let port = victim_addr.rsplit(':').next().expect("a port").to_owned();
    let (mut back, _) = start_users(&port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(client.get(&url).send().await.expect("get").status(), 200);
        let text = metrics().await;
        let closed = series(&text, "agora_gateway_circuit_state", &[&label]) == Some(0.0);
        let healthy = series(&text, "agora_gateway_upstream_healthy", &[&label]) == Some(1.0);
        let served = series(
            &text,
            "agora_gateway_upstream_requests_total",
            &[&label, "status=\"200\""],
        );
        if closed && healthy && served.is_some_and(|n| n > served_before) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica is back in service:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for child in [&mut gateway, &mut back, &mut survivor] {
        let status = terminate(child);
        assert!(status.success(), "clean exit: {status}");
    }
}
