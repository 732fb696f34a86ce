//! What orders asks of its neighbours: does a user exist (users), which product does an order
//! name, and hold, sell or give back its stock (catalog's internal reservations, idempotent by
//! reservation id, so every call may be repeated).

use std::time::Duration;

use kit::client::{CallError, ServiceClient};
use kit::money::Money;
use kit::{FieldError, Settings};
use serde::{Deserialize, Serialize};

/// A line of a catalog reservation.
#[derive(Debug, Clone, Deserialize)]
pub struct ReservedItem {
    pub product_id: i64,
    pub quantity: i64,
    pub unit_price: Money,
}

/// A catalog reservation.
#[derive(Debug, Clone, Deserialize)]
pub struct Reservation {
    pub items: Vec<ReservedItem>,
    pub total: Money,
}

#[derive(Serialize)]
struct ReserveBody<'a> {
    order_id: &'a str,
    items: Vec<ReserveLine>,
}

#[derive(Serialize)]
struct ReserveLine {
    product_id: i64,
    quantity: i64,
}

#[derive(Deserialize)]
struct Found {
    id: i64,
}

/// Why a reservation was refused.
#[derive(Debug)]
pub enum Refusal {
    /// Products that do not exist, by index into the lines sent.
    Unknown(Vec<usize>),
    /// Lines short of stock, by index, with catalog's message.
    Short(Vec<(usize, String)>),
    /// The reservation id was released before catalog saw this reserve (a retry arriving after
    /// the sweep gave up on a slow create): nothing is held.
    Released,
}

/// The users and catalog services.
pub struct Neighbours {
    users: ServiceClient,
    catalog: ServiceClient,
}

impl Neighbours {
    pub fn new(settings: &Settings, timeout: Duration) -> anyhow::Result<Self> {
        let mut users = ServiceClient::new("users", settings.upstreams("users"), timeout)?;
        let mut catalog = ServiceClient::new("catalog", settings.upstreams("catalog"), timeout)?;
        // Internal endpoints (catalog's reservations) answer only callers with the credential.
        if let Some(token) = &settings.auth.service_token {
            let header = &kit::auth::SERVICE_TOKEN_HEADER;
            users = users.with_header(header, token.expose())?;
            catalog = catalog.with_header(header, token.expose())?;
        }
        Ok(Self { users, catalog })
    }

    pub async fn user_exists(&self, id: i64) -> Result<bool, CallError> {
        Ok(self
            .users
            .get_json::<serde_json::Value>(&format!("/api/v1/users/{id}"))
            .await?
            .is_some())
    }

    /// The id of the product named `item` (a sku or a name).
    pub async fn product_named(&self, item: &str) -> Result<Option<i64>, CallError> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("item", item)
            .finish();
        Ok(self
            .catalog
            .get_json::<Found>(&format!("/internal/v1/products/lookup?{query}"))
            .await?
            .map(|found| found.id))
    }

    /// Holds `lines` (product, quantity) under `reservation_id`, all or nothing.
    pub async fn reserve(
        &self,
        reservation_id: &str,
        lines: &[(i64, i64)],
    ) -> Result<Result<Reservation, Refusal>, CallError> {
        let body = ReserveBody {
            order_id: reservation_id,
            items: lines
                .iter()
                .map(|&(product_id, quantity)| ReserveLine {
                    product_id,
                    quantity,
                })
                .collect(),
        };
        match self
            .catalog
            .post_json("/internal/v1/reservations", &body, true)
            .await
        {
            Ok(reservation) => Ok(Ok(reservation)),
            // Not a shortage (catalog's 409s share a status): this id was released already.
            Err(CallError::Refused {
                status,
                problem: Some(problem),
                ..
            }) if status.as_u16() == 409 && problem.code == "reservation_released" => {
                Ok(Err(Refusal::Released))
            }
            Err(CallError::Refused {
                status, problem, ..
            }) if status.as_u16() == 422 || status.as_u16() == 409 => {
                let errors: Vec<FieldError> = problem.map(|p| p.errors).unwrap_or_default();
                // catalog names lines `items[i].…` in the order they were sent (merged and
                // sorted already, as sent here).
                let index = |e: &FieldError| {
                    e.field
                        .strip_prefix("items[")
                        .and_then(|rest| rest.split(']').next())
                        .and_then(|i| i.parse::<usize>().ok())
                };
                if status.as_u16() == 422 {
                    Ok(Err(Refusal::Unknown(
                        errors
                            .iter()
                            .filter(|e| e.code == "not_found")
                            .filter_map(index)
                            .collect(),
                    )))
                } else {
                    Ok(Err(Refusal::Short(
                        errors
                            .iter()
                            .filter_map(|e| index(e).map(|i| (i, e.message.clone())))
                            .collect(),
                    )))
                }
            }
            Err(err) => Err(err),
        }
    }

    /// `commit`, `release` or `return` the reservation (each idempotent at catalog).
    pub async fn settle(
        &self,
        reservation_id: &str,
        action: &str,
    ) -> Result<Reservation, CallError> {
        self.catalog
            .post_json(
                &format!("/internal/v1/reservations/{reservation_id}/{action}"),
                &serde_json::json!({}),
                true,
            )
            .await
    }
}
