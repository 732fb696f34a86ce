//! The API gateway: one entry point on 127.0.0.1:8080 that forwards by route table to service
//! replicas (round-robin), carries `x-request-id` on every hop, and aggregates health.
//!
//! Authorization at the edge: a bearer token, when sent, is verified ([`kit::auth::Tokens`]);
//! the identity headers and the service credential are stripped from every incoming request and
//! set again from the verified token and `auth.service_token`; [`policy`] decides who may call
//! what. `/internal/...` is never forwarded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kit::auth::{AuthMode, Tokens};
use kit::service::{App, Deps, Service};
use kit::{ApiError, Settings};
use url::Url;

pub mod cors;
pub mod limits;
pub mod openapi;
pub mod policy;
pub mod routes;
pub mod upstream;
pub mod websocket;

use limits::{Class, Limits};
use routes::{GatewaySettings, RouteTable};
use upstream::{Outcome, Upstream, UpstreamMetrics};

pub const NAME: &str = "gateway";

/// The gateway, for the `agora` binary's registry: no database, no bus.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: None,
    uses_bus: false,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: None,
};

struct Gateway {
    table: RouteTable,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    limits: Limits,
    client: Client<HttpConnector, Body>,
    /// Longest wait for an upstream's response headers (504 after it).
    upstream_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of the gateway).
    trusted_proxies: Vec<std::net::IpAddr>,
    /// Verifies bearer tokens (`auth.jwt_secret`, and the previous key).
    tokens: Tokens,
    mode: AuthMode,
    /// `auth.service_token`, sent with every forwarded request so services believe the identity
    /// headers: the header value made once, marked sensitive so no debug output shows it.
    service_token: HeaderValue,
}

/// The gateway with upstreams as configured (`services.<name>.upstreams`, or each service's
/// own address; `agora up` sets them to the addresses its services bound).
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let settings = &deps.settings;
    let upstreams = settings
        .services
        .keys()
        .filter(|name| name.as_str() != NAME)
        .map(|name| (name.clone(), settings.upstreams(name)))
        .collect();
    app_with_upstreams(settings, upstreams)
}

/// The gateway with explicit upstream URLs per service.
pub fn app_with_upstreams(
    settings: &Settings,
    upstreams: BTreeMap<String, Vec<Url>>,
) -> anyhow::Result<App> {
    let GatewaySettings {
        routes,
        trusted_proxies,
        rate_limit,
        health_check,
        circuit_breaker,
        cors,
    } = GatewaySettings::load(settings)?;
    let metrics = kit::metrics::Metrics::new(NAME);
    let upstream_metrics = UpstreamMetrics::default();
    upstream_metrics.register(&metrics);
    let limits = Limits::new(&rate_limit, settings)?;
    limits.register_metrics(&metrics);
    let tokens = Tokens::new(&settings.auth)?;
    let mut service_token = HeaderValue::from_str(settings.auth.require_service_token()?.expose())
        .map_err(|_| {
            anyhow::anyhow!("auth.service_token must be printable ASCII (it is sent as a header)")
        })?;
    service_token.set_sensitive(true);
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    // Idle upstream connections are dropped before the upstream's own idle cut-off (its
    // header-read timeout, same setting), so a request never races a closing connection.
    let pool_idle = Duration::from_millis(settings.http.header_read_timeout_secs.max(1) * 500);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(pool_idle)
        .build(connector);
    let table = RouteTable::new(routes);
    let merged = openapi::merge(&table, settings.auth.mode(), openapi::service_documents());
    for conflict in &merged.conflicts {
        tracing::warn!(%conflict, "OpenAPI: two services define a schema differently; the first is kept");
    }
    let gateway = Arc::new(Gateway {
        table,
        upstreams: upstreams
            .into_iter()
            .filter(|(_, urls)| !urls.is_empty())
            .map(|(name, urls)| {
                let upstream = Upstream::new(&name, urls, &circuit_breaker, &upstream_metrics);
                (name, Arc::new(upstream))
            })
            .collect(),
        limits,
        client,
        // Under the request timeout, so the client sees 504 (the upstream is slow), not 408.
        upstream_timeout: Duration::from_secs(
            settings.http.request_timeout_secs.saturating_sub(1).max(1),
        ),
        trusted_proxies,
        tokens,
        mode: settings.auth.mode(),
        service_token,
    });
    let checked: Arc<Vec<Arc<Upstream>>> = Arc::new(gateway.upstreams.values().cloned().collect());
    let checks_client = gateway.client.clone();
    let background = gateway.clone();
    let router = Router::new()
        .route("/health", get(get_health))
        .route("/api/health", get(get_health))
        .route("/healthz", get(get_health))
        .route("/ready", get(get_ready))
        .route("/api/v1/stats", get(get_stats))
        .fallback(forward)
        .with_state(gateway)
        .merge(openapi::routes(merged.document));
    let mut router = kit::http::with_standard_layers(router, &settings.http, &metrics);
    // Outermost: preflights are answered before anything else, and every answer (a 429 too)
    // carries the CORS headers an allowed origin needs to read it.
    if let Some(cors) = cors.layer()? {
        router = router.layer(cors);
    }
    let mut app = App::new(NAME, router, None).with_metrics(&metrics);
    if health_check.enabled {
        app = app.with_task(move |stop| {
            tokio::spawn(upstream::run_health_checks(
                checked,
                checks_client,
                health_check,
                stop,
            ))
        });
    }
    // Local limit state of clients idle for a while is forgotten, so many addresses cannot
    // grow it without bound.
    Ok(app.with_task(move |stop| {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = ticker.tick() => background.limits.shrink(),
                    () = stop.cancelled() => return,
                }
            }
        })
    }))
}

/// Headers that describe one connection, not the request; never forwarded (RFC 9110 7.6.1).
/// Names, not strings: removing by `&str` parses the name again on every call.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    // Not standard, but some clients send it and some proxies honour it.
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none: one pass over their few names tells, where
    // removing each of the list by name hashes it every time (twice per request).
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The `X-Forwarded-For` value: `earlier, ip` when a trusted proxy sent `earlier`, else `ip`.
/// An IPv4 address is written with `itoa` (`Ipv4Addr`'s `Display` costs more than the rest of
/// this function, on every request).
fn forwarded_for(earlier: Option<&str>, ip: std::net::IpAddr) -> Option<HeaderValue> {
    let mut out = Vec::with_capacity(earlier.map_or(0, |e| e.len() + 2) + 15);
    if let Some(earlier) = earlier {
        out.extend_from_slice(earlier.as_bytes());
        out.extend_from_slice(b", ");
    }
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        std::net::IpAddr::V6(v6) => out.extend_from_slice(v6.to_string().as_bytes()),
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
}

/// Requests that can be retried on another replica: no body, no side effects.
fn retryable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn forward(State(gateway): State<Arc<Gateway>>, mut request: Request) -> Response {
    // Whatever a client claims about who it is (or that it is a service) is dropped first.
    for name in kit::auth::trusted_headers() {
        request.headers_mut().remove(name);
    }
    let path = request.uri().path();
    if routes::is_ambiguous(path) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "The path has a `.` or `..` segment or an encoded separator",
        )
        .into_response();
    }
    let Some(target) = gateway.table.resolve(path) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No route for {} {path}", request.method()),
        )
        .into_response();
    };
    let service = target.service.to_owned();
    let route = kit::metrics::RouteLabel(target.route.clone());
    // Internal endpoints are for services only, whatever the route table says.
    if kit::auth::is_internal(&target.path) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No route for {} {path}", request.method()),
        )
        .into_response();
    }
    // A WebSocket upgrade may carry its token in the query (browsers cannot set the header).
    let upgrade = websocket::is_upgrade(request.headers());
    let query_token = upgrade
        .then(|| websocket::query_token(request.uri()))
        .flatten();
    let caller = match bearer_token(request.headers()).or_else(|| query_token.as_deref().map(Ok)) {
        None => None,
        Some(Ok(token)) => match gateway.tokens.verify(token) {
            Ok(identity) => Some(identity),
            Err(err) => {
                tracing::debug!(error = %err, "token refused");
                return kit::auth::unauthorized(
                    "invalid_token",
                    "The bearer token is invalid or expired; log in again",
                );
            }
        },
        Some(Err(())) => {
            return kit::auth::unauthorized(
                "invalid_token",
                "The Authorization header must be `Bearer <token>`",
            );
        }
    };
    let class = Class::of(request.method(), &target.path);
    let verdict = gateway
        .limits
        .check(
            class,
            client_ip(&gateway, &request),
            caller.as_ref().map(|c| c.user_id),
        )
        .await;
    if let Some(verdict) = verdict.as_ref().filter(|v| !v.allowed) {
        let mut response = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            verdict.detail(),
        )
        .into_response();
        verdict.write_headers(response.headers_mut());
        response.extensions_mut().insert(route);
        return response;
    }
    let access = policy::access(&service, request.method(), &target.path);
    match policy::decide(gateway.mode, access, caller) {
        policy::Decision::Forward => {}
        policy::Decision::Unauthenticated => {
            return kit::auth::unauthorized(
                "unauthenticated",
                "Sign in first: send `Authorization: Bearer <token>` (POST /api/v1/auth/login)",
            );
        }
        policy::Decision::Forbidden => {
            let detail = if access == policy::Access::Admin {
                "This needs the admin role"
            } else {
                "You may only read and change your own account"
            };
            return kit::auth::forbidden(detail).into_response();
        }
    }
    let headers = request.headers_mut();
    // Services get the verified identity instead of the token.
    headers.remove(header::AUTHORIZATION);
    if let Some(caller) = caller {
        caller.write_headers(headers);
    }
    headers.insert(
        kit::auth::SERVICE_TOKEN_HEADER.clone(),
        gateway.service_token.clone(),
    );
    let mut response = if upgrade {
        websocket::proxy(&gateway, &service, &route.0, target.path, request).await
    } else {
        proxy(&gateway, service, &route.0, target.path, request).await
    };
    if let Some(verdict) = &verdict {
        verdict.write_headers(response.headers_mut());
    }
    // Metrics label the request by the route table entry (axum matched no template).
    response.extensions_mut().insert(route);
    response
}

/// The client's address: the peer's, or (behind a trusted proxy) the last address that proxy
/// appended to `X-Forwarded-For`.
fn client_ip(gateway: &Gateway, request: &Request) -> Option<std::net::IpAddr> {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip())?;
    if !gateway.trusted_proxies.contains(&peer) {
        return Some(peer);
    }
    let forwarded = request
        .headers()
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse().ok());
    Some(forwarded.unwrap_or(peer))
}

/// The token of `Authorization: Bearer <token>`; `None` without the header, `Err` for any other
/// form (another scheme, no token, not text).
fn bearer_token(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let token = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    });
    Some(token.ok_or(()))
}

/// Sends `request` to a replica of `service` as `path` (and its query), trying the next replica
/// for idempotent requests; `route` is the route table entry (for metrics).
async fn proxy(
    gateway: &Gateway,
    service: String,
    route: &Arc<str>,
    path: String,
    request: Request,
) -> Response {
    let Some(upstream) = gateway.upstreams.get(&service) else {
        return ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_not_configured",
            format!("The {service} service has no configured address"),
        )
        .into_response();
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };

    let (mut parts, body) = request.into_parts();
    let client_ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    strip_hop_by_hop(&mut parts.headers);
    // X-Forwarded-For is built from the real peer. What a client claims is kept only when the
    // peer is a trusted proxy (which appended the address it saw); otherwise it is dropped, so a
    // client cannot pose as another address to the services behind.
    let claimed = parts.headers.remove(&X_FORWARDED_FOR);
    if let Some(ip) = client_ip {
        let earlier = claimed
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .filter(|_| gateway.trusted_proxies.contains(&ip));
        if let Some(value) = forwarded_for(earlier, ip) {
            parts.headers.insert(X_FORWARDED_FOR.clone(), value);
        }
    }
    if let Some(host) = parts.headers.remove(header::HOST) {
        parts.headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    // The trace goes on with the gateway's hop as the parent (the standard layers made sure the
    // request has a context: the client's, or a new trace).
    let trace = parts
        .extensions
        .get::<kit::trace::TraceContext>()
        .copied()
        .unwrap_or_else(kit::trace::TraceContext::generate);
    parts.headers.insert(
        kit::trace::TRACEPARENT.clone(),
        trace.child().header_value(),
    );

    let order: Vec<usize> = upstream.rotation().collect();
    let max_attempts = if retryable(&parts.method) {
        order.len()
    } else {
        1
    };
    let mut tried: Vec<usize> = Vec::with_capacity(max_attempts);
    let mut body = Some(body);
    let mut last_error = None;
    while tried.len() < max_attempts {
        let Some(replica) = upstream.pick(&order, &tried) else {
            break;
        };
        tried.push(replica);
        let last = tried.len() == max_attempts;
        let target = &upstream.replicas[replica];
        let (base, outage) = (&target.url, &target.outage);
        let uri = match target.uri(&path_and_query) {
            Ok(uri) => uri,
            Err(err) => {
                upstream.record(replica, route, Outcome::Error, false);
                last_error = Some(err);
                continue;
            }
        };
        let mut outgoing = Request::new(body.take().unwrap_or_default());
        *outgoing.method_mut() = parts.method.clone();
        *outgoing.uri_mut() = uri;
        // Writes (one attempt) and the last retry take the headers instead of copying them.
        *outgoing.headers_mut() = if last {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        let started = Instant::now();
        let result =
            match tokio::time::timeout(gateway.upstream_timeout, gateway.client.request(outgoing))
                .await
            {
                Ok(result) => result,
                Err(_) => {
                    upstream.record(replica, route, Outcome::Timeout, false);
                    outage.failed(&format_args!(
                        "no response within {:?}",
                        gateway.upstream_timeout
                    ));
                    return ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!("The {service} service did not answer in time"),
                    )
                    .into_response();
                }
            };
        match result {
            Ok(response) => {
                upstream.record(
                    replica,
                    route,
                    Outcome::Status(response.status().as_u16()),
                    true,
                );
                outage.succeeded();
                tracing::debug!(
                    service = %service,
                    upstream = %base,
                    status = response.status().as_u16(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "forwarded"
                );
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, Body::new(body));
            }
            Err(err) => {
                upstream.record(replica, route, Outcome::Error, false);
                // Logged once per outage of this replica; each request's detail at debug.
                outage.failed(&err);
                last_error = Some(err.into());
            }
        }
    }
    if tried.is_empty() {
        // Every replica's circuit is open: refused at once, without waiting on a dead replica.
        upstream.rejected();
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            format!(
                "The {service} service is unavailable (every replica failed recently); try again shortly"
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_unavailable",
        format!("The {service} service is unavailable; try again shortly"),
    )
    .with_source(last_error)
    .into_response()
}

/// The health of every service the gateway knows, replica by replica; 503 when any is down.
#[utoipa::path(
    get,
    path = "/health",
    tag = "gateway",
    responses(
        (status = 200, description = "Every replica of every service is up", body = Object,
            example = json!({"status": "ok", "service": "gateway", "services": {"users": {
                "status": "up", "replicas": [{"replica": 1, "status": "up", "latency_ms": 0.8}]}}})),
        (status = 503, description = "A replica is down (`degraded`, the same body)",
            body = Object, content_type = "application/json"),
    )
)]
async fn get_health(State(gateway): State<Arc<Gateway>>) -> Response {
    let client = &gateway.client;
    let probes = gateway.upstreams.iter().flat_map(|(name, upstream)| {
        upstream
            .replicas
            .iter()
            .enumerate()
            .map(move |(i, replica)| async move {
                let started = Instant::now();
                let up =
                    upstream::probe(client, &replica.url, "/health", Duration::from_secs(2)).await;
                let url = i + 1;
                (name.clone(), url, up, started.elapsed())
            })
    });
    let results = futures::future::join_all(probes).await;
    let mut services = serde_json::Map::new();
    let mut all_up = true;
    // Replicas are numbered, not named by URL: the health page is public, the topology is not.
    for (name, replica, up, elapsed) in results {
        all_up &= up;
        let entry = services
            .entry(name)
            .or_insert_with(|| serde_json::json!({ "status": "up", "replicas": [] }));
        if !up {
            entry["status"] = "down".into();
        }
        if let Some(replicas) = entry["replicas"].as_array_mut() {
            replicas.push(serde_json::json!({
                "replica": replica,
                "status": if up { "up" } else { "down" },
                "latency_ms": elapsed.as_secs_f64() * 1000.0,
            }));
        }
    }
    let status = if all_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({
            "status": if all_up { "ok" } else { "degraded" },
            "service": NAME,
            "services": services,
        })),
    )
        .into_response()
}

/// `/api/v1/stats`: every service's own `/api/v1/stats` (one replica each, in turn), side by
/// side; a service that does not answer in 2 s shows `{"status": "unavailable"}`, one that has
/// no stats (the worker) is left out.
#[utoipa::path(
    get,
    path = "/api/v1/stats",
    tag = "gateway",
    responses((status = 200, description = "Each service's stats, by name", body = Object,
        example = json!({"service": "gateway", "services": {"users": {"service": "users", "users": 4}}})))
)]
async fn get_stats(State(gateway): State<Arc<Gateway>>) -> Response {
    let client = &gateway.client;
    let calls = gateway.upstreams.iter().map(|(name, upstream)| async move {
        let replica = upstream.rotation().next().unwrap_or_default();
        let base = &upstream.replicas[replica].url;
        let stats = async {
            let uri: Uri = format!("{}/api/v1/stats", base.as_str().trim_end_matches('/'))
                .parse()
                .ok()?;
            let request = Request::get(uri).body(Body::empty()).ok()?;
            let response = tokio::time::timeout(Duration::from_secs(2), client.request(request))
                .await
                .ok()?
                .ok()?;
            if response.status() == StatusCode::NOT_FOUND {
                return Some(None);
            }
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .ok()?
                .to_bytes();
            Some(serde_json::from_slice::<serde_json::Value>(&body).ok())
        };
        (name.clone(), stats.await)
    });
    let mut services = serde_json::Map::new();
    for (name, stats) in futures::future::join_all(calls).await {
        match stats {
            Some(Some(stats)) => {
                services.insert(name, stats);
            }
            Some(None) => {}
            None => {
                services.insert(name, serde_json::json!({ "status": "unavailable" }));
            }
        }
    }
    axum::Json(serde_json::json!({ "service": NAME, "services": services })).into_response()
}

/// The gateway's own readiness: it is configured and serving (upstreams are in `/health`).
#[utoipa::path(
    get,
    path = "/ready",
    tag = "gateway",
    responses((status = 200, description = "Serving", body = Object,
        example = json!({"status": "ready", "service": "gateway", "routes": ["catalog", "orders", "users"]})))
)]
async fn get_ready(State(gateway): State<Arc<Gateway>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ready",
        "service": NAME,
        "routes": gateway.table.services(),
    }))
    .into_response()
}
