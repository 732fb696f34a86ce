//! The order worker (`agora serve worker`, and inside `agora up`): drives every order from
//! `pending` to `processed` or `failed`, and keeps catalog's stock in step with each order's
//! status. It consumes the orders service's own events through kit's consumer (a failure retried
//! with back-off, dead-lettered after `bus.consumer_max_attempts`). Its steps are idempotent by
//! the order's own state (below), so it tells the consumer not to record message ids
//! ([`Handler::idempotent`]): a redelivery finds its order moved on and changes nothing.
//!
//! Each step writes in one transaction with the order's row locked, so two workers (or a
//! worker and the sweep) never change one order at once, and each is safe to repeat:
//! 1. a `pending` (or `processing`) order: first, with no transaction open (kit's
//!    `Handler::prepare`, so a slow payment holds no database connection), the simulated
//!    payment (`services.worker.payment_latency_ms`; a failure rate decided by the order id,
//!    so a repeat decides the same) and the reservation committed (or, failed, released) at
//!    catalog, idempotent there; then one update to `processed` or `failed` with the reason,
//!    announcing `order.processing` and `order.processed` (or `order.failed`), settled;
//! 2. an order whose stock is unsettled (cancelled, or a status set by hand): catalog is told
//!    what the reservation must become (commit; release; or, once sold, return), each call
//!    idempotent there; then the order is marked settled.
//!
//! Events whose stock is settled already (`stock_settled` in the data: the worker's own) are
//! acked without a transaction (`Handler::wants`).
//!
//! A sweep every `services.worker.sweep_secs` runs the step of any order left pending,
//! processing or unsettled for longer than that: messages are never the only record of work
//! (the in-process bus of `agora up` keeps nothing across a restart).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use kit::batch::Batcher;
use kit::client::CallError;
use kit::consumer::{Consumer, Handler};
use kit::db::{Dialect, Tx};
use kit::event::Event;
use kit::relay::Notifier;
use kit::service::{App, Deps};
use kit::{Cache, Db};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;

use crate::clients::Neighbours;
use crate::domain::Status;
use crate::error::{Error, Result};
use crate::routes::item_key;
use crate::store;
use crate::{WorkerSettings, load_settings};

/// The durable consumer name every worker shares (so they share the work).
pub const CONSUMER: &str = "order-worker";

#[derive(Clone)]
struct Counters {
    processed: Counter,
    failed: Counter,
    settled: Counter,
    duration: Histogram,
}

/// The worker's state, shared by its consumer and its sweep.
#[derive(Clone)]
pub struct Worker {
    db: Db,
    cache: Cache,
    outbox: Notifier,
    neighbours: Arc<Neighbours>,
    settings: WorkerSettings,
    counters: Counters,
    /// PostgreSQL: the reads of undecided orders that arrive together are one statement
    /// ([`kit::batch`]); on SQLite each is read on its own.
    undecided: Option<Arc<Undecideds>>,
}

/// The reader of undecided orders by id, in batches.
type Undecideds = Batcher<i64, Result<Option<store::Undecided>>>;

/// The most orders one statement reads.
const UNDECIDED_PER_STATEMENT: usize = 64;

/// One batch in flight at a time: the reads arriving meanwhile queue and share the next one (a
/// message waits a little longer, and the database runs one statement for many; the worker
/// has no client waiting on it).
fn undecideds(db: Db) -> Undecideds {
    Batcher::new(1, UNDECIDED_PER_STATEMENT, move |ids| {
        read_undecided(db.clone(), ids)
    })
}

/// One statement for the whole batch; when it fails, each order is read on its own, so each
/// message gets its own error.
async fn read_undecided(db: Db, ids: Vec<i64>) -> Vec<Result<Option<store::Undecided>>> {
    let db = &db;
    kit::batch::together_or_alone(
        &ids,
        |all| async move {
            let found = store::undecided_many(db, all).await.ok()?;
            let found = kit::batch::by_key(all, found, |order| order.row().id);
            Some(found.into_iter().map(Ok).collect())
        },
        |id| store::undecided(db, *id),
    )
    .await
}

impl Worker {
    /// Before the step's transaction: the slow, repeatable part of deciding a pending order —
    /// the simulated payment, then its stock brought in line at catalog (commit, or release
    /// when the payment fails; idempotent there). The step then only writes. An order past
    /// pending or processing needs nothing here.
    async fn prepare(&self, id: i64) -> Result<Prepared> {
        let undecided = match &self.undecided {
            Some(reads) => reads.submit(id).await.map_err(anyhow::Error::from)??,
            None => store::undecided(&self.db, id).await?,
        };
        if let Some(order) = &undecided {
            tokio::time::sleep(Duration::from_millis(self.settings.payment_latency_ms)).await;
            let (to, _) = self.decision(id);
            self.settle_stock(id, to, order.row().reservation_id.as_deref())
                .await?;
        }
        Ok(Prepared { id, undecided })
    }

    /// The outcome of order `id`'s payment, and the failure's reason: decided by the id alone,
    /// so every attempt at one order decides the same.
    fn decision(&self, id: i64) -> (Status, Option<&'static str>) {
        if self.payment_fails(id) {
            (Status::Failed, Some("payment declined (simulated)"))
        } else {
            (Status::Processed, None)
        }
    }

    /// Runs the step order `id` is due, in `tx`, after [`Worker::prepare`]; returns whether
    /// it changed anything.
    async fn step(&self, tx: &mut Tx, Prepared { id, undecided }: Prepared) -> Result<bool> {
        // The usual case first, locked, decided and announced in one statement where the
        // database allows (PostgreSQL); the reasoning below holds for it too.
        let (to, reason) = self.decision(id);
        // (Not undecided when `prepare` read it: then not now either, an order's status never
        // goes back.)
        let decided = match undecided {
            Some(order) => store::decide_announcing(tx, order, to, reason).await?,
            None => None,
        };
        if let Some(order) = decided {
            self.decided(id, to, order.created_at);
            return Ok(true);
        }
        let Some(row) = store::lock(tx, id).await? else {
            return Ok(false);
        };
        let status = row.status()?;
        match status {
            Status::Pending | Status::Processing => {
                // Still undecided now that the row is locked, so it was undecided when
                // `prepare` read it (an order's status never goes back): its stock is settled
                // for the decision. One update from pending to decided: the order's events
                // still tell every state it went through (processing, then processed or
                // failed), but it costs one message and one transaction instead of three.
                let created_at = row.created_at;
                store::decide(tx, row, to, reason).await?;
                self.decided(id, to, created_at);
                Ok(true)
            }
            _ if !row.stock_settled => {
                self.settle_stock(id, status, row.reservation_id.as_deref())
                    .await?;
                store::mark_settled(tx, id).await?;
                self.counters.settled.inc();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Counts order `id` decided `to` (created at `created_at`).
    fn decided(&self, id: i64, to: Status, created_at: chrono::DateTime<chrono::Utc>) {
        let counter = if to == Status::Failed {
            &self.counters.failed
        } else {
            &self.counters.processed
        };
        counter.inc();
        let accepted = (store::now() - created_at).num_milliseconds().max(0);
        self.counters.duration.observe(accepted as f64 / 1000.0);
        self.counters.settled.inc();
        tracing::debug!(order = id, to = to.as_str(), "order decided");
    }

    /// Whether the simulated payment of order `id` fails (splitmix64 of the id against
    /// `services.worker.payment_failure_rate`).
    fn payment_fails(&self, id: i64) -> bool {
        let rate = self.settings.payment_failure_rate;
        if rate <= 0.0 {
            return false;
        }
        // splitmix64: a well-spread hash of the id.
        let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z as f64 / u64::MAX as f64) < rate
    }

    /// Brings the order's reservation at catalog to what `status` needs: sold (commit) once
    /// processed, back on sale (release, or return once sold) once failed or cancelled.
    async fn settle_stock(
        &self,
        id: i64,
        status: Status,
        reservation_id: Option<&str>,
    ) -> Result<()> {
        let (Some(reservation_id), Some(sold)) = (reservation_id, status.stock_sold()) else {
            return Ok(());
        };
        // Straight to what the status needs (each call idempotent at catalog); the answer
        // tells when the reservation is elsewhere already.
        let first = if sold { "commit" } else { "release" };
        let Err(err) = self.neighbours.settle(reservation_id, first).await else {
            return Ok(());
        };
        let refusal = match &err {
            CallError::Refused {
                status, problem, ..
            } => Some((*status, problem.as_ref().map(|p| p.code.as_str()))),
            _ => None,
        };
        match (sold, refusal) {
            // Sold, then the order failed or was cancelled: give the units back (once).
            (false, Some((StatusCode::CONFLICT, Some("reservation_committed")))) => {
                self.neighbours.settle(reservation_id, "return").await?;
                Ok(())
            }
            (true, Some((StatusCode::CONFLICT, Some("reservation_released")))) => {
                // Only the never-stored-order sweep releases a reservation an order did not
                // release; the order's stock is gone, so it cannot be sold.
                tracing::error!(
                    order = id,
                    reservation_id,
                    "a processed order's reservation was released; its stock is not held"
                );
                Ok(())
            }
            // No reservation at catalog: nothing to sell (a release records one instead).
            (true, Some((StatusCode::NOT_FOUND, _))) => Ok(()),
            _ => Err(err.into()),
        }
    }

    /// One sweep: the step of every order left waiting longer than the sweep period.
    async fn sweep(&self) -> Result<usize> {
        let age = chrono::Duration::seconds(self.settings.sweep_secs as i64);
        let due = store::needing_work(&self.db, age, 100).await?;
        let mut done = 0;
        for (id, _) in due {
            let prepared = self.prepare(id).await?;
            let mut tx = self.db.begin().await?;
            if self.step(&mut tx, prepared).await? {
                tx.commit().await?;
                self.after(id).await;
                done += 1;
            }
        }
        Ok(done)
    }

    async fn after(&self, id: i64) {
        self.cache.invalidate(&[item_key(id)]).await;
        self.outbox.notify();
    }
}

/// What [`Worker::prepare`] found for an order before the step's transaction: its id, and the
/// order with its lines when it was undecided (its stock then settled for the decision).
pub struct Prepared {
    id: i64,
    undecided: Option<store::Undecided>,
}

fn failure(id: i64, err: Error) -> anyhow::Error {
    match err {
        Error::Internal(err) => err,
        err => anyhow::anyhow!("order {id}: {}", kit::ApiError::from(err)),
    }
}

fn order_id(event: &Event) -> anyhow::Result<i64> {
    event.data["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("{} event without an order id", event.topic))
}

#[async_trait]
impl Handler for Worker {
    type Prepared = Prepared;

    /// A new order, or a change that leaves its stock to settle (a cancel, a status set by
    /// hand). The worker's own events say their stock is settled: nothing to do for them, and
    /// a `processing` set by hand is moved on by the order's `order.created` (or the sweep).
    fn wants(&self, event: &Event) -> bool {
        event.topic == Status::Pending.topic()
            || event
                .data
                .get("stock_settled")
                .and_then(serde_json::Value::as_bool)
                != Some(true)
    }

    async fn prepare(&self, event: &Event) -> anyhow::Result<Prepared> {
        let id = order_id(event)?;
        self.prepare(id).await.map_err(|err| failure(id, err))
    }

    async fn handle(&self, tx: &mut Tx, _event: &Event, prepared: Prepared) -> anyhow::Result<()> {
        let id = prepared.id;
        match self.step(tx, prepared).await {
            Ok(_) => Ok(()),
            Err(err) => Err(failure(id, err)),
        }
    }

    /// The orders of a group decided in one statement on PostgreSQL ([`store::decide_all`]):
    /// each undecided one that is still undecided; the others (and an order delivered twice
    /// into the group) take [`Worker::step`]'s locked path, as alone.
    async fn handle_all(&self, tx: &mut Tx, jobs: Vec<(&Event, Prepared)>) -> anyhow::Result<()> {
        let mut rest = Vec::new();
        let mut undecided = Vec::new();
        if tx.dialect() == Dialect::Postgres {
            let mut seen = std::collections::HashSet::new();
            for (_, prepared) in jobs {
                match prepared.undecided {
                    Some(order) if seen.insert(prepared.id) => {
                        let (to, reason) = self.decision(prepared.id);
                        undecided.push((order, to, reason));
                    }
                    order => rest.push(Prepared {
                        undecided: order,
                        ..prepared
                    }),
                }
            }
        } else {
            rest.extend(jobs.into_iter().map(|(_, prepared)| prepared));
        }
        if !undecided.is_empty() {
            let ids: Vec<i64> = undecided.iter().map(|(order, ..)| order.row().id).collect();
            let decided = store::decide_all(tx, undecided)
                .await
                .map_err(|err| match err {
                    Error::Internal(err) => err,
                    err => anyhow::anyhow!("deciding orders {ids:?}: {}", kit::ApiError::from(err)),
                })?;
            for (id, order) in ids.into_iter().zip(decided) {
                match order {
                    Some(order) => self.decided(id, order.status, order.created_at),
                    // Not undecided any more: as alone, under its lock.
                    None => rest.push(Prepared {
                        id,
                        undecided: None,
                    }),
                }
            }
        }
        for prepared in rest {
            let id = prepared.id;
            self.step(tx, prepared)
                .await
                .map_err(|err| failure(id, err))?;
        }
        Ok(())
    }

    /// Every step re-reads the order under its row lock and acts only on what is still due (an
    /// undecided order, unsettled stock), and each catalog call is idempotent there: a
    /// redelivered event finds nothing left to do.
    fn idempotent(&self) -> bool {
        true
    }

    async fn committed(&self, event: &Event) {
        if let Ok(id) = order_id(event) {
            self.after(id).await;
        }
    }
}

/// The worker as a service: its consumer, its sweep, and `/health`, `/ready`, `/metrics`.
pub async fn app(deps: Deps) -> anyhow::Result<App> {
    let (orders, settings) = load_settings(&deps.settings)?;
    let db = deps.db()?;
    let bus = deps.bus()?;
    // The worker's own events (order.processing, …) go out through the relay of the orders
    // store: its own in a process of its own (on PostgreSQL the relays of every process take
    // turns, so no row is published twice), the orders service's in `agora up`.
    let (outbox, relay) = deps.relay()?;
    let counters = Counters {
        processed: Counter::default(),
        failed: Counter::default(),
        settled: Counter::default(),
        duration: Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
    };
    deps.metrics.register_counter(
        "worker_orders_processed",
        "Orders the worker moved to processed",
        counters.processed.clone(),
    );
    deps.metrics.register_counter(
        "worker_orders_failed",
        "Orders the worker moved to failed (payment declined)",
        counters.failed.clone(),
    );
    deps.metrics.register_counter(
        "worker_stock_settled",
        "Orders whose reservation the worker brought in line with their status",
        counters.settled.clone(),
    );
    deps.metrics.register(
        "worker_accepted_to_done_seconds",
        "From an order's creation to the worker deciding it (processed or failed)",
        counters.duration.clone(),
    );
    let worker = Worker {
        db: db.clone(),
        cache: deps.cache.clone(),
        outbox,
        neighbours: Arc::new(Neighbours::new(
            &deps.settings,
            Duration::from_millis(orders.call_timeout_ms),
        )?),
        settings: settings.clone(),
        counters,
        undecided: (db.dialect() == Dialect::Postgres).then(|| Arc::new(undecideds(db.clone()))),
    };
    let consumer = Consumer::new(
        CONSUMER,
        crate::WORKER.consumes,
        db,
        bus,
        &deps.settings.bus,
        worker.clone(),
    )
    .with_concurrency(settings.concurrency);
    consumer.register_metrics(&deps.metrics);
    let sweeper = worker.clone();
    let mut app = deps
        .app(axum::Router::new())
        .with_task(move |shutdown| consumer.spawn(shutdown))
        .with_task(move |shutdown| tokio::spawn(sweep_loop(sweeper, shutdown)));
    if let Some(relay) = relay {
        app = app.with_task(move |shutdown| relay.spawn(shutdown));
    }
    Ok(app)
}

async fn sweep_loop(worker: Worker, shutdown: CancellationToken) {
    let every = Duration::from_secs(worker.settings.sweep_secs.max(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match worker.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(orders = n, "the sweep moved orders on"),
            Err(err) => {
                tracing::debug!(error.message = %kit::ApiError::from(err), "the order sweep failed; trying again next period")
            }
        }
    }
}
