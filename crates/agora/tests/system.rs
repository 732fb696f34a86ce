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

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGTERM was delivered");
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
    let alice: Value = client
        .get("http://127.0.0.1:8080/api/v1/users/1")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
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
    let fetched: Value = client
        .get(format!("http://127.0.0.1:8080/users/id/{}", erin["id"]))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(fetched, erin);

    terminate(&child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agora up did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
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
