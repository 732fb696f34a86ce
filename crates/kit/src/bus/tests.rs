//! The bus contract, checked on both backends: in process, and NATS with a stream per test.

use std::collections::HashSet;

use super::nats::{is_test_prefix, unix_now};
use super::*;
use crate::testing::{Backend, TestEnv};
use async_nats::jetstream::{self, stream};

/// Long enough for a message that should arrive to arrive, on either backend.
const SOON: Duration = Duration::from_secs(3);
/// How long we watch for a message that must not come.
const QUIET: Duration = Duration::from_millis(400);

/// A bus of each backend: in process, and NATS with this test's own stream.
async fn buses() -> Vec<(TestEnv, Bus)> {
    let mut buses = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let env = TestEnv::new(backend).await;
        let bus = Bus::connect(&env.settings)
            .await
            .expect("the test bus is reachable (TEST_NATS_URL)");
        buses.push((env, bus));
    }
    assert_eq!(buses[0].1.backend(), "memory");
    assert_eq!(buses[1].1.backend(), "nats");
    buses
}

fn message(id: &str, topic: &str) -> Message {
    Message {
        id: id.to_owned(),
        topic: topic.to_owned(),
        payload: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
    }
}

async fn next(sub: &mut Subscription, what: &str) -> Delivery {
    tokio::time::timeout(SOON, sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing delivered in time"))
        .unwrap_or_else(|| panic!("{what}: subscription ended"))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

async fn nothing_more(sub: &mut Subscription, what: &str) {
    if let Ok(Some(delivery)) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!("{what}: unexpected delivery {delivery:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_acked_is_delivered_exactly_once() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let bus = bus.with_ack_wait(Duration::from_millis(500));
        let mut sub = bus
            .subscribe("mailer", &["stock.low"])
            .await
            .expect("subscribe");
        let sent = message("e1", "stock.low");
        bus.publish(&sent).await.expect("publish");

        let delivery = next(&mut sub, kind).await;
        assert_eq!(delivery.message, sent, "{kind}");
        assert_eq!(delivery.attempt, 1, "{kind}");
        delivery.ack().await.expect("ack");
        // Past the ack wait: an acked message does not come back.
        tokio::time::sleep(Duration::from_millis(700)).await;
        nothing_more(&mut sub, kind).await;
        bus.ping().await.expect("ping");
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_delivery_comes_back_after_the_delay() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let mut sub = bus
            .subscribe("worker", &["order.created"])
            .await
            .expect("subscribe");
        bus.publish(&message("o1", "order.created"))
            .await
            .expect("publish");
        let first = next(&mut sub, kind).await;
        let nacked_at = std::time::Instant::now();
        first.nack(Duration::from_millis(300)).await.expect("nack");

        let again = next(&mut sub, kind).await;
        assert!(
            nacked_at.elapsed() >= Duration::from_millis(250),
            "{kind}: redelivered before the delay"
        );
        assert_eq!(again.message.id, "o1", "{kind}");
        assert_eq!(again.attempt, 2, "{kind}");
        again.ack().await.expect("ack");
        nothing_more(&mut sub, kind).await;
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_is_redelivered_after_the_ack_wait() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let bus = bus.with_ack_wait(Duration::from_secs(1));
        let mut sub = bus
            .subscribe("worker", &["order.created"])
            .await
            .expect("subscribe");
        bus.publish(&message("o1", "order.created"))
            .await
            .expect("publish");
        // A handler that panicked (or a worker that was killed) never acks.
        drop(next(&mut sub, kind).await);

        let again = next(&mut sub, kind).await;
        assert_eq!(again.message.id, "o1", "{kind}");
        assert_eq!(again.attempt, 2, "{kind}");
        again.ack().await.expect("ack");
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_consumer_name_gets_every_message() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let mut mailer = bus.subscribe("mailer", &["stock.low"]).await.expect("sub");
        let mut audit = bus.subscribe("audit", &["stock.low"]).await.expect("sub");
        bus.publish(&message("s1", "stock.low"))
            .await
            .expect("publish");

        for (name, sub) in [("mailer", &mut mailer), ("audit", &mut audit)] {
            let delivery = next(sub, &format!("{kind} {name}")).await;
            assert_eq!(delivery.message.id, "s1", "{kind} {name}");
            delivery.ack().await.expect("ack");
            nothing_more(sub, &format!("{kind} {name}")).await;
        }
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_of_one_name_share_the_work() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let mut workers = Vec::new();
        for _ in 0..2 {
            workers.push(bus.subscribe("worker", &["job.*"]).await.expect("sub"));
        }
        let sent: Vec<String> = (0..20).map(|i| format!("j{i:02}")).collect();
        for id in &sent {
            bus.publish(&message(id, "job.run")).await.expect("publish");
        }

        // Each worker takes what it can until the queue stays empty.
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|mut sub| {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(Some(delivery)) =
                        tokio::time::timeout(Duration::from_secs(1), sub.next()).await
                    {
                        let delivery = delivery.expect("delivery");
                        got.push(delivery.message.id.clone());
                        delivery.ack().await.expect("ack");
                    }
                    got
                })
            })
            .collect();
        let mut received = Vec::new();
        for task in tasks {
            received.extend(task.await.expect("worker task"));
        }
        let unique: HashSet<&String> = received.iter().collect();
        assert_eq!(
            unique.len(),
            received.len(),
            "{kind}: duplicates in {received:?}"
        );
        received.sort();
        assert_eq!(received, sent, "{kind}: every job exactly once");
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_select_topics() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let cases: [(&str, &[&str], &[&str]); 4] = [
            ("stock", &["stock.*"], &["stock.low", "stock.changed"]),
            (
                "all",
                &[">"],
                &[
                    "stock.low",
                    "stock.changed",
                    "order.created",
                    "order.paid.late",
                ],
            ),
            (
                "orders",
                &["order.>"],
                &["order.created", "order.paid.late"],
            ),
            (
                "two",
                &["order.created", "stock.low"],
                &["stock.low", "order.created"],
            ),
        ];
        let mut subs = Vec::new();
        for (name, topics, _) in &cases {
            subs.push(bus.subscribe(name, topics).await.expect("subscribe"));
        }
        for topic in [
            "stock.low",
            "stock.changed",
            "order.created",
            "order.paid.late",
        ] {
            bus.publish(&message(topic, topic)).await.expect("publish");
        }
        for ((name, _, expected), sub) in cases.iter().zip(&mut subs) {
            let mut got = Vec::new();
            for _ in 0..expected.len() {
                let delivery = next(sub, &format!("{kind} {name}")).await;
                got.push(delivery.message.topic.clone());
                delivery.ack().await.expect("ack");
            }
            let mut expected = expected.to_vec();
            expected.sort_unstable();
            got.sort();
            assert_eq!(got, expected, "{kind} {name}");
            nothing_more(sub, &format!("{kind} {name}")).await;
        }
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_drops_a_republished_id() {
    let env = TestEnv::new(Backend::Postgres).await;
    let bus = Bus::connect(&env.settings).await.expect("connect");
    let mut sub = bus.subscribe("mailer", &["stock.low"]).await.expect("sub");
    let sent = message("same", "stock.low");
    bus.publish(&sent).await.expect("publish");
    bus.publish(&sent)
        .await
        .expect("a duplicate is acknowledged");

    next(&mut sub, "first").await.ack().await.expect("ack");
    nothing_more(&mut sub, "duplicate").await;
    bus.delete_stream().await.expect("delete stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_consumers_topics_resumes_where_it_was() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        // On NATS a dropped subscription's last pull request may take a message; it comes
        // back after the ack wait, kept short here.
        let bus = bus.with_ack_wait(Duration::from_secs(1));
        let mut sub = bus.subscribe("mailer", &["stock.low"]).await.expect("sub");
        bus.publish(&message("a", "stock.low"))
            .await
            .expect("publish");
        next(&mut sub, kind).await.ack().await.expect("ack");
        drop(sub);

        // A new version of the service listens to more topics.
        let mut sub = bus
            .subscribe("mailer", &["stock.low", "order.created"])
            .await
            .expect("resubscribe with other topics");
        bus.publish(&message("b", "order.created"))
            .await
            .expect("publish");
        let delivery = next(&mut sub, kind).await;
        assert_eq!(
            delivery.message.id, "b",
            "{kind}: no replay of what was acked"
        );
        delivery.ack().await.expect("ack");
        nothing_more(&mut sub, kind).await;
        drop(sub);

        // Same topics, another ack wait: an update of the recreated consumer.
        let mut sub = bus
            .clone()
            .with_ack_wait(Duration::from_secs(2))
            .subscribe("mailer", &["stock.low", "order.created"])
            .await
            .expect("resubscribe with another ack wait");
        bus.publish(&message("c", "stock.low"))
            .await
            .expect("publish");
        let delivery = next(&mut sub, kind).await;
        assert_eq!(delivery.message.id, "c", "{kind}");
        delivery.ack().await.expect("ack");
        bus.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_and_topics_are_refused() {
    let bus = Bus::memory();
    assert!(
        bus.subscribe("a.b", &["x"]).await.is_err(),
        "dotted consumer"
    );
    assert!(bus.subscribe("a", &[]).await.is_err(), "no topic");
    assert!(bus.subscribe("a", &["x.>.y"]).await.is_err(), "> not last");
    assert!(bus.subscribe("a", &["x..y"]).await.is_err(), "empty token");
    assert!(
        bus.publish(&message("1", "stock.*")).await.is_err(),
        "wildcard publish"
    );
    assert!(bus.publish(&message("1", "a b")).await.is_err(), "space");
}

#[test]
fn a_message_carries_its_event() {
    let event = Event::new(
        "catalog",
        "stock.low",
        "product:1",
        &serde_json::json!({"n": 2}),
    )
    .expect("event");
    let message = Message::from_event(&event).expect("message");
    assert_eq!(message.id, event.id.to_string());
    assert_eq!(message.topic, "stock.low");
    assert_eq!(message.event().expect("decodes"), event);
    let garbage = Message {
        payload: Bytes::from_static(b"nope"),
        ..message
    };
    assert!(garbage.event().is_err());
}

#[test]
fn topics_match_like_nats_subjects() {
    let cases = [
        ("stock.low", "stock.low", true),
        ("stock.low", "stock.lower", false),
        ("stock.*", "stock.low", true),
        ("stock.*", "stock.low.x", false),
        ("stock.*", "stock", false),
        ("*.low", "stock.low", true),
        ("stock.>", "stock.low.x", true),
        ("stock.>", "stock", false),
        (">", "anything.at.all", true),
    ];
    for (pattern, topic, expected) in cases {
        assert_eq!(
            topic_matches(pattern, topic),
            expected,
            "{pattern} vs {topic}"
        );
    }
    assert!(is_test_prefix("t1732000000_ab12cd34ef"));
    assert!(!is_test_prefix("agora"));
    assert!(!is_test_prefix("t17320000_x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_down_not_fatal_and_a_bad_url_names_the_setting() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.bus.url = Some("nats://127.0.0.1:1".into());
    let started = std::time::Instant::now();
    let bus = Bus::connect(&env.settings)
        .await
        .expect("a service starts while NATS is down");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "start waited {:?}",
        started.elapsed()
    );
    assert!(bus.ping().await.is_err(), "reported down");
    let message = Message {
        id: "m-1".into(),
        topic: "stock.low".into(),
        payload: bytes::Bytes::from_static(b"{}"),
    };
    assert!(
        bus.publish(&message).await.is_err(),
        "publishing fails (the outbox keeps it)"
    );

    env.settings.bus.url = Some("nats://bad host:4222".into());
    let err = Bus::connect(&env.settings)
        .await
        .err()
        .expect("unusable URL");
    assert!(format!("{err:#}").contains("bus.url (NATS_URL)"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_test_streams_are_deleted_on_connect() {
    let _env = TestEnv::new(Backend::Postgres).await;
    let client = async_nats::connect(crate::testing::test_nats_url())
        .await
        .expect("NATS");
    let js = jetstream::new(client);
    let old = unix_now() - 3 * 3600;
    let stale = format!("T{old}_0000000000_EVENTS");
    let recent = format!("T{}_0000000000_EVENTS", unix_now());
    for (name, subject) in [(&stale, "stale"), (&recent, "recent")] {
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{}.{subject}.>", name.to_lowercase())],
            ..Default::default()
        })
        .await
        .expect("create a test stream");
    }

    // What `TestEnv::new` runs once per test process; connecting to the bus no longer does.
    delete_stale_test_streams(&crate::testing::test_nats_url()).await;
    assert!(js.get_stream(&stale).await.is_err(), "stale stream deleted");
    assert!(js.get_stream(&recent).await.is_ok(), "recent stream kept");
    js.delete_stream(&recent).await.expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_bus_fails_publishes_while_switched_off() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let (faulty, switch) = faulty(bus.clone().with_ack_wait(Duration::from_secs(1)));
        assert_eq!(faulty.backend(), kind);
        let mut sub = faulty
            .subscribe("mailer", &["stock.low"])
            .await
            .expect("subscribing goes through");

        switch.set_unavailable(true);
        let err = faulty
            .publish(&message("lost", "stock.low"))
            .await
            .expect_err("switched off");
        assert!(format!("{err:#}").contains("lost"), "{kind}: {err:#}");
        assert!(
            faulty.ping().await.is_err(),
            "{kind}: an outage fails pings too"
        );
        bus.publish(&message("direct", "stock.low"))
            .await
            .expect("the inner bus is not switched off");

        switch.set_unavailable(false);
        faulty
            .publish(&message("back", "stock.low"))
            .await
            .expect("switched on again");
        for id in ["direct", "back"] {
            let delivery = next(&mut sub, kind).await;
            assert_eq!(delivery.message.id, id, "{kind}");
            delivery.ack().await.expect("ack");
        }
        nothing_more(&mut sub, kind).await;
        faulty.delete_stream().await.expect("delete stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_gets_every_message_published_while_it_listens() {
    for (_env, bus) in buses().await {
        let kind = bus.backend();
        let mut early = bus.listen(&["chat.>"]).await.expect("listen");
        // A durable consumer of the same topics still gets its own copy.
        let mut durable = bus.subscribe("chatters", &["chat.>"]).await.expect("sub");
        bus.publish(&message("l1", "chat.message_posted"))
            .await
            .expect("publish");
        let mut late = bus.listen(&["chat.message_posted"]).await.expect("listen");
        bus.publish(&message("l2", "chat.message_posted"))
            .await
            .expect("publish");
        bus.publish(&message("l3", "order.created"))
            .await
            .expect("publish");
        for id in ["l1", "l2"] {
            let delivery = next(&mut early, &format!("{kind}: early listener")).await;
            assert_eq!(delivery.message.id, id, "{kind}: in order");
            delivery.ack().await.expect("ack is a no-op");
        }
        nothing_more(&mut early, &format!("{kind}: another topic")).await;
        let delivery = next(&mut late, &format!("{kind}: late listener")).await;
        assert_eq!(
            delivery.message.id, "l2",
            "{kind}: nothing from before it listened"
        );
        nothing_more(&mut late, &format!("{kind}: late listener")).await;
        for id in ["l1", "l2"] {
            let delivery = next(&mut durable, &format!("{kind}: durable")).await;
            assert_eq!(delivery.message.id, id, "{kind}");
            delivery.ack().await.expect("ack");
        }
        drop(early);
        // A dropped listener is forgotten; publishing goes on.
        bus.publish(&message("l4", "chat.message_posted"))
            .await
            .expect("publish after a listener left");
        bus.delete_stream().await.expect("cleanup");
    }
}
