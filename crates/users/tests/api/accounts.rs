//! Accounts: register, login, `/me`; one 401 for a wrong password and an unknown email; the
//! password never in a response, a log line or an event.

use std::time::{Duration, Instant};

use kit::auth::{Identity, Role};
use kit::testing::Backend;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app};

const PASSWORD: &str = "s3cret-Horse-battery";

async fn register(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/register",
        json!({"email": email, "name": "Eve Example", "password": password}),
    )
    .await
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    app.post(
        "/api/v1/auth/login",
        json!({"email": email, "password": password}),
    )
    .await
}

async fn verifications(app: &TestApp) -> u64 {
    let (_, stats) = app.get_json("/api/v1/users/stats").await;
    stats["password_verifications"].as_u64().expect("counter")
}

async fn register_login_and_me(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = register(&app, "Eve@Example.com", PASSWORD).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("text")
        .to_owned();
    let user: Value = response.json().await.expect("json");
    assert_eq!(location, format!("/api/v1/users/{}", user["id"]));
    assert_eq!(
        (
            user["email"].as_str(),
            user["name"].as_str(),
            user["role"].as_str()
        ),
        (Some("eve@example.com"), Some("Eve Example"), Some("user"))
    );

    let response = login(&app, "eve@example.com", PASSWORD).await;
    assert_eq!(response.status(), 200);
    let token: Value = response.json().await.expect("json");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["expires_in"], 3600);
    // The claims, checked with the key the test configured.
    let auth = &app.env.settings.auth;
    let secret = auth.jwt_secret.as_ref().expect("test key").expose();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[&auth.issuer]);
    validation.set_audience(&[&auth.audience]);
    let claims = jsonwebtoken::decode::<Value>(
        token["access_token"].as_str().expect("token"),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("a valid HS256 token")
    .claims;
    assert_eq!(claims["sub"], user["id"].to_string());
    assert_eq!(claims["role"], "user");
    assert_eq!(
        (claims["iss"].as_str(), claims["aud"].as_str()),
        (Some("agora"), Some("agora-api"))
    );
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    assert_eq!(exp.zip(iat).map(|(e, i)| e - i), Some(3600), "{claims}");

    // /me reads the identity the gateway forwards (headers + the service credential).
    let me = Identity {
        user_id: user["id"].as_i64().expect("id"),
        role: Role::User,
    };
    let response = app
        .as_identity(Method::GET, "/api/v1/users/me", me)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.expect("json"), user);

    let response = app.get("/api/v1/users/me").await;
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="agora""#
    );
    assert_problem(response, 401, "unauthenticated").await;
    // Identity headers without the credential (a client reaching the service directly) are
    // ignored.
    let response = app
        .client
        .get(app.url("/api/v1/users/me"))
        .header("x-agora-user-id", me.user_id.to_string())
        .header("x-agora-user-role", "admin")
        .send()
        .await
        .expect("sent");
    assert_problem(response, 401, "unauthenticated").await;
}

async fn wrong_password_and_unknown_email_are_one_401(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(
        register(&app, "eve@example.com", PASSWORD).await.status(),
        201
    );
    // Created without a password (the seeds' way): cannot log in.
    app.create_user(json!({"name": "Nopass", "email": "nopass@example.com"}))
        .await;
    let cases = [
        ("eve@example.com", "wrong-password"),
        ("EVE@example.com", "s3cret-horse-battery"),
        ("nobody@example.com", PASSWORD),
        ("nopass@example.com", PASSWORD),
        ("not an email", PASSWORD),
    ];
    for (email, password) in cases {
        let before = verifications(&app).await;
        let response = login(&app, email, password).await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="agora""#
        );
        let body = assert_problem(response, 401, "invalid_credentials").await;
        assert_eq!(
            body["detail"], "The email or the password is wrong",
            "{email}"
        );
        assert_eq!(
            verifications(&app).await,
            before + 1,
            "{email}: one hash verified, whether the account exists or not"
        );
    }

    // And about the same time: the median of a few tries each, within a factor of three (loose:
    // the machine is busy with other tests; a skipped hash would be ~100x faster).
    let median = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2]
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let started = Instant::now();
        login(&app, "eve@example.com", "wrong-password").await;
        known.push(started.elapsed());
        let started = Instant::now();
        login(&app, "nobody@example.com", "wrong-password").await;
        unknown.push(started.elapsed());
    }
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    assert!(
        unknown * 3 >= known && known * 3 >= unknown,
        "known email {known:?}, unknown email {unknown:?}"
    );
}

async fn registration_is_validated(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        (json!({}), vec!["email", "name", "password"]),
        (
            json!({"email": "bad", "name": " ", "password": "short"}),
            vec!["email", "name", "password"],
        ),
        (
            json!({"email": "a@b.co", "name": "A", "password": "x".repeat(129)}),
            vec!["password"],
        ),
        (
            json!({"email": "a@b.co", "name": "A", "password": PASSWORD, "username": "a b"}),
            vec!["username"],
        ),
    ];
    for (body, fields) in cases {
        let response = app.post("/api/v1/auth/register", body.clone()).await;
        let problem = assert_problem(response, 422, "validation_failed").await;
        let named: Vec<&str> = problem["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .filter_map(|e| e["field"].as_str())
            .collect();
        assert_eq!(named, fields, "{body}");
        assert!(!problem.to_string().contains("short"), "no value echoed");
    }
    let response = app
        .post(
            "/api/v1/auth/register",
            json!({"email": "a@b.co", "name": "A", "password": PASSWORD, "role": "admin"}),
        )
        .await;
    assert_problem(response, 422, "validation_failed").await;

    assert_eq!(
        register(&app, "eve@example.com", PASSWORD).await.status(),
        201
    );
    let response = register(&app, "EVE@example.com", PASSWORD).await;
    assert_problem(response, 409, "email_taken").await;

    let response = app
        .post("/api/v1/auth/login", json!({"email": "eve@example.com"}))
        .await;
    assert_problem(response, 422, "validation_failed").await;
    let response = login(&app, "eve@example.com", &"x".repeat(129)).await;
    assert_problem(response, 422, "validation_failed").await;
}

kit::on_both_backends!(
    register_login_and_me,
    wrong_password_and_unknown_email_are_one_401,
    registration_is_validated,
);

/// On a current-thread runtime, so the service's tasks log to the captured thread.
async fn password_is_in_no_response_log_or_event(backend: Backend) {
    let logs = kit::testing::CapturedLogs::start();
    let app = spawn_app(backend).await;
    let bus = app.deps.bus().expect("users uses the bus");
    let mut events = bus
        .subscribe("users-test", &["user.*"])
        .await
        .expect("subscribe");

    let response = register(&app, "eve@example.com", PASSWORD).await;
    assert_eq!(response.status(), 201);
    let registered = response.text().await.expect("body");
    let logged_in = login(&app, "eve@example.com", PASSWORD)
        .await
        .text()
        .await
        .expect("body");
    let refused = login(&app, "eve@example.com", "wrong-password-1")
        .await
        .text()
        .await
        .expect("body");
    let invalid = app
        .post(
            "/api/v1/auth/register",
            json!({"email": "bad", "name": "x", "password": "tiny-pw"}),
        )
        .await
        .text()
        .await
        .expect("body");

    let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("user.registered arrives")
        .expect("subscription open")
        .expect("delivery");
    let event = delivery.message.event().expect("an event");
    assert_eq!(event.topic, "user.registered");
    assert_eq!(event.data["email"], "eve@example.com");
    assert_eq!(event.key, format!("user:{}", event.data["id"]));
    let event_text = serde_json::to_string(&event).expect("json");
    delivery.ack().await.expect("ack");

    let stored: String = kit::db::query("select password_hash from users where email = $1")
        .bind("eve@example.com")
        .fetch_scalar(&app.db)
        .await
        .expect("stored");
    assert!(stored.starts_with("$argon2id$"), "{stored}");
    let hash_part = stored.rsplit('$').next().expect("hash").to_owned();

    let lines = logs.lines().join("\n");
    assert!(
        lines.contains("account registered"),
        "the capture works: {lines}"
    );
    for (what, text) in [
        ("register response", &registered),
        ("login response", &logged_in),
        ("refused login", &refused),
        ("invalid register", &invalid),
        ("event", &event_text),
        ("logs", &lines),
    ] {
        for secret in [PASSWORD, "wrong-password-1", "tiny-pw", hash_part.as_str()] {
            assert!(!text.contains(secret), "{what} contains {secret}: {text}");
        }
        assert!(!text.contains("password_hash"), "{what}: {text}");
    }
    bus.delete_stream().await.expect("delete stream");
}

mod no_password_anywhere {
    #[tokio::test]
    async fn sqlite() {
        super::password_is_in_no_response_log_or_event(kit::testing::Backend::Sqlite).await
    }
    #[tokio::test]
    async fn postgres() {
        super::password_is_in_no_response_log_or_event(kit::testing::Backend::Postgres).await
    }
}
