//! The transactional outbox: a service writes the events that announce a change in the SAME
//! database transaction as the change, into the `outbox` table of its own schema (or SQLite file;
//! the table is one of kit's migrations, applied with every service's own). The relay
//! ([`crate::relay`]) publishes unpublished rows to the bus and marks them published; a crash
//! between publish and mark re-publishes (at-least-once), it never loses an event.
//!
//! ```no_run
//! # async fn example(db: kit::Db) -> anyhow::Result<()> {
//! use kit::event::Event;
//! let mut tx = db.begin().await?;
//! // ... the change itself, on `&mut tx` ...
//! let event = Event::new("catalog", "stock.changed", "product:1", &serde_json::json!({"stock": 4}))?;
//! kit::outbox::enqueue(&mut tx, &[event]).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! A row the bus keeps refusing while the bus itself is healthy (a poison row) is eventually set
//! aside by the relay, so it does not block the rows behind it: [`set_aside`] lists those rows and
//! [`retry`] puts one back in line.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::{Executor, Query, Tx, query};
pub use crate::event::Event;

const INSERT: &str = "insert into outbox (id, topic, key, payload, created_at) \
                      values ($1, $2, $3, $4, $5)";

/// Most rows one insert statement writes.
const ROWS_PER_INSERT: usize = 50;

/// Inserts `events` as unpublished outbox rows, in their order; they commit or roll back with
/// `tx`. One statement per [`ROWS_PER_INSERT`] events.
pub async fn enqueue(tx: &mut Tx, events: &[Event]) -> sqlx::Result<()> {
    for chunk in events.chunks(ROWS_PER_INSERT) {
        let sql = if chunk.len() == 1 {
            std::borrow::Cow::Borrowed(INSERT)
        } else {
            std::borrow::Cow::Owned(format!(
                "insert into outbox (id, topic, key, payload, created_at) values {}",
                values(chunk.len(), 1)
            ))
        };
        bind(query(&sql), chunk)?.execute(&mut *tx).await?;
    }
    Ok(())
}

/// For a statement of the caller's own that writes events only when its change happens (an
/// `insert into outbox (id, topic, key, payload, created_at) select ... from (values ...)` inside
/// a `with`): the `values` rows of `count` events, five parameters each from `$first` on, in
/// the outbox's column order. Bind them with [`bind`].
pub fn values(count: usize, first: usize) -> String {
    let rows: Vec<String> = (0..count)
        .map(|i| {
            let n = first + i * 5;
            format!("(${n}, ${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4)
        })
        .collect();
    rows.join(", ")
}

/// Binds the outbox columns of `events` to `statement`'s next parameters (see [`values`]).
pub fn bind<'q>(mut statement: Query<'q>, events: &'q [Event]) -> sqlx::Result<Query<'q>> {
    for event in events {
        let payload = serde_json::to_string(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        statement = statement
            .bind(event.id.to_string())
            .bind(&event.topic)
            .bind(&event.key)
            .bind(payload)
            .bind(event.occurred_at);
    }
    Ok(statement)
}

/// Events waiting to be published (the relay's backlog), for stats and metrics. Rows set aside
/// are not counted.
pub async fn backlog<'e>(ex: impl Executor<'e>) -> sqlx::Result<i64> {
    query("select count(*) from outbox where published_at is null and set_aside_at is null")
        .fetch_scalar(ex)
        .await
}

/// An outbox row the relay set aside.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct SetAside {
    pub seq: i64,
    pub id: String,
    pub topic: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub set_aside_at: DateTime<Utc>,
}

/// The rows set aside, oldest first.
pub async fn set_aside<'e>(ex: impl Executor<'e>) -> sqlx::Result<Vec<SetAside>> {
    query(
        "select seq, id, topic, attempts, last_error, created_at, set_aside_at from outbox \
         where set_aside_at is not null and published_at is null order by seq",
    )
    .fetch_all(ex)
    .await
}

/// Puts a set-aside row back in line, with its attempts reset; false when `seq` is not set aside.
/// Wake the relay afterwards ([`crate::relay::Notifier`]).
pub async fn retry<'e>(ex: impl Executor<'e>, seq: i64) -> sqlx::Result<bool> {
    let changed = query(
        "update outbox set set_aside_at = null, attempts = 0 \
         where seq = $1 and set_aside_at is not null and published_at is null",
    )
    .bind(seq)
    .execute(ex)
    .await?;
    Ok(changed == 1)
}
