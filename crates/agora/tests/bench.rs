//! `agora bench` end to end: it starts its own `agora up`, measures one scenario and prints the
//! table. No timing is asserted (a benchmark reports figures; it never passes or fails on them):
//! only that the row is there, with requests and without errors.

use std::process::Command;

const AGORA: &str = env!("CARGO_BIN_EXE_agora");

#[test]
fn bench_measures_a_scenario_against_a_system_it_starts() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Below the ephemeral range, apart per test process (the bench uses base .. base + 1206).
    let base_port = 20_000 + (std::process::id() % 50) * 20;
    let output = Command::new(AGORA)
        .current_dir(dir.path())
        .args(["bench", "--seconds", "1", "--connections", "2"])
        .args(["--scenario", "cached-get-direct", "--users", "20"])
        .args(["--base-port", &base_port.to_string()])
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("NATS_URL")
        .output()
        .expect("agora bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}:\n{stdout}\n{stderr}",
        output.status
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| cached-get-direct |"))
        .unwrap_or_else(|| panic!("no cached-get-direct row in:\n{stdout}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // | scenario | conns | req/s | p50 | p99 | p99.9 | errors | ...
    assert_eq!(cells[2], "2", "connections: {row}");
    let per_second: f64 = cells[3].parse().unwrap_or_else(|_| panic!("req/s: {row}"));
    assert!(per_second > 0.0, "requests were answered: {row}");
    assert_eq!(cells[7], "0", "no errors: {row}\n{stdout}");
    assert!(
        row.contains("agora up"),
        "the CPU of the agora up process is reported: {row}"
    );
}

#[test]
fn bench_refuses_a_non_loopback_system() {
    let output = Command::new(AGORA)
        .args(["bench", "--url", "http://192.0.2.1:8080", "--seconds", "1"])
        .output()
        .expect("agora bench runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback only"), "{stderr}");
}

#[test]
fn bench_orders_and_cache_are_still_there() {
    for sub in ["orders", "cache"] {
        let output = Command::new(AGORA)
            .args(["bench", sub, "--help"])
            .output()
            .expect("agora bench --help runs");
        assert!(output.status.success(), "bench {sub} --help");
    }
}
