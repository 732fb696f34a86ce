//! `PATCH /products/{id}/stock`: set and adjust, never below zero, under any concurrency.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    stock_is_set_and_adjusted,
    stock_never_goes_negative,
    concurrent_deltas_never_oversell,
    stock_has_an_upper_bound_that_counts_reserved_units,
    extreme_deltas_are_422_not_wrapped,
);

async fn stock_is_set_and_adjusted(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let path = format!("/api/v1/products/{id}/stock");

    let response = app.patch(&path, json!({"stock": 25})).await;
    assert_eq!(response.status(), 200);
    let product: serde_json::Value = response.json().await.expect("json");
    assert_eq!(product["stock"], 25, "seed 001: set");

    let response = app.patch(&path, json!({"delta": -5})).await;
    assert_eq!(response.status(), 200);
    let product: serde_json::Value = response.json().await.expect("json");
    assert_eq!(product["stock"], 20, "seed 003: adjust down");

    app.patch(&path, json!({"delta": 7})).await;
    assert_eq!(app.stored_stock(id).await, (27, 0), "adjust up");

    assert_problem(
        app.patch("/api/v1/products/999999/stock", json!({"delta": 1}))
            .await,
        404,
        "product_not_found",
    )
    .await;
    assert_problem(
        app.patch("/api/v1/products/999999/stock", json!({"stock": 1}))
            .await,
        404,
        "product_not_found",
    )
    .await;
    for body in [
        json!({}),
        json!({"stock": 1, "delta": 1}),
        json!({"stock": -1}),
        json!({"stock": "many"}),
        json!({"quantity": 1}),
    ] {
        assert_problem(app.patch(&path, body).await, 422, "validation_failed").await;
    }
    assert_eq!(
        app.stored_stock(id).await,
        (27, 0),
        "refused changes change nothing"
    );
}

async fn stock_never_goes_negative(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(3).await;
    let path = format!("/api/v1/products/{id}/stock");
    let problem = assert_problem(
        app.patch(&path, json!({"delta": -4})).await,
        409,
        "insufficient_stock",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "delta");
    assert_eq!(app.stored_stock(id).await, (3, 0));
    assert_eq!(app.patch(&path, json!({"delta": -3})).await.status(), 200);
    assert_eq!(
        app.stored_stock(id).await,
        (0, 0),
        "down to exactly zero is fine"
    );
    assert_problem(
        app.patch(&path, json!({"delta": -1})).await,
        409,
        "insufficient_stock",
    )
    .await;
}

async fn concurrent_deltas_never_oversell(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let path = format!("/api/v1/products/{id}/stock");
    let attempts = (0..50).map(|_| async { app.patch(&path, json!({"delta": -1})).await.status() });
    let statuses = futures::future::join_all(attempts).await;
    let ok = statuses.iter().filter(|s| s.as_u16() == 200).count();
    let refused = statuses.iter().filter(|s| s.as_u16() == 409).count();
    assert_eq!((ok, refused), (10, 40), "{statuses:?}");
    assert_eq!(app.stored_stock(id).await, (0, 0));
    let (_, product) = app.get_json(&format!("/api/v1/products/{id}")).await;
    assert_eq!(product["stock"], 0, "the API agrees with the database");
}

/// The most units a product may hold (sellable + reserved): catalog's `MAX_UNITS`.
const MAX_UNITS: i64 = 1_000_000_000;

async fn stock_has_an_upper_bound_that_counts_reserved_units(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(MAX_UNITS).await;
    let path = format!("/api/v1/products/{id}/stock");
    let problem = assert_problem(
        app.patch(&path, json!({"delta": 1})).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "delta");
    assert_eq!(
        app.stored_stock(id).await,
        (MAX_UNITS, 0),
        "nothing changed"
    );

    // With 10 units reserved, the sellable stock can be set to at most MAX_UNITS - 10, so a
    // release can never push the product past the bound.
    let reserved = app
        .reserve("bound-1", json!([{"product_id": id, "quantity": 10}]))
        .await;
    assert_eq!(reserved.status(), 201);
    let response = app.patch(&path, json!({"stock": MAX_UNITS})).await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "stock");
    let response = app.patch(&path, json!({"stock": MAX_UNITS - 10})).await;
    assert_eq!(response.status(), 200);
    let released = app
        .post("/internal/v1/reservations/bound-1/release", json!({}))
        .await;
    assert_eq!(released.status(), 200);
    assert_eq!(app.stored_stock(id).await, (MAX_UNITS, 0));
}

async fn extreme_deltas_are_422_not_wrapped(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(5).await;
    let path = format!("/api/v1/products/{id}/stock");
    for delta in [
        i64::MIN,
        i64::MIN + 1,
        -MAX_UNITS - 1,
        MAX_UNITS + 1,
        i64::MAX,
    ] {
        let response = app.patch(&path, json!({ "delta": delta })).await;
        let problem = assert_problem(response, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["code"], "out_of_range", "{delta}");
    }
    // Beyond i64 entirely: still a client error, not a 500.
    for body in [r#"{"delta": 9223372036854775808}"#, r#"{"delta": -1e30}"#] {
        let response = app
            .client
            .patch(app.url(&path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("sent");
        assert_problem(response, 422, "validation_failed").await;
    }
    assert_eq!(app.stored_stock(id).await, (5, 0));
}
