//! Prometheus metrics, one registry per service instance (no global recorder, so tests can run
//! many services in one process): requests by matched route and status, latency, cache counters.
//! Served at `/metrics` in the text exposition format.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    /// The matched route template (`/api/v1/users/{id}`), never the raw path: bounded cardinality.
    route: Route,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    method: &'static str,
    route: Route,
}

/// A label value shared rather than copied: building a label set of these per request (to find
/// its series) allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedLabel(pub Arc<str>);

impl From<&str> for SharedLabel {
    fn from(value: &str) -> Self {
        Self(value.into())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for SharedLabel {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(&self.0)
    }
}

/// A route label that costs no allocation per request: axum's matched template (shared), a
/// handler's [`RouteLabel`] (shared), or a fixed name.
#[derive(Debug, Clone)]
enum Route {
    Matched(MatchedPath),
    Label(Arc<str>),
    Fixed(&'static str),
}

impl Route {
    fn as_str(&self) -> &str {
        match self {
            Route::Matched(path) => path.as_str(),
            Route::Label(label) => label,
            Route::Fixed(name) => name,
        }
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Route {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.as_str())
    }
}

/// Handles to series of one or more families, found by a key with one foldhash lookup:
/// prometheus-client's `Family::get_or_create` hashes the whole label set with SipHash behind
/// the family's lock on every call. A key's series are made once, on its first use, by the
/// caller's constructor (usually `family.get_or_create(&labels).clone()`: a handle to the
/// family's own series, so the exposition is unchanged). Cheap to clone (shared).
pub struct SeriesCache<K, V> {
    found: Arc<RwLock<HashMap<K, V, foldhash::fast::RandomState>>>,
}

impl<K, V> Clone for SeriesCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            found: self.found.clone(),
        }
    }
}

impl<K, V> Default for SeriesCache<K, V> {
    fn default() -> Self {
        Self {
            found: Arc::default(),
        }
    }
}

impl<K: Hash + Eq + Clone, V> SeriesCache<K, V> {
    /// Runs `with` on the series of `key`, made by `make` the first time.
    pub fn with<R>(&self, key: &K, make: impl FnOnce(&K) -> V, with: impl FnOnce(&V) -> R) -> R {
        let found = self.found.read().unwrap_or_else(|p| p.into_inner());
        if let Some(series) = found.get(key) {
            return with(series);
        }
        drop(found);
        let mut found = self.found.write().unwrap_or_else(|p| p.into_inner());
        with(found.entry(key.clone()).or_insert_with(|| make(key)))
    }
}

/// A labelled family of metrics whose series are found through a [`SeriesCache`]: for a family
/// touched on every request. Register [`FastFamily::family`]. Cheap to clone (shared).
pub struct FastFamily<S, M> {
    family: Family<S, M>,
    series: SeriesCache<S, M>,
}

impl<S, M> Clone for FastFamily<S, M> {
    fn clone(&self) -> Self {
        Self {
            family: self.family.clone(),
            series: self.series.clone(),
        }
    }
}

impl<S: Clone + Hash + Eq, M: Default> Default for FastFamily<S, M> {
    fn default() -> Self {
        Self {
            family: Family::default(),
            series: SeriesCache::default(),
        }
    }
}

impl<S: Clone + Hash + Eq, M: Clone> FastFamily<S, M> {
    /// The family, to register.
    pub fn family(&self) -> &Family<S, M> {
        &self.family
    }

    /// Runs `with` on the series of `labels` (made in the family the first time).
    pub fn with<R>(&self, labels: &S, with: impl FnOnce(&M) -> R) -> R {
        self.series.with(
            labels,
            |labels| self.family.get_or_create(labels).clone(),
            with,
        )
    }
}

/// A service's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    /// The two families' series by (method, route, status).
    series: SeriesCache<SeriesKey, Series>,
}

type SeriesKey = (&'static str, Route, u16);

/// The latency histogram and request counter of one (method, route, status): handles to the
/// families' own series, so the exposition is unchanged.
struct Series {
    latency: Histogram,
    requests: Counter,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "agora",
            [("service".into(), service.to_owned().into())].into_iter(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms to ~8 s
            Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        });
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            latency.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
            series: SeriesCache::default(),
        }
    }

    /// Counts one request and its latency.
    fn record(&self, key: SeriesKey, seconds: f64) {
        let make = |(method, route, status): &SeriesKey| Series {
            latency: self
                .latency
                .get_or_create(&LatencyLabels {
                    method,
                    route: route.clone(),
                })
                .clone(),
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    method,
                    route: route.clone(),
                    status: *status,
                })
                .clone(),
        };
        self.series.with(&key, make, |series| {
            series.latency.observe(seconds);
            series.requests.inc();
        });
    }

    /// Registers a counter kept elsewhere (e.g. the cache's hits).
    pub fn register_counter(&self, name: &str, help: &str, counter: Counter) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, counter);
    }

    /// Registers any metric kept elsewhere (e.g. a labelled family of counters).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// Registers a gauge kept elsewhere (e.g. the outbox backlog).
    pub fn register_gauge(&self, name: &str, help: &str, gauge: Gauge) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, gauge);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            tracing::warn!("encoding metrics failed");
        }
        out
    }

    /// `GET /metrics`.
    pub fn routes(&self) -> Router {
        Router::new()
            .route("/metrics", get(get_metrics))
            .with_state(self.clone())
    }
}

async fn get_metrics(State(metrics): State<Metrics>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        metrics.encode(),
    )
        .into_response()
}

/// The route a handler that does its own routing served (the gateway's route table entry), put
/// in the response's extensions for [`track`] when axum matched no route template.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub Arc<str>);

/// The method as a label: the standard ones by name, anything else `OTHER` (any token is a valid
/// method, and each new label value would be a new series forever).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// What [`Timing::finish`] needs of a request, read before it is served: its start, its method
/// label and axum's matched route template.
pub struct Timing {
    started: Instant,
    method: &'static str,
    matched: Option<MatchedPath>,
}

impl Timing {
    /// Starts timing `req`.
    pub fn start(req: &Request) -> Self {
        Self {
            started: Instant::now(),
            method: method_label(req.method()),
            matched: req.extensions().get::<MatchedPath>().cloned(),
        }
    }

    /// Records the request as answered by `response` (labels: the method, the matched template
    /// or the response's [`RouteLabel`], the status).
    pub fn finish(self, metrics: &Metrics, response: &Response) {
        let route = match self.matched {
            Some(path) => Route::Matched(path),
            None => match response.extensions().get::<RouteLabel>() {
                Some(label) => Route::Label(label.0.clone()),
                None => Route::Fixed("unmatched"),
            },
        };
        metrics.record(
            (self.method, route, response.status().as_u16()),
            self.started.elapsed().as_secs_f64(),
        );
    }
}

/// Middleware recording every request, for a router of its own (the standard layers time each
/// request with [`Timing`] directly). Labels are bounded: known methods, matched route
/// templates (or a handler's [`RouteLabel`]), status codes.
pub async fn track(metrics: &Metrics, req: Request, next: Next) -> Response {
    let timing = Timing::start(&req);
    let response = next.run(req).await;
    timing.finish(metrics, &response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    /// Any token is a method: 10,000 made-up ones must not make 10,000 series.
    #[tokio::test]
    async fn hostile_methods_and_paths_leave_the_metrics_bounded() {
        let metrics = Metrics::new("t");
        let router = Router::new()
            .route("/items/{id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(
                metrics.clone(),
                |State(metrics): State<Metrics>, req: Request, next: Next| async move {
                    track(&metrics, req, next).await
                },
            ));
        for i in 0..10_000 {
            let request = axum::http::Request::builder()
                .method(format!("M{i}").as_str())
                .uri(format!("/items/{i}?x={i}"))
                .body(axum::body::Body::empty())
                .expect("request");
            let _ = router.clone().oneshot(request).await;
            let unknown = axum::http::Request::builder()
                .uri(format!("/nothing/{i}"))
                .body(axum::body::Body::empty())
                .expect("request");
            let _ = router.clone().oneshot(unknown).await;
        }
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("agora_http_requests_total{"))
            .count();
        assert!(series <= 3, "{series} series:\n{text}");
        assert!(text.contains("method=\"OTHER\""), "{text}");
        assert!(text.contains("route=\"/items/{id}\""), "{text}");
        assert!(text.contains("route=\"unmatched\""), "{text}");
        assert!(
            !text.contains("M9999") && !text.contains("/nothing/"),
            "{text}"
        );
    }

    /// The second request of a series goes through the fast lookup: it must count in the same
    /// exposed series as the first, latency included.
    #[test]
    fn repeated_requests_count_in_one_series() {
        let metrics = Metrics::new("t");
        let route = || Route::Fixed("/items/{id}");
        for _ in 0..3 {
            metrics.record(("GET", route(), 200), 0.001);
        }
        metrics.record(("GET", route(), 404), 0.002);
        let text = metrics.encode();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
                .rsplit(' ')
                .next()
                .map(str::to_owned)
        };
        assert_eq!(
            line(r#"agora_http_requests_total{service="t",method="GET",route="/items/{id}",status="200"}"#).as_deref(),
            Some("3")
        );
        assert_eq!(
            line(r#"agora_http_requests_total{service="t",method="GET",route="/items/{id}",status="404"}"#).as_deref(),
            Some("1")
        );
        assert_eq!(
            line(r#"agora_http_request_duration_seconds_count{service="t",method="GET",route="/items/{id}"}"#).as_deref(),
            Some("4")
        );
    }
    /// A fast family's series are its family's own: what `with` counts is what the registered
    /// family exposes, one series per label set.
    #[test]
    fn a_fast_family_counts_into_the_family_it_registers() {
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Labels {
            backend: &'static str,
        }
        let metrics = Metrics::new("t");
        let family = FastFamily::<Labels, Counter>::default();
        metrics.register("decisions", "Decisions", family.family().clone());
        for _ in 0..3 {
            family.with(&Labels { backend: "redis" }, Counter::inc);
        }
        family
            .clone()
            .with(&Labels { backend: "local" }, Counter::inc);
        let text = metrics.encode();
        assert!(
            text.contains(r#"agora_decisions_total{service="t",backend="redis"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"agora_decisions_total{service="t",backend="local"} 1"#),
            "{text}"
        );
    }
}
