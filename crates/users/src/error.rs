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
    /// Wrong password or unknown email: one answer for both.
    #[error("invalid credentials")]
    InvalidCredentials,
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
            Error::InvalidCredentials => ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "The email or the password is wrong",
            ),
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
        if let Error::InvalidCredentials = self {
            // A 401 names its scheme (RFC 9110 11.6.1).
            let mut response = ApiError::from(self).into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(r#"Bearer realm="agora""#),
            );
            return response;
        }
        ApiError::from(self).into_response()
    }
}
