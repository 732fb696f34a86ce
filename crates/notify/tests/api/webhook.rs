//! Webhooks: signed with the endpoint's secret; a failing endpoint is retried with back-off,
//! marked failed after `max_attempts`, and sent once retried through the API.

use kit::testing::{Backend, assert_problem};
use serde_json::json;

use crate::helpers::spawn_system;
use crate::support::WebhookReceiver;

kit::on_both_backends!(
    a_failing_webhook_is_retried_with_backoff_then_failed_then_retried_through_the_api,
    a_webhook_slower_than_its_timeout_counts_as_a_failed_try,
);

const SECRET: &str = "another-webhook-secret";

async fn a_failing_webhook_is_retried_with_backoff_then_failed_then_retried_through_the_api(
    backend: Backend,
) {
    // Arrange: an endpoint that answers 500; three tries, 100 ms then 200 ms apart.
    let hook = WebhookReceiver::start(SECRET).await;
    hook.fail(true);
    let system = spawn_system(
        backend,
        json!({
            "channels": {"stock_low": ["webhook"]},
            "max_attempts": 3,
            "backoff_ms": 100,
            "backoff_max_ms": 1000,
            "webhooks": [{"name": "inventory", "url": hook.url, "secret": SECRET, "timeout_ms": 2000, "events": ["stock.*"]}],
        }),
        None,
    )
    .await;
    let product = system.product("Desk", "99.00", 20).await;

    // Act: stock falls below the threshold (10): `stock.low`.
    let response = system
        .patch(
            &format!("/api/v1/products/{product}/stock"),
            json!({"stock": 3}),
        )
        .await;
    assert_eq!(response.status(), 200);

    // Assert: three signed tries, each after at least the back-off, then `failed`.
    let failed = system
        .notifications_until("status=failed", |items| !items.is_empty())
        .await;
    let n = &failed[0];
    assert_eq!(
        (
            &n["channel"],
            &n["recipient"],
            &n["event_type"],
            &n["attempts"]
        ),
        (
            &json!("webhook"),
            &json!("inventory"),
            &json!("stock.low"),
            &json!(3)
        ),
        "{n}"
    );
    assert!(
        n["last_error"].as_str().is_some_and(|e| e.contains("500")),
        "{n}"
    );
    let tries = hook.hooks();
    assert_eq!(tries.len(), 3, "{tries:?}");
    assert!(
        tries.iter().all(|t| t.verified && t.status == 500),
        "{tries:?}"
    );
    let delivery = n["id"].to_string();
    assert!(tries.iter().all(|t| t.delivery == delivery));
    assert!(
        tries[0].body["data"]["stock"] == 3,
        "the event as JSON: {:?}",
        tries[0].body
    );
    // Lower bounds only: a try is never early, however slow the machine.
    let gap = |i: usize| tries[i].at.duration_since(tries[i - 1].at).as_millis();
    assert!(gap(1) >= 100, "first back-off {} ms", gap(1));
    assert!(gap(2) >= 200, "second back-off doubled: {} ms", gap(2));

    // A retry through the API, the endpoint healthy again: sent, once.
    hook.fail(false);
    let id = n["id"].as_i64().expect("id");
    let response = system
        .post(&format!("/api/v1/notifications/{id}/retry"), json!({}))
        .await;
    assert_eq!(response.status(), 202);
    let sent = system
        .notifications_until("status=sent", |items| !items.is_empty())
        .await;
    assert_eq!(sent[0]["id"], id);
    assert_eq!(
        (&sent[0]["retries"], &sent[0]["attempts"]),
        (&json!(1), &json!(1))
    );
    let tries = hook.until(4).await;
    assert_eq!(tries.len(), 4);
    assert!(
        tries[3].verified && tries[3].status == 204,
        "{:?}",
        tries[3]
    );

    // Only a failed one can be retried; an unknown one is a 404.
    let response = system
        .post(&format!("/api/v1/notifications/{id}/retry"), json!({}))
        .await;
    assert_problem(response, 409, "not_failed").await;
    let response = system
        .post("/api/v1/notifications/999999/retry", json!({}))
        .await;
    assert_problem(response, 404, "notification_not_found").await;
    let (status, stats) = system.get_json("/api/v1/notifications/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["by_channel"]["webhook"]["sent"], 1, "{stats}");
    assert_eq!(stats["dead_letters"], 0, "{stats}");
    let (_, all) = system.get_json("/api/v1/stats").await;
    assert_eq!(all["services"]["notify"]["by_status"]["sent"], 1, "{all}");
}

async fn a_webhook_slower_than_its_timeout_counts_as_a_failed_try(backend: Backend) {
    // An endpoint that answers after 3 s, with a 200 ms limit and one try.
    let hook = WebhookReceiver::start(SECRET).await;
    hook.delay(std::time::Duration::from_secs(3));
    let system = spawn_system(
        backend,
        json!({
            "channels": {"stock_low": ["webhook"]},
            "max_attempts": 1,
            "webhooks": [{"name": "slow", "url": hook.url, "secret": SECRET, "timeout_ms": 200}],
        }),
        None,
    )
    .await;
    let product = system.product("Shelf", "10.00", 20).await;
    let response = system
        .patch(
            &format!("/api/v1/products/{product}/stock"),
            json!({"stock": 1}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let failed = system
        .notifications_until("status=failed", |items| !items.is_empty())
        .await;
    assert!(
        failed[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer within 200 ms")),
        "{}",
        failed[0]
    );
    assert_eq!(failed[0]["attempts"], 1);
}
