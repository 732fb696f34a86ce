//! One OpenAPI 3.1 document for the whole API, as the gateway serves it, and Swagger UI.
//!
//! At start the gateway merges the services' own documents (built in-process from each service
//! crate's `openapi()`: the same code that serves the service's `/openapi.json`, so nothing is
//! fetched and nothing can fail over the network) with its own routes. Every service path is
//! listed at the public path the route table gives it: the canonical `/api/v1/...` path where a
//! route forwards it unchanged, otherwise the seed path that reaches it (users' `/health` is
//! public only as `/api/users/health`); the other seed spellings are listed in `x-agora-aliases`
//! and the description. Paths no route reaches (`/internal/...`, a service's own `/health`) and
//! paths the gateway answers itself are left out. Operation ids get their service as a prefix,
//! so they stay unique. The gateway adds what only it answers (429, 502, 504) and, per the edge
//! policy ([`crate::policy`]), the bearer scheme with 401/403 on the routes that need a token.
//!
//! `/openapi.json` serves the document and `/docs` Swagger UI, whose assets are inside the binary
//! (`utoipa-swagger-ui`'s `vendored` feature: no CDN).

use axum::Router;
use axum::http::Method;
use kit::auth::AuthMode;
use kit::openapi::{METHODS, add_response, operations_mut, problem_response};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::policy::{self, Access};
use crate::routes::RouteTable;

/// Where the merged document is served.
pub const DOCUMENT_PATH: &str = "/openapi.json";
/// Where Swagger UI is served.
pub const DOCS_PATH: &str = "/docs";

/// The documents of the services behind the gateway, by service name. A new service adds its
/// crate's `openapi()` here (and the crate to the gateway's dependencies).
pub fn service_documents() -> Vec<(&'static str, Value)> {
    vec![
        (users::NAME, users::openapi()),
        (catalog::NAME, catalog::openapi()),
        (orders::NAME, orders::openapi()),
        (notify::NAME, notify::openapi()),
        (cachesvc::NAME, cachesvc::openapi()),
        (chat::NAME, chat::openapi()),
    ]
}

/// The gateway's own routes.
#[derive(OpenApi)]
#[openapi(paths(crate::get_health, crate::get_ready, crate::get_stats, document))]
struct GatewayDoc;

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "gateway",
    responses((status = 200, description = "The merged OpenAPI 3.1 document", body = Object))
)]
#[allow(dead_code)]
fn document() {}

/// The gateway's own paths (answered before the route table).
pub fn own_paths() -> Vec<String> {
    let doc = gateway_document();
    doc["paths"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

fn gateway_document() -> Value {
    let mut doc = kit::openapi::finish(GatewayDoc::openapi(), false);
    // `finish` adds every service's `/health` and `/ready`: the gateway's are its own handlers.
    if let Some(paths) = doc["paths"].as_object_mut() {
        paths.remove("/health");
        paths.remove("/ready");
    }
    let own = serde_json::to_value(GatewayDoc::openapi()).unwrap_or_default();
    for path in ["/health", "/ready"] {
        doc["paths"][path] = own["paths"][path].clone();
    }
    kit::openapi::alias(&mut doc, "/health", "/api/health", &["get"], "_api");
    kit::openapi::alias(&mut doc, "/health", "/healthz", &["get"], "_z");
    doc
}

/// Where one service path is public: the canonical path first (if any), then the aliases.
pub fn public_paths(table: &RouteTable, service: &str, path: &str, own: &[String]) -> Vec<String> {
    let mut found: Vec<String> = table
        .routes()
        .iter()
        .filter(|route| route.service == service)
        .filter_map(|route| {
            let base = route
                .rewrite
                .as_deref()
                .unwrap_or(&route.prefix)
                .trim_end_matches('/');
            let rest = path.strip_prefix(base)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let public = format!("{}{rest}", route.prefix.trim_end_matches('/'));
            // Only where this route really wins for that path, and the gateway does not answer
            // it itself.
            let target = table.resolve(&public)?;
            (target.service == service
                && target.path == path
                && !public.starts_with("/internal/")
                && !own.contains(&public))
            .then_some(public)
        })
        .collect();
    found.sort_by_key(|p| (p != path, p.len(), p.clone()));
    found.dedup();
    found
}

/// A concrete path for the policy (its rules look at ids: `{id}` → `1`).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "1" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// The merged document; `conflicts` names schemas two services define differently (the first
/// one is kept).
pub struct Merged {
    pub document: Value,
    pub conflicts: Vec<String>,
}

/// Merges the gateway's own document with the services' `documents` at their public paths.
pub fn merge(table: &RouteTable, mode: AuthMode, documents: Vec<(&str, Value)>) -> Merged {
    let mut doc = gateway_document();
    let own = own_paths();
    let mut conflicts = Vec::new();
    doc["info"] = json!({
        "title": "Agora",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "Every service's API at the paths the gateway serves them. Errors are \
            `application/problem+json` (the `Problem` schema) with a stable `code`.",
    });
    let mut tags: Vec<Value> = vec![json!({"name": "gateway"})];
    for (service, mut service_doc) in documents {
        for (path, method, operation) in operations_mut(&mut service_doc) {
            if let Some(Value::String(id)) = operation.get_mut("operationId") {
                *id = format!("{service}.{id}");
            }
            let public = public_paths(table, service, &path, &own);
            let Some((canonical, aliases)) = public.split_first() else {
                continue;
            };
            decorate(operation, service, method, &path, mode);
            if !aliases.is_empty() {
                let list: Vec<String> = aliases.iter().map(|a| format!("`{a}`")).collect();
                let note = format!("Also served at {}.", list.join(", "));
                let description = match operation.get("description").and_then(Value::as_str) {
                    Some(d) if !d.is_empty() => format!("{d}\n\n{note}"),
                    _ => note,
                };
                operation.insert("description".into(), description.into());
                operation.insert("x-agora-aliases".into(), json!(aliases));
            }
            let item = doc["paths"]
                .as_object_mut()
                .map(|paths| paths.entry(canonical.clone()).or_insert_with(|| json!({})));
            if let Some(Value::Object(item)) = item {
                item.insert(method.to_owned(), Value::Object(operation.clone()));
            }
        }
        let schemas = service_doc["components"]["schemas"].as_object().cloned();
        for (name, schema) in schemas.unwrap_or_default() {
            let merged = &mut doc["components"]["schemas"][&name];
            if merged.is_null() {
                *merged = schema;
            } else if *merged != schema {
                conflicts.push(format!("{service}: schema `{name}`"));
            }
        }
        for tag in service_doc["tags"].as_array().cloned().unwrap_or_default() {
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
    }
    prune_schemas(&mut doc);
    doc["tags"] = Value::Array(tags);
    doc["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "The `access_token` of `POST /api/v1/auth/login`.",
        }
    });
    Merged {
        document: doc,
        conflicts,
    }
}

/// Drops the schemas no public path refers to (directly or through other schemas): those of
/// the internal routes left out.
fn prune_schemas(doc: &mut Value) {
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("$ref", Value::String(r)) => {
                            if let Some(name) = r.strip_prefix("#/components/schemas/") {
                                out.push(name.to_owned());
                            }
                        }
                        _ => refs(value, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut pending = Vec::new();
    refs(&doc["paths"], &mut pending);
    let mut used = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if used.insert(name.clone()) {
            refs(&doc["components"]["schemas"][&name], &mut pending);
        }
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object_mut() {
        schemas.retain(|name, _| used.contains(name));
    }
}

/// What the gateway adds to a forwarded operation: its own errors and the edge policy.
fn decorate(
    operation: &mut Map<String, Value>,
    service: &str,
    method: &str,
    path: &str,
    mode: AuthMode,
) {
    let access = Method::from_bytes(method.to_uppercase().as_bytes())
        .map(|m| policy::access(service, &m, &concrete(path)))
        .unwrap_or(Access::SignedIn);
    let needs = match access {
        Access::Public => None,
        Access::SignedIn => Some("a signed-in user"),
        Access::Admin => Some("an admin"),
        Access::SelfOrAdmin(_) => Some("that user or an admin"),
    };
    if let Some(needs) = needs {
        let security = match mode {
            AuthMode::Required => json!([{"bearer": []}]),
            // Tokens are checked when sent; without one the request is forwarded anonymously.
            AuthMode::Open => json!([{}, {"bearer": []}]),
        };
        operation.insert("security".into(), security);
        let mode_note = match mode {
            AuthMode::Required => "",
            AuthMode::Open => " when a token is sent (auth mode `open`: token-less calls pass)",
        };
        let note = format!("Needs {needs}{mode_note}.");
        let description = match operation.get("description").and_then(Value::as_str) {
            Some(d) if !d.is_empty() => format!("{d}\n\n{note}"),
            _ => note,
        };
        operation.insert("description".into(), description.into());
        add_response(
            operation,
            "401",
            problem_response("No token (`unauthenticated`) or an invalid one (`invalid_token`)"),
        );
        if !matches!(access, Access::SignedIn) {
            add_response(
                operation,
                "403",
                problem_response(&format!(
                    "The token's user may not: needs {needs} (`forbidden`)"
                )),
            );
        }
    }
    add_response(
        operation,
        "429",
        problem_response("Over the rate limit (`rate_limited`; `Retry-After`, `RateLimit`)"),
    );
    add_response(
        operation,
        "502",
        problem_response("No replica of the service answered (`upstream_unavailable`)"),
    );
    add_response(
        operation,
        "504",
        problem_response("The service did not answer in time (`upstream_timeout`)"),
    );
}

/// `/openapi.json` and Swagger UI at `/docs`.
pub fn routes(document: Value) -> Router {
    // No validator badge: Swagger UI would send the document to validator.swagger.io.
    let config = utoipa_swagger_ui::Config::default().validator_url("none");
    Router::from(
        utoipa_swagger_ui::SwaggerUi::new(DOCS_PATH)
            .external_url_unchecked(DOCUMENT_PATH, document)
            .config(config),
    )
}

/// Every method of every path of `doc`: `(METHOD, path)`.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if item.get(method).is_some() {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Route;

    fn route(prefix: &str, service: &str, rewrite: Option<&str>) -> Route {
        Route {
            prefix: prefix.into(),
            service: service.into(),
            rewrite: rewrite.map(Into::into),
        }
    }

    #[test]
    fn service_paths_are_listed_where_the_table_serves_them() {
        let table = RouteTable::new(vec![
            route("/api/v1/users", "users", None),
            route("/users", "users", Some("/api/v1/users")),
            route("/api/users/health", "users", Some("/health")),
        ]);
        let own = own_paths();
        assert_eq!(
            public_paths(&table, "users", "/api/v1/users/{id}", &own),
            ["/api/v1/users/{id}", "/users/{id}"]
        );
        assert_eq!(
            public_paths(&table, "users", "/health", &own),
            ["/api/users/health"]
        );
        assert!(public_paths(&table, "users", "/internal/v1/x", &own).is_empty());
        assert!(public_paths(&table, "catalog", "/api/v1/users", &own).is_empty());
    }
}
