//! Who may call what, decided at the edge on the canonical path a request is forwarded as (after
//! the route table's rewrite, so every seed spelling of a path gets the same rule).
//!
//! | service | path (canonical) | who |
//! |---|---|---|
//! | any | `/health`, `/ready` | anyone |
//! | users | `POST /api/v1/auth/register`, `POST /api/v1/auth/login` | anyone |
//! | users | `/api/v1/users/me` | any signed-in user |
//! | users | `/api/v1/users/{id}`, `/api/v1/users/id/{id}` (every method) | that user, or an admin |
//! | users | everything else (list, create without a password, lookups by name, stats) | admins |
//! | catalog | `GET`/`HEAD`/`OPTIONS` | anyone |
//! | catalog | every write (products, stock, categories) | admins |
//! | cache | `GET`/`HEAD`/`OPTIONS` (values, `/cache/memory`) | anyone |
//! | cache | every write (`POST`/`PUT`/`DELETE /cache/{key}`) | any signed-in user |
//! | notify | everything | any signed-in user; the service shows a user only their own notifications |
//! | chat | everything (the WebSocket too: its token may come as `?access_token=`) | any signed-in user; the service posts and subscribes them as participant `user-<id>`, and only participants may subscribe |
//! | any other service | everything | any signed-in user; the service applies its own rules to the identity it receives (e.g. orders: another user's order is 404) |
//!
//! In `required` mode a request without a token to a route that is not public is 401
//! `unauthenticated`. In `open` mode it is forwarded anonymously; a request that does carry a
//! token gets the same checks as in `required` mode (a user's token writing a product is 403).

use axum::http::Method;
use kit::auth::{AuthMode, Identity};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    SignedIn,
    Admin,
    /// The user with this id, or an admin.
    SelfOrAdmin(i64),
}

/// What the gateway does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Forward,
    /// 401 `unauthenticated`.
    Unauthenticated,
    /// 403 `forbidden`.
    Forbidden,
}

/// The rule for `method path` on `service` (see the module table).
pub fn access(service: &str, method: &Method, path: &str) -> Access {
    if matches!(path, "/health" | "/ready") {
        return Access::Public;
    }
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match service {
        "users" => users_access(method, path),
        "catalog" if read => Access::Public,
        "catalog" => Access::Admin,
        "cache" if read => Access::Public,
        _ => Access::SignedIn,
    }
}

fn users_access(method: &Method, path: &str) -> Access {
    if *method == Method::POST && matches!(path, "/api/v1/auth/register" | "/api/v1/auth/login") {
        return Access::Public;
    }
    if path == "/api/v1/users/me" {
        return Access::SignedIn;
    }
    let own_id = path
        .strip_prefix("/api/v1/users/id/")
        .or_else(|| path.strip_prefix("/api/v1/users/"))
        .and_then(|id| id.parse::<i64>().ok());
    match own_id {
        Some(id) => Access::SelfOrAdmin(id),
        None => Access::Admin,
    }
}

/// The decision for a caller (`None`: no token) under `mode`.
pub fn decide(mode: AuthMode, access: Access, caller: Option<Identity>) -> Decision {
    let Some(caller) = caller else {
        return match (access, mode) {
            (Access::Public, _) | (_, AuthMode::Open) => Decision::Forward,
            (_, AuthMode::Required) => Decision::Unauthenticated,
        };
    };
    let allowed = match access {
        Access::Public | Access::SignedIn => true,
        Access::Admin => caller.is_admin(),
        Access::SelfOrAdmin(id) => caller.is_admin() || caller.user_id == id,
    };
    if allowed {
        Decision::Forward
    } else {
        Decision::Forbidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kit::auth::Role;

    const USER: Identity = Identity {
        user_id: 7,
        role: Role::User,
    };
    const ADMIN: Identity = Identity {
        user_id: 1,
        role: Role::Admin,
    };

    #[test]
    fn the_table_of_the_module_docs() {
        use Access::*;
        let cases = [
            ("users", Method::POST, "/api/v1/auth/register", Public),
            ("users", Method::POST, "/api/v1/auth/login", Public),
            ("users", Method::GET, "/api/v1/auth/login", Admin),
            ("users", Method::GET, "/health", Public),
            ("users", Method::GET, "/api/v1/users/me", SignedIn),
            ("users", Method::GET, "/api/v1/users/7", SelfOrAdmin(7)),
            ("users", Method::PATCH, "/api/v1/users/7", SelfOrAdmin(7)),
            ("users", Method::DELETE, "/api/v1/users/8", SelfOrAdmin(8)),
            ("users", Method::GET, "/api/v1/users/id/7", SelfOrAdmin(7)),
            ("users", Method::GET, "/api/v1/users", Admin),
            ("users", Method::POST, "/api/v1/users", Admin),
            ("users", Method::GET, "/api/v1/users/stats", Admin),
            ("users", Method::GET, "/api/v1/users/name/Alice", Admin),
            ("users", Method::GET, "/api/v1/users/7/x", Admin),
            ("catalog", Method::GET, "/api/v1/products/2", Public),
            ("catalog", Method::GET, "/api/v1/categories", Public),
            ("catalog", Method::POST, "/api/v1/products", Admin),
            ("catalog", Method::PATCH, "/api/v1/products/2/stock", Admin),
            ("catalog", Method::DELETE, "/api/v1/products/2", Admin),
            ("orders", Method::GET, "/api/v1/orders/3", SignedIn),
            ("cache", Method::GET, "/api/v1/cache/k", Public),
            ("cache", Method::GET, "/api/v1/cache/memory", Public),
            ("cache", Method::POST, "/api/v1/cache/k", SignedIn),
            ("cache", Method::DELETE, "/api/v1/cache/k", SignedIn),
            ("notify", Method::GET, "/api/v1/notifications", SignedIn),
            (
                "notify",
                Method::POST,
                "/api/v1/notifications/1/retry",
                SignedIn,
            ),
        ];
        for (service, method, path, expected) in cases {
            assert_eq!(access(service, &method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn modes_differ_only_without_a_token() {
        use Decision::*;
        for access in [Access::SignedIn, Access::Admin, Access::SelfOrAdmin(7)] {
            assert_eq!(decide(AuthMode::Required, access, None), Unauthenticated);
            assert_eq!(decide(AuthMode::Open, access, None), Forward);
        }
        for mode in [AuthMode::Open, AuthMode::Required] {
            assert_eq!(decide(mode, Access::Public, None), Forward);
            assert_eq!(decide(mode, Access::Admin, Some(USER)), Forbidden);
            assert_eq!(decide(mode, Access::Admin, Some(ADMIN)), Forward);
            assert_eq!(decide(mode, Access::SelfOrAdmin(7), Some(USER)), Forward);
            assert_eq!(decide(mode, Access::SelfOrAdmin(8), Some(USER)), Forbidden);
            assert_eq!(decide(mode, Access::SelfOrAdmin(8), Some(ADMIN)), Forward);
        }
    }
}
