//! Property tests of a service's request parsing: random methods, paths with made-up ids,
//! query strings and bodies (the service's own field names and seed aliases, with hostile
//! values) sent over HTTP. The property every service owes its clients: never a 5xx for
//! anything a client sends, and every refusal is a problem body with the status it was sent with.
//!
//! ```ignore
//! kit::testing::fuzz::check_requests(Backend::Sqlite, spawn, &TARGET, 200);
//! ```

use std::future::Future;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use super::{Backend, TestServer};

/// What to aim at: routes as `(method, path template)` (`{}` in a path is replaced by a made-up
/// segment) and the names a body or query may carry.
pub struct Target {
    pub routes: &'static [(&'static str, &'static str)],
    pub body_fields: &'static [&'static str],
    pub query_keys: &'static [&'static str],
}

/// One generated request.
#[derive(Debug, Clone)]
pub struct Case {
    pub method: reqwest::Method,
    pub path: String,
    pub body: Option<String>,
}

/// A segment of a path: plausible ids, extremes, and arbitrary text (percent-encoded).
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("0".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("-1".to_owned()),
        "[a-zA-Z0-9_.-]{0,12}",
        ".{0,20}".prop_map(|s| encode(&s)),
    ]
}

/// A value for a query parameter.
fn query_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just(u64::MAX.to_string()),
        (0u32..20_000).prop_map(|n| n.to_string()),
        ".{0,300}".prop_map(|s| encode(&s)),
    ]
}

/// A JSON value of any kind, with the extremes parsers trip on.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            Just(1e300),
            Just(-0.0),
            Just(0.001),
        ]
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("\u{0}")),
        Just(Value::from("x".repeat(5000))),
        Just(Value::from("29.99")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Requests aimed at `target`.
pub fn requests(target: &'static Target) -> impl Strategy<Value = Case> {
    // Mostly the route's own method (to reach its parsers), sometimes any other.
    let other_method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("PATCH"),
        Just("DELETE"),
        Just("M-SEARCH"),
    ];
    let route = (
        proptest::sample::select(target.routes),
        proptest::option::weighted(0.1, other_method),
        segment(),
    )
        .prop_map(|((method, template), other, seg)| {
            let method = other.unwrap_or(method);
            (
                reqwest::Method::from_bytes(method.as_bytes()).expect("a method"),
                template.replace("{}", &seg),
            )
        });
    let query = proptest::collection::vec(
        (proptest::sample::select(target.query_keys), query_value()),
        0..3,
    )
    .prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    });
    // Mostly the service's own fields (so validation, not just shape checking, is reached),
    // sometimes any JSON, sometimes not JSON at all.
    let fields = proptest::collection::vec(
        (proptest::sample::select(target.body_fields), json_value()),
        0..6,
    )
    .prop_map(|fields| {
        let object: Map<String, Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        Some(Value::Object(object).to_string())
    });
    let body = prop_oneof![
        6 => fields,
        1 => json_value().prop_map(|v| Some(v.to_string())),
        1 => ".{0,60}".prop_map(Some),
        1 => Just(None),
    ];
    (route, query, body).prop_map(|((method, path), query, body)| {
        let path = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        Case { method, path, body }
    })
}

/// Sends `case` and checks the property.
pub async fn check(server: &TestServer, case: &Case) -> Result<(), TestCaseError> {
    // As the trusted caller on internal paths, so their parsers are fuzzed too.
    let mut request = server.builder(case.method.clone(), &case.path);
    if let Some(body) = &case.body {
        request = request
            .header("content-type", "application/json")
            .body(body.clone());
    }
    let response = request
        .send()
        .await
        // With its sources (`{:#}` of anyhow): "error sending request" alone does not say why.
        .map_err(|err| {
            TestCaseError::fail(format!("no response: {:#}", anyhow::Error::new(err)))
        })?;
    let status = response.status().as_u16();
    let content_type = super::content_type(&response);
    let text = response.text().await.unwrap_or_default();
    prop_assert!(status < 500, "{case:?} answered {status}: {text}");
    if status >= 400 {
        prop_assert!(
            content_type.starts_with("application/problem+json"),
            "{case:?} answered {status} with {content_type}: {text}"
        );
        let problem: Value = serde_json::from_str(&text)
            .map_err(|err| TestCaseError::fail(format!("{case:?}: not JSON ({err}): {text}")))?;
        prop_assert_eq!(&problem["status"], &json!(status), "{:?}", case);
    }
    Ok(())
}

/// Runs `cases` generated requests against a server that `spawn` starts on `backend`. Call from
/// a plain `#[test]` (it makes its own runtime).
pub fn check_requests<F, Fut, S>(backend: Backend, spawn: F, target: &'static Target, cases: u32)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = S>,
    S: std::ops::Deref<Target = TestServer>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(spawn(backend));
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&requests(target), |case| {
        runtime.block_on(check(&server, &case))
    });
    runtime.block_on(async move { drop(server) });
    if let Err(err) = result {
        panic!("{err}");
    }
}
