//! Queries written once for both backends: [`query`] builds a statement with its arguments, and
//! runs it on anything that is an [`Executor`]: the pool (`&Db`), a transaction (`&mut Tx`) or a
//! pooled connection (`&mut Conn`).
//!
//! Arguments are kept as a small enum of the types Agora stores ([`Arg`]) and turned into each
//! driver's native arguments when the statement runs, so every backend keeps its own types
//! (`timestamptz`, `bigint`, ...) and no generic bounds leak into service code: a store helper is
//! an ordinary `async fn` over `impl Executor<'_>` (one statement) or `&mut Tx` (several).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use sqlx::Arguments as _;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};

use super::{Conn, Db, Dialect, PgDb, SqliteDb, Tx};

/// A row type both backends can decode (`#[derive(sqlx::FromRow)]` structs whose fields both
/// drivers know, and tuples of them).
pub trait FromRow:
    for<'r> sqlx::FromRow<'r, PgRow> + for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin
{
}
impl<T> FromRow for T where
    T: for<'r> sqlx::FromRow<'r, PgRow> + for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// A single-column value both backends can decode (`i64`, `String`, `bool`, timestamps, ...).
pub trait Scalar:
    for<'r> sqlx::Decode<'r, sqlx::Postgres>
    + sqlx::Type<sqlx::Postgres>
    + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
    + sqlx::Type<sqlx::Sqlite>
    + Send
    + Unpin
{
}
impl<T> Scalar for T where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
        + sqlx::Type<sqlx::Sqlite>
        + Send
        + Unpin
{
}

/// One bound argument. `None` binds a typed SQL `NULL` (PostgreSQL needs the type to resolve
/// `$1 is null`).
#[derive(Debug, Clone, PartialEq)]
pub enum Arg<'q> {
    I64(Option<i64>),
    I32(Option<i32>),
    Bool(Option<bool>),
    F64(Option<f64>),
    Text(Option<Cow<'q, str>>),
    Time(Option<DateTime<Utc>>),
}

/// A value that can be bound to a statement.
pub trait Bind<'q> {
    fn into_arg(self) -> Arg<'q>;
}

macro_rules! bind_copy {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl<'q> Bind<'q> for $t {
            fn into_arg(self) -> Arg<'q> { Arg::$variant(Some(self)) }
        }
        impl<'q> Bind<'q> for Option<$t> {
            fn into_arg(self) -> Arg<'q> { Arg::$variant(self) }
        }
        impl<'q> Bind<'q> for &Option<$t> {
            fn into_arg(self) -> Arg<'q> { Arg::$variant(*self) }
        }
    )*};
}

bind_copy!(i64 => I64, i32 => I32, bool => Bool, f64 => F64, DateTime<Utc> => Time);

impl<'q> Bind<'q> for &'q str {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(Some(Cow::Borrowed(self)))
    }
}

impl<'q> Bind<'q> for &'q String {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(Some(Cow::Borrowed(self.as_str())))
    }
}

impl<'q> Bind<'q> for String {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(Some(Cow::Owned(self)))
    }
}

impl<'q> Bind<'q> for Option<&'q str> {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(self.map(Cow::Borrowed))
    }
}

impl<'q> Bind<'q> for &'q Option<String> {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(self.as_deref().map(Cow::Borrowed))
    }
}

impl<'q> Bind<'q> for Option<String> {
    fn into_arg(self) -> Arg<'q> {
        Arg::Text(self.map(Cow::Owned))
    }
}

/// Where a statement runs: the pool (any free connection) or one connection (a transaction's, or
/// a connection taken from the pool).
pub enum Target<'e> {
    PgPool(&'e PgDb),
    PgConn(&'e mut PgConnection),
    SqlitePool(&'e SqliteDb),
    SqliteConn(&'e mut SqliteConnection),
}

/// What statements run on: `&Db`, `&mut Tx` or `&mut Conn`. Pass `&mut *tx` to run several
/// statements in one transaction.
pub trait Executor<'e>: Send {
    fn dialect(&self) -> Dialect;
    fn target(self) -> Target<'e>;
}

impl<'e> Executor<'e> for &'e Db {
    fn dialect(&self) -> Dialect {
        Db::dialect(self)
    }
    fn target(self) -> Target<'e> {
        match self {
            Db::Postgres(pg) => Target::PgPool(pg),
            Db::Sqlite(sqlite) => Target::SqlitePool(sqlite),
        }
    }
}

impl<'e> Executor<'e> for &'e mut Tx {
    fn dialect(&self) -> Dialect {
        Tx::dialect(self)
    }
    fn target(self) -> Target<'e> {
        match self {
            Tx::Postgres(tx) => Target::PgConn(tx),
            Tx::Sqlite(tx) => Target::SqliteConn(tx.connection()),
        }
    }
}

impl<'e> Executor<'e> for &'e mut Conn {
    fn dialect(&self) -> Dialect {
        Conn::dialect(self)
    }
    fn target(self) -> Target<'e> {
        match self {
            Conn::Postgres(conn) => Target::PgConn(conn),
            Conn::Sqlite(conn) => Target::SqliteConn(conn),
        }
    }
}

/// A statement with its arguments; see the module docs.
///
/// ```no_run
/// # async fn example(db: kit::Db) -> sqlx::Result<()> {
/// let mut tx = db.begin().await?;
/// let id: i64 = kit::db::query("insert into t (name) values ($1) returning id")
///     .bind("x")
///     .fetch_scalar(&mut tx)
///     .await?;
/// kit::db::query("update t set name = $1 where id = $2").bind("y").bind(id).execute(&mut tx).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[must_use = "a query does nothing until it is run"]
pub struct Query<'q> {
    sql: &'q str,
    args: Vec<Arg<'q>>,
    /// Prepared once per connection and its plan kept (sqlx's statement cache); see
    /// [`Query::planned_each_run`].
    persistent: bool,
}

/// A statement in the SQL both dialects share (`$1` placeholders, `returning`, `on conflict`).
pub fn query(sql: &str) -> Query<'_> {
    Query {
        sql,
        args: Vec::new(),
        persistent: true,
    }
}

fn encode_error(err: sqlx::error::BoxDynError) -> sqlx::Error {
    sqlx::Error::Encode(err)
}

/// PostgreSQL encodes arguments as they are added, so they can be borrowed (and a statement run
/// again after a lost connection without copying them first).
fn pg_args(args: &[Arg<'_>]) -> sqlx::Result<PgArguments> {
    let mut out = PgArguments::default();
    for arg in args {
        match arg {
            Arg::I64(v) => out.add(*v),
            Arg::I32(v) => out.add(*v),
            Arg::Bool(v) => out.add(*v),
            Arg::F64(v) => out.add(*v),
            Arg::Text(v) => out.add(v.as_deref()),
            Arg::Time(v) => out.add(*v),
        }
        .map_err(encode_error)?;
    }
    Ok(out)
}

fn sqlite_args(args: Vec<Arg<'_>>) -> sqlx::Result<SqliteArguments<'_>> {
    let mut out = SqliteArguments::default();
    for arg in args {
        match arg {
            Arg::I64(v) => out.add(v),
            Arg::I32(v) => out.add(v),
            Arg::Bool(v) => out.add(v),
            Arg::F64(v) => out.add(v),
            Arg::Text(v) => out.add(v),
            Arg::Time(v) => out.add(v),
        }
        .map_err(encode_error)?;
    }
    Ok(out)
}

/// Runs the future `$run` (built from `$conn`, a connection of the pool `$pg`), and once more
/// on another connection when `$retry` and the first lost its connection ([`PgDb::again`]).
/// A macro rather than a function taking a closure: the future borrows the connection, and a
/// closure returning such a future is not `Send` for every lifetime, as spawned tasks require.
macro_rules! on_pool {
    ($pg:expr, $retry:expr, $conn:ident => $run:expr) => {{
        let pg: &PgDb = $pg;
        let retry = $retry;
        let mut first = true;
        loop {
            let result = match pg.connection().await {
                Ok(mut lease) => {
                    let $conn: &mut PgConnection = &mut lease;
                    let result = $run.await;
                    // Answered (rows or a database error): the connection is ready for the next
                    // statement, so it is kept warm (`lease`) rather than pinged by sqlx.
                    if super::lease::answered(&result) {
                        lease.reusable();
                    }
                    result
                }
                Err(err) => Err(err),
            };
            if pg.again(&result, retry, first) {
                first = false;
                continue;
            }
            break result;
        }
    }};
}

/// Runs the future `$run` (built from `$conn`, a leased reader of the SQLite file `$sqlite`),
/// keeping the reader for the next read when the statement answered (`lease`).
macro_rules! on_reader {
    ($sqlite:expr, $conn:ident => $run:expr) => {{
        let mut reader = $sqlite.reader().await?;
        let $conn: &mut SqliteConnection = &mut reader;
        let result = $run.await;
        if super::lease::answered(&result) {
            reader.reusable();
        }
        result
    }};
}

/// Runs `$call` (a method of sqlx's query types) on the target with the native arguments.
macro_rules! run {
    ($self:ident, $ex:ident, $build:ident $(::<$t:ty>)?, $call:ident) => {
        match $ex.target() {
            Target::PgPool(pg) => on_pool!(pg, $self.is_read(), conn => {
                sqlx::$build $(::<_, $t, _>)? ($self.sql, pg_args(&$self.args)?).persistent($self.persistent).$call(conn)
            }),
            Target::PgConn(conn) => {
                sqlx::$build $(::<_, $t, _>)? ($self.sql, pg_args(&$self.args)?).persistent($self.persistent).$call(conn).await
            }
            Target::SqlitePool(sqlite) => {
                let read = $self.is_read();
                let statement = sqlx::$build $(::<_, $t, _>)? ($self.sql, sqlite_args($self.args)?);
                if read {
                    on_reader!(sqlite, conn => statement.$call(conn))
                } else {
                    statement.$call(&mut *sqlite.writer().await?).await
                }
            }
            Target::SqliteConn(conn) => {
                sqlx::$build $(::<_, $t, _>)? ($self.sql, sqlite_args($self.args)?).$call(conn).await
            }
        }
    };
}

impl<'q> Query<'q> {
    /// A `select`: outside a transaction it changes nothing, so on PostgreSQL it may run again on
    /// another connection when its own was lost, and on SQLite it runs on a reader connection
    /// instead of waiting for the one writer ([`SqliteDb`]).
    fn is_read(&self) -> bool {
        let sql = self.sql.trim_start();
        sql.get(..6)
            .is_some_and(|word| word.eq_ignore_ascii_case("select"))
    }

    /// Planned anew at each run, never from a plan kept for the connection: on PostgreSQL an
    /// unnamed statement, planned for its arguments and for the tables as they are now. For a
    /// statement whose plan depends on how large a table is: the plan PostgreSQL keeps for a
    /// prepared statement (a generic one, after five runs) is made once, and one made while a
    /// table was small (a new database) scans the whole table until the table is next
    /// analyzed (autovacuum's next round, a minute or more later). It costs a parse and a plan
    /// per run, so it suits a statement that runs once for many rows.
    pub fn planned_each_run(mut self) -> Self {
        self.persistent = false;
        self
    }

    /// Binds the next `$n`.
    pub fn bind(mut self, value: impl Bind<'q>) -> Self {
        self.args.push(value.into_arg());
        self
    }

    /// Runs the statement; returns how many rows it changed.
    pub async fn execute<'e>(self, ex: impl Executor<'e>) -> sqlx::Result<u64> {
        let rows_affected = match ex.target() {
            Target::PgPool(pg) => on_pool!(pg, self.is_read(), conn => {
                sqlx::query_with(self.sql, pg_args(&self.args)?).persistent(self.persistent).execute(conn)
            })?
            .rows_affected(),
            Target::PgConn(conn) => sqlx::query_with(self.sql, pg_args(&self.args)?)
                .persistent(self.persistent)
                .execute(conn)
                .await?
                .rows_affected(),
            Target::SqlitePool(sqlite) => {
                let read = self.is_read();
                let statement = sqlx::query_with(self.sql, sqlite_args(self.args)?);
                if read {
                    on_reader!(sqlite, conn => statement.execute(conn))?
                } else {
                    statement.execute(&mut *sqlite.writer().await?).await?
                }
                .rows_affected()
            }
            Target::SqliteConn(conn) => sqlx::query_with(self.sql, sqlite_args(self.args)?)
                .execute(conn)
                .await?
                .rows_affected(),
        };
        Ok(rows_affected)
    }

    /// Exactly one row (`RowNotFound` otherwise).
    pub async fn fetch_one<'e, T: FromRow>(self, ex: impl Executor<'e>) -> sqlx::Result<T> {
        run!(self, ex, query_as_with::<T>, fetch_one)
    }

    /// At most one row.
    pub async fn fetch_optional<'e, T: FromRow>(
        self,
        ex: impl Executor<'e>,
    ) -> sqlx::Result<Option<T>> {
        run!(self, ex, query_as_with::<T>, fetch_optional)
    }

    /// Every row.
    pub async fn fetch_all<'e, T: FromRow>(self, ex: impl Executor<'e>) -> sqlx::Result<Vec<T>> {
        run!(self, ex, query_as_with::<T>, fetch_all)
    }

    /// The first column of exactly one row.
    pub async fn fetch_scalar<'e, T: Scalar>(self, ex: impl Executor<'e>) -> sqlx::Result<T> {
        run!(self, ex, query_scalar_with::<T>, fetch_one)
    }

    /// The first column of at most one row.
    pub async fn fetch_optional_scalar<'e, T: Scalar>(
        self,
        ex: impl Executor<'e>,
    ) -> sqlx::Result<Option<T>> {
        run!(self, ex, query_scalar_with::<T>, fetch_optional)
    }
}
