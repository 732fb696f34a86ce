//! The outbox relay: publishes a service's unpublished [`crate::outbox`] rows to the [`Bus`] in
//! `seq` order and marks them published.
//!
//! - A row is marked only after the bus has stored it, so a crash in between re-publishes it
//!   (JetStream drops the duplicate within 2 minutes; consumers dedupe anyway). Nothing is lost
//!   or skipped: a failed publish stops the batch, counts an attempt on the row, records the
//!   error, and the same row is retried first after a back-off.
//! - On PostgreSQL, replicas of a service take turns (a transaction-scoped advisory lock), so
//!   events leave in `seq` order and are not published twice; the rows of a batch are also claimed
//!   `for update skip locked`. On SQLite (one process) the batch is read, published, then marked,
//!   so the write lock is not held while talking to the bus.
//! - A service calls [`Notifier::notify`] after committing events, so they leave at once;
//!   `bus.relay_poll_ms` is only the fallback (events written by another process, retries).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Message};
use crate::config::BusSettings;
use crate::db::{BeginWrite as _, Db};

/// Back-off after a failed round: doubles from the first value up to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// `last_error` keeps this many characters of the error chain.
const MAX_ERROR_CHARS: usize = 500;

const SELECT: &str = "select seq, id, topic, payload from outbox \
                      where published_at is null order by seq limit $1";
/// PostgreSQL's claim of a batch; the rows stay locked until marked.
const SELECT_FOR_UPDATE: &str = "select seq, id, topic, payload from outbox \
                                 where published_at is null order by seq limit $1 \
                                 for update skip locked";
/// One relay of a schema at a time (the lock ends with the transaction).
const TAKE_TURN: &str =
    "select pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox.relay'))";
const MARK_PUBLISHED: &str = "update outbox set published_at = $1 where seq = $2";
const MARK_FAILED: &str =
    "update outbox set attempts = attempts + 1, last_error = $1 where seq = $2";
const PRUNE: &str = "delete from outbox where published_at is not null and published_at < $1";
/// How often a running relay deletes rows past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Publishes one service's outbox; see the module docs.
pub struct Relay {
    db: Db,
    bus: Bus,
    batch: u32,
    poll: Duration,
    wake: Arc<Notify>,
    /// Published rows older than this are deleted; `None` keeps them.
    retention: Option<Duration>,
    published: Counter,
    failures: Counter,
    /// Unpublished rows after the last round.
    backlog: Gauge,
}

/// Wakes the relay; cheap to clone, one per request handler is fine.
#[derive(Clone)]
pub struct Notifier {
    wake: Arc<Notify>,
}

impl Notifier {
    /// Asks the relay to run now (call it after committing a transaction that enqueued events).
    /// Wake-ups while the relay is busy collapse into one more round.
    pub fn notify(&self) {
        self.wake.notify_one();
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    id: String,
    topic: String,
    payload: String,
}

/// What a round did: rows published (in order), then possibly the row that failed.
struct Outcome {
    published: Vec<i64>,
    failed: Option<(i64, anyhow::Error)>,
}

impl Relay {
    /// A relay of `db`'s outbox to `bus`, with `bus.relay_batch` and `bus.relay_poll_ms` from
    /// `settings`.
    pub fn new(db: Db, bus: Bus, settings: &BusSettings) -> Relay {
        Relay {
            db,
            bus,
            batch: settings.relay_batch.max(1),
            poll: Duration::from_millis(settings.relay_poll_ms.max(1)),
            wake: Arc::new(Notify::new()),
            retention: (settings.outbox_retention_hours > 0)
                .then(|| Duration::from_secs(settings.outbox_retention_hours * 3600)),
            published: Counter::default(),
            failures: Counter::default(),
            backlog: Gauge::default(),
        }
    }

    /// A handle that wakes this relay.
    pub fn notifier(&self) -> Notifier {
        Notifier {
            wake: self.wake.clone(),
        }
    }

    /// Registers the relay's counters: events published, and publishes that failed.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        metrics.register_counter(
            "outbox_published",
            "Outbox events published to the bus",
            self.published.clone(),
        );
        metrics.register_counter(
            "outbox_publish_failures",
            "Outbox publishes that failed (the event is retried)",
            self.failures.clone(),
        );
        metrics.register_gauge(
            "outbox_backlog",
            "Outbox events not yet published",
            self.backlog.clone(),
        );
    }

    /// Deletes published rows older than `bus.outbox_retention_hours`; returns how many. Unpublished
    /// rows are never deleted, however old.
    pub async fn prune(&self) -> anyhow::Result<u64> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff = Utc::now()
            - chrono::Duration::from_std(retention).context("outbox retention is too long")?;
        let deleted = crate::dispatch!(&self.db, pool => sqlx::query(PRUNE)
            .bind(cutoff)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))
        .context("deleting published outbox rows")?;
        if deleted > 0 {
            tracing::debug!(deleted, "pruned published outbox rows");
        }
        Ok(deleted)
    }

    /// Runs the relay until `shutdown` fires: a round at start (events left by the previous
    /// run), then one per wake-up or `bus.relay_poll_ms`, immediately again while batches come
    /// back full, and with back-off after a failure. A round in flight is finished, never cut.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff = Duration::ZERO;
            let mut next_prune = tokio::time::Instant::now();
            loop {
                if tokio::time::Instant::now() >= next_prune {
                    next_prune += PRUNE_EVERY;
                    if let Err(err) = self.prune().await {
                        tracing::warn!(error.message = %err, error.cause_chain = ?err, "pruning the outbox failed");
                    }
                }
                let wait = match self.run_once().await {
                    Ok(n) => {
                        backoff = Duration::ZERO;
                        // A full batch means more may be waiting.
                        if n >= self.batch as usize {
                            Duration::ZERO
                        } else {
                            self.poll
                        }
                    }
                    Err(err) => {
                        backoff = (backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                        tracing::warn!(
                            error.message = %err,
                            error.cause_chain = ?err,
                            retry_in_ms = backoff.as_millis() as u64,
                            "outbox relay round failed"
                        );
                        backoff
                    }
                };
                if shutdown.is_cancelled() {
                    break;
                }
                // While backing off, commits must not cut the pause short (each one would retry
                // a bus that is down).
                let woken = async {
                    if backoff.is_zero() {
                        self.wake.notified().await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = woken => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
            tracing::debug!("outbox relay stopped");
        })
    }

    /// One round: publishes up to `bus.relay_batch` unpublished rows in `seq` order and marks
    /// them. Returns how many were published (0 also when another replica has the turn), or the
    /// publish error after recording it on the row that failed (rows before it stay published).
    // Debug level: a round runs every poll interval, mostly empty.
    #[tracing::instrument(name = "outbox_relay", level = "debug", skip_all, fields(published))]
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        let batch = i64::from(self.batch);
        let batch_len = self.batch as usize;
        let fetched: usize;
        let outcome = match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .context("starting the relay transaction")?;
                let turn: bool = sqlx::query_scalar(TAKE_TURN)
                    .fetch_one(&mut *tx)
                    .await
                    .context("taking the relay lock")?;
                if !turn {
                    return Ok(0);
                }
                let rows: Vec<Row> = sqlx::query_as(SELECT_FOR_UPDATE)
                    .bind(batch)
                    .fetch_all(&mut *tx)
                    .await
                    .context("claiming outbox rows")?;
                fetched = rows.len();
                let outcome = self.publish(rows).await;
                record::<sqlx::Postgres>(&mut *tx, &outcome).await?;
                tx.commit().await.context("committing the relay round")?;
                outcome
            }
            Db::Sqlite(pool) => {
                let rows: Vec<Row> = sqlx::query_as(SELECT)
                    .bind(batch)
                    .fetch_all(pool)
                    .await
                    .context("reading outbox rows")?;
                if rows.is_empty() {
                    self.backlog.set(0);
                    return Ok(0);
                }
                fetched = rows.len();
                let outcome = self.publish(rows).await;
                let mut tx = pool
                    .begin_write()
                    .await
                    .context("starting the relay mark")?;
                record::<sqlx::Sqlite>(&mut *tx, &outcome).await?;
                tx.commit().await.context("committing the relay round")?;
                outcome
            }
        };
        let published = outcome.published.len();
        tracing::Span::current().record("published", published);
        // A short batch published whole leaves nothing behind (until the next commit); otherwise
        // count what is left.
        if outcome.failed.is_none() && fetched < batch_len {
            self.backlog.set(0);
        } else if let Ok(left) = crate::outbox::backlog(&self.db).await {
            self.backlog.set(left);
        }
        match outcome.failed {
            None => Ok(published),
            Some((seq, err)) => Err(err.context(format!(
                "outbox row {seq} not published ({published} published before it)"
            ))),
        }
    }

    /// Publishes `rows` in order, stopping at the first failure so order is kept.
    async fn publish(&self, rows: Vec<Row>) -> Outcome {
        let mut published = Vec::with_capacity(rows.len());
        for row in rows {
            let message = Message {
                id: row.id,
                topic: row.topic,
                payload: Bytes::from(row.payload),
            };
            if let Err(err) = self.bus.publish(&message).await {
                self.failures.inc();
                return Outcome {
                    published,
                    failed: Some((row.seq, err)),
                };
            }
            self.published.inc();
            published.push(row.seq);
        }
        Outcome {
            published,
            failed: None,
        }
    }
}

/// Marks the published rows and records the failure, on either backend's connection.
async fn record<DB>(conn: &mut DB::Connection, outcome: &Outcome) -> anyhow::Result<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    // Bound from Rust rather than `now()`, so the statement is the same in both dialects.
    let now = Utc::now();
    for seq in &outcome.published {
        sqlx::query(MARK_PUBLISHED)
            .bind(now)
            .bind(*seq)
            .execute(&mut *conn)
            .await
            .context("marking an outbox row published")?;
    }
    if let Some((seq, err)) = &outcome.failed {
        let message: String = format!("{err:#}").chars().take(MAX_ERROR_CHARS).collect();
        sqlx::query(MARK_FAILED)
            .bind(message)
            .bind(*seq)
            .execute(&mut *conn)
            .await
            .context("recording an outbox publish failure")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Delivery, Subscription};
    use crate::config::ServiceSettings;
    use crate::outbox::{Event, OutboxTx as _};
    use crate::testing::{Backend, TestEnv};

    const SOON: Duration = Duration::from_secs(3);

    /// One backend pair: SQLite + the in-process bus, or PostgreSQL + NATS, with this test's own
    /// schema and stream.
    struct Setup {
        env: TestEnv,
        db: Db,
        bus: Bus,
    }

    async fn setup(backend: Backend) -> Setup {
        let mut env = TestEnv::new(backend).await;
        // Its own schema, named like the harness's so stale ones are dropped by later runs.
        let schema = format!("{}_relaytest", env.settings.bus.prefix);
        env.settings.services.insert(
            "relaytest".into(),
            ServiceSettings {
                schema: Some(schema),
                ..Default::default()
            },
        );
        let db = Db::connect_only(&env.settings, "relaytest")
            .await
            .expect("test database");
        crate::outbox::install(&db).await.expect("outbox table");
        let bus = Bus::connect(&env.settings).await.expect("test bus");
        Setup { env, db, bus }
    }

    async fn teardown(setup: Setup) {
        setup.bus.delete_stream().await.expect("delete stream");
        if let (Db::Postgres(pool), Some(schema)) =
            (&setup.db, setup.env.settings.service("relaytest").schema)
        {
            sqlx::query(&format!("drop schema if exists {schema} cascade"))
                .execute(pool)
                .await
                .expect("drop schema");
        }
        setup.db.close().await;
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| {
                Event::new(
                    "relaytest",
                    "stock.low",
                    format!("product:{i}"),
                    &serde_json::json!({ "n": i }),
                )
                .expect("event")
            })
            .collect()
    }

    /// Enqueues `events` in one transaction, committed or rolled back.
    async fn enqueue(db: &Db, events: &[Event], commit: bool) {
        crate::dispatch!(db, pool => {
            let mut tx = pool.begin_write().await.expect("begin");
            tx.enqueue(events).await.expect("enqueue");
            if commit { tx.commit().await } else { tx.rollback().await }.expect("end transaction");
        });
    }

    /// `(published, attempts, last_error)` of every row, in `seq` order.
    async fn rows(db: &Db) -> Vec<(bool, i32, Option<String>)> {
        let rows: Vec<(i32, i32, Option<String>)> = crate::dispatch!(db, pool => sqlx::query_as(
            "select case when published_at is null then 0 else 1 end, attempts, last_error \
             from outbox order by seq"
        )
        .fetch_all(pool)
        .await)
        .expect("outbox rows");
        rows.into_iter().map(|(p, a, e)| (p == 1, a, e)).collect()
    }

    async fn next(sub: &mut Subscription, what: &str) -> Delivery {
        tokio::time::timeout(SOON, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing delivered in time"))
            .unwrap_or_else(|| panic!("{what}: subscription ended"))
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    async fn nothing_delivered(sub: &mut Subscription, what: &str) {
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(400), sub.next()).await {
            panic!("{what}: unexpected delivery {d:?}");
        }
    }

    /// Expects `sent` on `sub`, in order, as the events' JSON.
    async fn expect_in_order(sub: &mut Subscription, sent: &[Event], what: &str) {
        for event in sent {
            let delivery = next(sub, what).await;
            assert_eq!(
                delivery.message.id,
                event.id.to_string(),
                "{what}: seq order"
            );
            assert_eq!(delivery.message.topic, event.topic, "{what}");
            assert_eq!(
                &delivery.message.event().expect("event JSON"),
                event,
                "{what}"
            );
            delivery.ack().await.expect("ack");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_events_are_published_in_order_and_marked() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let s = setup(backend).await;
            let what = s.bus.backend();
            let mut sub = s.bus.subscribe("mailer", &["stock.*"]).await.expect("sub");
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            let sent = events(5);
            enqueue(&s.db, &sent[..3], true).await;
            enqueue(&s.db, &sent[3..], true).await;

            assert_eq!(relay.run_once().await.expect("round"), 5, "{what}");
            expect_in_order(&mut sub, &sent, what).await;
            assert!(rows(&s.db).await.iter().all(|r| r.0), "{what}: all marked");
            assert_eq!(crate::outbox::backlog(&s.db).await.expect("backlog"), 0);
            assert_eq!(
                relay.run_once().await.expect("round"),
                0,
                "{what}: none twice"
            );
            nothing_delivered(&mut sub, what).await;
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_at_most_relay_batch_rows() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            let what = s.bus.backend();
            s.env.settings.bus.relay_batch = 2;
            let mut sub = s
                .bus
                .subscribe("mailer", &["stock.low"])
                .await
                .expect("sub");
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            let sent = events(3);
            enqueue(&s.db, &sent, true).await;

            assert_eq!(relay.run_once().await.expect("round"), 2, "{what}");
            assert_eq!(relay.run_once().await.expect("round"), 1, "{what}");
            expect_in_order(&mut sub, &sent, what).await;
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rolled_back_events_are_not_published() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let s = setup(backend).await;
            let what = s.bus.backend();
            let mut sub = s.bus.subscribe("mailer", &[">"]).await.expect("sub");
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            enqueue(&s.db, &events(2), false).await;

            assert_eq!(relay.run_once().await.expect("round"), 0, "{what}");
            assert!(rows(&s.db).await.is_empty(), "{what}: nothing stored");
            nothing_delivered(&mut sub, what).await;
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bus_outage_keeps_the_rows_until_the_bus_is_back() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let s = setup(backend).await;
            let what = s.bus.backend();
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            let sent = events(2);
            enqueue(&s.db, &sent, true).await;
            // NATS: a real failure, the stream is gone. In process: the test switch.
            match backend {
                Backend::Postgres => s.bus.delete_stream().await.expect("delete stream"),
                Backend::Sqlite => s.bus.set_unavailable(true),
            }

            for round in 1..=2 {
                let err = relay.run_once().await.expect_err("the bus is down");
                assert!(
                    format!("{err:#}").contains("not published"),
                    "{what}: {err:#}"
                );
                let rows = rows(&s.db).await;
                assert!(rows.iter().all(|r| !r.0), "{what}: nothing marked");
                assert_eq!(
                    rows[0].1, round,
                    "{what}: an attempt counted on the first row"
                );
                assert!(rows[0].2.is_some(), "{what}: the error is kept");
                assert_eq!(rows[1].1, 0, "{what}: the batch stopped at the failure");
            }

            match backend {
                // Connecting again recreates the stream.
                Backend::Postgres => drop(Bus::connect(&s.env.settings).await.expect("connect")),
                Backend::Sqlite => s.bus.set_unavailable(false),
            }
            let mut sub = s
                .bus
                .subscribe("mailer", &["stock.low"])
                .await
                .expect("sub");
            assert_eq!(relay.run_once().await.expect("round"), 2, "{what}");
            expect_in_order(&mut sub, &sent, what).await;
            assert!(rows(&s.db).await.iter().all(|r| r.0), "{what}: all marked");
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notified_relay_publishes_at_once_and_stops_on_shutdown() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            let what = s.bus.backend();
            s.env.settings.bus.relay_poll_ms = 10_000;
            let mut sub = s
                .bus
                .subscribe("mailer", &["stock.low"])
                .await
                .expect("sub");
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            let notifier = relay.notifier();
            let shutdown = CancellationToken::new();
            let handle = relay.spawn(shutdown.clone());
            // Let the first round (at start) finish, so only the notification can wake it.
            tokio::time::sleep(Duration::from_millis(200)).await;

            let sent = events(1);
            enqueue(&s.db, &sent, true).await;
            let started = std::time::Instant::now();
            notifier.notify();
            expect_in_order(&mut sub, &sent, what).await;
            assert!(
                started.elapsed() < SOON,
                "{what}: published before the 10 s poll"
            );

            shutdown.cancel();
            tokio::time::timeout(SOON, handle)
                .await
                .expect("the relay stops on shutdown")
                .expect("the relay task did not panic");
            enqueue(&s.db, &events(1), true).await;
            notifier.notify();
            nothing_delivered(&mut sub, what).await;
            assert_eq!(crate::outbox::backlog(&s.db).await.expect("backlog"), 1);
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_replicas_do_not_publish_a_row_twice() {
        let s = setup(Backend::Postgres).await;
        let mut sub = s
            .bus
            .subscribe("mailer", &["stock.low"])
            .await
            .expect("sub");
        let relays: Vec<Relay> = (0..3)
            .map(|_| Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus))
            .collect();
        let sent = events(30);
        enqueue(&s.db, &sent, true).await;

        let mut published = 0;
        while published < sent.len() {
            let rounds = futures::future::join_all(relays.iter().map(Relay::run_once)).await;
            for round in rounds {
                published += round.expect("round");
            }
        }
        assert_eq!(published, sent.len(), "each row published by one replica");
        expect_in_order(&mut sub, &sent, "replicas").await;
        nothing_delivered(&mut sub, "replicas").await;
        teardown(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counters_are_registered() {
        let s = setup(Backend::Sqlite).await;
        let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
        let metrics = crate::metrics::Metrics::new("relaytest");
        relay.register_metrics(&metrics);
        enqueue(&s.db, &events(2), true).await;
        relay.run_once().await.expect("round");
        let text = metrics.encode();
        assert!(
            text.contains("agora_outbox_published_total{service=\"relaytest\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("agora_outbox_publish_failures_total"),
            "{text}"
        );
        assert!(
            text.contains("agora_outbox_backlog{service=\"relaytest\"} 0"),
            "{text}"
        );
        teardown(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backlog_gauge_counts_what_a_round_left() {
        let mut s = setup(Backend::Sqlite).await;
        s.env.settings.bus.relay_batch = 2;
        let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
        enqueue(&s.db, &events(3), true).await;
        relay.run_once().await.expect("round");
        assert_eq!(relay.backlog.get(), 1, "a full batch leaves one row");
        relay.run_once().await.expect("round");
        assert_eq!(relay.backlog.get(), 0);
        teardown(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruning_deletes_only_published_rows_past_retention() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            let what = s.bus.backend();
            s.env.settings.bus.outbox_retention_hours = 24;
            let relay = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            enqueue(&s.db, &events(3), true).await;
            assert_eq!(relay.run_once().await.expect("round"), 3, "{what}");
            // Two rows were published two days ago; one more is not published at all.
            let old = Utc::now() - chrono::Duration::days(2);
            crate::dispatch!(&s.db, pool => sqlx::query(
                "update outbox set published_at = $1 where seq in \
                 (select seq from outbox order by seq limit 2)",
            )
            .bind(old)
            .execute(pool)
            .await
            .map(|_| ()))
            .expect("age rows");
            enqueue(&s.db, &events(1), true).await;

            assert_eq!(relay.prune().await.expect("prune"), 2, "{what}");
            assert_eq!(
                rows(&s.db).await.iter().map(|r| r.0).collect::<Vec<_>>(),
                [true, false],
                "{what}: the recent published row and the unpublished one stay"
            );
            s.env.settings.bus.outbox_retention_hours = 0;
            let keep_all = Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus);
            assert_eq!(keep_all.prune().await.expect("prune"), 0, "{what}");
            teardown(s).await;
        }
    }
}
