//! What an order is, and what a request to make one may say.
//!
//! Three request shapes are accepted, one per seed:
//! - seed 003: `{"items": [{"product_id": 123 | "123", "quantity": 2}]}`
//! - seed 001: `{"user_id": 1, "product_id": 2, "quantity": 2, "total_price": 1998.00}`
//! - seed 002: `{"user_id": 1, "item": "Pro Keyboard", "quantity": 2}` (`item`: a name or a sku)
//!
//! Lines of one product are merged and sorted by product, so the reservation always takes rows
//! in the same order. A client's `total_price` is never used: the total comes from catalog's
//! prices, and a different client total is a warning (or a 422 in strict mode).

use chrono::{DateTime, Utc};
use kit::FieldError;
use kit::money::Money;
use serde::{Deserialize, Deserializer, Serialize};

/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Most units of one product in one order (catalog's own bound per product).
pub const MAX_QUANTITY: i64 = 1_000_000_000;
/// Longest `item` (a product name or sku).
pub const MAX_ITEM_CHARS: usize = 200;

/// An order's place in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Processing,
    Processed,
    Shipped,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Processing,
        Status::Processed,
        Status::Shipped,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Processed => "processed",
            Status::Shipped => "shipped",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The states this one may move to: pending → processing → processed → shipped → completed;
    /// processing → failed; pending, processing or processed → cancelled.
    pub fn next(self) -> &'static [Status] {
        match self {
            Status::Pending => &[Status::Processing, Status::Cancelled],
            Status::Processing => &[Status::Processed, Status::Failed, Status::Cancelled],
            Status::Processed => &[Status::Shipped, Status::Cancelled],
            Status::Shipped => &[Status::Completed],
            Status::Completed | Status::Failed | Status::Cancelled => &[],
        }
    }

    pub fn can_become(self, to: Status) -> bool {
        self.next().contains(&to)
    }

    /// Where the order's stock should be: `Some(true)` sold (committed), `Some(false)` back on
    /// sale (released, or returned if it had been sold), `None` still held.
    pub fn stock_sold(self) -> Option<bool> {
        match self {
            Status::Pending | Status::Processing => None,
            Status::Processed | Status::Shipped | Status::Completed => Some(true),
            Status::Failed | Status::Cancelled => Some(false),
        }
    }

    /// The event a move to this state announces.
    pub fn topic(self) -> &'static str {
        match self {
            Status::Pending => "order.created",
            Status::Processing => "order.processing",
            Status::Processed => "order.processed",
            Status::Shipped => "order.shipped",
            Status::Completed => "order.completed",
            Status::Failed => "order.failed",
            Status::Cancelled => "order.cancelled",
        }
    }
}

/// One line of an order, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = OrderItem)]
pub struct Item {
    pub product_id: i64,
    pub quantity: i64,
    pub unit_price: Money,
    pub line_total: Money,
}

/// An order, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub status: Status,
    pub items: Vec<Item>,
    pub total: Money,
    /// Seed 001's name for the total.
    pub total_price: Money,
    /// Seed 001's single-product shape, for orders of one product.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<i64>,
    /// The total the client sent, when it sent one (never used to charge).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_total_price: Option<Money>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
}

/// A product id as a JSON number or a numeric string (seed 003 sends `"123"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub i64);

/// In documents: an integer, or a string of digits.
impl utoipa::PartialSchema for Id {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Integer, Type::String]))
            .description(Some("An id, as a number or a numeric string (`\"123\"`)"))
            .examples([serde_json::json!(2)])
            .build()
            .into()
    }
}

impl utoipa::ToSchema for Id {}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Id(n)),
            Raw::Text(text) => text
                .trim()
                .parse()
                .map(Id)
                .map_err(|_| serde::de::Error::custom(format!("`{text}` is not an id"))),
        }
    }
}

/// A line as a client sends it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    pub product_id: Option<Id>,
    /// A product name or sku, instead of `product_id`.
    pub item: Option<String>,
    pub quantity: i64,
}

/// `POST /api/v1/orders`, any of the seeds' shapes.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Whose order; with a token it may be left out (a user orders only for themselves).
    pub user_id: Option<Id>,
    /// Lines (seed 003); or the single-product fields below (seeds 001 and 002).
    pub items: Option<Vec<LineBody>>,
    pub product_id: Option<Id>,
    /// A product name or sku instead of `product_id` (seed 002).
    pub item: Option<String>,
    pub quantity: Option<i64>,
    /// The total the client expects (seed 001; `total` is its alias): never charged, a mismatch
    /// is reported in `warnings`.
    #[serde(alias = "total")]
    pub total_price: Option<Money>,
}

/// Which product a line means.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum ProductRef {
    Id(i64),
    /// A name or sku, looked up in catalog.
    Item(String),
}

/// A line to order, with the request field it came from (for errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    #[serde(skip)]
    pub field: String,
    pub product: ProductRef,
    pub quantity: i64,
}

/// A valid request to order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateOrder {
    pub user_id: i64,
    pub lines: Vec<Line>,
    pub client_total: Option<Money>,
}

impl CreateBody {
    /// Checks every field; `caller` is the authenticated user, if any (then `user_id` may be
    /// left out, and must be the caller's when given).
    pub fn validate(self, caller: Option<i64>) -> Result<CreateOrder, Vec<FieldError>> {
        let mut errors = Vec::new();
        let user_id = match (self.user_id, caller) {
            (Some(Id(id)), _) if id < 1 => {
                errors.push(FieldError::new(
                    "user_id",
                    "invalid",
                    "must be a user id (1 or more)",
                ));
                0
            }
            (Some(Id(id)), Some(caller)) if id != caller => {
                errors.push(FieldError::new(
                    "user_id",
                    "not_yours",
                    "orders are created for the authenticated user only",
                ));
                0
            }
            (Some(Id(id)), _) => id,
            (None, Some(caller)) => caller,
            (None, None) => {
                errors.push(FieldError::new(
                    "user_id",
                    "required",
                    "give the user ordering",
                ));
                0
            }
        };
        let single = self.product_id.is_some() || self.item.is_some() || self.quantity.is_some();
        let bodies: Vec<(String, LineBody)> = match (self.items, single) {
            (Some(_), true) => {
                errors.push(FieldError::new(
                    "items",
                    "ambiguous",
                    "give either `items` or one `product_id`/`item` with `quantity`, not both",
                ));
                Vec::new()
            }
            (Some(items), false) => {
                if items.is_empty() {
                    errors.push(FieldError::new(
                        "items",
                        "required",
                        "give at least one item",
                    ));
                }
                if items.len() > MAX_LINES {
                    errors.push(FieldError::new(
                        "items",
                        "too_many",
                        format!("at most {MAX_LINES} items"),
                    ));
                }
                items
                    .into_iter()
                    .take(MAX_LINES)
                    .enumerate()
                    .map(|(i, line)| (format!("items[{i}]."), line))
                    .collect()
            }
            (None, _) => match self.quantity {
                Some(quantity) => vec![(
                    String::new(),
                    LineBody {
                        product_id: self.product_id,
                        item: self.item,
                        quantity,
                    },
                )],
                None => {
                    errors.push(FieldError::new(
                        if single { "quantity" } else { "items" },
                        "required",
                        "give `items`, or `product_id` (or `item`) with `quantity`",
                    ));
                    Vec::new()
                }
            },
        };
        let mut lines: Vec<Line> = Vec::new();
        for (prefix, body) in bodies {
            let product = match (body.product_id, body.item) {
                (Some(Id(id)), None) if id >= 1 => Some(ProductRef::Id(id)),
                (Some(_), None) => {
                    errors.push(FieldError::new(
                        format!("{prefix}product_id"),
                        "invalid",
                        "must be a product id (1 or more)",
                    ));
                    None
                }
                (None, Some(item)) => {
                    let item = item.trim().to_owned();
                    if item.is_empty() || item.chars().count() > MAX_ITEM_CHARS {
                        errors.push(FieldError::new(
                            format!("{prefix}item"),
                            "invalid",
                            format!("a product name or sku of 1 to {MAX_ITEM_CHARS} characters"),
                        ));
                        None
                    } else {
                        Some(ProductRef::Item(item))
                    }
                }
                (Some(_), Some(_)) => {
                    errors.push(FieldError::new(
                        format!("{prefix}product_id"),
                        "ambiguous",
                        "give `product_id` or `item`, not both",
                    ));
                    None
                }
                (None, None) => {
                    errors.push(FieldError::new(
                        format!("{prefix}product_id"),
                        "required",
                        "give `product_id` (or `item`: a product name or sku)",
                    ));
                    None
                }
            };
            if !(1..=MAX_QUANTITY).contains(&body.quantity) {
                errors.push(FieldError::new(
                    format!("{prefix}quantity"),
                    "out_of_range",
                    format!("must be 1 to {MAX_QUANTITY}"),
                ));
                continue;
            }
            let Some(product) = product else { continue };
            match lines.iter_mut().find(|l| l.product == product) {
                // Lines of one product are merged; the sum is held to the same bound.
                Some(line) => {
                    line.quantity = line.quantity.saturating_add(body.quantity);
                    if line.quantity > MAX_QUANTITY {
                        errors.push(FieldError::new(
                            format!("{prefix}quantity"),
                            "out_of_range",
                            format!("the lines of one product add up to more than {MAX_QUANTITY}"),
                        ));
                    }
                }
                None => lines.push(Line {
                    field: prefix,
                    product,
                    quantity: body.quantity,
                }),
            }
        }
        if let Some(total) = self.total_price
            && !(0..=kit::money::MAX_CENTS).contains(&total.cents())
        {
            errors.push(FieldError::new(
                "total_price",
                "out_of_range",
                "must be 0 or more",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        lines.sort_by(|a, b| a.product.cmp(&b.product));
        Ok(CreateOrder {
            user_id,
            lines,
            client_total: self.total_price,
        })
    }
}

/// `PATCH /api/v1/orders/{id}/status`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    pub status: Status,
    /// Why, for `failed` (and kept for `cancelled`).
    pub reason: Option<String>,
}

/// `GET /api/v1/orders` filters.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this user's orders (a signed-in user sees only their own).
    #[param(example = 1)]
    pub user_id: Option<i64>,
    #[param(inline, example = "pending")]
    pub status: Option<Status>,
    /// From 1 (at most 10,000).
    #[param(example = 1, minimum = 1, maximum = 10000)]
    pub page: Option<u32>,
    /// 1 to 100, default 20.
    #[param(example = 20, minimum = 1, maximum = 100)]
    pub per_page: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<CreateOrder, Vec<FieldError>> {
        serde_json::from_value::<CreateBody>(json)
            .expect("parses")
            .validate(None)
    }

    #[test]
    fn every_seed_shape_is_accepted() {
        let seed_003 = parse(serde_json::json!({"user_id": 1, "items": [
            {"product_id": "123", "quantity": 2}, {"product_id": 5, "quantity": 1}]}))
        .expect("seed 003");
        assert_eq!(
            seed_003
                .lines
                .iter()
                .map(|l| (&l.product, l.quantity))
                .collect::<Vec<_>>(),
            [(&ProductRef::Id(5), 1), (&ProductRef::Id(123), 2)],
            "sorted by product"
        );
        let seed_001 = parse(serde_json::json!(
            {"user_id": 1, "product_id": 2, "quantity": 2, "total_price": 1998.00}))
        .expect("seed 001");
        assert_eq!(seed_001.client_total, Some(Money::from_cents(199_800)));
        assert_eq!(seed_001.lines[0].field, "");
        let seed_002 = parse(serde_json::json!(
            {"user_id": 1, "item": "Pro Keyboard", "quantity": 2}))
        .expect("seed 002");
        assert_eq!(
            seed_002.lines[0].product,
            ProductRef::Item("Pro Keyboard".into())
        );
    }

    #[test]
    fn lines_of_one_product_are_merged_and_bounded() {
        let order = parse(serde_json::json!({"user_id": 1, "items": [
            {"product_id": 1, "quantity": 2}, {"product_id": "1", "quantity": 3}]}))
        .expect("valid");
        assert_eq!(order.lines.len(), 1);
        assert_eq!(order.lines[0].quantity, 5);
        let errors = parse(serde_json::json!({"user_id": 1, "items": [
            {"product_id": 1, "quantity": MAX_QUANTITY}, {"product_id": 1, "quantity": 1}]}))
        .expect_err("over the bound");
        assert_eq!(errors[0].field, "items[1].quantity");
    }

    #[test]
    fn invalid_requests_name_each_field() {
        let cases = [
            (
                serde_json::json!({"items": [{"product_id": 1, "quantity": 1}]}),
                "user_id",
            ),
            (
                serde_json::json!({"user_id": 0, "product_id": 1, "quantity": 1}),
                "user_id",
            ),
            (serde_json::json!({"user_id": 1}), "items"),
            (serde_json::json!({"user_id": 1, "items": []}), "items"),
            (
                serde_json::json!({"user_id": 1, "product_id": 1}),
                "quantity",
            ),
            (
                serde_json::json!({"user_id": 1, "product_id": 1, "quantity": 0}),
                "quantity",
            ),
            (
                serde_json::json!({"user_id": 1, "product_id": -3, "quantity": 1}),
                "product_id",
            ),
            (
                serde_json::json!({"user_id": 1, "item": " ", "quantity": 1}),
                "item",
            ),
            (
                serde_json::json!({"user_id": 1, "items": [{"quantity": 1}]}),
                "items[0].product_id",
            ),
            (
                serde_json::json!({"user_id": 1, "items": [{"product_id": 1, "quantity": 1}],
                    "product_id": 2}),
                "items",
            ),
            (
                serde_json::json!({"user_id": 1, "product_id": 1, "quantity": 1,
                    "total_price": -1}),
                "total_price",
            ),
        ];
        for (body, field) in cases {
            let errors = parse(body.clone()).expect_err("invalid");
            assert!(
                errors.iter().any(|e| e.field == field),
                "{body}: expected an error on `{field}`, got {errors:?}"
            );
        }
        assert!(
            serde_json::from_value::<CreateBody>(serde_json::json!({"user_id": 1, "colour": 1}))
                .is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn the_state_machine_allows_only_the_documented_moves() {
        use Status::*;
        let allowed = [
            (Pending, Processing),
            (Pending, Cancelled),
            (Processing, Processed),
            (Processing, Failed),
            (Processing, Cancelled),
            (Processed, Shipped),
            (Processed, Cancelled),
            (Shipped, Completed),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} → {to:?}"
                );
            }
        }
    }
}
