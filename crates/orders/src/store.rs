//! The orders service's queries, written once for both backends (see `kit::db`).

use std::sync::LazyLock;

use chrono::{DateTime, Duration as Age, SubsecRound as _, Utc};
use kit::Db;
use kit::db::{Dialect, Executor, Query, Tx, query};
use kit::money::Money;
use kit::outbox::Event;

use crate::domain::{Item, Order, Status};
use crate::error::{Error, Result};
use crate::events;

pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

const COLUMNS: &str = "id, user_id, status, total_cents, client_total_cents, warning, \
                       failure_reason, reservation_id, stock_settled, created_at, updated_at, \
                       processed_at";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub user_id: i64,
    pub status: String,
    pub total_cents: i64,
    pub client_total_cents: Option<i64>,
    pub warning: Option<String>,
    pub failure_reason: Option<String>,
    pub reservation_id: Option<String>,
    pub stock_settled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
}

impl Row {
    pub fn status(&self) -> Result<Status> {
        Status::parse(&self.status)
            .ok_or_else(|| anyhow::anyhow!("unknown order status `{}` stored", self.status).into())
    }

    fn into_order(self, lines: Vec<(i64, i64, i64)>) -> Result<Order> {
        let status = self.status()?;
        let out_of_range = || anyhow::anyhow!("order {} totals beyond the money bound", self.id);
        let mut items = Vec::with_capacity(lines.len());
        for (product_id, quantity, unit_cents) in lines {
            let unit_price = Money::from_cents(unit_cents);
            let line_total = unit_price.times(quantity).ok_or_else(out_of_range)?;
            items.push(Item {
                product_id,
                quantity,
                unit_price,
                line_total,
            });
        }
        let single = (items.len() == 1).then(|| (items[0].product_id, items[0].quantity));
        let total = Money::from_cents(self.total_cents);
        Ok(Order {
            id: self.id,
            user_id: self.user_id,
            status,
            items,
            total,
            total_price: total,
            product_id: single.map(|s| s.0),
            quantity: single.map(|s| s.1),
            client_total_price: self.client_total_cents.map(Money::from_cents),
            warnings: self.warning.into_iter().collect(),
            failure_reason: self.failure_reason,
            created_at: self.created_at,
            updated_at: self.updated_at,
            processed_at: self.processed_at,
        })
    }
}

/// An order to store, its reservation already held.
pub struct NewOrder<'a> {
    /// Set for seeded history only; otherwise the database picks it.
    pub id: Option<i64>,
    pub user_id: i64,
    pub status: Status,
    pub items: &'a [Item],
    pub total: Money,
    pub client_total: Option<Money>,
    pub warning: Option<String>,
    pub reservation_id: Option<&'a str>,
    /// Announce it (`order.created`); seeded history is not announced.
    pub announce: bool,
}

/// Stores an order with its lines and its `order.created` event; returns it.
pub async fn insert(tx: &mut Tx, new: &NewOrder<'_>) -> Result<Order> {
    insert_announcing(tx, new, None).await
}

/// [`insert`], its event pushed to `announced` (for the caller to write) when given.
async fn insert_announcing(
    tx: &mut Tx,
    new: &NewOrder<'_>,
    announced: Option<&mut Vec<Event>>,
) -> Result<Order> {
    let now = now();
    let sql = format!(
        "insert into orders (id, user_id, status, total_cents, client_total_cents, warning, \
         reservation_id, stock_settled, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $7, true, $8, $8) returning {COLUMNS}"
    );
    let row: Row = if new.id.is_some() {
        query(&sql)
            .bind(new.id)
            .bind(new.user_id)
            .bind(new.status.as_str())
            .bind(new.total.cents())
            .bind(new.client_total.map(Money::cents))
            .bind(new.warning.clone())
            .bind(new.reservation_id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
    } else {
        let sql = format!(
            "insert into orders (user_id, status, total_cents, client_total_cents, warning, \
             reservation_id, stock_settled, created_at, updated_at) \
             values ($1, $2, $3, $4, $5, $6, true, $7, $7) returning {COLUMNS}"
        );
        query(&sql)
            .bind(new.user_id)
            .bind(new.status.as_str())
            .bind(new.total.cents())
            .bind(new.client_total.map(Money::cents))
            .bind(new.warning.clone())
            .bind(new.reservation_id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?
    };
    for item in new.items {
        query(
            "insert into order_items (order_id, product_id, quantity, unit_price_cents) \
             values ($1, $2, $3, $4)",
        )
        .bind(row.id)
        .bind(item.product_id)
        .bind(item.quantity)
        .bind(item.unit_price.cents())
        .execute(&mut *tx)
        .await?;
    }
    stored_as(tx, new, row, announced).await
}

/// Stores a new order made on a reservation, taking the reservation's intent in the same
/// transaction (see `create.rs`); `None`, and nothing stored, when the sweep claimed the intent
/// first. On PostgreSQL the intent, the order and its lines are one statement. Its
/// `order.created` event is pushed to `announced`, for the caller to write with the events of
/// the other orders of its transaction (one statement for them all: [`kit::outbox::enqueue`]).
pub async fn insert_reserved(
    tx: &mut Tx,
    new: &NewOrder<'_>,
    announced: &mut Vec<Event>,
) -> Result<Option<Order>> {
    let Some(reservation_id) = new.reservation_id else {
        return Err(anyhow::anyhow!("an order on a reservation without its id").into());
    };
    if tx.dialect() == Dialect::Sqlite || new.id.is_some() || new.items.is_empty() {
        if !take_intent(tx, reservation_id).await? {
            return Ok(None);
        }
        return insert_announcing(tx, new, Some(announced)).await.map(Some);
    }
    let lines: Vec<String> = (0..new.items.len())
        .map(|i| {
            let n = 8 + i * 3;
            format!("(${n}::bigint, ${}::bigint, ${}::bigint)", n + 1, n + 2)
        })
        .collect();
    let sql = format!(
        "with taken as ( \
             delete from reservation_intents where reservation_id = $6 and releasing_at is null \
             returning reservation_id), \
         placed as ( \
             insert into orders (user_id, status, total_cents, client_total_cents, warning, \
             reservation_id, stock_settled, created_at, updated_at) \
             select $1, $2, $3, $4, $5, reservation_id, true, $7, $7 from taken \
             returning {COLUMNS}), \
         lines as ( \
             insert into order_items (order_id, product_id, quantity, unit_price_cents) \
             select placed.id, l.product_id, l.quantity, l.unit_price_cents \
             from placed, (values {}) as l (product_id, quantity, unit_price_cents)) \
         select {COLUMNS} from placed",
        lines.join(", ")
    );
    let mut statement = query(&sql)
        .bind(new.user_id)
        .bind(new.status.as_str())
        .bind(new.total.cents())
        .bind(new.client_total.map(Money::cents))
        .bind(new.warning.clone())
        .bind(reservation_id)
        .bind(now());
    for item in new.items {
        statement = statement
            .bind(item.product_id)
            .bind(item.quantity)
            .bind(item.unit_price.cents());
    }
    let Some(row) = statement.fetch_optional::<Row>(&mut *tx).await? else {
        return Ok(None);
    };
    stored_as(tx, new, row, Some(announced)).await.map(Some)
}

/// PostgreSQL: [`insert_reserved`] for several orders on their reservations, in one statement:
/// each order whose intent is still unclaimed is stored with its lines (in the order given),
/// the others answered `None`; their events pushed to `announced`. Orders with a set id or no
/// lines, and SQLite, take [`insert_reserved`] one at a time.
pub async fn insert_reserved_many(
    tx: &mut Tx,
    orders: &[NewOrder<'_>],
    announced: &mut Vec<Event>,
) -> Result<Vec<Option<Order>>> {
    let one_by_one = tx.dialect() == Dialect::Sqlite
        || orders.len() < 2
        || orders
            .iter()
            .any(|o| o.id.is_some() || o.items.is_empty() || o.reservation_id.is_none());
    if one_by_one {
        let mut stored = Vec::with_capacity(orders.len());
        for new in orders {
            stored.push(insert_reserved(tx, new, announced).await?);
        }
        return Ok(stored);
    }
    let mut wanted = Vec::with_capacity(orders.len());
    let mut lines = Vec::new();
    let mut reservations = Vec::with_capacity(orders.len());
    for (n, new) in orders.iter().enumerate() {
        let reservation_id = new.reservation_id.unwrap_or_default();
        reservations.push(reservation_id);
        wanted.push(serde_json::json!({
            "n": n,
            "user_id": new.user_id,
            "status": new.status.as_str(),
            "total_cents": new.total.cents(),
            "client_total_cents": new.client_total.map(Money::cents),
            "warning": new.warning,
            "reservation_id": reservation_id,
        }));
        for item in new.items {
            lines.push(serde_json::json!({
                "reservation_id": reservation_id,
                "product_id": item.product_id,
                "quantity": item.quantity,
                "unit_price_cents": item.unit_price.cents(),
            }));
        }
    }
    let rows: Vec<Row> = query(&INSERT_RESERVED_MANY)
        .planned_each_run()
        .bind(serde_json::Value::from(wanted).to_string())
        .bind(kit::db::text_array(&reservations))
        .bind(now())
        .bind(serde_json::Value::from(lines).to_string())
        .fetch_all(&mut *tx)
        .await?;
    let mut rows: std::collections::HashMap<String, Row> = rows
        .into_iter()
        .filter_map(|row| Some((row.reservation_id.clone()?, row)))
        .collect();
    let mut stored = Vec::with_capacity(orders.len());
    for (new, reservation_id) in orders.iter().zip(reservations) {
        stored.push(match rows.remove(reservation_id) {
            Some(row) => Some(stored_as(tx, new, row, Some(&mut *announced)).await?),
            None => None,
        });
    }
    Ok(stored)
}

/// [`insert_reserved_many`]'s statement: $1 the orders (`[{n, user_id, status, total_cents,
/// client_total_cents, warning, reservation_id}]`), $2 their reservation ids, $3 the time, $4
/// their lines (`[{reservation_id, product_id, quantity, unit_price_cents}]`). Planned at each
/// run, so the intents are looked up by index however many there are.
static INSERT_RESERVED_MANY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with taken as ( \
             delete from reservation_intents \
             where reservation_id = any($2::text[]) and releasing_at is null \
             returning reservation_id), \
         placed as ( \
             insert into orders (user_id, status, total_cents, client_total_cents, warning, \
             reservation_id, stock_settled, created_at, updated_at) \
             select o.user_id, o.status, o.total_cents, o.client_total_cents, o.warning, \
             o.reservation_id, true, $3, $3 \
             from jsonb_to_recordset($1::jsonb) as o (n bigint, user_id bigint, status text, \
                 total_cents bigint, client_total_cents bigint, warning text, \
                 reservation_id text) \
             join taken t on t.reservation_id = o.reservation_id order by o.n \
             returning {COLUMNS}), \
         lines as ( \
             insert into order_items (order_id, product_id, quantity, unit_price_cents) \
             select placed.id, l.product_id, l.quantity, l.unit_price_cents \
             from placed join jsonb_to_recordset($4::jsonb) as l (reservation_id text, \
                 product_id bigint, quantity bigint, unit_price_cents bigint) \
             on l.reservation_id = placed.reservation_id) \
         select {COLUMNS} from placed"
    )
});

/// The order just stored as `row` with its lines, announced when it is to be: its event
/// written now, or pushed to `announced`.
async fn stored_as(
    tx: &mut Tx,
    new: &NewOrder<'_>,
    row: Row,
    announced: Option<&mut Vec<Event>>,
) -> Result<Order> {
    let lines = new
        .items
        .iter()
        .map(|i| (i.product_id, i.quantity, i.unit_price.cents()))
        .collect();
    let settled = row.stock_settled;
    let order = row.into_order(lines)?;
    if new.announce {
        let event = events::changed(&order, None, settled)?;
        match announced {
            Some(announced) => announced.push(event),
            None => kit::outbox::enqueue(tx, &[event]).await?,
        }
    }
    Ok(order)
}

async fn lines_of(ex: impl Executor<'_>, id: i64) -> sqlx::Result<Vec<(i64, i64, i64)>> {
    query(
        "select product_id, quantity, unit_price_cents from order_items where order_id = $1 \
         order by product_id",
    )
    .bind(id)
    .fetch_all(ex)
    .await
}

/// The order `id`, with its lines.
pub async fn find(db: &Db, id: i64) -> Result<Option<Order>> {
    let sql = format!("select {COLUMNS} from orders where id = $1");
    let Some(row) = query(&sql).bind(id).fetch_optional::<Row>(db).await? else {
        return Ok(None);
    };
    let lines = lines_of(db, id).await?;
    row.into_order(lines).map(Some)
}

/// One page of orders in id order, optionally of one user and one status, and the total count.
pub async fn list(
    db: &Db,
    user_id: Option<i64>,
    status: Option<Status>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Order>, i64)> {
    let filter = "($1 is null or user_id = $1) and ($2 is null or status = $2)";
    let status = status.map(Status::as_str);
    let sql = format!("select {COLUMNS} from orders where {filter} order by id limit $3 offset $4");
    let rows: Vec<Row> = query(&sql)
        .bind(user_id)
        .bind(status)
        .bind(limit)
        .bind(offset)
        .fetch_all(db)
        .await?;
    let lines: Vec<(i64, i64, i64, i64)> = query(&format!(
        "select order_id, product_id, quantity, unit_price_cents from order_items \
         where order_id in (select id from orders where {filter} order by id limit $3 offset $4) \
         order by order_id, product_id"
    ))
    .bind(user_id)
    .bind(status)
    .bind(limit)
    .bind(offset)
    .fetch_all(db)
    .await?;
    let total = query(&format!("select count(*) from orders where {filter}"))
        .bind(user_id)
        .bind(status)
        .fetch_scalar(db)
        .await?;
    let mut orders = Vec::with_capacity(rows.len());
    for row in rows {
        let own = lines
            .iter()
            .filter(|l| l.0 == row.id)
            .map(|l| (l.1, l.2, l.3))
            .collect();
        orders.push(row.into_order(own)?);
    }
    Ok((orders, total))
}

/// What [`transition`] did.
pub enum Moved {
    /// The order moved; its event is in the outbox.
    Now(Box<Order>),
    /// It was in that state already (a repeated request or message): nothing changed.
    Already(Box<Order>),
}

/// Moves order `id` to `to` in `tx` (row locked), with its event; refuses a move the state
/// machine does not allow. `reason` is kept for `failed` and `cancelled`. A move that changes
/// where the stock should be (sold, or back on sale) marks the order's stock unsettled, for the
/// worker to settle with catalog.
pub async fn transition(tx: &mut Tx, id: i64, to: Status, reason: Option<&str>) -> Result<Moved> {
    let sql = format!(
        "select {COLUMNS} from orders where id = $1{}",
        tx.dialect().for_update()
    );
    let row: Row = query(&sql)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound(id))?;
    let from = row.status()?;
    if from == to {
        let lines = lines_of(&mut *tx, id).await?;
        return Ok(Moved::Already(Box::new(row.into_order(lines)?)));
    }
    if !from.can_become(to) {
        return Err(Error::Transition { id, from, to });
    }
    let now = now();
    let unsettled = row.reservation_id.is_some() && from.stock_sold() != to.stock_sold();
    let keep_reason = matches!(to, Status::Failed | Status::Cancelled);
    let sql = format!(
        "update orders set status = $1, updated_at = $2, \
         failure_reason = case when $3 then $4 else failure_reason end, \
         processed_at = case when $5 then $2 else processed_at end, \
         stock_settled = case when $6 then false else stock_settled end \
         where id = $7 returning {COLUMNS}"
    );
    let row: Row = query(&sql)
        .bind(to.as_str())
        .bind(now)
        .bind(keep_reason)
        .bind(reason)
        .bind(to == Status::Processed)
        .bind(unsettled)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    let lines = lines_of(&mut *tx, id).await?;
    let settled = row.stock_settled;
    let order = row.into_order(lines)?;
    kit::outbox::enqueue(tx, &[events::changed(&order, Some(from), settled)?]).await?;
    Ok(Moved::Now(Box::new(order)))
}

/// The worker's decision on order `row` (locked in `tx`, pending or processing): it becomes
/// `to` (processed or failed, with `reason`), its stock already brought in line at catalog.
/// One update, and the events of every state it passed: `order.processing` first when it was
/// still pending, then the decision's.
pub async fn decide(tx: &mut Tx, row: Row, to: Status, reason: Option<&str>) -> Result<Order> {
    let id = row.id;
    let from = row.status()?;
    if !matches!(from, Status::Pending | Status::Processing)
        || !matches!(to, Status::Processed | Status::Failed)
    {
        return Err(Error::Transition { id, from, to });
    }
    let updated: Row = decision(&DECIDE, to, reason, id, now())
        .fetch_one(&mut *tx)
        .await?;
    announce_decided(tx, from, updated).await
}

/// What a decision sets ($1 the status, $2 the time, $3 the reason, $4 whether processed); `{o}`
/// is the table's alias.
fn decision_set(o: &str) -> String {
    format!(
        "set status = $1, updated_at = $2, failure_reason = $3, \
         processed_at = case when $4 then $2 else {o}processed_at end, stock_settled = true"
    )
}

/// [`decide`]'s update of order $5.
static DECIDE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "update orders {} where id = $5 returning {COLUMNS}",
        decision_set("")
    )
});

/// `sql` (one of the decisions) bound for order `id` becoming `to` at `at`.
fn decision<'q>(
    sql: &'q str,
    to: Status,
    reason: Option<&'q str>,
    id: i64,
    at: DateTime<Utc>,
) -> Query<'q> {
    query(sql)
        .bind(to.as_str())
        .bind(at)
        .bind(reason)
        .bind(to == Status::Processed)
        .bind(id)
}

/// An order read while it was undecided (pending or processing), with its lines: what the
/// worker's step needs to write its decision and its events in one statement.
#[derive(Clone)]
pub struct Undecided {
    row: Row,
    lines: Vec<(i64, i64, i64)>,
}

impl Undecided {
    pub fn row(&self) -> &Row {
        &self.row
    }
}

/// Order `id` with its lines if it is undecided now (not locked). On PostgreSQL one statement.
pub async fn undecided(db: &Db, id: i64) -> Result<Option<Undecided>> {
    let due = "status in ('pending', 'processing')";
    if db.dialect() == Dialect::Postgres {
        // The lines as a JSON array of `[product_id, quantity, unit_price_cents]`, in product
        // order (what `lines_of` reads), so the row and its lines are one statement.
        let sql = format!(
            "select {COLUMNS}, (select coalesce(json_agg(json_build_array(i.product_id, \
             i.quantity, i.unit_price_cents) order by i.product_id)::text, '[]') \
             from order_items i where i.order_id = orders.id) as lines \
             from orders where id = $1 and {due}"
        );
        let Some(WithLines { lines, row }) = query(&sql).bind(id).fetch_optional(db).await? else {
            return Ok(None);
        };
        let lines = serde_json::from_str(&lines)
            .map_err(|e| anyhow::anyhow!("order {id}: its lines as read back: {e}"))?;
        return Ok(Some(Undecided { row, lines }));
    }
    let sql = format!("select {COLUMNS} from orders where id = $1 and {due}");
    let Some(row) = query(&sql).bind(id).fetch_optional::<Row>(db).await? else {
        return Ok(None);
    };
    let lines = lines_of(db, id).await?;
    Ok(Some(Undecided { row, lines }))
}

/// PostgreSQL: the orders among `ids` that are undecided now, with their lines (as
/// [`undecided`] reads one), in one statement: each id looked up by its primary key through a
/// lateral subquery, whatever plan the connection kept from when the table was small (see
/// `users::store::find_many`). Each id once; in no particular order.
pub async fn undecided_many(db: &Db, ids: &[i64]) -> Result<Vec<Undecided>> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<WithLines> = query(&UNDECIDED_MANY)
        .bind(kit::db::id_array(&ids))
        .fetch_all(db)
        .await?;
    rows.into_iter()
        .map(|WithLines { lines, row }| {
            let lines = serde_json::from_str(&lines)
                .map_err(|e| anyhow::anyhow!("order {}: its lines as read back: {e}", row.id))?;
            Ok(Undecided { row, lines })
        })
        .collect()
}

static UNDECIDED_MANY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "select o.* from unnest($1::bigint[]) as k (id) cross join lateral ( \
         select {COLUMNS}, (select coalesce(json_agg(json_build_array(i.product_id, \
         i.quantity, i.unit_price_cents) order by i.product_id)::text, '[]') \
         from order_items i where i.order_id = orders.id) as lines \
         from orders where orders.id = k.id and status in ('pending', 'processing') \
         offset 0) as o"
    )
});

/// A row with its lines as a JSON array (see [`undecided`]).
#[derive(sqlx::FromRow)]
struct WithLines {
    lines: String,
    #[sqlx(flatten)]
    row: Row,
}

/// PostgreSQL: decides order `undecided` (as [`decide`] does) if it is still undecided, and
/// writes its events, in one statement: the events are made beforehand from what was read (an
/// order's lines, totals and creation never change, and its other columns are what the decision
/// sets), and written only when the decision happens (`order.processing` only when the order was
/// still pending). `None` when it is not undecided any more (or on SQLite): take the lock with
/// [`lock`] and look.
pub async fn decide_announcing(
    tx: &mut Tx,
    undecided: Undecided,
    to: Status,
    reason: Option<&str>,
) -> Result<Option<Order>> {
    if tx.dialect() != Dialect::Postgres || !matches!(to, Status::Processed | Status::Failed) {
        return Ok(None);
    }
    let Undecided { row, lines } = undecided;
    let id = row.id;
    let at = now();
    let decided = Row {
        status: to.as_str().to_owned(),
        failure_reason: reason.map(str::to_owned),
        processed_at: if to == Status::Processed {
            Some(at)
        } else {
            row.processed_at
        },
        stock_settled: true,
        updated_at: at,
        ..row
    }
    .into_order(lines)?;
    let announced = announcements(&decided, true)?;
    let sql = format!(
        "with due as (select id, status from orders \
             where id = $5 and status in ('pending', 'processing') for update), \
         decided as (update orders o {} from due where o.id = due.id \
             returning due.status as previous), \
         announced as (insert into outbox (id, topic, key, payload, created_at) \
             select e.id, e.topic, e.key, e.payload, e.created_at from decided, \
             (values {}) as e (id, topic, key, payload, created_at) \
             where decided.previous = 'pending' or e.topic <> '{}') \
         select previous from decided",
        decision_set("o."),
        kit::outbox::values(announced.len(), 6),
        Status::Processing.topic()
    );
    let statement = kit::outbox::bind(decision(&sql, to, reason, id, at), &announced)?;
    let previous: Option<String> = statement.fetch_optional_scalar(&mut *tx).await?;
    Ok(previous.map(|_| decided))
}

/// PostgreSQL: [`decide_announcing`] for several orders at once, in one statement: each
/// undecided order (its id once among them) becomes its `to` with its reason, if it is still
/// undecided, with its events written in the order given. Each order's answer in the order
/// given: the order as decided, or `None` when it was not undecided any more (take the lock with
/// [`lock`] and look). The rows are locked in id order, so two of these never wait on each other
/// in a circle.
pub async fn decide_all(
    tx: &mut Tx,
    orders: Vec<(Undecided, Status, Option<&str>)>,
) -> Result<Vec<Option<Order>>> {
    let at = now();
    let mut wanted = Vec::with_capacity(orders.len());
    let mut events = Vec::with_capacity(orders.len() * 2);
    let mut answers = Vec::with_capacity(orders.len());
    for (Undecided { row, lines }, to, reason) in orders {
        if !matches!(to, Status::Processed | Status::Failed) {
            return Err(anyhow::anyhow!("order {}: decided {}", row.id, to.as_str()).into());
        }
        let id = row.id;
        let processed_at = if to == Status::Processed {
            Some(at)
        } else {
            row.processed_at
        };
        let decided = Row {
            status: to.as_str().to_owned(),
            failure_reason: reason.map(str::to_owned),
            processed_at,
            stock_settled: true,
            updated_at: at,
            ..row
        }
        .into_order(lines)?;
        for event in announcements(&decided, true)? {
            events.push(serde_json::json!({
                "n": events.len(),
                "order_id": id,
                "id": event.id.to_string(),
                "topic": event.topic,
                "key": event.key,
                "payload": serde_json::to_string(&event).map_err(anyhow::Error::from)?,
                "created_at": event.occurred_at,
            }));
        }
        wanted.push(serde_json::json!({
            "id": id,
            "status": to.as_str(),
            "reason": reason,
            "processed": to == Status::Processed,
        }));
        answers.push(decided);
    }
    wanted.sort_by_key(|w| w["id"].as_i64());
    let ids: Vec<i64> = answers.iter().map(|order| order.id).collect();
    let decided: Vec<(i64,)> = query(&DECIDE_ALL)
        .planned_each_run()
        .bind(serde_json::Value::from(wanted).to_string())
        .bind(at)
        .bind(serde_json::Value::from(events).to_string())
        .bind(kit::db::id_array(&ids))
        .fetch_all(&mut *tx)
        .await?;
    let decided: std::collections::HashSet<i64> = decided.into_iter().map(|(id,)| id).collect();
    Ok(answers
        .into_iter()
        .map(|order| decided.contains(&order.id).then_some(order))
        .collect())
}

/// [`decide_all`]'s statement: $1 the decisions (`[{id, status, reason, processed}]`, by id),
/// $2 their time, $3 their events (`[{n, order_id, id, topic, key, payload, created_at}]`, `n`
/// the order to write them in), $4 the orders' ids. Each order is found (and locked) by its
/// primary key through a lateral subquery; the update finds its rows by the ids, in a statement
/// planned at each run ([`kit::db::Query::planned_each_run`]) so the planner sees how few they
/// are (a plan kept from when the table was small, or one joining the decisions, which it
/// cannot count, scans the whole table).
static DECIDE_ALL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "with wanted as (select * from jsonb_to_recordset($1::jsonb) \
             as w (id bigint, status text, reason text, processed boolean)), \
         due as materialized (select d.id, d.status as previous, w.status, w.reason, w.processed \
             from wanted w cross join lateral (select id, status from orders \
             where orders.id = w.id and status in ('pending', 'processing') offset 0 for update) d), \
         decided as (update orders o set status = due.status, updated_at = $2, \
             failure_reason = due.reason, \
             processed_at = case when due.processed then $2 else o.processed_at end, \
             stock_settled = true \
             from due where o.id = any($4::bigint[]) and o.id = due.id \
             returning o.id, due.previous), \
         announced as (insert into outbox (id, topic, key, payload, created_at) \
             select e.id, e.topic, e.key, e.payload, e.created_at \
             from jsonb_to_recordset($3::jsonb) \
                 as e (n bigint, order_id bigint, id text, topic text, key text, payload text, \
                 created_at timestamptz) \
             join decided on decided.id = e.order_id \
             where decided.previous = 'pending' or e.topic <> '{}' order by e.n) \
         select id from decided",
        Status::Processing.topic()
    )
});

/// The events of an order just decided (`order`): `order.processing` first when `from_pending`
/// (the state it passed through), then the decision's.
fn announcements(order: &Order, from_pending: bool) -> Result<Vec<kit::outbox::Event>> {
    let mut announced = Vec::with_capacity(2);
    if from_pending {
        let processing = Order {
            status: Status::Processing,
            failure_reason: None,
            processed_at: None,
            ..order.clone()
        };
        announced.push(events::changed(&processing, Some(Status::Pending), true)?);
    }
    announced.push(events::changed(order, Some(Status::Processing), true)?);
    Ok(announced)
}

/// The order just decided (was `from`), with its lines; its events written to the outbox: each
/// state it went through.
async fn announce_decided(tx: &mut Tx, from: Status, updated: Row) -> Result<Order> {
    let lines = lines_of(&mut *tx, updated.id).await?;
    let order = updated.into_order(lines)?;
    let announced = announcements(&order, from == Status::Pending)?;
    kit::outbox::enqueue(tx, &announced).await?;
    Ok(order)
}

/// The order's row, locked for the rest of `tx`.
pub async fn lock(tx: &mut Tx, id: i64) -> Result<Option<Row>> {
    let sql = format!(
        "select {COLUMNS} from orders where id = $1{}",
        tx.dialect().for_update()
    );
    Ok(query(&sql).bind(id).fetch_optional(&mut *tx).await?)
}

/// Records that the order's stock matches its status.
pub async fn mark_settled(tx: &mut Tx, id: i64) -> Result<()> {
    query("update orders set stock_settled = true where id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Orders whose stock is unsettled, or stuck in `status`, since before `older_than` (the
/// worker's sweep: an event it missed, or the in-process bus lost with its process).
pub async fn needing_work(db: &Db, older_than: Age, limit: i64) -> Result<Vec<(i64, Status)>> {
    let before = now() - older_than;
    let rows: Vec<(i64, String)> = query(
        "select id, status from orders where updated_at < $1 and \
         (not stock_settled or status in ('pending', 'processing')) order by id limit $2",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, status)| Status::parse(&status).map(|s| (id, s)))
        .collect())
}

/// Remembers that reservations are being asked of catalog for orders not stored yet: one
/// statement (the ids as one JSON array, so every count is one statement text).
pub async fn insert_intents(db: &Db, reservation_ids: &[String]) -> Result<()> {
    let ids = serde_json::to_string(reservation_ids).map_err(anyhow::Error::from)?;
    let sql = match db.dialect() {
        Dialect::Postgres => {
            "insert into reservation_intents (reservation_id, created_at) \
             select value, $2 from jsonb_array_elements_text($1::jsonb)"
        }
        Dialect::Sqlite => {
            "insert into reservation_intents (reservation_id, created_at) \
             select value, $2 from json_each($1)"
        }
    };
    let inserted = query(sql).bind(ids).bind(now()).execute(db).await?;
    if inserted != reservation_ids.len() as u64 {
        return Err(anyhow::anyhow!(
            "{inserted} of {} reservation intents stored",
            reservation_ids.len()
        )
        .into());
    }
    Ok(())
}

/// The order being stored takes its intent, in the order's transaction; false when the sweep
/// has claimed it ([`claim_intent`]): its reservation is being released, so the order must not
/// be stored. On PostgreSQL the delete waits for a claim in progress and then sees it.
async fn take_intent(tx: &mut Tx, reservation_id: &str) -> Result<bool> {
    Ok(
        query("delete from reservation_intents where reservation_id = $1 and releasing_at is null")
            .bind(reservation_id)
            .execute(&mut *tx)
            .await?
            == 1,
    )
}

/// The sweep claims a stale intent before releasing its reservation; false when it is gone (its
/// order was stored after all). A claim stays, so a release that fails is retried by the next
/// sweep (claiming again is a no-op).
pub async fn claim_intent(db: &Db, reservation_id: &str) -> Result<bool> {
    Ok(query(
        "update reservation_intents set releasing_at = coalesce(releasing_at, $1) \
         where reservation_id = $2",
    )
    .bind(now())
    .bind(reservation_id)
    .execute(db)
    .await?
        == 1)
}

/// The intent is done with (its order is stored, or its reservation released).
pub async fn delete_intent(ex: impl Executor<'_>, reservation_id: &str) -> Result<()> {
    query("delete from reservation_intents where reservation_id = $1")
        .bind(reservation_id)
        .execute(ex)
        .await?;
    Ok(())
}

/// Intents older than `age`: their orders were never stored.
pub async fn stale_intents(db: &Db, age: Age, limit: i64) -> Result<Vec<String>> {
    Ok(query(
        "select reservation_id from reservation_intents where created_at < $1 \
         order by created_at limit $2",
    )
    .bind(now() - age)
    .bind(limit)
    .fetch_all::<(String,)>(db)
    .await?
    .into_iter()
    .map(|(id,)| id)
    .collect())
}

/// Counts by status.
pub async fn counts(db: &Db) -> Result<Vec<(String, i64)>> {
    Ok(
        query("select status, count(*) from orders group by status order by status")
            .fetch_all(db)
            .await?,
    )
}

/// Accepted → processed times (ms) of the most recently processed orders.
pub async fn recent_latencies(db: &Db, limit: i64) -> Result<Vec<i64>> {
    let rows: Vec<(DateTime<Utc>, DateTime<Utc>)> = query(
        "select created_at, processed_at from orders where processed_at is not null \
         order by processed_at desc limit $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(created, processed)| (processed - created).num_milliseconds().max(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use kit::testing::{Backend, TestEnv};

    use super::*;

    fn item(product_id: i64, quantity: i64, cents: i64) -> Item {
        let unit_price = Money::from_cents(cents);
        Item {
            product_id,
            quantity,
            unit_price,
            line_total: unit_price.times(quantity).expect("in range"),
        }
    }

    /// Order of `items` for user 1, stored in `status` without events.
    async fn unannounced(db: &Db, status: Status, items: &[Item]) -> Order {
        let total = items.iter().fold(Money::default(), |t, i| {
            t.plus(i.line_total).expect("in range")
        });
        let mut tx = db.begin().await.expect("begin");
        let order = insert(
            &mut tx,
            &NewOrder {
                id: None,
                user_id: 1,
                status,
                items,
                total,
                client_total: None,
                warning: None,
                reservation_id: None,
                announce: false,
            },
        )
        .await
        .expect("insert");
        tx.commit().await.expect("commit");
        order
    }

    async fn count(db: &Db, sql: &str) -> i64 {
        query(sql).fetch_scalar(db).await.expect("count")
    }

    /// An order on a reservation is stored with its lines and takes its intent; once the sweep has
    /// claimed the intent, nothing is stored.
    async fn an_order_on_a_reservation_takes_its_intent_or_is_not_stored(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("orderstore").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let items = [item(3, 2, 1_500), item(7, 1, 999)];
        let order = |reservation_id| NewOrder {
            id: None,
            user_id: 1,
            status: Status::Pending,
            items: &items,
            total: Money::from_cents(3_999),
            client_total: None,
            warning: None,
            reservation_id: Some(reservation_id),
            announce: true,
        };

        insert_intents(&db, &["ord-kept".to_owned()])
            .await
            .expect("intent");
        let mut tx = db.begin().await.expect("begin");
        let mut announced = Vec::new();
        let stored = insert_reserved(&mut tx, &order("ord-kept"), &mut announced)
            .await
            .expect("insert")
            .expect("stored: the intent was unclaimed");
        kit::outbox::enqueue(&mut tx, &announced)
            .await
            .expect("events");
        tx.commit().await.expect("commit");
        let topics: Vec<&str> = announced.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["order.created"],
            "{backend:?}: its event, to write"
        );
        let found = find(&db, stored.id).await.expect("find").expect("found");
        assert_eq!(found, stored, "{backend:?}: stored as answered");
        assert_eq!(found.items, items, "{backend:?}: with its lines");
        assert_eq!(
            count(&db, "select count(*) from reservation_intents").await,
            0,
            "{backend:?}: the intent is taken"
        );
        assert_eq!(count(&db, "select count(*) from outbox").await, 1);

        insert_intents(&db, &["ord-swept".to_owned()])
            .await
            .expect("intent");
        assert!(claim_intent(&db, "ord-swept").await.expect("claim"));
        let mut tx = db.begin().await.expect("begin");
        let mut announced = Vec::new();
        let refused = insert_reserved(&mut tx, &order("ord-swept"), &mut announced)
            .await
            .expect("insert");
        assert!(refused.is_none(), "{backend:?}: the sweep claimed it");
        assert!(announced.is_empty(), "{backend:?}: nothing to announce");
        tx.commit().await.expect("commit");
        assert_eq!(count(&db, "select count(*) from orders").await, 1);
        assert_eq!(count(&db, "select count(*) from order_items").await, 2);
        assert_eq!(count(&db, "select count(*) from outbox").await, 1);
        env.drop_kit_db("orderstore", db).await;
    }

    /// A decision answers the order with its lines, in product order, and announces every state
    /// it went through; a second decision finds nothing due.
    async fn a_decided_order_comes_back_with_its_lines(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("orderdecide").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let items = [item(7, 1, 999), item(3, 2, 1_500), item(5, 4, 250)];
        let stored = unannounced(&db, Status::Pending, &items).await;

        let read = undecided(&db, stored.id)
            .await
            .expect("read")
            .expect("undecided");
        assert_eq!(read.lines.len(), 3, "{backend:?}: read with its lines");
        let mut tx = db.begin().await.expect("begin");
        let decided = match decide_announcing(&mut tx, read, Status::Processed, None)
            .await
            .expect("decide announcing")
        {
            Some(order) => order,
            None => {
                assert_eq!(
                    backend,
                    Backend::Sqlite,
                    "PostgreSQL decides in one statement"
                );
                let row = lock(&mut tx, stored.id).await.expect("lock").expect("row");
                decide(&mut tx, row, Status::Processed, None)
                    .await
                    .expect("decide")
            }
        };
        tx.commit().await.expect("commit");
        let mut in_order = items.to_vec();
        in_order.sort_by_key(|i| i.product_id);
        assert_eq!(decided.status, Status::Processed, "{backend:?}");
        assert_eq!(
            decided.items, in_order,
            "{backend:?}: its lines, by product"
        );
        assert_eq!(
            find(&db, stored.id).await.expect("find").expect("found"),
            decided,
            "{backend:?}: answered as stored"
        );
        let topics: Vec<String> = query("select topic from outbox order by seq")
            .fetch_all::<(String,)>(&db)
            .await
            .expect("outbox")
            .into_iter()
            .map(|(t,)| t)
            .collect();
        assert_eq!(
            topics,
            ["order.processing", "order.processed"],
            "{backend:?}"
        );

        assert!(
            undecided(&db, stored.id)
                .await
                .expect("read again")
                .is_none(),
            "{backend:?}: nothing due the second time"
        );
        env.drop_kit_db("orderdecide", db).await;
    }

    /// An undecided order read beforehand is decided with its events in one statement on
    /// PostgreSQL: `order.processing` only when it was still pending, and the decision's event
    /// showing the order exactly as stored. A second try finds nothing due.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_undecided_order_is_decided_and_announced_in_one_statement() {
        let mut env = TestEnv::new(Backend::Postgres).await;
        let db = env.kit_db("orderannounce").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let items = [item(7, 1, 999), item(3, 2, 1_500)];
        let mut ids = Vec::new();
        for status in [Status::Pending, Status::Processing] {
            ids.push(unannounced(&db, status, &items).await.id);
        }
        let reason = Some("payment declined (simulated)");
        for (id, to, topics) in [
            (
                ids[0],
                Status::Processed,
                vec!["order.processing", "order.processed"],
            ),
            (ids[1], Status::Failed, vec!["order.failed"]),
        ] {
            let read = undecided(&db, id).await.expect("read").expect("undecided");
            let reason = (to == Status::Failed).then_some(reason).flatten();
            let mut tx = db.begin().await.expect("begin");
            let decided = decide_announcing(&mut tx, read, to, reason)
                .await
                .expect("decide")
                .expect("decided");
            tx.commit().await.expect("commit");
            let found = find(&db, id).await.expect("find").expect("found");
            assert_eq!(decided, found, "order {id}: answered as stored");
            assert_eq!(found.status, to);
            assert_eq!(found.failure_reason.as_deref(), reason);
            let written: Vec<(String, String)> =
                query("select topic, payload from outbox where key = $1 order by seq")
                    .bind(format!("order:{id}"))
                    .fetch_all(&db)
                    .await
                    .expect("outbox");
            let written_topics: Vec<&str> = written.iter().map(|(t, _)| t.as_str()).collect();
            assert_eq!(written_topics, topics, "order {id}");
            let last: serde_json::Value =
                serde_json::from_str(&written.last().expect("an event").1).expect("json");
            let mut shown = serde_json::to_value(&found).expect("order json");
            shown["previous_status"] = "processing".into();
            shown["stock_settled"] = true.into();
            assert_eq!(
                last["data"], shown,
                "order {id}: the event shows the stored order"
            );

            assert!(undecided(&db, id).await.expect("read").is_none(), "decided");
        }
        env.drop_kit_db("orderannounce", db).await;
    }

    /// Undecided orders read together (the worker's batched read, PostgreSQL): each undecided
    /// order among the ids once, exactly as it is read alone; decided and unknown ids give
    /// nothing, and an id asked twice is read once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecided_orders_read_together_are_read_as_alone() {
        let mut env = TestEnv::new(Backend::Postgres).await;
        let db = env.kit_db("orderundecided").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let pending = unannounced(
            &db,
            Status::Pending,
            &[item(7, 1, 999), item(3, 2, 1_500), item(5, 4, 250)],
        )
        .await;
        let processing = unannounced(&db, Status::Processing, &[item(2, 1, 100)]).await;
        let processed = unannounced(&db, Status::Processed, &[item(2, 1, 100)]).await;
        let ids = [
            processed.id,
            pending.id,
            -1,
            processing.id,
            pending.id,
            processing.id + 1_000,
        ];
        let mut together = undecided_many(&db, &ids).await.expect("read together");
        together.sort_by_key(|order| order.row().id);
        let shown = |order: &Undecided| format!("{:?} {:?}", order.row, order.lines);
        let mut alone = Vec::new();
        for id in [pending.id, processing.id] {
            alone.push(undecided(&db, id).await.expect("read").expect("undecided"));
        }
        assert_eq!(
            together.iter().map(shown).collect::<Vec<_>>(),
            alone.iter().map(shown).collect::<Vec<_>>(),
        );
        assert_eq!(together[0].lines.len(), 3, "the pending order's lines");
        assert!(undecided_many(&db, &[]).await.expect("none").is_empty());
        env.drop_kit_db("orderundecided", db).await;
    }

    /// Orders decided together (the worker's group, PostgreSQL): each one still undecided is
    /// decided with its events in the order given, `order.processing` only for one that was
    /// pending; one decided meanwhile is answered `None` and left as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecided_orders_are_decided_together_with_their_events() {
        let mut env = TestEnv::new(Backend::Postgres).await;
        let db = env.kit_db("orderdecideall").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        let items = [item(7, 1, 999), item(3, 2, 1_500)];
        let pending = unannounced(&db, Status::Pending, &items).await;
        let processing = unannounced(&db, Status::Processing, &items).await;
        let late = unannounced(&db, Status::Pending, &items).await;
        let mut read = Vec::new();
        for id in [processing.id, late.id, pending.id] {
            read.push(undecided(&db, id).await.expect("read").expect("undecided"));
        }
        // Decided by someone else between the read and the group's statement.
        let mut tx = db.begin().await.expect("begin");
        let row = lock(&mut tx, late.id).await.expect("lock").expect("row");
        decide(&mut tx, row, Status::Processed, None)
            .await
            .expect("decide");
        tx.commit().await.expect("commit");
        let before: i64 = query("select count(*) from outbox")
            .fetch_scalar(&db)
            .await
            .expect("count");

        let reason = "payment declined (simulated)";
        let mut tx = db.begin().await.expect("begin");
        let decided = decide_all(
            &mut tx,
            read.into_iter()
                .zip([
                    (Status::Failed, Some(reason)),
                    (Status::Processed, None),
                    (Status::Processed, None),
                ])
                .map(|(order, (to, reason))| (order, to, reason))
                .collect(),
        )
        .await
        .expect("decide all");
        tx.commit().await.expect("commit");
        assert!(decided[1].is_none(), "decided meanwhile: not again");
        for (answer, (id, to)) in decided.iter().zip([
            (processing.id, Status::Failed),
            (late.id, Status::Processed),
            (pending.id, Status::Processed),
        ]) {
            let found = find(&db, id).await.expect("find").expect("found");
            assert_eq!(found.status, to, "order {id}");
            if let Some(answer) = answer {
                assert_eq!(answer, &found, "order {id}: answered as stored");
            }
        }
        let failed = find(&db, processing.id)
            .await
            .expect("find")
            .expect("found");
        assert_eq!(failed.failure_reason.as_deref(), Some(reason));
        let written: Vec<(String, String)> =
            query("select key, topic from outbox where seq > $1 order by seq")
                .bind(before)
                .fetch_all(&db)
                .await
                .expect("outbox");
        let key = |id: i64| format!("order:{id}");
        assert_eq!(
            written,
            [
                (key(processing.id), "order.failed".to_owned()),
                (key(pending.id), "order.processing".to_owned()),
                (key(pending.id), "order.processed".to_owned()),
            ],
            "each decision's events, in the order given"
        );
        env.drop_kit_db("orderdecideall", db).await;
    }

    /// Orders on reservations stored together (a batch of creates): each whose intent is still
    /// unclaimed is stored with its lines and takes its intent, in the order given, exactly as
    /// answered; one whose intent the sweep claimed is not stored. On both backends (SQLite
    /// stores them one at a time).
    async fn orders_on_reservations_are_stored_together(backend: Backend) {
        let mut env = TestEnv::new(backend).await;
        let db = env.kit_db("orderplacemany").await;
        db.migrate(&crate::MIGRATIONS).await.expect("migrations");
        fn order<'a>(
            reservation_id: &'a str,
            items: &'a [Item],
            warning: Option<&str>,
        ) -> NewOrder<'a> {
            NewOrder {
                id: None,
                user_id: 1,
                status: Status::Pending,
                items,
                total: items.iter().fold(Money::default(), |t, i| {
                    t.plus(i.line_total).expect("in range")
                }),
                client_total: warning.map(|_| Money::from_cents(1)),
                warning: warning.map(str::to_owned),
                reservation_id: Some(reservation_id),
                announce: true,
            }
        }
        let two = &[item(3, 2, 1_500), item(7, 1, 999)][..];
        let one = &[item(5, 4, 250)][..];
        let ids = ["ord-1", "ord-2", "ord-3", "ord-4"].map(str::to_owned);
        insert_intents(&db, &ids).await.expect("intents");
        assert!(claim_intent(&db, "ord-3").await.expect("claimed"));
        let orders = [
            order("ord-2", two, None),
            order("ord-1", one, Some("the client's total disagrees")),
            order("ord-3", one, None),
            order("ord-4", two, None),
        ];
        let mut tx = db.begin().await.expect("begin");
        let mut announced = Vec::new();
        let stored = insert_reserved_many(&mut tx, &orders, &mut announced)
            .await
            .expect("insert many");
        tx.commit().await.expect("commit");
        let shown: Vec<Option<&str>> = stored
            .iter()
            .map(|o| {
                o.as_ref()
                    .map(|o| o.warnings.first().map_or("", String::as_str))
            })
            .collect();
        assert_eq!(
            shown,
            [
                Some(""),
                Some("the client's total disagrees"),
                None,
                Some("")
            ],
            "{backend:?}: stored but the one whose intent was claimed"
        );
        let stored: Vec<&Order> = stored.iter().flatten().collect();
        assert!(
            stored.windows(2).all(|w| w[0].id < w[1].id),
            "{backend:?}: ids in the order given"
        );
        for (order, items) in stored.iter().zip([two, one, two]) {
            let found = find(&db, order.id).await.expect("find").expect("found");
            assert_eq!(&&found, order, "{backend:?}: stored as answered");
            let mut items = items.to_vec();
            items.sort_by_key(|i| i.product_id);
            assert_eq!(found.items, items, "{backend:?}: with its lines");
        }
        let topics: Vec<&str> = announced.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(topics, ["order.created"; 3], "{backend:?}");
        assert_eq!(
            count(&db, "select count(*) from reservation_intents").await,
            1,
            "{backend:?}: the claimed intent stays, the others are taken"
        );
        assert_eq!(count(&db, "select count(*) from order_items").await, 5);
        env.drop_kit_db("orderplacemany", db).await;
    }

    kit::on_both_backends!(
        orders_on_reservations_are_stored_together,
        an_order_on_a_reservation_takes_its_intent_or_is_not_stored,
        a_decided_order_comes_back_with_its_lines
    );
}
