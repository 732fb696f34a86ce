//! From an event to a delivery: an order is announced once per channel, however often its event
//! arrives; a registration is an email with the rendered subject and body.

use kit::bus::Message;
use kit::testing::Backend;
use serde_json::{Value, json};

use crate::helpers::spawn_system;
use crate::support::{SmtpSink, WebhookReceiver};

kit::on_both_backends!(
    an_order_produces_one_notification_per_channel_even_when_its_event_is_delivered_twice,
    a_registration_is_emailed_through_smtp_with_its_subject_recipient_and_body,
    a_user_without_an_email_gets_a_failed_email_delivery_saying_why,
);

const SECRET: &str = "a-webhook-secret-of-the-test";

fn channels_to_everything(smtp: &SmtpSink, hook: &WebhookReceiver) -> Value {
    json!({
        "channels": {"order_created": ["log", "smtp", "webhook"]},
        "smtp": {"host": "127.0.0.1", "port": smtp.port, "tls": "none", "from": "Shop <shop@example.com>"},
        "webhooks": [{"name": "ops", "url": hook.url, "secret": SECRET, "timeout_ms": 2000}],
    })
}

async fn an_order_produces_one_notification_per_channel_even_when_its_event_is_delivered_twice(
    backend: Backend,
) {
    // Arrange
    let smtp = SmtpSink::start().await;
    let hook = WebhookReceiver::start(SECRET).await;
    let system = spawn_system(backend, channels_to_everything(&smtp, &hook), None).await;
    let user = system.user("Bea Buyer", "bea@example.com").await;
    let product = system.product("Lamp", "12.50", 10).await;

    // Act: an order; then its event again, as the bus would redeliver it (same message id) and
    // as a re-publish under a new message id would (the consumer's record does not know it).
    let response = system
        .post(
            "/api/v1/orders",
            json!({"user_id": user, "items": [{"product_id": product, "quantity": 3}]}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let order: Value = response.json().await.expect("order");
    let created = |items: &[Value]| {
        items
            .iter()
            .filter(|n| n["event_type"] == "order.created")
            .cloned()
            .collect::<Vec<_>>()
    };
    system
        .notifications_until(&format!("user_id={user}"), |items| {
            let created = created(items);
            created.len() == 3 && created.iter().all(|n| n["status"] == "sent")
        })
        .await;
    let hooks = hook.until(1).await;
    let event: kit::event::Event =
        serde_json::from_value(hooks[0].body.clone()).expect("the webhook body is the event");
    assert_eq!(event.topic, "order.created");
    assert_eq!(event.data["id"], order["id"]);
    let message = Message::from_event(&event).expect("message");
    system.bus.publish(&message).await.expect("publish again");
    system.bus.publish(&message).await.expect("publish again");
    let mut copy = message.clone();
    copy.id = uuid::Uuid::now_v7().to_string();
    system.bus.publish(&copy).await.expect("publish a copy");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !system.handled(&copy.id).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy was not handled"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Assert: one delivery per channel, each sent once.
    let (_, page) = system
        .notify
        .get_json(&format!(
            "/api/v1/notifications?user_id={user}&per_page=100"
        ))
        .await;
    let again = created(page["items"].as_array().expect("items"));
    assert_eq!(again.len(), 3, "{again:?}");
    let mut channels: Vec<&str> = again.iter().filter_map(|n| n["channel"].as_str()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["log", "smtp", "webhook"]);
    for n in &again {
        assert_eq!(
            (&n["status"], &n["attempts"]),
            (&json!("sent"), &json!(1)),
            "{n}"
        );
        assert_eq!(n["event_id"], event.id.to_string());
    }
    let recipients: Vec<(&str, &str)> = again
        .iter()
        .map(|n| {
            (
                n["channel"].as_str().unwrap_or(""),
                n["recipient"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        recipients.contains(&("smtp", "bea@example.com")),
        "{recipients:?}"
    );
    assert!(
        recipients.contains(&("log", "bea@example.com")),
        "{recipients:?}"
    );
    assert!(recipients.contains(&("webhook", "ops")), "{recipients:?}");
    let order_hooks: Vec<_> = hook
        .hooks()
        .into_iter()
        .filter(|h| h.event_type == "order.created")
        .collect();
    assert_eq!(order_hooks.len(), 1, "one webhook call: {order_hooks:?}");
    assert!(order_hooks[0].verified, "signed with the endpoint's secret");
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1, "one email: {mails:?}");
    assert_eq!(mails[0].to, ["bea@example.com"]);
    assert_eq!(
        mails[0].header("Subject").as_deref(),
        Some(format!("Order #{} received", order["id"]).as_str())
    );
    assert!(
        mails[0].body().contains("Hello Bea Buyer,"),
        "{}",
        mails[0].body()
    );
}

async fn a_registration_is_emailed_through_smtp_with_its_subject_recipient_and_body(
    backend: Backend,
) {
    let smtp = SmtpSink::start().await;
    let system = spawn_system(
        backend,
        json!({
            "channels": {"user_registered": ["smtp"]},
            "smtp": {"host": "127.0.0.1", "port": smtp.port, "tls": "none", "from": "Agora <hello@agora.test>"},
        }),
        None,
    )
    .await;

    let response = system
        .post(
            "/api/v1/auth/register",
            json!({"name": "Alice Smith", "email": "alice@example.com", "password": "correct horse battery"}),
        )
        .await;
    assert_eq!(response.status(), 201);

    let mails = smtp.until(1).await;
    let mail = &mails[0];
    assert_eq!(mail.from, "hello@agora.test");
    assert_eq!(mail.to, ["alice@example.com"]);
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Welcome to Agora, Alice Smith")
    );
    assert_eq!(mail.header("To").as_deref(), Some("alice@example.com"));
    let body = mail.body();
    assert!(body.contains("Hello Alice Smith,"), "{body}");
    assert!(body.contains("Sign in with alice@example.com."), "{body}");
    let sent = system
        .notifications_until("status=sent", |items| items.len() == 1)
        .await;
    assert_eq!(
        (
            &sent[0]["channel"],
            &sent[0]["recipient"],
            &sent[0]["event_type"]
        ),
        (
            &json!("smtp"),
            &json!("alice@example.com"),
            &json!("user.registered")
        )
    );
    assert!(sent[0]["sent_at"].is_string(), "{}", sent[0]);
}

async fn a_user_without_an_email_gets_a_failed_email_delivery_saying_why(backend: Backend) {
    let smtp = SmtpSink::start().await;
    let system = spawn_system(
        backend,
        json!({
            "channels": {"order_created": ["smtp"]},
            "smtp": {"host": "127.0.0.1", "port": smtp.port},
        }),
        None,
    )
    .await;
    let response = system
        .post("/api/v1/users", json!({"name": "No Mail"}))
        .await;
    assert_eq!(response.status(), 201);
    let user: Value = response.json().await.expect("user");
    let product = system.product("Pen", "1.00", 5).await;
    let response = system
        .post(
            "/api/v1/orders",
            json!({"user_id": user["id"], "items": [{"product_id": product, "quantity": 1}]}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let failed = system
        .notifications_until("status=failed", |items| !items.is_empty())
        .await;
    assert_eq!(failed[0]["recipient"], format!("user:{}", user["id"]));
    assert!(
        failed[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no email address")),
        "{}",
        failed[0]
    );
    assert!(smtp.mails().is_empty());
}

/// A template mistake is found when the service is built, with the file named, not when an
/// event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_template_override_stops_the_start_naming_the_file() {
    let mut env = kit::testing::TestEnv::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("order.created.txt"),
        "Subject: Order {{ data.id }\n\nbody\n",
    )
    .expect("write");
    env.settings
        .services
        .entry("notify".into())
        .or_default()
        .extra
        .insert(
            "templates_dir".into(),
            dir.path().display().to_string().into(),
        );
    let deps = env.deps(&notify::SERVICE).await;
    let err = notify::app(deps)
        .await
        .err()
        .expect("a broken template refuses the start");
    let message = format!("{err:#}");
    assert!(message.contains("order.created.txt"), "{message}");
}
