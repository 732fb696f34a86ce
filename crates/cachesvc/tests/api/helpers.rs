//! `spawn`: a cache service on a free port with its own Redis prefix (or its own in-process
//! store), optionally behind a gateway.

use std::collections::BTreeMap;

use kit::testing::{Backend, TestEnv, TestServer};
use serde_json::Value;

pub struct TestApp {
    pub server: TestServer,
    pub gateway: Option<TestServer>,
    pub env: TestEnv,
}

/// The cache service with `[services.cache]` keys set by `configure`, behind a gateway when
/// `gateway` is true.
pub async fn spawn(
    backend: Backend,
    gateway: bool,
    configure: impl FnOnce(&mut kit::Settings),
) -> TestApp {
    let mut env = TestEnv::new(backend).await;
    configure(&mut env.settings);
    let app = cachesvc::app(env.deps(&cachesvc::SERVICE).await)
        .await
        .expect("cache service");
    let server = TestServer::start(app, &env.settings).await;
    let gateway = if gateway {
        let upstreams = BTreeMap::from([(
            "cache".to_owned(),
            vec![url::Url::parse(&server.url("")).expect("url")],
        )]);
        let app = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
        Some(TestServer::start(app, &env.settings).await)
    } else {
        None
    };
    TestApp {
        server,
        gateway,
        env,
    }
}

/// Sets `[services.cache] key = value`.
pub fn set(settings: &mut kit::Settings, key: &str, value: impl Into<figment::value::Value>) {
    settings
        .services
        .entry("cache".into())
        .or_default()
        .extra
        .insert(key.into(), value.into());
}

impl std::ops::Deref for TestApp {
    type Target = TestServer;

    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl TestApp {
    pub async fn memory(&self) -> Value {
        let (status, report) = self.get_json("/cache/memory").await;
        assert_eq!(status, 200, "{report}");
        report
    }

    /// A connection to the test Redis (Redis backend only).
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(kit::testing::test_redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("the test Redis is reachable")
    }

    pub fn prefix(&self) -> &str {
        &self.env.settings.redis.prefix
    }
}
