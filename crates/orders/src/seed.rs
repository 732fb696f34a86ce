//! `agora seed`: seed 001's 8 orders, with their ids, users, products, statuses and totals.
//!
//! They are history: imported without events and without reservations (catalog's seeded stock
//! is what is left after them), so the worker moves the pending and processing ones on like any
//! other order but changes no stock for them.

use anyhow::Context as _;
use kit::money::Money;
use kit::service::Deps;
use serde::Deserialize;

use crate::domain::{Item, Status};
use crate::store::{self, NewOrder};

/// Seed 001's orders (its `database/init.sql`, as JSON).
const SEED_001: &str = include_str!("../seed/seed-001-orders.json");

#[derive(Deserialize)]
struct SeedFile {
    orders: Vec<SeedOrder>,
}

#[derive(Deserialize)]
struct SeedOrder {
    id: i64,
    user_id: i64,
    product_id: i64,
    quantity: i64,
    total_price: Money,
    status: Status,
}

/// Inserts the orders that are not there yet (by id). Returns what it did.
pub async fn seed(deps: Deps) -> anyhow::Result<String> {
    let file: SeedFile =
        serde_json::from_str(SEED_001).context("parsing the built-in seed data")?;
    let db = deps.db()?;
    let mut tx = db.begin().await?;
    let mut added = 0;
    for order in &file.orders {
        let exists: Option<i64> = kit::db::query("select id from orders where id = $1")
            .bind(order.id)
            .fetch_optional_scalar(&mut tx)
            .await?;
        if exists.is_some() {
            continue;
        }
        let unit = order.total_price.cents() / order.quantity.max(1);
        let item = Item {
            product_id: order.product_id,
            quantity: order.quantity,
            unit_price: Money::from_cents(unit),
            line_total: order.total_price,
        };
        store::insert(
            &mut tx,
            &NewOrder {
                id: Some(order.id),
                user_id: order.user_id,
                status: order.status,
                items: std::slice::from_ref(&item),
                total: order.total_price,
                client_total: None,
                warning: None,
                reservation_id: None,
                announce: false,
            },
        )
        .await
        .map_err(|err| {
            anyhow::anyhow!("seeding order {}: {}", order.id, kit::ApiError::from(err))
        })?;
        added += 1;
    }
    kit::db::sync_identity(&mut tx, "orders").await?;
    tx.commit().await?;
    Ok(format!(
        "orders: {added} added, {} already present",
        file.orders.len() - added
    ))
}
