//! Events: written to the outbox in the transaction of the change (so a failed event write undoes
//! the change), then published by the relay to the bus (in process, or NATS JetStream).

use std::time::Duration;

use kit::outbox::Event;
use serde_json::json;

use crate::helpers::{TestApp, assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    a_failed_event_write_rolls_the_change_back,
    changes_are_published_in_order_with_stock_low_once,
    reservations_announce_their_stock_changes,
);

/// The next `n` events on `subscription`, acked; fails after 10 s.
async fn next_events(subscription: &mut kit::bus::Subscription, n: usize) -> Vec<Event> {
    let mut events = Vec::new();
    while events.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived: {events:?}", events.len()))
            .expect("subscription open")
            .expect("delivery");
        let event: Event = serde_json::from_slice(&delivery.message.payload).expect("event json");
        assert_eq!(delivery.message.topic, event.topic);
        assert_eq!(delivery.message.id, event.id.to_string());
        delivery.ack().await.expect("ack");
        events.push(event);
    }
    events
}

async fn outbox_backlog(app: &TestApp) -> i64 {
    kit::outbox::backlog(&app.db).await.expect("backlog")
}

async fn a_failed_event_write_rolls_the_change_back(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(10).await;
    // Sabotage: with the outbox gone, every event write fails.
    kit::db::query("drop table outbox")
        .execute(&app.db)
        .await
        .expect("drop outbox");

    let path = format!("/api/v1/products/{id}");
    assert_problem(
        app.patch(&format!("{path}/stock"), json!({"delta": -4}))
            .await,
        500,
        "internal_error",
    )
    .await;
    assert_problem(
        app.patch(&format!("{path}/stock"), json!({"stock": 1}))
            .await,
        500,
        "internal_error",
    )
    .await;
    assert_problem(
        app.reserve("order-1", json!([{"product_id": id, "quantity": 2}]))
            .await,
        500,
        "internal_error",
    )
    .await;
    assert_eq!(
        app.stored_stock(id).await,
        (10, 0),
        "no stock change without its event"
    );
    assert!(
        app.get("/internal/v1/reservations/order-1").await.status() == 404,
        "no reservation without its event"
    );
    assert_problem(
        app.patch(&path, json!({"name": "Renamed"})).await,
        500,
        "internal_error",
    )
    .await;
    assert_problem(
        app.post("/api/v1/products", json!({"name": "New", "price": 1}))
            .await,
        500,
        "internal_error",
    )
    .await;
    let (_, product) = app.get_json(&path).await;
    assert_eq!(product["name"], "Widget");
    let (_, list) = app.get_json("/api/v1/products").await;
    assert_eq!(list["total"], 1, "no product without its event");
}

async fn changes_are_published_in_order_with_stock_low_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut subscription = app
        .bus
        .subscribe("catalog-test", &["product.*", "stock.*"])
        .await
        .expect("subscribe");

    let product = app
        .create_product(json!({"name": "Lamp", "price": 10, "stock": 6, "low_stock_threshold": 5}))
        .await;
    let id = product["id"].as_i64().expect("id");
    let stock = format!("/api/v1/products/{id}/stock");
    assert_eq!(app.patch(&stock, json!({"delta": -2})).await.status(), 200);
    assert_eq!(app.patch(&stock, json!({"delta": -1})).await.status(), 200);
    assert_eq!(app.patch(&stock, json!({"stock": 8})).await.status(), 200);
    // No change, no event.
    assert_eq!(app.patch(&stock, json!({"stock": 8})).await.status(), 200);
    assert_eq!(app.patch(&stock, json!({"delta": 0})).await.status(), 200);
    assert_eq!(app.patch(&stock, json!({"stock": 0})).await.status(), 200);

    let events = next_events(&mut subscription, 7).await;
    let topics: Vec<&str> = events.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "product.created",
            "stock.changed",
            "stock.low",     // 6 -> 4 crosses the threshold of 5
            "stock.changed", // 4 -> 3: already low, no second stock.low
            "stock.changed", // 3 -> 8: restocked
            "stock.changed",
            "stock.low", // 8 -> 0 crosses it again
        ]
    );
    for event in &events {
        assert_eq!(event.source, "catalog");
        assert_eq!(event.key, format!("product:{id}"));
    }
    assert_eq!(events[0].data["price"].as_f64(), Some(10.0));
    assert_eq!(
        events[1].data,
        json!({"product_id": id, "sku": product["sku"], "previous": 6, "stock": 4, "delta": -2,
               "reserved": 0, "reason": "adjust"})
    );
    assert_eq!(
        events[2].data,
        json!({"product_id": id, "sku": product["sku"], "name": "Lamp", "stock": 4, "threshold": 5})
    );
    assert_eq!(events[4].data["reason"], "set");
    assert_eq!(
        (
            events[4].data["previous"].as_i64(),
            events[4].data["stock"].as_i64()
        ),
        (Some(3), Some(8))
    );

    // Everything published is marked so: the outbox drains.
    let drained = async {
        while outbox_backlog(&app).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("the outbox drains");
    let (_, stats) = app.get_json("/api/v1/products/stats").await;
    assert_eq!(stats["outbox_backlog"], 0, "{stats}");
    app.bus.delete_stream().await.expect("delete test stream");
}

async fn reservations_announce_their_stock_changes(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(12).await; // default threshold 10
    let mut subscription = app
        .bus
        .subscribe("catalog-test", &["stock.*"])
        .await
        .expect("subscribe");

    let response = app
        .reserve("order-7", json!([{"product_id": id, "quantity": 3}]))
        .await;
    assert_eq!(response.status(), 201);
    // A repeat changes nothing and announces nothing.
    app.reserve("order-7", json!([{"product_id": id, "quantity": 3}]))
        .await;
    app.settle("order-7", "release").await;
    app.settle("order-7", "release").await;

    let events = next_events(&mut subscription, 3).await;
    let summary: Vec<(String, serde_json::Value, serde_json::Value)> = events
        .iter()
        .map(|e| {
            (
                e.topic.clone(),
                e.data["reason"].clone(),
                e.data["stock"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("stock.changed".into(), json!("reserve"), json!(9)),
            ("stock.low".into(), json!(null), json!(9)),
            ("stock.changed".into(), json!("release"), json!(12)),
        ]
    );
    assert_eq!(events[0].data["order_id"], "order-7");
    assert_eq!(events[0].data["reserved"], 3);
    // Nothing more: the repeats were silent.
    let extra = tokio::time::timeout(Duration::from_millis(500), subscription.next()).await;
    assert!(
        extra.is_err(),
        "no event for repeated calls: {:?}",
        extra.ok().flatten().map(|d| d.map(|d| d.message.topic))
    );
    app.bus.delete_stream().await.expect("delete test stream");
}

/// A catalog started while NATS is unreachable still starts and serves; `/ready` shows the bus
/// down (degraded, not unready); its events wait in the outbox; once NATS is reachable (here: a
/// forwarder starts listening on the configured port) they are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_started_while_nats_is_down_publishes_once_it_is_up() {
    use kit::testing::{TestEnv, TestServer};

    let mut env = TestEnv::new(Backend::Postgres).await;
    let nats = env.settings.bus.url.clone().expect("the test NATS");
    let nats_addr = nats.trim_start_matches("nats://").to_owned();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    env.settings.bus.url = Some(format!("nats://127.0.0.1:{port}"));
    let deps = env.deps(&catalog::SERVICE).await;
    let db = deps.db().expect("db");
    let app = catalog::app(deps)
        .await
        .expect("the catalog starts without its bus");
    let server = TestServer::start(app, &env.settings).await;

    let (status, ready) = server.get_json("/ready").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["checks"]["bus"]["status"], "down", "{ready}");
    let response = server
        .post(
            "/api/v1/products",
            json!({"name": "Kettle", "price": 25, "stock": 3}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let kettle: serde_json::Value = response.json().await.expect("json");
    assert!(kit::outbox::backlog(&db).await.expect("backlog") >= 1);

    // NATS becomes reachable on the configured address.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the port is still free");
    let forwarder = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let nats_addr = nats_addr.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(nats_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while kit::outbox::backlog(&db).await.expect("backlog") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox was not published after NATS came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, ready) = server.get_json("/ready").await;
    assert_eq!(ready["checks"]["bus"]["status"], "up", "{ready}");

    let mut settings = env.settings.clone();
    settings.bus.url = Some(nats);
    let bus = kit::bus::Bus::connect(&settings).await.expect("bus");
    let mut subscription = bus
        .subscribe("late-reader", &["product.created"])
        .await
        .expect("subscribe");
    let events = next_events(&mut subscription, 1).await;
    assert_eq!(events[0].data["id"], kettle["id"]);
    forwarder.abort();
}
