//! The one event consumer every consuming service uses: a durable bus subscription whose messages
//! are handled exactly once in effect, retried with back-off, and dead-lettered when they keep
//! failing. A service writes a [`Handler`] and never a retry loop of its own.
//!
//! For each delivery, in ONE database transaction of the consuming service (shared by the
//! deliveries handled at the same moment, see below):
//! 1. the message id is recorded in `consumed_messages` (kit's migration); if it is already
//!    there, the message was handled before (a redelivery) and is acked without running anything;
//! 2. the handler applies the event's effects on the same transaction;
//! 3. commit, then ack. A crash before the commit leaves nothing behind and the bus redelivers;
//!    a crash between commit and ack redelivers a message that step 1 then skips.
//!
//! A handler whose effects are idempotent by its own state (it re-reads under its locks and a
//! repeat changes nothing) says so with [`Handler::idempotent`]: step 1 is skipped, saving a
//! write per message, and a redelivery runs the handler again, harmlessly.
//!
//! Deliveries handled at the same moment (a consumer with [`Consumer::with_concurrency`], under
//! load) share one transaction and one commit, the largest cost of a message to the database:
//! their ids are recorded in one statement, and [`Handler::handle_all`] gets their events
//! together (so a handler may write them in one statement too). A failure among them rolls the
//! group back and each of its messages is handled again alone ([`Handler::handle`]), so a
//! failing message fails only itself. Each message's `prepare` runs on its own before.
//!
//! A handler error rolls everything back and nacks the delivery, which comes back after
//! `bus.consumer_backoff_ms`, doubling up to `bus.consumer_backoff_max_ms`. At delivery number
//! `bus.consumer_max_attempts` (or at once for a message that is not an event at all) the
//! message goes to `dead_letters` in the service's database instead, counted in
//! `agora_consumer_dead_lettered_total`; [`DeadLetters`] lists them and retries one through the
//! same handler. The dead-letter store is a table in the consumer's own database on both buses:
//! durable in the embedded mode too (the in-process bus keeps nothing), specific to the consumer
//! that failed (a retry reaches no other consumer), and listable and retryable from any replica.
//!
//! The handler runs inside the transaction, which holds a database connection (and on SQLite
//! the database's write lock): slow remote calls belong in [`Handler::prepare`], which runs
//! before the transaction opens, must be idempotent (a failed attempt is retried), and hands what
//! it found to [`Handler::handle`] (its [`Handler::Prepared`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::bus::{Bus, Delivery, Message};
use crate::config::BusSettings;
use crate::db::{Db, Dialect, Tx, query};
use crate::event::Event;

/// What a consumer does with each event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// What [`Handler::prepare`] found for an event, handed to [`Handler::handle`] (`()` when
    /// there is nothing to prepare).
    type Prepared: Send + Sync + 'static;

    /// Applies `event`'s effects on `tx`, with what `prepare` found for it; they commit together
    /// with the record that the message was handled. An error rolls both back and the message is
    /// retried.
    async fn handle(
        &self,
        tx: &mut Tx,
        event: &Event,
        prepared: Self::Prepared,
    ) -> anyhow::Result<()>;

    /// Applies the effects of the events of one group (the messages handled at the same moment,
    /// in delivery order, duplicates left out) on `tx`, each with what `prepare` found for it.
    /// Each event by [`Handler::handle`] by default; a handler that can write many events'
    /// effects in fewer statements overrides it. An error fails the whole group, which is then
    /// handled again one message at a time ([`Handler::handle`] alone).
    async fn handle_all(
        &self,
        tx: &mut Tx,
        jobs: Vec<(&Event, Self::Prepared)>,
    ) -> anyhow::Result<()> {
        for (event, prepared) in jobs {
            self.handle(tx, event, prepared).await?;
        }
        Ok(())
    }

    /// The slow part of handling `event`, before its transaction opens: remote calls, waits,
    /// reads that need no lock. It must be safe to repeat (it runs again for a redelivery, and
    /// for a retry after the transaction failed) and must not rely on running only once; what it
    /// returns may be out of date by the time `handle` runs, so `handle` re-reads under its locks
    /// whatever can change. Keeping it outside means a database connection is held only for the
    /// writes.
    async fn prepare(&self, event: &Event) -> anyhow::Result<Self::Prepared>;

    /// Whether `event` can have an effect at all. An event that cannot (one the handler would
    /// read and leave alone) is acked without a transaction and without recording it, so a
    /// consumer of a busy topic pays nothing for the events it ignores. Every event by default.
    fn wants(&self, _event: &Event) -> bool {
        true
    }

    /// Whether a repeat of [`Handler::handle`] for the same event changes nothing, by the
    /// handler's own state (a state machine that re-reads under its row locks): then the message
    /// id is not recorded in `consumed_messages` (one write fewer per message), and a redelivery
    /// simply runs the handler again. False by default: the id is recorded and a redelivery is
    /// skipped.
    fn idempotent(&self) -> bool {
        false
    }

    /// Runs after the effects of `event` committed: what must follow a commit and may be lost
    /// without harm (waking the outbox relay for the events the handler wrote, invalidating a
    /// cache). Nothing by default.
    async fn committed(&self, _event: &Event) {}
}

/// A [`Handler`] with its `Prepared` type out of sight, so a consumer holds any handler.
#[async_trait]
trait Apply: Send + Sync {
    fn wants(&self, event: &Event) -> bool;

    /// `prepare`, then in one transaction (shared with the messages handled at the same moment,
    /// see [`Grouped`]): the message recorded (unless the handler is idempotent) and `handle`;
    /// then `committed`.
    async fn apply(&self, message_id: &str, event: &Event) -> Result<Outcome, Failure>;
}

/// Messages handled at the same moment by a consumer's concurrent deliveries commit together:
/// each is prepared on its own (outside any transaction, as before), then their records and
/// handlers run in one transaction and one commit, which is what a message costs the database
/// most (the commit's flush). A batch that fails as a whole (one handler's error aborts the
/// transaction) is rolled back and each of its messages is handled again alone, prepared anew,
/// so one failing message fails only itself. A message that arrives alone is handled at once.
struct Grouped<H: Handler> {
    handler: Arc<H>,
    db: Db,
    consumer: Arc<str>,
    /// Made on first use (it spawns its flushers, so it needs the runtime).
    batcher: std::sync::OnceLock<Group<H::Prepared>>,
}

/// Where a message waits for its group: its outcome, or `None` when the group gave up and it
/// must be handled again alone.
type Group<P> = Batcher<Job<P>, Option<Result<Outcome, Failure>>>;

/// One message on its way into a batch.
struct Job<P> {
    message_id: String,
    event: Event,
    prepared: P,
}

/// At most this many messages commit together.
const GROUP_MAX: usize = 32;

impl<H: Handler> Grouped<H> {
    fn new(handler: H, db: Db, consumer: &str) -> Self {
        Self {
            handler: Arc::new(handler),
            db,
            consumer: consumer.into(),
            batcher: std::sync::OnceLock::new(),
        }
    }

    fn batcher(&self) -> &Group<H::Prepared> {
        self.batcher.get_or_init(|| {
            let (handler, db, consumer) =
                (self.handler.clone(), self.db.clone(), self.consumer.clone());
            Batcher::new(
                crate::batch::flushers_for(&self.db),
                GROUP_MAX,
                move |jobs: Vec<Job<H::Prepared>>| {
                    let (handler, db, consumer) = (handler.clone(), db.clone(), consumer.clone());
                    async move {
                        let count = jobs.len();
                        match together(&*handler, &db, &consumer, jobs).await {
                            Ok(outcomes) => outcomes.into_iter().map(|o| Some(Ok(o))).collect(),
                            // Alone, its failure is its own.
                            Err(err) if count == 1 => vec![Some(Err(Failure::Handler(err)))],
                            // Together, whose it is is unknown: each again alone.
                            Err(_) => (0..count).map(|_| None).collect(),
                        }
                    }
                },
            )
        })
    }
}

/// Records and handles `jobs` in one transaction: each one's outcome, once committed.
async fn together<H: Handler>(
    handler: &H,
    db: &Db,
    consumer: &str,
    jobs: Vec<Job<H::Prepared>>,
) -> anyhow::Result<Vec<Outcome>> {
    let mut tx = db
        .begin()
        .await
        .context("starting the consumer transaction")?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut fresh = if handler.idempotent() {
        None
    } else {
        Some(record(&mut tx, consumer, &jobs).await?)
    };
    let mut group = Vec::with_capacity(jobs.len());
    for job in jobs {
        // A message id recorded by this transaction is handled once: by its first job (a
        // second delivery of it in the same group finds it taken).
        if fresh.as_mut().is_some_and(|f| !f.remove(&job.message_id)) {
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        group.push((job.event, job.prepared));
        outcomes.push(Outcome::Handled);
    }
    if group.len() == 1 {
        // Alone (as a group that failed is handled again): `handle`.
        let (event, prepared) = group.pop().expect("one job");
        handler.handle(&mut tx, &event, prepared).await?;
    } else if !group.is_empty() {
        let (events, prepared): (Vec<Event>, Vec<_>) = group.into_iter().unzip();
        handler
            .handle_all(&mut tx, events.iter().zip(prepared).collect())
            .await?;
    }
    tx.commit()
        .await
        .context("committing the handler's transaction")?;
    Ok(outcomes)
}

/// Records the message ids of `jobs` as handled by `consumer`, in one statement: the ids that
/// were not recorded before (the others are redeliveries).
async fn record<P>(
    tx: &mut Tx,
    consumer: &str,
    jobs: &[Job<P>],
) -> anyhow::Result<std::collections::HashSet<String>> {
    let now = Utc::now();
    if let [job] = jobs {
        let fresh = query(RECORD)
            .bind(consumer)
            .bind(&job.message_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .context("recording the message as handled")?
            == 1;
        return Ok(fresh.then(|| job.message_id.clone()).into_iter().collect());
    }
    let ids: Vec<&str> = jobs.iter().map(|j| j.message_id.as_str()).collect();
    let sql = match tx.dialect() {
        Dialect::Postgres => RECORD_MANY_POSTGRES,
        Dialect::Sqlite => RECORD_MANY_SQLITE,
    };
    let fresh: Vec<(String,)> = query(sql)
        .bind(consumer)
        .bind(serde_json::to_string(&ids)?)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .context("recording the messages as handled")?;
    Ok(fresh.into_iter().map(|(id,)| id).collect())
}

#[async_trait]
impl<H: Handler> Apply for Grouped<H> {
    fn wants(&self, event: &Event) -> bool {
        self.handler.wants(event)
    }

    async fn apply(&self, message_id: &str, event: &Event) -> Result<Outcome, Failure> {
        let job = |prepared| Job {
            message_id: message_id.to_owned(),
            event: event.clone(),
            prepared,
        };
        let prepared = self
            .handler
            .prepare(event)
            .await
            .map_err(Failure::Handler)?;
        let outcome = match self.batcher().submit(job(prepared)).await {
            Ok(Some(outcome)) => outcome?,
            // Its batch gave up (or ended without its result): alone, prepared again.
            Ok(None) | Err(_) => {
                let prepared = self
                    .handler
                    .prepare(event)
                    .await
                    .map_err(Failure::Handler)?;
                together(
                    &*self.handler,
                    &self.db,
                    &self.consumer,
                    vec![job(prepared)],
                )
                .await
                .map_err(Failure::Handler)?
                .pop()
                .ok_or_else(|| Failure::Handler(anyhow::anyhow!("no outcome")))?
            }
        };
        if outcome == Outcome::Handled {
            self.handler.committed(event).await;
        }
        Ok(outcome)
    }
}

/// How often a running consumer forgets handled ids older than `bus.consumer_dedupe_hours`.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Pause before subscribing again after the bus refused or ended a subscription.
const RESUBSCRIBE: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

const RECORD: &str = "insert into consumed_messages (consumer, message_id, processed_at) \
                      values ($1, $2, $3) on conflict do nothing";
/// [`RECORD`] for the messages of a group at once (their ids as one JSON array, so every group
/// size is one statement text); `distinct`, as a message may be delivered twice into one group.
const RECORD_MANY_POSTGRES: &str = "insert into consumed_messages (consumer, message_id, processed_at) \
     select distinct $1::text, value, $3::timestamptz from jsonb_array_elements_text($2::jsonb) \
     on conflict do nothing returning message_id";
const RECORD_MANY_SQLITE: &str = "insert into consumed_messages (consumer, message_id, processed_at) \
     select distinct $1, value, $3 from json_each($2) where true \
     on conflict do nothing returning message_id";
const DEAD_LETTER: &str = "insert into dead_letters \
    (consumer, message_id, topic, payload, attempts, last_error, dead_at) \
    values ($1, $2, $3, $4, $5, $6, $7) \
    on conflict (consumer, message_id) do update set attempts = excluded.attempts, \
    last_error = excluded.last_error, dead_at = excluded.dead_at, topic = excluded.topic, \
    payload = excluded.payload";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumerLabel {
    consumer: String,
}

/// A consumer's counters.
#[derive(Clone, Default)]
struct Counters {
    handled: Family<ConsumerLabel, Counter>,
    duplicates: Family<ConsumerLabel, Counter>,
    ignored: Family<ConsumerLabel, Counter>,
    retried: Family<ConsumerLabel, Counter>,
    dead_lettered: Family<ConsumerLabel, Counter>,
}

/// A named consumer of some topics; see the module docs. Build it, then [`Consumer::spawn`] it as
/// a background task of the service (`App::with_task`).
pub struct Consumer {
    inner: Arc<Inner>,
    topics: Vec<String>,
    bus: Bus,
    concurrency: usize,
}

struct Inner {
    name: String,
    /// Subscribing or receiving failing (the bus is down) is logged once per outage.
    outage: crate::outage::Outage,
    db: Db,
    handler: Box<dyn Apply>,
    max_attempts: u64,
    backoff: Duration,
    backoff_max: Duration,
    dedupe: Option<Duration>,
    label: ConsumerLabel,
    counters: Counters,
}

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its effects committed.
    Handled,
    /// Handled before: skipped.
    Duplicate,
    /// Not wanted by the handler ([`Handler::wants`]): acked, nothing recorded.
    Ignored,
    /// The handler failed; the message comes back after the back-off.
    Retry,
    /// Moved to the dead letters.
    DeadLettered,
}

impl Consumer {
    /// The consumer `name` (letters, digits, `_`, `-`; the durable name on the bus) of `topics`
    /// (wildcards allowed), recording what it handled in `db`, with the limits of `settings`.
    pub fn new(
        name: &str,
        topics: &[&str],
        db: Db,
        bus: Bus,
        settings: &BusSettings,
        handler: impl Handler,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                outage: crate::outage::Outage::new(format!("bus (consumer {name})")),
                handler: Box::new(Grouped::new(handler, db.clone(), name)),
                db,
                max_attempts: u64::from(settings.consumer_max_attempts.max(1)),
                backoff: Duration::from_millis(settings.consumer_backoff_ms.max(1)),
                backoff_max: Duration::from_millis(
                    settings
                        .consumer_backoff_max_ms
                        .max(settings.consumer_backoff_ms),
                ),
                dedupe: (settings.consumer_dedupe_hours > 0)
                    .then(|| Duration::from_secs(settings.consumer_dedupe_hours * 3600)),
                label: ConsumerLabel {
                    consumer: name.to_owned(),
                },
                counters: Counters::default(),
            }),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            bus,
            concurrency: 1,
        }
    }

    /// Handles up to `n` messages at once (n competing subscriptions of the same name).
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The dead letters of this consumer, to list and retry (from an admin route, say).
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters {
            inner: self.inner.clone(),
        }
    }

    /// Exposes `agora_consumer_{handled,duplicates,ignored,retried,dead_lettered}_total{consumer}`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let c = &self.inner.counters;
        metrics.register(
            "consumer_handled",
            "Messages whose handler committed",
            c.handled.clone(),
        );
        metrics.register(
            "consumer_duplicates",
            "Redelivered messages skipped because they were handled before",
            c.duplicates.clone(),
        );
        metrics.register(
            "consumer_ignored",
            "Messages acked unhandled because the handler cannot act on them",
            c.ignored.clone(),
        );
        metrics.register(
            "consumer_retried",
            "Handler failures that will be retried after a back-off",
            c.retried.clone(),
        );
        metrics.register(
            "consumer_dead_lettered",
            "Messages moved to the dead letters",
            c.dead_lettered.clone(),
        );
    }

    /// Consumes until `shutdown` fires; a message in progress is finished, never cut. A bus that
    /// is down (or a subscription that ends) is retried with back-off.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let workers: Vec<JoinHandle<()>> = (0..self.concurrency)
                .map(|_| {
                    let inner = self.inner.clone();
                    let bus = self.bus.clone();
                    let topics = self.topics.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move { inner.run(&bus, &topics, shutdown).await })
                })
                .collect();
            let prune = {
                let inner = self.inner.clone();
                let shutdown = shutdown.clone();
                async move {
                    loop {
                        if let Err(err) = inner.prune().await {
                            tracing::warn!(consumer = %inner.name, error.message = %format!("{err:#}"), "pruning handled message ids failed");
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(PRUNE_EVERY) => {}
                        }
                    }
                }
            };
            let workers = futures::future::join_all(workers);
            let ((), _) = tokio::join!(prune, workers);
            tracing::debug!(consumer = %self.inner.name, "consumer stopped");
        })
    }

    /// Handles one delivery as the running consumer does: handle (or skip), then ack, nack or
    /// dead-letter. For tests and for callers with their own subscription.
    pub async fn process(&self, delivery: Delivery) -> anyhow::Result<Outcome> {
        self.inner.process(delivery).await
    }
}

impl Inner {
    async fn run(&self, bus: &Bus, topics: &[String], shutdown: CancellationToken) {
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mut pause = Duration::ZERO;
        'subscribe: loop {
            if !pause.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
            let mut subscription = match bus.subscribe(&self.name, &topics).await {
                Ok(subscription) => subscription,
                Err(err) => {
                    pause = (pause * 2).clamp(RESUBSCRIBE.0, RESUBSCRIBE.1);
                    self.outage.failed(&format_args!("subscribing: {err:#}"));
                    continue;
                }
            };
            self.outage.succeeded();
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = subscription.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => {
                        self.outage.succeeded();
                        if let Err(err) = self.process(delivery).await {
                            // Acking or nacking failed: the bus redelivers after the ack wait.
                            tracing::warn!(consumer = %self.name, error.message = %format!("{err:#}"), "settling a delivery failed");
                        }
                    }
                    Some(Err(err)) => {
                        self.outage.failed(&format_args!("{err:#}"));
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(RESUBSCRIBE.0) => {}
                        }
                    }
                    None => {
                        pause = RESUBSCRIBE.0;
                        continue 'subscribe;
                    }
                }
            }
        }
    }

    #[tracing::instrument(name = "consume", skip_all, fields(consumer = %self.name, message.id = %delivery.message.id, message.topic = %delivery.message.topic, attempt = delivery.attempt))]
    async fn process(&self, delivery: Delivery) -> anyhow::Result<Outcome> {
        let attempt = delivery.attempt;
        let (outcome, error) = match self.handle(&delivery.message).await {
            Ok(outcome) => (outcome, None),
            Err(Failure::Poison(err)) => (Outcome::DeadLettered, Some(err)),
            Err(Failure::Handler(err)) if attempt >= self.max_attempts => {
                (Outcome::DeadLettered, Some(err))
            }
            Err(Failure::Handler(err)) => (Outcome::Retry, Some(err)),
        };
        match outcome {
            Outcome::Handled | Outcome::Duplicate | Outcome::Ignored => {
                let counter = match outcome {
                    Outcome::Handled => &self.counters.handled,
                    Outcome::Duplicate => &self.counters.duplicates,
                    _ => &self.counters.ignored,
                };
                counter.get_or_create(&self.label).inc();
                delivery.ack().await?;
            }
            Outcome::Retry => {
                let delay = self.backoff_for(attempt);
                self.counters.retried.get_or_create(&self.label).inc();
                if let Some(err) = &error {
                    tracing::warn!(error.message = %format!("{err:#}"), retry_in_ms = delay.as_millis() as u64, "handler failed; the message will be retried");
                }
                delivery.nack(delay).await?;
            }
            Outcome::DeadLettered => {
                let err = error.unwrap_or_else(|| anyhow::anyhow!("dead-lettered"));
                if let Err(store) = self.dead_letter(&delivery.message, attempt, &err).await {
                    // Not stored: keep the message on the bus and try again later.
                    delivery.nack(self.backoff_max).await?;
                    return Err(store.context("storing a dead letter"));
                }
                self.counters.dead_lettered.get_or_create(&self.label).inc();
                tracing::error!(error.message = %format!("{err:#}"), attempts = attempt, "message dead-lettered");
                delivery.ack().await?;
            }
        }
        Ok(outcome)
    }

    fn backoff_for(&self, attempt: u64) -> Duration {
        let exponent = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(20);
        self.backoff
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.backoff_max)
    }

    /// Records and handles `message` in one transaction.
    async fn handle(&self, message: &Message) -> Result<Outcome, Failure> {
        let event = message.event().map_err(Failure::Poison)?;
        if !self.handler.wants(&event) {
            return Ok(Outcome::Ignored);
        }
        self.handler.apply(&message.id, &event).await
    }

    async fn dead_letter(
        &self,
        message: &Message,
        attempts: u64,
        err: &anyhow::Error,
    ) -> anyhow::Result<()> {
        query(DEAD_LETTER)
            .bind(&self.name)
            .bind(&message.id)
            .bind(&message.topic)
            .bind(String::from_utf8_lossy(&message.payload).into_owned())
            .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
            .bind(crate::error::stored_text(err))
            .bind(Utc::now())
            .execute(&self.db)
            .await?;
        Ok(())
    }

    async fn prune(&self) -> anyhow::Result<u64> {
        let Some(keep) = self.dedupe else {
            return Ok(0);
        };
        let cutoff = Utc::now() - chrono::Duration::from_std(keep).context("dedupe window")?;
        Ok(
            query("delete from consumed_messages where consumer = $1 and processed_at < $2")
                .bind(&self.name)
                .bind(cutoff)
                .execute(&self.db)
                .await?,
        )
    }
}

enum Failure {
    /// Not an event: no retry can fix it.
    Poison(anyhow::Error),
    /// The handler (or the database) failed: worth retrying.
    Handler(anyhow::Error),
}

/// A message a consumer gave up on.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub consumer: String,
    pub message_id: String,
    pub topic: String,
    /// The message body (the event's JSON).
    pub payload: String,
    pub attempts: i32,
    pub last_error: String,
    pub dead_at: DateTime<Utc>,
}

/// One consumer's dead letters: list them, retry one.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

impl DeadLetters {
    /// Oldest first, a page at a time.
    pub async fn list(&self, limit: i64, offset: i64) -> sqlx::Result<Vec<DeadLetter>> {
        query(
            "select id, consumer, message_id, topic, payload, attempts, last_error, dead_at \
             from dead_letters where consumer = $1 order by id limit $2 offset $3",
        )
        .bind(&self.inner.name)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.inner.db)
        .await
    }

    /// How many there are.
    pub async fn count(&self) -> sqlx::Result<i64> {
        query("select count(*) from dead_letters where consumer = $1")
            .bind(&self.inner.name)
            .fetch_scalar(&self.inner.db)
            .await
    }

    /// Runs the handler on dead letter `id` now. Handled (or found handled before): the dead
    /// letter is deleted and `Ok(Some(outcome))` returned. The handler failed again: the dead
    /// letter stays, with one more attempt and the new error, and the error is returned. `Ok(None)`
    /// when there is no such dead letter.
    pub async fn retry(&self, id: i64) -> anyhow::Result<Option<Outcome>> {
        let inner = &self.inner;
        let letter: Option<DeadLetter> = query(
            "select id, consumer, message_id, topic, payload, attempts, last_error, dead_at \
             from dead_letters where consumer = $1 and id = $2",
        )
        .bind(&inner.name)
        .bind(id)
        .fetch_optional(&inner.db)
        .await?;
        let Some(letter) = letter else {
            return Ok(None);
        };
        let message = Message {
            id: letter.message_id.clone(),
            topic: letter.topic.clone(),
            payload: bytes::Bytes::from(letter.payload.clone()),
        };
        match inner.handle(&message).await {
            Ok(outcome) => {
                query("delete from dead_letters where id = $1")
                    .bind(id)
                    .execute(&inner.db)
                    .await?;
                if outcome == Outcome::Handled {
                    inner.counters.handled.get_or_create(&inner.label).inc();
                }
                Ok(Some(outcome))
            }
            Err(Failure::Poison(err) | Failure::Handler(err)) => {
                query(
                    "update dead_letters set attempts = attempts + 1, last_error = $1, \
                     dead_at = $2 where id = $3",
                )
                .bind(crate::error::stored_text(&err))
                .bind(Utc::now())
                .bind(id)
                .execute(&inner.db)
                .await?;
                Err(err.context(format!("retrying dead letter {id}")))
            }
        }
    }
}

#[cfg(test)]
mod tests;
