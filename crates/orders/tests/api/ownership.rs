//! Orders belong to their user: through the gateway in `required` mode a user orders only for
//! themselves, sees and cancels only their own orders (another user's is a 404, as if it did not
//! exist), and moves nothing else along; an admin sees every order.

use kit::auth::AuthMode;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{System, assert_problem, spawn_system_with};
use kit::testing::Backend;

kit::on_both_backends!(another_users_order_is_404_and_a_user_only_cancels_their_own);

/// Registers and logs in `email`; returns (user id, token).
async fn sign_up(system: &System, email: &str) -> (i64, String) {
    let response = system
        .post(
            "/api/v1/auth/register",
            json!({"email": email, "name": "Shopper", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(response.status(), 201, "register {email}");
    let user: Value = response.json().await.expect("user");
    let response = system
        .post(
            "/api/v1/auth/login",
            json!({"email": email, "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(response.status(), 200, "login {email}");
    let login: Value = response.json().await.expect("token");
    (
        user["id"].as_i64().expect("id"),
        login["access_token"].as_str().expect("token").to_owned(),
    )
}

async fn call(
    system: &System,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = system
        .gateway
        .client
        .request(method, system.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.expect("sent")
}

async fn another_users_order_is_404_and_a_user_only_cancels_their_own(backend: Backend) {
    let system = spawn_system_with(backend, |settings| {
        settings.auth.mode = Some(AuthMode::Required);
    })
    .await;
    // Products are made at catalog itself (through the gateway they need an admin).
    let response = system
        .catalog
        .post(
            "/api/v1/products",
            json!({"name": "Scarf", "price": "15.00", "stock": 10}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let product: Value = response.json().await.expect("product");
    let (alice, alice_token) = sign_up(&system, "alice@example.com").await;
    let (bob, bob_token) = sign_up(&system, "bob@example.com").await;

    // No token: 401. A token: the order is the caller's, user_id may be left out.
    let response = system
        .order(json!({"items": [{"product_id": product["id"], "quantity": 1}]}))
        .await;
    assert_eq!(response.status(), 401);
    let response = call(
        &system,
        Method::POST,
        "/api/orders",
        &alice_token,
        Some(json!({"items": [{"product_id": product["id"].to_string(), "quantity": 2}]})),
    )
    .await;
    assert_eq!(response.status(), 201, "seed 003's request with a token");
    let order: Value = response.json().await.expect("order");
    assert_eq!(order["user_id"], alice);
    let id = order["id"].as_i64().expect("id");
    let response = call(
        &system,
        Method::POST,
        "/api/v1/orders",
        &bob_token,
        Some(json!({"user_id": alice, "product_id": product["id"], "quantity": 1})),
    )
    .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(
        problem["errors"][0]["field"], "user_id",
        "not for another user: {problem}"
    );

    // Bob cannot see, list or cancel Alice's order.
    let path = format!("/api/v1/orders/{id}");
    assert_problem(
        call(&system, Method::GET, &path, &bob_token, None).await,
        404,
        "order_not_found",
    )
    .await;
    let response = call(
        &system,
        Method::GET,
        &format!("/api/v1/orders?user_id={alice}"),
        &bob_token,
        None,
    )
    .await;
    let list: Value = response.json().await.expect("list");
    assert_eq!(list["total"], 0, "{list}");
    let response = call(
        &system,
        Method::POST,
        &format!("{path}/cancel"),
        &bob_token,
        None,
    )
    .await;
    assert_problem(response, 404, "order_not_found").await;
    let response = call(&system, Method::GET, "/api/v1/orders", &bob_token, None).await;
    let own: Value = response.json().await.expect("list");
    assert_eq!(own["total"], 0, "bob has none: {own}");
    let _ = bob;

    // Alice sees it, may cancel it, and may not ship it.
    let response = call(&system, Method::GET, &path, &alice_token, None).await;
    assert_eq!(response.status(), 200);
    let response = call(
        &system,
        Method::PATCH,
        &format!("{path}/status"),
        &alice_token,
        Some(json!({"status": "shipped"})),
    )
    .await;
    assert_problem(response, 403, "forbidden").await;
    let response = call(
        &system,
        Method::POST,
        &format!("{path}/cancel"),
        &alice_token,
        None,
    )
    .await;
    assert_eq!(response.status(), 200);
    let cancelled: Value = response.json().await.expect("order");
    assert_eq!(cancelled["status"], "cancelled");
}
