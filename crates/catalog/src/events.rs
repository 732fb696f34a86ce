//! The events the catalog announces, written to its outbox in the transaction of the change.
//!
//! | type | when | data |
//! |---|---|---|
//! | `product.created` | a product is created | the product |
//! | `product.updated` | name, price, ... changed | the product |
//! | `product.deleted` | a product is deleted | `{id, sku}` |
//! | `stock.changed` | sellable stock changed (set, adjust, reserve, release) | see [`StockChanged`] |
//! | `stock.low` | stock fell from at or above its threshold to below it | see [`StockLow`] |

use kit::outbox::Event;
use serde::Serialize;

use crate::NAME;
use crate::domain::Product;

/// Why stock changed.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `PATCH /products/{id}/stock` with `{"stock": N}`.
    Set,
    /// `PATCH /products/{id}/stock` with `{"delta": N}`.
    Adjust,
    /// Held for an order.
    Reserve,
    /// An order's hold was released (cancelled or failed).
    Release,
    /// An order's sold units came back (it was cancelled after it was processed).
    Return,
}

#[derive(Debug, Serialize)]
pub struct StockChanged<'a> {
    pub product_id: i64,
    pub sku: &'a str,
    pub previous: i64,
    pub stock: i64,
    pub delta: i64,
    pub reserved: i64,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct StockLow<'a> {
    pub product_id: i64,
    pub sku: &'a str,
    pub name: &'a str,
    pub stock: i64,
    pub threshold: i64,
}

fn key(id: i64) -> String {
    format!("product:{id}")
}

fn event(topic: &str, id: i64, data: &impl Serialize) -> anyhow::Result<Event> {
    Event::new(NAME, topic, key(id), data)
}

pub fn product_created(product: &Product) -> anyhow::Result<Event> {
    event("product.created", product.id, product)
}

pub fn product_updated(product: &Product) -> anyhow::Result<Event> {
    event("product.updated", product.id, product)
}

pub fn product_deleted(id: i64, sku: &str) -> anyhow::Result<Event> {
    event(
        "product.deleted",
        id,
        &serde_json::json!({ "id": id, "sku": sku }),
    )
}

/// `stock.changed` for a product now at `product.stock` (was `previous`), plus `stock.low` when
/// that change crossed the product's threshold downwards.
pub fn stock_changed(
    product: &Product,
    previous: i64,
    reason: Reason,
    order_id: Option<&str>,
) -> anyhow::Result<Vec<Event>> {
    let mut events = vec![event(
        "stock.changed",
        product.id,
        &StockChanged {
            product_id: product.id,
            sku: &product.sku,
            previous,
            stock: product.stock,
            delta: product.stock - previous,
            reserved: product.reserved,
            reason,
            order_id,
        },
    )?];
    let threshold = product.low_stock_threshold;
    if previous >= threshold && product.stock < threshold {
        events.push(event(
            "stock.low",
            product.id,
            &StockLow {
                product_id: product.id,
                sku: &product.sku,
                name: &product.name,
                stock: product.stock,
                threshold,
            },
        )?);
    }
    Ok(events)
}
