//! Connections of sqlx's pools handed out without sqlx's release ping.
//!
//! sqlx 0.8 (and 0.9) pings every connection given back to its pool before another user may
//! take it, and spawns a task to do so. On PostgreSQL that is one more round trip to the server
//! for every statement outside a transaction and every transaction (it doubled the server's
//! wake-ups for a primary-key read); on SQLite a round trip to the connection's thread for every
//! read. So a connection that finished cleanly (its statement answered, its transaction
//! committed or rolled back) is kept here, in [`Warm`], for the next user of this process, and
//! only goes back to sqlx's pool (through the ping) when:
//! - it was dropped mid-statement (a cancelled request) or inside a transaction: the ping, with
//!   the queued `ROLLBACK`, is exactly what such a connection needs before anyone reuses it;
//! - it lost its connection (sqlx then closes it);
//! - nobody took it for [`WARM_FOR`]: an idle service's connections go back to sqlx's pool, whose
//!   idle timeout, lifetime and health checks manage them as before;
//! - a user holding a permit is waiting in sqlx's pool for a connection (so it gets this one).
//!
//! Who may hold a connection is decided by a fair semaphore with as many permits as the pool has
//! connections at most, in front of both ([`Leases`]): a permit guarantees a connection, from
//! here or from sqlx's pool, and waiters are served in order. Used by [`super::PgDb`] for every
//! connection and by [`super::SqliteDb`] for its readers (its writer is a connection of its own).

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::{Pool, PoolConnection};
use sqlx::postgres::{PgConnection, PgTransactionManager};
use sqlx::{Database, TransactionManager as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// A connection kept longer than this without use goes back to sqlx's pool.
pub(crate) const WARM_FOR: Duration = Duration::from_secs(1);

/// A sqlx pool whose connections are leased (see the module docs). Cheap to clone.
#[derive(Debug)]
pub(crate) struct Leases<DB: Database> {
    pool: Pool<DB>,
    permits: Arc<Semaphore>,
    warm: Arc<Warm<DB>>,
}

impl<DB: Database> Clone for Leases<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            permits: self.permits.clone(),
            warm: self.warm.clone(),
        }
    }
}

impl<DB: Database> Leases<DB> {
    /// As many permits as `pool` has connections at most.
    pub(crate) fn new(pool: Pool<DB>) -> Self {
        let max = pool.options().get_max_connections();
        Self {
            pool,
            permits: Arc::new(Semaphore::new(max as usize)),
            warm: Arc::new(Warm::default()),
        }
    }

    /// A permit, then a connection kept warm by this process (unless `suspect` of its idle
    /// time) or else one of sqlx's pool; within `wait` in all (`PoolTimedOut` after it).
    pub(crate) async fn lease(
        &self,
        wait: Duration,
        suspect: impl Fn(Duration) -> bool,
    ) -> sqlx::Result<Lease<DB>> {
        // The usual case under load: a free permit and a kept connection, nothing to wait for
        // (and no timer to set).
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => match self.warm.take(&suspect) {
                Some(conn) => return Ok(self.lease_of(conn, permit)),
                None => Some(permit),
            },
            Err(TryAcquireError::Closed) => return Err(sqlx::Error::PoolClosed),
            Err(TryAcquireError::NoPermits) => None,
        };
        let lease = async {
            let permit = match permit {
                Some(permit) => permit,
                None => self
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| sqlx::Error::PoolClosed)?,
            };
            let conn = match self.warm.take(&suspect) {
                Some(conn) => conn,
                None => {
                    let _waiting = self.warm.waiting();
                    self.pool.acquire().await?
                }
            };
            Ok(self.lease_of(conn, permit))
        };
        tokio::time::timeout(wait, lease)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    fn lease_of(&self, conn: PoolConnection<DB>, permit: OwnedSemaphorePermit) -> Lease<DB> {
        Lease {
            conn: Some(conn),
            warm: self.warm.clone(),
            reusable: false,
            _permit: permit,
        }
    }

    /// Gives back the kept connections and closes the pool, waiting for the leased ones.
    pub(crate) async fn close(&self) {
        self.permits.close();
        self.warm.close();
        self.pool.close().await;
    }

    /// How many connections are kept warm (for tests).
    #[cfg(test)]
    pub(crate) fn warm_len(&self) -> usize {
        self.warm
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Whether a statement's outcome leaves its connection ready for the next one: it answered
/// (rows, or a database error such as a constraint violation), rather than losing its
/// connection.
pub(crate) fn answered<T>(result: &sqlx::Result<T>) -> bool {
    !result.as_ref().is_err_and(|err| {
        super::is_connection_lost(err) || matches!(err, sqlx::Error::WorkerCrashed)
    })
}

/// Connections used a moment ago, newest last, each with the moment it was given back.
#[derive(Debug)]
struct Warm<DB: Database> {
    conns: Mutex<VecDeque<(PoolConnection<DB>, Instant)>>,
    /// Permit holders waiting in sqlx's pool: while any is, a connection given back goes there.
    waiting: AtomicUsize,
    closed: AtomicBool,
}

impl<DB: Database> Default for Warm<DB> {
    fn default() -> Self {
        Self {
            conns: Mutex::default(),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }
}

impl<DB: Database> Warm<DB> {
    /// The most recently used connection, unless it has been idle since before a lost
    /// connection was seen (`suspect`): that one goes back through sqlx's ping instead.
    fn take(&self, suspect: impl Fn(Duration) -> bool) -> Option<PoolConnection<DB>> {
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
    fn keep(&self, conn: PoolConnection<DB>) {
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
    fn close(&self) {
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
    fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(&self.waiting)
    }
}

/// Moves the connections idle longer than [`WARM_FOR`] (the oldest, at the front) to `out`, to be
/// dropped once the lock is released (dropping gives them back to sqlx's pool).
fn expire<C>(conns: &mut VecDeque<(C, Instant)>, out: &mut Vec<C>) {
    while conns
        .front()
        .is_some_and(|(_, kept_at)| kept_at.elapsed() > WARM_FOR)
    {
        if let Some((conn, _)) = conns.pop_front() {
            out.push(conn);
        }
    }
}

impl<DB: Database> Drop for Warm<DB> {
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
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection and the permit to hold it. Dropped, the connection is kept warm when it finished
/// cleanly ([`Lease::reusable`]), otherwise given back to sqlx's pool; then the permit is
/// released.
#[derive(Debug)]
pub struct Lease<DB: Database> {
    conn: Option<PoolConnection<DB>>,
    warm: Arc<Warm<DB>>,
    reusable: bool,
    _permit: OwnedSemaphorePermit,
}

/// A leased PostgreSQL connection.
pub type PgLease = Lease<sqlx::Postgres>;

impl<DB: Database> Lease<DB> {
    /// Marks the connection as finished cleanly (its statement answered): it may be kept warm.
    pub(crate) fn reusable(&mut self) {
        self.reusable = true;
    }
}

impl<DB: Database> Deref for Lease<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl<DB: Database> DerefMut for Lease<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl<DB: Database> Drop for Lease<DB> {
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
