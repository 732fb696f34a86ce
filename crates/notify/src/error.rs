//! The notification service's errors, and the one place they become HTTP problems.

use axum::response::{IntoResponse, Response};
use kit::ApiError;

/// Everything a notify handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no notification {0}")]
    NotFound(i64),
    /// A retry of a delivery that has not failed.
    #[error("notification {id} is {status}, not failed")]
    NotFailed { id: i64, status: String },
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
            Error::NotFound(id) => ApiError::not_found("notification", id),
            Error::NotFailed { id, status } => ApiError::conflict(
                "not_failed",
                format!("Notification {id} is {status}; only a failed one can be retried"),
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
