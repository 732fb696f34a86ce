//! HTTP handlers. Through the gateway a signed-in user sees only the deliveries about them
//! (another's is a 404, as if it did not exist); an admin, or a caller without an identity
//! (`open` mode, other services), sees them all.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use kit::auth::Identity;
use kit::http::{Json, Path, Query};
use kit::page::{Page, Pagination};
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::AppState;
use crate::error::{Error, Result};
use crate::store::{self, Notification};

/// The service's API.
#[derive(OpenApi)]
#[openapi(
    info(title = "notify", description = "Agora's notifications: domain events delivered by log, SMTP or webhook, every delivery recorded and retryable."),
    paths(list_notifications, get_notification, retry_notification, get_stats),
    tags((name = "notifications"))
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    kit::openapi::finish_service(ApiDoc::openapi(), "/api/v1/notifications/stats")
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/notifications", get(list_notifications))
        .route("/api/v1/notifications/stats", get(get_stats))
        .route("/api/v1/notifications/{id}", get(get_notification))
        .route("/api/v1/notifications/{id}/retry", post(retry_notification))
        .route("/api/v1/stats", get(get_stats))
        .with_state(state)
}

/// A delivery's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Sent,
    Failed,
}

impl Status {
    const ALL: [Status; 3] = [Status::Pending, Status::Sent, Status::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Failed => "failed",
        }
    }
}

/// `GET /api/v1/notifications` filters.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only the deliveries about this user (a signed-in user sees only their own).
    user_id: Option<i64>,
    /// Only the deliveries in this state.
    #[param(inline)]
    status: Option<Status>,
    /// From 1 (at most 10,000).
    #[param(example = 1, minimum = 1, maximum = 10000)]
    page: Option<u32>,
    /// 1 to 100, default 20.
    #[param(example = 20, minimum = 1, maximum = 100)]
    per_page: Option<u32>,
}

/// The user whose deliveries the caller may see: `None` for all (admins, callers without an
/// identity), `Some(id)` for a signed-in user.
fn own_scope(identity: Option<&Identity>) -> Option<i64> {
    identity.filter(|i| !i.is_admin()).map(|i| i.user_id)
}

fn visible_to(identity: Option<&Identity>, n: &Notification) -> bool {
    own_scope(identity).is_none_or(|me| n.user_id == Some(me))
}

/// One page of deliveries, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/notifications",
    tag = "notifications",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = kit::page::Page<Notification>),
        (status = 422, description = "`page` or `per_page` out of range (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn list_notifications(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Query(filter): Query<ListQuery>,
) -> Result<Json<Page<Notification>>> {
    let page = Pagination::new(filter.page, filter.per_page)?;
    let user_id = match own_scope(identity.as_ref()) {
        // Asking for another user's finds none.
        Some(me) if filter.user_id.is_some_and(|asked| asked != me) => {
            return Ok(Json(page.page(Vec::new(), 0)));
        }
        Some(me) => Some(me),
        None => filter.user_id,
    };
    let (items, total) = store::list(
        &state.db,
        user_id,
        filter.status.map(Status::as_str),
        page.limit(),
        page.offset(),
    )
    .await?;
    Ok(Json(page.page(items, total)))
}

async fn visible(state: &AppState, identity: Option<&Identity>, id: i64) -> Result<Notification> {
    match store::find(&state.db, id).await? {
        Some(n) if visible_to(identity, &n) => Ok(n),
        _ => Err(Error::NotFound(id)),
    }
}

/// One delivery (another user's is a 404 to a signed-in user).
#[utoipa::path(
    get,
    path = "/api/v1/notifications/{id}",
    tag = "notifications",
    params(("id" = i64, Path, description = "The delivery's id", example = 1)),
    responses(
        (status = 200, description = "The delivery", body = Notification),
        (status = 404, description = "No such delivery (`notification_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn get_notification(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<i64>,
) -> Result<Json<Notification>> {
    Ok(Json(visible(&state, identity.as_ref(), id).await?))
}

/// A failed delivery is made pending again with a new round of tries (202: it is sent in the
/// background); any other is 409 `not_failed`.
#[utoipa::path(
    post,
    path = "/api/v1/notifications/{id}/retry",
    tag = "notifications",
    params(("id" = i64, Path, description = "The failed delivery's id", example = 1)),
    responses(
        (status = 202, description = "Pending again, sent in the background", body = Notification),
        (status = 404, description = "No such delivery (`notification_not_found`)"),
        (status = 409, description = "The delivery has not failed (`not_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn retry_notification(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<i64>,
) -> Result<(StatusCode, Json<Notification>)> {
    let n = visible(&state, identity.as_ref(), id).await?;
    if !store::retry(&state.db, id).await? {
        let status = store::find(&state.db, id)
            .await?
            .map_or(n.status, |now| now.status);
        return Err(Error::NotFailed { id, status });
    }
    state.wake.notify_one();
    let n = store::find(&state.db, id)
        .await?
        .ok_or(Error::NotFound(id))?;
    Ok((StatusCode::ACCEPTED, Json(n)))
}

/// Counts by status and by channel (a signed-in user's own), the age of the oldest pending
/// delivery and the consumer's dead letters (`/api/v1/notifications/stats`, `/api/v1/stats`).
#[utoipa::path(
    get,
    path = "/api/v1/notifications/stats",
    tag = "notifications",
    responses((status = 200, description = "Counts", body = Object, example = json!({
        "service": "notify", "database": "sqlite", "notifications": 3,
        "by_status": {"pending": 0, "sent": 2, "failed": 1},
        "by_channel": {"log": {"pending": 0, "sent": 2, "failed": 1}},
        "oldest_pending_secs": null, "dead_letters": 0})))
)]
#[tracing::instrument(skip(state))]
async fn get_stats(
    State(state): State<AppState>,
    identity: Option<Identity>,
) -> Result<Json<serde_json::Value>> {
    let scope = own_scope(identity.as_ref());
    let counts = store::counts(&state.db, scope).await?;
    let mut by_status = serde_json::Map::new();
    for status in Status::ALL {
        by_status.insert(status.as_str().to_owned(), 0.into());
    }
    let mut by_channel = serde_json::Map::new();
    let mut total = 0;
    for (channel, status, count) in counts {
        total += count;
        if let Some(n) = by_status.get_mut(&status) {
            *n = (n.as_i64().unwrap_or(0) + count).into();
        }
        let entry = by_channel
            .entry(channel)
            .or_insert_with(|| serde_json::json!({"pending": 0, "sent": 0, "failed": 0}));
        entry[status.as_str()] = count.into();
    }
    let mut body = serde_json::json!({
        "service": crate::NAME,
        "database": state.db.backend(),
        "notifications": total,
        "by_status": by_status,
        "by_channel": by_channel,
    });
    if scope.is_none() {
        let oldest = store::oldest_pending(&state.db).await?;
        body["oldest_pending_secs"] = oldest
            .map(|t| (store::now() - t).num_seconds().max(0))
            .into();
        body["dead_letters"] = state.dead_letters.count().await?.into();
    }
    Ok(Json(body))
}
