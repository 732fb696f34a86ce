//! Creating an order: check the user and the products with their owners, hold the stock at
//! catalog, and store the order with its lines, its prices and its `order.created` event in one
//! transaction.
//!
//! Nothing is half-written and no stock is held forever:
//! - The reservation id is chosen (and remembered as an *intent*) before catalog is asked, and
//!   the intent is deleted in the order's own transaction. An intent still there after
//!   `services.orders.reservation_timeout_secs` belongs to an order never stored (a crash, a
//!   timeout, a failed insert): the sweep releases its reservation (release is idempotent, and
//!   releasing what was never reserved makes catalog refuse a late reserve of it). The sweep
//!   claims the intent before releasing, and the order's transaction takes it only unclaimed,
//!   so a create slower than the timeout fails (503) instead of storing an order without stock.
//! - A refusal after the reservation (strict total) releases it at once.
//!
//! `Idempotency-Key`: the key is claimed (with the normalised request) before anything else and
//! answered in the order's transaction, so a repeat gets the stored answer, a concurrent repeat
//! waits for it, and a key reused with another request is a 422.

use std::time::Duration;

use axum::http::StatusCode;
use kit::FieldError;
use kit::db::query;
use kit::money::Money;

use crate::AppState;
use crate::batches::Placement;
use crate::clients::Refusal;
use crate::domain::{CreateOrder, Item, Order, ProductRef};
use crate::error::{Error, Result};
use crate::store::{self, now};

/// How long a repeat waits for the first request with its key to be answered.
const KEY_WAIT: Duration = Duration::from_secs(10);
/// A claimed key with no answer after this belongs to a request that died: it may be taken over.
const KEY_ABANDONED_SECS: i64 = 30;

/// An answer to `POST /orders`: its status and JSON body.
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
    /// The order created (for `Location`), when it was this request that created it.
    pub order_id: Option<i64>,
    /// A stored answer given again.
    pub replayed: bool,
}

/// Creates the order (or returns the answer already given to `key`).
pub async fn create(
    state: &AppState,
    order: CreateOrder,
    key: Option<&str>,
    request_id: Option<&str>,
) -> Result<Answer> {
    let Some(key) = key else {
        let order = place(state, &order, None).await?;
        return created(&order);
    };
    let request = serde_json::to_string(&order).map_err(anyhow::Error::from)?;
    let started = tokio::time::Instant::now();
    loop {
        match claim(state, key, &request).await? {
            Claim::Mine => break,
            Claim::Answered(answer) => return Ok(answer),
            Claim::Pending if started.elapsed() < KEY_WAIT => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Claim::Pending => return Err(Error::KeyInProgress),
        }
    }
    match place(state, &order, Some(key)).await {
        Ok(order) => created(&order),
        Err(err) => {
            let api = kit::ApiError::from(err);
            if api.status().is_client_error() {
                // The same request will be refused the same way: keep the answer, as sent.
                let mut problem = api.problem().clone();
                problem.request_id = request_id.map(str::to_owned);
                let body = serde_json::to_string(&problem).map_err(anyhow::Error::from)?;
                remember(state, key, api.status(), &body).await?;
            } else {
                // Not the client's doing (a dependency is down): the key may be used again.
                forget(state, key).await?;
            }
            Err(api.into())
        }
    }
}

fn created(order: &Order) -> Result<Answer> {
    Ok(Answer {
        status: StatusCode::CREATED,
        body: serde_json::to_string(order).map_err(anyhow::Error::from)?,
        order_id: Some(order.id),
        replayed: false,
    })
}

/// A stored key: its request, answer (status, body) and when it was claimed.
type KeyRow = (
    String,
    Option<i32>,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

enum Claim {
    /// This request holds the key and must answer it.
    Mine,
    /// The first request's answer.
    Answered(Answer),
    /// The first request is still running.
    Pending,
}

async fn claim(state: &AppState, key: &str, request: &str) -> Result<Claim> {
    let now = now();
    let expires = now + chrono::Duration::hours(state.settings.idempotency_ttl_hours as i64);
    // Expired keys are forgotten first, so an old key can be used again.
    query("delete from idempotency_keys where key = $1 and expires_at < $2")
        .bind(key)
        .bind(now)
        .execute(&state.db)
        .await?;
    let inserted = query(
        "insert into idempotency_keys (key, request, created_at, expires_at) \
         values ($1, $2, $3, $4) on conflict do nothing",
    )
    .bind(key)
    .bind(request)
    .bind(now)
    .bind(expires)
    .execute(&state.db)
    .await?
        == 1;
    if inserted {
        return Ok(Claim::Mine);
    }
    let row: Option<KeyRow> =
        query("select request, status_code, body, created_at from idempotency_keys where key = $1")
            .bind(key)
            .fetch_optional(&state.db)
            .await?;
    let Some((first, status, body, claimed_at)) = row else {
        // Deleted meanwhile (the first request failed through no fault of its own): try again.
        return Ok(Claim::Pending);
    };
    if first != request {
        return Err(Error::KeyReused);
    }
    match (status, body) {
        (Some(status), Some(body)) => Ok(Claim::Answered(Answer {
            status: u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK),
            body,
            order_id: None,
            replayed: true,
        })),
        _ if (now - claimed_at).num_seconds() > KEY_ABANDONED_SECS => {
            // Its request died before answering: take it over.
            let taken = query(
                "update idempotency_keys set created_at = $1 where key = $2 and created_at = $3 \
                 and status_code is null",
            )
            .bind(now)
            .bind(key)
            .bind(claimed_at)
            .execute(&state.db)
            .await?
                == 1;
            Ok(if taken { Claim::Mine } else { Claim::Pending })
        }
        _ => Ok(Claim::Pending),
    }
}

async fn remember(state: &AppState, key: &str, status: StatusCode, body: &str) -> Result<()> {
    query("update idempotency_keys set status_code = $1, body = $2 where key = $3")
        .bind(i32::from(status.as_u16()))
        .bind(body)
        .bind(key)
        .execute(&state.db)
        .await?;
    Ok(())
}

async fn forget(state: &AppState, key: &str) -> Result<()> {
    query("delete from idempotency_keys where key = $1 and status_code is null")
        .bind(key)
        .execute(&state.db)
        .await?;
    Ok(())
}

/// Checks, reserves and stores the order.
async fn place(state: &AppState, order: &CreateOrder, key: Option<&str>) -> Result<Order> {
    let neighbours = &state.neighbours;
    let (user, products) =
        tokio::join!(neighbours.user_exists(order.user_id), resolve(state, order));
    let mut errors = Vec::new();
    if !user? {
        errors.push(FieldError::new(
            "user_id",
            "not_found",
            format!("no user with id {}", order.user_id),
        ));
    }
    let products = products?;
    for (line, product) in order.lines.iter().zip(&products) {
        if product.is_none() {
            let (field, what) = match &line.product {
                ProductRef::Id(id) => ("product_id", format!("no product with id {id}")),
                ProductRef::Item(item) => ("item", format!("no product with sku or name `{item}`")),
            };
            errors.push(FieldError::new(
                format!("{}{field}", line.field),
                "not_found",
                what,
            ));
        }
    }
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    // Two names may be one product: merge again by id, in id order (catalog's lock order).
    let mut lines: Vec<(i64, i64, usize)> = Vec::new();
    for (i, (line, product)) in order.lines.iter().zip(&products).enumerate() {
        let id = product.unwrap_or_default();
        match lines.iter_mut().find(|l| l.0 == id) {
            Some(merged) => merged.1 = merged.1.saturating_add(line.quantity),
            None => lines.push((id, line.quantity, i)),
        }
    }
    lines.sort_by_key(|l| l.0);
    let wanted: Vec<(i64, i64)> = lines.iter().map(|l| (l.0, l.1)).collect();

    let reservation_id = format!("ord-{}", uuid::Uuid::now_v7().simple());
    state.batches.intent(reservation_id.clone()).await?;
    let reservation = match neighbours.reserve(&reservation_id, &wanted).await? {
        Ok(reservation) => reservation,
        Err(refusal) => {
            // Nothing was held: the intent has nothing to release.
            store::delete_intent(&state.db, &reservation_id).await?;
            return Err(refused(state, order, &lines, refusal));
        }
    };
    let items: Vec<Item> = reservation
        .items
        .iter()
        .map(|i| {
            Ok(Item {
                product_id: i.product_id,
                quantity: i.quantity,
                unit_price: i.unit_price,
                line_total: i
                    .unit_price
                    .times(i.quantity)
                    .ok_or_else(|| anyhow::anyhow!("a line beyond the money bound"))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let total = reservation.total;
    let warning = match order.client_total {
        Some(client) if client != total => {
            if state.settings.strict_client_total {
                release_now(state, &reservation_id).await;
                return Err(Error::Invalid(vec![total_mismatch(client, total)]));
            }
            Some(format!(
                "total_price {client} was ignored: the total from catalog prices is {total}"
            ))
        }
        _ => None,
    };

    let stored = state
        .batches
        .place(Placement {
            user_id: order.user_id,
            items,
            total,
            client_total: order.client_total,
            warning,
            reservation_id,
            key: key.map(str::to_owned),
        })
        .await?
        // Slower than the reservation timeout: the sweep is giving the stock back. Nothing is
        // stored; the client may send it again (a new reservation).
        .ok_or(Error::ReservationExpired {
            timeout_secs: state.settings.reservation_timeout_secs,
        })?;
    state.outbox.notify();
    Ok(stored)
}

/// The product id of every line (`None`: no such product); names are looked up at catalog.
async fn resolve(state: &AppState, order: &CreateOrder) -> Result<Vec<Option<i64>>> {
    let mut ids = Vec::with_capacity(order.lines.len());
    for line in &order.lines {
        ids.push(match &line.product {
            ProductRef::Id(id) => Some(*id),
            ProductRef::Item(item) => state.neighbours.product_named(item).await?,
        });
    }
    Ok(ids)
}

/// catalog's refusal, in the terms of the client's request.
fn refused(
    state: &AppState,
    order: &CreateOrder,
    lines: &[(i64, i64, usize)],
    refusal: Refusal,
) -> Error {
    let field = |sent: usize, name: &str| {
        let line = lines.get(sent).map(|l| &order.lines[l.2]);
        let prefix = line.map(|l| l.field.as_str()).unwrap_or_default();
        let name = match line.map(|l| &l.product) {
            Some(ProductRef::Item(_)) if name == "product_id" => "item",
            _ => name,
        };
        format!("{prefix}{name}")
    };
    match refusal {
        Refusal::Unknown(indexes) => Error::Invalid(
            indexes
                .into_iter()
                .map(|i| {
                    let id = lines.get(i).map(|l| l.0).unwrap_or_default();
                    FieldError::new(
                        field(i, "product_id"),
                        "not_found",
                        format!("no product with id {id}"),
                    )
                })
                .collect(),
        ),
        Refusal::Short(lines_short) => Error::InsufficientStock(
            lines_short
                .into_iter()
                .map(|(i, message)| {
                    FieldError::new(field(i, "quantity"), "insufficient_stock", message)
                })
                .collect(),
        ),
        // The sweep released this id while the request was slower than the timeout (its
        // reserve was retried after that). Not a stock shortage: the client should send it again.
        Refusal::Released => Error::ReservationExpired {
            timeout_secs: state.settings.reservation_timeout_secs,
        },
    }
}

fn total_mismatch(client: Money, total: Money) -> FieldError {
    FieldError::new(
        "total_price",
        "mismatch",
        format!("is {client}, but the items cost {total} at catalog prices"),
    )
}

/// Gives the stock back now (the sweep does it later if this fails).
async fn release_now(state: &AppState, reservation_id: &str) {
    match state.neighbours.settle(reservation_id, "release").await {
        Ok(_) => {
            if let Err(err) = store::delete_intent(&state.db, reservation_id).await {
                tracing::debug!(error.message = %err, "forgetting a released intent failed");
            }
        }
        Err(err) => {
            tracing::debug!(error.message = %err, reservation_id, "release failed; the sweep will retry");
        }
    }
}

/// Releases the reservations of orders that were never stored; returns how many.
pub async fn sweep_intents(state: &AppState) -> Result<usize> {
    let age = chrono::Duration::seconds(state.settings.reservation_timeout_secs as i64);
    let stale = store::stale_intents(&state.db, age, 100).await?;
    let mut released = 0;
    for reservation_id in stale {
        // Claimed first, so that its order, if it is still being stored, is refused rather
        // than stored without its stock; gone means it was stored after all.
        if !store::claim_intent(&state.db, &reservation_id).await? {
            continue;
        }
        match state.neighbours.settle(&reservation_id, "release").await {
            // Released now; or refused, which can only mean there is nothing left to release.
            Ok(_) | Err(kit::client::CallError::Refused { .. }) => {}
            Err(err) => return Err(err.into()),
        }
        store::delete_intent(&state.db, &reservation_id).await?;
        released += 1;
    }
    if released > 0 {
        tracing::info!(
            released,
            "released the stock held for orders that were never stored"
        );
    }
    Ok(released)
}
