//! The chat service's errors, and the one place they become HTTP problems.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kit::ApiError;

/// Everything a chat handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no chat {0}")]
    ChatNotFound(String),
    #[error("{participant} is not in chat {chat}")]
    ParticipantNotFound { chat: String, participant: String },
    /// The sender (or subscriber) is not a participant of the chat.
    #[error("{participant} is not a participant of chat {chat}")]
    NotAParticipant { chat: String, participant: String },
    /// A signed-in caller posting as someone else.
    #[error("{caller} may not post as {sender}")]
    SenderMismatch { caller: String, sender: String },
    #[error("chat {chat} has {max} subscribers on this replica")]
    TooManySubscribers { chat: String, max: usize },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        match err {
            Error::ChatNotFound(id) => ApiError::not_found("chat", id),
            Error::ParticipantNotFound { chat, participant } => ApiError::new(
                StatusCode::NOT_FOUND,
                "participant_not_found",
                format!("{participant} is not a participant of chat {chat}"),
            ),
            Error::NotAParticipant { chat, participant } => ApiError::new(
                StatusCode::FORBIDDEN,
                "not_a_participant",
                format!(
                    "{participant} is not a participant of chat {chat}; add them with POST /api/v1/chats/{chat}/participants first"
                ),
            ),
            Error::SenderMismatch { caller, sender } => ApiError::new(
                StatusCode::FORBIDDEN,
                "sender_mismatch",
                format!("You are {caller}; a message cannot be sent as {sender}"),
            ),
            Error::TooManySubscribers { chat, max } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                format!("Chat {chat} already has {max} live subscribers here; try again later"),
            ),
            Error::Api(err) => err,
            Error::Internal(err) => err.into(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let retry = matches!(self, Error::TooManySubscribers { .. });
        let mut response = ApiError::from(self).into_response();
        if retry {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("5"),
            );
        }
        response
    }
}
