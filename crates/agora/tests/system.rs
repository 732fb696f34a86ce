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
    assert!(
        String::from_utf8_lossy(&seeded.stdout).contains("4 added"),
        "{}",
        String::from_utf8_lossy(&seeded.stdout)
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
    assert_eq!(erin["id"], 5, "new ids continue after the seeded ones");
    let fetched: Value = get_json(
        &client,
        format!("http://127.0.0.1:8080/users/id/{}", erin["id"]),
    )
    .await;
    assert_eq!(fetched, erin);

    let status = terminate(&mut child);
    let mut out = String::new();
    child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    assert!(
        out.contains("gateway") && out.contains("127.0.0.1:8080"),
        "up prints where services listen: {out}"
    );
    assert!(
        dir.path().join("data/users.db").exists(),
        "SQLite file under ./data"
    );
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

/// The distributed mode: `agora serve users` and `agora serve gateway` as separate processes on
/// PostgreSQL + Redis, the gateway finding users through `services.users.upstreams`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_service_per_process_on_postgres_and_redis() {
    let env = kit::testing::TestEnv::new(kit::testing::Backend::Postgres).await;
    let settings = &env.settings;
    let schema = settings.service("users").schema.expect("a test schema");
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
            .env("AGORA_REDIS__PREFIX", &settings.redis.prefix)
            .env("AGORA_SERVICES__USERS__SCHEMA", &schema)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut users = agora(dir.path());
    configure(users.args(["serve", "users", "--port", "0"]));
    let mut users = users.spawn().expect("users starts");
    let users_addr = listening_addr(&mut users);

    let mut gateway = agora(dir.path());
    configure(gateway.args(["serve", "gateway", "--port", "0"]));
    gateway.env(
        "AGORA_SERVICES__USERS__UPSTREAMS",
        format!("[\"http://{users_addr}\"]"),
    );
    let mut gateway = gateway.spawn().expect("gateway starts");
    let gateway_addr = listening_addr(&mut gateway);

    let client = reqwest::Client::new();
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
    let health: Value = get_json(&client, format!("http://{gateway_addr}/health")).await;
    assert_eq!(health["services"]["users"]["status"], "up", "{health}");

    for child in [&mut gateway, &mut users] {
        let status = terminate(child);
        assert!(status.success(), "clean exit: {status}");
    }
}
