//! One data layer for both run modes: PostgreSQL (one schema per service) and SQLite (one file per
//! service).
//!
//! The seam every store uses:
//! - [`query`] builds a statement in the SQL both dialects share (`$1` placeholders, `returning`,
//!   `on conflict do nothing`, timestamps bound from Rust rather than `now()`) and runs it on any
//!   [`Executor`]: the pool (`&Db`), a transaction (`&mut Tx`) or a connection (`&mut Conn`).
//!   So a store helper is written once, and several helpers share one transaction: an order,
//!   its items, its idempotency key and its outbox event commit together.
//! - [`Dialect`] holds the few differences a statement must spell per backend (the row-lock
//!   clause, `skip locked`); [`Db::begin`] opens a transaction that will write (`BEGIN
//!   IMMEDIATE` on SQLite, see there).
//! - [`ResultExt::on_constraint`] maps a constraint violation to the service's error by
//!   constraint name, on both backends.
//!
//! There is no `sqlx::Any`: each backend keeps its native driver and types. Migrations are per
//! service and per dialect, embedded with `sqlx::migrate!`; kit adds its own (the outbox, the
//! consumer's tables) to every service's set.
//!
//! Quirks worth knowing when writing SQL for both: PostgreSQL needs a typed parameter for
//! `$1 is null` (bind an `Option<String>`, not a bare `None`); `count(*)` is `bigint` (read it as
//! `i64`); `sum()` of a `bigint` column is `numeric` on PostgreSQL (`cast(... as bigint)`);
//! compare text case-insensitively with `lower()` on both sides.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

use crate::config::{DatabaseBackend, Settings, is_identifier};
use crate::outage::Outage;

mod lease;
mod query;
mod sqlite;

use lease::Leases;
pub use lease::{Lease, PgLease, PgTx};

pub use query::{Arg, Bind, Executor, FromRow, Query, Scalar, Target, query};
pub use sqlite::{SqliteDb, SqliteTx, SqliteWriter};

/// A service's database handle; cheap to clone. Only the entry point chooses the variant; stores
/// use [`query`] and [`Db::begin`].
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgDb),
    Sqlite(SqliteDb),
}

/// A PostgreSQL pool that survives losing its server.
///
/// The pool does not ping a connection before every use, nor after (those round trips cost
/// measurable throughput; see the module `lease`). Instead, the first statement that finds its
/// connection lost (a restart, a failover, a reset) marks the moment, and from then on a
/// connection that has been idle since before that moment is pinged before reuse (broken ones
/// are dropped, sqlx drops a connection that errors when it is returned). A read (a `select`
/// outside a transaction) that lost its connection is run once more on another; `begin`
/// likewise, since nothing has run yet. A database that stays unreachable is a 503
/// `dependency_unavailable` with `Retry-After` ([`crate::ApiError`]), never a 500, and its
/// outage is logged once per state change.
///
/// Connections are leased (the module `lease`): a fair semaphore of `database.max_connections`
/// permits decides who holds one, and a connection that finished cleanly is kept for the next
/// statement of this process instead of going back through sqlx's release ping (a round trip
/// per statement).
#[derive(Debug, Clone)]
pub struct PgDb {
    leases: Leases<sqlx::Postgres>,
    health: Arc<PgHealth>,
    acquire_timeout: Duration,
}

#[derive(Debug)]
struct PgHealth {
    /// The last attempt to get a connection failed.
    unreachable: AtomicBool,
    /// When a lost connection was last seen, in ns after `epoch` (0: never).
    lost_at: AtomicU64,
    epoch: Instant,
    outage: Outage,
}

impl PgHealth {
    fn new(service: &str) -> Self {
        Self {
            unreachable: AtomicBool::new(false),
            lost_at: AtomicU64::new(0),
            epoch: Instant::now(),
            outage: Outage::new(format!("database (PostgreSQL, {service})")),
        }
    }

    /// A connection was lost: idle ones older than now get pinged before reuse, and until a
    /// connection is had again, waiting for one is short (the server may be gone: a request
    /// should get its 503 in [`DOWN_WAIT`], not after the whole connect timeout).
    fn mark_lost(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.lost_at.store(now.max(1), Ordering::Relaxed);
        self.unreachable.store(true, Ordering::Relaxed);
    }

    /// Whether a connection idle for `idle_for` was already idle when a connection was lost.
    fn is_suspect(&self, idle_for: Duration) -> bool {
        let lost_at = self.lost_at.load(Ordering::Relaxed);
        if lost_at == 0 {
            return false;
        }
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let released_at =
            now.saturating_sub(u64::try_from(idle_for.as_nanos()).unwrap_or(u64::MAX));
        released_at <= lost_at
    }

    /// Notes how a call ended, for the outage log.
    fn observe<T>(&self, result: &sqlx::Result<T>) {
        match result {
            Ok(_) => {
                self.outage.succeeded();
            }
            Err(err) if is_unavailable(err) => {
                self.outage.failed(err);
            }
            Err(_) => {}
        }
    }
}

/// While the database is unreachable, a request waits this long for a connection (not the whole
/// `database.connect_timeout_secs`) before its 503: an outage answers fast.
const DOWN_WAIT: Duration = Duration::from_millis(250);

impl PgDb {
    /// A connection of the pool, waiting at most [`DOWN_WAIT`] while the last attempt failed.
    pub(crate) async fn connection(&self) -> sqlx::Result<PgLease> {
        let unreachable = self.health.unreachable.load(Ordering::Relaxed);
        let result = self.lease(self.wait(unreachable)).await;
        if unreachable != result.is_err() {
            self.health
                .unreachable
                .store(result.is_err(), Ordering::Relaxed);
        }
        result
    }

    /// How long to wait for a connection: [`DOWN_WAIT`] while the database is unreachable.
    fn wait(&self, unreachable: bool) -> Duration {
        if unreachable {
            DOWN_WAIT
        } else {
            self.acquire_timeout
        }
    }

    /// A leased connection (see the module `lease`), within `wait`.
    async fn lease(&self, wait: Duration) -> sqlx::Result<PgLease> {
        let health = &self.health;
        self.leases
            .lease(wait, |idle_for| health.is_suspect(idle_for))
            .await
    }

    /// After an attempt on a connection of the pool: whether to make it once more on another
    /// (the first attempt lost its connection, and `retry` allows: nothing it did can have taken
    /// effect, as for a read). Otherwise the outcome is final and noted for the outage log. See
    /// `query::on_pool!`, which runs statements this way.
    pub(crate) fn again<T>(&self, result: &sqlx::Result<T>, retry: bool, first: bool) -> bool {
        if let Err(err) = result
            && is_connection_lost(err)
        {
            self.health.mark_lost();
            if retry && first {
                tracing::debug!(error.message = %err, "lost a database connection; trying once more");
                return true;
            }
        }
        self.health.observe(result);
        false
    }

    /// Opens a transaction, once more on another connection when the first was lost (nothing
    /// has run in it yet).
    ///
    /// The `BEGIN` runs in a task of its own, so a caller dropped while it is on the wire (a
    /// client that hung up, a timeout) cannot leave the connection inside a transaction (sqlx
    /// 0.8's `Pool::begin` is not cancel-safe on PostgreSQL, transact-rs/sqlx#4393, and the next
    /// user of such a connection would run in that transaction, its writes never committed).
    /// Finished, the task's transaction is dropped, which rolls it back.
    async fn begin(&self) -> sqlx::Result<PgTx> {
        let once = async || {
            let db = self.clone();
            let unreachable = self.health.unreachable.load(Ordering::Relaxed);
            let wait = self.wait(unreachable);
            let begin = async move {
                tokio::spawn(async move { PgTx::begin(db.lease(wait).await?).await })
                    .await
                    .unwrap_or_else(|join| Err(sqlx::Error::Io(std::io::Error::other(join))))
            };
            if unreachable {
                tokio::time::timeout(DOWN_WAIT, begin)
                    .await
                    .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            } else {
                begin.await
            }
        };
        let mut result = once().await;
        if result.as_ref().is_err_and(is_connection_lost) {
            self.health.mark_lost();
            result = once().await;
        }
        self.health.unreachable.store(
            result.as_ref().is_err_and(is_unavailable),
            Ordering::Relaxed,
        );
        self.health.observe(&result);
        result
    }
}

/// A PostgreSQL array literal of `ids` (`{1,2,3}`), bound as text and cast in the statement
/// (`= any($1::bigint[])`): kit's arguments are scalars. With a statement planned at each run
/// ([`Query::planned_each_run`]) the planner sees how many ids there are.
pub fn id_array(ids: &[i64]) -> String {
    let mut list = String::with_capacity(2 + ids.len() * 8);
    list.push('{');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push_str(itoa::Buffer::new().format(*id));
    }
    list.push('}');
    list
}

/// A PostgreSQL array literal of `items` (`{"a","b\"c"}`), each quoted, for
/// `= any($1::text[])` (see [`id_array`]).
pub fn text_array<S: AsRef<str>>(items: &[S]) -> String {
    let mut list =
        String::with_capacity(2 + items.iter().map(|i| i.as_ref().len() + 3).sum::<usize>());
    list.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        list.push('"');
        for c in item.as_ref().chars() {
            if c == '"' || c == '\\' {
                list.push('\\');
            }
            list.push(c);
        }
        list.push('"');
    }
    list.push('}');
    list
}

/// The connection the statement ran on is gone (the server restarted, or the network dropped
/// it): another connection may well work.
pub fn is_connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        // Class 08: connection exception; 57P01-03: the server is shutting down or starting up.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// The database cannot serve this now, through no fault of the request: unreachable, restarting,
/// out of connections, too slow (statement timeout), or SQLite's write lock taken past the busy
/// timeout. Such errors are 503 `dependency_unavailable` with `Retry-After`.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    if is_connection_lost(err) {
        return true;
    }
    match err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // Statement cancelled by `database.statement_timeout_ms`; too many connections (and
            // the rest of class 53, insufficient resources).
            Some(code) if code == "57014" || code.starts_with("53") => true,
            // SQLITE_BUSY and its extended codes.
            Some("5" | "261" | "517") => db.message().contains("locked"),
            _ => false,
        },
        _ => false,
    }
}

/// The database error behind `err` that makes it a 503, if any (looking through contexts and
/// errors shared by the cache's single-flight).
pub fn unavailable_cause(err: &anyhow::Error) -> Option<&sqlx::Error> {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .find(|db| is_unavailable(db))
}

/// The differences between the two dialects that a statement has to spell out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    /// Appended to a `select` whose rows the transaction goes on to change: ` for update` on
    /// PostgreSQL (lock the rows until commit). Nothing on SQLite, where a write transaction
    /// ([`Db::begin`]) already holds the whole database.
    pub fn for_update(self) -> &'static str {
        match self {
            Dialect::Postgres => " for update",
            Dialect::Sqlite => "",
        }
    }

    /// Appended to a `select` that claims work: ` for update skip locked` on PostgreSQL, so
    /// replicas take different rows instead of waiting for each other. Nothing on SQLite (one
    /// process, one writer).
    pub fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => " for update skip locked",
            Dialect::Sqlite => "",
        }
    }

    /// `postgres` or `sqlite`.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        }
    }
}

/// A transaction; commit it, or drop it to roll back.
#[derive(Debug)]
pub enum Tx {
    Postgres(PgTx),
    Sqlite(SqliteTx),
}

impl Tx {
    pub fn dialect(&self) -> Dialect {
        match self {
            Tx::Postgres(_) => Dialect::Postgres,
            Tx::Sqlite(_) => Dialect::Sqlite,
        }
    }

    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> sqlx::Result<()> {
        match self {
            Tx::Postgres(tx) => tx.rollback().await,
            Tx::Sqlite(tx) => tx.rollback().await,
        }
    }
}

/// A connection taken from the pool, for several statements that need no transaction.
#[derive(Debug)]
pub enum Conn {
    Postgres(PgLease),
    Sqlite(SqliteWriter),
}

impl Conn {
    pub fn dialect(&self) -> Dialect {
        match self {
            Conn::Postgres(_) => Dialect::Postgres,
            Conn::Sqlite(_) => Dialect::Sqlite,
        }
    }
}

/// A service's migrations, one set per dialect (`migrations/postgres`, `migrations/sqlite`).
/// Versions below [`KIT_VERSIONS`]; kit's own migrations (the outbox, the consumer's tables) are
/// applied with them.
pub struct Migrations {
    pub postgres: Migrator,
    pub sqlite: Migrator,
}

impl Migrations {
    /// No tables of its own (a service that only needs kit's: the outbox, the consumer's).
    pub const NONE: Migrations = Migrations {
        postgres: Migrator::DEFAULT,
        sqlite: Migrator::DEFAULT,
    };
}

/// Kit's migrations are numbered from here; a service's stay below.
pub const KIT_VERSIONS: i64 = 1_000_000_000;

/// Kit's own tables, created in every service's schema (or file).
static KIT_MIGRATIONS: Migrations = Migrations {
    postgres: sqlx::migrate!("./migrations/postgres"),
    sqlite: sqlx::migrate!("./migrations/sqlite"),
};

/// The service's migrations followed by kit's, as one set.
fn with_kit(service: &Migrator, kit: &Migrator) -> anyhow::Result<Migrator> {
    let mut all: Vec<Migration> = Vec::with_capacity(service.iter().len() + kit.iter().len());
    for migration in service.iter() {
        anyhow::ensure!(
            migration.version < KIT_VERSIONS,
            "migration {} `{}`: service migrations are numbered below {KIT_VERSIONS}",
            migration.version,
            migration.description
        );
        all.push(migration.clone());
    }
    all.extend(kit.iter().cloned());
    Ok(Migrator {
        migrations: Cow::Owned(all),
        ..Migrator::DEFAULT
    })
}

impl Db {
    /// Connects `service` to its database as configured, creating the PostgreSQL schema or the
    /// SQLite file when missing, and runs its migrations when `database.migrate_on_start` is set
    /// (always on SQLite, where nobody else could have run them).
    pub async fn connect(
        settings: &Settings,
        service: &str,
        migrations: &Migrations,
    ) -> anyhow::Result<Self> {
        let db = Self::connect_only(settings, service).await?;
        if settings.database.migrate_on_start || matches!(db, Db::Sqlite(_)) {
            db.migrate(migrations)
                .await
                .with_context(|| format!("migrating the {service} database"))?;
        }
        Ok(db)
    }

    /// Connects without migrating (for `agora migrate`, which migrates explicitly).
    pub async fn connect_only(settings: &Settings, service: &str) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(settings.database.connect_timeout_secs);
        let max = settings.database.max_connections;
        match settings.database_backend(service) {
            DatabaseBackend::Postgres { url, schema } => {
                anyhow::ensure!(is_identifier(&schema), "invalid schema name `{schema}`");
                // Bounds on every session: no statement runs (and no transaction sits idle)
                // longer than configured; 0 turns a bound off.
                let statement_timeout = settings.database.statement_timeout_ms.to_string();
                let idle_in_transaction =
                    settings.database.idle_in_transaction_timeout_ms.to_string();
                let options = PgConnectOptions::from_str(&url)
                    .context("parsing database.url")?
                    .options([
                        ("search_path", schema.as_str()),
                        ("statement_timeout", statement_timeout.as_str()),
                        (
                            "idle_in_transaction_session_timeout",
                            idle_in_transaction.as_str(),
                        ),
                    ]);
                let health = Arc::new(PgHealth::new(service));
                let suspect = health.clone();
                let pool = PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(timeout)
                    // A slow acquire is a symptom of a busy or absent database, which the
                    // outage log reports once per state change: not a warning per request.
                    .acquire_slow_level(log::LevelFilter::Debug)
                    .test_before_acquire(false)
                    .before_acquire(move |conn, meta| {
                        let ping = suspect.is_suspect(meta.idle_for);
                        Box::pin(async move {
                            if ping {
                                use sqlx::Connection as _;
                                // A broken connection is dropped and another one taken.
                                return Ok(conn.ping().await.is_ok());
                            }
                            Ok(true)
                        })
                    })
                    .connect_with(options)
                    .await
                    .with_context(|| {
                        format!("connecting to PostgreSQL for {service} (database.url)")
                    })?;
                // Several services (or replicas) may race to create their schema.
                let create = format!("create schema if not exists {schema}");
                if let Err(err) = sqlx::query(&create).execute(&pool).await
                    && !is_unique_violation(&err)
                {
                    return Err(err).context("creating the service schema");
                }
                Ok(Db::Postgres(PgDb {
                    leases: Leases::new(pool),
                    health,
                    acquire_timeout: timeout,
                }))
            }
            DatabaseBackend::Sqlite { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating data directory {}", dir.display()))?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5))
                    // A page cache of 512 KiB per connection instead of SQLite's 2 MiB: under
                    // writes, WAL readers drop their cache at every commit anyway, and the OS
                    // keeps the file's pages (7 services x 5 connections x 2 MiB could grow
                    // to 70 MiB in `agora up`).
                    .pragma("cache_size", "-512");
                let sqlite = SqliteDb::open(options, max, timeout)
                    .await
                    .with_context(|| format!("opening SQLite database {}", path.display()))?;
                Ok(Db::Sqlite(sqlite))
            }
        }
    }

    /// Applies the service's migrations and kit's (the outbox, the consumer's tables) that have
    /// not run yet.
    pub async fn migrate(&self, migrations: &Migrations) -> anyhow::Result<()> {
        match self {
            Db::Postgres(pg) => {
                // A migration may legitimately run longer than any request's statement.
                let mut conn = pg.connection().await?;
                sqlx::query("set statement_timeout = 0")
                    .execute(&mut *conn)
                    .await?;
                let result = with_kit(&migrations.postgres, &KIT_MIGRATIONS.postgres)?
                    .run(&mut *conn)
                    .await;
                sqlx::query("reset statement_timeout")
                    .execute(&mut *conn)
                    .await?;
                result?
            }
            Db::Sqlite(sqlite) => {
                let mut writer = sqlite.writer().await?;
                with_kit(&migrations.sqlite, &KIT_MIGRATIONS.sqlite)?
                    .run(&mut *writer)
                    .await?
            }
        }
        Ok(())
    }

    /// A round trip to the database, for readiness.
    pub async fn ping(&self) -> anyhow::Result<()> {
        query("select 1").execute(self).await?;
        Ok(())
    }

    /// `postgres` or `sqlite`.
    pub fn backend(&self) -> &'static str {
        self.dialect().name()
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Postgres(_) => Dialect::Postgres,
            Db::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Opens a transaction that will write.
    ///
    /// On SQLite this is `BEGIN IMMEDIATE` on the one writer connection ([`SqliteDb`]), which
    /// takes the write lock up front: a deferred transaction that reads and then writes can fail
    /// with "database is locked" when another process wrote in between, whereas an immediate one
    /// waits its turn. Transactions of this process queue for the writer in order. On
    /// PostgreSQL it is a plain `BEGIN` (row locks and conditional updates do the rest).
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        Ok(match self {
            Db::Postgres(pg) => Tx::Postgres(pg.begin().await?),
            Db::Sqlite(sqlite) => Tx::Sqlite(sqlite.begin().await?),
        })
    }

    /// A connection of the pool, for several statements outside a transaction (on SQLite the
    /// writer, since they may write: hold it briefly).
    pub async fn acquire(&self) -> sqlx::Result<Conn> {
        Ok(match self {
            Db::Postgres(pg) => Conn::Postgres(pg.connection().await?),
            Db::Sqlite(sqlite) => Conn::Sqlite(sqlite.writer().await?),
        })
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        match self {
            Db::Postgres(pg) => pg.leases.close().await,
            Db::Sqlite(sqlite) => sqlite.close().await,
        }
    }
}

/// After rows were inserted with explicit ids (seed data), moves PostgreSQL's identity sequence of
/// `table.id` past the largest id, so the next generated id does not collide. SQLite's
/// autoincrement needs nothing.
pub async fn sync_identity<'e>(ex: impl Executor<'e>, table: &str) -> sqlx::Result<()> {
    if ex.dialect() == Dialect::Postgres {
        if !is_identifier(table) {
            return Err(sqlx::Error::Protocol(format!(
                "invalid table name `{table}`"
            )));
        }
        let sql = format!(
            "select setval(pg_get_serial_sequence('{table}', 'id'), \
             greatest((select max(id) from {table}), 1))"
        );
        query(&sql).execute(ex).await?;
    }
    Ok(())
}

/// True when `err` is a unique-constraint violation on either backend.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The name of the constraint `err` violates, on either backend. PostgreSQL reports it; SQLite
/// only names the columns (`UNIQUE constraint failed: users.email`) or an index on expressions
/// (`... failed: index 'products_sku_key'`), so columns are turned into PostgreSQL's default
/// name for a unique constraint on them (`users_email_key`, `t_a_b_key`). Name unique constraints
/// that way (the default in PostgreSQL) and one name works on both.
pub fn violated_constraint(err: &sqlx::Error) -> Option<Cow<'_, str>> {
    let sqlx::Error::Database(db) = err else {
        return None;
    };
    if let Some(name) = db.constraint() {
        return Some(Cow::Borrowed(name));
    }
    let failed = db.message().split_once("constraint failed: ")?.1.trim();
    if let Some(index) = failed.strip_prefix("index '") {
        return Some(Cow::Owned(index.trim_end_matches('\'').to_owned()));
    }
    let mut parts = failed.split(", ").map(|c| c.split_once('.'));
    let (table, first) = parts.next()??;
    let mut name = format!("{table}_{first}");
    for part in parts {
        name.push('_');
        name.push_str(part?.1);
    }
    name.push_str("_key");
    Some(Cow::Owned(name))
}

/// An error that may carry a database error (the service's error enum, or `sqlx::Error` itself).
pub trait AsDbError {
    fn as_db_error(&self) -> Option<&sqlx::Error>;
}

impl AsDbError for sqlx::Error {
    fn as_db_error(&self) -> Option<&sqlx::Error> {
        Some(self)
    }
}

/// Maps constraint violations to the service's errors, by constraint name (after
/// realworld-axum-sqlx's `ResultExt`):
///
/// ```no_run
/// # #[derive(Debug)] enum Error { Taken(&'static str), Database(sqlx::Error) }
/// # impl From<sqlx::Error> for Error { fn from(e: sqlx::Error) -> Self { Error::Database(e) } }
/// # impl kit::db::AsDbError for Error { fn as_db_error(&self) -> Option<&sqlx::Error> {
/// #     match self { Error::Database(e) => Some(e), _ => None } } }
/// use kit::db::ResultExt as _;
/// # async fn example(db: kit::Db) -> Result<u64, Error> {
/// kit::db::query("insert into users (username, email) values ($1, $2)")
///     .bind("bob").bind("bob@example.com")
///     .execute(&db)
///     .await
///     .on_constraint("users_username_key", || Error::Taken("username"))
///     .on_constraint("users_email_key", || Error::Taken("email"))
/// # }
/// ```
pub trait ResultExt<T, E> {
    /// A violation of constraint `name` becomes `f()`; any other error converts unchanged.
    fn on_constraint<F: From<E>>(self, name: &str, f: impl FnOnce() -> F) -> Result<T, F>;
}

impl<T, E: AsDbError> ResultExt<T, E> for Result<T, E> {
    fn on_constraint<F: From<E>>(self, name: &str, f: impl FnOnce() -> F) -> Result<T, F> {
        self.map_err(|err| {
            let matches = err
                .as_db_error()
                .and_then(violated_constraint)
                .is_some_and(|violated| violated == name);
            if matches { f() } else { F::from(err) }
        })
    }
}

#[cfg(test)]
mod tests;
