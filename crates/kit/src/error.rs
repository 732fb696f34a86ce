//! The one error shape of every Agora service: RFC 9457 `application/problem+json`.
//!
//! Handlers return [`ApiError`] (usually through a service's own error enum). Its response carries
//! the [`Problem`] in the response extensions; [`crate::http::problem_layer`] then adds the request
//! id, logs internal causes once, and turns any bare error response (404 from the router, 405, 413
//! from the body limit, 408 from the timeout, a panic) into the same body. Internal error text is
//! logged, never sent.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem body, with Agora's `code`, `request_id` and per-field `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"type": "/problems/user-not-found", "title": "Not Found", "status": 404,
    "detail": "No user with id 99", "code": "user_not_found", "request_id": "0b7c…"}))]
pub struct Problem {
    /// `/problems/<code with dashes>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// Human-readable; never branch on it.
    pub detail: String,
    /// Stable, machine-readable; clients branch on this, never on `detail`.
    pub code: String,
    /// The request's `x-request-id`, to quote when reporting it.
    #[serde(default)]
    pub request_id: Option<String>,
    /// One entry per invalid field (422, and a 409 names its field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub code: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

impl Problem {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("/problems/{}", code.replace('_', "-")),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.to_owned(),
            request_id: None,
            errors: Vec::new(),
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The body a bare error response of this status gets (router 404, 405, 413, 408, ...).
    pub fn for_status(status: StatusCode, method: &str, path: &str) -> Self {
        let (code, detail): (&str, Cow<'_, str>) = match status {
            StatusCode::NOT_FOUND => ("not_found", format!("No route for {method} {path}").into()),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                format!("{method} is not allowed on {path}").into(),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "payload_too_large",
                "The request body is larger than this service accepts".into(),
            ),
            StatusCode::REQUEST_TIMEOUT => (
                "request_timeout",
                "The request took too long and was abandoned".into(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "Send the body as JSON with `Content-Type: application/json`".into(),
            ),
            s if s.is_server_error() => (
                "internal_error",
                "An unexpected error occurred; it has been logged".into(),
            ),
            _ => ("error", status.canonical_reason().unwrap_or("Error").into()),
        };
        Self::new(status, code, detail)
    }

    /// The response: status, `application/problem+json`, and the problem in the extensions so
    /// outer layers can complete it.
    pub fn into_response_with(self, source: Option<Arc<anyhow::Error>>) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A dependency is down or slow: say when trying again makes sense.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        response.extensions_mut().insert(self);
        if let Some(source) = source {
            response.extensions_mut().insert(InternalError(source));
        }
        response
    }
}

/// The cause of a 5xx, kept in the response extensions for the problem layer to log.
#[derive(Debug, Clone)]
pub struct InternalError(pub Arc<anyhow::Error>);

/// An error a handler returns. Build it with the constructors; unexpected failures come in through
/// `From<anyhow::Error>` / `From<sqlx::Error>` and are reported as a generic 500.
#[derive(Debug)]
pub struct ApiError {
    /// Boxed so `Result<T, ApiError>` stays small on the happy path.
    problem: Box<Problem>,
    source: Option<anyhow::Error>,
}

/// Handler result.
pub type ApiResult<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self {
            problem: Box::new(Problem::new(status, code, detail)),
            source: None,
        }
    }

    pub fn not_found(resource: &str, id: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            &format!("{resource}_not_found"),
            format!("No {resource} with id {id}"),
        )
    }

    pub fn bad_request(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn conflict(code: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    /// 422 with one entry per invalid field.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let mut err = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "The request has invalid fields; see `errors`",
        );
        err.problem.errors = errors;
        err
    }

    /// A generic 500; `source` is logged, never sent.
    pub fn internal(source: anyhow::Error) -> Self {
        Self {
            problem: Box::new(Problem::for_status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                "",
            )),
            source: Some(source),
        }
    }

    /// 503 for a dependency that is down; `source` is logged, never sent.
    pub fn unavailable(what: &str, source: anyhow::Error) -> Self {
        Self {
            problem: Box::new(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "dependency_unavailable",
                format!("The {what} is unavailable; try again shortly"),
            )),
            source: Some(source),
        }
    }

    /// Attaches a cause to log (never sent).
    pub fn with_source(mut self, source: Option<anyhow::Error>) -> Self {
        self.source = source;
        self
    }

    /// Adds a per-field entry (e.g. which field a 409 is about).
    pub fn with_field_error(mut self, error: FieldError) -> Self {
        self.problem.errors.push(error);
        self
    }

    /// Replaces the human-readable detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.problem.detail = detail.into();
        self
    }

    pub fn status(&self) -> StatusCode {
        self.problem.status()
    }

    pub fn problem(&self) -> &Problem {
        &self.problem
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.problem.code, self.problem.detail)?;
        if let Some(source) = &self.source {
            write!(f, " ({source:#})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        // A database that is down stays a 503 when it reached the handler wrapped (a cache
        // loader's error, a context): never a 500 for a dependency fault.
        if crate::db::unavailable_cause(&err).is_some() {
            return Self::unavailable("database", err);
        }
        Self::internal(err)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&err) {
            // Unreachable, restarting, out of connections, too slow (the statement timeout), or
            // SQLite's write lock held past the busy timeout: the client may retry.
            Self::unavailable("database", err.into())
        } else if crate::db::is_unique_violation(&err) {
            Self::conflict(
                "conflict",
                "A record with the same unique value already exists",
            )
        } else {
            Self::internal(err.into())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.problem.into_response_with(self.source.map(Arc::new))
    }
}

/// An error chain as kept in a `last_error` column (outbox rows, dead letters): bounded, so a
/// huge error cannot bloat the table.
pub(crate) fn stored_text(err: &anyhow::Error) -> String {
    const MAX_CHARS: usize = 500;
    format!("{err:#}").chars().take(MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_never_leak_their_text() {
        let err = ApiError::internal(anyhow::anyhow!("password=hunter2 at db.internal:5432"));
        let body = serde_json::to_string(err.problem()).expect("serializes");
        assert!(
            !body.contains("hunter2") && !body.contains("db.internal"),
            "{body}"
        );
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.problem().code, "internal_error");
    }

    #[test]
    fn problem_has_the_rfc_9457_members() {
        let mut problem = Problem::new(StatusCode::CONFLICT, "username_taken", "taken");
        problem.request_id = Some("r1".into());
        let json = serde_json::to_value(&problem).expect("serializes");
        for member in ["type", "title", "status", "detail", "code", "request_id"] {
            assert!(json.get(member).is_some(), "missing `{member}` in {json}");
        }
        assert_eq!(json["type"], "/problems/username-taken");
        assert_eq!(json["title"], "Conflict");
        assert_eq!(json["status"], 409);
    }
}
