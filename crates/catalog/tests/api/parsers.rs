//! Whatever a client sends (made-up ids, query values, bodies with seed aliases and hostile
//! values), the catalog answers below 500, and every refusal is a problem body.

use kit::testing::Backend;
use kit::testing::fuzz::{Target, check_requests};

use crate::helpers::spawn_app;

static CATALOG: Target = Target {
    routes: &[
        ("GET", "/api/v1/products"),
        ("POST", "/api/v1/products"),
        ("GET", "/api/v1/products/{}"),
        ("PUT", "/api/v1/products/{}"),
        ("PATCH", "/api/v1/products/{}"),
        ("DELETE", "/api/v1/products/{}"),
        ("PATCH", "/api/v1/products/{}/stock"),
        ("GET", "/api/inventory/products/{}"),
        ("GET", "/api/v1/categories"),
        ("POST", "/internal/v1/reservations"),
        ("GET", "/internal/v1/reservations/{}"),
        ("POST", "/internal/v1/reservations/{}/commit"),
        ("POST", "/internal/v1/reservations/{}/release"),
    ],
    body_fields: &[
        "name",
        "description",
        "price",
        "stock",
        "delta",
        "category",
        "sku",
        "low_stock_threshold",
        "order_id",
        "items",
        "product_id",
        "quantity",
    ],
    query_keys: &["page", "per_page", "category"],
};

#[test]
fn sqlite_requests_never_fail_on_the_server() {
    check_requests(Backend::Sqlite, spawn_app, &CATALOG, 500);
}

#[test]
fn postgres_requests_never_fail_on_the_server() {
    check_requests(Backend::Postgres, spawn_app, &CATALOG, 500);
}
