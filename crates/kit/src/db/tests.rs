//! Session bounds on PostgreSQL.

use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::*;
use crate::ApiError;
use crate::testing::{Backend, TestEnv};

#[tokio::test]
async fn a_statement_past_the_timeout_is_cancelled_and_answers_503() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    env.settings.database.statement_timeout_ms = 300;
    env.settings.database.idle_in_transaction_timeout_ms = 400;
    // Migrations run on the same pool, exempt from the bound.
    let db = Db::connect(&env.settings, "users", &Migrations::NONE)
        .await
        .expect("connects and migrates");
    let shown: String = query("show statement_timeout")
        .fetch_scalar(&db)
        .await
        .expect("show");
    assert_eq!(shown, "300ms");

    let started = Instant::now();
    let err = query("select pg_sleep(3)")
        .execute(&db)
        .await
        .expect_err("cancelled");
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "cancelled after {:?}",
        started.elapsed()
    );
    assert_eq!(
        ApiError::from(err).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A transaction left idle is ended by the server, so it cannot hold locks forever.
    let mut tx = db.begin().await.expect("begin");
    query("select 1").execute(&mut tx).await.expect("in tx");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        query("select 1").execute(&mut tx).await.is_err(),
        "the idle transaction was ended"
    );
    drop(tx);
    query("select 1")
        .execute(&db)
        .await
        .expect("the pool recovers");
    db.close().await;
}

/// SQLite: a writer that waits past the busy timeout (another writer holds the lock) is a 503,
/// like PostgreSQL's statement timeout, not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_past_the_busy_timeout_answers_503() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let db = Db::connect(&env.settings, "users", &Migrations::NONE)
        .await
        .expect("connects");
    let holder = db.begin().await.expect("first writer");
    let err = db.begin().await.expect_err("the second writer gives up");
    assert_eq!(
        ApiError::from(err).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    holder.rollback().await.expect("rollback");
    db.close().await;
}

/// SQLite: writes queue for the one writer in order instead of sleeping in SQLite's busy
/// handler, and reads do not wait for them. With a write transaction open, a read on the pool
/// answers at once and a write on the pool waits for the commit; then 40 concurrent writers all
/// land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_queue_for_one_writer_while_reads_go_on() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let db = Db::connect(&env.settings, "users", &Migrations::NONE)
        .await
        .expect("connects");
    query("create table t (id integer primary key, n integer not null)")
        .execute(&db)
        .await
        .expect("create");
    let mut holder = db.begin().await.expect("writer");
    query("insert into t (n) values (1)")
        .execute(&mut holder)
        .await
        .expect("insert in the open transaction");

    let started = Instant::now();
    let seen: i64 = query("select count(*) from t")
        .fetch_scalar(&db)
        .await
        .expect("a read beside the open write");
    assert_eq!(seen, 0, "the uncommitted row is not visible");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the read waited {:?} for the writer",
        started.elapsed()
    );

    let waiting = tokio::spawn({
        let db = db.clone();
        async move { query("insert into t (n) values (2)").execute(&db).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "a second write ran beside the first"
    );
    holder.commit().await.expect("commit");
    waiting
        .await
        .expect("task")
        .expect("the queued write runs after the commit");

    let writers: Vec<_> = (0..40)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut tx = db.begin().await?;
                query("insert into t (n) values ($1)")
                    .bind(i64::from(i))
                    .execute(&mut tx)
                    .await?;
                tx.commit().await
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("task").expect("every writer lands");
    }
    let rows: i64 = query("select count(*) from t")
        .fetch_scalar(&db)
        .await
        .expect("count");
    assert_eq!(rows, 42);
    db.close().await;
}

/// The server ended every connection of the pool (as a restart does): a read is run again on
/// another connection instead of failing, and the broken idle connections are found before a
/// write uses them, although no connection is pinged before use in normal operation.
#[tokio::test]
async fn reads_survive_lost_connections_and_writes_after_them_find_live_ones() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let db = env.kit_db("lost").await;
    query("create table t (id bigint primary key)")
        .execute(&db)
        .await
        .expect("create");
    // Fill the pool (5 connections in tests), then end every one of them from outside.
    let mut conns = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..5 {
        let mut conn = db.acquire().await.expect("acquire");
        let pid: i32 = query("select pg_backend_pid()")
            .fetch_scalar(&mut conn)
            .await
            .expect("pid");
        pids.push(pid);
        conns.push(conn);
    }
    drop(conns);
    let outside = sqlx::PgPool::connect(&crate::testing::test_database_url())
        .await
        .expect("another connection");
    for pid in &pids {
        sqlx::query("select pg_terminate_backend($1)")
            .bind(pid)
            .execute(&outside)
            .await
            .expect("terminate");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let n: i64 = query("select count(*) from t")
        .fetch_scalar(&db)
        .await
        .expect("a read on a lost connection is run again on another");
    assert_eq!(n, 0);
    for id in 0..5_i64 {
        query("insert into t (id) values ($1)")
            .bind(id)
            .execute(&db)
            .await
            .expect("a write after a loss gets a live connection");
    }
    let mut tx = db.begin().await.expect("begin on a live connection");
    query("insert into t (id) values (99)")
        .execute(&mut tx)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    env.drop_kit_db("lost", db).await;
}

/// A database that cannot be reached (the connection to it cut, nothing listening) answers 503
/// `dependency_unavailable` for reads and writes alike, never a 500, and is used again once it
/// is back, without a restart; the outage is logged once, not per request.
#[tokio::test]
async fn an_unreachable_database_is_503_and_used_again_when_back() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let url = url::Url::parse(&crate::testing::test_database_url()).expect("url");
    let target = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    );
    let proxy = crate::testing::CuttableProxy::start_to(target).await;
    let port = proxy.port;
    let mut through_proxy = url.clone();
    through_proxy.set_port(Some(port)).expect("port");
    env.settings.database.url = Some(through_proxy.to_string());
    env.settings.database.connect_timeout_secs = 1;
    let db = env.kit_db("away").await;
    query("create table t (id bigint primary key)")
        .execute(&db)
        .await
        .expect("create");

    let logs = crate::testing::CapturedLogs::start();
    proxy.cut();
    let started = Instant::now();
    for _ in 0..10 {
        let read = query("select count(*) from t")
            .fetch_scalar::<i64>(&db)
            .await;
        let write = query("insert into t (id) values (1)").execute(&db).await;
        for err in [read.expect_err("down"), write.expect_err("down")] {
            assert!(is_unavailable(&err), "{err:?}");
            let api = ApiError::from(err);
            assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(api.problem().code, "dependency_unavailable");
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "an outage answers fast, not after a connect timeout per request: {:?}",
        started.elapsed()
    );
    // Wrapped in a context (as a cache loader returns it), it is still a 503.
    let wrapped = query("select 1")
        .execute(&db)
        .await
        .map_err(|err| anyhow::Error::new(err).context("loading user 1"))
        .expect_err("down");
    assert_eq!(
        ApiError::from(wrapped).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    proxy.restore();
    let n: i64 = query("select count(*) from t")
        .fetch_scalar(&db)
        .await
        .expect("used again once reachable");
    assert_eq!(n, 0);
    query("insert into t (id) values (1)")
        .execute(&db)
        .await
        .expect("writes too");
    let lines = logs.lines();
    let kit_warnings = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("kit::"))
        .count();
    // sqlx adds one warning per pooled connection it finds broken (at most the pool's size).
    let warnings = lines.iter().filter(|l| l.contains("WARN")).count();
    assert!(
        kit_warnings == 1
            && warnings <= 1 + 5
            && lines.iter().any(|l| l.contains("dependency is back")),
        "21 failures log the outage once and its end once:\n{}",
        lines.join("\n")
    );
    drop(logs);
    env.drop_kit_db("away", db).await;
}

/// A request dropped while its `BEGIN` is on the wire (a client that hung up, a timeout) must not
/// leave its connection inside a transaction: the next user of that connection would run in it,
/// and its writes would never commit (sqlx 0.8's `Pool::begin` is not cancel-safe on
/// PostgreSQL: transact-rs/sqlx#4393). One connection, so every attempt reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_cancelled_mid_flight_leaves_no_transaction_behind() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    env.settings.database.max_connections = 1;
    let db = Db::connect(&env.settings, "users", &Migrations::NONE)
        .await
        .expect("connects");
    let mut cancelled = 0;
    for attempt in 0..400u64 {
        // Dropped after 1 to 40 polls with a yield between them: the early ones before the BEGIN
        // is sent, the later ones while it is on the wire or just answered. (A timer cannot do
        // this: tokio's rounds every deadline up to the next millisecond, longer than a BEGIN.)
        let finished = {
            let mut begin = std::pin::pin!(db.begin());
            let mut finished = false;
            for _ in 0..=attempt % 40 {
                if futures::poll!(begin.as_mut()).is_ready() {
                    finished = true;
                    break;
                }
                tokio::task::yield_now().await;
            }
            finished
        };
        if !finished {
            cancelled += 1;
        }
        // Outside a transaction, two statements run in two transactions.
        let xid = async || -> String {
            query("select pg_current_xact_id()::text")
                .fetch_scalar(&db)
                .await
                .expect("select")
        };
        assert_ne!(
            xid().await,
            xid().await,
            "attempt {attempt}: a cancelled begin left the connection inside a transaction"
        );
    }
    assert!(cancelled > 0, "no begin was cancelled");
    db.close().await;
}

/// Creates table `t (id bigint primary key)`.
async fn create_t(db: &Db) {
    query("create table t (id bigint primary key)")
        .execute(db)
        .await
        .expect("create");
}

/// The rows in table `t`.
async fn rows_in_t(db: &Db) -> i64 {
    query("select count(*) from t")
        .fetch_scalar(db)
        .await
        .expect("count")
}

/// The leased connections of [`PgDb`] (`lease`): one that answered its statement is kept for the
/// next statement instead of going back through sqlx's release ping, and the next takes it.
#[tokio::test]
async fn a_connection_that_answered_is_kept_for_the_next_statement() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let db = env.kit_db("warm").await;
    let Db::Postgres(pg) = &db else {
        panic!("a PostgreSQL test database")
    };
    let pid = async || -> i32 {
        query("select pg_backend_pid()")
            .fetch_scalar(&db)
            .await
            .expect("pid")
    };
    let first = pid().await;
    assert_eq!(pg.leases.warm_len(), 1, "kept after it answered");
    for _ in 0..10 {
        assert_eq!(pid().await, first, "the next statement takes the kept one");
    }
    // A database error is an answer too: the connection is ready for the next statement.
    create_t(&db).await;
    query("insert into t values (1)")
        .execute(&db)
        .await
        .expect("insert");
    let taken = query("insert into t values (1)").execute(&db).await;
    assert!(taken.as_ref().is_err_and(is_unique_violation), "{taken:?}");
    assert_eq!(pid().await, first);
    assert_eq!(pg.leases.warm_len(), 1);
    db.close().await;
}

/// A transaction dropped open (an error, a cancelled request) is rolled back before its
/// connection serves anyone, and is not kept warm; a committed one's connection is. One
/// connection, so the next statement must use the same one.
#[tokio::test]
async fn a_transaction_dropped_open_is_rolled_back_before_its_connection_is_reused() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    env.settings.database.max_connections = 1;
    let db = env.kit_db("dropped").await;
    let Db::Postgres(pg) = &db else {
        panic!("a PostgreSQL test database")
    };
    create_t(&db).await;
    let mut tx = db.begin().await.expect("begin");
    query("insert into t values (1)")
        .execute(&mut tx)
        .await
        .expect("insert");
    drop(tx);
    assert_eq!(
        pg.leases.warm_len(),
        0,
        "a connection left in a transaction is not kept"
    );
    assert_eq!(
        rows_in_t(&db).await,
        0,
        "the dropped transaction was rolled back"
    );
    let xid = async || -> String {
        query("select pg_current_xact_id()::text")
            .fetch_scalar(&db)
            .await
            .expect("xid")
    };
    assert_ne!(xid().await, xid().await, "no transaction left open");

    let mut tx = db.begin().await.expect("begin");
    query("insert into t values (2)")
        .execute(&mut tx)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    assert_eq!(
        pg.leases.warm_len(),
        1,
        "a committed transaction's connection is kept"
    );
    assert_eq!(rows_in_t(&db).await, 1);
    db.close().await;
}

/// More users than connections, statements and transactions mixed: every one gets a connection
/// in turn (permits are served in order, and a connection given back while someone waits in
/// sqlx's pool goes to them), none times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_users_than_connections_are_all_served() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    env.settings.database.max_connections = 2;
    env.settings.database.connect_timeout_secs = 5;
    let db = env.kit_db("contended").await;
    create_t(&db).await;
    let tasks: Vec<_> = (0..60i64)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let mut tx = db.begin().await?;
                    query("insert into t values ($1)")
                        .bind(i)
                        .execute(&mut tx)
                        .await?;
                    query("select pg_sleep(0.002)").execute(&mut tx).await?;
                    tx.commit().await
                } else {
                    query("select pg_sleep(0.002)").execute(&db).await.map(drop)
                }
            })
        })
        .collect();
    for task in tasks {
        task.await
            .expect("task")
            .expect("served within the timeout");
    }
    assert_eq!(rows_in_t(&db).await, 30);
    db.close().await;
}

/// SQLite's readers are leased too: a reader that answered is kept for the next read (no round
/// trip to its thread for sqlx's release ping), and sees what the writer committed since.
#[tokio::test]
async fn a_sqlite_reader_that_answered_is_kept_for_the_next_read() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let db = Db::connect(&env.settings, "users", &Migrations::NONE)
        .await
        .expect("connects");
    let Db::Sqlite(sqlite) = &db else {
        panic!("a SQLite test database")
    };
    create_t(&db).await;
    assert_eq!(rows_in_t(&db).await, 0);
    assert_eq!(sqlite.read.warm_len(), 1, "kept after it answered");
    for id in 1..=3i64 {
        query("insert into t (id) values ($1)")
            .bind(id)
            .execute(&db)
            .await
            .expect("insert");
        assert_eq!(rows_in_t(&db).await, id, "the kept reader sees each commit");
    }
    assert_eq!(sqlite.read.warm_len(), 1);
    db.close().await;
}

/// The array literals a statement binds as text come back from PostgreSQL as the values they
/// were made of, whatever the values hold; and a statement planned at each run gives the same
/// answers as one prepared once.
#[tokio::test]
async fn array_literals_read_back_as_their_values() {
    let mut env = TestEnv::new(Backend::Postgres).await;
    let db = env.kit_db("arrays").await;
    let texts = [
        "plain",
        "",
        "with \"quotes\"",
        "back\\slash\\",
        "{braces},commas",
        "NULL",
        " spaced ",
        "ünïcode ✓",
    ];
    for planned_each_run in [false, true] {
        let mut statement =
            query("select x from unnest($1::text[]) with ordinality as u (x, n) order by n");
        if planned_each_run {
            statement = statement.planned_each_run();
        }
        let back: Vec<(String,)> = statement
            .bind(text_array(&texts))
            .fetch_all(&db)
            .await
            .expect("texts");
        let back: Vec<&str> = back.iter().map(|(x,)| x.as_str()).collect();
        assert_eq!(back, texts, "planned each run: {planned_each_run}");
    }
    let ids = [3, -1, 0, i64::MAX, i64::MIN];
    let back: Vec<(i64,)> =
        query("select x from unnest($1::bigint[]) with ordinality as u (x, n) order by n")
            .bind(id_array(&ids))
            .fetch_all(&db)
            .await
            .expect("ids");
    assert_eq!(back.into_iter().map(|(x,)| x).collect::<Vec<_>>(), ids);
    let none: i64 = query("select cardinality($1::bigint[])::bigint")
        .bind(id_array(&[]))
        .fetch_scalar(&db)
        .await
        .expect("empty");
    assert_eq!(none, 0);
    env.drop_kit_db("arrays", db).await;
}
