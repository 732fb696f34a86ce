//! The merged OpenAPI document (`/openapi.json` at the gateway) and Swagger UI (`/docs`): valid
//! OpenAPI 3.1 (the official JSON Schema, vendored in `tests/openapi/`), complete (every route
//! of the route table and of every service's router is documented, so a new route without docs
//! fails here), every example accepted by the running system (users, catalog and orders behind
//! the gateway, on SQLite), and Swagger UI rendered by headless Chromium without network access.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gateway::openapi::{self, operations, own_paths, public_paths, service_documents};
use gateway::routes::{GatewaySettings, RouteTable};
use kit::auth::AuthMode;
use kit::service::Deps;
use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::Value;
use url::Url;

/// The official OpenAPI 3.1 schema (spec.openapis.org/oas/3.1/schema/2022-10-07, Apache-2.0,
/// as shipped by the `openapi-spec-validator` package).
const OAS_31_SCHEMA: &str = include_str!("openapi/oas-3.1-schema-2022-10-07.json");

struct System {
    gateway: TestServer,
    servers: Vec<TestServer>,
    _env: TestEnv,
}

/// Users, catalog, orders, notify and cache (catalog's and orders' seed data loaded: products
/// 1-10, 11 and 123, orders 1-8; no users, the examples create them; notification 1, a failed
/// delivery, for the examples' retry and reads) behind the gateway, on SQLite.
async fn spawn_system(mode: AuthMode) -> System {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.auth.mode = Some(mode);
    let start = |service: &'static kit::service::Service, settings: kit::Settings| async move {
        let deps = Deps::connect(service, &settings, None)
            .await
            .expect("SQLite is available");
        // Users start empty: the examples create them (seed 004's Alice is user 1).
        if let Some(seed) = service.seed.filter(|_| service.name != users::NAME) {
            seed(deps.clone()).await.expect("seed data");
        }
        if service.name == notify::NAME {
            let at = "2026-01-01T00:00:00Z";
            kit::db::query(
                "insert into notifications (event_id, event_type, channel, recipient, subject, \
                 body, payload, status, attempts, last_error, next_attempt_at, created_at, \
                 updated_at) values ('openapi-example', 'user.registered', 'log', 'user:1', \
                 'Welcome', 'Welcome', '{}', 'failed', 1, 'example', $1, $1, $1)",
            )
            .bind(at)
            .execute(&deps.db().expect("notify's database"))
            .await
            .expect("notification 1");
        }
        let app = (service.build)(deps).await.expect("app");
        TestServer::start(app, &settings).await
    };
    let url = |server: &TestServer| Url::parse(&server.url("")).expect("url");
    let mut upstreams = BTreeMap::new();
    let mut servers = Vec::new();
    for service in [&catalog::SERVICE, &users::SERVICE] {
        let server = start(service, env.settings.clone()).await;
        env.settings
            .services
            .entry(service.name.into())
            .or_default()
            .upstreams = vec![url(&server)];
        upstreams.insert(service.name.to_owned(), vec![url(&server)]);
        servers.push(server);
    }
    // Orders calls users and catalog at the addresses above.
    let orders = start(&orders::SERVICE, env.settings.clone()).await;
    upstreams.insert("orders".to_owned(), vec![url(&orders)]);
    servers.push(orders);
    for service in [&notify::SERVICE, &cachesvc::SERVICE, &chat::SERVICE] {
        let server = start(service, env.settings.clone()).await;
        upstreams.insert(service.name.to_owned(), vec![url(&server)]);
        servers.push(server);
    }
    let gateway = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
    System {
        gateway: TestServer::start(gateway, &env.settings).await,
        servers,
        _env: env,
    }
}

fn route_table() -> RouteTable {
    let settings = GatewaySettings::load(&kit::Settings::defaults()).expect("default routes");
    RouteTable::new(settings.routes)
}

fn validation_errors(doc: &Value) -> Vec<String> {
    let schema: Value = serde_json::from_str(OAS_31_SCHEMA).expect("the vendored schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the OpenAPI 3.1 schema compiles");
    validator
        .iter_errors(doc)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect()
}

#[tokio::test]
async fn merged_document_is_valid_openapi_3_1() {
    let system = spawn_system(AuthMode::Open).await;
    let (status, doc) = system.gateway.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{}",
        doc["openapi"]
    );
    let kept = artifacts_dir().join("openapi.json");
    std::fs::write(&kept, serde_json::to_vec_pretty(&doc).expect("json")).expect("kept");
    println!("merged document: {}", kept.display());
    let errors = validation_errors(&doc);
    assert!(
        errors.is_empty(),
        "not valid OpenAPI 3.1:\n{}",
        errors.join("\n")
    );
    // In `required` mode too (the bearer scheme on the routes that need it).
    let required = openapi::merge(&route_table(), AuthMode::Required, service_documents());
    assert!(required.conflicts.is_empty(), "{:?}", required.conflicts);
    let errors = validation_errors(&required.document);
    assert!(errors.is_empty(), "required mode:\n{}", errors.join("\n"));
    let scheme = &required.document["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&"http".into(), &"bearer".into())
    );
    let post_product = &required.document["paths"]["/api/v1/products"]["post"];
    assert_eq!(post_product["security"][0]["bearer"], serde_json::json!([]));
    assert!(post_product["responses"]["403"].is_object());
    let list_products = &required.document["paths"]["/api/v1/products"]["get"];
    assert!(
        list_products.get("security").is_none(),
        "catalog reads are public"
    );
    // Each service serves its own document, valid as well.
    for server in &system.servers {
        let (status, own) = server.get_json("/openapi.json").await;
        assert_eq!(status, 200);
        let errors = validation_errors(&own);
        assert!(
            errors.is_empty(),
            "{}:\n{}",
            own["info"]["title"],
            errors.join("\n")
        );
    }
    // Unique operation ids; every error response a problem body.
    let mut ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        assert!(!path.starts_with("/internal/"), "{path} is internal");
        for (method, operation) in item.as_object().expect("path item") {
            let id = operation["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            for (code, response) in operation["responses"].as_object().expect("responses") {
                if code.starts_with('4') || code.starts_with('5') {
                    let content = response["content"].as_object().expect("content");
                    let problem = &content.get("application/problem+json");
                    let json = &content.get("application/json");
                    assert!(
                        problem
                            .is_some_and(|p| p["schema"]["$ref"] == "#/components/schemas/Problem")
                            || json.is_some(),
                        "{method} {path} {code}: {response}"
                    );
                }
            }
        }
    }
}

/// The `.route("path", get(..).post(..))` calls in a crate's sources: (METHOD, path).
fn declared_routes(dir: &Path) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("src dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source");
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            let call = balanced(rest);
            let Some(path) = call
                .trim_start()
                .strip_prefix('"')
                .and_then(|s| s.split('"').next())
            else {
                continue;
            };
            let after_path = &call[call.find(path).unwrap_or(0) + path.len()..];
            for method in ["get", "post", "put", "patch", "delete", "head"] {
                let token = format!("{method}(");
                let found = after_path.match_indices(&token).any(|(i, _)| {
                    i == 0
                        || !after_path.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && after_path.as_bytes()[i - 1] != b'_'
                });
                if found {
                    routes.insert((method.to_uppercase(), path.to_owned()));
                }
            }
        }
    }
    routes
}

/// The text up to the parenthesis closing the one just opened.
fn balanced(text: &str) -> &str {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[..i];
                }
            }
            _ => {}
        }
    }
    text
}

fn crate_src(name: &str) -> PathBuf {
    // The cache service's crate is `cachesvc`.
    let dir = if name == cachesvc::NAME {
        "cachesvc"
    } else {
        name
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join("src")
}

#[test]
fn merged_document_lists_every_route_the_gateway_serves() {
    let table = route_table();
    let merged = openapi::merge(&table, AuthMode::Open, service_documents());
    let doc = &merged.document;
    let documented: BTreeSet<(String, String)> = operations(doc).into_iter().collect();
    let documents: BTreeMap<&str, Value> = service_documents().into_iter().collect();
    let own = own_paths();
    let mut missing = Vec::new();
    // Every service the table routes to has a document.
    for service in table.services() {
        if !documents.contains_key(service) {
            missing.push(format!("service `{service}` has no OpenAPI document"));
        }
    }
    // Every route a service's router declares is in its document, and at its public path in the
    // merged one (unless no route of the table reaches it).
    for (service, own_doc) in &documents {
        let in_own: BTreeSet<(String, String)> = operations(own_doc).into_iter().collect();
        for (method, path) in declared_routes(&crate_src(service)) {
            if !in_own.contains(&(method.clone(), path.clone())) {
                missing.push(format!("{service}: {method} {path} is not in its document"));
            }
        }
        for (method, path) in &in_own {
            let public = public_paths(&table, service, path, &own);
            if let Some(canonical) = public.first()
                && !documented.contains(&(method.clone(), canonical.clone()))
            {
                missing.push(format!("{service}: {method} {path} is not at {canonical}"));
            }
        }
    }
    // The gateway's own routes.
    for (method, path) in declared_routes(&crate_src("gateway")) {
        if !documented.contains(&(method.clone(), path.clone())) {
            missing.push(format!("gateway: {method} {path} is not documented"));
        }
    }
    // Every prefix of the route table reaches something documented.
    for route in table.routes() {
        let prefix = route.prefix.trim_end_matches('/');
        let covered = documented
            .iter()
            .any(|(_, path)| path == prefix || path.starts_with(&format!("{prefix}/")))
            || doc["paths"]
                .as_object()
                .into_iter()
                .flatten()
                .any(|(_, item)| {
                    item.as_object().into_iter().flatten().any(|(_, op)| {
                        op["x-agora-aliases"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|a| {
                                a.as_str().is_some_and(|a| {
                                    a == prefix || a.starts_with(&format!("{prefix}/"))
                                })
                            })
                    })
                });
        if !covered {
            missing.push(format!(
                "route `{prefix}` ({}) has no documented path",
                route.service
            ));
        }
    }
    // And nothing documented that the gateway does not serve.
    for (method, path) in &documented {
        let served = own.contains(path) || table.resolve(path).is_some();
        if !served || path.starts_with("/internal/") {
            missing.push(format!("{method} {path} is documented but not served"));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    assert!(documented.len() > 25, "{documented:?}");
    // Internal routes are in their service's own document only, and so are their schemas.
    assert!(documents["catalog"]["paths"]["/internal/v1/reservations"]["post"].is_object());
    assert!(doc["components"]["schemas"].get("ReserveBody").is_none());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
}

/// When an operation's example runs: creates first (users before the orders that name them,
/// register before login), then other writes, reads, changes, deletes last.
fn phase(method: &str, path: &str) -> u8 {
    match (method, path) {
        ("POST", "/api/v1/users" | "/api/v1/auth/register") => 0,
        ("POST", "/api/v1/auth/login") => 1,
        ("POST", _) => 2,
        ("GET" | "HEAD", _) => 3,
        ("PUT" | "PATCH", _) => 4,
        _ => 5,
    }
}

/// `path` with its path parameters' examples, and the query of the parameters that have one.
fn example_url(path: &str, operation: &Value) -> Result<String, String> {
    let mut url = path.to_owned();
    let mut query = Vec::new();
    for param in operation["parameters"].as_array().into_iter().flatten() {
        let name = param["name"].as_str().unwrap_or_default();
        let example = param
            .get("example")
            .or_else(|| param["schema"].get("example"))
            .or_else(|| param["schema"]["examples"].get(0));
        let text = match example {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        match param["in"].as_str() {
            Some("path") if text.is_empty() => {
                return Err(format!("path parameter `{name}` has no example"));
            }
            Some("path") => url = url.replace(&format!("{{{name}}}"), &text),
            Some("query") if !text.is_empty() => query.push(format!("{name}={text}")),
            _ => {}
        }
    }
    if !query.is_empty() {
        url = format!("{url}?{}", query.join("&"));
    }
    Ok(url)
}

#[tokio::test]
async fn every_example_is_accepted_by_the_running_system() {
    let system = spawn_system(AuthMode::Open).await;
    let (_, doc) = system.gateway.get_json("/openapi.json").await;
    let mut calls = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("item") {
            let method = method.to_uppercase();
            let examples: Vec<(String, Value)> =
                operation["requestBody"]["content"]["application/json"]["examples"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, e)| (name.clone(), e["value"].clone()))
                    .collect();
            let mut paths = vec![path.clone()];
            if method == "GET" {
                // Reads at every seed spelling too.
                let aliases = operation["x-agora-aliases"]
                    .as_array()
                    .into_iter()
                    .flatten();
                paths.extend(aliases.filter_map(|a| a.as_str().map(str::to_owned)));
            }
            for path in paths {
                if examples.is_empty() {
                    calls.push((
                        phase(&method, &path),
                        method.clone(),
                        path.clone(),
                        None,
                        operation.clone(),
                    ));
                }
                for (name, body) in &examples {
                    let call = (name.clone(), body.clone());
                    calls.push((
                        phase(&method, &path),
                        method.clone(),
                        path.clone(),
                        Some(call),
                        operation.clone(),
                    ));
                }
            }
        }
    }
    calls.sort_by_key(|(phase, ..)| *phase);
    let client = reqwest::Client::new();
    let mut token: Option<String> = None;
    let mut failures = Vec::new();
    let mut sent = 0;
    for (_, method, path, example, operation) in calls {
        let url = match example_url(&path, &operation) {
            Ok(url) => url,
            Err(err) => {
                failures.push(format!("{method} {path}: {err}"));
                continue;
            }
        };
        let mut request = client.request(
            reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
            system.gateway.url(&url),
        );
        if path.ends_with("/users/me")
            && let Some(token) = &token
        {
            request = request.bearer_auth(token);
        }
        // A WebSocket route (its success is 101) is called as an upgrade.
        let websocket = operation["responses"].get("101").is_some();
        if websocket {
            request = request
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        let label = match &example {
            Some((name, body)) => {
                request = request.json(body);
                format!("{method} {url} (example `{name}`)")
            }
            None => format!("{method} {url}"),
        };
        let response = request.send().await.expect("sent");
        sent += 1;
        let status = response.status().as_u16().to_string();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if path == "/api/v1/auth/login" {
            token = body["access_token"].as_str().map(str::to_owned);
        }
        let documented: Vec<&String> = operation["responses"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(code, _)| code)
            .filter(|code| code.starts_with('2') || (websocket && *code == "101"))
            .collect();
        if !documented.contains(&&status) {
            failures.push(format!(
                "{label}: {status} (documented {documented:?}): {body}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} calls:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(sent > 30, "only {sent} calls");
}

/// Chromium as installed by `scripts/chromium` (Debian's `chromium`), or `$CHROMIUM`.
fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join(name))
                        .collect::<Vec<PathBuf>>()
                })
                .unwrap_or_default()
        })
        .find(|path| path.is_file())
}

/// Where test artifacts are kept: `$CARGO_TARGET_DIR/artifacts` (or `target/artifacts`).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Runs headless Chromium on `url` with every non-loopback host unreachable (a dead proxy for
/// everything but loopback, and no DNS), returning its stdout.
async fn run_chromium(binary: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    let mut command = tokio::process::Command::new(binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Loopback is reached directly (Chromium never proxies it); anything else goes to
            // a port nobody listens on, and cannot even be resolved.
            "--proxy-server=http://127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--window-size=1280,2400",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("chromium finishes in 120 s")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn docs_render_in_headless_chromium_offline() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and Chromium is missing: scripts/test installs it (scripts/chromium)"
        );
        eprintln!("SKIPPED: Chromium is not installed (run scripts/chromium); CI fails here");
        return;
    };
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = gateway::app_with_upstreams(&env.settings, BTreeMap::new()).expect("gateway");
    let gateway = TestServer::start(app, &env.settings).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let url = gateway.url("/docs/");
    let dom = run_chromium(&binary, profile.path(), &["--dump-dom".to_owned()], &url).await;
    let artifacts = artifacts_dir();
    std::fs::write(artifacts.join("docs.html"), &dom).expect("dom kept");
    // Swagger UI ran (its script is inside the binary) and rendered the merged document: its
    // title and operations are in the DOM, not just the empty page.
    for expected in [
        "swagger-ui",
        "opblock",
        "Agora",
        "/api/v1/users/{id}",
        "/api/v1/products",
        "/api/v1/orders",
        "/api/v1/auth/login",
    ] {
        assert!(
            dom.contains(expected),
            "`{expected}` is not in the rendered page (kept in {})",
            artifacts.join("docs.html").display()
        );
    }
    let screenshot = artifacts.join("docs.png");
    let _ = std::fs::remove_file(&screenshot);
    run_chromium(
        &binary,
        profile.path(),
        &[format!("--screenshot={}", screenshot.display())],
        &url,
    )
    .await;
    let png = std::fs::read(&screenshot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("Swagger UI screenshot: {}", screenshot.display());
    eprintln!("Swagger UI screenshot: {}", screenshot.display());
    gateway.stop().await;
}

#[tokio::test]
async fn docs_are_public_in_required_mode_and_show_the_bearer_scheme() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.auth.mode = Some(AuthMode::Required);
    let app = gateway::app_with_upstreams(&env.settings, BTreeMap::new()).expect("gateway");
    let gateway = TestServer::start(app, &env.settings).await;
    let (status, doc) = gateway.get_json("/openapi.json").await;
    assert_eq!(status, 200, "no token needed: {doc}");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/api/v1/orders"]["post"]["security"],
        serde_json::json!([{"bearer": []}])
    );
    let page = gateway.get("/docs/").await;
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("swagger-ui"));
    // `/docs` redirects to `/docs/`, where the UI's assets are.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let redirect = client.get(gateway.url("/docs")).send().await.expect("sent");
    assert!(redirect.status().is_redirection(), "{}", redirect.status());
    gateway.stop().await;
}
