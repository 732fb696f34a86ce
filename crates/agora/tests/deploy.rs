//! The shipped Dockerfile, compose file and Kubernetes manifests (no Docker engine or cluster
//! runs here): they parse, they run every service on the port its config gives it, and every
//! variable they set is one the binary accepts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn repo_file(path: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `(service, port)` for every service of the default configuration.
fn services() -> Vec<(String, u16)> {
    kit::Settings::defaults()
        .services
        .iter()
        .map(|(name, s)| (name.clone(), s.port))
        .collect()
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Compose's `${NAME:?message}` interpolation, with a test value for each variable (the keys are
/// never in the file).
fn interpolate(env: &mut BTreeMap<String, String>) {
    for value in env.values_mut() {
        if let Some(name) = value
            .strip_prefix("${")
            .and_then(|rest| rest.split_once(":?"))
            .map(|(name, _)| name.to_owned())
        {
            *value = format!("test-value-of-{name}-0123456789abcdef");
        }
    }
}

/// Both keys set and auth required (printed hidden by `agora config`).
fn assert_auth(name: &str, env: &BTreeMap<String, String>, config: &toml::Value) {
    assert_eq!(
        env.get("AGORA_AUTH__MODE").map(String::as_str),
        Some("required"),
        "{name}"
    );
    let auth = &config["auth"];
    assert_eq!(auth["mode"].as_str(), Some("required"), "{name}");
    for key in ["jwt_secret", "service_token"] {
        assert_eq!(
            auth[key].as_str(),
            Some("***"),
            "{name}: auth.{key} set, and hidden"
        );
    }
}

fn env_map(value: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Some(map) = value.as_mapping() {
        for (k, v) in map {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    if let Some(list) = value.as_sequence() {
        for item in list {
            if let (Some(k), Some(v)) = (item["name"].as_str(), item["value"].as_str()) {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    env
}

/// Runs `agora config` with `env` and returns the effective settings (fails on an unknown key
/// or a bad value, naming it).
fn effective_config(env: &BTreeMap<String, String>) -> toml::Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new(env!("CARGO_BIN_EXE_agora"));
    command
        .arg("config")
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("NATS_URL");
    for (key, _) in std::env::vars() {
        if key.starts_with("AGORA_") {
            command.env_remove(key);
        }
    }
    let output = command.envs(env).output().expect("agora config runs");
    assert!(
        output.status.success(),
        "{env:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&output.stdout)).expect("config prints TOML")
}

#[test]
fn compose_runs_every_service_on_its_port_with_valid_settings() {
    let mut compose: Value =
        serde_yaml::from_str(&repo_file("deploy/docker-compose.yml")).expect("compose parses");
    compose.apply_merge().expect("YAML merge keys resolve");
    let compose_services = &compose["services"];
    for backing in ["postgres", "redis", "nats"] {
        assert!(
            compose_services.get(backing).is_some(),
            "compose runs {backing}"
        );
    }
    // Redis is a cache here: bounded, evicting (never refusing writes), nothing on disk.
    let redis = string_list(&compose_services["redis"]["command"]).join(" ");
    assert!(
        redis.contains("--maxmemory ") && redis.contains("--maxmemory-policy allkeys-lru"),
        "{redis}"
    );
    for (name, port) in services() {
        let service = compose_services
            .get(name.as_str())
            .unwrap_or_else(|| panic!("compose has no `{name}`"));
        let command = string_list(&service["command"]);
        assert_eq!(
            command,
            ["serve", name.as_str(), "--port", &port.to_string()],
            "{name}"
        );
        let mut env = env_map(&service["environment"]);
        for key in ["AGORA_AUTH__JWT_SECRET", "AGORA_AUTH__SERVICE_TOKEN"] {
            assert!(
                env.get(key)
                    .is_some_and(|v| v.starts_with("${") && v.contains(":?")),
                "{name}: {key} comes from the environment, required: {env:?}"
            );
        }
        interpolate(&mut env);
        assert_eq!(
            env.get("AGORA_HOST").map(String::as_str),
            Some("0.0.0.0"),
            "{name} listens beyond loopback"
        );
        assert!(
            env.get("DATABASE_URL")
                .is_some_and(|u| u.starts_with("postgres://")),
            "{name}: {env:?}"
        );
        assert!(
            env.get("REDIS_URL")
                .is_some_and(|u| u.starts_with("redis://")),
            "{name}: {env:?}"
        );
        let config = effective_config(&env);
        assert_eq!(config["host"].as_str(), Some("0.0.0.0"));
        assert_auth(&name, &env, &config);
        // /metrics on the private port (port + offset), reachable in the network, not published.
        let metrics_port = port + 1000;
        assert_eq!(
            config["metrics"]["host"].as_str(),
            Some("0.0.0.0"),
            "{name}"
        );
        assert_eq!(
            config["metrics"]["port_offset"].as_integer(),
            Some(1000),
            "{name}"
        );
        assert!(
            string_list(&service["expose"]).contains(&metrics_port.to_string()),
            "{name} exposes its metrics port {metrics_port} to the network"
        );
        assert!(
            !string_list(&service["ports"])
                .iter()
                .any(|p| p.contains(&metrics_port.to_string())),
            "{name}: metrics are never published on the host"
        );
        assert!(
            env.get("NATS_URL")
                .is_some_and(|u| u.starts_with("nats://")),
            "{name}: {env:?}"
        );
        if name == "gateway" {
            for (backend, port) in services().into_iter().filter(|(n, _)| n != "gateway") {
                let upstreams = config["services"][backend.as_str()]["upstreams"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{backend} upstreams"));
                assert_eq!(
                    upstreams[0].as_str(),
                    Some(format!("http://{backend}:{port}/").as_str()),
                    "the gateway finds {backend} by its compose name"
                );
            }
            assert!(string_list(&service["ports"]).contains(&"8080:8080".to_owned()));
        }
    }
    let dockerfile = repo_file("deploy/Dockerfile");
    assert!(dockerfile.contains("--bin agora") && dockerfile.contains("ENTRYPOINT [\"agora\"]"));
    for (_, port) in services() {
        assert!(
            dockerfile.contains(&port.to_string()),
            "the image exposes {port}"
        );
    }
}

#[test]
fn kubernetes_has_a_deployment_and_service_per_service() {
    let text = repo_file("deploy/k8s/agora.yaml");
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::with::singleton_map_recursive::deserialize(doc).expect("manifest parses")
        })
        .collect();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| {
                d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap_or_else(|| panic!("no {kind} `{name}`"))
    };
    let secret = env_map(&find("Secret", "agora")["stringData"]);
    for key in [
        "DATABASE_URL",
        "REDIS_URL",
        "NATS_URL",
        "AGORA_AUTH__JWT_SECRET",
        "AGORA_AUTH__SERVICE_TOKEN",
    ] {
        assert!(secret.contains_key(key), "the secret sets {key}");
    }
    for (name, port) in services() {
        let container = &find("Deployment", &name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            string_list(&container["args"]),
            ["serve", name.as_str(), "--port", &port.to_string()],
            "{name}"
        );
        assert_eq!(
            container["ports"][0]["containerPort"].as_u64(),
            Some(u64::from(port)),
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["port"].as_u64(),
            Some(u64::from(port)),
            "{name}"
        );
        let service = find("Service", &name);
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"].as_u64(),
            Some(u64::from(port)),
            "{name}"
        );
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"].as_str(),
            Some("/ready"),
            "{name}"
        );
        // Liveness must not follow the dependencies (or shutdown): a database outage would
        // restart every pod.
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"].as_str(),
            Some("/health"),
            "{name}"
        );
        let mut env = env_map(&container["env"]);
        env.extend(secret.clone());
        let config = effective_config(&env);
        assert_eq!(config["host"].as_str(), Some("0.0.0.0"), "{name}");
        // Prometheus scrapes the private metrics port, named and annotated.
        let metrics_port = u64::from(port) + 1000;
        assert_eq!(
            config["metrics"]["host"].as_str(),
            Some("0.0.0.0"),
            "{name}"
        );
        assert_eq!(
            config["metrics"]["port_offset"].as_integer(),
            Some(1000),
            "{name}"
        );
        assert_eq!(
            container["ports"][1]["containerPort"].as_u64(),
            Some(metrics_port),
            "{name}"
        );
        assert_eq!(container["ports"][1]["name"].as_str(), Some("metrics"));
        let annotations = &find("Deployment", &name)["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
        assert_eq!(
            annotations["prometheus.io/port"].as_str(),
            Some(metrics_port.to_string().as_str()),
            "{name}"
        );
        assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
        assert_auth(&name, &env, &config);
        // Drain + grace + closing fit in the pod's termination period.
        let http = &config["http"];
        let stop_secs = http["shutdown_drain_secs"].as_integer().expect("drain")
            + http["shutdown_grace_secs"].as_integer().expect("grace")
            + 7;
        let period =
            find("Deployment", &name)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(30);
        assert!(
            http["shutdown_drain_secs"].as_integer() > Some(0) && stop_secs <= period,
            "{name}: drain {:?}, stop within {stop_secs} s of a {period} s period",
            http["shutdown_drain_secs"]
        );
    }
}
