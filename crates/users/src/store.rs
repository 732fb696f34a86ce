//! The users table: every query written once, in SQL that PostgreSQL and SQLite share, run on any
//! executor (the pool, or a transaction shared with other helpers; see `kit::db`).

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::db::{Executor, query};

use crate::domain::{Account, User, UserFields};

const COLUMNS: &str = "id, username, email, name, role, created_at, updated_at";

/// Timestamps at the precision both databases keep (microseconds), so what a write returns is
/// exactly what a later read returns.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[tracing::instrument(skip_all)]
pub async fn insert(ex: impl Executor<'_>, fields: &UserFields) -> sqlx::Result<User> {
    let sql = format!(
        "insert into users (username, email, name, created_at, updated_at) \
         values ($1, $2, $3, $4, $4) returning {COLUMNS}"
    );
    query(&sql)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(now())
        .fetch_one(ex)
        .await
}

/// New users in one statement (one commit), returned in `fields`' order. Any unique value
/// already taken fails the whole statement; [`crate::routes`] then inserts them one at a time to
/// say which.
#[tracing::instrument(skip_all, fields(users = fields.len()))]
pub async fn insert_many(ex: impl Executor<'_>, fields: &[UserFields]) -> sqlx::Result<Vec<User>> {
    // Three parameters per user, then the one timestamp they share.
    let stamp = 3 * fields.len() + 1;
    let rows: Vec<String> = (0..fields.len())
        .map(|i| {
            let n = 3 * i + 1;
            format!("(${n}, ${}, ${}, ${stamp}, ${stamp})", n + 1, n + 2)
        })
        .collect();
    let sql = format!(
        "insert into users (username, email, name, created_at, updated_at) values {} \
         returning {COLUMNS}",
        rows.join(", ")
    );
    let mut statement = query(&sql);
    for user in fields {
        statement = statement
            .bind(&user.username)
            .bind(&user.email)
            .bind(&user.name);
    }
    let mut users: Vec<User> = statement.bind(now()).fetch_all(ex).await?;
    // Ids are handed out in the order of the rows (a sequence, or SQLite's rowid), whatever
    // order RETURNING lists them in (SQLite leaves it unspecified).
    users.sort_unstable_by_key(|user| user.id);
    Ok(users)
}

/// A user with a password (`POST /api/v1/auth/register`, the seeded admin), with `role`.
#[tracing::instrument(skip_all)]
pub async fn insert_account(
    ex: impl Executor<'_>,
    fields: &UserFields,
    password_hash: &str,
    role: kit::auth::Role,
) -> sqlx::Result<User> {
    let sql = format!(
        "insert into users (username, email, name, password_hash, role, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $6) returning {COLUMNS}"
    );
    query(&sql)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(password_hash)
        .bind(role.as_str())
        .bind(now())
        .fetch_one(ex)
        .await
}

/// What login needs of the user with this (normalised) email.
#[tracing::instrument(skip_all)]
pub async fn find_account(ex: impl Executor<'_>, email: &str) -> sqlx::Result<Option<Account>> {
    query("select id, role, password_hash from users where email = $1")
        .bind(email)
        .fetch_optional(ex)
        .await
}

/// Seeds a user with a fixed id (seed data keeps its ids so walkthroughs can use 1, 2, ...).
/// Returns false when the id or a unique value is already taken.
pub async fn insert_with_id(
    ex: impl Executor<'_>,
    id: i64,
    fields: &UserFields,
) -> sqlx::Result<bool> {
    let inserted = query(
        "insert into users (id, username, email, name, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $5) on conflict do nothing",
    )
    .bind(id)
    .bind(&fields.username)
    .bind(&fields.email)
    .bind(&fields.name)
    .bind(now())
    .execute(ex)
    .await?;
    Ok(inserted == 1)
}

#[tracing::instrument(skip(ex))]
pub async fn find(ex: impl Executor<'_>, id: i64) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where id = $1");
    query(&sql).bind(id).fetch_optional(ex).await
}

/// The user with this username (usernames are unique).
#[tracing::instrument(skip(ex))]
pub async fn find_by_username(ex: impl Executor<'_>, username: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where username = $1");
    query(&sql).bind(username).fetch_optional(ex).await
}

/// The oldest user with this name (names are not unique).
#[tracing::instrument(skip(ex))]
pub async fn find_by_name(ex: impl Executor<'_>, name: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("select {COLUMNS} from users where name = $1 order by id limit 1");
    query(&sql).bind(name).fetch_optional(ex).await
}

/// One page in id order (stable across pages).
#[tracing::instrument(skip(ex))]
pub async fn list(ex: impl Executor<'_>, limit: i64, offset: i64) -> sqlx::Result<Vec<User>> {
    let sql = format!("select {COLUMNS} from users order by id limit $1 offset $2");
    query(&sql).bind(limit).bind(offset).fetch_all(ex).await
}

pub async fn count(ex: impl Executor<'_>) -> sqlx::Result<i64> {
    query("select count(*) from users").fetch_scalar(ex).await
}

/// Changes the given fields; `None` when there is no such user.
#[tracing::instrument(skip_all, fields(id))]
pub async fn update(
    ex: impl Executor<'_>,
    id: i64,
    fields: &UserFields,
) -> sqlx::Result<Option<User>> {
    let sql = format!(
        "update users set username = coalesce($1, username), email = coalesce($2, email), \
         name = coalesce($3, name), updated_at = $4 where id = $5 returning {COLUMNS}"
    );
    query(&sql)
        .bind(&fields.username)
        .bind(&fields.email)
        .bind(&fields.name)
        .bind(now())
        .bind(id)
        .fetch_optional(ex)
        .await
}

/// True when a user was deleted.
#[tracing::instrument(skip(ex))]
pub async fn delete(ex: impl Executor<'_>, id: i64) -> sqlx::Result<bool> {
    let deleted = query("delete from users where id = $1")
        .bind(id)
        .execute(ex)
        .await?;
    Ok(deleted == 1)
}
