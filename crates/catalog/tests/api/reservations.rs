//! Reservations: all lines or none, never oversold under concurrency, and idempotent by order id.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    a_reservation_holds_commits_and_releases_stock,
    a_reservation_takes_every_line_or_none,
    concurrent_reservations_never_oversell,
    repeated_calls_change_nothing,
    concurrent_repeats_of_one_order_reserve_once,
    state_conflicts_are_409,
    totals_and_merged_lines_are_bounded,
);

async fn a_reservation_holds_commits_and_releases_stock(backend: Backend) {
    let app = spawn_app(backend).await;
    let laptop = app
        .create_product(json!({"name": "Laptop", "price": "1299.99", "stock": 5}))
        .await["id"]
        .as_i64()
        .expect("id");
    let mouse = app
        .create_product(json!({"name": "Mouse", "price": "29.99", "stock": 10}))
        .await["id"]
        .as_i64()
        .expect("id");

    let response = app
        .reserve(
            "order-1",
            json!([{"product_id": mouse, "quantity": 2}, {"product_id": laptop, "quantity": 1}]),
        )
        .await;
    assert_eq!(response.status(), 201);
    let text = response.text().await.expect("body");
    let reservation: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(reservation["status"], "reserved");
    assert!(
        text.contains(r#""total":1359.97"#),
        "total from catalog prices: {text}"
    );
    assert_eq!(
        reservation["items"][0]["product_id"], laptop,
        "lines in product order"
    );
    assert_eq!(reservation["items"][1]["line_total"].as_f64(), Some(59.98));
    assert_eq!(app.stored_stock(laptop).await, (4, 1));
    assert_eq!(app.stored_stock(mouse).await, (8, 2));

    let (status, fetched) = app.get_json("/internal/v1/reservations/order-1").await;
    assert_eq!((status, &fetched), (200, &reservation));

    let response = app.settle("order-1", "commit").await;
    assert_eq!(response.status(), 200);
    let committed: Value = response.json().await.expect("json");
    assert_eq!(committed["status"], "committed");
    let (_, stored) = app.get_json("/internal/v1/reservations/order-1").await;
    assert_eq!(committed, stored, "the commit answers what it stored");
    assert_eq!(
        app.stored_stock(laptop).await,
        (4, 0),
        "sold units leave `reserved`"
    );
    assert_eq!(app.stored_stock(mouse).await, (8, 0));

    app.reserve("order-2", json!([{"product_id": mouse, "quantity": 3}]))
        .await;
    assert_eq!(app.stored_stock(mouse).await, (5, 3));
    let response = app.settle("order-2", "release").await;
    assert_eq!(response.status(), 200);
    let released: Value = response.json().await.expect("json");
    assert_eq!(released["status"], "released");
    assert_eq!(
        app.stored_stock(mouse).await,
        (8, 0),
        "released units are back on sale"
    );

    assert_problem(
        app.get("/internal/v1/reservations/nobody").await,
        404,
        "reservation_not_found",
    )
    .await;
}

async fn a_reservation_takes_every_line_or_none(backend: Backend) {
    let app = spawn_app(backend).await;
    let plenty = app.product_with_stock(10).await;
    let scarce = app.product_with_stock(1).await;
    let problem = assert_problem(
        app.reserve(
            "order-1",
            json!([{"product_id": plenty, "quantity": 5}, {"product_id": scarce, "quantity": 2}]),
        )
        .await,
        409,
        "insufficient_stock",
    )
    .await;
    assert_eq!(
        problem["errors"][0]["field"], "items[1].quantity",
        "{problem}"
    );
    assert_eq!(
        app.stored_stock(plenty).await,
        (10, 0),
        "the first line was rolled back"
    );
    assert_eq!(app.stored_stock(scarce).await, (1, 0));
    assert_eq!(
        app.get("/internal/v1/reservations/order-1").await.status(),
        404,
        "a refused reservation leaves no trace"
    );

    let problem = assert_problem(
        app.reserve(
            "order-2",
            json!([{"product_id": plenty, "quantity": 1}, {"product_id": 987654, "quantity": 1}]),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["errors"][0]["code"], "not_found");
    assert_eq!(app.stored_stock(plenty).await, (10, 0));

    for body in [
        json!({"order_id": "o", "items": []}),
        json!({"order_id": "", "items": [{"product_id": plenty, "quantity": 1}]}),
        json!({"order_id": "o", "items": [{"product_id": plenty, "quantity": 0}]}),
        json!({"order_id": "o", "items": [{"product_id": plenty, "quantity": -1}]}),
        json!({"order_id": "o", "items": [{"product_id": plenty}]}),
        json!({"order_id": "o"}),
    ] {
        assert_problem(
            app.post("/internal/v1/reservations", body).await,
            422,
            "validation_failed",
        )
        .await;
    }
    // Lines of the same product are merged: 6 + 5 > 10 is refused as a whole.
    assert_problem(
        app.reserve(
            "order-3",
            json!([{"product_id": plenty, "quantity": 6}, {"product_id": plenty, "quantity": 5}]),
        )
        .await,
        409,
        "insufficient_stock",
    )
    .await;
    assert_eq!(app.stored_stock(plenty).await, (10, 0));
}

async fn concurrent_reservations_never_oversell(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let attempts = (0..50).map(|i| {
        let app = &app;
        async move {
            app.reserve(
                &format!("order-{i}"),
                json!([{"product_id": id, "quantity": 1}]),
            )
            .await
            .status()
            .as_u16()
        }
    });
    let statuses = futures::future::join_all(attempts).await;
    let reserved = statuses.iter().filter(|&&s| s == 201).count();
    let refused = statuses.iter().filter(|&&s| s == 409).count();
    assert_eq!((reserved, refused), (10, 40), "{statuses:?}");
    assert_eq!(
        app.stored_stock(id).await,
        (0, 10),
        "stock ends at 0, never below"
    );
}

async fn repeated_calls_change_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let items = json!([{"product_id": id, "quantity": 3}]);

    let first = app.reserve("order-1", items.clone()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.expect("json");
    for _ in 0..3 {
        let again = app.reserve("order-1", items.clone()).await;
        assert_eq!(again.status(), 200, "a repeat is not a new reservation");
        let again: Value = again.json().await.expect("json");
        assert_eq!(again, first, "a repeat returns the first result");
    }
    assert_eq!(app.stored_stock(id).await, (7, 3), "reserved once");

    for _ in 0..3 {
        assert_eq!(app.settle("order-1", "release").await.status(), 200);
        assert_eq!(app.stored_stock(id).await, (10, 0), "released once");
    }

    app.reserve("order-2", items.clone()).await;
    for _ in 0..3 {
        assert_eq!(app.settle("order-2", "commit").await.status(), 200);
        assert_eq!(app.stored_stock(id).await, (7, 0), "committed once");
    }
    let again = app.reserve("order-2", items).await;
    assert_eq!(
        again.status(),
        200,
        "reserving a committed order again is a no-op"
    );
    assert_eq!(app.stored_stock(id).await, (7, 0));
}

async fn concurrent_repeats_of_one_order_reserve_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let attempts = (0..10).map(|_| async {
        app.reserve("order-1", json!([{"product_id": id, "quantity": 2}]))
            .await
            .status()
            .as_u16()
    });
    let statuses = futures::future::join_all(attempts).await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(app.stored_stock(id).await, (8, 2));
}

async fn state_conflicts_are_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    let one = json!([{"product_id": id, "quantity": 1}]);

    app.reserve("released", one.clone()).await;
    app.settle("released", "release").await;
    assert_problem(
        app.settle("released", "commit").await,
        409,
        "reservation_released",
    )
    .await;
    assert_problem(
        app.reserve("released", one.clone()).await,
        409,
        "reservation_released",
    )
    .await;

    app.reserve("committed", one.clone()).await;
    app.settle("committed", "commit").await;
    assert_problem(
        app.settle("committed", "release").await,
        409,
        "reservation_committed",
    )
    .await;

    app.reserve("held", one.clone()).await;
    assert_problem(
        app.reserve("held", json!([{"product_id": id, "quantity": 2}]))
            .await,
        409,
        "reservation_mismatch",
    )
    .await;

    assert_problem(
        app.settle("never", "commit").await,
        404,
        "reservation_not_found",
    )
    .await;
    // Releasing an order that never reserved (its reserve failed or is still in flight) records
    // the release, so a late, retried reserve cannot hold stock forever.
    let response = app.settle("late", "release").await;
    assert_eq!(response.status(), 200);
    assert_problem(app.reserve("late", one).await, 409, "reservation_released").await;

    assert_eq!(
        app.stored_stock(id).await,
        (8, 1),
        "committed 1, held 1, the rest on sale"
    );
}

/// A reservation whose total would pass the money bound (10^13 cents), or whose duplicate lines
/// add up past the unit bound, is refused with 422 and holds nothing.
async fn totals_and_merged_lines_are_bounded(backend: Backend) {
    let app = spawn_app(backend).await;
    let yacht = app
        .create_product(json!({"name": "Yacht", "price": "99999999999.99", "stock": 1000}))
        .await;
    let id = yacht["id"].as_i64().expect("id");
    let response = app
        .reserve("rich-1", json!([{"product_id": id, "quantity": 2}]))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["code"], "total_too_large");
    assert_eq!(app.stored_stock(id).await, (1000, 0), "nothing was held");
    // The order id was not used up by the refusal.
    let response = app
        .reserve("rich-1", json!([{"product_id": id, "quantity": 1}]))
        .await;
    assert_eq!(response.status(), 201);

    let response = app
        .reserve(
            "merged-1",
            json!([{"product_id": id, "quantity": 1_000_000_000},
                   {"product_id": id, "quantity": 1_000_000_000}]),
        )
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "items");
}
