//! The asynchronous flow: accepted at once as `pending`, processed by the worker, stock taken
//! exactly once, every step announced in order; a declined payment fails the order and gives the
//! stock back; a cancellation releases (or, once sold, returns) it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{spawn_system, spawn_system_with};
use kit::testing::Backend;

kit::on_both_backends!(
    an_order_is_accepted_at_once_and_processed_by_the_worker,
    a_declined_payment_fails_the_order_and_restores_the_stock,
    cancelling_releases_held_stock_and_returns_sold_stock,
    every_status_change_is_announced_in_order,
);

async fn an_order_is_accepted_at_once_and_processed_by_the_worker(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Lamp", "12.50", 10).await;

    let order = system
        .accepted(json!({"user_id": user, "items": [{"product_id": product, "quantity": 3}]}))
        .await;
    assert_eq!(
        order["status"], "pending",
        "answered before processing: {order}"
    );
    assert_eq!(
        order["total"], 37.5,
        "computed from catalog's price: {order}"
    );
    assert_eq!(order["items"][0]["unit_price"], 12.5);
    assert_eq!(system.stock(product).await, (7, 3), "held at once");

    let id = order["id"].as_i64().expect("id");
    let processed = system.until_status(id, "processed").await;
    assert!(processed["processed_at"].is_string(), "{processed}");
    assert_eq!(system.stock(product).await, (7, 0), "sold exactly once");

    // Read through the cache, and listed with filters.
    let (status, again) = system.get_json(&format!("/api/v1/orders/{id}")).await;
    assert_eq!((status, &again["status"]), (200, &json!("processed")));
    let (_, list) = system
        .get_json(&format!("/api/v1/orders?user_id={user}&status=processed"))
        .await;
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["items"][0]["id"], id);
    let (_, none) = system.get_json("/api/v1/orders?status=failed").await;
    assert_eq!(none["total"], 0);
    let (_, stats) = system.get_json("/api/v1/orders/stats").await;
    assert_eq!(stats["by_status"]["processed"], 1, "{stats}");
    assert_eq!(
        (
            &stats["worker"]["queued"],
            &stats["worker"]["dead_lettered"]
        ),
        (&json!(0), &json!(0)),
        "{stats}"
    );
    assert!(stats["processing_latency_ms"]["p99"].is_i64(), "{stats}");
    // The gateway's /api/v1/stats puts every service's side by side.
    let (status, all) = system.get_json("/api/v1/stats").await;
    assert_eq!(status, 200);
    assert_eq!(
        all["services"]["orders"]["by_status"]["processed"], 1,
        "{all}"
    );
    assert_eq!(all["services"]["catalog"]["products"], 1, "{all}");
    assert!(all["services"]["users"].is_object(), "{all}");

    // Shipped and completed by hand, as seed 001 does.
    for next in ["shipped", "completed"] {
        let response = system
            .patch(
                &format!("/api/v1/orders/{id}/status"),
                json!({"status": next}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let order: Value = response.json().await.expect("order");
        assert_eq!(order["status"], next);
    }
    assert_eq!(system.stock(product).await, (7, 0), "unchanged by shipping");
}

async fn a_declined_payment_fails_the_order_and_restores_the_stock(backend: Backend) {
    let system = spawn_system_with(backend, |settings| {
        let worker = settings.services.entry("worker".into()).or_default();
        worker
            .extra
            .insert("payment_failure_rate".into(), 1.0.into());
    })
    .await;
    let user = system.user().await;
    let product = system.product("Vase", "5.00", 4).await;
    let order = system
        .accepted(json!({"user_id": user, "product_id": product, "quantity": 4}))
        .await;
    assert_eq!(system.stock(product).await, (0, 4));
    let failed = system
        .until_status(order["id"].as_i64().expect("id"), "failed")
        .await;
    assert_eq!(failed["failure_reason"], "payment declined (simulated)");
    assert_eq!(
        system.stock(product).await,
        (4, 0),
        "every unit back on sale"
    );
}

async fn cancelling_releases_held_stock_and_returns_sold_stock(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Mug", "3.00", 10).await;

    // Sold first, then cancelled: the units come back.
    let sold = system
        .accepted(json!({"user_id": user, "product_id": product, "quantity": 2}))
        .await;
    let sold_id = sold["id"].as_i64().expect("id");
    system.until_status(sold_id, "processed").await;
    assert_eq!(system.stock(product).await, (8, 0));
    let response = system
        .post(
            &format!("/api/v1/orders/{sold_id}/cancel"),
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let cancelled = system.until_status(sold_id, "cancelled").await;
    assert_eq!(cancelled["failure_reason"], "changed my mind");
    assert_eq!(system.stock(product).await, (10, 0), "returned");
    // Cancelling again changes nothing.
    let response = system
        .post(&format!("/api/v1/orders/{sold_id}/cancel"), json!({}))
        .await;
    assert_eq!(response.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(system.stock(product).await, (10, 0), "returned once");

    // Cancelled at once, racing the worker (pending, processing or processed by then, each of
    // which may be cancelled), with no body at all: the units come back whatever it had done.
    let held = system
        .accepted(json!({"user_id": user, "product_id": product, "quantity": 5}))
        .await;
    let held_id = held["id"].as_i64().expect("id");
    let response = system
        .post_raw(&format!("/api/v1/orders/{held_id}/cancel"), None, "")
        .await;
    assert_eq!(response.status(), 200);
    system.until_status(held_id, "cancelled").await;
    assert_eq!(system.stock(product).await, (10, 0), "released or returned");
}

async fn every_status_change_is_announced_in_order(backend: Backend) {
    let system = spawn_system(backend).await;
    let mut events = system
        .bus
        .subscribe("order-events-test", &["order.*"])
        .await
        .expect("subscribe");
    let user = system.user().await;
    let product = system.product("Pen", "1.00", 5).await;
    let order = system
        .accepted(json!({"user_id": user, "product_id": product, "quantity": 1}))
        .await;
    let id = order["id"].as_i64().expect("id");
    system.until_status(id, "processed").await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("subscription open")
            .expect("delivery");
        let event = delivery.message.event().expect("event");
        delivery.ack().await.expect("ack");
        if event.data["id"] == id {
            seen.push((event.topic.clone(), event.data["status"].clone()));
        }
    }
    assert_eq!(
        seen,
        [
            ("order.created".to_owned(), json!("pending")),
            ("order.processing".to_owned(), json!("processing")),
            ("order.processed".to_owned(), json!("processed")),
        ]
    );
}

/// What a crash of the orders service between reserving and storing leaves behind (an intent and
/// a reservation at catalog, no order) is released after `reservation_timeout_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_held_for_an_order_never_stored_is_released_after_the_timeout() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let system = spawn_system_with(backend, |settings| {
            let orders = settings.services.entry("orders".into()).or_default();
            orders
                .extra
                .insert("reservation_timeout_secs".into(), 5.into());
        })
        .await;
        let product = system.product("Kettle", "20.00", 10).await;
        let reservation = "ord-crashed-before-insert";
        kit::db::query(
            "insert into reservation_intents (reservation_id, created_at) values ($1, $2)",
        )
        .bind(reservation)
        .bind(chrono::Utc::now())
        .execute(&system.db)
        .await
        .expect("intent");
        let response = system
            .catalog_request(
                "/internal/v1/reservations",
                json!({"order_id": reservation, "items": [{"product_id": product, "quantity": 3}]}),
            )
            .await;
        assert_eq!(response.status(), 201);
        assert_eq!(system.stock(product).await, (7, 3));
        // Released at catalog, then the intent forgotten (in that order): wait for both.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let stock = system.stock(product).await;
            let left: i64 = kit::db::query("select count(*) from reservation_intents")
                .fetch_scalar(&system.db)
                .await
                .expect("count");
            if stock == (10, 0) && left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{backend:?}: after 15 s, stock {stock:?} and {left} intents left"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
