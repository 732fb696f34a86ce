//! HTTP handlers. `GET /orders/{id}` goes through the cache (invalidated by every change, the
//! worker's too: it shares this service's cache namespace); lists are read from the database.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use bytes::Bytes;
use kit::http::{Json, Path, Query, RawJson};
use kit::page::Pagination;
use kit::{ApiError, Db, FieldError, Ttl};
use serde::Deserialize;
use utoipa::OpenApi;

use kit::auth::Identity;

use crate::AppState;
use crate::create;
use crate::domain::{CreateBody, Id, ListQuery, Order, Status, StatusBody};
use crate::error::{Error, Result};
use crate::store::{self, Moved};

/// The header naming a retry-safe request.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Longest idempotency key accepted.
const MAX_KEY_CHARS: usize = 200;

pub fn item_key(id: i64) -> String {
    kit::cache::item_key("order", id)
}

/// The service's API.
#[derive(OpenApi)]
#[openapi(
    info(title = "orders", description = "Agora's orders: validated orders, processed asynchronously."),
    paths(list_orders, create_order, get_order, change_status, cancel_order, get_stats),
    tags((name = "orders"))
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    kit::openapi::finish_service(ApiDoc::openapi(), "/api/v1/orders/stats")
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/orders", get(list_orders).post(create_order))
        .route("/api/v1/orders/stats", get(get_stats))
        .route("/api/v1/orders/{id}", get(get_order))
        .route("/api/v1/orders/{id}/status", patch(change_status))
        .route("/api/v1/orders/{id}/cancel", post(cancel_order))
        .route("/api/v1/stats", get(get_stats))
        .with_state(state)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.trim().is_empty() && key.len() <= MAX_KEY_CHARS => {
            Ok(Some(key.trim().to_owned()))
        }
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters"),
        )
        .into()),
    }
}

/// Who may see and change an order: through the gateway a signed-in user sees only their own
/// orders (another's is a 404, as if it did not exist); an admin, or a caller without an
/// identity (`open` mode, other services), sees every order.
fn visible_to(identity: Option<&Identity>, user_id: i64) -> bool {
    identity.is_none_or(|i| i.is_admin() || i.user_id == user_id)
}

/// Places an order: stock is reserved at catalog, the order is stored `pending` and processed
/// asynchronously by the worker. Every seed's body is accepted.
#[utoipa::path(
    post,
    path = "/api/v1/orders",
    tag = "orders",
    params(("idempotency-key" = Option<String>, Header,
        description = "Retry-safe: the same key (and body) answers the first answer again, \
            with `idempotent-replayed: true`; 1 to 200 characters")),
    request_body(content = CreateBody, examples(
        ("seed 001" = (summary = "one product by id, with the client's total (seed 001)",
            value = json!({"user_id": 1, "product_id": 2, "quantity": 2, "total_price": 1998.00}))),
        ("seed 002" = (summary = "one product by name (seed 002, at /orders)",
            value = json!({"user_id": 1, "item": "Pro Keyboard", "quantity": 2}))),
        ("seed 003" = (summary = "lines, ids as strings (seed 003; with a token `user_id` may be left out)",
            value = json!({"user_id": 1, "items": [{"product_id": "123", "quantity": 2}]}))),
    )),
    responses(
        (status = 201, description = "Accepted (`pending`); `Location` names it", body = Order,
            headers(("location" = String, description = "`/api/v1/orders/{id}`"))),
        (status = 403, description = "A user ordering for someone else (`forbidden`)"),
        (status = 409, description = "Not enough stock (`insufficient_stock`), or the key's first request is still running (`idempotency_key_in_progress`)"),
        (status = 422, description = "Invalid fields, an unknown user or product (`validation_failed`), or a key reused with another body (`idempotency_key_reused`)"),
        (status = 503, description = "The database, catalog or users is unavailable (`dependency_unavailable`, with `Retry-After`)"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn create_order(
    State(state): State<AppState>,
    identity: Option<Identity>,
    headers: HeaderMap,
    Json(mut body): Json<CreateBody>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    // A user orders for themselves (an admin may order for anyone); with a token, `user_id` may
    // be left out. Keys are the caller's own: two users' "order-1" are two keys.
    let caller = identity.filter(|i| !i.is_admin()).map(|i| i.user_id);
    if body.user_id.is_none() {
        body.user_id = identity.map(|i| Id(i.user_id));
    }
    let key = match (key, identity) {
        (Some(key), Some(identity)) => Some(format!("{}:{key}", identity.user_id)),
        (key, _) => key,
    };
    let order = body.validate(caller).map_err(Error::Invalid)?;
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok());
    let answer = create::create(&state, order, key.as_deref(), request_id).await?;
    // A replayed 201 names its order too (the stored body has its id).
    let id = answer.order_id.or_else(|| {
        serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|body| body["id"].as_i64())
    });
    let content_type = if answer.status.is_success() {
        "application/json"
    } else {
        kit::error::PROBLEM_JSON
    };
    let mut response = (
        answer.status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        answer.body,
    )
        .into_response();
    if answer.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if answer.status == StatusCode::CREATED
        && let Some(id) = id
        && let Ok(location) = HeaderValue::from_str(&format!("/api/v1/orders/{id}"))
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// One page of orders, newest first; a signed-in user lists only their own.
#[utoipa::path(
    get,
    path = "/api/v1/orders",
    tag = "orders",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = kit::page::Page<Order>),
        (status = 422, description = "A filter out of range (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn list_orders(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Query(filter): Query<ListQuery>,
) -> Result<Json<kit::page::Page<Order>>> {
    let page = Pagination::new(filter.page, filter.per_page)?;
    // A user lists their own orders; asking for another's finds none.
    let user_id = match identity.filter(|i| !i.is_admin()) {
        Some(me) if filter.user_id.is_some_and(|asked| asked != me.user_id) => {
            return Ok(Json(page.page(Vec::new(), 0)));
        }
        Some(me) => Some(me.user_id),
        None => filter.user_id,
    };
    let (orders, total) = store::list(
        &state.db,
        user_id,
        filter.status,
        page.limit(),
        page.offset(),
    )
    .await?;
    Ok(Json(page.page(orders, total)))
}

#[derive(Deserialize)]
struct Owner {
    user_id: i64,
}

/// One order (cached); another user's order is 404.
#[utoipa::path(
    get,
    path = "/api/v1/orders/{id}",
    tag = "orders",
    params(("id" = i64, Path, example = 1)),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 404, description = "No such order, or another user's (`order_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_order(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<i64>,
) -> Result<RawJson> {
    let db = state.db.clone();
    let bytes = state
        .cache
        .get_or_load(&item_key(id), Ttl::Item, move || load(db, id))
        .await?
        .ok_or(Error::NotFound(id))?;
    if identity.is_some() {
        let owner: Owner = serde_json::from_slice(&bytes).map_err(anyhow::Error::from)?;
        if !visible_to(identity.as_ref(), owner.user_id) {
            return Err(Error::NotFound(id));
        }
    }
    Ok(RawJson(bytes))
}

async fn load(db: Db, id: i64) -> anyhow::Result<Option<Bytes>> {
    let order = store::find(&db, id).await.map_err(into_anyhow)?;
    order.map(|o| kit::cache::json_bytes(&o)).transpose()
}

fn into_anyhow(err: Error) -> anyhow::Error {
    match err {
        Error::Database(err) => err.into(),
        Error::Internal(err) => err,
        other => anyhow::anyhow!("{other}"),
    }
}

/// Moves an order along its state machine (pending → processing → processed → shipped →
/// completed; failed; cancelled): for admins, the worker and other services.
#[utoipa::path(
    patch,
    path = "/api/v1/orders/{id}/status",
    tag = "orders",
    params(("id" = i64, Path, description = "Seeded order 3 is `shipped`", example = 3)),
    request_body(content = StatusBody, examples(
        ("complete" = (summary = "a shipped order completed", value = json!({"status": "completed"}))),
    )),
    responses(
        (status = 200, description = "The order, moved (or already there)", body = Order),
        (status = 403, description = "A user may only cancel (`forbidden`)"),
        (status = 404, description = "No such order (`order_not_found`)"),
        (status = 409, description = "Not allowed from its status (`invalid_transition`, the allowed ones in `errors`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn change_status(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<i64>,
    Json(body): Json<StatusBody>,
) -> Result<Json<Order>> {
    may_change(&state, identity.as_ref(), id, body.status).await?;
    let reason = body
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    if reason.is_some_and(|r| r.chars().count() > 500) {
        return Err(Error::Invalid(vec![FieldError::new(
            "reason",
            "too_long",
            "at most 500 characters",
        )]));
    }
    let order = move_to(&state, id, body.status, reason).await?;
    Ok(Json(order))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelBody {
    reason: Option<String>,
}

/// Cancels an order (its reserved stock is released); the body is optional.
#[utoipa::path(
    post,
    path = "/api/v1/orders/{id}/cancel",
    tag = "orders",
    params(("id" = i64, Path, description = "Seeded order 4 is `pending`", example = 4)),
    request_body(content = Option<CancelBody>, examples(
        ("with a reason" = (summary = "why", value = json!({"reason": "changed my mind"}))),
    )),
    responses(
        (status = 200, description = "The order, cancelled", body = Order),
        (status = 404, description = "No such order, or another user's (`order_not_found`)"),
        (status = 409, description = "Too late to cancel (`invalid_transition`)"),
    )
)]
#[tracing::instrument(skip_all, fields(id))]
pub(crate) async fn cancel_order(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<Json<Order>> {
    may_change(&state, identity.as_ref(), id, Status::Cancelled).await?;
    // The body is optional: `{"reason": "..."}` or nothing at all.
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            Error::Invalid(vec![FieldError::new(
                "body",
                "invalid",
                format!("expected {{\"reason\": \"...\"}} or no body: {err}"),
            )])
        })?
    };
    let reason = body.reason;
    let reason = reason.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let order = move_to(
        &state,
        id,
        Status::Cancelled,
        reason.or(Some("cancelled by request")),
    )
    .await?;
    Ok(Json(order))
}

/// A signed-in user may cancel their own order, and nothing else: moving an order along
/// (processing, shipped, ...) is for the worker, admins and other services. Another user's order
/// is a 404.
async fn may_change(
    state: &AppState,
    identity: Option<&Identity>,
    id: i64,
    to: Status,
) -> Result<()> {
    let Some(me) = identity.filter(|i| !i.is_admin()) else {
        return Ok(());
    };
    let order = store::find(&state.db, id)
        .await?
        .ok_or(Error::NotFound(id))?;
    if order.user_id != me.user_id {
        return Err(Error::NotFound(id));
    }
    if to != Status::Cancelled {
        return Err(kit::auth::forbidden(
            "A user may cancel their own order; other changes are for admins",
        )
        .into());
    }
    Ok(())
}

/// Moves the order (its event in the same transaction); the worker settles its stock.
pub async fn move_to(state: &AppState, id: i64, to: Status, reason: Option<&str>) -> Result<Order> {
    let mut tx = state.db.begin().await?;
    let moved = store::transition(&mut tx, id, to, reason).await?;
    tx.commit().await?;
    let order = match moved {
        Moved::Now(order) => {
            state.cache.invalidate(&[item_key(id)]).await;
            state.outbox.notify();
            order
        }
        Moved::Already(order) => order,
    };
    Ok(*order)
}

/// Counts by status, accepted → processed latency over the last 1,000 processed orders, the
/// worker's jobs (queued, running, stock to settle, dead-lettered) and the outbox backlog (`/api/v1/orders/stats`, `/api/v1/stats`).
#[utoipa::path(
    get,
    path = "/api/v1/orders/stats",
    tag = "orders",
    responses((status = 200, description = "Counts and latencies", body = Object, example = json!({
        "service": "orders", "database": "sqlite", "orders": 8,
        "by_status": {"pending": 2, "processing": 2, "processed": 0, "shipped": 1,
            "completed": 3, "failed": 0, "cancelled": 0},
        "worker": {"queued": 2, "running": 2, "stock_to_settle": 0, "dead_lettered": 0},
        "processing_latency_ms": {"window": 0, "p50": null, "p99": null},
        "outbox_backlog": 0, "cache": {"hits": 0, "misses": 0}})))
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let counts = store::counts(&state.db).await?;
    let mut latencies = store::recent_latencies(&state.db, 1000).await?;
    latencies.sort_unstable();
    let quantile = |q: f64| -> Option<i64> {
        if latencies.is_empty() {
            return None;
        }
        let rank = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(rank).copied()
    };
    let mut by_status = serde_json::Map::new();
    for status in Status::ALL {
        by_status.insert(status.as_str().to_owned(), 0.into());
    }
    let mut total = 0;
    for (status, count) in counts {
        total += count;
        by_status.insert(status, count.into());
    }
    let backlog = kit::outbox::backlog(&state.db).await?;
    let dead_lettered: i64 =
        kit::db::query("select count(*) from dead_letters where consumer = $1")
            .bind(crate::worker::CONSUMER)
            .fetch_scalar(&state.db)
            .await?;
    let unsettled: i64 = kit::db::query("select count(*) from orders where not stock_settled")
        .fetch_scalar(&state.db)
        .await?;
    let jobs = serde_json::json!({
        "queued": by_status.get("pending").cloned().unwrap_or_default(),
        "running": by_status.get("processing").cloned().unwrap_or_default(),
        "stock_to_settle": unsettled,
        "dead_lettered": dead_lettered,
    });
    Ok(Json(serde_json::json!({
        "service": crate::NAME,
        "database": state.db.backend(),
        "orders": total,
        "by_status": by_status,
        "worker": jobs,
        "processing_latency_ms": {
            "window": latencies.len(),
            "p50": quantile(0.50),
            "p99": quantile(0.99),
        },
        "outbox_backlog": backlog,
        "cache": state.cache.stats(),
    })))
}
