//! The products table: every query written once, in SQL that PostgreSQL and SQLite share, run on
//! the pool or on the transaction of a write (which writes the write's events to the outbox
//! before it commits, see `routes`).

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::db::{Db, Executor, ResultExt as _, Tx, query};

use crate::domain::{Category, MAX_UNITS, NewProduct, Product, ProductChanges, StockChange};
use crate::error::{Error, Result};

pub const COLUMNS: &str = "id, sku, name, description, category, price_cents, stock, reserved, \
                           low_stock_threshold, created_at, updated_at";

/// The unique constraint on `products.sku` (PostgreSQL's default name; kit derives the same name
/// from SQLite's message).
const SKU_KEY: &str = "products_sku_key";

/// Timestamps at the precision both databases keep (microseconds), so what a write returns is
/// exactly what a later read returns.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[tracing::instrument(skip_all)]
pub async fn insert(ex: impl Executor<'_>, new: &NewProduct, sku: &str) -> Result<Product> {
    let sql = format!(
        "insert into products (sku, name, description, category, price_cents, stock, \
         low_stock_threshold, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $8) returning {COLUMNS}"
    );
    query(&sql)
        .bind(sku)
        .bind(&new.name)
        .bind(&new.description)
        .bind(&new.category)
        .bind(new.price.cents())
        .bind(new.stock)
        .bind(new.low_stock_threshold)
        .bind(now())
        .fetch_one(ex)
        .await
        .on_constraint(SKU_KEY, || Error::SkuTaken(sku.to_owned()))
}

/// Seeds a product with a fixed id, without events. Returns false when the id or sku is already
/// taken. Sync the identity afterwards (`kit::db::sync_identity`).
pub async fn insert_with_id(
    ex: impl Executor<'_>,
    id: i64,
    new: &NewProduct,
    sku: &str,
) -> sqlx::Result<bool> {
    let inserted = query(
        "insert into products (id, sku, name, description, category, price_cents, stock, \
         low_stock_threshold, created_at, updated_at) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) on conflict do nothing",
    )
    .bind(id)
    .bind(sku)
    .bind(&new.name)
    .bind(&new.description)
    .bind(&new.category)
    .bind(new.price.cents())
    .bind(new.stock)
    .bind(new.low_stock_threshold)
    .bind(now())
    .execute(ex)
    .await?;
    Ok(inserted == 1)
}

#[tracing::instrument(skip(ex))]
pub async fn find(ex: impl Executor<'_>, id: i64) -> sqlx::Result<Option<Product>> {
    let sql = format!("select {COLUMNS} from products where id = $1");
    query(&sql).bind(id).fetch_optional(ex).await
}

/// The product a client named by sku or by name (both without regard to case); a sku match wins,
/// then the oldest product of that name.
#[tracing::instrument(skip(db))]
pub async fn find_by_item(db: &Db, item: &str) -> sqlx::Result<Option<Product>> {
    let sql = format!(
        "select {COLUMNS} from products where lower(sku) = lower($1) or lower(name) = lower($1) \
         order by case when lower(sku) = lower($1) then 0 else 1 end, id limit 1"
    );
    query(&sql).bind(item).fetch_optional(db).await
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
    // `$1 is null` needs a typed parameter on PostgreSQL: `Option<&str>` binds a typed NULL.
    let filter = "($1 is null or lower(category) = lower($1))";
    let sql =
        format!("select {COLUMNS} from products where {filter} order by id limit $2 offset $3");
    let products = query(&sql)
        .bind(category)
        .bind(limit)
        .bind(offset)
        .fetch_all(db)
        .await?;
    let count = format!("select count(*) from products where {filter}");
    let total = query(&count).bind(category).fetch_scalar(db).await?;
    Ok((products, total))
}

/// Each category with its number of products, by name. Categories differing only in case are
/// one category (as for the `?category=` filter), shown with the first spelling in sort order.
#[tracing::instrument(skip(ex))]
pub async fn categories(ex: impl Executor<'_>) -> sqlx::Result<Vec<Category>> {
    query(
        "select min(category) as name, count(*) as products from products \
         where category is not null group by lower(category) order by lower(category)",
    )
    .fetch_all(ex)
    .await
}

/// Changes the given fields; `None` when there is no such product.
#[tracing::instrument(skip_all, fields(id))]
pub async fn update(
    ex: impl Executor<'_>,
    id: i64,
    changes: &ProductChanges,
) -> Result<Option<Product>> {
    let sql = format!(
        "update products set name = coalesce($1, name), description = coalesce($2, description), \
         sku = coalesce($3, sku), category = coalesce($4, category), \
         price_cents = coalesce($5, price_cents), \
         low_stock_threshold = coalesce($6, low_stock_threshold), updated_at = $7 \
         where id = $8 returning {COLUMNS}"
    );
    query(&sql)
        .bind(&changes.name)
        .bind(&changes.description)
        .bind(&changes.sku)
        .bind(&changes.category)
        .bind(changes.price.map(|p| p.cents()))
        .bind(changes.low_stock_threshold)
        .bind(now())
        .bind(id)
        .fetch_optional(ex)
        .await
        .on_constraint(SKU_KEY, || {
            Error::SkuTaken(changes.sku.clone().unwrap_or_default())
        })
}

/// Deletes a product that no open reservation holds; returns its sku.
#[tracing::instrument(skip(tx))]
pub async fn delete(tx: &mut Tx, id: i64) -> Result<String> {
    let select = format!(
        "select sku, reserved from products where id = $1{}",
        tx.dialect().for_update()
    );
    let (sku, reserved): (String, i64) = query(&select)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::ProductNotFound(id))?;
    if reserved > 0 {
        return Err(Error::ProductReserved(id));
    }
    query("delete from products where id = $1")
        .bind(id)
        .execute(tx)
        .await?;
    Ok(sku)
}

/// Sets or adjusts the sellable stock; returns the product and its previous stock. Never goes
/// below zero nor above [`MAX_UNITS`] (with the reserved units), under any concurrency: an
/// adjustment is one conditional update (`stock + delta >= 0`); a set is absolute and so cannot go negative, and reads the previous
/// value under the row lock for its event.
#[tracing::instrument(skip(tx))]
pub async fn change_stock(tx: &mut Tx, id: i64, change: StockChange) -> Result<(Product, i64)> {
    match change {
        StockChange::Set(stock) => {
            let previous = locked_stock(tx, id)
                .await?
                .ok_or(Error::ProductNotFound(id))?;
            let sql = format!(
                "update products set stock = $1, updated_at = $2 \
                 where id = $3 and $1 + reserved <= $4 returning {COLUMNS}"
            );
            let product: Option<Product> = query(&sql)
                .bind(stock)
                .bind(now())
                .bind(id)
                .bind(MAX_UNITS)
                .fetch_optional(tx)
                .await?;
            // The row is locked and exists: only the bound can have refused it.
            let product = product.ok_or_else(|| over_the_bound(id, "stock"))?;
            Ok((product, previous))
        }
        StockChange::Adjust(delta) => {
            let sql = format!(
                "update products set stock = stock + $1, updated_at = $2 \
                 where id = $3 and stock + $1 >= 0 and stock + $1 + reserved <= $4 \
                 returning {COLUMNS}"
            );
            let product: Option<Product> = query(&sql)
                .bind(delta)
                .bind(now())
                .bind(id)
                .bind(MAX_UNITS)
                .fetch_optional(&mut *tx)
                .await?;
            match product {
                Some(product) => {
                    let previous = product.stock - delta;
                    Ok((product, previous))
                }
                None => Err(match locked_stock(tx, id).await? {
                    None => Error::ProductNotFound(id),
                    Some(available) if delta < 0 => insufficient(id, -delta, available),
                    Some(_) => over_the_bound(id, "delta"),
                }),
            }
        }
    }
}

/// The sellable stock, with the row locked until the transaction ends.
async fn locked_stock(tx: &mut Tx, id: i64) -> sqlx::Result<Option<i64>> {
    let sql = format!(
        "select stock from products where id = $1{}",
        tx.dialect().for_update()
    );
    query(&sql).bind(id).fetch_optional_scalar(tx).await
}

/// The 422 for a change that would make a product hold more than [`MAX_UNITS`] units (sellable
/// and reserved together, so releasing a reservation can never exceed it either).
fn over_the_bound(product_id: i64, field: &str) -> Error {
    Error::Invalid(vec![kit::FieldError::new(
        field,
        "out_of_range",
        format!("product {product_id} would hold more than {MAX_UNITS} units (stock + reserved)"),
    )])
}

/// The 409 for an adjustment that would take more units than are sellable.
fn insufficient(product_id: i64, requested: i64, available: i64) -> Error {
    Error::InsufficientStock {
        detail: format!(
            "Product {product_id} has {available} units in stock; {requested} were requested"
        ),
        errors: vec![kit::FieldError::new(
            "delta",
            "insufficient_stock",
            format!("product {product_id} has only {available} units in stock"),
        )],
    }
}

/// Figures for `/api/v1/products/stats`.
#[derive(Debug, sqlx::FromRow)]
pub struct Totals {
    pub products: i64,
    pub categories: i64,
    pub units_in_stock: i64,
    pub units_reserved: i64,
}

pub async fn totals(ex: impl Executor<'_>) -> sqlx::Result<Totals> {
    query(
        "select count(*) as products, count(distinct lower(category)) as categories, \
         cast(coalesce(sum(stock), 0) as bigint) as units_in_stock, \
         cast(coalesce(sum(reserved), 0) as bigint) as units_reserved \
         from products",
    )
    .fetch_one(ex)
    .await
}
