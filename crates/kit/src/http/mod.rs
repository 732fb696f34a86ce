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
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, body::Body};
use bytes::Bytes;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::config::HttpSettings;
use crate::error::{ApiError, FieldError, InternalError, PROBLEM_JSON, Problem};
use crate::metrics::Metrics;

/// The request id header, generated when absent and forwarded on every hop.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Wraps `router` in the standard stack, outermost first: one middleware ([`Standard`]) that
/// answers `/ready` while stopping, keeps or makes the request id, reads or starts the trace
/// context (`traceparent`, [`crate::trace`]), runs the request in its span, refuses `%00`,
/// records metrics, completes problem bodies and echoes the request id → panic → timeout (408)
/// → body limit (413). One middleware rather than one per concern, and a tower service of its
/// own rather than axum's `from_fn`: `from_fn` boxes its future, clones the inner stack and
/// boxes it again (with its future) for `Next` on every request, on every hop; [`Standard`]
/// calls its inner service in place and its future is a named type.
/// `/metrics` is not among the routes: it is served on the private metrics listener
/// ([`crate::service::App::with_metrics`]).
///
/// The layers are one `tower::ServiceBuilder` stack applied by one `Router::layer` call: axum
/// boxes every route once per `layer` call and clones a matched route's whole chain of boxes on
/// every request, so one call per layer cost a nested boxed clone (and free) each per request.
pub fn with_standard_layers(router: Router, http: &HttpSettings, metrics: &Metrics) -> Router {
    let stack = tower::ServiceBuilder::new()
        .layer(StandardLayer {
            metrics: metrics.clone(),
        })
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(http.request_timeout_secs),
        ))
        // The limits wrap the request and response bodies; the layers around and inside them
        // take axum's body types again.
        .map_response(IntoResponse::into_response)
        .layer(RequestBodyLimitLayer::new(http.body_limit_bytes))
        .map_request(|req: Request<tower_http::body::Limited<Body>>| req.map(Body::new))
        .layer(axum::extract::DefaultBodyLimit::max(http.body_limit_bytes));
    router.layer(stack)
}

/// Makes [`Standard`] services.
#[derive(Clone)]
struct StandardLayer {
    metrics: Metrics,
}

impl<S> tower::Layer<S> for StandardLayer {
    type Service = Standard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Standard {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The standard middleware (see [`with_standard_layers`]).
#[derive(Clone)]
pub struct Standard<S> {
    inner: S,
    metrics: Metrics,
}

impl<S> tower::Service<Request> for Standard<S>
where
    S: tower::Service<Request, Error = std::convert::Infallible>,
    S::Response: IntoResponse,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = StandardFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        // Once the server is stopping, `/ready` answers 503 `stopping` at once (whatever the
        // service's own readiness), so a balancer stops sending before the listener closes.
        if req.uri().path() == "/ready"
            && req
                .extensions()
                .get::<Stopping>()
                .is_some_and(Stopping::is_stopping)
        {
            let response = (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, HeaderValue::from_static("5"))],
                axum::Json(serde_json::json!({ "status": "stopping" })),
            )
                .into_response();
            return StandardFuture::answered(response);
        }
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(value) if usable_request_id(value) => value.clone(),
            _ => {
                let id = new_request_id();
                req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let ctx = crate::trace::TraceContext::of_request(req.headers());
        req.headers_mut()
            .insert(crate::trace::TRACEPARENT.clone(), ctx.header_value());
        req.extensions_mut().insert(ctx);
        // Field values are only computed when the span is enabled; as text, not `Display`
        // (each `%value` goes through the formatting machinery, on every request).
        let mut trace_hex = [0u8; 32];
        let span = tracing::info_span!(
            "request",
            method = req.method().as_str(),
            path = req.uri().path(),
            request_id = request_id.to_str().unwrap_or_default(),
            trace_id = ctx.trace_id_hex_in(&mut trace_hex),
        );
        // A URI with an encoded NUL (`%00`) is 400: no id, name or filter has one, and
        // PostgreSQL refuses it in text (a 500 if it got that far).
        let has_nul = req
            .uri()
            .path_and_query()
            .is_some_and(|pq| pq.as_str().as_bytes().windows(3).any(|w| w == b"%00"));
        if has_nul {
            let response = span.in_scope(|| {
                complete_problem(
                    ApiError::bad_request(
                        "invalid_uri",
                        "The path or query contains a NUL character (%00)",
                    )
                    .into_response(),
                    &request_id,
                    req.method(),
                    req.uri(),
                )
            });
            return StandardFuture::answered(with_request_id(response, request_id));
        }
        let after = After {
            timing: crate::metrics::Timing::start(&req),
            metrics: self.metrics.clone(),
            request_id,
            // Kept for the error path; cloning a `Uri` shares its bytes.
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        // The inner services only build their futures here; the request runs when it is
        // polled, in its span and its trace context.
        let inner = self.inner.call(req);
        StandardFuture {
            state: Stage::Serving {
                inner: tracing::Instrument::instrument(crate::trace::scope(ctx, inner), span),
                after: Some(after),
            },
        }
    }
}

/// What the standard middleware does once the inner services answered.
struct After {
    timing: crate::metrics::Timing,
    metrics: Metrics,
    request_id: HeaderValue,
    method: axum::http::Method,
    uri: axum::http::Uri,
}

pin_project_lite::pin_project! {
    /// The future of [`Standard`]: the inner services' future in the request's span and trace
    /// context, then metrics recorded, a problem body completed and the request id echoed.
    pub struct StandardFuture<F> {
        #[pin]
        state: Stage<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        Answered { response: Option<Response> },
        Serving {
            #[pin]
            inner: tracing::instrument::Instrumented<
                tokio::task::futures::TaskLocalFuture<crate::trace::TraceContext, F>,
            >,
            after: Option<After>,
        },
    }
}

impl<F> StandardFuture<F> {
    fn answered(response: Response) -> Self {
        Self {
            state: Stage::Answered {
                response: Some(response),
            },
        }
    }
}

impl<F, R> std::future::Future for StandardFuture<F>
where
    F: std::future::Future<Output = Result<R, std::convert::Infallible>>,
    R: IntoResponse,
{
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project().state.project() {
            StageProj::Answered { response } => std::task::Poll::Ready(Ok(response
                .take()
                .expect("a StandardFuture is not polled after it is ready"))),
            StageProj::Serving { mut inner, after } => {
                let Ok(response) = std::task::ready!(inner.as_mut().poll(cx));
                let response = response.into_response();
                let After {
                    timing,
                    metrics,
                    request_id,
                    method,
                    uri,
                } = after
                    .take()
                    .expect("a StandardFuture is not polled after it is ready");
                timing.finish(&metrics, &response);
                let status = response.status();
                let response = if status.is_client_error() || status.is_server_error() {
                    // In the request's span: the log lines of a failure carry its ids.
                    let span = inner.as_ref().get_ref().span();
                    span.in_scope(|| complete_problem(response, &request_id, &method, &uri))
                } else {
                    response
                };
                std::task::Poll::Ready(Ok(with_request_id(response, request_id)))
            }
        }
    }
}

/// `response` with the request id, unless it has one already (an upstream's, through the
/// gateway).
fn with_request_id(mut response: Response, request_id: HeaderValue) -> Response {
    response
        .headers_mut()
        .entry(&X_REQUEST_ID)
        .or_insert(request_id);
    response
}

/// An incoming `x-request-id` is kept only when it is a sane token (at most 128 characters of
/// letters, digits and `-_.:`); otherwise a new one is made, so ids stay safe to log and echo.
fn usable_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// A new request id: a UUID v4 (from a thread-local generator, no system call per request).
fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).expect("a hyphenated uuid is a valid header value")
}

/// Completes an error response's problem body with the request id and logs its internal cause
/// (once, here); turns any other error response without a problem body into one.
fn complete_problem(
    mut response: Response,
    request_id: &HeaderValue,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
) -> Response {
    let status = response.status();
    let problem = match response.extensions_mut().remove::<Problem>() {
        Some(problem) => problem,
        None => {
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
        request_id: request_id.to_str().ok().map(str::to_owned),
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
