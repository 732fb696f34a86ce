//! HTTP handlers. Reads go through the cache (items 300 s, lists and lookups 60 s); every write
//! invalidates the item, every list page and every lookup it could change, after it commits.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use kit::db::ResultExt as _;
use kit::http::{Json, Path, Query, RawJson};
use kit::page::Pagination;
use kit::{Cache, Db, Ttl};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::domain::{CreateUserBody, UpdateUserBody, User, UserFields};
use crate::error::{Error, Result};
use crate::{AppState, store};

/// Cache group of every list page.
const LIST_GROUP: &str = "list";
/// Cache group of lookups by username and by name.
const LOOKUP_GROUP: &str = "lookup";

fn item_key(id: i64) -> String {
    kit::cache::item_key("user", id)
}

/// The service's API, from the handlers below and in [`crate::accounts`].
#[derive(OpenApi)]
#[openapi(
    info(title = "users", description = "Agora's users service: accounts and lookups."),
    paths(
        list_users, create_user, get_user, update_user, delete_user, get_user_by_username,
        get_user_by_name, get_stats, crate::accounts::register, crate::accounts::login,
        crate::accounts::get_me,
    ),
    tags((name = "users"), (name = "accounts"))
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    let mut doc = kit::openapi::finish_service(ApiDoc::openapi(), "/api/v1/users/stats");
    kit::openapi::alias(
        &mut doc,
        "/api/v1/users/{id}",
        "/api/v1/users/id/{id}",
        &["get"],
        "_id_path",
    );
    doc
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/users", get(list_users).post(create_user))
        .route("/api/v1/users/stats", get(get_stats))
        .route(
            "/api/v1/users/{id}",
            get(get_user)
                .put(update_user)
                .patch(update_user)
                .delete(delete_user),
        )
        .route("/api/v1/users/id/{id}", get(get_user))
        .route(
            "/api/v1/users/username/{username}",
            get(get_user_by_username),
        )
        .route("/api/v1/users/name/{name}", get(get_user_by_name))
        .route("/api/v1/stats", get(get_stats))
        .with_state(state)
}

/// A 409 naming the field when a write hits a unique constraint.
pub(crate) fn on_unique<T>(
    result: sqlx::Result<T>,
    fields: &crate::domain::UserFields,
) -> Result<T> {
    let taken = |field: &'static str, value: &Option<String>| Error::Taken {
        field,
        value: value.clone().unwrap_or_default(),
    };
    result
        .on_constraint("users_username_key", || taken("username", &fields.username))
        .on_constraint("users_email_key", || taken("email", &fields.email))
}

pub(crate) async fn invalidate_after_write(state: &AppState, id: Option<i64>) {
    invalidate(&state.cache, id).await;
}

async fn invalidate(cache: &Cache, id: Option<i64>) {
    // Item and groups in one call: one atomic round trip on Redis.
    let mut keys = vec![LIST_GROUP.to_owned(), LOOKUP_GROUP.to_owned()];
    keys.extend(id.map(item_key));
    cache.invalidate(&keys).await;
}

/// The writer of new users (`POST /api/v1/users`): the creates that arrive together are inserted
/// in one statement, then invalidate the lists once ([`kit::batch`]).
pub(crate) type Creates = kit::batch::Batcher<UserFields, Result<User>>;

pub(crate) fn creates(db: Db, cache: Cache) -> Creates {
    let flushers = kit::batch::flushers_for(&db);
    kit::batch::Batcher::new(flushers, CREATES_PER_STATEMENT, move |fields| {
        insert_batch(db.clone(), cache.clone(), fields)
    })
}

/// The most new users one statement inserts.
const CREATES_PER_STATEMENT: usize = 64;

/// One statement for the whole batch. When it fails (a username or email already taken, most
/// likely), each user is inserted on its own, so each request gets its own answer and the others
/// are not held up by one conflict.
async fn insert_batch(db: Db, cache: Cache, fields: Vec<UserFields>) -> Vec<Result<User>> {
    let db = &db;
    let results = kit::batch::together_or_alone(
        &fields,
        |all| async move {
            let users = store::insert_many(db, all).await.ok()?;
            Some(users.into_iter().map(Ok).collect())
        },
        |user| async move { on_unique(store::insert(db, user).await, user) },
    )
    .await;
    if results.iter().any(Result::is_ok) {
        invalidate(&cache, None).await;
    }
    results
}

/// The reader of users by id (`GET /api/v1/users/{id}` on a cache miss): the ids asked for
/// together are read in one statement ([`kit::batch`]).
pub(crate) type Finds = kit::batch::Batcher<i64, sqlx::Result<Option<User>>>;

pub(crate) fn finds(db: Db) -> Finds {
    kit::batch::Batcher::for_reads(kit::batch::READ_BATCHES, FINDS_PER_STATEMENT, move |ids| {
        find_batch(db.clone(), ids)
    })
}

/// The most ids one statement reads.
const FINDS_PER_STATEMENT: usize = 64;

/// One statement for the whole batch; when it fails, each id is read on its own, so each request
/// gets its own error (a lost connection is retried per read, an outage is each one's 503).
async fn find_batch(db: Db, ids: Vec<i64>) -> Vec<sqlx::Result<Option<User>>> {
    let db = &db;
    kit::batch::together_or_alone(
        &ids,
        |all| async move {
            let users = store::find_many(db, all).await.ok()?;
            let found = kit::batch::by_key(all, users, |user| user.id);
            Some(found.into_iter().map(Ok).collect())
        },
        |id| store::find(db, *id),
    )
    .await
}

/// Creates a user. Every seed's body is accepted: `{name}`, `{username, email}`,
/// `{email, full_name}`, `{name, email}`; unknown fields are refused.
#[utoipa::path(
    post,
    path = "/api/v1/users",
    tag = "users",
    request_body(content = CreateUserBody, examples(
        ("seed 004" = (summary = "name and email (seed 004)",
            value = json!({"name": "Alice Smith", "email": "alice@example.com"}))),
        ("seed 001" = (summary = "username and email (seed 001)",
            value = json!({"username": "bob", "email": "bob@example.com"}))),
        ("seed 002" = (summary = "email and full_name, an alias of name (seed 002, at /users)",
            value = json!({"email": "carol@example.com", "full_name": "Carol"}))),
        ("seed 000" = (summary = "a name alone (seed 000)", value = json!({"name": "Dave"}))),
    )),
    responses(
        (status = 201, description = "Created; `Location` names it", body = User,
            headers(("location" = String, description = "`/api/v1/users/{id}`"))),
        (status = 409, description = "The username or email is taken (`username_taken`, `email_taken`)"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn create_user(
    State(state): State<AppState>,
    Json(body): Json<CreateUserBody>,
) -> Result<Response> {
    let fields = body.validate_new().map_err(Error::Invalid)?;
    let user = state
        .creates
        .submit(fields)
        .await
        .map_err(anyhow::Error::from)??;
    let location = HeaderValue::from_str(&format!("/api/v1/users/{}", user.id))
        .map_err(anyhow::Error::from)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(user),
    )
        .into_response())
}

/// One user (cached).
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}",
    tag = "users",
    params(("id" = i64, Path, description = "The user's id", example = 1)),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "No such user (`user_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_user(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<RawJson> {
    user_json(&state, id).await
}

/// User `id` as JSON, through the item cache.
pub(crate) async fn user_json(state: &AppState, id: i64) -> Result<RawJson> {
    let loader = state.clone();
    let cached = state
        .cache
        .get_or_load(&item_key(id), Ttl::Item, move || {
            load_one(loader, Lookup::Id(id))
        })
        .await?;
    cached
        .map(RawJson)
        .ok_or_else(|| Error::NotFound(format!("with id {id}")))
}

/// The user with this username.
#[utoipa::path(
    get,
    path = "/api/v1/users/username/{username}",
    tag = "users",
    params(("username" = String, Path, example = "bob")),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "Nobody has it (`user_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_user_by_username(
    State(state): State<AppState>,
    Path(username): Path<String>,
) -> Result<RawJson> {
    lookup(&state, Lookup::Username(username)).await
}

/// The oldest user with this name (seed 000's `/users/name/{name}`).
#[utoipa::path(
    get,
    path = "/api/v1/users/name/{name}",
    tag = "users",
    params(("name" = String, Path, example = "Dave")),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "Nobody has it (`user_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_user_by_name(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<RawJson> {
    lookup(&state, Lookup::Name(name)).await
}

/// A lookup by username or name, cached in the lookup group (any write invalidates it, since a
/// rename or a delete can change which user a name finds).
async fn lookup(state: &AppState, lookup: Lookup) -> Result<RawJson> {
    let (field, not_found) = match &lookup {
        Lookup::Username(u) => (format!("username:{u}"), format!("with username `{u}`")),
        Lookup::Name(n) => (format!("name:{n}"), format!("named `{n}`")),
        Lookup::Id(id) => (format!("id:{id}"), format!("with id {id}")),
    };
    let loader = state.clone();
    let cached = state
        .cache
        .get_or_load_in(LOOKUP_GROUP, &field, Ttl::List, move || {
            load_one(loader, lookup)
        })
        .await?;
    cached.map(RawJson).ok_or(Error::NotFound(not_found))
}

enum Lookup {
    Id(i64),
    Username(String),
    Name(String),
}

async fn load_one(state: AppState, lookup: Lookup) -> anyhow::Result<Option<Bytes>> {
    let db = &state.db;
    let user = match lookup {
        Lookup::Id(id) => state.finds.submit(id).await??,
        Lookup::Username(username) => store::find_by_username(db, &username).await?,
        Lookup::Name(name) => store::find_by_name(db, &name).await?,
    };
    user.as_ref().map(kit::cache::json_bytes).transpose()
}

/// `?page=` (from 1) and `?per_page=` (1 to 100, default 20).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// From 1 (at most 10,000).
    #[param(example = 1, minimum = 1, maximum = 10000)]
    page: Option<u32>,
    /// 1 to 100, default 20.
    #[param(example = 20, minimum = 1, maximum = 100)]
    per_page: Option<u32>,
}

/// One page of users, in id order.
#[utoipa::path(
    get,
    path = "/api/v1/users",
    tag = "users",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = kit::page::Page<User>),
        (status = 422, description = "`page` or `per_page` out of range (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<RawJson> {
    let pagination = Pagination::new(query.page, query.per_page)?;
    let db = state.db.clone();
    let page = state
        .cache
        .list_json(LIST_GROUP, &pagination.cache_field(), move || async move {
            let items = store::list(&db, pagination.limit(), pagination.offset()).await?;
            let total = store::count(&db).await?;
            Ok(pagination.page(items, total))
        })
        .await?;
    Ok(RawJson(page))
}

/// Changes the fields given (absent or `null` ones keep their value; `PUT` is partial too, as
/// seed 004 uses it).
#[utoipa::path(
    method(put, patch),
    path = "/api/v1/users/{id}",
    tag = "users",
    params(("id" = i64, Path, example = 1)),
    request_body(content = UpdateUserBody, examples(
        ("seed 004" = (summary = "a new name (seed 004)", value = json!({"name": "Alice Updated"}))),
    )),
    responses(
        (status = 200, description = "The changed user", body = User),
        (status = 404, description = "No such user (`user_not_found`)"),
        (status = 409, description = "The username or email is taken"),
    )
)]
#[tracing::instrument(skip(state, body))]
pub(crate) async fn update_user(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Json(body): Json<UpdateUserBody>,
) -> Result<Json<User>> {
    let fields = body.validate_update().map_err(Error::Invalid)?;
    let user = on_unique(store::update(&state.db, id, &fields).await, &fields)?;
    let user = user.ok_or_else(|| Error::NotFound(format!("with id {id}")))?;
    invalidate_after_write(&state, Some(id)).await;
    Ok(Json(user))
}

/// Deletes the user.
#[utoipa::path(
    delete,
    path = "/api/v1/users/{id}",
    tag = "users",
    params(("id" = i64, Path, example = 1)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such user (`user_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn delete_user(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    if !store::delete(&state.db, id).await? {
        return Err(Error::NotFound(format!("with id {id}")));
    }
    invalidate_after_write(&state, Some(id)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Counts and cache counters (`/api/v1/users/stats`, `/api/v1/stats`).
#[utoipa::path(
    get,
    path = "/api/v1/users/stats",
    tag = "users",
    responses((status = 200, description = "Counts", body = Object, example = json!({
        "service": "users", "database": "sqlite", "users": 4, "password_verifications": 0,
        "cache": {"hits": 10, "misses": 2}})))
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let total = store::count(&state.db).await?;
    Ok(Json(serde_json::json!({
        "service": crate::NAME,
        "database": state.db.backend(),
        "users": total,
        // Every login verifies one hash, whether its email exists or not.
        "password_verifications": state.hasher.verifications(),
        "cache": state.cache.stats(),
    })))
}
