//! `spawn_chat`: the chat service of one test on a free port, with its own SQLite dir, PostgreSQL
//! schema + Redis prefix + NATS stream, or DynamoDB table prefix; and the gateway in front when
//! asked for. A store that cannot be reached fails the test, it never skips.

use kit::service::{Deps, Shared};
use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::{Value, json};

/// Where the test's chats live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
    Dynamodb,
}

pub fn test_dynamodb_url() -> String {
    std::env::var("TEST_DYNAMODB_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// Sets `[services.chat] key = value`.
pub fn configure(env: &mut TestEnv, key: &str, value: Value) {
    env.settings
        .services
        .entry("chat".into())
        .or_default()
        .extra
        .insert(
            key.into(),
            figment::value::Value::serialize(value).expect("a config value"),
        );
}

/// A test environment for `store`: DynamoDB runs with SQLite and the in-process bus beside it,
/// its tables prefixed for this test only.
pub async fn env(store: Store) -> TestEnv {
    let backend = match store {
        Store::Postgres => Backend::Postgres,
        Store::Sqlite | Store::Dynamodb => Backend::Sqlite,
    };
    let mut env = TestEnv::new(backend).await;
    if store == Store::Dynamodb {
        let url = test_dynamodb_url();
        let reachable = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            reqwest::Client::new().get(&url).send(),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        assert!(
            reachable,
            "DynamoDB for tests is not reachable at {url} (TEST_DYNAMODB_URL): run scripts/services \
             (it installs and starts moto's server)"
        );
        let prefix = format!("t{}_", uuid::Uuid::new_v4().simple());
        configure(&mut env, "store", json!("dynamodb"));
        configure(
            &mut env,
            "dynamodb",
            json!({"endpoint": url, "region": "us-east-1", "table_prefix": prefix, "relay_poll_ms": 100}),
        );
    }
    env
}

/// One chat replica in `env` (sharing the process's bus when `shared` is given).
pub async fn start_chat(env: &TestEnv, shared: Option<&Shared>) -> TestServer {
    let deps = Deps::connect(&chat::SERVICE, &env.settings, shared)
        .await
        .expect("the test database, Redis and NATS are reachable");
    let app = (chat::SERVICE.build)(deps)
        .await
        .expect("the chat service starts (DynamoDB reachable?)");
    TestServer::start(app, &env.settings).await
}

pub struct TestChat {
    pub server: TestServer,
    /// Kept for the life of the test (its temp dir, its settings).
    _env: TestEnv,
}

impl std::ops::Deref for TestChat {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

pub async fn spawn_chat(store: Store) -> TestChat {
    let env = env(store).await;
    let server = start_chat(&env, None).await;
    TestChat { server, _env: env }
}

/// The chat service behind the gateway.
pub struct System {
    pub gateway: TestServer,
    _chat: TestServer,
    pub env: TestEnv,
}

impl std::ops::Deref for System {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.gateway
    }
}

pub async fn spawn_system(store: Store, mode: Option<kit::auth::AuthMode>) -> System {
    let mut env = env(store).await;
    if let Some(mode) = mode {
        env.settings.auth.mode = Some(mode);
    }
    let chat = start_chat(&env, None).await;
    env.settings
        .services
        .entry("chat".into())
        .or_default()
        .upstreams = vec![url::Url::parse(&chat.url("")).expect("url")];
    // The gateway in front of chat only (its /health then reports chat alone).
    let upstreams = std::collections::BTreeMap::from([(
        "chat".to_owned(),
        vec![url::Url::parse(&chat.url("")).expect("url")],
    )]);
    let app = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
    let gateway = TestServer::start(app, &env.settings).await;
    System {
        gateway,
        _chat: chat,
        env,
    }
}

/// Creates a chat; returns its id.
pub async fn create_chat(server: &TestServer, prefix: &str, name: &str) -> String {
    let response = server
        .post(
            &format!("{prefix}/chats"),
            json!({"name": name, "metadata": {"type": "project"}}),
        )
        .await;
    assert_eq!(response.status(), 201, "creating {name}");
    let chat: Value = response.json().await.expect("chat");
    chat["id"].as_str().expect("id").to_owned()
}

pub async fn add(server: &TestServer, prefix: &str, chat: &str, ids: &[&str]) -> Value {
    let response = server
        .post(
            &format!("{prefix}/chats/{chat}/participants"),
            json!({ "participant_ids": ids }),
        )
        .await;
    assert_eq!(response.status(), 200, "adding {ids:?}");
    response.json().await.expect("json")
}

pub async fn post(
    server: &TestServer,
    prefix: &str,
    chat: &str,
    sender: &str,
    text: &str,
) -> Value {
    let response = server
        .post(
            &format!("{prefix}/chats/{chat}/messages"),
            json!({"sender_id": sender, "text": text}),
        )
        .await;
    assert_eq!(response.status(), 201, "posting {text}");
    response.json().await.expect("json")
}

/// Runs each listed `async fn(Store)` on every store: `sqlite::name`, `postgres::name`,
/// `dynamodb::name`.
#[macro_export]
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::Store::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::Store::Postgres).await
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::helpers::Store::Dynamodb).await
                }
            )*
        }
    };
}
