//! HTTP handlers. Reads go through the cache (items 300 s, lists 60 s). A write commits its
//! events to the outbox in its own transaction, then invalidates the items it changed and every
//! list page, and wakes the outbox relay.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use kit::http::{Json, Path, Query, RawJson};
use kit::openapi::ServiceToken;
use kit::page::Pagination;
use kit::relay::Notifier;
use kit::{ApiError, FieldError};
use kit::{Cache, Db, Ttl};
use serde::Deserialize;
use utoipa::OpenApi;

use crate::AppState;
use crate::domain::{
    MAX_CATEGORY_CHARS, Product, ProductBody, Reservation, ReserveBody, ReserveRequest, StockBody,
    StockChange, generated_sku,
};
use crate::error::{Error, Result};
use crate::events::{self, Reason};
use crate::reservations::{self, Reserved};
use crate::store;

/// Cache group of every list page (all filters).
const LIST_GROUP: &str = "list";
/// Cache group of the category summary.
const CATEGORIES_GROUP: &str = "categories";

fn item_key(id: i64) -> String {
    kit::cache::item_key("product", id)
}

/// The service's API. The internal routes (reservations, the lookup by name) are for the orders
/// service, with the service credential: listed here, never in the gateway's document.
#[derive(OpenApi)]
#[openapi(
    info(title = "catalog", description = "Agora's catalog: products, categories, stock."),
    paths(
        list_products, create_product, get_product, update_product, delete_product,
        change_stock, list_categories, get_stats, reserve, get_reservation, commit_reservation,
        release_reservation, return_reservation, lookup_product,
    ),
    tags((name = "products"), (name = "categories"),
        (name = "internal", description = "For other services: `x-agora-service-token` required")),
    modifiers(&ServiceToken)
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    kit::openapi::finish_service(ApiDoc::openapi(), "/api/v1/products/stats")
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/products", get(list_products).post(create_product))
        .route("/api/v1/products/stats", get(get_stats))
        .route(
            "/api/v1/products/{id}",
            get(get_product)
                .put(update_product)
                .patch(update_product)
                .delete(delete_product),
        )
        .route("/api/v1/products/{id}/stock", patch(change_stock))
        .route("/api/v1/categories", get(list_categories))
        .route("/api/v1/stats", get(get_stats))
        // Internal: called by the orders service, not routed by the gateway.
        .route("/internal/v1/reservations", post(reserve))
        .route("/internal/v1/reservations/{order_id}", get(get_reservation))
        .route(
            "/internal/v1/reservations/{order_id}/commit",
            post(commit_reservation),
        )
        .route(
            "/internal/v1/reservations/{order_id}/release",
            post(release_reservation),
        )
        .route(
            "/internal/v1/reservations/{order_id}/return",
            post(return_reservation),
        )
        .route("/internal/v1/products/lookup", get(lookup_product))
        .with_state(state)
}

/// After a committed write: drop what it changed from the cache, and let the relay publish the
/// events it wrote now rather than at its next poll.
async fn after_write(state: &AppState, ids: &[i64]) {
    products_written(&state.cache, &state.outbox, ids).await;
}

/// After products `ids` changed: their cache entries and every list are invalidated, the relay
/// woken for the events written with the change.
async fn products_written(cache: &Cache, outbox: &Notifier, ids: &[i64]) {
    // Items and groups in one call: one atomic round trip on Redis.
    let mut keys: Vec<String> = ids.iter().map(|&id| item_key(id)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.extend([LIST_GROUP.to_owned(), CATEGORIES_GROUP.to_owned()]);
    cache.invalidate(&keys).await;
    outbox.notify();
}

/// Creates a product (seed 001's body as it is); `product.created` is published.
#[utoipa::path(
    post,
    path = "/api/v1/products",
    tag = "products",
    request_body(content = ProductBody, examples(
        ("seed 001" = (summary = "seed 001's product fields",
            value = json!({"name": "Wireless Mouse", "description": "Ergonomic wireless mouse",
                "price": 29.99, "stock": 200, "category": "Accessories"}))),
        ("with sku" = (summary = "a sku and a decimal-string price",
            value = json!({"name": "USB-C Hub", "sku": "HUB-7IN1", "price": "49.90", "stock": 25}))),
    )),
    responses(
        (status = 201, description = "Created; `Location` names it", body = Product,
            headers(("location" = String, description = "`/api/v1/products/{id}`"))),
        (status = 409, description = "The sku is taken (`sku_taken`)"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn create_product(
    State(state): State<AppState>,
    Json(body): Json<ProductBody>,
) -> Result<Response> {
    let new = body
        .validate_new(state.low_stock_threshold)
        .map_err(Error::Invalid)?;
    let sku = new.sku.clone().unwrap_or_else(generated_sku);
    let mut tx = state.db.begin().await?;
    let product = store::insert(&mut tx, &new, &sku).await?;
    kit::outbox::enqueue(&mut tx, &[events::product_created(&product)?]).await?;
    tx.commit().await?;
    after_write(&state, &[]).await;
    let location = HeaderValue::from_str(&format!("/api/v1/products/{}", product.id))
        .map_err(anyhow::Error::from)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(product),
    )
        .into_response())
}

/// One product (cached); seed 003 reads it at `/api/inventory/products/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/products/{id}",
    tag = "products",
    params(("id" = i64, Path, example = 123)),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 404, description = "No such product (`product_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<RawJson> {
    let db = state.db.clone();
    let cached = state
        .cache
        .get_or_load(&item_key(id), Ttl::Item, move || async move {
            store::find(&db, id)
                .await?
                .as_ref()
                .map(kit::cache::json_bytes)
                .transpose()
        })
        .await?;
    cached.map(RawJson).ok_or(Error::ProductNotFound(id))
}

/// `?category=` (any case), `?page=` (from 1) and `?per_page=` (1 to 100, default 20).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this category (any case; at most 100 characters).
    #[param(example = "Electronics")]
    category: Option<String>,
    /// From 1 (at most 10,000).
    #[param(example = 1, minimum = 1, maximum = 10000)]
    page: Option<u32>,
    /// 1 to 100, default 20.
    #[param(example = 20, minimum = 1, maximum = 100)]
    per_page: Option<u32>,
}

/// One page of products, in id order (cached).
#[utoipa::path(
    get,
    path = "/api/v1/products",
    tag = "products",
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = kit::page::Page<Product>),
        (status = 422, description = "A filter out of range (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn list_products(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<RawJson> {
    let pagination = Pagination::new(query.page, query.per_page)?;
    let category = match query.category.as_deref().map(str::trim) {
        None | Some("") => None,
        // No category is longer, so a longer filter matches nothing; refusing it keeps
        // made-up values out of the cache.
        Some(c) if c.chars().count() > MAX_CATEGORY_CHARS => {
            return Err(ApiError::validation(vec![FieldError::new(
                "category",
                "length",
                format!("must be at most {MAX_CATEGORY_CHARS} characters"),
            )])
            .into());
        }
        Some(c) => Some(c.to_owned()),
    };
    let field = format!(
        "{}&category={}",
        pagination.cache_field(),
        category.as_deref().unwrap_or_default().to_lowercase()
    );
    let db = state.db.clone();
    let page = state
        .cache
        .list_json(LIST_GROUP, &field, move || async move {
            let (items, total) = store::list(
                &db,
                category.as_deref(),
                pagination.limit(),
                pagination.offset(),
            )
            .await?;
            Ok(pagination.page(items, total))
        })
        .await?;
    Ok(RawJson(page))
}

/// Changes the fields given (partial, `PUT` too); `product.updated` is published.
#[utoipa::path(
    method(put, patch),
    path = "/api/v1/products/{id}",
    tag = "products",
    params(("id" = i64, Path, example = 1)),
    request_body(content = ProductBody, examples(
        ("new price" = (summary = "a new price", value = json!({"price": 1199.99}))),
    )),
    responses(
        (status = 200, description = "The changed product", body = Product),
        (status = 404, description = "No such product (`product_not_found`)"),
        (status = 409, description = "The sku is taken (`sku_taken`)"),
    )
)]
#[tracing::instrument(skip(state, body))]
pub(crate) async fn update_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Json(body): Json<ProductBody>,
) -> Result<Json<Product>> {
    let changes = body.validate_update().map_err(Error::Invalid)?;
    let mut tx = state.db.begin().await?;
    let product = store::update(&mut tx, id, &changes)
        .await?
        .ok_or(Error::ProductNotFound(id))?;
    kit::outbox::enqueue(&mut tx, &[events::product_updated(&product)?]).await?;
    tx.commit().await?;
    after_write(&state, &[id]).await;
    Ok(Json(product))
}

/// Deletes the product; `product.deleted` is published.
#[utoipa::path(
    delete,
    path = "/api/v1/products/{id}",
    tag = "products",
    params(("id" = i64, Path, example = 10)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such product (`product_not_found`)"),
        (status = 409, description = "Units of it are reserved by open orders (`product_reserved`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn delete_product(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    let mut tx = state.db.begin().await?;
    let sku = store::delete(&mut tx, id).await?;
    kit::outbox::enqueue(&mut tx, &[events::product_deleted(id, &sku)?]).await?;
    tx.commit().await?;
    after_write(&state, &[id]).await;
    Ok(StatusCode::NO_CONTENT)
}

/// `{"stock": N}` sets, `{"delta": N}` adjusts; 409 when stock would go negative.
#[utoipa::path(
    patch,
    path = "/api/v1/products/{id}/stock",
    tag = "products",
    params(("id" = i64, Path, example = 1)),
    request_body(content = StockBody, examples(
        ("set" = (summary = "set the sellable stock (seed 001)", value = json!({"stock": 40}))),
        ("adjust" = (summary = "adjust it (seed 003)", value = json!({"delta": 5}))),
    )),
    responses(
        (status = 200, description = "The product with its new stock", body = Product),
        (status = 404, description = "No such product (`product_not_found`)"),
        (status = 409, description = "Stock would go negative (`insufficient_stock`)"),
    )
)]
#[tracing::instrument(skip(state, body))]
pub(crate) async fn change_stock(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Json(body): Json<StockBody>,
) -> Result<Json<Product>> {
    let change = body.validate().map_err(Error::Invalid)?;
    let reason = match change {
        StockChange::Set(_) => Reason::Set,
        StockChange::Adjust(_) => Reason::Adjust,
    };
    let mut tx = state.db.begin().await?;
    let (product, previous) = store::change_stock(&mut tx, id, change).await?;
    // Setting the stock it already has (or a delta of 0) changes nothing worth announcing.
    if product.stock != previous {
        let events = events::stock_changed(&product, previous, reason, None)?;
        kit::outbox::enqueue(&mut tx, &events).await?;
    }
    tx.commit().await?;
    after_write(&state, &[id]).await;
    Ok(Json(product))
}

/// Every category with its number of products (`{"items": [...]}`).
#[utoipa::path(
    get,
    path = "/api/v1/categories",
    tag = "categories",
    responses((status = 200, description = "The categories", body = inline(CategoryList)))
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn list_categories(State(state): State<AppState>) -> Result<RawJson> {
    let db = state.db.clone();
    let categories = state
        .cache
        .list_json(CATEGORIES_GROUP, "all", move || async move {
            let items = store::categories(&db).await?;
            Ok(serde_json::json!({ "items": items }))
        })
        .await?;
    Ok(RawJson(categories))
}

/// Reserves stock for an order, all lines or none (never oversells); repeating it for the same
/// order answers the existing reservation (200).
#[utoipa::path(
    post,
    path = "/internal/v1/reservations",
    tag = "internal",
    security(("service_token" = [])),
    request_body(content = ReserveBody, examples(
        ("two lines" = (value = json!({"order_id": "3f0c9a52-1d2e-4b7a-9a63-5a3c2b1d0e9f",
            "items": [{"product_id": 1, "quantity": 2}, {"product_id": 2, "quantity": 1}]}))),
    )),
    responses(
        (status = 201, description = "Reserved", body = Reservation),
        (status = 200, description = "Already reserved for this order", body = Reservation),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 409, description = "Not enough stock (`insufficient_stock`), or a different reservation for this order"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    Json(body): Json<ReserveBody>,
) -> Result<Response> {
    let request = body.validate().map_err(Error::Invalid)?;
    let reserved = state
        .reserves
        .submit(request)
        .await
        .map_err(anyhow::Error::from)??;
    let (status, reservation) = match reserved {
        Reserved::Created(reservation) => (StatusCode::CREATED, reservation),
        Reserved::Existing(reservation) => (StatusCode::OK, reservation),
    };
    Ok((status, Json(reservation)).into_response())
}

/// Reserves that arrive together are one transaction, with one cache invalidation and one
/// wake of the relay ([`kit::batch`], [`reservations::reserve_many`]).
pub(crate) type Reserves = kit::batch::Batcher<ReserveRequest, Result<Reserved>>;

/// The most reserves one transaction holds.
const RESERVES_PER_BATCH: usize = 32;

pub(crate) fn reserves(db: Db, cache: Cache, outbox: Notifier) -> Reserves {
    // Two batches at once on PostgreSQL lock their products in one order.
    let flushers = kit::batch::flushers_for(&db);
    kit::batch::Batcher::new(flushers, RESERVES_PER_BATCH, move |requests| {
        reserve_batch(db.clone(), cache.clone(), outbox.clone(), requests)
    })
}

async fn reserve_batch(
    db: Db,
    cache: Cache,
    outbox: Notifier,
    requests: Vec<ReserveRequest>,
) -> Vec<Result<Reserved>> {
    let db = &db;
    let results = kit::batch::together_or_alone(
        &requests,
        |all| async move {
            match reservations::reserve_many(db, all).await {
                Ok(done) => Some(
                    done?
                        .into_iter()
                        .map(|r| Ok(Reserved::Created(r)))
                        .collect(),
                ),
                Err(err) => {
                    tracing::debug!(error.message = %kit::ApiError::from(err), count = all.len(),
                        "a batch of reserves failed; reserving each on its own");
                    None
                }
            }
        },
        |request| reservations::reserve(db, request),
    )
    .await;
    let ids: Vec<i64> = requests
        .iter()
        .zip(&results)
        .filter(|(_, result)| matches!(result, Ok(Reserved::Created(_))))
        .flat_map(|(request, _)| request.items.iter().map(|&(id, _)| id))
        .collect();
    if !ids.is_empty() {
        products_written(&cache, &outbox, &ids).await;
    }
    results
}

/// The order id of a reservation path, checked like the one in a reserve body.
fn order_id_param(order_id: String) -> Result<String> {
    crate::domain::parse_order_id(&order_id).map_err(|(_, message)| {
        kit::ApiError::bad_request("invalid_path_parameter", format!("The order id {message}"))
            .into()
    })
}

/// The reservation of an order.
#[utoipa::path(
    get,
    path = "/internal/v1/reservations/{order_id}",
    tag = "internal",
    security(("service_token" = [])),
    params(("order_id" = String, Path, example = "3f0c9a52-1d2e-4b7a-9a63-5a3c2b1d0e9f")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 404, description = "No reservation for this order (`reservation_not_found`)"),
        (status = 409, description = "Not possible from its status"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_reservation(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let order_id = order_id_param(order_id)?;
    reservations::find(&state.db, &order_id)
        .await?
        .map(Json)
        .ok_or(Error::ReservationNotFound(order_id))
}

/// Commits it: the units leave `reserved` for good (the order was paid).
#[utoipa::path(
    post,
    path = "/internal/v1/reservations/{order_id}/commit",
    tag = "internal",
    security(("service_token" = [])),
    params(("order_id" = String, Path, example = "3f0c9a52-1d2e-4b7a-9a63-5a3c2b1d0e9f")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 404, description = "No reservation for this order (`reservation_not_found`)"),
        (status = 409, description = "Not possible from its status"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn commit_reservation(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let order_id = order_id_param(order_id)?;
    let reservation = state
        .commits
        .submit(order_id)
        .await
        .map_err(anyhow::Error::from)??;
    Ok(Json(reservation))
}

/// Commits that arrive together are one statement, with one cache invalidation
/// ([`reservations::commit_open_many`]); one that cannot be committed there is committed on its
/// own, which gives its answer.
pub(crate) type Commits = kit::batch::Batcher<String, Result<Reservation>>;

/// The most commits one statement holds.
const COMMITS_PER_BATCH: usize = 64;

pub(crate) fn commits(db: Db, cache: Cache, outbox: Notifier) -> Commits {
    let flushers = kit::batch::flushers_for(&db);
    kit::batch::Batcher::new(flushers, COMMITS_PER_BATCH, move |order_ids| {
        commit_batch(db.clone(), cache.clone(), outbox.clone(), order_ids)
    })
}

async fn commit_batch(
    db: Db,
    cache: Cache,
    outbox: Notifier,
    order_ids: Vec<String>,
) -> Vec<Result<Reservation>> {
    let db = &db;
    let together = reservations::commit_open_many(db, &order_ids).await;
    let together = together.unwrap_or_else(|err| {
        tracing::debug!(error.message = %kit::ApiError::from(err), count = order_ids.len(),
            "a batch of commits failed; committing each on its own");
        order_ids.iter().map(|_| None).collect()
    });
    let results = futures::future::join_all(order_ids.iter().zip(together).map(
        |(order_id, committed)| async move {
            match committed {
                Some(reservation) => Ok(reservation),
                None => reservations::commit(db, order_id).await,
            }
        },
    ))
    .await;
    // A repeated commit changed nothing, but invalidating again is harmless.
    let ids: Vec<i64> = results
        .iter()
        .flatten()
        .flat_map(|reservation| reservation.items.iter().map(|i| i.product_id))
        .collect();
    if !ids.is_empty() {
        products_written(&cache, &outbox, &ids).await;
    }
    results
}

/// Releases it: the units go back on sale (the order failed or was cancelled).
#[utoipa::path(
    post,
    path = "/internal/v1/reservations/{order_id}/release",
    tag = "internal",
    security(("service_token" = [])),
    params(("order_id" = String, Path, example = "3f0c9a52-1d2e-4b7a-9a63-5a3c2b1d0e9f")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 404, description = "No reservation for this order (`reservation_not_found`)"),
        (status = 409, description = "Not possible from its status"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn release_reservation(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let order_id = order_id_param(order_id)?;
    let reservation = reservations::release(&state.db, &order_id).await?;
    settled(&state, &reservation).await;
    Ok(Json(reservation))
}

/// Puts the units of a committed reservation back on sale (a cancelled paid order).
#[utoipa::path(
    post,
    path = "/internal/v1/reservations/{order_id}/return",
    tag = "internal",
    security(("service_token" = [])),
    params(("order_id" = String, Path, example = "3f0c9a52-1d2e-4b7a-9a63-5a3c2b1d0e9f")),
    responses(
        (status = 200, description = "The reservation", body = Reservation),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 404, description = "No reservation for this order (`reservation_not_found`)"),
        (status = 409, description = "Not possible from its status"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn return_reservation(
    State(state): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let order_id = order_id_param(order_id)?;
    let reservation = reservations::give_back(&state.db, &order_id).await?;
    settled(&state, &reservation).await;
    Ok(Json(reservation))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LookupQuery {
    /// A product's sku or name.
    #[param(example = "Pro Keyboard")]
    item: String,
}

/// The product an order names by sku or name (seed 002's `"item": "Pro Keyboard"`).
#[utoipa::path(
    get,
    path = "/internal/v1/products/lookup",
    tag = "internal",
    security(("service_token" = [])),
    params(LookupQuery),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 403, description = "Without the service credential (`forbidden`)"),
        (status = 404, description = "No product with that sku or name (`product_not_found`)"),
        (status = 422, description = "Empty or longer than 200 characters (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn lookup_product(
    State(state): State<AppState>,
    Query(lookup): Query<LookupQuery>,
) -> Result<Json<Product>> {
    let item = lookup.item.trim();
    if item.is_empty() || item.chars().count() > 200 {
        return Err(kit::ApiError::validation(vec![FieldError::new(
            "item",
            "invalid",
            "a product name or sku of 1 to 200 characters",
        )])
        .into());
    }
    store::find_by_item(&state.db, item)
        .await?
        .map(Json)
        .ok_or_else(|| {
            kit::ApiError::new(
                StatusCode::NOT_FOUND,
                "product_not_found",
                format!("No product with sku or name `{item}`"),
            )
            .into()
        })
}

/// A commit or release changed `stock`/`reserved` of its products (a repeated call changed
/// nothing, but invalidating again is harmless and cheaper than telling the cases apart).
async fn settled(state: &AppState, reservation: &Reservation) {
    let ids: Vec<i64> = reservation.items.iter().map(|i| i.product_id).collect();
    after_write(state, &ids).await;
}

/// `GET /api/v1/categories`'s body (the handler writes it with `json!`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct CategoryList {
    items: Vec<crate::domain::Category>,
}

/// Counts, outbox backlog and cache counters (`/api/v1/products/stats`, `/api/v1/stats`).
#[utoipa::path(
    get,
    path = "/api/v1/products/stats",
    tag = "products",
    responses((status = 200, description = "Counts", body = Object, example = json!({
        "service": "catalog", "database": "sqlite", "products": 12, "categories": 5,
        "units_in_stock": 900, "units_reserved": 0, "outbox_backlog": 0,
        "cache": {"hits": 10, "misses": 2}})))
)]
#[tracing::instrument(skip(state))]
pub(crate) async fn get_stats(State(state): State<AppState>) -> Result<Json<serde_json::Value>> {
    let totals = store::totals(&state.db).await?;
    let backlog = kit::outbox::backlog(&state.db).await?;
    Ok(Json(serde_json::json!({
        "service": crate::NAME,
        "database": state.db.backend(),
        "products": totals.products,
        "categories": totals.categories,
        "units_in_stock": totals.units_in_stock,
        "units_reserved": totals.units_reserved,
        "outbox_backlog": backlog,
        "cache": state.cache.stats(),
    })))
}
