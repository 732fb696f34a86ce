//! OpenAPI 3.1 documents, the same way in every service.
//!
//! A service describes its handlers with `#[utoipa::path]` and its types with `ToSchema` (the
//! handlers' own types), collects them in a `#[derive(utoipa::OpenApi)]` struct, and passes the
//! generated document through [`finish`], which adds what every Agora service shares: the
//! [`Problem`] schema as the `application/problem+json` body of every error response, the errors
//! any request can get (malformed input, 500, 503), and `/health` and `/ready`. The result is plain
//! JSON: the service serves it at `/openapi.json` ([`routes`]) and the gateway merges the
//! services' documents into one with the public paths.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Map, Value, json};
use utoipa::{OpenApi, PartialSchema};

use crate::error::{FieldError, PROBLEM_JSON, Problem};

/// The HTTP methods an OpenAPI path item may hold, in the document's order.
pub const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Where every service serves its own document.
pub const DOCUMENT_PATH: &str = "/openapi.json";

/// `/health` and `/ready`, as [`crate::http::health_routes`] serves them in every service.
#[derive(OpenApi)]
#[openapi(paths(health, ready))]
struct HealthDoc;

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The service is up", body = Object,
        example = json!({"status": "ok", "service": "users"})))
)]
#[allow(dead_code)]
fn health() {}

/// Readiness: every dependency checked (2 s each); 503 while a required one is down or while
/// the service is stopping.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready (`ready`, or `degraded` when an optional dependency is down)",
            body = Object, example = json!({"status": "ready", "service": "users", "checks": {
                "database": {"status": "up", "required": true, "latency_ms": 0.4}}})),
        (status = 503, description = "A required dependency is down, or the service is stopping",
            body = Object, content_type = "application/json")
    )
)]
#[allow(dead_code)]
fn ready() {}

/// Adds the `service_token` security scheme: the service credential other services send to a
/// service's `/internal/...` routes (`x-agora-service-token`, `auth.service_token`).
pub struct ServiceToken;

impl utoipa::Modify for ServiceToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "service_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                crate::auth::SERVICE_TOKEN_HEADER.as_str(),
                "The service credential (`auth.service_token`); the gateway never forwards \
                 `/internal/...`",
            ))),
        );
    }
}

/// The problem body's schema, as a component.
pub fn problem_schema() -> Value {
    serde_json::to_value(Problem::schema()).unwrap_or_default()
}

fn problem_ref() -> Value {
    json!({"$ref": "#/components/schemas/Problem"})
}

/// A problem+json response object.
pub fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {PROBLEM_JSON: {"schema": problem_ref()}},
    })
}

/// Every operation of `doc` with its path and method.
pub fn operations_mut(doc: &mut Value) -> Vec<(String, &'static str, &mut Map<String, Value>)> {
    let mut out = Vec::new();
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return out;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            let Some(method) = METHODS.iter().find(|m| **m == method.as_str()) else {
                continue;
            };
            if let Some(operation) = operation.as_object_mut() {
                out.push((path.clone(), *method, operation));
            }
        }
    }
    out
}

/// Adds `status` to an operation's responses unless it documents it already.
pub fn add_response(operation: &mut Map<String, Value>, status: &str, response: Value) {
    let responses = operation
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(responses) = responses {
        responses.entry(status.to_owned()).or_insert(response);
    }
}

/// Completes a service's generated document (see the module docs). `has_database`: its requests
/// can get 503 `dependency_unavailable`.
pub fn finish(doc: utoipa::openapi::OpenApi, has_database: bool) -> Value {
    let mut doc = doc.merge_from(HealthDoc::openapi());
    doc.openapi = utoipa::openapi::OpenApiVersion::Version31;
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    let schemas = doc
        .as_object_mut()
        .map(|d| d.entry("components").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .map(|c| c.entry("schemas").or_insert_with(|| json!({})));
    if let Some(Value::Object(schemas)) = schemas {
        schemas.insert("Problem".into(), problem_schema());
        schemas.insert(
            "FieldError".into(),
            serde_json::to_value(FieldError::schema()).unwrap_or_default(),
        );
    }
    // One handler for several methods (`method(put, patch)`) has one id: make each unique.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for (_, _, operation) in operations_mut(&mut doc) {
        if let Some(id) = operation.get("operationId").and_then(Value::as_str) {
            *seen.entry(id.to_owned()).or_default() += 1;
        }
    }
    for (_, method, operation) in operations_mut(&mut doc) {
        if let Some(Value::String(id)) = operation.get_mut("operationId")
            && seen.get(id.as_str()).is_some_and(|n| *n > 1)
        {
            id.push('_');
            id.push_str(method);
        }
    }
    for (path, _, operation) in operations_mut(&mut doc) {
        let health = path == "/health" || path == "/ready";
        let params = operation
            .get("parameters")
            .and_then(Value::as_array)
            .is_some_and(|p| !p.is_empty());
        let body = operation.contains_key("requestBody");
        if params || body {
            add_response(
                operation,
                "400",
                problem_response(
                    "Malformed request (`malformed_json`, `invalid_path_parameter`, `invalid_query`)",
                ),
            );
        }
        if body {
            add_response(
                operation,
                "413",
                problem_response("Body larger than 1 MiB (`payload_too_large`)"),
            );
            add_response(
                operation,
                "415",
                problem_response("Body not sent as JSON (`unsupported_media_type`)"),
            );
            add_response(
                operation,
                "422",
                problem_response(
                    "Invalid fields (`validation_failed`, one entry per field in `errors`)",
                ),
            );
        }
        if !health {
            add_response(
                operation,
                "500",
                problem_response("Unexpected error, logged (`internal_error`)"),
            );
            if has_database {
                add_response(
                    operation,
                    "503",
                    problem_response(
                        "The database is unavailable (`dependency_unavailable`, with `Retry-After`)",
                    ),
                );
            }
        }
        // Every error response is a problem body unless it says otherwise.
        if let Some(Value::Object(responses)) = operation.get_mut("responses") {
            for (status, response) in responses.iter_mut() {
                let error = status.starts_with('4') || status.starts_with('5');
                if let Some(response) = response.as_object_mut()
                    && error
                    && !response.contains_key("content")
                    && !response.contains_key("$ref")
                {
                    response.insert(
                        "content".into(),
                        json!({PROBLEM_JSON: {"schema": problem_ref()}}),
                    );
                }
            }
        }
    }
    doc
}

/// [`finish`] for a service with a database whose stats are at `stats_path`: it answers them at
/// `/api/v1/stats` too (through the gateway that path aggregates every service's), documented as
/// a copy with operation ids ending in `_service`.
pub fn finish_service(doc: utoipa::openapi::OpenApi, stats_path: &str) -> Value {
    let mut doc = finish(doc, true);
    alias(&mut doc, stats_path, "/api/v1/stats", &["get"], "_service");
    doc
}

/// Documents `path` as a copy of `canonical`'s `methods` (a second route to the same handlers):
/// their operation ids get `suffix`, so they stay unique.
pub fn alias(doc: &mut Value, canonical: &str, path: &str, methods: &[&str], suffix: &str) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(mut item) = paths.get(canonical).cloned() else {
        return;
    };
    if let Some(item) = item.as_object_mut() {
        item.retain(|key, _| !METHODS.contains(&key.as_str()) || methods.contains(&key.as_str()));
        for (method, operation) in item.iter_mut() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            if let Some(Value::String(id)) = operation.get_mut("operationId") {
                id.push_str(suffix);
            }
            if let Some(operation) = operation.as_object_mut() {
                let note = format!("Same as `{method} {canonical}`.");
                let description = match operation.get("description").and_then(Value::as_str) {
                    Some(d) if !d.is_empty() => format!("{note}\n\n{d}"),
                    _ => note,
                };
                operation.insert("description".into(), description.into());
            }
        }
    }
    paths.insert(path.to_owned(), item);
}

/// `GET /openapi.json`: the service's own document.
pub fn routes(doc: Value) -> Router {
    let body = serde_json::to_vec(&doc).unwrap_or_default();
    Router::new().route(
        DOCUMENT_PATH,
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(OpenApi)]
    #[openapi(paths(sample))]
    struct SampleDoc;

    #[utoipa::path(post, path = "/things/{id}", params(("id" = i64, Path)),
        request_body = Object,
        responses((status = 201, description = "made"), (status = 404, description = "none")))]
    #[allow(dead_code)]
    fn sample() {}

    #[test]
    fn every_error_response_is_a_problem_and_the_common_ones_are_added() {
        let doc = finish(SampleDoc::openapi(), true);
        assert_eq!(doc["openapi"], "3.1.0");
        let responses = &doc["paths"]["/things/{id}"]["post"]["responses"];
        for status in ["400", "404", "413", "415", "422", "500", "503"] {
            assert_eq!(
                responses[status]["content"][PROBLEM_JSON]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{status}: {responses}"
            );
        }
        assert!(responses["201"].get("content").is_none());
        assert!(doc["components"]["schemas"]["Problem"]["properties"]["code"].is_object());
        assert!(doc["paths"]["/health"]["get"].is_object());
        assert!(doc["paths"]["/ready"]["get"]["responses"]["500"].is_null());
    }

    #[test]
    fn an_alias_gets_unique_operation_ids() {
        let mut doc = finish(SampleDoc::openapi(), false);
        alias(&mut doc, "/things/{id}", "/stuff/{id}", &["post"], "_alias");
        alias(&mut doc, "/things/{id}", "/none/{id}", &["get"], "_none");
        assert!(doc["paths"]["/none/{id}"].get("post").is_none());
        assert_eq!(
            doc["paths"]["/stuff/{id}"]["post"]["operationId"],
            "sample_alias"
        );
        assert_eq!(
            doc["paths"]["/things/{id}"]["post"]["operationId"],
            "sample"
        );
    }
}
