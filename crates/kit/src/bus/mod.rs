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
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;

use crate::config::Settings;
use crate::event::{Event, is_topic};

#[cfg(any(test, feature = "testing"))]
mod faulty;
mod memory;
mod nats;

#[cfg(any(test, feature = "testing"))]
pub use faulty::{FaultSwitch, faulty};
#[cfg(any(test, feature = "testing"))]
pub(crate) use nats::delete_stale_test_streams;

use memory::MemoryBus;
use nats::NatsBus;

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

/// What a backend does; [`Bus`] validates names and topics before calling it.
#[async_trait]
trait BusBackend: Send + Sync {
    /// `memory` or `nats`.
    fn name(&self) -> &'static str;
    /// Publishes a message whose topic is valid (no wildcards).
    async fn publish(&self, message: &Message) -> anyhow::Result<()>;
    /// Publishes `messages` in order, until one fails or `deadline` passes; returns the results
    /// of those attempted (fewer than `messages`: the rest were not sent, so nothing overtakes a
    /// message that failed). A backend that can have several publishes in flight (JetStream:
    /// send all, then await the acks) overrides this.
    async fn publish_all(
        &self,
        messages: &[Message],
        deadline: tokio::time::Instant,
    ) -> Vec<anyhow::Result<()>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let result = self.publish(message).await;
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        results
    }
    /// Subscribes as the valid consumer name `consumer` to valid, non-empty `topics`.
    async fn subscribe(
        &self,
        consumer: &str,
        topics: Vec<String>,
        ack_wait: Duration,
    ) -> anyhow::Result<Box<dyn SubscriptionBackend>>;
    /// A fan-out subscription to valid, non-empty `topics` (see [`Bus::listen`]).
    async fn listen(&self, topics: Vec<String>) -> anyhow::Result<Box<dyn SubscriptionBackend>>;
    async fn ping(&self) -> anyhow::Result<()>;
    async fn delete_stream(&self) -> anyhow::Result<()>;
}

/// A backend's side of a [`Subscription`].
#[async_trait]
trait SubscriptionBackend: Send + Sync {
    /// See [`Subscription::next`]; must be cancel-safe.
    async fn next(&mut self) -> Option<anyhow::Result<Delivery>>;
}

/// A backend's side of a [`Delivery`]: settles its message. Dropped un-settled, the message comes
/// back after the ack wait.
#[async_trait]
trait Acker: Send + Sync {
    async fn ack(self: Box<Self>) -> anyhow::Result<()>;
    async fn nack(self: Box<Self>, delay: Duration) -> anyhow::Result<()>;
}

/// The event bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<dyn BusBackend>,
    ack_wait: Duration,
}

impl Bus {
    /// The bus `settings.bus` describes: in process when `bus.url` is unset, otherwise NATS
    /// JetStream, whose stream is created (or its configuration updated) here.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Bus> {
        let backend: Arc<dyn BusBackend> = match &settings.bus.url {
            None => Arc::new(MemoryBus::default()),
            Some(url) => Arc::new(NatsBus::connect(url, settings).await?),
        };
        Ok(Bus::with_backend(backend))
    }

    /// A fresh in-process bus.
    pub fn memory() -> Bus {
        Bus::with_backend(Arc::new(MemoryBus::default()))
    }

    fn with_backend(backend: Arc<dyn BusBackend>) -> Bus {
        Bus {
            backend,
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
        self.backend.name()
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
        self.backend.publish(message).await
    }

    /// Publishes `messages` in order, several in flight at once where the backend allows, until
    /// one fails or `deadline` passes; returns the results of those attempted (a message with an
    /// invalid topic is a failure of its own, the ones before it are published).
    pub async fn publish_all(
        &self,
        messages: &[Message],
        deadline: tokio::time::Instant,
    ) -> Vec<anyhow::Result<()>> {
        let valid = messages
            .iter()
            .position(|m| !is_topic(&m.topic))
            .unwrap_or(messages.len());
        let mut results = self.backend.publish_all(&messages[..valid], deadline).await;
        if results.len() == valid
            && results.iter().all(|r| r.is_ok())
            && let Some(bad) = messages.get(valid)
        {
            results.push(Err(anyhow::anyhow!(
                "invalid topic `{}`: dot-separated tokens without spaces or wildcards",
                bad.topic
            )));
        }
        results
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
        let inner = self
            .backend
            .subscribe(consumer, topics, self.ack_wait)
            .await?;
        Ok(Subscription { inner })
    }

    /// Listens to `topics` (exact or with wildcards) without a consumer name: every listener, in
    /// every process, gets every message published while it listens (fan-out, where
    /// [`Bus::subscribe`] shares a name's messages between its subscriptions). Nothing is kept
    /// for a listener: it starts with the next message, gets none published while it was not
    /// listening and none again; [`Delivery::ack`] and [`Delivery::nack`] do nothing. For state
    /// that every replica must see at once and that is durable elsewhere (a chat's new messages,
    /// pushed to the WebSocket clients of every replica). On NATS it is a core subscription to the
    /// stream's subjects (no JetStream consumer to create or clean up); a re-publish the stream
    /// drops as a duplicate still reaches listeners, so they dedupe too.
    pub async fn listen(&self, topics: &[&str]) -> anyhow::Result<Subscription> {
        anyhow::ensure!(!topics.is_empty(), "listening to no topic");
        for topic in topics {
            anyhow::ensure!(is_pattern(topic), "invalid topic `{topic}` to listen to");
        }
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let inner = self.backend.listen(topics).await?;
        Ok(Subscription { inner })
    }

    /// Checks that the bus can take messages (for `/ready`): on NATS, a round trip that finds the
    /// stream.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.backend.ping().await
    }

    /// Deletes the NATS stream with every message and consumer (tests call it at the end); the
    /// in-process bus forgets its consumers and their queues.
    pub async fn delete_stream(&self) -> anyhow::Result<()> {
        self.backend.delete_stream().await
    }
}

/// Messages for one consumer name; see [`Bus::subscribe`]. Keep it for the life of the consumer:
/// on NATS, dropping it can leave one message in flight to it until the ack wait passes.
pub struct Subscription {
    inner: Box<dyn SubscriptionBackend>,
}

impl Subscription {
    /// The next delivery, waiting for one. Cancel-safe: dropping the future loses no message, so
    /// it can sit in a `select!` with a shutdown token. `None` once the NATS consumer is gone; an
    /// `Err` is a transient fault (log it and call again).
    pub async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        self.inner.next().await
    }
}

/// A message handed to one subscriber. Ack it once handled; dropping it un-acked redelivers it
/// after the ack wait.
pub struct Delivery {
    pub message: Message,
    /// 1 on the first delivery, then counts redeliveries.
    pub attempt: u64,
    acker: Box<dyn Acker>,
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
        let Delivery { message, acker, .. } = self;
        acker
            .ack()
            .await
            .with_context(|| format!("acking message {}", message.id))
    }

    /// Not now: deliver it again (with `attempt + 1`) after `delay`.
    pub async fn nack(self, delay: Duration) -> anyhow::Result<()> {
        let Delivery { message, acker, .. } = self;
        acker
            .nack(delay)
            .await
            .with_context(|| format!("nacking message {}", message.id))
    }
}

/// The acker of a listener's delivery: nothing to settle.
struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> anyhow::Result<()> {
        Ok(())
    }

    async fn nack(self: Box<Self>, _delay: Duration) -> anyhow::Result<()> {
        Ok(())
    }
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
mod tests;
