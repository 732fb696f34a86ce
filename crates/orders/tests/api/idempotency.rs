//! `Idempotency-Key`: a retried request gets the first answer and creates nothing more, even
//! when the repeats arrive together; a key reused for another request is refused.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_system};
use kit::testing::Backend;

kit::on_both_backends!(
    ten_concurrent_requests_with_one_key_make_one_order,
    a_key_reused_with_another_body_is_422,
);

async fn post_with_key(
    system: &crate::helpers::System,
    key: &str,
    body: &Value,
) -> (u16, Option<String>, String) {
    let response = system
        .gateway
        .client
        .post(system.url("/api/v1/orders"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .expect("sent");
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, location, response.text().await.expect("body"))
}

async fn ten_concurrent_requests_with_one_key_make_one_order(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Chair", "45.00", 20).await;
    let body = json!({"user_id": user, "product_id": product, "quantity": 2});
    let answers =
        futures::future::join_all((0..10).map(|_| post_with_key(&system, "order-42", &body))).await;
    let first = &answers[0];
    assert_eq!(first.0, 201, "{}", first.2);
    for answer in &answers {
        assert_eq!(answer, first, "every repeat gets the first answer");
    }
    let (_, list) = system
        .get_json(&format!("/api/v1/orders?user_id={user}"))
        .await;
    assert_eq!(list["total"], 1, "one order: {list}");
    assert_eq!(system.stock(product).await.0, 18, "held once");

    // Later, still the same answer (the order has moved on meanwhile, the answer has not).
    let order: Value = serde_json::from_str(&first.2).expect("json");
    system
        .until_status(order["id"].as_i64().expect("id"), "processed")
        .await;
    let later = post_with_key(&system, "order-42", &body).await;
    assert_eq!(&later, first);
}

async fn a_key_reused_with_another_body_is_422(backend: Backend) {
    let system = spawn_system(backend).await;
    let user = system.user().await;
    let product = system.product("Desk", "120.00", 5).await;
    let body = json!({"user_id": user, "product_id": product, "quantity": 1});
    assert_eq!(post_with_key(&system, "k-1", &body).await.0, 201);
    let other = json!({"user_id": user, "product_id": product, "quantity": 2});
    let response = system
        .gateway
        .client
        .post(system.url("/api/v1/orders"))
        .header("idempotency-key", "k-1")
        .json(&other)
        .send()
        .await
        .expect("sent");
    assert_problem(response, 422, "idempotency_key_reused").await;
    // A refused request's answer is kept too: the same refusal again, nothing held.
    let too_many = json!({"user_id": user, "product_id": product, "quantity": 50});
    let first = post_with_key(&system, "k-2", &too_many).await;
    assert_eq!(first.0, 409, "{}", first.2);
    assert_eq!(post_with_key(&system, "k-2", &too_many).await, first);
    assert_eq!(
        system.stock(product).await.0,
        4,
        "only the first order took stock"
    );
}
