//! Reservations: stock held for an order, all lines or none, then committed (sold) or released
//! (back on sale). Each call is idempotent by order id, because the orders service delivers at
//! least once: a repeated reserve, commit or release returns the reservation and changes nothing.
//!
//! A reservation moves units from `stock` (sellable) to `reserved` with one conditional update
//! per product (`stock >= quantity`; reserves made together take each product's units for all
//! their lines at once), so reserved units can never be sold twice; a commit drops them from
//! `reserved`; a release moves them back to `stock`.

use std::sync::LazyLock;

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
        return Ok(Reserved::Created(held(
            order_id.to_owned(),
            items,
            total,
            now,
        )));
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
    let order_id = request.order_id.as_str();
    let mut events = Vec::new();
    let mut short = Vec::new();
    let mut items = Vec::with_capacity(request.items.len());
    let mut total = Some(Money::default());
    for (i, &(product_id, quantity)) in request.items.iter().enumerate() {
        let Some(product) = take_line(tx, order_id, product_id, quantity, now).await? else {
            let available: Option<i64> = query("select stock from products where id = $1")
                .bind(product_id)
                .fetch_optional_scalar(&mut *tx)
                .await?;
            short.push((i, product_id, quantity, available));
            continue;
        };
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
        events.extend(taken_event(&product, quantity, order_id)?);
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

/// Takes `quantity` units of a product for `order_id` and records the line; `None` (nothing
/// taken) when the product is unknown or short of stock.
async fn take_line(
    tx: &mut Tx,
    order_id: &str,
    product_id: i64,
    quantity: i64,
    now: DateTime<Utc>,
) -> Result<Option<Product>> {
    // PostgreSQL records the line in the same statement; SQLite (no writes in `with`) after it.
    if tx.dialect() == Dialect::Postgres {
        return Ok(query(&TAKE_PG)
            .bind(quantity)
            .bind(now)
            .bind(product_id)
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?);
    }
    let product: Option<Product> = query(&TAKE)
        .bind(quantity)
        .bind(now)
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(product) = &product {
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
    Ok(product)
}

static TAKE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "update products set stock = stock - $1, reserved = reserved + $1, updated_at = $2 \
         where id = $3 and stock >= $1 returning {COLUMNS}"
    )
});

static TAKE_PG: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with taken as ({}), line as ( \
             insert into reservation_items (order_id, product_id, quantity, unit_price_cents) \
             select $4, id, $1, price_cents from taken) \
         select {COLUMNS} from taken",
        *TAKE
    )
});

/// The events of `quantity` units of `product` (as it is now) taken for `order_id`.
fn taken_event(product: &Product, quantity: i64, order_id: &str) -> Result<Vec<Event>> {
    Ok(events::stock_changed(
        product,
        product.stock + quantity,
        Reason::Reserve,
        Some(order_id),
    )?)
}

/// Reserves every line of every one of `requests` in one transaction (one commit for all of
/// them), taking the lines in product order across the orders, the order each reserve locks
/// its products in. `None`, and nothing reserved, unless every order could be reserved as
/// asked here: an order id seen before (a repeat, a release), a product unknown or short of
/// stock; the caller then reserves each on its own ([`reserve`]), which tells each its answer.
#[tracing::instrument(skip_all, fields(orders = requests.len()))]
pub async fn reserve_many(
    db: &Db,
    requests: &[ReserveRequest],
) -> Result<Option<Vec<Reservation>>> {
    let now = now();
    let ids: Vec<&str> = requests.iter().map(|r| r.order_id.as_str()).collect();
    let ids = serde_json::to_string(&ids).map_err(anyhow::Error::from)?;
    let mut tx = db.begin().await?;
    let claim = match tx.dialect() {
        Dialect::Postgres => {
            "insert into reservations (order_id, status, created_at, updated_at) \
             select value, 'reserved', $2, $2 from jsonb_array_elements_text($1::jsonb) \
             on conflict do nothing"
        }
        Dialect::Sqlite => {
            "insert into reservations (order_id, status, created_at, updated_at) \
             select value, 'reserved', $2, $2 from json_each($1) where true \
             on conflict do nothing"
        }
    };
    let claimed = query(claim).bind(ids).bind(now).execute(&mut tx).await?;
    if claimed != requests.len() as u64 {
        return Ok(None);
    }
    let mut lines: Vec<(i64, usize, i64)> = requests
        .iter()
        .enumerate()
        .flat_map(|(r, request)| request.items.iter().map(move |&(p, q)| (p, r, q)))
        .collect();
    lines.sort_unstable();
    // Each line's product as that line left it, in line order.
    let taken = match tx.dialect() {
        Dialect::Postgres => take_all(&mut tx, requests, &lines, now).await?,
        Dialect::Sqlite => {
            let mut taken = Vec::with_capacity(lines.len());
            for &(product_id, r, quantity) in &lines {
                let order_id = requests[r].order_id.as_str();
                let Some(product) = take_line(&mut tx, order_id, product_id, quantity, now).await?
                else {
                    return Ok(None);
                };
                taken.push(product);
            }
            Some(taken)
        }
    };
    let Some(taken) = taken else {
        return Ok(None);
    };
    let mut events = Vec::new();
    let mut items: Vec<Vec<ReservationItem>> = vec![Vec::new(); requests.len()];
    for ((product_id, r, quantity), product) in lines.into_iter().zip(taken) {
        let order_id = requests[r].order_id.as_str();
        let Some(line_total) = product.price.times(quantity) else {
            return Ok(None);
        };
        items[r].push(ReservationItem {
            product_id,
            quantity,
            unit_price: product.price,
            line_total,
        });
        events.extend(taken_event(&product, quantity, order_id)?);
    }
    let mut reservations = Vec::with_capacity(requests.len());
    for (request, items) in requests.iter().zip(items) {
        let total = items
            .iter()
            .try_fold(Money::default(), |total, item| total.plus(item.line_total));
        let Some(total) = total else {
            return Ok(None);
        };
        reservations.push(held(request.order_id.clone(), items, total, now));
    }
    kit::outbox::enqueue(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(Some(reservations))
}

/// PostgreSQL, every line of a batch of reserves in one statement (`$1`: the lines as
/// `[order_id, product_id, quantity]`): the products locked in id order (a `for update` applies
/// after its `order by`, and the sums above it need every locked row before the first update),
/// each product's units taken once for all its lines where it has them all, and every line
/// recorded. The products it took from, as they are after.
static TAKE_ALL_PG: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with wanted as ( \
             select value->>0 as order_id, (value->>1)::bigint as product_id, \
                    (value->>2)::bigint as quantity \
             from jsonb_array_elements($1::jsonb)), \
         locked as materialized ( \
             select p.id from products p where p.id in (select product_id from wanted) \
             order by p.id for update of p), \
         taken as ( \
             update products p set stock = p.stock - s.quantity, \
                 reserved = p.reserved + s.quantity, updated_at = $2 \
             from (select k.id, sum(w.quantity)::bigint as quantity \
                   from locked k join wanted w on w.product_id = k.id group by k.id) s \
             where p.id = s.id and p.stock >= s.quantity returning p.*), \
         line as ( \
             insert into reservation_items (order_id, product_id, quantity, unit_price_cents) \
             select w.order_id, w.product_id, w.quantity, t.price_cents \
             from wanted w join taken t on t.id = w.product_id) \
         select {COLUMNS} from taken"
    )
});

/// Takes `lines` (product, request, quantity; in product order) in one statement
/// ([`TAKE_ALL_PG`]): each line's product as that line left it (its units taken in line
/// order, as one statement per line would have), or `None` when a product is unknown or short
/// of its lines' units (the transaction must then be dropped).
async fn take_all(
    tx: &mut Tx,
    requests: &[ReserveRequest],
    lines: &[(i64, usize, i64)],
    now: DateTime<Utc>,
) -> Result<Option<Vec<Product>>> {
    let wanted: Vec<(&str, i64, i64)> = lines
        .iter()
        .map(|&(product_id, r, quantity)| (requests[r].order_id.as_str(), product_id, quantity))
        .collect();
    let wanted = serde_json::to_string(&wanted).map_err(anyhow::Error::from)?;
    let after: Vec<Product> = query(&TAKE_ALL_PG)
        .bind(wanted)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    let mut totals = std::collections::HashMap::<i64, i64>::new();
    for &(product_id, _, quantity) in lines {
        *totals.entry(product_id).or_default() += quantity;
    }
    if after.len() != totals.len() {
        return Ok(None);
    }
    let mut each = Vec::with_capacity(lines.len());
    // Walk each product's lines from its state before the batch.
    let mut current: Option<Product> = None;
    for &(product_id, _, quantity) in lines {
        let mut product = match current.take() {
            Some(product) if product.id == product_id => product,
            _ => {
                let Some(mut product) = after.iter().find(|p| p.id == product_id).cloned() else {
                    return Ok(None);
                };
                let total = totals[&product_id];
                product.stock += total;
                product.reserved -= total;
                product
            }
        };
        product.stock -= quantity;
        product.reserved += quantity;
        each.push(product.clone());
        current = Some(product);
    }
    Ok(Some(each))
}

/// A reservation just made, as written (the read-back would cost two more statements).
fn held(
    order_id: String,
    items: Vec<ReservationItem>,
    total: Money,
    now: DateTime<Utc>,
) -> Reservation {
    Reservation {
        order_id,
        status: ReservationStatus::Reserved,
        items,
        total,
        returned: false,
        created_at: now,
        updated_at: now,
    }
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

/// PostgreSQL, committing the open reservations of one or many orders (the worker commits one
/// per processed order, many at once under load) in one statement, no transaction around it:
/// each closed, and each product's units taken out of `reserved` once for all of them, the
/// products locked first in id order (a `for update` applies after its `order by`), as every
/// writer takes them. The lines of the reservations it closed; an order whose reservation was
/// not open has none.
///
/// The ids are matched as an array literal (`= any($1::text[])`) in a statement planned at each
/// run, so the planner counts them: an index lookup each. Written as `in (select … from
/// jsonb_array_elements_text(…))`, the planner takes the function for 100 rows and hashes them
/// against a sequential scan of the whole table; as `= any(array(select …))` in a plan kept
/// from when the table was new and small, it scanned the table too (1,676 times in one 15 s
/// order run).
const COMMIT_OPEN_MANY: &str = "with closed as ( \
        update reservations set status = 'committed', updated_at = $2 \
        where order_id = any($1::text[]) \
        and status = 'reserved' returning order_id, created_at), \
    lines as materialized ( \
        select i.order_id, i.product_id, i.quantity, i.unit_price_cents, c.created_at \
        from closed c join reservation_items i on i.order_id = c.order_id), \
    locked as materialized ( \
        select p.id from products p where p.id in (select product_id from lines) \
        order by p.id for update of p), \
    sold as ( \
        update products p set reserved = p.reserved - s.quantity, updated_at = $2 \
        from (select l.product_id, sum(l.quantity) as quantity from lines l \
              join locked k on k.id = l.product_id group by l.product_id) s \
        where p.id = s.product_id returning p.id) \
    select order_id, product_id, quantity, unit_price_cents, created_at from lines \
    order by order_id, product_id";

/// Commits the open reservations among `order_ids` together (one statement on PostgreSQL; on
/// SQLite, whose one writer gains nothing from it, none): each order's committed reservation, or
/// `None` where it was not open here (not yet visible, settled before, unknown), which the
/// caller commits with [`commit`] to learn its answer.
#[tracing::instrument(skip_all, fields(orders = order_ids.len()))]
pub async fn commit_open_many(db: &Db, order_ids: &[String]) -> Result<Vec<Option<Reservation>>> {
    if db.dialect() != Dialect::Postgres {
        return Ok(order_ids.iter().map(|_| None).collect());
    }
    let now = now();
    let ids = kit::db::text_array(order_ids);
    /// An order's line, as sold: order, product, quantity, unit price, the reservation's time.
    type Sold = (String, i64, i64, i64, DateTime<Utc>);
    // Planned at each run, so the planner sees how few the ids are: a plan kept from when the
    // table was small scans every reservation.
    let lines: Vec<Sold> = query(COMMIT_OPEN_MANY)
        .planned_each_run()
        .bind(ids)
        .bind(now)
        .fetch_all(db)
        .await?;
    let mut by_order: std::collections::HashMap<String, Vec<Sold>> = Default::default();
    for line in lines {
        by_order.entry(line.0.clone()).or_default().push(line);
    }
    order_ids
        .iter()
        .map(|order_id| {
            let Some(lines) = by_order.remove(order_id) else {
                return Ok(None);
            };
            let created_at = lines[0].4;
            let lines = lines.into_iter().map(|(_, p, q, cents, _)| (p, q, cents));
            let (items, total) = priced(order_id, lines)?;
            Ok(Some(Reservation {
                order_id: order_id.clone(),
                status: ReservationStatus::Committed,
                items,
                total,
                returned: false,
                created_at,
                updated_at: now,
            }))
        })
        .collect()
}

async fn settle(db: &Db, order_id: &str, to: ReservationStatus) -> Result<Reservation> {
    // Committing an open reservation (every processed order does) is one statement, with no
    // transaction around it, on PostgreSQL; anything else takes the general path below.
    if to == ReservationStatus::Committed
        && let Some(Some(reservation)) = commit_open_many(db, &[order_id.to_owned()]).await?.pop()
    {
        return Ok(reservation);
    }
    let now = now();
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

#[cfg(test)]
mod tests {
    use kit::testing::{Backend, TestEnv};

    use super::*;
    use crate::domain::NewProduct;

    async fn product(db: &Db, sku: &str, cents: i64, stock: i64) -> i64 {
        let new = NewProduct {
            name: sku.to_owned(),
            description: String::new(),
            sku: None,
            category: None,
            price: Money::from_cents(cents),
            stock,
            low_stock_threshold: 0,
        };
        crate::store::insert(db, &new, sku)
            .await
            .expect("product")
            .id
    }

    async fn stock(db: &Db, id: i64) -> (i64, i64) {
        query("select stock, reserved from products where id = $1")
            .bind(id)
            .fetch_one::<(i64, i64)>(db)
            .await
            .expect("stock")
    }

    async fn count(db: &Db, sql: &str) -> i64 {
        query(sql).fetch_scalar(db).await.expect("count")
    }

    fn request(order_id: &str, items: &[(i64, i64)]) -> ReserveRequest {
        ReserveRequest {
            order_id: order_id.to_owned(),
            items: items.to_vec(),
        }
    }

    /// Orders reserved together each get their own lines and total, every unit is taken once
    /// and announced; one order that cannot be reserved as asked (short of stock, or an id seen
    /// before) leaves everything as it was.
    async fn orders_reserved_together_are_all_reserved_or_none(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("reservemany").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let a = product(&db, "A-1", 250, 10).await;
        let b = product(&db, "B-1", 1_000, 3).await;

        let together = [
            request("ord-1", &[(a, 2), (b, 1)]),
            request("ord-2", &[(b, 2)]),
            request("ord-3", &[(a, 1)]),
        ];
        let reserved = reserve_many(&db, &together)
            .await
            .expect("reserve")
            .expect("every order can be reserved");
        type Summary<'a> = (&'a str, Vec<(i64, i64)>, i64);
        let summary: Vec<Summary> = reserved
            .iter()
            .map(|r| {
                let lines = r.items.iter().map(|i| (i.product_id, i.quantity)).collect();
                (r.order_id.as_str(), lines, r.total.cents())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("ord-1", vec![(a, 2), (b, 1)], 1_500),
                ("ord-2", vec![(b, 2)], 2_000),
                ("ord-3", vec![(a, 1)], 250),
            ],
            "{backend:?}: each order its own lines, in product order"
        );
        assert_eq!(stock(&db, a).await, (7, 3), "{backend:?}");
        assert_eq!(stock(&db, b).await, (0, 3), "{backend:?}");
        for order in &together {
            let found = find(&db, &order.order_id)
                .await
                .expect("find")
                .expect("stored");
            assert!(
                same_items(&found, order),
                "{backend:?}: {} as stored",
                order.order_id
            );
        }
        // One stock change per line, each from where the line before it left its product.
        let changes: Vec<(String,)> = query("select payload from outbox order by seq")
            .fetch_all(&db)
            .await
            .expect("outbox");
        let changes: Vec<(i64, i64, i64, i64, String)> = changes
            .iter()
            .map(|(payload,)| {
                let event: serde_json::Value = serde_json::from_str(payload).expect("event");
                let d = &event["data"];
                let n = |k: &str| d[k].as_i64().expect("number");
                let order = d["order_id"].as_str().expect("order").to_owned();
                (
                    n("product_id"),
                    n("previous"),
                    n("stock"),
                    n("reserved"),
                    order,
                )
            })
            .collect();
        assert_eq!(
            changes,
            [
                (a, 10, 8, 2, "ord-1".to_owned()),
                (a, 8, 7, 3, "ord-3".to_owned()),
                (b, 3, 2, 1, "ord-1".to_owned()),
                (b, 2, 0, 3, "ord-2".to_owned()),
            ],
            "{backend:?}"
        );

        let short = [request("ord-4", &[(a, 1)]), request("ord-5", &[(b, 1)])];
        let seen = [request("ord-6", &[(a, 1)]), request("ord-2", &[(b, 2)])];
        for refused in [&short[..], &seen[..]] {
            let none = reserve_many(&db, refused).await.expect("reserve");
            assert!(
                none.is_none(),
                "{backend:?}: not every order can be reserved"
            );
        }
        assert_eq!(stock(&db, a).await, (7, 3), "{backend:?}: nothing taken");
        assert_eq!(count(&db, "select count(*) from reservations").await, 3);
        assert_eq!(
            count(&db, "select count(*) from reservation_items").await,
            4
        );
        assert_eq!(count(&db, "select count(*) from outbox").await, 4);
        env.drop_kit_db("reservemany", db).await;
    }

    /// Open reservations committed together each get their own lines back, and every product
    /// gives up its reserved units once; an order whose reservation is not open (committed
    /// before, released, unknown) is left to the one-by-one commit. SQLite commits none
    /// together.
    async fn open_reservations_commit_together(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("commitmany").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let a = product(&db, "A-1", 250, 10).await;
        let b = product(&db, "B-1", 1_000, 10).await;
        for order in [
            request("ord-1", &[(a, 2), (b, 1)]),
            request("ord-2", &[(a, 1)]),
            request("ord-3", &[(b, 3)]),
            request("ord-4", &[(a, 4)]),
            request("ord-5", &[(b, 1)]),
        ] {
            reserve(&db, &order).await.expect("reserve");
        }
        commit(&db, "ord-4").await.expect("commit");
        release(&db, "ord-5").await.expect("release");
        assert_eq!(stock(&db, a).await, (3, 3), "{backend:?}");
        assert_eq!(stock(&db, b).await, (6, 4), "{backend:?}");

        let ids: Vec<String> = ["ord-1", "ord-2", "ord-3", "ord-4", "ord-5", "ord-9"]
            .map(str::to_owned)
            .into();
        let committed = commit_open_many(&db, &ids).await.expect("commit together");
        type Summary = Option<(Vec<(i64, i64)>, i64)>;
        let summary: Vec<Summary> = committed
            .iter()
            .map(|r| {
                r.as_ref().map(|r| {
                    assert_eq!(r.status, ReservationStatus::Committed);
                    let lines = r.items.iter().map(|i| (i.product_id, i.quantity)).collect();
                    (lines, r.total.cents())
                })
            })
            .collect();
        if backend == Backend::Sqlite {
            assert!(summary.iter().all(Option::is_none), "{summary:?}");
            env.drop_kit_db("commitmany", db).await;
            return;
        }
        assert_eq!(
            summary,
            [
                Some((vec![(a, 2), (b, 1)], 1_500)),
                Some((vec![(a, 1)], 250)),
                Some((vec![(b, 3)], 3_000)),
                None,
                None,
                None,
            ]
        );
        assert_eq!(
            stock(&db, a).await,
            (3, 0),
            "sold: out of reserved for good"
        );
        assert_eq!(stock(&db, b).await, (6, 0));
        for id in ["ord-1", "ord-2", "ord-3"] {
            let found = find(&db, id).await.expect("find").expect("stored");
            assert_eq!(found.status, ReservationStatus::Committed, "{id}");
        }
        // Once more: nothing open is left, nothing changes.
        let again = commit_open_many(&db, &ids).await.expect("again");
        assert!(again.iter().all(Option::is_none));
        assert_eq!(stock(&db, a).await, (3, 0));
        env.drop_kit_db("commitmany", db).await;
    }

    kit::on_both_backends!(
        orders_reserved_together_are_all_reserved_or_none,
        open_reservations_commit_together
    );
}
