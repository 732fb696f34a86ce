//! The HTTP side every service shares: the middleware stack, JSON/path/query extractors whose
//! rejections are problem bodies, `/health` and `/ready`, and serving ([`serve`]).

mod serve;

pub use serve::{ServeOptions, Stopping, bind, serve};

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, body::Body};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};

use crate::config::HttpSettings;
use crate::error::{ApiError, FieldError, InternalError, PROBLEM_JSON, Problem};
use crate::metrics::Metrics;

/// The request id header, generated when absent and forwarded on every hop.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps `router` in the standard stack, outermost first: `/ready` while stopping → request id →
/// trace context (`traceparent`, [`crate::trace`]) → trace span → request id on the response →
/// problem bodies → `%00` refused → metrics → panic → timeout (408) → body limit (413).
/// `/metrics` is not among the routes: it is served on the private metrics listener
/// ([`crate::service::App::with_metrics`]).
pub fn with_standard_layers(router: Router, http: &HttpSettings, metrics: &Metrics) -> Router {
    // `Router::layer` wraps what came before, so the last call is the outermost layer.
    router
        .layer(axum::extract::DefaultBodyLimit::max(http.body_limit_bytes))
        .layer(RequestBodyLimitLayer::new(http.body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(http.request_timeout_secs),
        ))
        .layer(CatchPanicLayer::new())
        .layer(middleware::from_fn_with_state(
            metrics.clone(),
            crate::metrics::track,
        ))
        .layer(middleware::from_fn(refuse_encoded_nul))
        .layer(middleware::from_fn(problem_layer))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let request_id = req
                        .headers()
                        .get(&X_REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    let trace_id = req
                        .extensions()
                        .get::<crate::trace::TraceContext>()
                        .map(crate::trace::TraceContext::trace_id_hex)
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id = %request_id,
                        trace_id = %trace_id,
                    )
                })
                // The problem layer logs every server error once, at the level it deserves (a
                // dependency's outage is not an error per request); this would repeat each one.
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(middleware::from_fn(crate::trace::layer))
        .layer(SetRequestIdLayer::new(
            X_REQUEST_ID.clone(),
            MakeRequestUuid,
        ))
        .layer(middleware::from_fn(drop_unusable_request_id))
        .layer(middleware::from_fn(ready_while_stopping))
}

/// A URI with an encoded NUL (`%00`) is 400: no id, name or filter has one, and PostgreSQL refuses
/// it in text (a 500 if it got that far).
async fn refuse_encoded_nul(req: Request, next: Next) -> Response {
    let has_nul = req
        .uri()
        .path_and_query()
        .is_some_and(|pq| pq.as_str().as_bytes().windows(3).any(|w| w == b"%00"));
    if has_nul {
        return ApiError::bad_request(
            "invalid_uri",
            "The path or query contains a NUL character (%00)",
        )
        .into_response();
    }
    next.run(req).await
}

/// Once the server is stopping, `/ready` answers 503 `stopping` at once (whatever the service's
/// own readiness), so a balancer stops sending before the listener closes.
async fn ready_while_stopping(req: Request, next: Next) -> Response {
    let stopping = req
        .extensions()
        .get::<Stopping>()
        .is_some_and(Stopping::is_stopping);
    if stopping && req.uri().path() == "/ready" {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
            axum::Json(serde_json::json!({ "status": "stopping" })),
        )
            .into_response();
    }
    next.run(req).await
}

/// An incoming `x-request-id` is kept only when it is a sane token (at most 128 characters of
/// letters, digits and `-_.:`); otherwise a new one is generated, so ids stay safe to log and
/// echo.
async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = req.headers().get(&X_REQUEST_ID).is_none_or(|value| {
        let bytes = value.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    });
    if !usable {
        req.headers_mut().remove(&X_REQUEST_ID);
    }
    next.run(req).await
}

/// Completes problem bodies with the request id and logs internal causes (once, here); turns any
/// other error response without a problem body into one.
pub async fn problem_layer(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Kept for the error path; cloning a `Uri` shares its bytes.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut response = next.run(req).await;
    let status = response.status();

    let problem = match response.extensions_mut().remove::<Problem>() {
        Some(problem) => problem,
        None if status.is_client_error() || status.is_server_error() => {
            // A JSON body was made on purpose: a problem passed through by the gateway, or a
            // report such as `/ready`'s 503. Only bare bodies (router, limits, panics) change.
            let is_json = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|ct| ct.to_str().ok())
                .is_some_and(|ct| ct.contains("json"));
            if is_json {
                return response;
            }
            Problem::for_status(status, method.as_str(), uri.path())
        }
        None => return response,
    };
    // A dependency fault (502, 503, 504) fails every request while it lasts: its detail stays at
    // debug here, and the dependency's tracker logs the outage once ([`crate::outage`]). Any other
    // server error is a bug, logged with its cause.
    let dependency_fault = matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    );
    let cause = response.extensions_mut().remove::<InternalError>();
    match (cause, dependency_fault) {
        (Some(InternalError(err)), true) => tracing::debug!(
            error.message = %err,
            error.cause_chain = %format!("{err:#}"),
            status = status.as_u16(),
            "request failed: a dependency is unavailable"
        ),
        (Some(InternalError(err)), false) => tracing::error!(
            error.message = %err,
            error.cause_chain = %format!("{err:#}"),
            status = status.as_u16(),
            "request failed"
        ),
        (None, true) => tracing::debug!(status = status.as_u16(), "request failed"),
        (None, false) if status.is_server_error() => {
            tracing::error!(status = status.as_u16(), "request failed");
        }
        (None, false) => {}
    }
    let problem = Problem {
        request_id,
        ..problem
    };
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

/// `Json` whose rejections are problem bodies: 400 for malformed JSON, 422 for wrong types,
/// missing or unknown fields, 415 without a JSON content type, 413 over the body limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(err) => {
            // "Failed to deserialize the JSON body into the target type: name: invalid type ..."
            let text = err.body_text();
            let detail = text
                .split_once("target type: ")
                .map_or(text.as_str(), |(_, d)| d);
            let (field, message) = match detail.split_once(": ") {
                Some((path, msg)) if !path.contains(' ') => (path.to_owned(), msg.to_owned()),
                _ => ("body".to_owned(), detail.to_owned()),
            };
            ApiError::validation(vec![FieldError::new(field, "invalid", message)]).with_detail(
                format!("The body does not match the expected shape: {detail}"),
            )
        }
        JsonRejection::JsonSyntaxError(err) => {
            let text = err.body_text();
            let detail = text.split_once(": ").map_or(text.as_str(), |(_, d)| d);
            ApiError::bad_request(
                "malformed_json",
                format!("The body is not valid JSON: {detail}"),
            )
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::BytesRejection(err) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "The request body is larger than this service accepts",
            )
        }
        other => ApiError::bad_request("unreadable_body", other.body_text()),
    }
}

/// `Path` whose rejections are 400 problem bodies naming the bad segment.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(PathRejection::FailedToDeserializePathParams(err)) => Err(ApiError::bad_request(
                "invalid_path_parameter",
                err.body_text(),
            )),
            Err(other) => Err(ApiError::bad_request(
                "invalid_path_parameter",
                other.body_text(),
            )),
        }
    }
}

/// `Query` whose rejections are 400 problem bodies.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(err)) => {
                Err(ApiError::bad_request("invalid_query", err.body_text()))
            }
            Err(other) => Err(ApiError::bad_request("invalid_query", other.body_text())),
        }
    }
}

/// A response whose body is JSON already encoded (e.g. straight from the cache).
pub struct RawJson(pub Bytes);

impl IntoResponse for RawJson {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0,
        )
            .into_response()
    }
}

/// Something `/ready` checks: a database, a cache, a broker.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// A named dependency of a service, and whether the service can serve without it.
#[derive(Clone)]
pub struct Dependency {
    pub name: &'static str,
    /// Optional dependencies (the cache) make the service `degraded`, not unready.
    pub required: bool,
    pub check: Check,
}

impl Dependency {
    /// The service's database: required.
    pub fn database(db: &crate::Db) -> Self {
        let db = db.clone();
        Self {
            name: "database",
            required: true,
            check: Arc::new(move || {
                let db = db.clone();
                Box::pin(async move { db.ping().await })
            }),
        }
    }

    /// The event bus: optional (while it is down, events wait in the outbox and are published
    /// when it returns).
    pub fn bus(bus: &crate::bus::Bus) -> Self {
        let bus = bus.clone();
        Self {
            name: "bus",
            required: false,
            check: Arc::new(move || {
                let bus = bus.clone();
                Box::pin(async move { bus.ping().await })
            }),
        }
    }

    /// The service's cache: optional (without it the service is slower, not down).
    pub fn cache(cache: &crate::Cache) -> Self {
        let cache = cache.clone();
        Self {
            name: "cache",
            required: false,
            check: Arc::new(move || {
                let cache = cache.clone();
                Box::pin(async move { cache.ping().await })
            }),
        }
    }
}

#[derive(Clone)]
struct HealthState {
    service: &'static str,
    dependencies: Arc<Vec<Dependency>>,
}

/// `/health` (liveness: the process answers) and `/ready` (each dependency by name; 503 when a
/// required one is down).
pub fn health_routes(service: &'static str, dependencies: Vec<Dependency>) -> Router {
    Router::new()
        .route("/health", get(get_health))
        .route("/ready", get(get_ready))
        .with_state(HealthState {
            service,
            dependencies: Arc::new(dependencies),
        })
}

async fn get_health(State(state): State<HealthState>) -> Response {
    axum::Json(serde_json::json!({ "status": "ok", "service": state.service })).into_response()
}

async fn get_ready(State(state): State<HealthState>) -> Response {
    let checks = state.dependencies.iter().map(|dep| async move {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(2), (dep.check)()).await;
        let up = matches!(result, Ok(Ok(())));
        if !up {
            let reason = match result {
                Ok(Err(err)) => format!("{err:#}"),
                _ => "timed out".to_owned(),
            };
            // Debug: probes come every few seconds, and the dependency logs its own outage.
            tracing::debug!(dependency = dep.name, error.message = %reason, "readiness: dependency is down");
        }
        (dep, up, started.elapsed())
    });
    let results = futures::future::join_all(checks).await;
    let mut report = serde_json::Map::new();
    let mut ready = true;
    let mut degraded = false;
    for (dep, up, elapsed) in results {
        ready &= up || !dep.required;
        degraded |= !up;
        report.insert(
            dep.name.to_owned(),
            serde_json::json!({
                "status": if up { "up" } else { "down" },
                "required": dep.required,
                "latency_ms": elapsed.as_secs_f64() * 1000.0,
            }),
        );
    }
    let status = match (ready, degraded) {
        (false, _) => "unavailable",
        (true, true) => "degraded",
        (true, false) => "ready",
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(serde_json::json!({
            "status": status,
            "service": state.service,
            "checks": report,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
