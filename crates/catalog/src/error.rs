//! The catalog's errors, and the one place they become HTTP problems.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kit::{ApiError, FieldError};

/// Everything a catalog handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no product with id {0}")]
    ProductNotFound(i64),
    #[error("no reservation for order {0}")]
    ReservationNotFound(String),
    #[error("invalid fields")]
    Invalid(Vec<FieldError>),
    #[error("sku `{0}` is taken")]
    SkuTaken(String),
    /// Stock would go negative; `errors` names each short line.
    #[error("insufficient stock")]
    InsufficientStock {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// The order id's reservation is in a state that forbids the call (e.g. commit after
    /// release), or was made with other items.
    #[error("reservation conflict: {detail}")]
    ReservationConflict { code: &'static str, detail: String },
    #[error("product {0} has reserved units")]
    ProductReserved(i64),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::ProductNotFound(id) => ApiError::not_found("product", id),
            Error::ReservationNotFound(order_id) => ApiError::new(
                StatusCode::NOT_FOUND,
                "reservation_not_found",
                format!("No reservation for order `{order_id}`"),
            ),
            Error::Invalid(errors) => ApiError::validation(errors),
            Error::SkuTaken(sku) => ApiError::conflict(
                "sku_taken",
                format!("The sku `{sku}` is already used by another product"),
            )
            .with_field_error(FieldError::new(
                "sku",
                "taken",
                "is already used by another product",
            )),
            Error::InsufficientStock { detail, errors } => errors.into_iter().fold(
                ApiError::conflict("insufficient_stock", detail),
                ApiError::with_field_error,
            ),
            Error::ReservationConflict { code, detail } => ApiError::conflict(code, detail),
            Error::ProductReserved(id) => ApiError::conflict(
                "product_reserved",
                format!(
                    "Product {id} has units held by open reservations; commit or release them first"
                ),
            ),
            Error::Api(err) => err,
            Error::Database(err) => err.into(),
            Error::Internal(err) => err.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::from(self).into_response()
    }
}
