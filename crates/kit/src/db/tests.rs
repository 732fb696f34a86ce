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
