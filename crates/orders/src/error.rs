//! The orders service's errors, and the one place they become HTTP problems.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kit::client::CallError;
use kit::{ApiError, FieldError};

use crate::domain::Status;

/// Everything an orders handler (or the worker) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no order {0}")]
    NotFound(i64),
    /// Invalid fields, or fields naming what does not exist (a user, a product): 422.
    #[error("invalid fields")]
    Invalid(Vec<FieldError>),
    #[error("not enough stock")]
    InsufficientStock(Vec<FieldError>),
    #[error("order {id} is {from:?}; it cannot become {to:?}")]
    Transition { id: i64, from: Status, to: Status },
    #[error("idempotency key reused with another request")]
    KeyReused,
    #[error("a request with this idempotency key is still being answered")]
    KeyInProgress,
    /// The create outlived `reservation_timeout_secs`: its stock was (being) released by the
    /// sweep, so the order was not stored.
    #[error("the reservation expired before the order was stored")]
    ReservationExpired { timeout_secs: u64 },
    /// Boxed: a neighbour's problem body is large, and most results never carry one.
    #[error(transparent)]
    Neighbour(Box<CallError>),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<CallError> for Error {
    fn from(err: CallError) -> Self {
        Error::Neighbour(Box::new(err))
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::NotFound(id) => ApiError::not_found("order", id),
            Error::Invalid(errors) => ApiError::validation(errors),
            Error::InsufficientStock(errors) => {
                let mut api = ApiError::conflict(
                    "insufficient_stock",
                    "Not enough stock for every item; nothing was ordered",
                );
                for error in errors {
                    api = api.with_field_error(error);
                }
                api
            }
            Error::Transition { id, from, to } => {
                let allowed: Vec<&str> = from.next().iter().map(|s| s.as_str()).collect();
                let mut api = ApiError::conflict(
                    "invalid_transition",
                    format!(
                        "Order {id} is {}; it can become {} but not {}",
                        from.as_str(),
                        if allowed.is_empty() {
                            "nothing else".to_owned()
                        } else {
                            allowed.join(", ")
                        },
                        to.as_str()
                    ),
                );
                for next in allowed {
                    api = api.with_field_error(FieldError::new("status", "allowed", next));
                }
                api
            }
            Error::KeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request",
            ),
            Error::KeyInProgress => ApiError::conflict(
                "idempotency_key_in_progress",
                "A request with this Idempotency-Key is still being answered; retry shortly",
            ),
            // 503 (with Retry-After): nothing was stored and nothing is held; sending the same
            // order again makes a new reservation.
            Error::ReservationExpired { timeout_secs } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "reservation_expired",
                format!(
                    "The order could not be stored within {timeout_secs} s of reserving its \
                     stock, so the stock was released and nothing was ordered; try again"
                ),
            ),
            Error::Neighbour(err) => (*err).into(),
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
