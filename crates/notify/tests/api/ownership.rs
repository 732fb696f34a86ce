//! Through the gateway a signed-in user sees only their own notifications (another's is a 404);
//! without a token, nothing in `required` mode.

use kit::auth::AuthMode;
use kit::testing::{Backend, assert_problem};
use serde_json::{Value, json};

use crate::helpers::spawn_system;

kit::on_both_backends!(through_the_gateway_a_user_sees_only_their_own_notifications);

async fn register(system: &crate::helpers::System, name: &str, email: &str) -> (i64, String) {
    let password = "correct horse battery";
    let response = system
        .post(
            "/api/v1/auth/register",
            json!({"name": name, "email": email, "password": password}),
        )
        .await;
    assert_eq!(response.status(), 201, "registering {name}");
    let user: Value = response.json().await.expect("user");
    let response = system
        .post(
            "/api/v1/auth/login",
            json!({"email": email, "password": password}),
        )
        .await;
    assert_eq!(response.status(), 200, "login {name}");
    let token: Value = response.json().await.expect("token");
    (
        user["id"].as_i64().expect("id"),
        token["access_token"].as_str().expect("token").to_owned(),
    )
}

async fn through_the_gateway_a_user_sees_only_their_own_notifications(backend: Backend) {
    let system = spawn_system(backend, json!({}), Some(AuthMode::Required)).await;
    let (ann, ann_token) = register(&system, "Ann", "ann@example.com").await;
    let (bob, bob_token) = register(&system, "Bob", "bob@example.com").await;
    let all = system
        .notifications_until("status=sent", |items| items.len() == 2)
        .await;
    let of = |user: i64| {
        all.iter()
            .find(|n| n["user_id"] == user)
            .and_then(|n| n["id"].as_i64())
            .expect("a notification of the user")
    };
    let (ann_n, bob_n) = (of(ann), of(bob));

    let get = |path: String, token: &str| {
        system
            .client
            .get(system.url(&path))
            .bearer_auth(token)
            .send()
    };
    let page: Value = get("/api/v1/notifications".into(), &ann_token)
        .await
        .expect("send")
        .json()
        .await
        .expect("page");
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(page["items"][0]["id"], ann_n);
    let page: Value = get(format!("/api/v1/notifications?user_id={bob}"), &ann_token)
        .await
        .expect("send")
        .json()
        .await
        .expect("page");
    assert_eq!(page["total"], 0, "another's are not listed: {page}");
    let response = get(format!("/api/v1/notifications/{bob_n}"), &ann_token)
        .await
        .expect("send");
    assert_problem(response, 404, "notification_not_found").await;
    let response = get(format!("/api/v1/notifications/{bob_n}"), &bob_token)
        .await
        .expect("send");
    assert_eq!(response.status(), 200);
    let response = system.get("/api/v1/notifications").await;
    assert_problem(response, 401, "unauthenticated").await;
    let stats: Value = get("/api/v1/notifications/stats".into(), &bob_token)
        .await
        .expect("send")
        .json()
        .await
        .expect("stats");
    assert_eq!(stats["notifications"], 1, "a user's own counts: {stats}");
}
