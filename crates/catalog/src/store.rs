//! The products table: every query written once, in SQL that PostgreSQL and SQLite share, run on
//! whichever pool the service has (see `kit::dispatch!`). Every write commits its events to the
//! outbox in the same transaction.

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::db::BeginWrite as _;
use kit::outbox::OutboxTx as _;
use kit::{Db, dispatch};

use crate::domain::{NewProduct, Product, ProductChanges, StockChange};
use crate::error::{Error, Result};
use crate::events::{self, Reason};

pub const COLUMNS: &str = "id, sku, name, description, category, price_cents, stock, reserved, \
                           low_stock_threshold, created_at, updated_at";

/// Timestamps at the precision both databases keep (microseconds), so what a write returns is
/// exactly what a later read returns.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// `" for update"` on PostgreSQL, where a read that decides a write must lock its row. SQLite
/// needs nothing: a write transaction (`BEGIN IMMEDIATE`) holds the whole database.
pub fn for_update(db: &Db) -> &'static str {
    match db {
        Db::Postgres(_) => " for update",
        Db::Sqlite(_) => "",
    }
}

/// A 409 naming the sku when a write hits its unique index.
fn map_unique(err: sqlx::Error, sku: &str) -> Error {
    if kit::db::violated_column(&err, &["sku"]).is_some() {
        Error::SkuTaken(sku.to_owned())
    } else {
        Error::Database(err)
    }
}

#[tracing::instrument(skip_all)]
pub async fn insert(db: &Db, new: &NewProduct, sku: &str) -> Result<Product> {
    let sql = format!(
        "insert into products (sku, name, description, category, price_cents, stock, \
         low_stock_threshold, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $8) returning {COLUMNS}"
    );
    let now = now();
    dispatch!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let product = sqlx::query_as::<_, Product>(&sql)
            .bind(sku)
            .bind(&new.name)
            .bind(&new.description)
            .bind(&new.category)
            .bind(new.price.cents())
            .bind(new.stock)
            .bind(new.low_stock_threshold)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| map_unique(e, sku))?;
        tx.enqueue(&[events::product_created(&product)?]).await?;
        tx.commit().await?;
        Ok(product)
    })
}

/// Seeds a product with a fixed id (seed data keeps its ids so walkthroughs can use 1, 2, ...),
/// without events. Returns false when the id or sku is already taken.
pub async fn insert_with_id(db: &Db, id: i64, new: &NewProduct, sku: &str) -> Result<bool> {
    let sql = "insert into products (id, sku, name, description, category, price_cents, stock, \
               low_stock_threshold, created_at, updated_at) \
               values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) on conflict do nothing";
    let now = now();
    let inserted = dispatch!(db, pool => sqlx::query(sql)
        .bind(id)
        .bind(sku)
        .bind(&new.name)
        .bind(&new.description)
        .bind(&new.category)
        .bind(new.price.cents())
        .bind(new.stock)
        .bind(new.low_stock_threshold)
        .bind(now)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
    kit::db::sync_identity(db, "products").await?;
    Ok(inserted == 1)
}

#[tracing::instrument(skip(db))]
pub async fn find(db: &Db, id: i64) -> sqlx::Result<Option<Product>> {
    let sql = format!("select {COLUMNS} from products where id = $1");
    dispatch!(db, pool => sqlx::query_as::<_, Product>(&sql).bind(id).fetch_optional(pool).await)
}

/// One page in id order (stable across pages), optionally of one category (matched without
/// regard to case), and the total count of the filter.
#[tracing::instrument(skip(db))]
pub async fn list(
    db: &Db,
    category: Option<&str>,
    limit: i64,
    offset: i64,
) -> sqlx::Result<(Vec<Product>, i64)> {
    let filter = "($1 is null or lower(category) = lower($1))";
    let sql =
        format!("select {COLUMNS} from products where {filter} order by id limit $2 offset $3");
    let count = format!("select count(*) from products where {filter}");
    // `$1 is null` needs a typed parameter on PostgreSQL: bind an Option<String>.
    let category = category.map(str::to_owned);
    let products = dispatch!(db, pool => sqlx::query_as::<_, Product>(&sql)
        .bind(&category)
        .bind(limit)
        .bind(offset)
        .fetch_all(pool)
        .await)?;
    let total = dispatch!(db, pool => sqlx::query_scalar::<_, i64>(&count)
        .bind(&category)
        .fetch_one(pool)
        .await)?;
    Ok((products, total))
}

/// Each category with its number of products, by name. Categories differing only in case are
/// one category (as for the `?category=` filter), shown with the first spelling in sort order.
#[tracing::instrument(skip(db))]
pub async fn categories(db: &Db) -> sqlx::Result<Vec<(String, i64)>> {
    let sql = "select min(category), count(*) from products where category is not null \
               group by lower(category) order by lower(category)";
    dispatch!(db, pool => sqlx::query_as::<_, (String, i64)>(sql).fetch_all(pool).await)
}

/// Changes the given fields; `None` when there is no such product.
#[tracing::instrument(skip_all, fields(id))]
pub async fn update(db: &Db, id: i64, changes: &ProductChanges) -> Result<Option<Product>> {
    let sql = format!(
        "update products set name = coalesce($1, name), description = coalesce($2, description), \
         sku = coalesce($3, sku), category = coalesce($4, category), \
         price_cents = coalesce($5, price_cents), \
         low_stock_threshold = coalesce($6, low_stock_threshold), updated_at = $7 \
         where id = $8 returning {COLUMNS}"
    );
    let now = now();
    let sku = changes.sku.clone().unwrap_or_default();
    dispatch!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let product = sqlx::query_as::<_, Product>(&sql)
            .bind(&changes.name)
            .bind(&changes.description)
            .bind(&changes.sku)
            .bind(&changes.category)
            .bind(changes.price.map(|p| p.cents()))
            .bind(changes.low_stock_threshold)
            .bind(now)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| map_unique(e, &sku))?;
        let Some(product) = product else {
            return Ok(None);
        };
        tx.enqueue(&[events::product_updated(&product)?]).await?;
        tx.commit().await?;
        Ok(Some(product))
    })
}

/// Deletes a product that no open reservation holds.
#[tracing::instrument(skip(db))]
pub async fn delete(db: &Db, id: i64) -> Result<()> {
    let lock = for_update(db);
    let select = format!("select sku, reserved from products where id = $1{lock}");
    dispatch!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let row = sqlx::query_as::<_, (String, i64)>(&select)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some((sku, reserved)) = row else {
            return Err(Error::ProductNotFound(id));
        };
        if reserved > 0 {
            return Err(Error::ProductReserved(id));
        }
        sqlx::query("delete from products where id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.enqueue(&[events::product_deleted(id, &sku)?]).await?;
        tx.commit().await?;
        Ok(())
    })
}

/// Sets or adjusts the sellable stock. Never goes below zero, under any concurrency: an
/// adjustment is one conditional update (`stock + delta >= 0`); a set is absolute and so cannot
/// go negative, and reads the previous value under the row lock for its event.
#[tracing::instrument(skip(db))]
pub async fn change_stock(db: &Db, id: i64, change: StockChange) -> Result<Product> {
    let lock = for_update(db);
    let select_stock = format!("select stock from products where id = $1{lock}");
    let set = format!(
        "update products set stock = $1, updated_at = $2 where id = $3 returning {COLUMNS}"
    );
    let adjust = format!(
        "update products set stock = stock + $1, updated_at = $2 \
         where id = $3 and stock + $1 >= 0 returning {COLUMNS}"
    );
    let now = now();
    dispatch!(db, pool => {
        let mut tx = pool.begin_write().await?;
        let (product, previous, reason) = match change {
            StockChange::Set(stock) => {
                let previous: Option<i64> = sqlx::query_scalar(&select_stock)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let previous = previous.ok_or(Error::ProductNotFound(id))?;
                let product = sqlx::query_as::<_, Product>(&set)
                    .bind(stock)
                    .bind(now)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                (product, previous, Reason::Set)
            }
            StockChange::Adjust(delta) => {
                let product = sqlx::query_as::<_, Product>(&adjust)
                    .bind(delta)
                    .bind(now)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(product) = product else {
                    let available: Option<i64> = sqlx::query_scalar(&select_stock)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    return Err(match available {
                        None => Error::ProductNotFound(id),
                        Some(available) => insufficient(id, -delta, available, "delta"),
                    });
                };
                let previous = product.stock - delta;
                (product, previous, Reason::Adjust)
            }
        };
        // Setting the stock it already has (or a delta of 0) changes nothing worth announcing.
        if product.stock != previous {
            tx.enqueue(&events::stock_changed(&product, previous, reason, None)?).await?;
        }
        tx.commit().await?;
        Ok(product)
    })
}

/// The 409 for a change that would take more units than are sellable.
pub fn insufficient(product_id: i64, requested: i64, available: i64, field: &str) -> Error {
    Error::InsufficientStock {
        detail: format!(
            "Product {product_id} has {available} units in stock; {requested} were requested"
        ),
        errors: vec![kit::FieldError::new(
            field,
            "insufficient_stock",
            format!("product {product_id} has only {available} units in stock"),
        )],
    }
}

/// Figures for `/api/v1/products/stats`.
#[derive(Debug, serde::Serialize)]
pub struct Totals {
    pub products: i64,
    pub categories: i64,
    pub units_in_stock: i64,
    pub units_reserved: i64,
}

pub async fn totals(db: &Db) -> sqlx::Result<Totals> {
    let sql = "select count(*), count(distinct lower(category)), \
               cast(coalesce(sum(stock), 0) as bigint), cast(coalesce(sum(reserved), 0) as bigint) \
               from products";
    let (products, categories, units_in_stock, units_reserved) = dispatch!(db, pool =>
        sqlx::query_as::<_, (i64, i64, i64, i64)>(sql).fetch_one(pool).await)?;
    Ok(Totals {
        products,
        categories,
        units_in_stock,
        units_reserved,
    })
}
