//! `agora seed`: seed 001's products, with their ids (so walkthroughs can use 1, 2, ...), and the
//! products the other seeds' walkthroughs order (seed 002's "Pro Keyboard", seed 003's 123).

use anyhow::Context as _;
use kit::service::Deps;
use serde::Deserialize;

use crate::domain::NewProduct;
use crate::money::Money;
use crate::{CatalogSettings, store};

/// Seed 001's products (its `database/init.sql`, as JSON).
const SEED_001: &str = include_str!("../seed/seed-001-products.json");
/// The products the other seeds' walkthroughs order (seed 002's "Pro Keyboard", seed 003's 123).
const WALKTHROUGHS: &str = include_str!("../seed/walkthrough-products.json");

#[derive(Deserialize)]
struct SeedFile {
    products: Vec<SeedProduct>,
}

#[derive(Deserialize)]
struct SeedProduct {
    id: i64,
    name: String,
    description: String,
    price: Money,
    stock: i64,
    category: String,
}

/// Inserts the products that are not there yet (by id or sku), without events, with sku
/// `SEED-0001`, ... and the configured low-stock threshold. Returns what it did.
pub async fn seed(deps: Deps) -> anyhow::Result<String> {
    let mut file: SeedFile =
        serde_json::from_str(SEED_001).context("parsing the built-in seed data")?;
    let walkthroughs: SeedFile =
        serde_json::from_str(WALKTHROUGHS).context("parsing the built-in seed data")?;
    file.products.extend(walkthroughs.products);
    let threshold = CatalogSettings::load(&deps.settings)?.low_stock_threshold;
    let db = deps.db()?;
    let mut tx = db.begin().await?;
    let mut added = 0;
    for product in &file.products {
        let new = NewProduct {
            name: product.name.clone(),
            description: product.description.clone(),
            sku: None,
            category: Some(product.category.clone()),
            price: product.price,
            stock: product.stock,
            low_stock_threshold: threshold,
        };
        let sku = format!("SEED-{:04}", product.id);
        if store::insert_with_id(&mut tx, product.id, &new, &sku).await? {
            added += 1;
        }
    }
    kit::db::sync_identity(&mut tx, "products").await?;
    tx.commit().await?;
    Ok(format!(
        "products: {added} added, {} already present",
        file.products.len() - added
    ))
}
