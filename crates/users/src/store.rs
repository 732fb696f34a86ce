//! The users table: every query written once, in SQL that PostgreSQL and SQLite share, run on any
//! executor (the pool, or a transaction shared with other helpers; see `kit::db`).

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::Db;
use kit::db::{Dialect, Executor, query};

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

/// New users in one statement (one commit), returned in `fields`' order. The users go as one
/// JSON array, so the statement has the same text (one prepared statement) however many there
/// are. Any unique value already taken fails the whole statement; [`crate::routes`] then
/// inserts them one at a time to say which.
#[tracing::instrument(skip_all, fields(users = fields.len()))]
pub async fn insert_many(db: &Db, fields: &[UserFields]) -> sqlx::Result<Vec<User>> {
    let rows = serde_json::to_string(fields).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let sql = match db.dialect() {
        Dialect::Postgres => &*INSERT_MANY_PG,
        Dialect::Sqlite => &*INSERT_MANY_SQLITE,
    };
    let mut users: Vec<User> = query(sql).bind(rows).bind(now()).fetch_all(db).await?;
    // Ids are handed out in the order the rows are read (a sequence, or SQLite's rowid),
    // whatever order RETURNING lists them in (SQLite leaves it unspecified).
    users.sort_unstable_by_key(|user| user.id);
    Ok(users)
}

static INSERT_MANY_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "insert into users (username, email, name, created_at, updated_at) \
         select u.username, u.email, u.name, $2, $2 \
         from jsonb_to_recordset($1::jsonb) as u(username text, email text, name text) \
         returning {COLUMNS}"
    )
});

static INSERT_MANY_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "insert into users (username, email, name, created_at, updated_at) \
         select json_extract(value, '$.username'), json_extract(value, '$.email'), \
         json_extract(value, '$.name'), $2, $2 from json_each($1) order by key \
         returning {COLUMNS}"
    )
});

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

/// The users with these ids, in no particular order (an id without a user is left out). One
/// statement whatever the count: the ids go as one array literal on PostgreSQL, one JSON array
/// on SQLite.
#[tracing::instrument(skip_all, fields(ids = ids.len()))]
pub async fn find_many(db: &Db, ids: &[i64]) -> sqlx::Result<Vec<User>> {
    // Each id once (two requests for one user share its row).
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let (sql, list) = match db.dialect() {
        Dialect::Postgres => (&*FIND_MANY_PG, kit::db::id_array(&ids)),
        Dialect::Sqlite => (
            &*FIND_MANY_SQLITE,
            serde_json::to_string(&ids).map_err(|err| sqlx::Error::Encode(err.into()))?,
        ),
    };
    query(sql).bind(list).fetch_all(db).await
}

/// One primary-key lookup per id, whatever the table's size when the statement was prepared:
/// written as `where id = any($1)`, the plan PostgreSQL caches for a connection (a generic one,
/// after five runs) scans the whole table while it is small (1,000 users: 17 pages, 0.48 ms a
/// run against 0.13 for 16 lookups), and keeps doing so as the table grows. The lateral
/// subquery (`offset 0`: not merged into the join) leaves it one choice, an index lookup per id.
static FIND_MANY_PG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "select u.* from unnest($1::bigint[]) as k (id) \
         cross join lateral (select {COLUMNS} from users where users.id = k.id offset 0) as u"
    )
});

static FIND_MANY_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("select {COLUMNS} from users where id in (select value from json_each($1))")
});

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

#[cfg(test)]
mod tests {
    use kit::testing::{Backend, TestEnv};

    use super::*;

    /// Several users in one statement come back in the order they were given, each with its own
    /// fields, absent ones included.
    async fn a_batch_insert_returns_its_users_in_order(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("userstore").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let fields: Vec<UserFields> = (0..20)
            .map(|i| UserFields {
                username: (i % 3 == 0).then(|| format!("user{i}")),
                email: (i % 2 == 0).then(|| format!("u{i}@example.com")),
                name: Some(format!("User {i}")),
            })
            .collect();
        let users = insert_many(&db, &fields).await.expect("inserted");
        assert_eq!(users.len(), fields.len());
        for (user, fields) in users.iter().zip(&fields) {
            assert_eq!(
                (&user.username, &user.email, &user.name),
                (&fields.username, &fields.email, &fields.name),
            );
            assert_eq!(find(&db, user.id).await.expect("read").as_ref(), Some(user));
        }
        let taken = insert_many(&db, &fields[..2]).await;
        assert!(taken.is_err(), "a taken email fails the statement");
        assert_eq!(
            list(&db, 100, 0).await.expect("list").len(),
            20,
            "nothing half-written"
        );
        env.drop_kit_db("userstore", db).await;
    }

    /// Several ids in one statement: every user that exists, once, exactly as `find` reads
    /// it, and nothing for ids without a user.
    async fn a_batch_read_returns_the_users_that_exist(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("userfinds").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let fields: Vec<UserFields> = (0..5)
            .map(|i| UserFields {
                username: Some(format!("reader{i}")),
                email: None,
                name: Some(format!("Reader \"{i}\"")),
            })
            .collect();
        let users = insert_many(&db, &fields).await.expect("inserted");
        let mut ids: Vec<i64> = users.iter().map(|u| u.id).collect();
        ids.push(-1);
        ids.push(users[0].id + 1_000);
        ids.push(users[2].id);
        let mut found = find_many(&db, &ids).await.expect("read");
        found.sort_unstable_by_key(|u| u.id);
        assert_eq!(found, users);
        assert!(find_many(&db, &[]).await.expect("read none").is_empty());
        assert!(find_many(&db, &[-1]).await.expect("read").is_empty());
        env.drop_kit_db("userfinds", db).await;
    }

    kit::on_both_backends!(
        a_batch_insert_returns_its_users_in_order,
        a_batch_read_returns_the_users_that_exist,
    );
}
