//! CORS at the edge: browsers on the configured origins may call the API; preflights are
//! answered by the gateway itself (they never reach a service or a rate limit). No origins
//! configured (the default): no CORS headers at all, so browsers keep the same-origin rule.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method};
use kit::config::ConfigError;
use serde::{Deserialize, Serialize};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// `[services.gateway.cors]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSettings {
    /// Exact origins (`https://shop.example.com`), or `"*"` for any; empty: CORS off.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    /// Response headers a browser script may read.
    pub exposed_headers: Vec<String>,
    /// Cookies and `Authorization` from the browser (not with `"*"`).
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    pub max_age_secs: u64,
}

impl Default for CorsSettings {
    fn default() -> Self {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        Self {
            allowed_origins: Vec::new(),
            allowed_methods: strings(&["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
            allowed_headers: strings(&[
                "authorization",
                "content-type",
                "idempotency-key",
                "x-request-id",
                "traceparent",
                "tracestate",
            ]),
            exposed_headers: strings(&[
                "x-request-id",
                "location",
                "retry-after",
                "ratelimit",
                "ratelimit-policy",
                "idempotent-replayed",
            ]),
            allow_credentials: false,
            max_age_secs: 600,
        }
    }
}

impl CorsSettings {
    /// The layer, or `None` when no origin is allowed. Errors name the key.
    pub fn layer(&self) -> Result<Option<CorsLayer>, ConfigError> {
        if self.allowed_origins.is_empty() {
            return Ok(None);
        }
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: format!("services.gateway.cors.{key}"),
            message,
        };
        let any = self.allowed_origins.iter().any(|o| o == "*");
        if any && self.allow_credentials {
            return Err(invalid(
                "allow_credentials",
                "cannot be true with the origin \"*\" (browsers refuse it): list the origins"
                    .into(),
            ));
        }
        let origin = if any {
            AllowOrigin::any()
        } else {
            let origins = self
                .allowed_origins
                .iter()
                .map(|o| {
                    let trimmed = o.trim_end_matches('/');
                    url::Url::parse(trimmed)
                        .ok()
                        .filter(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/")
                        .and_then(|_| HeaderValue::from_str(trimmed).ok())
                        .ok_or_else(|| {
                            invalid(
                                "allowed_origins",
                                format!("`{o}` is not an origin (scheme://host[:port])"),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(origins)
        };
        let methods = self
            .allowed_methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| invalid("allowed_methods", format!("`{m}` is not a method")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let names = |key: &str, list: &[String]| {
            list.iter()
                .map(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| invalid(key, format!("`{h}` is not a header name")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Some(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods(methods)
                .allow_headers(names("allowed_headers", &self.allowed_headers)?)
                .expose_headers(names("exposed_headers", &self.exposed_headers)?)
                .allow_credentials(self.allow_credentials)
                .max_age(Duration::from_secs(self.max_age_secs)),
        ))
    }
}
