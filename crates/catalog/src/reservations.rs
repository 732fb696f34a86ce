//! Reservations: stock held for an order, all lines or none, then committed (sold) or released
//! (back on sale). Each call is idempotent by order id, because the orders service delivers at
//! least once: a repeated reserve, commit or release returns the reservation and changes nothing.
//!
//! A reservation moves units from `stock` (sellable) to `reserved` with one conditional update
//! per line (`stock >= quantity`), so reserved units can never be sold twice; a commit drops them
//! from `reserved`; a release moves them back to `stock`.

use chrono::{DateTime, Utc};
use kit::db::{Dialect, Tx, query};
use kit::outbox::Event;
use kit::{Db, FieldError};

use crate::domain::{Product, Reservation, ReservationItem, ReservationStatus, ReserveRequest};
use crate::error::{Error, Result};
use crate::events::{self, Reason};
use crate::money::{MAX_CENTS, Money};
use crate::store::{COLUMNS, now};

/// What a reserve call did.
#[derive(Debug)]
pub enum Reserved {
    /// Stock was taken now.
    Created(Reservation),
    /// The same order had already reserved the same items: nothing changed.
    Existing(Reservation),
}

/// Reserves every line of `request` or none.
#[tracing::instrument(skip_all, fields(order_id = %request.order_id))]
pub async fn reserve(db: &Db, request: &ReserveRequest) -> Result<Reserved> {
    let now = now();
    let order_id = request.order_id.as_str();
    let mut tx = db.begin().await?;
    // Claim the order id first: a concurrent reserve of the same order waits here (PostgreSQL
    // row lock on the key) and then finds it taken.
    let claimed = query(
        "insert into reservations (order_id, status, created_at, updated_at) \
         values ($1, 'reserved', $2, $2) on conflict do nothing",
    )
    .bind(order_id)
    .bind(now)
    .execute(&mut tx)
    .await?
        == 1;
    if claimed {
        let (events, items, total) = take(&mut tx, request, now).await?;
        kit::outbox::enqueue(&mut tx, &events).await?;
        tx.commit().await?;
        // The answer from what was written (the read-back would cost two more statements).
        return Ok(Reserved::Created(Reservation {
            order_id: order_id.to_owned(),
            status: ReservationStatus::Reserved,
            items,
            total,
            returned: false,
            created_at: now,
            updated_at: now,
        }));
    }
    tx.commit().await?;
    let reservation = find(db, order_id)
        .await?
        .ok_or_else(|| Error::ReservationNotFound(order_id.to_owned()))?;
    // The order id was taken: the same request again is a no-op; anything else is a conflict.
    match reservation.status {
        ReservationStatus::Released => Err(Error::ReservationConflict {
            code: "reservation_released",
            detail: format!("The reservation of order `{order_id}` was released"),
        }),
        _ if same_items(&reservation, request) => Ok(Reserved::Existing(reservation)),
        _ => Err(Error::ReservationConflict {
            code: "reservation_mismatch",
            detail: format!("Order `{order_id}` already reserved different items"),
        }),
    }
}

/// Takes the units of every line of a claimed order and records the lines; returns the events
/// to announce, the lines (in product order) and their total, or the refusal naming every line
/// that could not be taken.
async fn take(
    tx: &mut Tx,
    request: &ReserveRequest,
    now: DateTime<Utc>,
) -> Result<(Vec<Event>, Vec<ReservationItem>, Money)> {
    let take = format!(
        "update products set stock = stock - $1, reserved = reserved + $1, updated_at = $2 \
         where id = $3 and stock >= $1 returning {COLUMNS}"
    );
    // PostgreSQL records the line in the same statement; SQLite (no writes in `with`) after it.
    let postgres = tx.dialect() == Dialect::Postgres;
    let take = if postgres {
        format!(
            "with taken as ({take}), line as ( \
                 insert into reservation_items (order_id, product_id, quantity, unit_price_cents) \
                 select $4, id, $1, price_cents from taken) \
             select {COLUMNS} from taken"
        )
    } else {
        take
    };
    let order_id = request.order_id.as_str();
    let mut events = Vec::new();
    let mut short = Vec::new();
    let mut items = Vec::with_capacity(request.items.len());
    let mut total = Some(Money::default());
    for (i, &(product_id, quantity)) in request.items.iter().enumerate() {
        let mut statement = query(&take).bind(quantity).bind(now).bind(product_id);
        if postgres {
            statement = statement.bind(order_id);
        }
        let product: Option<Product> = statement.fetch_optional(&mut *tx).await?;
        let Some(product) = product else {
            let available: Option<i64> = query("select stock from products where id = $1")
                .bind(product_id)
                .fetch_optional_scalar(&mut *tx)
                .await?;
            short.push((i, product_id, quantity, available));
            continue;
        };
        if !postgres {
            query(
                "insert into reservation_items (order_id, product_id, quantity, unit_price_cents) \
                 values ($1, $2, $3, $4)",
            )
            .bind(order_id)
            .bind(product_id)
            .bind(quantity)
            .bind(product.price.cents())
            .execute(&mut *tx)
            .await?;
        }
        let line_total = product.price.times(quantity);
        total = total.and_then(|t| t.plus(line_total?));
        if let Some(line_total) = line_total {
            items.push(ReservationItem {
                product_id,
                quantity,
                unit_price: product.price,
                line_total,
            });
        }
        let previous = product.stock + quantity;
        events.extend(events::stock_changed(
            &product,
            previous,
            Reason::Reserve,
            Some(order_id),
        )?);
    }
    if !short.is_empty() {
        // Dropping the transaction rolls back every line already taken.
        return Err(refusal(&short));
    }
    let Some(total) = total else {
        return Err(Error::Invalid(vec![FieldError::new(
            "items",
            "total_too_large",
            format!(
                "the reservation would be worth more than {}",
                Money::from_cents(MAX_CENTS)
            ),
        )]));
    };
    items.sort_by_key(|item| item.product_id);
    Ok((events, items, total))
}

fn same_items(reservation: &Reservation, request: &ReserveRequest) -> bool {
    let held: Vec<(i64, i64)> = reservation
        .items
        .iter()
        .map(|i| (i.product_id, i.quantity))
        .collect();
    held == request.items
}

/// Unknown products are a 422 (the request names things that do not exist); known products
/// short of stock are a 409 (the request was fine, the stock is not there).
fn refusal(short: &[(usize, i64, i64, Option<i64>)]) -> Error {
    let unknown: Vec<FieldError> = short
        .iter()
        .filter(|(_, _, _, available)| available.is_none())
        .map(|(i, product_id, _, _)| {
            FieldError::new(
                format!("items[{i}].product_id"),
                "not_found",
                format!("no product with id {product_id}"),
            )
        })
        .collect();
    if !unknown.is_empty() {
        return Error::Invalid(unknown);
    }
    let errors = short
        .iter()
        .map(|(i, product_id, quantity, available)| {
            FieldError::new(
                format!("items[{i}].quantity"),
                "insufficient_stock",
                format!(
                    "product {product_id} has {} units in stock; {quantity} requested",
                    available.unwrap_or_default()
                ),
            )
        })
        .collect();
    Error::InsufficientStock {
        detail: "Not enough stock for every item; nothing was reserved".into(),
        errors,
    }
}

/// Marks the order's units as sold: they leave `reserved` for good.
#[tracing::instrument(skip(db))]
pub async fn commit(db: &Db, order_id: &str) -> Result<Reservation> {
    settle(db, order_id, ReservationStatus::Committed).await
}

/// Puts the order's units back on sale. Releasing an order that never reserved records the
/// release, so a late reserve of that order (a retried message) is refused.
#[tracing::instrument(skip(db))]
pub async fn release(db: &Db, order_id: &str) -> Result<Reservation> {
    settle(db, order_id, ReservationStatus::Released).await
}

/// The reservation's status, its row locked for the rest of `tx` (`None`: no such reservation).
async fn locked_status(tx: &mut Tx, order_id: &str) -> Result<Option<ReservationStatus>> {
    let select = format!(
        "select status from reservations where order_id = $1{}",
        tx.dialect().for_update()
    );
    let status: Option<String> = query(&select)
        .bind(order_id)
        .fetch_optional_scalar(&mut *tx)
        .await?;
    Ok(status.as_deref().and_then(ReservationStatus::parse))
}

/// Moves the order's reservation from open to `to`, its row locked for the rest of `tx` (before
/// the products', the order every writer takes them in); its creation time, or `None` when it
/// is not open (or not visible yet).
async fn close(
    tx: &mut Tx,
    order_id: &str,
    to: ReservationStatus,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    Ok(query(
        "update reservations set status = $1, updated_at = $2 \
         where order_id = $3 and status = 'reserved' returning created_at",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(order_id)
    .fetch_optional_scalar(&mut *tx)
    .await?)
}

/// PostgreSQL, committing an open reservation (every processed order does): one statement, no
/// transaction around it, instead of five round trips. It closes the reservation and takes its
/// units out of `reserved` (walking its lines by their key, so products are locked in id order,
/// as every writer takes them); a commit announces nothing. No rows when the reservation is not
/// open: the general path then answers.
const COMMIT_OPEN: &str = "with closed as ( \
        update reservations set status = 'committed', updated_at = $2 \
        where order_id = $1 and status = 'reserved' returning order_id, created_at), \
    sold as ( \
        update products p set reserved = p.reserved - i.quantity, updated_at = $2 \
        from closed c join reservation_items i on i.order_id = c.order_id \
        where p.id = i.product_id \
        returning i.product_id, i.quantity, i.unit_price_cents, c.created_at) \
    select product_id, quantity, unit_price_cents, created_at from sold order by product_id";

async fn commit_at_once(
    db: &Db,
    order_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Reservation>> {
    let lines: Vec<(i64, i64, i64, DateTime<Utc>)> = query(COMMIT_OPEN)
        .bind(order_id)
        .bind(now)
        .fetch_all(db)
        .await?;
    let Some(&(_, _, _, created_at)) = lines.first() else {
        return Ok(None);
    };
    let (items, total) = priced(
        order_id,
        lines
            .into_iter()
            .map(|(product, quantity, cents, _)| (product, quantity, cents)),
    )?;
    Ok(Some(Reservation {
        order_id: order_id.to_owned(),
        status: ReservationStatus::Committed,
        items,
        total,
        returned: false,
        created_at,
        updated_at: now,
    }))
}

async fn settle(db: &Db, order_id: &str, to: ReservationStatus) -> Result<Reservation> {
    let now = now();
    if to == ReservationStatus::Committed
        && db.dialect() == Dialect::Postgres
        && let Some(reservation) = commit_at_once(db, order_id, now).await?
    {
        return Ok(reservation);
    }
    let mut tx = db.begin().await?;
    // The usual case is one statement: an open reservation closed.
    let mut closed = close(&mut tx, order_id, to, now).await?;
    if closed.is_none() {
        match locked_status(&mut tx, order_id).await? {
            // Its reserve committed after the update looked; the row is locked now.
            Some(ReservationStatus::Reserved) => {
                closed = close(&mut tx, order_id, to, now).await?;
            }
            Some(current) if current == to => {} // repeated call: nothing to do
            Some(current) => {
                return Err(Error::ReservationConflict {
                    code: if current == ReservationStatus::Committed {
                        "reservation_committed"
                    } else {
                        "reservation_released"
                    },
                    detail: format!(
                        "The reservation of order `{order_id}` is {}; it cannot be {}",
                        current.as_str(),
                        to.as_str()
                    ),
                });
            }
            None if to == ReservationStatus::Released => {
                query(
                    "insert into reservations (order_id, status, created_at, updated_at) \
                     values ($1, 'released', $2, $2)",
                )
                .bind(order_id)
                .bind(now)
                .execute(&mut tx)
                .await?;
            }
            None => return Err(Error::ReservationNotFound(order_id.to_owned())),
        }
    }
    let Some(created_at) = closed else {
        tx.commit().await?;
        return find(db, order_id)
            .await?
            .ok_or_else(|| Error::ReservationNotFound(order_id.to_owned()));
    };
    let (events, items, total) = settle_lines(&mut tx, order_id, to, now).await?;
    kit::outbox::enqueue(&mut tx, &events).await?;
    tx.commit().await?;
    // The answer from what was written (an open reservation was never returned).
    Ok(Reservation {
        order_id: order_id.to_owned(),
        status: to,
        items,
        total,
        returned: false,
        created_at,
        updated_at: now,
    })
}

/// Takes the units of an open reservation out of `reserved`: for good (commit) or back into
/// `stock` (release, whose stock changes are returned as events to announce); its items and
/// their total.
async fn settle_lines(
    tx: &mut Tx,
    order_id: &str,
    to: ReservationStatus,
    now: DateTime<Utc>,
) -> Result<(Vec<Event>, Vec<ReservationItem>, Money)> {
    let give_back = match to {
        ReservationStatus::Released => "stock = stock + $1, reserved = reserved - $1",
        _ => "reserved = reserved - $1",
    };
    let update_product = format!(
        "update products set {give_back}, updated_at = $2 where id = $3 returning {COLUMNS}"
    );
    let lines: Vec<(i64, i64, i64)> = query(
        "select product_id, quantity, unit_price_cents from reservation_items \
         where order_id = $1 order by product_id",
    )
    .bind(order_id)
    .fetch_all(&mut *tx)
    .await?;
    let (items, total) = priced(order_id, lines)?;
    let mut events = Vec::new();
    for item in &items {
        // The product may have been deleted since (only when nothing was reserved, so not while
        // this hold is open); a missing row changes nothing.
        let product: Option<Product> = query(&update_product)
            .bind(item.quantity)
            .bind(now)
            .bind(item.product_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let (Some(product), ReservationStatus::Released) = (product, to) {
            let previous = product.stock - item.quantity;
            events.extend(events::stock_changed(
                &product,
                previous,
                Reason::Release,
                Some(order_id),
            )?);
        }
    }
    Ok((events, items, total))
}

/// The reservation of an order, with its lines.
#[tracing::instrument(skip(db))]
pub async fn find(db: &Db, order_id: &str) -> Result<Option<Reservation>> {
    let head: Option<(String, DateTime<Utc>, DateTime<Utc>, bool)> = query(
        "select status, created_at, updated_at, exists (select 1 from reservation_returns r \
         where r.order_id = reservations.order_id) from reservations where order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(db)
    .await?;
    let Some((status, created_at, updated_at, returned)) = head else {
        return Ok(None);
    };
    let status = ReservationStatus::parse(&status)
        .ok_or_else(|| anyhow::anyhow!("unknown reservation status `{status}` stored"))?;
    let lines: Vec<(i64, i64, i64)> = query(
        "select product_id, quantity, unit_price_cents from reservation_items \
         where order_id = $1 order by product_id",
    )
    .bind(order_id)
    .fetch_all(db)
    .await?;
    let (items, total) = priced(order_id, lines)?;
    Ok(Some(Reservation {
        order_id: order_id.to_owned(),
        status,
        items,
        total,
        returned,
        created_at,
        updated_at,
    }))
}

/// The stored lines (product, quantity, unit price in cents) of reservation `order_id` as items,
/// and their total. Totals were bounded when the lines were written; checked anyway, never
/// wrapped.
fn priced(
    order_id: &str,
    lines: impl IntoIterator<Item = (i64, i64, i64)>,
) -> Result<(Vec<ReservationItem>, Money)> {
    let out_of_range = || anyhow::anyhow!("reservation `{order_id}` totals beyond the money bound");
    let mut items = Vec::new();
    let mut total = Money::default();
    for (product_id, quantity, unit_cents) in lines {
        let unit_price = Money::from_cents(unit_cents);
        let line_total = unit_price.times(quantity).ok_or_else(out_of_range)?;
        total = total.plus(line_total).ok_or_else(out_of_range)?;
        items.push(ReservationItem {
            product_id,
            quantity,
            unit_price,
            line_total,
        });
    }
    Ok((items, total))
}

/// Puts the units of a committed reservation back on sale (its order was cancelled after it was
/// sold). Once per order: a repeat changes nothing.
#[tracing::instrument(skip(db))]
pub async fn give_back(db: &Db, order_id: &str) -> Result<Reservation> {
    let now = now();
    let mut tx = db.begin().await?;
    match locked_status(&mut tx, order_id).await? {
        Some(ReservationStatus::Committed) => {}
        Some(current) => {
            return Err(Error::ReservationConflict {
                code: if current == ReservationStatus::Released {
                    "reservation_released"
                } else {
                    "reservation_open"
                },
                detail: format!(
                    "The reservation of order `{order_id}` is {}; only a committed one can be \
                     returned",
                    current.as_str()
                ),
            });
        }
        None => return Err(Error::ReservationNotFound(order_id.to_owned())),
    }
    let first = query(
        "insert into reservation_returns (order_id, returned_at) values ($1, $2) \
         on conflict do nothing",
    )
    .bind(order_id)
    .bind(now)
    .execute(&mut tx)
    .await?
        == 1;
    if first {
        let update = format!(
            "update products set stock = stock + $1, updated_at = $2 where id = $3 \
             returning {COLUMNS}"
        );
        let items: Vec<(i64, i64)> = query(
            "select product_id, quantity from reservation_items where order_id = $1 \
             order by product_id",
        )
        .bind(order_id)
        .fetch_all(&mut tx)
        .await?;
        let mut events = Vec::new();
        for (product_id, quantity) in items {
            let product: Option<Product> = query(&update)
                .bind(quantity)
                .bind(now)
                .bind(product_id)
                .fetch_optional(&mut tx)
                .await?;
            if let Some(product) = product {
                let previous = product.stock - quantity;
                events.extend(events::stock_changed(
                    &product,
                    previous,
                    Reason::Return,
                    Some(order_id),
                )?);
            }
        }
        kit::outbox::enqueue(&mut tx, &events).await?;
    }
    tx.commit().await?;
    find(db, order_id)
        .await?
        .ok_or_else(|| Error::ReservationNotFound(order_id.to_owned()))
}
