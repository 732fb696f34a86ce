//! Connections of the PostgreSQL pool handed out without sqlx's release ping.
//!
//! sqlx 0.8 (and 0.9) pings every connection given back to its pool before another user may
//! take it: one more round trip to the server, and a spawned task, for every statement outside a
//! transaction and every transaction. That doubles the server's wake-ups for a primary-key read.
//! So a connection that finished cleanly (its statement answered, its transaction committed or
//! rolled back) is kept here, [`Warm`], for the next user of this process, and only goes back to
//! sqlx's pool (through the ping) when:
//! - it was dropped mid-statement (a cancelled request) or inside a transaction: the ping, with
//!   the queued `ROLLBACK`, is exactly what such a connection needs before anyone reuses it;
//! - it lost its connection (sqlx then closes it);
//! - nobody took it for [`WARM_FOR`]: an idle service's connections go back to sqlx's pool, whose
//!   idle timeout, lifetime and health checks manage them as before;
//! - a user holding a permit is waiting in sqlx's pool for a connection (so it gets this one).
//!
//! Who may hold a connection is decided by a fair semaphore of `database.max_connections`
//! permits in front of both ([`super::PgDb`]): a permit guarantees a connection, from here or from
//! sqlx's pool, and waiters are served in order.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::TransactionManager as _;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgTransactionManager};
use tokio::sync::OwnedSemaphorePermit;

type Pooled = PoolConnection<sqlx::Postgres>;

/// A connection kept longer than this without use goes back to sqlx's pool.
pub(crate) const WARM_FOR: Duration = Duration::from_secs(1);

/// Connections used a moment ago, newest last, each with the moment it was given back.
#[derive(Debug, Default)]
pub(crate) struct Warm {
    conns: Mutex<VecDeque<(Pooled, Instant)>>,
    /// Permit holders waiting in sqlx's pool: while any is, a connection given back goes there.
    waiting: AtomicUsize,
    closed: AtomicBool,
}

impl Warm {
    /// The most recently used connection, unless it has been idle since before a lost
    /// connection was seen (`suspect`): that one goes back through sqlx's ping instead.
    pub(crate) fn take(&self, suspect: impl FnOnce(Duration) -> bool) -> Option<Pooled> {
        let mut expired = Vec::new();
        let newest = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            expire(&mut conns, &mut expired);
            conns.pop_back()
        };
        drop(expired);
        let (conn, kept_at) = newest?;
        (!suspect(kept_at.elapsed())).then_some(conn)
    }

    /// Keeps a connection that finished cleanly for the next user (see the module docs for when
    /// it goes to sqlx's pool instead).
    fn keep(&self, conn: Pooled) {
        if self.waiting.load(Ordering::Acquire) > 0 || self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut expired = Vec::new();
        {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            expire(&mut conns, &mut expired);
            conns.push_back((conn, Instant::now()));
        }
        drop(expired);
    }

    /// Gives every kept connection back to sqlx's pool and keeps none from now on (before the
    /// pool is closed, which waits for them).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let all: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        drop(all);
    }

    /// Counts a permit holder waiting in sqlx's pool while the guard lives.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(&self.waiting)
    }

    /// How many connections are kept (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Moves the connections idle longer than [`WARM_FOR`] (the oldest, at the front) to `out`, to be
/// dropped once the lock is released (dropping gives them back to sqlx's pool).
fn expire(conns: &mut VecDeque<(Pooled, Instant)>, out: &mut Vec<Pooled>) {
    while conns
        .front()
        .is_some_and(|(_, kept_at)| kept_at.elapsed() > WARM_FOR)
    {
        if let Some((conn, _)) = conns.pop_front() {
            out.push(conn);
        }
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        let conns = std::mem::take(self.conns.get_mut().unwrap_or_else(|p| p.into_inner()));
        // Giving a connection back to sqlx's pool spawns a task; without a runtime (a pool
        // dropped after its runtime), close the sockets here instead.
        if tokio::runtime::Handle::try_current().is_err() {
            for (conn, _) in conns {
                drop(conn.detach());
            }
        }
    }
}

/// See [`Warm::waiting`].
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection and the permit to hold it. Dropped, the connection is kept warm when it finished
/// cleanly ([`PgLease::reusable`]), otherwise given back to sqlx's pool; then the permit is
/// released.
#[derive(Debug)]
pub struct PgLease {
    conn: Option<Pooled>,
    warm: Arc<Warm>,
    reusable: bool,
    _permit: OwnedSemaphorePermit,
}

impl PgLease {
    pub(crate) fn new(conn: Pooled, warm: Arc<Warm>, permit: OwnedSemaphorePermit) -> Self {
        Self {
            conn: Some(conn),
            warm,
            reusable: false,
            _permit: permit,
        }
    }

    /// Marks the connection as finished cleanly (its statement answered): it may be kept warm.
    pub(crate) fn reusable(&mut self) {
        self.reusable = true;
    }
}

impl Deref for PgLease {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl DerefMut for PgLease {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for PgLease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
        {
            self.warm.keep(conn);
        }
        // Otherwise `conn` was dropped above: back to sqlx's pool, through its ping.
    }
}

/// A PostgreSQL transaction on a leased connection; commit it, or drop it to roll back (the
/// `ROLLBACK` is queued and sent by sqlx's ping as the connection goes back to its pool).
#[derive(Debug)]
pub struct PgTx {
    lease: PgLease,
    open: bool,
}

impl PgTx {
    /// `BEGIN` on `lease`'s connection.
    pub(crate) async fn begin(mut lease: PgLease) -> sqlx::Result<Self> {
        PgTransactionManager::begin(&mut lease, None).await?;
        Ok(Self { lease, open: true })
    }

    pub async fn commit(mut self) -> sqlx::Result<()> {
        PgTransactionManager::commit(&mut self.lease).await?;
        self.open = false;
        self.lease.reusable();
        Ok(())
    }

    pub async fn rollback(mut self) -> sqlx::Result<()> {
        PgTransactionManager::rollback(&mut self.lease).await?;
        self.open = false;
        self.lease.reusable();
        Ok(())
    }
}

impl Deref for PgTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.lease
    }
}

impl DerefMut for PgTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.lease
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open {
            PgTransactionManager::start_rollback(&mut self.lease);
        }
    }
}
