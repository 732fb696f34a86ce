//! One data layer for both run modes: PostgreSQL (one schema per service) and SQLite (one file per
//! service).
//!
//! Services write each query once, in the SQL both dialects share (`$1` placeholders, `RETURNING`,
//! timestamps bound from Rust rather than `now()`), and run it through [`dispatch!`], which
//! monomorphises the same code for each pool type. There is no `sqlx::Any`: each backend keeps its
//! native driver and types. Migrations are per service and per dialect, embedded with
//! `sqlx::migrate!`.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{DatabaseBackend, Settings, is_identifier};

/// A service's database handle; cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A service's migrations, one set per dialect (`migrations/postgres`, `migrations/sqlite`).
pub struct Migrations {
    pub postgres: Migrator,
    pub sqlite: Migrator,
}

/// Runs `$body` with `$pool` bound to the concrete pool (`&PgPool` or `&SqlitePool`).
///
/// ```no_run
/// # async fn example(db: kit::Db) -> sqlx::Result<()> {
/// let one: i64 = kit::dispatch!(&db, pool => sqlx::query_scalar("select $1").bind(1_i64).fetch_one(pool).await)?;
/// # Ok(()) }
/// ```
#[macro_export]
macro_rules! dispatch {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Postgres($pool) => $body,
            $crate::db::Db::Sqlite($pool) => $body,
        }
    };
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
                let options = PgConnectOptions::from_str(&url)
                    .context("parsing database.url")?
                    .options([("search_path", schema.as_str())]);
                let pool = PgPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(timeout)
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
                Ok(Db::Postgres(pool))
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
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(timeout)
                    .connect_with(options)
                    .await
                    .with_context(|| format!("opening SQLite database {}", path.display()))?;
                Ok(Db::Sqlite(pool))
            }
        }
    }

    /// Applies the migrations that have not run yet, and makes sure the service's outbox table
    /// exists (see [`crate::outbox`]).
    pub async fn migrate(&self, migrations: &Migrations) -> anyhow::Result<()> {
        match self {
            Db::Postgres(pool) => migrations.postgres.run(pool).await?,
            Db::Sqlite(pool) => migrations.sqlite.run(pool).await?,
        }
        crate::outbox::install(self)
            .await
            .context("creating the outbox table")?;
        Ok(())
    }

    /// A round trip to the database, for readiness.
    pub async fn ping(&self) -> anyhow::Result<()> {
        dispatch!(self, pool => sqlx::query("select 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// `postgres` or `sqlite`.
    pub fn backend(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        dispatch!(self, pool => pool.close().await);
    }
}

/// After rows were inserted with explicit ids (seed data), moves PostgreSQL's identity sequence of
/// `table.id` past the largest id, so the next generated id does not collide. SQLite's
/// autoincrement needs nothing.
pub async fn sync_identity(db: &Db, table: &str) -> sqlx::Result<()> {
    if let Db::Postgres(pool) = db {
        if !is_identifier(table) {
            return Err(sqlx::Error::Protocol(format!(
                "invalid table name `{table}`"
            )));
        }
        sqlx::query(&format!(
            "select setval(pg_get_serial_sequence('{table}', 'id'), \
             greatest((select max(id) from {table}), 1))"
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Opening a transaction that will write, on either pool: `pool.begin_write()` inside
/// [`dispatch!`].
///
/// On SQLite this is `BEGIN IMMEDIATE`, which takes the write lock up front: a deferred
/// transaction that reads and then writes can fail with "database is locked" when another
/// connection wrote in between, whereas an immediate one waits its turn (`busy_timeout`). On
/// PostgreSQL it is a plain `BEGIN` (row locks and conditional updates do the rest).
pub trait BeginWrite {
    type Database: sqlx::Database;
    fn begin_write(
        &self,
    ) -> impl std::future::Future<Output = sqlx::Result<sqlx::Transaction<'static, Self::Database>>> + Send;
}

impl BeginWrite for PgPool {
    type Database = sqlx::Postgres;
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.begin().await
    }
}

impl BeginWrite for SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

/// True when `err` is a unique-constraint violation on either backend.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// For a unique violation, which of `columns` it concerns: PostgreSQL names the constraint
/// (`users_email_key`), SQLite names the column in its message (`users.email`).
pub fn violated_column<'a>(err: &sqlx::Error, columns: &[&'a str]) -> Option<&'a str> {
    let sqlx::Error::Database(db) = err else {
        return None;
    };
    if !db.is_unique_violation() {
        return None;
    }
    let haystack = format!("{} {}", db.constraint().unwrap_or_default(), db.message());
    columns
        .iter()
        .copied()
        .find(|c| haystack.contains(&format!("_{c}_")) || haystack.contains(&format!(".{c}")))
}
