//! The NATS JetStream backend: one stream per prefix, a durable pull consumer per consumer name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, consumer::pull, stream};
use async_trait::async_trait;
use futures::StreamExt as _;

use super::{Acker, BusBackend, Delivery, Message, NoAck, SubscriptionBackend, topic_matches};
use crate::config::Settings;

/// JetStream drops a re-publish of an id seen this recently (a relay that crashed after
/// publishing but before marking the row re-publishes it on restart).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long the stream keeps messages, for consumers that are down or not created yet.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Messages a NATS subscription pulls at a time. One, so a message is never parked behind a slow
/// handler in one replica while another replica is idle, nor times out (ack wait) in a buffer.
const PULL_BATCH: usize = 1;
/// How long a pull request waits on the server. The server does not notice a subscription that
/// was dropped; a message it hands to that subscription's last request returns after the ack
/// wait, so requests are kept short-lived.
const PULL_EXPIRY: Duration = Duration::from_secs(10);

/// How long starting waits for NATS before going on without it.
const INITIAL_CONNECT_WAIT: Duration = Duration::from_secs(2);

pub(super) struct NatsBus {
    js: jetstream::Context,
    /// Set once the stream is known to exist; until then (and after a failed publish) calls first
    /// create (or update) it, so a bus that was down at start, or lost its stream, is set up
    /// again when it is back.
    stream_ready: AtomicBool,
    /// `<PREFIX>_EVENTS`
    stream: String,
    /// `<prefix>.events.`
    subjects: String,
    publish_timeout: Duration,
}

struct NatsSubscription {
    messages: pull::Stream,
    /// Filtered here too: a consumer of several topics pulls the whole stream (one filter subject
    /// is all NATS servers before 2.10 support).
    topics: Vec<String>,
    subjects: String,
}

/// A listener ([`super::Bus::listen`]): a core NATS subscription to the stream's subjects.
struct NatsListener {
    subscriber: async_nats::Subscriber,
    topics: Vec<String>,
    subjects: String,
}

#[async_trait]
impl SubscriptionBackend for NatsListener {
    async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        loop {
            let message = self.subscriber.next().await?;
            let topic = message
                .subject
                .as_str()
                .strip_prefix(&self.subjects)
                .unwrap_or(message.subject.as_str())
                .to_owned();
            if !self.topics.iter().any(|p| topic_matches(p, &topic)) {
                continue;
            }
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map_or_else(String::new, |v| v.as_str().to_owned());
            return Some(Ok(Delivery {
                message: Message {
                    id,
                    topic,
                    payload: message.payload,
                },
                attempt: 1,
                acker: Box::new(NoAck),
            }));
        }
    }
}

impl NatsBus {
    /// Connects in the background: a NATS that is down at start does not stop the service (its
    /// events wait in the outbox, `/ready` shows the bus down); the client keeps reconnecting.
    /// Only an unusable URL is an error here.
    pub(super) async fn connect(url: &str, settings: &Settings) -> anyhow::Result<Self> {
        let prefix = &settings.bus.prefix;
        let client = async_nats::ConnectOptions::new()
            .name(format!("agora-{prefix}"))
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(
                            "lost the NATS connection; reconnecting (events wait in the outbox)"
                        );
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            })
            .connect(url)
            .await
            .with_context(|| {
                format!("connecting to NATS at {} (bus.url (NATS_URL))", redact(url))
            })?;
        let mut js = jetstream::new(client);
        let publish_timeout = Duration::from_millis(settings.bus.publish_timeout_ms);
        js.set_timeout(publish_timeout.max(Duration::from_secs(1)));
        let bus = Self {
            js,
            stream_ready: AtomicBool::new(false),
            stream: format!("{}_EVENTS", prefix.to_uppercase()),
            subjects: format!("{prefix}.events."),
            publish_timeout,
        };
        // A reachable server answers within moments; an unreachable one is not waited for.
        let connecting = tokio::time::Instant::now();
        while bus.js.client().connection_state() != async_nats::connection::State::Connected
            && connecting.elapsed() < INITIAL_CONNECT_WAIT
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(err) = bus.ensure_stream().await {
            tracing::warn!(
                error.message = %format!("{err:#}"),
                "the bus is not usable yet; events wait in the outbox until it is"
            );
        }
        Ok(bus)
    }

    /// Creates (or updates) the stream unless that was done already.
    async fn ensure_stream(&self) -> anyhow::Result<()> {
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            anyhow::bail!("not connected to NATS");
        }
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.js
            .create_or_update_stream(stream::Config {
                name: self.stream.clone(),
                subjects: vec![format!("{}>", self.subjects)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: MAX_AGE,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| {
                format!(
                    "creating the JetStream stream {} (is JetStream enabled on bus.url?)",
                    self.stream
                )
            })?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates the durable consumer `name`, or updates its ack wait. A change of topics recreates
    /// it instead, resuming after the last message it acknowledged: NATS 2.9 accepts a new filter
    /// on an existing consumer but then delivers nothing (seen on 2.9.10), and a recreated
    /// consumer neither replays what was handled nor skips what is pending.
    async fn durable(
        &self,
        name: &str,
        filter: String,
        ack_wait: Duration,
    ) -> anyhow::Result<consumer::Consumer<pull::Config>> {
        let mut config = pull::Config {
            durable_name: Some(name.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait,
            // Never given up on by the server: the consumer decides, from `attempt`.
            max_deliver: -1,
            deliver_policy: consumer::DeliverPolicy::All,
            filter_subject: filter,
            ..Default::default()
        };
        let existing = self
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(name, &self.stream)
            .await;
        if let Ok(existing) = existing {
            let info = existing.cached_info();
            if info.config.filter_subject == config.filter_subject {
                // The start position cannot change; keep it so the update is accepted.
                config.deliver_policy = info.config.deliver_policy;
            } else {
                tracing::info!(
                    consumer = name,
                    from = %info.config.filter_subject,
                    to = %config.filter_subject,
                    "recreating the consumer for its new topics"
                );
                config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence + 1,
                };
                self.js
                    .delete_consumer_from_stream(name, &self.stream)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))
                    .with_context(|| format!("deleting consumer {name} to change its topics"))?;
            }
        }
        self.js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("creating consumer {name} on {}", self.stream))
    }
}

#[async_trait]
impl BusBackend for NatsBus {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        self.ensure_stream().await?;
        let subject = format!("{}{}", self.subjects, message.topic);
        let publish = jetstream::message::PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.id);
        let stored = async {
            let ack = self.js.send_publish(subject, publish).await?;
            ack.await?;
            Ok::<_, async_nats::Error>(())
        };
        let result = tokio::time::timeout(self.publish_timeout, stored)
            .await
            .map_err(|_| anyhow::anyhow!("no ack within {:?}", self.publish_timeout))
            .and_then(|r| r.map_err(|e| anyhow::anyhow!(e)))
            .with_context(|| format!("publishing {} ({})", message.id, message.topic));
        if result.is_err() {
            // The stream may be gone (a server that lost its storage): check it next time.
            self.stream_ready.store(false, Ordering::Release);
        }
        result
    }

    /// Pipelined: every message is sent before any ack is awaited (JetStream stores them in the
    /// order sent), so a batch costs about one round trip instead of one per message.
    async fn publish_all(
        &self,
        messages: &[Message],
        deadline: tokio::time::Instant,
    ) -> Vec<anyhow::Result<()>> {
        if let Err(err) = self.ensure_stream().await {
            return vec![Err(err)];
        }
        // Each publish still has its own limit, as one at a time would.
        let ack_deadline = deadline.min(tokio::time::Instant::now() + self.publish_timeout);
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let subject = format!("{}{}", self.subjects, message.topic);
            let publish = jetstream::message::PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(&message.id);
            let sent =
                tokio::time::timeout_at(ack_deadline, self.js.send_publish(subject, publish))
                    .await
                    .map_err(|_| anyhow::anyhow!("not sent within {:?}", self.publish_timeout))
                    .and_then(|r| r.map_err(|e| anyhow::anyhow!(e)));
            let failed = sent.is_err();
            pending.push((message, sent));
            if failed {
                break;
            }
        }
        let mut results = Vec::with_capacity(pending.len());
        for (message, sent) in pending {
            let result = match sent {
                Err(err) => Err(err),
                Ok(ack) => tokio::time::timeout_at(ack_deadline, ack)
                    .await
                    .map_err(|_| anyhow::anyhow!("no ack within {:?}", self.publish_timeout))
                    .and_then(|r| r.map(|_| ()).map_err(|e| anyhow::anyhow!(e))),
            }
            .with_context(|| format!("publishing {} ({})", message.id, message.topic));
            let failed = result.is_err();
            results.push(result);
            if failed {
                // The stream may be gone (a server that lost its storage): check it next time.
                self.stream_ready.store(false, Ordering::Release);
                break;
            }
        }
        results
    }

    async fn subscribe(
        &self,
        name: &str,
        topics: Vec<String>,
        ack_wait: Duration,
    ) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        self.ensure_stream().await?;
        let filter = match topics.as_slice() {
            [one] => format!("{}{one}", self.subjects),
            _ => format!("{}>", self.subjects),
        };
        let consumer = self.durable(name, filter, ack_wait).await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .expires(PULL_EXPIRY)
            .heartbeat(PULL_EXPIRY / 2)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("pulling from consumer {name}"))?;
        Ok(Box::new(NatsSubscription {
            messages,
            topics,
            subjects: self.subjects.clone(),
        }))
    }

    async fn listen(&self, topics: Vec<String>) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        let subject = match topics.as_slice() {
            [one] => format!("{}{one}", self.subjects),
            _ => format!("{}>", self.subjects),
        };
        let subscriber = self
            .js
            .client()
            .subscribe(subject.clone())
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("subscribing to {subject}"))?;
        Ok(Box::new(NatsListener {
            subscriber,
            topics,
            subjects: self.subjects.clone(),
        }))
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.ensure_stream().await?;
        self.js
            .get_stream(&self.stream)
            .await
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("looking up the JetStream stream {}", self.stream))
    }

    async fn delete_stream(&self) -> anyhow::Result<()> {
        match self.js.delete_stream(&self.stream).await {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(err.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(())
            }
            Err(err) => Err(anyhow::anyhow!(err))
                .with_context(|| format!("deleting the JetStream stream {}", self.stream)),
        }
    }
}

#[async_trait]
impl SubscriptionBackend for NatsSubscription {
    async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(message) => message,
                Err(err) => {
                    return Some(
                        Err(anyhow::anyhow!(err)).context("pulling the next message from NATS"),
                    );
                }
            };
            let (attempt, sequence) = match message.info() {
                Ok(info) => (
                    u64::try_from(info.delivered).unwrap_or(1),
                    info.stream_sequence,
                ),
                Err(err) => {
                    return Some(Err(anyhow::anyhow!(err)).context("reading delivery metadata"));
                }
            };
            let topic = message
                .subject
                .as_str()
                .strip_prefix(&self.subjects)
                .unwrap_or(message.subject.as_str())
                .to_owned();
            if !self.topics.iter().any(|p| topic_matches(p, &topic)) {
                // Pulled only because the consumer's server-side filter is wider than its topics.
                if let Err(err) = message.ack().await {
                    return Some(Err(anyhow::anyhow!(err)).context("acking a skipped message"));
                }
                continue;
            }
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map_or_else(|| sequence.to_string(), |v| v.as_str().to_owned());
            return Some(Ok(Delivery {
                message: Message {
                    id,
                    topic,
                    payload: message.payload.clone(),
                },
                attempt,
                acker: Box::new(message),
            }));
        }
    }
}

#[async_trait]
impl Acker for jetstream::Message {
    async fn ack(self: Box<Self>) -> anyhow::Result<()> {
        self.double_ack().await.map_err(|e| anyhow::anyhow!(e))
    }

    async fn nack(self: Box<Self>, delay: Duration) -> anyhow::Result<()> {
        self.ack_with(jetstream::AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| anyhow::anyhow!(e))
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Test streams (`T<unix time>_..._EVENTS`) older than this are deleted by the next test run.
#[cfg(any(test, feature = "testing"))]
const STALE_TEST_STREAM: u64 = 2 * 3600;

/// Deletes the streams of test runs that were killed before deleting theirs: their names carry
/// their start time (like the test schemas of PostgreSQL), so those over two hours old go. Quiet
/// when NATS is unreachable: the test's own connection reports that. [`crate::testing`] calls it
/// once per test process.
#[cfg(any(test, feature = "testing"))]
pub(crate) async fn delete_stale_test_streams(url: &str) {
    use futures::TryStreamExt as _;

    let Ok(client) = async_nats::ConnectOptions::new()
        .name("agora-test-cleanup")
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
    else {
        return;
    };
    let js = jetstream::new(client);
    let Ok(names) = js.stream_names().try_collect::<Vec<String>>().await else {
        return;
    };
    let cutoff = unix_now().saturating_sub(STALE_TEST_STREAM);
    for name in names {
        let Some(prefix) = name.strip_suffix("_EVENTS") else {
            continue;
        };
        if !is_test_prefix(&prefix.to_lowercase()) {
            continue;
        }
        let stamp: u64 = prefix[1..11].parse().unwrap_or(u64::MAX);
        if stamp < cutoff {
            tracing::debug!(stream = %name, "deleting a stale test stream");
            let _ = js.delete_stream(&name).await;
        }
    }
}

/// `t<10 digits>_...`: the prefix [`crate::testing::TestEnv`] gives each test.
#[cfg(any(test, feature = "testing"))]
pub(super) fn is_test_prefix(prefix: &str) -> bool {
    let bytes = prefix.as_bytes();
    bytes.len() > 12
        && bytes[0] == b't'
        && bytes[1..11].iter().all(u8::is_ascii_digit)
        && bytes[11] == b'_'
}

#[cfg(any(test, feature = "testing"))]
pub(super) fn unix_now() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};

    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
