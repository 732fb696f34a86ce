//! The route table: longest prefix wins, matched on whole path segments, with optional rewrite.
//! It is data: `[[services.gateway.routes]]` in the configuration.

use kit::Settings;
use kit::config::ConfigError;
use serde::{Deserialize, Serialize};

/// The gateway's own settings: `[services.gateway]` keys besides port, upstreams and schema.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// The route table (see `crates/kit/config/default.toml` for the shipped one).
    pub routes: Vec<Route>,
    /// Peers (load balancers) whose `X-Forwarded-For` is kept and appended to; from anyone else
    /// it is replaced by the peer's address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Requests per window per client address and per user, by route class.
    pub rate_limit: crate::limits::RateLimitSettings,
    /// Active checks of every replica.
    pub health_check: crate::upstream::HealthCheckSettings,
    /// The breaker of every replica.
    pub circuit_breaker: crate::upstream::BreakerSettings,
    /// Browsers on other origins.
    pub cors: crate::cors::CorsSettings,
}

/// One entry of the route table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Matched on whole path segments: `/users` matches `/users` and `/users/1`, not `/usersx`.
    pub prefix: String,
    pub service: String,
    /// Replaces the matched prefix before forwarding (default: forward the path unchanged).
    #[serde(default)]
    pub rewrite: Option<String>,
}

impl GatewaySettings {
    /// Reads `[services.gateway]` and checks every route; errors name the key.
    pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let gateway: GatewaySettings = settings.section(crate::NAME)?;
        gateway.rate_limit.validate()?;
        gateway.health_check.validate()?;
        gateway.cors.layer()?;
        let invalid = |i: usize, field: &str, message: String| ConfigError::Invalid {
            key: format!("services.gateway.routes[{i}].{field}"),
            message,
        };
        for (i, route) in gateway.routes.iter().enumerate() {
            if !route.prefix.starts_with('/') {
                return Err(invalid(
                    i,
                    "prefix",
                    format!("`{}` must start with /", route.prefix),
                ));
            }
            if route.service == crate::NAME || !settings.services.contains_key(&route.service) {
                return Err(invalid(
                    i,
                    "service",
                    format!("unknown service `{}`", route.service),
                ));
            }
            if let Some(rewrite) = &route.rewrite
                && !rewrite.starts_with('/')
            {
                return Err(invalid(
                    i,
                    "rewrite",
                    format!("`{rewrite}` must start with /"),
                ));
            }
        }
        Ok(gateway)
    }
}

/// The table, sorted for longest-prefix matching.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Each entry's prefix, shared: the metrics label of its requests (no copy per request).
    labels: Vec<std::sync::Arc<str>>,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// The route table entry that matched (its prefix): the metrics label of the request.
    pub route: &'a std::sync::Arc<str>,
    pub service: &'a str,
    /// The path to forward (prefix rewritten), without the query.
    pub path: String,
}

/// True when `path` (as received, still percent-encoded) could reach something other than what
/// it names once a hop behind the gateway decodes or normalises it: a `.` or `..` segment, an
/// encoded `/`, `.` or `\\`, or a backslash. Such paths are refused before routing.
pub fn is_ambiguous(path: &str) -> bool {
    // One pass over the bytes, no lower-cased copy: this runs on every request.
    let bytes = path.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\\' => true,
        b'%' => matches!(
            (
                bytes.get(i + 1),
                bytes.get(i + 2).map(u8::to_ascii_lowercase)
            ),
            (Some(b'2'), Some(b'f' | b'e')) | (Some(b'5'), Some(b'c'))
        ),
        // A segment that is `.` or `..`: it starts here and ends at the next `/` or the end.
        b'.' if i == 0 || bytes[i - 1] == b'/' => {
            let rest = &bytes[i + 1..];
            matches!(rest, [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..])
        }
        _ => false,
    })
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        // Longest prefix first; ties keep the configured order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.trim_end_matches('/').len()));
        let labels = routes.iter().map(|r| r.prefix.as_str().into()).collect();
        Self { routes, labels }
    }

    /// The entries, longest prefix first.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The services the table sends traffic to, each once.
    pub fn services(&self) -> Vec<&str> {
        let mut services: Vec<&str> = self.routes.iter().map(|r| r.service.as_str()).collect();
        services.sort_unstable();
        services.dedup();
        services
    }

    pub fn resolve(&self, path: &str) -> Option<Target<'_>> {
        self.routes
            .iter()
            .zip(&self.labels)
            .find_map(|(route, label)| {
                let prefix = route.prefix.trim_end_matches('/');
                let rest = path.strip_prefix(prefix)?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None; // `/users` must not match `/usersx`
                }
                let path = match &route.rewrite {
                    Some(rewrite) => {
                        let base = rewrite.trim_end_matches('/');
                        match (base.is_empty(), rest.is_empty()) {
                            (true, true) => "/".to_owned(),
                            (true, false) => rest.to_owned(),
                            (false, _) => format!("{base}{rest}"),
                        }
                    }
                    None => path.to_owned(),
                };
                Some(Target {
                    route: label,
                    service: &route.service,
                    path,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new(
            GatewaySettings::load(&kit::Settings::defaults())
                .expect("the shipped routes are valid")
                .routes,
        )
    }

    /// Each `(incoming, forwarded)` path goes to `service` as `forwarded`.
    fn assert_routes(table: &RouteTable, service: &str, cases: &[(&str, &str)]) {
        for (incoming, forwarded) in cases {
            let target = table
                .resolve(incoming)
                .unwrap_or_else(|| panic!("{incoming} has no route"));
            assert_eq!(
                (target.service, target.path.as_str()),
                (service, *forwarded),
                "{incoming}"
            );
        }
    }

    #[test]
    fn every_seed_users_path_reaches_the_canonical_api() {
        let cases = [
            ("/api/v1/users", "/api/v1/users"),
            ("/api/v1/users/7", "/api/v1/users/7"),
            ("/users", "/api/v1/users"),
            ("/users/7", "/api/v1/users/7"),
            ("/users/id/7", "/api/v1/users/id/7"),
            ("/users/name/Alice", "/api/v1/users/name/Alice"),
            ("/api/users", "/api/v1/users"),
            ("/api/users/1", "/api/v1/users/1"),
            ("/api/users/health", "/health"),
            ("/api/v1/auth/register", "/api/v1/auth/register"),
            ("/api/v1/auth/login", "/api/v1/auth/login"),
            ("/api/users/register", "/api/v1/auth/register"),
            ("/api/users/login", "/api/v1/auth/login"),
            ("/api/v1/users/me", "/api/v1/users/me"),
        ];
        assert_routes(&table(), "users", &cases);
    }

    #[test]
    fn every_seed_catalog_path_reaches_the_canonical_api() {
        let cases = [
            ("/api/v1/products", "/api/v1/products"),
            ("/api/v1/products/2", "/api/v1/products/2"),
            ("/api/v1/products/2/stock", "/api/v1/products/2/stock"),
            ("/api/v1/categories", "/api/v1/categories"),
            ("/api/inventory/products/123", "/api/v1/products/123"),
            ("/api/inventory/products", "/api/v1/products"),
        ];
        assert_routes(&table(), "catalog", &cases);
        // Reservations are internal: the orders service calls catalog directly.
        assert!(table().resolve("/internal/v1/reservations").is_none());
    }

    #[test]
    fn seed_000_cache_and_notification_paths_reach_their_services() {
        let cache = [
            ("/cache/user:1", "/api/v1/cache/user:1"),
            ("/cache/memory", "/api/v1/cache/memory"),
            ("/api/v1/cache/k", "/api/v1/cache/k"),
        ];
        assert_routes(&table(), "cache", &cache);
        let notify = [
            ("/api/v1/notifications", "/api/v1/notifications"),
            (
                "/api/v1/notifications/3/retry",
                "/api/v1/notifications/3/retry",
            ),
            ("/api/notifications/3", "/api/v1/notifications/3"),
        ];
        assert_routes(&table(), "notify", &notify);
        let chat = [
            ("/api/v1/chats", "/api/v1/chats"),
            ("/api/chats", "/api/v1/chats"),
            ("/api/chats/chat-1", "/api/v1/chats/chat-1"),
            (
                "/api/chats/chat-1/participants/user-2",
                "/api/v1/chats/chat-1/participants/user-2",
            ),
            (
                "/api/chats/participant/user-1",
                "/api/v1/chats/participant/user-1",
            ),
            ("/api/chats/chat-1/stream", "/api/v1/chats/chat-1/stream"),
            ("/api/chats/health", "/health"),
        ];
        assert_routes(&table(), "chat", &chat);
    }

    #[test]
    fn traversal_and_encoded_separators_are_ambiguous() {
        for path in [
            "/api/v1/products/..%2F..%2Finternal/v1/reservations",
            "/api/v1/products/%2e%2e/internal",
            "/api/v1/products/../internal",
            "/api/v1/users/./1",
            "/api/v1/users/1%5c..",
            "/api/v1/users\\1",
            "/api/v1/users/a%2fb",
            "/api/v1/users/.",
            "/api/v1/users/..",
            "..",
        ] {
            assert!(is_ambiguous(path), "{path}");
        }
        for path in [
            "/api/v1/users/1",
            "/users/name/Jo%20Ann",
            "/api/v1/products/..x",
            "/api/v1/products/.hidden/x",
            "/api/v1/products/v1.2",
            "/api/v1/products/...",
            "/api/v1/users/1%2",
            "/",
        ] {
            assert!(!is_ambiguous(path), "{path}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let table = table();
        assert!(table.resolve("/usersx").is_none());
        assert!(table.resolve("/api/v1/usersx/1").is_none());
        assert!(table.resolve("/nothing").is_none());
    }

    #[test]
    fn longest_prefix_wins_regardless_of_order() {
        let route = |prefix: &str, service: &str| Route {
            prefix: prefix.into(),
            service: service.into(),
            rewrite: None,
        };
        let table = RouteTable::new(vec![route("/a", "short"), route("/a/b", "long")]);
        assert_eq!(table.resolve("/a/b/c").map(|t| t.service), Some("long"));
        assert_eq!(table.resolve("/a/c").map(|t| t.service), Some("short"));
    }

    #[test]
    fn routes_must_target_known_services_and_name_the_key() {
        let mut settings = kit::Settings::defaults();
        let gateway = settings
            .services
            .get_mut("gateway")
            .expect("gateway section");
        let routes = gateway.extra.get_mut("routes").expect("routes");
        let bad: figment::value::Value = figment::value::Value::serialize(
            serde_json::json!({"prefix": "/x", "service": "nope"}),
        )
        .expect("value");
        if let figment::value::Value::Array(_, list) = routes {
            list.push(bad);
        }
        let err = GatewaySettings::load(&settings)
            .expect_err("unknown service")
            .to_string();
        assert!(
            err.contains("services.gateway.routes[")
                && err.contains("].service")
                && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_gateway_key_is_refused_by_name() {
        let mut settings = kit::Settings::defaults();
        let gateway = settings
            .services
            .get_mut("gateway")
            .expect("gateway section");
        gateway
            .extra
            .insert("routez".into(), figment::value::Value::from(1));
        let err = GatewaySettings::load(&settings)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("services.gateway") && err.contains("routez"),
            "{err}"
        );
    }
}
