//! The outbox relay: publishes a service's unpublished [`crate::outbox`] rows to the [`Bus`] in
//! `seq` order and marks them published.
//!
//! - A row is marked only after the bus has stored it, so a crash in between re-publishes it
//!   (JetStream drops the duplicate within 2 minutes; consumers dedupe anyway). Nothing is lost
//!   or skipped: a failed publish stops the batch, counts an attempt on the row, records the
//!   error, and the same row is retried first after a back-off.
//! - On PostgreSQL, replicas of a service take turns (a transaction-scoped advisory lock), so
//!   events leave in `seq` order and are not published twice; the rows of a batch are also
//!   claimed `for update skip locked`. A round's commit does not wait for its WAL to reach the
//!   disk (`synchronous_commit = off` for that transaction alone): it only marks rows published,
//!   and a mark lost in a crash re-publishes them, which at-least-once delivery allows. The
//!   flush it saves was a fifth of PostgreSQL's commits under load. On SQLite (one process) the batch is read,
//!   published, then marked, so the write lock is not held while talking to the bus.
//! - A poison row (one the bus refuses `bus.relay_max_attempts` times while the bus itself answers
//!   a ping) is set aside, so it does not block the rows behind it; see
//!   [`crate::outbox::set_aside`]. While the bus is down, no attempt counts towards that.
//! - A service calls [`Notifier::notify`] after committing events, so they leave at once;
//!   `bus.relay_poll_ms` is only the fallback (events written by another process, retries).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use chrono::Utc;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Message};
use crate::config::BusSettings;
use crate::db::{Db, Dialect, Tx, query};

/// Back-off after a failed round: doubles from the first value up to the second.
/// Publishes in flight at once within a round (each chunk costs about one round trip to NATS).
const PIPELINE: usize = 32;
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// SQLite: the next rows to publish.
const SELECT: &str = "select seq, id, topic, payload, attempts from outbox \
                      where published_at is null and set_aside_at is null order by seq limit $1";
/// PostgreSQL: the rows of [`SELECT`], claimed (`skip locked`) only while this replica has the
/// turn: the lock replicas of one service take turns with (scoped to the service's schema; it
/// ends with the transaction), taken in the same statement together with a commit that does not
/// wait for the WAL flush (see the module docs). No rows when another replica has the turn.
const CLAIM_TURN: &str = "with turn as materialized (select \
                          pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox.relay')) as ours, \
                          set_config('synchronous_commit', 'off', true)) \
                          select o.seq, o.id, o.topic, o.payload, o.attempts from outbox o, turn \
                          where turn.ours and o.published_at is null and o.set_aside_at is null \
                          order by o.seq limit $1 for update of o skip locked";
/// A failure while the bus is down: keep the error, count no attempt.
const MARK_ERROR: &str = "update outbox set last_error = $1 where seq = $2";
/// A failure of this row while the bus is healthy.
const MARK_FAILED: &str =
    "update outbox set attempts = attempts + 1, last_error = $1 where seq = $2";
const MARK_SET_ASIDE: &str = "update outbox set attempts = attempts + 1, last_error = $1, \
                              set_aside_at = $2 where seq = $3";
const PRUNE: &str = "delete from outbox where published_at is not null and published_at < $1";
/// How often a running relay deletes rows past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Publishes one service's outbox; see the module docs.
pub struct Relay {
    db: Db,
    bus: Bus,
    batch: u32,
    poll: Duration,
    /// A round stops publishing after this long (the rest waits for the next round), so the
    /// claim it holds on PostgreSQL is never held across an unbounded run of slow publishes.
    round_limit: Duration,
    wake: Arc<Notify>,
    /// Published rows older than this are deleted; `None` keeps them.
    retention: Option<Duration>,
    /// A row refused this many times by a healthy bus is set aside.
    max_attempts: u32,
    published: Counter,
    failures: Counter,
    set_aside: Counter,
    /// Unpublished rows after the last round.
    backlog: Gauge,
    /// Failed rounds (the database or the bus is down) are logged once per outage.
    outage: crate::outage::Outage,
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
    attempts: i32,
}

/// What a round did: rows published (in order), rows set aside, then possibly the row that
/// stopped the batch.
#[derive(Default)]
struct Outcome {
    published: Vec<i64>,
    set_aside: Vec<(i64, String)>,
    failed: Option<Failure>,
    /// The round limit stopped the batch before its end.
    cut_short: bool,
}

struct Failure {
    seq: i64,
    error: anyhow::Error,
    /// The bus answered a ping after refusing the row: the row is at fault, not the bus.
    bus_healthy: bool,
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
            round_limit: Duration::from_millis(settings.publish_timeout_ms.max(100) * 3),
            wake: Arc::new(Notify::new()),
            retention: (settings.outbox_retention_hours > 0)
                .then(|| Duration::from_secs(settings.outbox_retention_hours * 3600)),
            max_attempts: settings.relay_max_attempts.max(1),
            published: Counter::default(),
            failures: Counter::default(),
            set_aside: Counter::default(),
            backlog: Gauge::default(),
            outage: crate::outage::Outage::new("outbox relay (database and bus)"),
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
        metrics.register_counter(
            "outbox_set_aside",
            "Outbox events set aside after bus.relay_max_attempts refusals by a healthy bus",
            self.set_aside.clone(),
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
        let deleted = query(PRUNE)
            .bind(cutoff)
            .execute(&self.db)
            .await
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
                        self.outage.succeeded();
                        backoff = Duration::ZERO;
                        // A full batch, or one cut short by the round limit, leaves more.
                        if n > 0 && (n >= self.batch as usize || self.backlog.get() > 0) {
                            Duration::ZERO
                        } else {
                            self.poll
                        }
                    }
                    Err(err) => {
                        backoff = (backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                        self.outage.failed(&format_args!("{err:#}"));
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
        let dialect = self.db.dialect();
        // PostgreSQL: claim the batch in a transaction held across the publish, so replicas
        // neither wait for each other nor publish a row twice. SQLite: read, publish, then take
        // the write lock only to mark.
        let (rows, claim): (Vec<Row>, Option<Tx>) = match dialect {
            Dialect::Postgres => {
                let mut tx = self
                    .db
                    .begin()
                    .await
                    .context("starting the relay transaction")?;
                let rows = query(CLAIM_TURN)
                    .bind(batch)
                    .fetch_all(&mut tx)
                    .await
                    .context("claiming outbox rows")?;
                (rows, Some(tx))
            }
            Dialect::Sqlite => {
                let rows = query(SELECT)
                    .bind(batch)
                    .fetch_all(&self.db)
                    .await
                    .context("reading outbox rows")?;
                (rows, None)
            }
        };
        if rows.is_empty() {
            self.backlog.set(0);
            return Ok(0);
        }
        let fetched = rows.len();
        let outcome = self.publish(rows).await;
        let mut tx = match claim {
            Some(tx) => tx,
            None => self.db.begin().await.context("starting the relay mark")?,
        };
        record(&mut tx, &outcome).await?;
        tx.commit().await.context("committing the relay round")?;

        let published = outcome.published.len();
        tracing::Span::current().record("published", published);
        // A short batch published whole leaves nothing behind (until the next commit); otherwise
        // count what is left.
        if outcome.failed.is_none() && !outcome.cut_short && fetched < self.batch as usize {
            self.backlog.set(0);
        } else if let Ok(left) = crate::outbox::backlog(&self.db).await {
            self.backlog.set(left);
        }
        match outcome.failed {
            None => Ok(published),
            Some(failure) => Err(failure.error.context(format!(
                "outbox row {} not published ({published} published before it)",
                failure.seq
            ))),
        }
    }

    /// Publishes `rows` in order, [`PIPELINE`] at a time in flight, within the round's time. A
    /// refused row stops the batch (order is kept), unless a healthy bus has now refused it
    /// `bus.relay_max_attempts` times: then it is set aside and the batch goes on.
    async fn publish(&self, rows: Vec<Row>) -> Outcome {
        let mut outcome = Outcome {
            published: Vec::with_capacity(rows.len()),
            ..Outcome::default()
        };
        let deadline = tokio::time::Instant::now() + self.round_limit;
        let mut next = 0;
        while next < rows.len() {
            if tokio::time::Instant::now() >= deadline {
                outcome.cut_short = true;
                break;
            }
            let chunk = &rows[next..rows.len().min(next + PIPELINE)];
            let messages: Vec<Message> = chunk
                .iter()
                .map(|row| Message {
                    id: row.id.clone(),
                    topic: row.topic.clone(),
                    payload: Bytes::from(row.payload.clone()),
                })
                .collect();
            let results = self.bus.publish_all(&messages, deadline).await;
            if results.is_empty() {
                outcome.cut_short = true;
                break;
            }
            next += results.len();
            for ((row, message), result) in chunk.iter().zip(&messages).zip(results) {
                let Err(error) = result else {
                    self.published.inc();
                    outcome.published.push(row.seq);
                    continue;
                };
                self.failures.inc();
                // Whose fault: a bus that is down refuses everything; a bus that answers refused
                // this row (too large, a topic it cannot take, ...).
                let bus_healthy = self.bus.ping().await.is_ok();
                if bus_healthy
                    && u32::try_from(row.attempts + 1).unwrap_or(u32::MAX) >= self.max_attempts
                {
                    tracing::error!(
                        outbox.seq = row.seq,
                        event.id = %message.id,
                        event.topic = %message.topic,
                        attempts = row.attempts + 1,
                        error.message = %format!("{error:#}"),
                        "outbox row set aside: the bus keeps refusing it"
                    );
                    self.set_aside.inc();
                    outcome
                        .set_aside
                        .push((row.seq, crate::error::stored_text(&error)));
                    continue;
                }
                outcome.failed = Some(Failure {
                    seq: row.seq,
                    error,
                    bus_healthy,
                });
                return outcome;
            }
        }
        outcome
    }
}

/// Marks the published rows, the rows set aside and the failure.
async fn record(tx: &mut Tx, outcome: &Outcome) -> anyhow::Result<()> {
    // Bound from Rust rather than `now()`, so the statement is the same in both dialects.
    let now = Utc::now();
    // One statement per chunk of rows, not one per row.
    for chunk in outcome.published.chunks(PIPELINE) {
        let placeholders: Vec<String> = (2..chunk.len() + 2).map(|n| format!("${n}")).collect();
        let sql = format!(
            "update outbox set published_at = $1 where seq in ({})",
            placeholders.join(", ")
        );
        let mut statement = query(&sql).bind(now);
        for seq in chunk {
            statement = statement.bind(*seq);
        }
        statement
            .execute(&mut *tx)
            .await
            .context("marking outbox rows published")?;
    }
    for (seq, error) in &outcome.set_aside {
        query(MARK_SET_ASIDE)
            .bind(error)
            .bind(now)
            .bind(*seq)
            .execute(&mut *tx)
            .await
            .context("setting an outbox row aside")?;
    }
    if let Some(failure) = &outcome.failed {
        let sql = if failure.bus_healthy {
            MARK_FAILED
        } else {
            MARK_ERROR
        };
        query(sql)
            .bind(crate::error::stored_text(&failure.error))
            .bind(failure.seq)
            .execute(&mut *tx)
            .await
            .context("recording an outbox publish failure")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Delivery, Subscription};
    use crate::outbox::Event;
    use crate::testing::{Backend, TestEnv};

    const SOON: Duration = Duration::from_secs(3);

    type Setup = crate::testing::KitFixture;

    async fn setup(backend: Backend) -> Setup {
        Setup::new(TestEnv::new(backend).await, "relaytest").await
    }

    /// A subscriber to `stock.low`, the topic of [`events`].
    async fn mailer(s: &Setup) -> Subscription {
        s.bus
            .subscribe("mailer", &["stock.low"])
            .await
            .expect("sub")
    }

    /// A relay on the fixture's database and bus, with its settings.
    fn relay_on(s: &Setup) -> Relay {
        Relay::new(s.db.clone(), s.bus.clone(), &s.env.settings.bus)
    }

    async fn teardown(setup: Setup) {
        setup.teardown().await;
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
        let mut tx = db.begin().await.expect("begin");
        crate::outbox::enqueue(&mut tx, events)
            .await
            .expect("enqueue");
        if commit {
            tx.commit().await
        } else {
            tx.rollback().await
        }
        .expect("end transaction");
    }

    /// `(published, attempts, last_error)` of every row, in `seq` order.
    async fn rows(db: &Db) -> Vec<(bool, i32, Option<String>)> {
        let rows: Vec<(i32, i32, Option<String>)> = query(
            "select case when published_at is null then 0 else 1 end, attempts, last_error \
             from outbox order by seq",
        )
        .fetch_all(db)
        .await
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
            let relay = relay_on(&s);
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
            let mut sub = mailer(&s).await;
            let relay = relay_on(&s);
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
            let relay = relay_on(&s);
            enqueue(&s.db, &events(2), false).await;

            assert_eq!(relay.run_once().await.expect("round"), 0, "{what}");
            assert!(rows(&s.db).await.is_empty(), "{what}: nothing stored");
            nothing_delivered(&mut sub, what).await;
            teardown(s).await;
        }
    }

    /// A slow bus: a round stops publishing after its limit (3 × `bus.publish_timeout_ms`), marks
    /// what it published and ends its transaction; the next rounds publish the rest, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_bus_cannot_hold_a_round_open() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            s.env.settings.bus.publish_timeout_ms = 100;
            let what = s.bus.backend();
            let mut sub = s.bus.subscribe("slow", &["stock.*"]).await.expect("sub");
            let (bus, slow) = crate::bus::faulty(s.bus.clone());
            slow.set_publish_delay(Duration::from_millis(60));
            let relay = Relay::new(s.db.clone(), bus, &s.env.settings.bus);
            let sent = events(20);
            enqueue(&s.db, &sent, true).await;

            let started = std::time::Instant::now();
            let first = relay.run_once().await.expect("round");
            let took = started.elapsed();
            assert!(
                (1..20).contains(&first),
                "{what}: the round stopped at its limit ({first} published)"
            );
            assert!(
                took < Duration::from_millis(300 + 60 + 400),
                "{what}: the round took {took:?}"
            );
            assert_eq!(
                crate::outbox::backlog(&s.db).await.expect("backlog"),
                i64::try_from(20 - first).expect("small"),
                "{what}: what it published is marked, the rest waits"
            );
            let mut total = first;
            while total < 20 {
                let n = relay.run_once().await.expect("round");
                assert!(n > 0, "{what}: every round makes progress");
                total += n;
            }
            expect_in_order(&mut sub, &sent, what).await;
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bus_outage_keeps_the_rows_until_the_bus_is_back() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let s = setup(backend).await;
            let what = s.bus.backend();
            let (bus, outage) = crate::bus::faulty(s.bus.clone());
            let relay = Relay::new(s.db.clone(), bus, &s.env.settings.bus);
            let sent = events(2);
            enqueue(&s.db, &sent, true).await;
            outage.set_unavailable(true);

            for round in 1..=2 {
                let err = relay.run_once().await.expect_err("the bus is down");
                assert!(
                    format!("{err:#}").contains("not published"),
                    "{what}: {err:#}"
                );
                let rows = rows(&s.db).await;
                assert!(rows.iter().all(|r| !r.0), "{what}: nothing marked");
                assert_eq!(
                    rows[0].1, 0,
                    "{what}: round {round}: an outage counts no attempt towards setting aside"
                );
                assert!(rows[0].2.is_some(), "{what}: the error is kept");
                assert!(
                    rows[1].2.is_none(),
                    "{what}: the batch stopped at the failure"
                );
            }

            outage.set_unavailable(false);
            let mut sub = mailer(&s).await;
            assert_eq!(relay.run_once().await.expect("round"), 2, "{what}");
            expect_in_order(&mut sub, &sent, what).await;
            assert!(rows(&s.db).await.iter().all(|r| r.0), "{what}: all marked");
            teardown(s).await;
        }
    }

    /// NATS lost its stream (a server restarted without its storage): the relay's next rounds
    /// recreate it and publish everything, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_stream_is_recreated() {
        let s = setup(Backend::Postgres).await;
        let relay = relay_on(&s);
        let sent = events(3);
        enqueue(&s.db, &sent, true).await;
        s.bus.delete_stream().await.expect("delete stream");
        let mut published = 0;
        for _ in 0..3 {
            published += relay.run_once().await.unwrap_or(0);
        }
        assert_eq!(published, 3, "published once the stream was back");
        let mut sub = mailer(&s).await;
        expect_in_order(&mut sub, &sent, "nats").await;
        teardown(s).await;
    }

    /// A bus outage fails many relay rounds but is logged once when it starts and once when it
    /// ends (the relay is the bus's user that logs it), and the events wait and then go out.
    #[tokio::test]
    async fn a_bus_outage_is_logged_once_by_the_running_relay() {
        let mut s = setup(Backend::Sqlite).await;
        s.env.settings.bus.relay_poll_ms = 20;
        let (bus, outage) = crate::bus::faulty(s.bus.clone());
        let mut sub = mailer(&s).await;
        let sent = events(2);
        enqueue(&s.db, &sent, true).await;
        outage.set_unavailable(true);
        let logs = crate::testing::CapturedLogs::start();
        let relay = Relay::new(s.db.clone(), bus, &s.env.settings.bus);
        let failures = relay.failures.clone();
        let shutdown = CancellationToken::new();
        let handle = relay.spawn(shutdown.clone());
        // Rounds back off from 100 ms: several fail within 2 s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(failures.get() >= 3, "rounds failed: {}", failures.get());
        outage.set_unavailable(false);
        expect_in_order(&mut sub, &sent, "after the outage").await;
        shutdown.cancel();
        handle.await.expect("the relay stops");
        let lines = logs.lines();
        let warnings = lines.iter().filter(|l| l.contains("WARN")).count();
        assert!(
            warnings == 1 && lines.iter().any(|l| l.contains("dependency is back")),
            "{} failed rounds:\n{}",
            failures.get(),
            lines.join("\n")
        );
        teardown(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_notified_relay_publishes_at_once_and_stops_on_shutdown() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            let what = s.bus.backend();
            s.env.settings.bus.relay_poll_ms = 10_000;
            let mut sub = mailer(&s).await;
            let relay = relay_on(&s);
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
        let mut sub = mailer(&s).await;
        let relays: Vec<Relay> = (0..3).map(|_| relay_on(&s)).collect();
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
    async fn a_postgres_replica_without_the_turn_claims_nothing() {
        let s = setup(Backend::Postgres).await;
        let mut sub = mailer(&s).await;
        let relay = relay_on(&s);
        let sent = events(3);
        enqueue(&s.db, &sent, true).await;

        // Another replica's round: it holds the turn until its transaction ends.
        let mut other = s.db.begin().await.expect("begin");
        let ours: bool = query(
            "select pg_try_advisory_xact_lock(hashtext(current_schema() || '.outbox.relay'))",
        )
        .fetch_scalar(&mut other)
        .await
        .expect("lock");
        assert!(ours, "the turn was free");
        assert_eq!(relay.run_once().await.expect("round"), 0);
        nothing_delivered(&mut sub, "without the turn").await;
        assert!(
            rows(&s.db).await.iter().all(|(published, ..)| !published),
            "nothing marked without the turn"
        );

        other.rollback().await.expect("rollback");
        assert_eq!(relay.run_once().await.expect("round"), sent.len());
        expect_in_order(&mut sub, &sent, "with the turn").await;
        teardown(s).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counters_are_registered() {
        let s = setup(Backend::Sqlite).await;
        let relay = relay_on(&s);
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
        let relay = relay_on(&s);
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
            let relay = relay_on(&s);
            enqueue(&s.db, &events(3), true).await;
            assert_eq!(relay.run_once().await.expect("round"), 3, "{what}");
            // Two rows were published two days ago; one more is not published at all.
            let old = Utc::now() - chrono::Duration::days(2);
            query(
                "update outbox set published_at = $1 where seq in \
                 (select seq from outbox order by seq limit 2)",
            )
            .bind(old)
            .execute(&s.db)
            .await
            .expect("age rows");
            enqueue(&s.db, &events(1), true).await;

            assert_eq!(relay.prune().await.expect("prune"), 2, "{what}");
            assert_eq!(
                rows(&s.db).await.iter().map(|r| r.0).collect::<Vec<_>>(),
                [true, false],
                "{what}: the recent published row and the unpublished one stay"
            );
            s.env.settings.bus.outbox_retention_hours = 0;
            let keep_all = relay_on(&s);
            assert_eq!(keep_all.prune().await.expect("prune"), 0, "{what}");
            teardown(s).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poison_row_is_set_aside_and_does_not_block_the_rows_behind_it() {
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let mut s = setup(backend).await;
            let what = s.bus.backend();
            s.env.settings.bus.relay_max_attempts = 2;
            let mut sub = mailer(&s).await;
            let relay = relay_on(&s);
            let metrics = crate::metrics::Metrics::new("relaytest");
            relay.register_metrics(&metrics);
            let sent = events(2);
            enqueue(&s.db, &sent[..1], true).await;
            // A row no bus can take (written by hand: Event::new refuses such topics).
            query(
                "insert into outbox (id, topic, key, payload, created_at) \
                 values ('poison', 'not a topic', 'k', '{}', $1)",
            )
            .bind(Utc::now())
            .execute(&s.db)
            .await
            .expect("poison row");
            enqueue(&s.db, &sent[1..], true).await;

            // First refusal: the batch stops there, in order, and the attempt counts.
            relay
                .run_once()
                .await
                .expect_err("the poison row is refused");
            expect_in_order(&mut sub, &sent[..1], what).await;
            assert_eq!(rows(&s.db).await[1].1, 1, "{what}: attempt counted");
            // Second refusal by a healthy bus: set aside, and the row behind it goes out.
            assert_eq!(relay.run_once().await.expect("round"), 1, "{what}");
            expect_in_order(&mut sub, &sent[1..], what).await;
            let aside = crate::outbox::set_aside(&s.db).await.expect("list");
            assert_eq!(aside.len(), 1, "{what}");
            assert_eq!(aside[0].id, "poison", "{what}");
            assert_eq!(aside[0].attempts, 2, "{what}");
            assert!(
                aside[0]
                    .last_error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("topic"),
                "{what}: {aside:?}"
            );
            assert_eq!(crate::outbox::backlog(&s.db).await.expect("backlog"), 0);
            assert!(
                metrics
                    .encode()
                    .contains("agora_outbox_set_aside_total{service=\"relaytest\"} 1"),
                "{what}"
            );

            // Retried: back in line with its attempts reset.
            assert!(
                crate::outbox::retry(&s.db, aside[0].seq)
                    .await
                    .expect("retry")
            );
            assert!(
                !crate::outbox::retry(&s.db, aside[0].seq)
                    .await
                    .expect("retry twice")
            );
            assert_eq!(crate::outbox::backlog(&s.db).await.expect("backlog"), 1);
            relay.run_once().await.expect_err("still refused");
            assert_eq!(rows(&s.db).await[1].1, 1, "{what}: attempts start again");
            nothing_delivered(&mut sub, what).await;
            teardown(s).await;
        }
    }
}
