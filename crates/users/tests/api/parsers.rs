//! Whatever a client sends (made-up ids and names, query values, bodies with seed aliases and
//! hostile values), the users service answers below 500, and every refusal is a problem body.

use kit::testing::Backend;
use kit::testing::fuzz::{Target, check_requests};

use crate::helpers::spawn_app;

static USERS: Target = Target {
    routes: &[
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("GET", "/api/v1/users/{}"),
        ("PUT", "/api/v1/users/{}"),
        ("PATCH", "/api/v1/users/{}"),
        ("DELETE", "/api/v1/users/{}"),
        ("GET", "/api/v1/users/id/{}"),
        ("GET", "/api/v1/users/username/{}"),
        ("GET", "/api/v1/users/name/{}"),
        ("GET", "/api/v1/users/stats"),
    ],
    body_fields: &["username", "email", "name", "full_name"],
    query_keys: &["page", "per_page"],
};

#[test]
fn sqlite_requests_never_fail_on_the_server() {
    check_requests(Backend::Sqlite, spawn_app, &USERS, 500);
}

#[test]
fn postgres_requests_never_fail_on_the_server() {
    check_requests(Backend::Postgres, spawn_app, &USERS, 500);
}
