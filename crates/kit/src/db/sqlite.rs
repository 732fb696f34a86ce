//! SQLite with one writer connection and a few readers.
//!
//! SQLite lets one connection write at a time. With every pooled connection free to write, the
//! others waited for the lock in SQLite's busy handler, which sleeps between attempts (up to
//! 100 ms at a time, first come not first served): under a steady stream of writes one request
//! could wait most of a second. Here every write (a [`super::Db::begin`] transaction, a
//! statement other than a `select` on the pool, migrations) queues in order for the one writer
//! connection, and reads run beside it on the readers (WAL: readers never wait for the writer).
//!
//! The writer is a connection behind a FIFO mutex, not a pool of one: sqlx returns a pooled
//! connection through a task it spawns when the connection is dropped, so each hand-over from
//! one writer to the next waited for that task to be scheduled, and on a busy runtime the write
//! lock sat idle meanwhile. The busy timeout stays for another process writing the same file
//! (`agora seed` beside `agora up`).

use std::borrow::Cow;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, TransactionManager as _};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::lease::{Lease, Leases};

/// At most this many reader connections per SQLite file: each has its own thread and page
/// cache, and more readers than cores only queue in the kernel.
const READERS: u32 = 4;

/// A SQLite file's connections: see the module docs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    /// The readers, leased like PostgreSQL's connections (`super::lease`): a reader that
    /// answered is kept for the next read instead of going back through sqlx's release ping (a
    /// round trip to the connection's thread).
    pub(super) read: Leases<sqlx::Sqlite>,
    /// `None` once closed (or never opened, see [`SqliteDb::readers_only`]).
    write: Arc<Mutex<Option<SqliteConnection>>>,
    /// How long a write waits for the writer.
    wait: Duration,
}

impl SqliteDb {
    /// Opens the writer (creating the file, switching it to WAL), then the readers' pool of at
    /// most `max` connections (and at most 4).
    pub(crate) async fn open(
        options: SqliteConnectOptions,
        max: u32,
        wait: Duration,
    ) -> sqlx::Result<Self> {
        let writer = options.connect().await?;
        let read = SqlitePoolOptions::new()
            .max_connections(max.clamp(1, READERS))
            .acquire_timeout(wait)
            .connect_with(options)
            .await?;
        Ok(Self {
            read: Leases::new(read),
            write: Arc::new(Mutex::new(Some(writer))),
            wait,
        })
    }

    /// Readers and no writer: every write fails (a test's placeholder that is never written to).
    pub fn readers_only(read: SqlitePool) -> Self {
        Self {
            read: Leases::new(read),
            write: Arc::new(Mutex::new(None)),
            wait: Duration::from_secs(1),
        }
    }

    /// A reader connection (`PoolTimedOut` after the wait, a 503).
    pub(crate) async fn reader(&self) -> sqlx::Result<Lease<sqlx::Sqlite>> {
        self.read.lease(self.wait, |_| false).await
    }

    /// The writer, once it is this caller's turn (`PoolTimedOut` after the wait, a 503).
    pub(crate) async fn writer(&self) -> sqlx::Result<SqliteWriter> {
        let guard = tokio::time::timeout(self.wait, self.write.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?;
        if guard.is_none() {
            return Err(sqlx::Error::PoolClosed);
        }
        Ok(SqliteWriter(guard))
    }

    /// Opens a write transaction (`BEGIN IMMEDIATE`) on the writer.
    ///
    /// The `BEGIN` runs in a task of its own, like PostgreSQL's (see `PgDb::begin`): a caller
    /// dropped while it is on the way cannot leave the writer inside a transaction the next
    /// writer would run in; the finished task's transaction is dropped, which rolls it back
    /// before the writer is handed on.
    pub(crate) async fn begin(&self) -> sqlx::Result<SqliteTx> {
        let writer = self.writer().await?;
        tokio::spawn(async move {
            let mut tx = SqliteTx {
                writer,
                open: false,
            };
            sqlx::sqlite::SqliteTransactionManager::begin(
                &mut tx.writer,
                Some(Cow::Borrowed("BEGIN IMMEDIATE")),
            )
            .await?;
            tx.open = true;
            Ok(tx)
        })
        .await
        .unwrap_or_else(|join| Err(sqlx::Error::Io(std::io::Error::other(join))))
    }

    /// Closes the readers, then the writer once the current writer is done.
    pub(crate) async fn close(&self) {
        self.read.close().await;
        if let Some(writer) = self.write.lock().await.take()
            && let Err(err) = writer.close().await
        {
            tracing::debug!(error.message = %err, "closing the SQLite writer");
        }
    }
}

/// The writer connection, held until dropped.
#[derive(Debug)]
pub struct SqliteWriter(OwnedMutexGuard<Option<SqliteConnection>>);

impl Deref for SqliteWriter {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        // Checked when it was taken, and only `close` (which waits for it) empties it.
        self.0.as_ref().expect("the writer is open")
    }
}

impl DerefMut for SqliteWriter {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0.as_mut().expect("the writer is open")
    }
}

/// A write transaction on the writer; commit it, or drop it to roll back.
#[derive(Debug)]
pub struct SqliteTx {
    writer: SqliteWriter,
    open: bool,
}

impl SqliteTx {
    pub(crate) fn connection(&mut self) -> &mut SqliteConnection {
        &mut self.writer
    }

    pub(crate) async fn commit(mut self) -> sqlx::Result<()> {
        sqlx::sqlite::SqliteTransactionManager::commit(&mut self.writer).await?;
        self.open = false;
        Ok(())
    }

    pub(crate) async fn rollback(mut self) -> sqlx::Result<()> {
        sqlx::sqlite::SqliteTransactionManager::rollback(&mut self.writer).await?;
        self.open = false;
        Ok(())
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        if self.open {
            // Queued on the connection before the writer is handed on (the guard drops after).
            sqlx::sqlite::SqliteTransactionManager::start_rollback(&mut self.writer);
        }
    }
}
