//! The cache service (seed 000's cache-service; service name `cache`): a key-value API over a
//! keyspace of its own, in Redis (`redis.url` set; keys `<redis.prefix>cache:*`) or in process.
//!
//! API (served at `/api/v1/cache/…` and, for seed 000's clients, at `/cache/…`; the gateway maps
//! `/cache/…` onto the first):
//! - `GET /cache/{key}`: `{key, value, ttl_secs}`, or a 404 problem
//! - `POST /cache/{key}` (or `PUT`): `{"value": <any JSON>, "ttl_secs": N}` (`ttl` and `expire`
//!   are accepted for `ttl_secs`), or seed 000's query form `?value=...&ttl=N`
//! - `DELETE /cache/{key}`: 204, or a 404 problem
//! - `GET /cache/memory`: used, peak, limit, threshold, keys, flushes so far. A static route, so it
//!   is the report even when a key named `memory` exists (in the seed it returned that key);
//!   `/cache/keys/{key}` reaches every key, `memory` included
//! - `GET /api/v1/stats`; `/health`, `/ready`, `/metrics`
//!
//! Memory guard: before every SET the used memory is read; at or over `threshold_mb` (default 75
//! of `limit_mb` 100) the service flushes its own keyspace, and nothing else, then stores. The
//! figure is the bytes of its own entries by default (`memory_source = "keyspace"`, accounted by
//! each store the same way), or Redis's `used_memory` (`"redis"`). Keys are 1 to 200 characters
//! of `A-Z a-z 0-9 _ - . :` (422 `invalid_key` otherwise); values over `max_value_bytes` get 413.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use kit::config::ConfigError;
use kit::http::Path;
use kit::service::{App, Deps, Service};
use kit::{ApiError, FieldError, Settings};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use utoipa::OpenApi;

mod redis_store;
mod store;

use store::Store;

/// The service's name: its config section, port and Redis namespace.
pub const NAME: &str = "cache";

/// The longest key.
pub const MAX_KEY_CHARS: usize = 200;

/// The cache service, as the `agora` binary sees it.
pub static SERVICE: Service = Service {
    name: NAME,
    store: NAME,
    migrations: None,
    uses_bus: false,
    consumes: &[],
    build: |deps| Box::pin(app(deps)),
    seed: None,
};

/// What the memory guard compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum MemorySource {
    Keyspace,
    Redis,
}

/// `[services.cache]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CacheSettings {
    limit_mb: f64,
    threshold_mb: f64,
    memory_source: MemorySource,
    max_value_bytes: usize,
    default_ttl_secs: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            limit_mb: 100.0,
            threshold_mb: 75.0,
            memory_source: MemorySource::Keyspace,
            max_value_bytes: 1024 * 1024,
            default_ttl_secs: 0,
        }
    }
}

const MB: f64 = 1024.0 * 1024.0;

impl CacheSettings {
    fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let cache: CacheSettings = settings.section(NAME)?;
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: format!("services.{NAME}.{key}"),
            message: message.into(),
        };
        if !(cache.limit_mb.is_finite() && cache.limit_mb > 0.0) {
            return Err(invalid("limit_mb", "must be more than 0"));
        }
        if !(cache.threshold_mb > 0.0 && cache.threshold_mb <= cache.limit_mb) {
            return Err(invalid(
                "threshold_mb",
                "must be more than 0 and at most limit_mb",
            ));
        }
        if cache.max_value_bytes == 0 {
            return Err(invalid("max_value_bytes", "must be 1 or more"));
        }
        // Below the threshold after the guard, plus one value at most: within the limit.
        if cache.threshold_bytes() + cache.max_value_bytes as u64 > cache.limit_bytes() {
            return Err(invalid(
                "max_value_bytes",
                "threshold_mb plus max_value_bytes must fit in limit_mb",
            ));
        }
        Ok(cache)
    }

    fn limit_bytes(&self) -> u64 {
        (self.limit_mb * MB) as u64
    }

    fn threshold_bytes(&self) -> u64 {
        (self.threshold_mb * MB) as u64
    }
}

#[derive(Clone)]
struct AppState(std::sync::Arc<SharedState>);

/// What [`AppState`] shares: handlers extract the state per request, which clones one pointer
/// rather than every field.
struct SharedState {
    store: Arc<dyn Store>,
    settings: CacheSettings,
    counters: Counters,
}

impl std::ops::Deref for AppState {
    type Target = SharedState;

    fn deref(&self) -> &SharedState {
        &self.0
    }
}

#[derive(Clone, Default)]
struct Counters {
    hits: Counter,
    misses: Counter,
    sets: Counter,
    flushes: Counter,
}

/// The service over its dependencies.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let settings = CacheSettings::load(&deps.settings)?;
    let store: Arc<dyn Store> = match &deps.settings.redis.url {
        Some(url) => Arc::new(redis_store::RedisStore::new(
            url,
            format!("{}{NAME}:", deps.settings.redis.prefix),
            // Every round trip (and each step of a flush) gets the configured time limit.
            Duration::from_millis(deps.settings.redis.timeout_ms.max(100)),
            match settings.memory_source {
                MemorySource::Keyspace => redis_store::Source::Keyspace,
                MemorySource::Redis => redis_store::Source::Redis,
            },
        )?),
        None => Arc::new(store::MemoryStore::default()),
    };
    let counters = Counters::default();
    let metrics = &deps.metrics;
    metrics.register_counter(
        "cachesvc_hits",
        "GETs that found their key",
        counters.hits.clone(),
    );
    metrics.register_counter(
        "cachesvc_misses",
        "GETs of a missing key",
        counters.misses.clone(),
    );
    metrics.register_counter("cachesvc_sets", "Values stored", counters.sets.clone());
    metrics.register_counter(
        "cachesvc_flushes",
        "Flushes of the keyspace by the memory guard (this process)",
        counters.flushes.clone(),
    );
    let state = AppState(std::sync::Arc::new(SharedState {
        store,
        settings,
        counters,
    }));
    Ok(deps.app(router(state).merge(kit::openapi::routes(openapi()))))
}

/// The service's API (the `/cache/...` spellings are aliases of `/api/v1/cache/...`).
#[derive(OpenApi)]
#[openapi(
    info(title = "cache", description = "Agora's cache service: a key-value API over a keyspace of its own, with a memory guard."),
    paths(get_value, set_value, delete_value, get_memory, set_memory_key, delete_memory_key, get_stats),
    tags((name = "cache"))
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    use kit::openapi::alias;
    let mut doc = kit::openapi::finish(ApiDoc::openapi(), false);
    let all = ["get", "post", "put", "delete"];
    alias(
        &mut doc,
        "/api/v1/cache/{key}",
        "/api/v1/cache/keys/{key}",
        &all,
        "_keys",
    );
    // Its own example key, so the examples' deletes each find theirs.
    for (path, _, operation) in kit::openapi::operations_mut(&mut doc) {
        if path != "/api/v1/cache/keys/{key}" {
            continue;
        }
        if let Some(serde_json::Value::Array(params)) = operation.get_mut("parameters") {
            for param in params.iter_mut().filter(|p| p["name"] == "key") {
                param["example"] = "greeting".into();
            }
        }
    }
    alias(
        &mut doc,
        "/api/v1/cache/{key}",
        "/cache/{key}",
        &all,
        "_seed",
    );
    alias(
        &mut doc,
        "/api/v1/cache/keys/{key}",
        "/cache/keys/{key}",
        &all,
        "_seed",
    );
    alias(
        &mut doc,
        "/api/v1/cache/memory",
        "/cache/memory",
        &all,
        "_seed",
    );
    doc
}

fn router(state: AppState) -> Router {
    let mut router = Router::new().route("/api/v1/stats", get(get_stats));
    for base in ["/api/v1/cache", "/cache"] {
        router = router
            // Static, so it wins over `{key}`; writes to it are writes to the key `memory`.
            .route(
                &format!("{base}/memory"),
                get(get_memory)
                    .post(set_memory_key)
                    .put(set_memory_key)
                    .delete(delete_memory_key),
            )
            .route(
                &format!("{base}/keys/{{key}}"),
                get(get_value)
                    .post(set_value)
                    .put(set_value)
                    .delete(delete_value),
            )
            .route(
                &format!("{base}/{{key}}"),
                get(get_value)
                    .post(set_value)
                    .put(set_value)
                    .delete(delete_value),
            );
    }
    router.with_state(state)
}

fn check_key(key: &str) -> Result<(), ApiError> {
    let chars = key.chars().count();
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
    if chars == 0 || chars > MAX_KEY_CHARS || !key.chars().all(allowed) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_key",
            format!("A key is 1 to {MAX_KEY_CHARS} characters of letters, digits, _ - . and :"),
        )
        .with_field_error(FieldError::new(
            "key",
            "invalid",
            "bad length or characters",
        )));
    }
    Ok(())
}

fn key_not_found(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "key_not_found",
        format!("No cached value under `{key}`"),
    )
}

fn unavailable(err: anyhow::Error) -> ApiError {
    ApiError::unavailable("cache store", err)
}

/// The value under a key, with its time left.
#[utoipa::path(
    get,
    path = "/api/v1/cache/{key}",
    tag = "cache",
    params(("key" = String, Path, description = "1 to 200 of `A-Z a-z 0-9 _ - . :`", example = "user:1")),
    responses(
        (status = 200, description = "The value (`ttl_secs`: null without expiry)", body = Object,
            example = json!({"key": "user:1", "value": {"name": "Alice"}, "ttl_secs": 300})),
        (status = 404, description = "No value under the key (`key_not_found`)"),
        (status = 422, description = "Bad key (`invalid_key`)"),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn get_value(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    respond(read(&state, &key).await)
}

async fn read(state: &AppState, key: &str) -> Result<Response, ApiError> {
    check_key(key)?;
    let Some(found) = state.store.get(key).await.map_err(unavailable)? else {
        state.counters.misses.inc();
        return Err(key_not_found(key));
    };
    state.counters.hits.inc();
    let value: serde_json::Value = serde_json::from_slice(&found.value)
        // Written by this service as JSON; anything else is served as a string.
        .unwrap_or_else(|_| String::from_utf8_lossy(&found.value).into_owned().into());
    Ok(axum::Json(serde_json::json!({
        "key": key,
        "value": value,
        "ttl_secs": found.ttl.map(|t| t.as_secs_f64().ceil() as u64),
    }))
    .into_response())
}

/// `POST /cache/{key}`'s body: the value (any JSON) and its TTL.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SetBody {
    /// Any JSON value.
    value: serde_json::Value,
    /// Seconds to keep it (`ttl`, `expire` and `ex` are accepted too); none or 0: the default.
    #[serde(default, alias = "ttl", alias = "expire", alias = "ex")]
    ttl_secs: Option<u64>,
}

/// Seed 000's query form.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SetQuery {
    /// The value, stored as a JSON string (when no body is sent).
    value: Option<String>,
    /// Seconds to keep it (`ttl`, `expire` and `ex` are accepted too).
    #[serde(default, alias = "ttl", alias = "expire", alias = "ex")]
    ttl_secs: Option<u64>,
}

/// Stores a value: the JSON body `{value, ttl_secs}`, or seed 000's query form
/// `?value=...&ttl=N` without a body. At the memory threshold the keyspace is flushed first.
#[utoipa::path(
    method(post, put),
    path = "/api/v1/cache/{key}",
    tag = "cache",
    params(("key" = String, Path, description = "1 to 200 of `A-Z a-z 0-9 _ - . :`", example = "user:1"), SetQuery),
    request_body(content = SetBody, examples(
        ("value" = (summary = "a JSON value kept 300 s",
            value = json!({"value": {"name": "Alice"}, "ttl_secs": 300}))),
        ("ttl" = (summary = "seed 000's `ttl` spelling", value = json!({"value": "hello", "ttl": 60}))),
    )),
    responses(
        (status = 200, description = "Stored (`flushed`: the memory guard flushed the keyspace first)",
            body = Object, example = json!({"key": "user:1", "stored": true, "ttl_secs": 300, "flushed": false})),
        (status = 413, description = "The value is over `max_value_bytes` (`value_too_large`)"),
        (status = 422, description = "Bad key (`invalid_key`) or body (`validation_failed`)"),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn set_value(
    State(state): State<AppState>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    respond(write(&state, &key, query.as_deref(), &body).await)
}

/// Stores the key `memory` (reads of this path are the memory report).
#[utoipa::path(
    method(post, put),
    path = "/api/v1/cache/memory",
    tag = "cache",
    params(SetQuery),
    request_body(content = SetBody, examples(
        ("value" = (summary = "a value under the key `memory`", value = json!({"value": "m", "ttl_secs": 300}))),
    )),
    responses(
        (status = 200, description = "Stored", body = Object,
            example = json!({"key": "memory", "stored": true, "ttl_secs": 300, "flushed": false})),
        (status = 413, description = "The value is over `max_value_bytes` (`value_too_large`)"),
        (status = 422, description = "Bad body (`validation_failed`)"),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn set_memory_key(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    respond(write(&state, "memory", query.as_deref(), &body).await)
}

fn parse_set(query: Option<&str>, body: &[u8]) -> Result<(Bytes, Option<u64>), ApiError> {
    let invalid = |field: &str, message: String| {
        ApiError::validation(vec![FieldError::new(field, "invalid", message)])
    };
    let from_query: Option<SetQuery> = match query.filter(|q| !q.is_empty()) {
        Some(q) => Some(serde_urlencoded_like(q).map_err(|m| invalid("query", m))?),
        None => None,
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return match from_query {
            Some(SetQuery {
                value: Some(value),
                ttl_secs,
            }) => Ok((
                Bytes::from(
                    serde_json::to_vec(&serde_json::Value::String(value))
                        .map_err(|e| ApiError::internal(e.into()))?,
                ),
                ttl_secs,
            )),
            _ => Err(invalid(
                "value",
                "send {\"value\": ..., \"ttl_secs\": N} or ?value=...&ttl=N".into(),
            )),
        };
    }
    let parsed: SetBody = serde_json::from_slice(body).map_err(|e| {
        invalid(
            "body",
            format!("expected {{\"value\": ..., \"ttl_secs\": N}}: {e}"),
        )
    })?;
    let ttl = parsed
        .ttl_secs
        .or_else(|| from_query.and_then(|q| q.ttl_secs));
    let value = serde_json::to_vec(&parsed.value).map_err(|e| ApiError::internal(e.into()))?;
    Ok((Bytes::from(value), ttl))
}

/// `a=b&c=d` into [`SetQuery`] (through JSON, so the same aliases and unknown-field refusal
/// apply as for the body).
fn serde_urlencoded_like(query: &str) -> Result<SetQuery, String> {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode(&s.replace('+', " "))
                .ok_or_else(|| format!("`{s}` is not valid percent-encoded UTF-8"))
        };
        let (name, value) = (decode(name)?, decode(value)?);
        let value = match name.as_str() {
            "ttl_secs" | "ttl" | "expire" | "ex" => value
                .parse::<u64>()
                .map(serde_json::Value::from)
                .map_err(|_| format!("{name} must be a whole number of seconds"))?,
            _ => serde_json::Value::String(value),
        };
        map.insert(name, value);
    }
    serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| e.to_string())
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn write(
    state: &AppState,
    key: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<Response, ApiError> {
    check_key(key)?;
    let (value, ttl) = parse_set(query, body)?;
    let max = state.settings.max_value_bytes;
    if value.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            format!(
                "The value is {} bytes; at most {max} are stored",
                value.len()
            ),
        ));
    }
    let ttl = ttl
        .or((state.settings.default_ttl_secs > 0).then_some(state.settings.default_ttl_secs))
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    // The guard: read the figure; at or over the threshold, flush (the store re-reads it under
    // its flush lock, so concurrent writers flush once), then store.
    let threshold = state.settings.threshold_bytes();
    let used = state.store.used().await.map_err(unavailable)?;
    let mut flushed = false;
    if used >= threshold {
        flushed = state.store.flush_if(threshold).await.map_err(unavailable)?;
        if flushed {
            state.counters.flushes.inc();
            tracing::info!(
                used_bytes = used,
                threshold_bytes = threshold,
                "cache memory at its threshold: flushed this service's keyspace"
            );
        }
    }
    state
        .store
        .set(key, value, ttl)
        .await
        .map_err(unavailable)?;
    state.counters.sets.inc();
    Ok(axum::Json(serde_json::json!({
        "key": key,
        "stored": true,
        "ttl_secs": ttl.map(|t| t.as_secs()),
        "flushed": flushed,
    }))
    .into_response())
}

/// Deletes a key.
#[utoipa::path(
    delete,
    path = "/api/v1/cache/{key}",
    tag = "cache",
    params(("key" = String, Path, description = "1 to 200 of `A-Z a-z 0-9 _ - . :`", example = "user:1")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No value under the key (`key_not_found`)"),
        (status = 422, description = "Bad key (`invalid_key`)"),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn delete_value(State(state): State<AppState>, Path(key): Path<String>) -> Response {
    respond(remove(&state, &key).await)
}

/// Deletes the key `memory`.
#[utoipa::path(
    delete,
    path = "/api/v1/cache/memory",
    tag = "cache",
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No value under `memory` (`key_not_found`)"),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn delete_memory_key(State(state): State<AppState>) -> Response {
    respond(remove(&state, "memory").await)
}

async fn remove(state: &AppState, key: &str) -> Result<Response, ApiError> {
    check_key(key)?;
    if state.store.delete(key).await.map_err(unavailable)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(key_not_found(key))
    }
}

async fn memory_report(state: &AppState) -> Result<serde_json::Value, ApiError> {
    let usage = state.store.usage().await.map_err(unavailable)?;
    let settings = &state.settings;
    Ok(serde_json::json!({
        "backend": state.store.backend(),
        "memory_source": match settings.memory_source {
            MemorySource::Keyspace => "keyspace",
            MemorySource::Redis => "redis",
        },
        "used_bytes": usage.used_bytes,
        "used_memory_human": format!("{:.2}M", usage.used_bytes as f64 / MB),
        "peak_bytes": usage.peak_bytes,
        "limit_bytes": settings.limit_bytes(),
        "threshold_bytes": settings.threshold_bytes(),
        "keys": usage.keys,
        "flushes": usage.flushes,
    }))
}

/// The memory report: used, peak, limit, threshold, keys, flushes so far.
#[utoipa::path(
    get,
    path = "/api/v1/cache/memory",
    tag = "cache",
    responses(
        (status = 200, description = "The report", body = Object, example = json!({
            "backend": "memory", "memory_source": "keyspace", "used_bytes": 1024,
            "used_memory_human": "0.00M", "peak_bytes": 2048, "limit_bytes": 104857600,
            "threshold_bytes": 78643200, "keys": 3, "flushes": 0})),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn get_memory(State(state): State<AppState>) -> Response {
    respond(
        memory_report(&state)
            .await
            .map(|r| axum::Json(r).into_response()),
    )
}

/// The memory report with the service's counters.
#[utoipa::path(
    get,
    path = "/api/v1/stats",
    tag = "cache",
    responses(
        (status = 200, description = "Report and counters", body = Object, example = json!({
            "service": "cache", "backend": "memory", "memory_source": "keyspace",
            "used_bytes": 1024, "used_memory_human": "0.00M", "peak_bytes": 2048,
            "limit_bytes": 104857600, "threshold_bytes": 78643200, "keys": 3, "flushes": 0,
            "hits": 10, "misses": 2, "sets": 5})),
        (status = 503, description = "The cache store is unavailable (`dependency_unavailable`)"),
    )
)]
async fn get_stats(State(state): State<AppState>) -> Response {
    respond(memory_report(&state).await.map(|mut report| {
        report["service"] = NAME.into();
        report["hits"] = state.counters.hits.get().into();
        report["misses"] = state.counters.misses.get().into();
        report["sets"] = state.counters.sets.get().into();
        axum::Json(report).into_response()
    }))
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_in_length_and_charset() {
        for key in ["a", "user:1", "a.b-c_d", &"k".repeat(MAX_KEY_CHARS)] {
            assert!(check_key(key).is_ok(), "{key}");
        }
        for key in ["", "a b", "é", "a/b", "a*", &"k".repeat(MAX_KEY_CHARS + 1)] {
            assert!(check_key(key).is_err(), "{key:?}");
        }
    }

    #[test]
    fn both_body_shapes_and_the_query_form() {
        let cases: [(Option<&str>, &str, &str, Option<u64>); 5] = [
            (
                None,
                r#"{"value": {"a": 1}, "ttl_secs": 5}"#,
                r#"{"a":1}"#,
                Some(5),
            ),
            (None, r#"{"value": "x", "ttl": 7}"#, r#""x""#, Some(7)),
            (None, r#"{"value": 3, "expire": 9}"#, "3", Some(9)),
            (
                Some("value=hello%20there&ttl=4"),
                "",
                r#""hello there""#,
                Some(4),
            ),
            (Some("value=v"), "", r#""v""#, None),
        ];
        for (query, body, stored, ttl) in cases {
            let (value, got_ttl) = parse_set(query, body.as_bytes()).expect(body);
            assert_eq!(
                (&value[..], got_ttl),
                (stored.as_bytes(), ttl),
                "{query:?} {body}"
            );
        }
        for (query, body) in [
            (None, ""),
            (None, "{}"),
            (None, r#"{"value": 1, "tll": 2}"#),
            (Some("value=x&ttl=soon"), ""),
        ] {
            let err = parse_set(query, body.as_bytes()).expect_err(body);
            assert_eq!(
                err.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{query:?} {body}"
            );
        }
    }

    #[test]
    fn settings_are_checked_by_key() {
        let mut settings = Settings::defaults();
        let parsed = CacheSettings::load(&settings).expect("defaults");
        assert_eq!(parsed.threshold_bytes(), 75 * 1024 * 1024);
        assert_eq!(parsed.limit_bytes(), 100 * 1024 * 1024);
        settings
            .services
            .entry(NAME.into())
            .or_default()
            .extra
            .insert("threshold_mb".into(), 200.0.into());
        let err = CacheSettings::load(&settings).expect_err("over the limit");
        assert!(
            err.to_string().contains("services.cache.threshold_mb"),
            "{err}"
        );
    }
}
