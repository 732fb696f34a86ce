//! What an order request may say, and the rules an order obeys: each seed's body, totals from
//! catalog prices, names of what does not exist, stock that never oversells, the status state
//! machine, dependencies that are down.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_system, spawn_system_with};
use kit::testing::Backend;

kit::on_both_backends!(
    every_seed_body_is_accepted,
    strict_mode_refuses_a_client_total_that_disagrees,
    unknown_users_and_products_are_422_naming_them,
    thirty_concurrent_orders_for_five_units_accept_exactly_five,
    invalid_transitions_are_409_with_the_allowed_states,
);

async fn every_seed_body_is_accepted(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let keyboard = system.product("Pro Keyboard", "129.00", 10).await;
    let mouse = system.product("Mouse", "29.99", 10).await;

    // Seed 001: one product and a client total that disagrees (its own test client does).
    let order = system
        .accepted(
            json!({"user_id": user, "product_id": mouse, "quantity": 2, "total_price": 1998.00}),
        )
        .await;
    assert_eq!(
        order["total_price"], 59.98,
        "computed, not trusted: {order}"
    );
    assert_eq!(order["client_total_price"], 1998.0);
    let warning = order["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.contains("1998.00") && warning.contains("59.98"),
        "{order}"
    );
    assert_eq!(
        (order["product_id"].as_i64(), order["quantity"].as_i64()),
        (Some(mouse), Some(2))
    );

    // Seed 002: the product by name, through its own path.
    let response = system
        .post(
            "/orders",
            json!({"user_id": user, "item": "Pro Keyboard", "quantity": 2}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("order");
    assert_eq!(order["items"][0]["product_id"], keyboard);
    assert_eq!(order["total"], 258.0);
    let (status, read) = system.get_json(&format!("/orders/{}", order["id"])).await;
    assert_eq!((status, &read["id"]), (200, &order["id"]));

    // Seed 003: items with ids as strings, through its own path.
    let response = system
        .post(
            "/api/orders",
            json!({"user_id": user, "items": [
                {"product_id": keyboard.to_string(), "quantity": 1},
                {"product_id": mouse.to_string(), "quantity": 1}]}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("order");
    assert_eq!(order["total"], 158.99, "{order}");
    assert_eq!(order["items"].as_array().map(Vec::len), Some(2));
    assert!(
        order.get("warnings").is_none(),
        "no client total, no warning: {order}"
    );
}

async fn strict_mode_refuses_a_client_total_that_disagrees(backend: Backend) {
    let system = spawn_system_with(backend, |settings| {
        let orders = settings.services.entry("orders".into()).or_default();
        orders
            .extra
            .insert("strict_client_total".into(), true.into());
    })
    .await;
    let user = system.user().await;
    let mouse = system.product("Mouse", "29.99", 10).await;
    let response = system
        .order(json!({"user_id": user, "product_id": mouse, "quantity": 2, "total_price": 1998.00}))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "total_price", "{problem}");
    assert_eq!(system.stock(mouse).await, (10, 0), "nothing held");
    let order = system
        .accepted(
            json!({"user_id": user, "product_id": mouse, "quantity": 2, "total_price": 59.98}),
        )
        .await;
    assert!(order.get("warnings").is_none(), "{order}");
}

async fn unknown_users_and_products_are_422_naming_them(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Cup", "2.00", 10).await;
    let cases = [
        (
            json!({"user_id": 999_999, "product_id": product, "quantity": 1}),
            "user_id",
        ),
        (
            json!({"user_id": user, "product_id": 999_999, "quantity": 1}),
            "product_id",
        ),
        (
            json!({"user_id": user, "item": "No Such Thing", "quantity": 1}),
            "item",
        ),
        (
            json!({"user_id": user, "items": [{"product_id": product, "quantity": 1},
                {"product_id": 999_999, "quantity": 1}]}),
            "items[1].product_id",
        ),
        (
            json!({"user_id": user, "product_id": product, "quantity": 0}),
            "quantity",
        ),
        (json!({"user_id": user}), "items"),
    ];
    for (body, field) in cases {
        let problem =
            assert_problem(system.order(body.clone()).await, 422, "validation_failed").await;
        assert!(
            problem["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["field"] == field),
            "{body}: expected `{field}` named in {problem}"
        );
    }
    assert_eq!(
        system.stock(product).await,
        (10, 0),
        "nothing held by a refused order"
    );
    let response = system
        .post_raw(
            "/api/v1/orders",
            Some("application/json"),
            r#"{"user_id": "#,
        )
        .await;
    assert_problem(response, 400, "malformed_json").await;
}

async fn thirty_concurrent_orders_for_five_units_accept_exactly_five(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Rare", "10.00", 5).await;
    let body = json!({"user_id": user, "product_id": product, "quantity": 1});
    let responses = futures::future::join_all((0..30).map(|_| system.order(body.clone()))).await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for response in responses {
        match response.status().as_u16() {
            201 => accepted.push(
                response.json::<Value>().await.expect("order")["id"]
                    .as_i64()
                    .expect("id"),
            ),
            409 => {
                let problem = assert_problem(response, 409, "insufficient_stock").await;
                assert_eq!(problem["errors"][0]["field"], "quantity", "{problem}");
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((accepted.len(), refused), (5, 25));
    for id in accepted {
        system.until_status(id, "processed").await;
    }
    assert_eq!(
        system.stock(product).await,
        (0, 0),
        "five sold, none oversold"
    );
}

async fn invalid_transitions_are_409_with_the_allowed_states(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Hat", "8.00", 5).await;
    let order = system
        .accepted(json!({"user_id": user, "product_id": product, "quantity": 1}))
        .await;
    let id = order["id"].as_i64().expect("id");
    system.until_status(id, "processed").await;
    let response = system
        .patch(
            &format!("/api/v1/orders/{id}/status"),
            json!({"status": "pending"}),
        )
        .await;
    let problem = assert_problem(response, 409, "invalid_transition").await;
    let allowed: Vec<&str> = problem["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(allowed, ["shipped", "cancelled"], "{problem}");
    let response = system
        .patch(
            &format!("/api/v1/orders/{id}/status"),
            json!({"status": "lost"}),
        )
        .await;
    assert_eq!(response.status(), 422, "an unknown status");
    let response = system
        .patch("/api/v1/orders/999999/status", json!({"status": "shipped"}))
        .await;
    assert_problem(response, 404, "order_not_found").await;
}

/// A neighbour that is down makes an order a 503 with Retry-After, never a 500, and holds
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_down_is_503_and_holds_nothing() {
    let system = spawn_system_with(Backend::Sqlite, |settings| {
        let users = settings.services.entry("users".into()).or_default();
        users.upstreams = vec![url::Url::parse("http://127.0.0.1:1").expect("url")];
    })
    .await;
    let response = system
        .order(json!({"user_id": 1, "product_id": 1, "quantity": 1}))
        .await;
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert_problem(response, 503, "dependency_unavailable").await;
}
