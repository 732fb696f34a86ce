//! The users table: every query written once, in SQL that PostgreSQL and SQLite share, and run on
//! whichever pool the service has (see `kit::dispatch!`).

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::{Db, dispatch};

use crate::domain::{User, UserFields};

const COLUMNS: &str = "id, username, email, name, created_at, updated_at";

/// Timestamps at the precision both databases keep (microseconds), so what a write returns is
/// exactly what a later read returns.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[tracing::instrument(skip_all)]
pub async fn insert(db: &Db, fields: &UserFields) -> sqlx::Result<User> {
    let sql = format!(
        "insert into users (username, email, name, created_at, updated_at) \
         values ($1, $2, $3, $4, $4) returning {COLUMNS}"
    );
    let now = now();
    dispatch!(db, pool => sqlx::query_as::<_, User>(&sql)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(now)
        .fetch_one(pool)
        .await)
}

/// Seeds a user with a fixed id (seed data keeps its ids so walkthroughs can use 1, 2, ...).
/// Returns false when the id or a unique value is already taken.
pub async fn insert_with_id(db: &Db, id: i64, fields: &UserFields) -> sqlx::Result<bool> {
    let sql = "insert into users (id, username, email, name, created_at, updated_at) \
               values ($1, $2, $3, $4, $5, $5) on conflict do nothing";
    let now = now();
    let inserted = dispatch!(db, pool => sqlx::query(sql)
        .bind(id)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    kit::db::sync_identity(db, "users").await?;
    Ok(inserted == 1)
}

#[tracing::instrument(skip(db))]
pub async fn find(db: &Db, id: i64) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where id = $1");
    dispatch!(db, pool => sqlx::query_as::<_, User>(&sql).bind(id).fetch_optional(pool).await)
}

/// The user with this username (usernames are unique).
#[tracing::instrument(skip(db))]
pub async fn find_by_username(db: &Db, username: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where username = $1");
    dispatch!(db, pool => sqlx::query_as::<_, User>(&sql).bind(username).fetch_optional(pool).await)
}

/// The oldest user with this name (names are not unique).
#[tracing::instrument(skip(db))]
pub async fn find_by_name(db: &Db, name: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where name = $1 order by id limit 1");
    dispatch!(db, pool => sqlx::query_as::<_, User>(&sql).bind(name).fetch_optional(pool).await)
}

/// One page in id order (stable across pages), and the total count.
#[tracing::instrument(skip(db))]
pub async fn list(db: &Db, limit: i64, offset: i64) -> sqlx::Result<(Vec<User>, i64)> {
    let sql = format!("select {COLUMNS} from users order by id limit $1 offset $2");
    let users = dispatch!(db, pool => sqlx::query_as::<_, User>(&sql)
        .bind(limit)
        .bind(offset)
        .fetch_all(pool)
        .await)?;
    let total = count(db).await?;
    Ok((users, total))
}

pub async fn count(db: &Db) -> sqlx::Result<i64> {
    dispatch!(db, pool => sqlx::query_scalar::<_, i64>("select count(*) from users").fetch_one(pool).await)
}

/// Changes the given fields; `None` when there is no such user.
#[tracing::instrument(skip_all, fields(id))]
pub async fn update(db: &Db, id: i64, fields: &UserFields) -> sqlx::Result<Option<User>> {
    let sql = format!(
        "update users set username = coalesce($1, username), email = coalesce($2, email), \
         name = coalesce($3, name), updated_at = $4 where id = $5 returning {COLUMNS}"
    );
    let now = now();
    dispatch!(db, pool => sqlx::query_as::<_, User>(&sql)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(now)
        .bind(id)
        .fetch_optional(pool)
        .await)
}

/// True when a user was deleted.
#[tracing::instrument(skip(db))]
pub async fn delete(db: &Db, id: i64) -> sqlx::Result<bool> {
    let affected = dispatch!(db, pool => sqlx::query("delete from users where id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(affected == 1)
}
