//! The users service's errors, and the one place they become HTTP problems.

use axum::response::{IntoResponse, Response};
use kit::{ApiError, FieldError};

/// Everything a users handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no user {0}")]
    NotFound(String),
    #[error("invalid fields")]
    Invalid(Vec<FieldError>),
    #[error("{field} `{value}` is taken")]
    Taken { field: &'static str, value: String },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl kit::db::AsDbError for Error {
    fn as_db_error(&self) -> Option<&sqlx::Error> {
        match self {
            Error::Database(err) => Some(err),
            _ => None,
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::NotFound(what) => ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "user_not_found",
                format!("No user {what}"),
            ),
            Error::Invalid(errors) => ApiError::validation(errors),
            Error::Taken { field, value } => ApiError::conflict(
                &format!("{field}_taken"),
                format!("The {field} `{value}` is already used by another user"),
            )
            .with_field_error(FieldError::new(
                field,
                "taken",
                "is already used by another user",
            )),
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
