//! The event bus the outbox relay publishes to and services consume from, chosen by `bus.url`:
//! in process (the embedded default) or NATS JetStream.
//!
//! Both backends give the same contract, so a service is written once:
//! - **Durable named consumers.** Every consumer name gets every message on its topics; several
//!   [`Subscription`]s of one name share the work (competing consumers). All subscriptions of one
//!   name must ask for the same topics (the latest `subscribe` wins).
//! - **At-least-once.** A [`Delivery`] must be acked; one that is nacked, dropped (a panicking
//!   handler) or, on NATS, left un-acked for the ack wait (a killed worker) comes back with
//!   `attempt + 1`. The bus never gives up on a message: deciding when to dead-letter is the
//!   consumer's business (look at [`Delivery::attempt`]). Consumers dedupe on [`Message::id`].
//! - Topics are dot-separated (`stock.low`); a subscription may use NATS wildcards (`stock.*`
//!   matches one token, `>` the rest).
//!
//! The in-process bus lives as long as the process and only delivers messages published after a
//! consumer name first subscribed; messages nobody subscribed to are dropped (the outbox keeps the
//! durable copy). Create it once per process and hand out clones: two [`Bus::connect`] calls
//! without `bus.url` are two separate buses.
//!
//! On NATS, the stream `<PREFIX>_EVENTS` holds subjects `<prefix>.events.<topic>` for 7 days; a
//! consumer name created for the first time receives what the stream still holds, so nothing
//! published before a service's first start is missed.

use std::sync::Arc;
#[cfg(any(test, feature = "testing"))]
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;

use crate::config::Settings;
use crate::outbox::Event;

mod memory;
mod nats;

use memory::{MemoryAck, MemoryBus, MemorySubscription};
use nats::{NatsBus, NatsSubscription};

/// How long a delivery may stay un-acked before it is given to another subscriber.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// One message on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The event id; consumers dedupe on it, and JetStream drops a re-publish within 2 minutes.
    pub id: String,
    /// What happened, e.g. `stock.low`.
    pub topic: String,
    /// The JSON of [`Event`].
    pub payload: Bytes,
}

impl Message {
    /// The message announcing `event`.
    pub fn from_event(event: &Event) -> serde_json::Result<Self> {
        Ok(Self {
            id: event.id.to_string(),
            topic: event.topic.clone(),
            payload: Bytes::from(serde_json::to_vec(event)?),
        })
    }

    /// The event this message carries.
    pub fn event(&self) -> anyhow::Result<Event> {
        serde_json::from_slice(&self.payload)
            .with_context(|| format!("decoding event {} ({})", self.id, self.topic))
    }
}

/// The event bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<Backend>,
    ack_wait: Duration,
}

enum Backend {
    Memory(MemoryBus),
    Nats(Box<NatsBus>),
}

impl Bus {
    /// The bus `settings.bus` describes: in process when `bus.url` is unset, otherwise NATS
    /// JetStream, whose stream is created (or its configuration updated) here.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Bus> {
        let backend = match &settings.bus.url {
            None => Backend::Memory(MemoryBus::default()),
            Some(url) => Backend::Nats(Box::new(NatsBus::connect(url, settings).await?)),
        };
        Ok(Bus {
            backend: Arc::new(backend),
            ack_wait: DEFAULT_ACK_WAIT,
        })
    }

    /// A fresh in-process bus.
    pub fn memory() -> Bus {
        Bus {
            backend: Arc::new(Backend::Memory(MemoryBus::default())),
            ack_wait: DEFAULT_ACK_WAIT,
        }
    }

    /// The same bus, whose subscriptions made from now on redeliver an un-acked (or dropped)
    /// delivery after `ack_wait` instead of 30 s. On NATS this updates the durable consumer.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Bus {
        self.ack_wait = ack_wait;
        self
    }

    /// `memory` or `nats`.
    pub fn backend(&self) -> &'static str {
        match &*self.backend {
            Backend::Memory(_) => "memory",
            Backend::Nats(_) => "nats",
        }
    }

    /// Publishes `message`. On NATS it returns once the stream has stored it (or failed after
    /// `bus.publish_timeout_ms`); a message with an id published in the last 2 minutes is
    /// acknowledged but not stored again.
    pub async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        anyhow::ensure!(
            is_topic(&message.topic),
            "invalid topic `{}`: dot-separated tokens without spaces or wildcards",
            message.topic
        );
        match &*self.backend {
            Backend::Memory(bus) => bus.publish(message),
            Backend::Nats(bus) => bus.publish(message).await,
        }
    }

    /// Subscribes as the durable consumer `consumer` (letters, digits, `_` and `-`) to `topics`,
    /// exact or with wildcards (`stock.*`, `>`).
    pub async fn subscribe(&self, consumer: &str, topics: &[&str]) -> anyhow::Result<Subscription> {
        anyhow::ensure!(
            !consumer.is_empty()
                && consumer
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "invalid consumer name `{consumer}`: use letters, digits, _ and -"
        );
        anyhow::ensure!(!topics.is_empty(), "subscribing {consumer} to no topic");
        for topic in topics {
            anyhow::ensure!(
                is_pattern(topic),
                "invalid topic `{topic}` for consumer {consumer}"
            );
        }
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let inner = match &*self.backend {
            Backend::Memory(bus) => {
                SubscriptionInner::Memory(bus.subscribe(consumer, topics, self.ack_wait))
            }
            Backend::Nats(bus) => SubscriptionInner::Nats(Box::new(
                bus.subscribe(consumer, topics, self.ack_wait).await?,
            )),
        };
        Ok(Subscription { inner })
    }

    /// Checks that the bus can take messages (for `/ready`): on NATS, a round trip that finds the
    /// stream.
    pub async fn ping(&self) -> anyhow::Result<()> {
        match &*self.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Nats(bus) => bus.ping().await,
        }
    }

    /// Deletes the NATS stream with every message and consumer (tests call it at the end); the
    /// in-process bus forgets its consumers and their queues.
    pub async fn delete_stream(&self) -> anyhow::Result<()> {
        match &*self.backend {
            Backend::Memory(bus) => {
                bus.clear();
                Ok(())
            }
            Backend::Nats(bus) => bus.delete_stream().await,
        }
    }

    /// Makes every publish fail until called with `false`, to test how callers survive an outage.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_unavailable(&self, unavailable: bool) {
        let flag = match &*self.backend {
            Backend::Memory(bus) => &bus.unavailable,
            Backend::Nats(bus) => &bus.unavailable,
        };
        flag.store(unavailable, Ordering::SeqCst);
    }
}

/// Messages for one consumer name; see [`Bus::subscribe`]. Keep it for the life of the consumer:
/// on NATS, dropping it can leave one message in flight to it until the ack wait passes.
pub struct Subscription {
    inner: SubscriptionInner,
}

enum SubscriptionInner {
    Memory(MemorySubscription),
    Nats(Box<NatsSubscription>),
}

impl Subscription {
    /// The next delivery, waiting for one. Cancel-safe: dropping the future loses no message, so
    /// it can sit in a `select!` with a shutdown token. `None` once the NATS consumer is gone; an
    /// `Err` is a transient fault (log it and call again).
    pub async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        match &mut self.inner {
            SubscriptionInner::Memory(sub) => Some(Ok(sub.next().await)),
            SubscriptionInner::Nats(sub) => sub.next().await,
        }
    }
}

/// A message handed to one subscriber. Ack it once handled; dropping it un-acked redelivers it
/// after the ack wait.
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, then counts redeliveries.
    pub attempt: u64,
    acker: Acker,
}

enum Acker {
    Memory(MemoryAck),
    Nats(Box<jetstream::Message>),
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Done: the message will not be delivered to this consumer name again. On NATS it returns
    /// once the server has recorded the ack.
    pub async fn ack(self) -> anyhow::Result<()> {
        match self.acker {
            Acker::Memory(ack) => {
                ack.settle();
                Ok(())
            }
            Acker::Nats(message) => message
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("acking message {}", self.message.id)),
        }
    }

    /// Not now: deliver it again (with `attempt + 1`) after `delay`.
    pub async fn nack(self, delay: Duration) -> anyhow::Result<()> {
        match self.acker {
            Acker::Memory(ack) => {
                ack.redeliver_after(delay);
                Ok(())
            }
            Acker::Nats(message) => message
                .ack_with(jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("nacking message {}", self.message.id)),
        }
    }
}

/// A topic one can publish to: dot-separated non-empty tokens, no spaces, no wildcards.
pub(crate) fn is_topic(topic: &str) -> bool {
    topic
        .split('.')
        .all(|t| !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>'))
}

/// A topic or a pattern: `*` stands for one whole token, a final `>` for one or more.
fn is_pattern(pattern: &str) -> bool {
    let tokens: Vec<&str> = pattern.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, t)| *t == "*" || (*t == ">" && i + 1 == tokens.len()) || is_topic(t))
}

/// NATS subject matching, for the in-process bus and for subscriptions of several topics.
fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut topic = topic.split('.');
    loop {
        match (pattern.next(), topic.next()) {
            (Some(">"), Some(_)) | (None, None) => return true,
            (Some(p), Some(t)) if p == "*" || p == t => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::nats::{is_test_prefix, unix_now};
    use super::*;
    use crate::testing::{Backend, TestEnv};
    use async_nats::jetstream::stream;

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
    async fn an_unreachable_nats_names_the_setting() {
        let mut env = TestEnv::new(Backend::Sqlite).await;
        env.settings.bus.url = Some("nats://127.0.0.1:1".into());
        let err = Bus::connect(&env.settings)
            .await
            .err()
            .expect("unreachable");
        assert!(format!("{err:#}").contains("bus.url (NATS_URL)"), "{err:#}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_test_streams_are_deleted_on_connect() {
        let env = TestEnv::new(Backend::Postgres).await;
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

        let bus = Bus::connect(&env.settings).await.expect("connect");
        assert!(js.get_stream(&stale).await.is_err(), "stale stream deleted");
        assert!(js.get_stream(&recent).await.is_ok(), "recent stream kept");
        js.delete_stream(&recent).await.expect("clean up");
        bus.delete_stream().await.expect("delete stream");
    }
}
