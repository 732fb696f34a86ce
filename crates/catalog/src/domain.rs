//! What a product and a reservation are, and what valid requests to change them look like.

use chrono::{DateTime, Utc};
use kit::FieldError;
use serde::{Deserialize, Serialize};

use crate::money::Money;

/// Stock and thresholds are whole units, at most a billion.
pub const MAX_UNITS: i64 = 1_000_000_000;
/// The longest category name, in characters (also the longest `?category=` filter).
pub const MAX_CATEGORY_CHARS: usize = 100;

/// A product as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[schema(example = json!({"id": 1, "sku": "SEED-0001", "name": "Laptop",
    "description": "High-performance laptop for professionals", "category": "Electronics",
    "price": 1299.99, "stock": 50, "reserved": 0, "low_stock_threshold": 5,
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"}))]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub category: Option<String>,
    #[sqlx(rename = "price_cents", try_from = "i64")]
    pub price: Money,
    /// Units that can still be sold.
    pub stock: i64,
    /// Units held by open reservations (not sellable, not yet shipped).
    pub reserved: i64,
    /// A `stock.low` event is sent when `stock` falls below this.
    pub low_stock_threshold: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A category, as listed by `GET /api/v1/categories`.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Category {
    pub name: String,
    pub products: i64,
}

/// The body of `POST /products` and of `PUT`/`PATCH /products/{id}`. Seed 001's body
/// (`name, description, price, stock, category`) is accepted as it is; `sku` is generated when
/// absent. Unknown fields are refused (422), so a typo is never silently dropped.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductBody {
    /// Required on create.
    pub name: Option<String>,
    pub description: Option<String>,
    /// Unique; generated when absent.
    pub sku: Option<String>,
    /// At most 100 characters.
    pub category: Option<String>,
    /// Required on create; 0 to 10^11.
    pub price: Option<Money>,
    /// Create only (change it with `PATCH /api/v1/products/{id}/stock`); 0 to 10^9.
    pub stock: Option<i64>,
    pub low_stock_threshold: Option<i64>,
}

/// Validated fields of a new product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProduct {
    pub name: String,
    pub description: String,
    pub sku: Option<String>,
    pub category: Option<String>,
    pub price: Money,
    pub stock: i64,
    pub low_stock_threshold: i64,
}

/// Validated fields of a change: `None` keeps the stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub sku: Option<String>,
    pub category: Option<String>,
    pub price: Option<Money>,
    pub low_stock_threshold: Option<i64>,
}

impl ProductBody {
    /// Checks every field of a new product and reports all problems at once.
    pub fn validate_new(self, default_threshold: i64) -> Result<NewProduct, Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.name.is_none() {
            errors.push(FieldError::new("name", "required", "is required"));
        }
        if self.price.is_none() {
            errors.push(FieldError::new("price", "required", "is required"));
        }
        let stock = check(parse_units(self.stock.unwrap_or(0)), "stock", &mut errors);
        let changes = self.changes(&mut errors);
        match (changes, stock) {
            (
                ProductChanges {
                    name: Some(name),
                    description,
                    sku,
                    category,
                    price: Some(price),
                    low_stock_threshold,
                },
                Some(stock),
            ) if errors.is_empty() => Ok(NewProduct {
                name,
                description: description.unwrap_or_default(),
                sku,
                category,
                price,
                stock,
                low_stock_threshold: low_stock_threshold.unwrap_or(default_threshold),
            }),
            _ => Err(errors),
        }
    }

    /// Checks a change (`PUT`/`PATCH`): at least one field, and no `stock` (stock changes go
    /// through `PATCH /products/{id}/stock`, which never oversells and announces the change).
    pub fn validate_update(self) -> Result<ProductChanges, Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.stock.is_some() {
            errors.push(FieldError::new(
                "stock",
                "use_stock_endpoint",
                "change stock with PATCH /api/v1/products/{id}/stock",
            ));
        }
        let changes = self.changes(&mut errors);
        if changes == ProductChanges::default() && errors.is_empty() {
            errors.push(FieldError::new(
                "body",
                "empty_update",
                "give at least one of name, description, sku, category, price, low_stock_threshold",
            ));
        }
        if errors.is_empty() {
            Ok(changes)
        } else {
            Err(errors)
        }
    }

    fn changes(self, errors: &mut Vec<FieldError>) -> ProductChanges {
        ProductChanges {
            name: self
                .name
                .and_then(|v| check(parse_text(&v, 1, 200), "name", errors)),
            description: self
                .description
                .and_then(|v| check(parse_text(&v, 0, 2000), "description", errors)),
            sku: self.sku.and_then(|v| check(parse_sku(&v), "sku", errors)),
            category: self
                .category
                .and_then(|v| check(parse_text(&v, 1, MAX_CATEGORY_CHARS), "category", errors)),
            price: self
                .price
                .and_then(|v| check(parse_price(v), "price", errors)),
            low_stock_threshold: self
                .low_stock_threshold
                .and_then(|v| check(parse_units(v), "low_stock_threshold", errors)),
        }
    }
}

/// `PATCH /products/{id}/stock`: `{"stock": N}` sets the sellable stock (seed 001), `{"delta": N}`
/// adjusts it (seed 003). Exactly one of them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockBody {
    pub stock: Option<i64>,
    pub delta: Option<i64>,
}

/// A validated stock change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockChange {
    Set(i64),
    Adjust(i64),
}

impl StockBody {
    pub fn validate(self) -> Result<StockChange, Vec<FieldError>> {
        match (self.stock, self.delta) {
            (Some(stock), None) => parse_units(stock)
                .map(StockChange::Set)
                .map_err(|(code, message)| vec![FieldError::new("stock", code, message)]),
            // A range test, not `abs()`: `i64::MIN.abs()` overflows.
            (None, Some(delta)) if (-MAX_UNITS..=MAX_UNITS).contains(&delta) => {
                Ok(StockChange::Adjust(delta))
            }
            (None, Some(_)) => Err(vec![FieldError::new(
                "delta",
                "out_of_range",
                format!("must be between -{MAX_UNITS} and {MAX_UNITS}"),
            )]),
            _ => Err(vec![FieldError::new(
                "body",
                "stock_or_delta",
                "give exactly one of `stock` (set) or `delta` (adjust)",
            )]),
        }
    }
}

/// One line of a reservation request.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveItem {
    pub product_id: i64,
    pub quantity: i64,
}

/// `POST /internal/v1/reservations`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    pub order_id: String,
    pub items: Vec<ReserveItem>,
}

/// A validated reservation request: lines merged per product and sorted by product id, so two
/// reservations always lock rows in the same order (no deadlocks on PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub order_id: String,
    pub items: Vec<(i64, i64)>,
}

impl ReserveBody {
    pub fn validate(self) -> Result<ReserveRequest, Vec<FieldError>> {
        let mut errors = Vec::new();
        let order_id = check(parse_order_id(&self.order_id), "order_id", &mut errors);
        if self.items.is_empty() {
            errors.push(FieldError::new(
                "items",
                "required",
                "give at least one item",
            ));
        }
        if self.items.len() > 100 {
            errors.push(FieldError::new("items", "too_many", "at most 100 items"));
        }
        let mut items: Vec<(i64, i64)> = Vec::new();
        for (i, item) in self.items.iter().enumerate() {
            if item.product_id < 1 {
                errors.push(FieldError::new(
                    format!("items[{i}].product_id"),
                    "invalid",
                    "must be a product id (1 or more)",
                ));
            }
            if !(1..=MAX_UNITS).contains(&item.quantity) {
                errors.push(FieldError::new(
                    format!("items[{i}].quantity"),
                    "out_of_range",
                    format!("must be 1 to {MAX_UNITS}"),
                ));
            }
            match items.iter_mut().find(|(id, _)| *id == item.product_id) {
                // Lines of one product are merged, and the sum is held to the same bound.
                Some((_, quantity)) => *quantity = quantity.saturating_add(item.quantity),
                None => items.push((item.product_id, item.quantity)),
            }
        }
        for &(product_id, quantity) in &items {
            if quantity > MAX_UNITS {
                errors.push(FieldError::new(
                    "items",
                    "out_of_range",
                    format!("the lines of product {product_id} add up to more than {MAX_UNITS}"),
                ));
            }
        }
        items.sort_unstable();
        match order_id {
            Some(order_id) if errors.is_empty() => Ok(ReserveRequest { order_id, items }),
            _ => Err(errors),
        }
    }
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReservationStatus {
    Reserved,
    Committed,
    Released,
}

impl ReservationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Committed => "committed",
            Self::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reserved" => Some(Self::Reserved),
            "committed" => Some(Self::Committed),
            "released" => Some(Self::Released),
            _ => None,
        }
    }
}

/// One reserved line, with the price at the time of reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReservationItem {
    pub product_id: i64,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
}

/// A reservation as returned by the internal API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    pub order_id: String,
    pub status: ReservationStatus,
    pub items: Vec<ReservationItem>,
    /// The sum of the lines, from catalog prices: what the order should charge.
    pub total: Money,
    /// A committed reservation whose units were put back on sale (the order was cancelled).
    pub returned: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn check<T>(
    result: Result<T, (&'static str, String)>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err((code, message)) => {
            errors.push(FieldError::new(field, code, message));
            None
        }
    }
}

/// Trimmed text of `min..=max` characters without control characters (newlines and tabs are
/// fine in descriptions).
pub fn parse_text(raw: &str, min: usize, max: usize) -> Result<String, (&'static str, String)> {
    let value = raw.trim();
    let len = value.chars().count();
    if len < min {
        return Err(("required", "must not be empty".into()));
    }
    if len > max {
        return Err(("length", format!("must be at most {max} characters")));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
    {
        return Err((
            "invalid_characters",
            "must not contain control characters".into(),
        ));
    }
    Ok(value.to_owned())
}

/// 1 to 64 characters: letters, digits, `-`, `_`, `.`; stored uppercased so `abc-1` and `ABC-1`
/// are the same SKU.
pub fn parse_sku(raw: &str) -> Result<String, (&'static str, String)> {
    let value = raw.trim();
    if value.is_empty() || value.len() > 64 {
        return Err(("length", "must be 1 to 64 characters".into()));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err((
            "invalid_characters",
            "may contain only letters, digits, -, _ and .".into(),
        ));
    }
    Ok(value.to_ascii_uppercase())
}

pub fn parse_price(price: Money) -> Result<Money, (&'static str, String)> {
    if price.cents() < 0 {
        return Err(("negative", "must not be negative".into()));
    }
    Ok(price)
}

/// Whole units, 0 to [`MAX_UNITS`].
pub fn parse_units(units: i64) -> Result<i64, (&'static str, String)> {
    if units < 0 {
        return Err(("negative", "must not be negative".into()));
    }
    if units > MAX_UNITS {
        return Err(("out_of_range", format!("must be at most {MAX_UNITS}")));
    }
    Ok(units)
}

/// An order id as the orders service sends it: 1 to 64 characters of letters, digits, `-_.:`.
pub fn parse_order_id(raw: &str) -> Result<String, (&'static str, String)> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err((
            "invalid",
            "must be 1 to 64 letters, digits, -, _, . or :".into(),
        ))
    }
}

/// A SKU for a product created without one (seed 001's bodies have none).
pub fn generated_sku() -> String {
    let id = uuid::Uuid::now_v7()
        .simple()
        .to_string()
        .to_ascii_uppercase();
    // The last 12 hex digits of a v7 id are random; with the millisecond part they make a
    // collision practically impossible (and the unique index would catch it).
    format!("SKU-{}-{}", &id[..12], &id[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> ProductBody {
        serde_json::from_str(json).expect(json)
    }

    #[test]
    fn seed_001_body_is_a_valid_product() {
        let json = r#"{"name": "Laptop", "description": "High-performance laptop",
                       "price": 1299.99, "stock": 50, "category": "Electronics"}"#;
        let product = body(json).validate_new(10).expect("valid");
        assert_eq!(product.price.cents(), 129_999);
        assert_eq!((product.stock, product.low_stock_threshold), (50, 10));
        assert_eq!(product.sku, None, "generated later");
    }

    #[test]
    fn invalid_fields_are_all_reported() {
        let errors = body(r#"{"name": " ", "price": -1, "stock": -5, "sku": "a b"}"#)
            .validate_new(10)
            .expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["stock", "name", "sku", "price"]);
    }

    #[test]
    fn name_and_price_are_required() {
        let errors = body("{}").validate_new(10).expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["name", "price"]);
    }

    #[test]
    fn updates_refuse_stock_and_empty_bodies() {
        let errors = body(r#"{"stock": 3}"#)
            .validate_update()
            .expect_err("stock");
        assert_eq!(errors[0].code, "use_stock_endpoint");
        let errors = body("{}").validate_update().expect_err("empty");
        assert_eq!(errors[0].code, "empty_update");
    }

    #[test]
    fn stock_body_needs_exactly_one_of_stock_or_delta() {
        let parse = |json: &str| {
            serde_json::from_str::<StockBody>(json)
                .expect(json)
                .validate()
        };
        assert_eq!(parse(r#"{"stock": 5}"#), Ok(StockChange::Set(5)));
        assert_eq!(parse(r#"{"delta": -5}"#), Ok(StockChange::Adjust(-5)));
        assert!(parse(r#"{"stock": -1}"#).is_err());
        assert!(parse(r#"{"stock": 1, "delta": 1}"#).is_err());
        assert!(parse("{}").is_err());
    }

    #[test]
    fn reservation_lines_are_merged_and_sorted() {
        let body: ReserveBody = serde_json::from_str(
            r#"{"order_id": "o-1", "items": [{"product_id": 9, "quantity": 1},
                {"product_id": 2, "quantity": 2}, {"product_id": 9, "quantity": 3}]}"#,
        )
        .expect("json");
        let request = body.validate().expect("valid");
        assert_eq!(request.items, [(2, 2), (9, 4)]);
    }

    #[test]
    fn bad_reservations_are_refused_per_field() {
        let body: ReserveBody = serde_json::from_str(
            r#"{"order_id": "", "items": [{"product_id": 0, "quantity": 0}]}"#,
        )
        .expect("json");
        let errors = body.validate().expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["order_id", "items[0].product_id", "items[0].quantity"]
        );
    }

    #[test]
    fn skus_are_normalised_and_generated_unique() {
        assert_eq!(parse_sku(" ab-1 ").as_deref().ok(), Some("AB-1"));
        assert_ne!(generated_sku(), generated_sku());
        assert!(parse_sku(&generated_sku()).is_ok());
    }
}

/// Properties of the stock and reservation arithmetic over every integer, not just the handy
/// ones: nothing panics or wraps, and what is accepted is within the bounds.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn any_units() -> impl Strategy<Value = i64> {
        prop_oneof![
            Just(i64::MIN),
            Just(i64::MAX),
            Just(-MAX_UNITS - 1),
            Just(MAX_UNITS + 1),
            -MAX_UNITS..=MAX_UNITS,
            any::<i64>(),
        ]
    }

    proptest! {
        #[test]
        fn stock_changes_are_bounded(stock in proptest::option::of(any_units()),
                                     delta in proptest::option::of(any_units())) {
            match (StockBody { stock, delta }.validate(), stock, delta) {
                (Ok(StockChange::Set(s)), Some(_), None) => prop_assert!((0..=MAX_UNITS).contains(&s)),
                (Ok(StockChange::Adjust(d)), None, Some(_)) => {
                    prop_assert!((-MAX_UNITS..=MAX_UNITS).contains(&d));
                }
                (Ok(change), _, _) => prop_assert!(false, "accepted {change:?}"),
                (Err(errors), _, _) => prop_assert!(!errors.is_empty()),
            }
        }

        #[test]
        fn reservation_lines_stay_bounded_after_merging(
            lines in proptest::collection::vec((prop_oneof![1..5i64, any::<i64>()], any_units()), 0..120),
        ) {
            let body = ReserveBody {
                order_id: "o-1".into(),
                items: lines
                    .iter()
                    .map(|&(product_id, quantity)| ReserveItem { product_id, quantity })
                    .collect(),
            };
            match body.validate() {
                Ok(request) => {
                    prop_assert!(!request.items.is_empty() && request.items.len() <= 100);
                    prop_assert!(request.items.windows(2).all(|w| w[0].0 < w[1].0), "sorted, one line per product");
                    for &(product_id, quantity) in &request.items {
                        prop_assert!(product_id >= 1);
                        prop_assert!((1..=MAX_UNITS).contains(&quantity));
                        let sum: i128 = lines
                            .iter()
                            .filter(|(id, _)| *id == product_id)
                            .map(|&(_, q)| i128::from(q))
                            .sum();
                        prop_assert_eq!(i128::from(quantity), sum);
                    }
                }
                Err(errors) => prop_assert!(!errors.is_empty()),
            }
        }
    }

    #[test]
    fn the_extreme_deltas_are_refused_not_wrapped() {
        for delta in [
            i64::MIN,
            i64::MIN + 1,
            -MAX_UNITS - 1,
            MAX_UNITS + 1,
            i64::MAX,
        ] {
            let errors = StockBody {
                stock: None,
                delta: Some(delta),
            }
            .validate()
            .expect_err("out of range");
            assert_eq!(
                (errors[0].field.as_str(), errors[0].code.as_str()),
                ("delta", "out_of_range")
            );
        }
    }

    #[test]
    fn merged_lines_over_the_bound_are_refused() {
        let body = ReserveBody {
            order_id: "o-1".into(),
            items: vec![
                ReserveItem {
                    product_id: 7,
                    quantity: MAX_UNITS,
                },
                ReserveItem {
                    product_id: 7,
                    quantity: 1,
                },
            ],
        };
        let errors = body.validate().expect_err("over the bound once merged");
        assert_eq!(errors[0].field, "items");
        assert!(
            errors[0].message.contains("product 7"),
            "{}",
            errors[0].message
        );
    }
}
