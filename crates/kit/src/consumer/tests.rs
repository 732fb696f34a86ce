//! The consumer on both backends: SQLite + the in-process bus, PostgreSQL + NATS JetStream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::*;
use crate::testing::{Backend, TestEnv};

/// Long enough for what should happen to happen, on either backend.
const SOON: Duration = Duration::from_secs(10);

type Setup = crate::testing::KitFixture;

async fn setup(backend: Backend) -> Setup {
    let mut env = TestEnv::new(backend).await;
    env.settings.bus.consumer_backoff_ms = 50;
    env.settings.bus.consumer_backoff_max_ms = 200;
    env.settings.bus.consumer_max_attempts = 3;
    let s = Setup::new(env, "consumertest").await;
    query("create table effects (message_id text primary key, topic text not null)")
        .execute(&s.db)
        .await
        .expect("effects table");
    s
}

async fn teardown(s: Setup) {
    s.teardown().await;
}

/// Records each event in `effects` (a second insert of one id would fail: the primary key); fails
/// while `failures_left` is above zero or `broken` is set.
#[derive(Clone, Default)]
struct Recorder {
    calls: Arc<AtomicU32>,
    failures_left: Arc<AtomicU32>,
    broken: Arc<AtomicBool>,
}

#[async_trait]
impl Handler for Recorder {
    /// What `handle` records as the topic: `prepare`'s reading of the event, marked, so a test
    /// sees that what `prepare` found reached `handle` ([`effect_topics`]).
    type Prepared = String;

    async fn prepare(&self, event: &Event) -> anyhow::Result<String> {
        Ok(format!("{} (prepared)", event.topic))
    }

    async fn handle(&self, tx: &mut Tx, event: &Event, topic: String) -> anyhow::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        query("insert into effects (message_id, topic) values ($1, $2)")
            .bind(event.id.to_string())
            .bind(topic)
            .execute(&mut *tx)
            .await?;
        anyhow::ensure!(!self.broken.load(Ordering::SeqCst), "the handler is broken");
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            anyhow::bail!("failing on purpose ({left} failures left)");
        }
        Ok(())
    }
}

/// The consumer `mailer` of `topics` on the test's database and bus, handling with `handler`.
fn consumer<H: Handler + Clone>(s: &Setup, topics: &[&str], handler: &H) -> Consumer {
    Consumer::new(
        "mailer",
        topics,
        s.db.clone(),
        s.bus.clone(),
        &s.env.settings.bus,
        handler.clone(),
    )
}

fn event(n: u32) -> Event {
    Event::new(
        "test",
        "order.created",
        format!("order:{n}"),
        &serde_json::json!({"n": n}),
    )
    .expect("event")
}

async fn publish(bus: &Bus, event: &Event) {
    bus.publish(&Message::from_event(event).expect("message"))
        .await
        .expect("publish");
}

async fn effects(db: &Db) -> i64 {
    query("select count(*) from effects")
        .fetch_scalar(db)
        .await
        .expect("count effects")
}

/// The topics of the recorded effects (as the handler wrote them), in message order.
async fn effect_topics(db: &Db) -> Vec<String> {
    query("select topic from effects order by message_id")
        .fetch_all::<(String,)>(db)
        .await
        .expect("effects")
        .into_iter()
        .map(|(topic,)| topic)
        .collect()
}

/// The message ids the test's consumer recorded as handled.
async fn recorded(db: &Db) -> i64 {
    query("select count(*) from consumed_messages where consumer = $1")
        .bind("mailer")
        .fetch_scalar(db)
        .await
        .expect("count recorded ids")
}

/// Waits until `check` holds, or fails the test with `what`.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + SOON;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counter(metrics: &crate::metrics::Metrics, name: &str) -> u64 {
    let prefix = format!("agora_consumer_{name}_total{{");
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains("consumer=\"mailer\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_has_one_effect() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let bus = s.bus.clone().with_ack_wait(Duration::from_secs(1));
        let recorder = Recorder::default();
        let consumer = Consumer::new(
            "mailer",
            &["order.*"],
            s.db.clone(),
            bus.clone(),
            &s.env.settings.bus,
            recorder.clone(),
        );
        let metrics = crate::metrics::Metrics::new("consumertest");
        consumer.register_metrics(&metrics);
        // Handled and committed, but the ack is lost (a crash between commit and ack).
        let mut sub = bus.subscribe("mailer", &["order.*"]).await.expect("sub");
        publish(&bus, &event(1)).await;
        let first = tokio::time::timeout(SOON, sub.next())
            .await
            .expect("delivered")
            .expect("open")
            .expect("delivery");
        assert!(matches!(
            consumer.inner.handle(&first.message).await,
            Ok(Outcome::Handled)
        ));
        drop(first);

        // The bus delivers it again after the ack wait: skipped, acked, no second effect.
        let again = tokio::time::timeout(SOON, sub.next())
            .await
            .expect("redelivered")
            .expect("open")
            .expect("delivery");
        assert_eq!(again.attempt, 2, "{what}");
        assert_eq!(
            consumer.process(again).await.expect("process"),
            Outcome::Duplicate,
            "{what}"
        );
        assert_eq!(effects(&s.db).await, 1, "{what}: one effect");
        assert_eq!(
            recorder.calls.load(Ordering::SeqCst),
            1,
            "{what}: handler ran once"
        );
        assert_eq!(counter(&metrics, "duplicates"), 1, "{what}");
        drop(sub);
        teardown(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_twice_then_succeeding_is_retried_with_backoff() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let recorder = Recorder::default();
        recorder.failures_left.store(2, Ordering::SeqCst);
        let consumer = consumer(&s, &["order.created"], &recorder);
        let metrics = crate::metrics::Metrics::new("consumertest");
        consumer.register_metrics(&metrics);
        let dead = consumer.dead_letters();
        let shutdown = CancellationToken::new();
        let task = consumer.spawn(shutdown.clone());
        // Let it subscribe before publishing (the in-process bus keeps nothing for consumers it
        // has not seen yet).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = tokio::time::Instant::now();
        publish(&s.bus, &event(1)).await;

        eventually(what, || async { effects(&s.db).await == 1 }).await;
        // Back-off of 50 ms, then 100 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(140),
            "{what}: backed off"
        );
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 3, "{what}");
        eventually(what, || async { counter(&metrics, "handled") == 1 }).await;
        assert_eq!(counter(&metrics, "retried"), 2, "{what}");
        assert_eq!(dead.count().await.expect("count"), 0, "{what}");

        shutdown.cancel();
        tokio::time::timeout(SOON, task)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
        teardown(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_always_fails_is_dead_lettered_then_retried() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let recorder = Recorder::default();
        recorder.broken.store(true, Ordering::SeqCst);
        let consumer = consumer(&s, &["order.created"], &recorder);
        let metrics = crate::metrics::Metrics::new("consumertest");
        consumer.register_metrics(&metrics);
        let dead = consumer.dead_letters();
        let shutdown = CancellationToken::new();
        let task = consumer.spawn(shutdown.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = event(7);
        publish(&s.bus, &sent).await;

        eventually(what, || async { dead.count().await.unwrap_or(0) == 1 }).await;
        assert_eq!(
            recorder.calls.load(Ordering::SeqCst),
            3,
            "{what}: bus.consumer_max_attempts attempts"
        );
        assert_eq!(effects(&s.db).await, 0, "{what}: every attempt rolled back");
        assert_eq!(counter(&metrics, "dead_lettered"), 1, "{what}");
        let letters = dead.list(10, 0).await.expect("list");
        assert_eq!(letters.len(), 1, "{what}");
        let letter = &letters[0];
        assert_eq!(letter.message_id, sent.id.to_string(), "{what}");
        assert_eq!(letter.topic, "order.created", "{what}");
        assert_eq!(letter.attempts, 3, "{what}");
        assert!(letter.last_error.contains("broken"), "{what}: {letter:?}");
        let payload: Event = serde_json::from_str(&letter.payload).expect("the event's JSON");
        assert_eq!(payload, sent, "{what}");
        // Nothing comes back from the bus: it was acked once dead-lettered.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 3, "{what}");

        // Retried while still broken: kept, one more attempt.
        assert!(dead.retry(letter.id).await.is_err(), "{what}");
        assert_eq!(
            dead.list(10, 0).await.expect("list")[0].attempts,
            4,
            "{what}"
        );
        // Fixed, retried: handled once, gone from the dead letters.
        recorder.broken.store(false, Ordering::SeqCst);
        assert_eq!(
            dead.retry(letter.id).await.expect("retry"),
            Some(Outcome::Handled),
            "{what}"
        );
        assert_eq!(effects(&s.db).await, 1, "{what}");
        assert_eq!(dead.count().await.expect("count"), 0, "{what}");
        assert_eq!(dead.retry(letter.id).await.expect("retry"), None, "{what}");

        shutdown.cancel();
        tokio::time::timeout(SOON, task)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
        teardown(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_an_event_is_dead_lettered_at_once() {
    let s = setup(Backend::Sqlite).await;
    let recorder = Recorder::default();
    let consumer = consumer(&s, &["order.created"], &recorder);
    let mut sub = s
        .bus
        .subscribe("mailer", &["order.created"])
        .await
        .expect("sub");
    s.bus
        .publish(&Message {
            id: "garbage".into(),
            topic: "order.created".into(),
            payload: bytes::Bytes::from_static(b"not json"),
        })
        .await
        .expect("publish");
    let delivery = sub.next().await.expect("open").expect("delivery");
    assert_eq!(
        consumer.process(delivery).await.expect("process"),
        Outcome::DeadLettered
    );
    assert_eq!(recorder.calls.load(Ordering::SeqCst), 0);
    assert_eq!(consumer.dead_letters().count().await.expect("count"), 1);
    teardown(s).await;
}

#[tokio::test]
async fn backoff_doubles_up_to_the_maximum() {
    let mut settings = crate::Settings::defaults().bus;
    settings.consumer_backoff_ms = 100;
    settings.consumer_backoff_max_ms = 1000;
    let consumer = Consumer::new(
        "c",
        &["x"],
        Db::Sqlite(crate::db::SqliteDb::readers_only(
            sqlx::SqlitePool::connect_lazy("sqlite::memory:").expect("lazy pool"),
        )),
        Bus::memory(),
        &settings,
        Recorder::default(),
    );
    let delays: Vec<u128> = (1..=6)
        .map(|attempt| consumer.inner.backoff_for(attempt).as_millis())
        .collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
}

/// Takes only even-numbered events.
#[derive(Clone, Default)]
struct EvenOnly(Recorder);

#[async_trait]
impl Handler for EvenOnly {
    type Prepared = String;

    async fn prepare(&self, event: &Event) -> anyhow::Result<String> {
        self.0.prepare(event).await
    }

    async fn handle(&self, tx: &mut Tx, event: &Event, topic: String) -> anyhow::Result<()> {
        self.0.handle(tx, event, topic).await
    }

    fn wants(&self, event: &Event) -> bool {
        event.data["n"].as_u64().is_some_and(|n| n % 2 == 0)
    }
}

/// Events the handler cannot act on are acked unhandled: no transaction, nothing recorded; the
/// wanted ones are handled as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwanted_events_are_acked_without_being_handled_or_recorded() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let handler = EvenOnly::default();
        let consumer = consumer(&s, &["order.*"], &handler);
        let metrics = crate::metrics::Metrics::new("consumertest");
        consumer.register_metrics(&metrics);
        let mut sub = s.bus.subscribe("mailer", &["order.*"]).await.expect("sub");
        for n in 1..=6 {
            publish(&s.bus, &event(n)).await;
        }
        for n in 1..=6u32 {
            let delivery = tokio::time::timeout(SOON, sub.next())
                .await
                .expect("delivered")
                .expect("open")
                .expect("delivery");
            let want = if n % 2 == 0 {
                Outcome::Handled
            } else {
                Outcome::Ignored
            };
            assert_eq!(
                consumer.process(delivery).await.expect("process"),
                want,
                "{what}: event {n}"
            );
        }
        assert_eq!(counter(&metrics, "handled"), 3, "{what}");
        assert_eq!(counter(&metrics, "ignored"), 3, "{what}");
        assert_eq!(
            effect_topics(&s.db).await,
            ["order.created (prepared)"; 3],
            "{what}: each handled with what its prepare found"
        );
        assert_eq!(handler.0.calls.load(Ordering::SeqCst), 3, "{what}");
        assert_eq!(
            recorded(&s.db).await,
            3,
            "{what}: only handled messages are recorded"
        );
        drop(sub);
        teardown(s).await;
    }
}

/// Idempotent by its own state: a second insert of one id changes nothing.
#[derive(Clone, Default)]
struct Upsert {
    calls: Arc<AtomicU32>,
}

#[async_trait]
impl Handler for Upsert {
    type Prepared = ();

    async fn prepare(&self, _event: &Event) -> anyhow::Result<()> {
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, event: &Event, (): ()) -> anyhow::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        query("insert into effects (message_id, topic) values ($1, $2) on conflict do nothing")
            .bind(event.id.to_string())
            .bind(&event.topic)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    fn idempotent(&self) -> bool {
        true
    }
}

/// An idempotent handler's messages are not recorded: a redelivery runs it again (handled, not a
/// duplicate), and its own state keeps the effect single.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_handler_runs_again_on_redelivery_without_a_record() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let handler = Upsert::default();
        let consumer = consumer(&s, &["order.*"], &handler);
        let message = Message::from_event(&event(1)).expect("message");
        for attempt in 1..=2 {
            assert!(
                matches!(consumer.inner.handle(&message).await, Ok(Outcome::Handled)),
                "{what}: delivery {attempt} handled"
            );
        }
        assert_eq!(handler.calls.load(Ordering::SeqCst), 2, "{what}: ran twice");
        assert_eq!(effects(&s.db).await, 1, "{what}: one effect");
        assert_eq!(recorded(&s.db).await, 0, "{what}: nothing recorded");
        teardown(s).await;
    }
}

/// Records each event with the id of the transaction that wrote it as its topic (PostgreSQL), so
/// a test sees which messages committed together. Event 103 fails; the first call lingers, so the
/// messages handled at the same moment queue behind it.
#[derive(Clone, Default)]
struct Sharing {
    calls: Arc<AtomicU32>,
}

#[async_trait]
impl Handler for Sharing {
    type Prepared = ();

    async fn prepare(&self, _event: &Event) -> anyhow::Result<()> {
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, event: &Event, (): ()) -> anyhow::Result<()> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(event.data["n"] != 103, "event 103 fails");
        let xact = match tx.dialect() {
            crate::db::Dialect::Postgres => "pg_current_xact_id()::text",
            crate::db::Dialect::Sqlite => "'sqlite'",
        };
        query(&format!(
            "insert into effects (message_id, topic) values ($1, {xact})"
        ))
        .bind(event.id.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Messages handled at the same moment share a transaction (one commit for many), each recorded
/// and handled once; a failing message among them fails alone and the others are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_handled_at_once_commit_together_and_a_failing_one_fails_alone() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let s = setup(backend).await;
        let what = s.bus.backend();
        let handler = Sharing::default();
        let consumer = consumer(&s, &["order.*"], &handler);
        let messages = |range: std::ops::RangeInclusive<u32>| -> Vec<Message> {
            range
                .map(|n| Message::from_event(&event(n)).expect("message"))
                .collect()
        };
        let at_once = messages(1..=20);
        let outcomes =
            futures::future::join_all(at_once.iter().map(|m| consumer.inner.handle(m))).await;
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(Outcome::Handled))),
            "{what}"
        );
        assert_eq!(effects(&s.db).await, 20, "{what}");
        assert_eq!(recorded(&s.db).await, 20, "{what}");
        if backend == Backend::Postgres {
            let commits: i64 = query("select count(distinct topic) from effects")
                .fetch_scalar(&s.db)
                .await
                .expect("transactions");
            assert!(commits <= 5, "{what}: 20 messages in {commits} commits");
        }

        // One failing message among ten handled at once.
        handler.calls.store(0, Ordering::SeqCst);
        let with_a_failure = messages(101..=110);
        let outcomes =
            futures::future::join_all(with_a_failure.iter().map(|m| consumer.inner.handle(m)))
                .await;
        for (n, outcome) in (101..=110).zip(&outcomes) {
            match outcome {
                Err(Failure::Handler(err)) if n == 103 => {
                    assert!(format!("{err:#}").contains("event 103 fails"), "{what}");
                }
                Ok(Outcome::Handled) if n != 103 => {}
                _ => panic!("{what}: event {n} ended {:?}", outcome.as_ref().ok()),
            }
        }
        assert_eq!(effects(&s.db).await, 29, "{what}: the nine others handled");
        assert_eq!(recorded(&s.db).await, 29, "{what}: and recorded, once each");

        // Redeliveries among new messages handled at once (the group records them in one
        // statement): five handled before, one new message delivered twice, three new ones.
        handler.calls.store(0, Ordering::SeqCst);
        let twice = Message::from_event(&event(200)).expect("message");
        let mut mixed: Vec<&Message> = at_once[..5].iter().collect();
        let fresh = messages(201..=203);
        mixed.extend([&twice, &twice]);
        mixed.extend(&fresh);
        let outcomes =
            futures::future::join_all(mixed.iter().map(|m| consumer.inner.handle(m))).await;
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|_| panic!("{what}: a message failed")))
            .collect();
        assert_eq!(
            outcomes[..5],
            [Outcome::Duplicate; 5],
            "{what}: handled before"
        );
        let mut twice_outcomes = outcomes[5..7].to_vec();
        twice_outcomes.sort_by_key(|o| *o != Outcome::Handled);
        assert_eq!(
            twice_outcomes,
            [Outcome::Handled, Outcome::Duplicate],
            "{what}: a message delivered twice at once is handled once"
        );
        assert_eq!(outcomes[7..], [Outcome::Handled; 3], "{what}");
        assert_eq!(effects(&s.db).await, 33, "{what}: four new effects");
        assert_eq!(recorded(&s.db).await, 33, "{what}: four new records");
        teardown(s).await;
    }
}
